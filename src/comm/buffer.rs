//! Buffer views handed to a communicator: a dtype tag, an element count and the memory.
//!
//! Host memory is a byte slice viewed from a typed slice (so it is aligned for its dtype). The
//! memory enum is where device memory (a CUDA pointer, feature `cuda`) enters the same calls: the
//! NCCL communicator takes device buffers and bypasses the host algorithms.

use super::dtype::{DType, Element};

/// Where a buffer's bytes live.
#[derive(Debug)]
#[non_exhaustive]
pub enum Memory<'a> {
    /// Host memory, read only.
    Host(&'a [u8]),
    /// Device memory, addressed by a raw device pointer the caller keeps alive for the call.
    Device(DevicePtr),
}

/// Where a mutable buffer's bytes live.
#[derive(Debug)]
#[non_exhaustive]
pub enum MemoryMut<'a> {
    /// Host memory.
    Host(&'a mut [u8]),
    /// Device memory.
    Device(DevicePtr),
}

/// A raw device allocation: pointer and device ordinal. Only a device communicator reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePtr {
    /// The device address.
    pub address: u64,
    /// The device ordinal.
    pub ordinal: usize,
}

/// A read-only buffer view.
#[derive(Debug)]
pub struct BufRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Number of elements.
    pub numel: usize,
    /// The memory.
    pub memory: Memory<'a>,
}

/// A mutable buffer view.
#[derive(Debug)]
pub struct BufMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Number of elements.
    pub numel: usize,
    /// The memory.
    pub memory: MemoryMut<'a>,
}

impl<'a> BufRef<'a> {
    /// Views a typed host slice.
    pub fn host<T: Element>(data: &'a [T]) -> Self {
        Self {
            dtype: T::DTYPE,
            numel: data.len(),
            memory: Memory::Host(bytemuck::cast_slice(data)),
        }
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.numel * self.dtype.size_bytes()
    }

    /// The host bytes, or `None` for device memory.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.memory {
            Memory::Host(bytes) => Some(bytes),
            Memory::Device(_) => None,
        }
    }
}

impl<'a> BufMut<'a> {
    /// Views a typed mutable host slice.
    pub fn host<T: Element>(data: &'a mut [T]) -> Self {
        Self {
            dtype: T::DTYPE,
            numel: data.len(),
            memory: MemoryMut::Host(bytemuck::cast_slice_mut(data)),
        }
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.numel * self.dtype.size_bytes()
    }

    /// The host bytes, or `None` for device memory.
    pub fn host_bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.memory {
            MemoryMut::Host(bytes) => Some(bytes),
            MemoryMut::Device(_) => None,
        }
    }

    /// A read-only view of the same memory.
    pub fn as_ref(&self) -> BufRef<'_> {
        let memory = match &self.memory {
            MemoryMut::Host(bytes) => Memory::Host(bytes),
            MemoryMut::Device(ptr) => Memory::Device(*ptr),
        };
        BufRef {
            dtype: self.dtype,
            numel: self.numel,
            memory,
        }
    }
}

/// A heap buffer of any dtype, aligned for every dtype (backed by `u64` words).
///
/// Used for scratch space and by callers that hold data of a dtype chosen at run time.
#[derive(Clone, PartialEq)]
pub struct HostBuffer {
    dtype: DType,
    numel: usize,
    words: Vec<u64>,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuffer({}x{})", self.dtype, self.numel)
    }
}

impl HostBuffer {
    /// Zero-filled buffer.
    pub fn zeros(dtype: DType, numel: usize) -> Self {
        let words = (numel * dtype.size_bytes()).div_ceil(8);
        Self {
            dtype,
            numel,
            words: vec![0; words],
        }
    }

    /// Copies a typed slice.
    pub fn from_slice<T: Element>(data: &[T]) -> Self {
        let mut out = Self::zeros(T::DTYPE, data.len());
        out.bytes_mut().copy_from_slice(bytemuck::cast_slice(data));
        out
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.numel * self.dtype.size_bytes()]
    }

    /// The bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.numel * self.dtype.size_bytes();
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    /// Typed view; panics if `T` is not this buffer's dtype.
    pub fn as_slice<T: Element>(&self) -> &[T] {
        assert_eq!(T::DTYPE, self.dtype, "HostBuffer::as_slice with the wrong element type");
        bytemuck::cast_slice(self.bytes())
    }

    /// Typed mutable view; panics if `T` is not this buffer's dtype.
    pub fn as_mut_slice<T: Element>(&mut self) -> &mut [T] {
        assert_eq!(
            T::DTYPE,
            self.dtype,
            "HostBuffer::as_mut_slice with the wrong element type"
        );
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// A read-only view.
    pub fn view(&self) -> BufRef<'_> {
        BufRef {
            dtype: self.dtype,
            numel: self.numel,
            memory: Memory::Host(self.bytes()),
        }
    }

    /// A mutable view.
    pub fn view_mut(&mut self) -> BufMut<'_> {
        let (dtype, numel) = (self.dtype, self.numel);
        BufMut {
            dtype,
            numel,
            memory: MemoryMut::Host(self.bytes_mut()),
        }
    }
}

/// Why a buffer named `name` of `whole` (dtype, elements) cannot hold `n` blocks of `part`'s
/// shape (all-gather's output, reduce-scatter's input); `None` when it can. Every engine's check.
pub(crate) fn blocks_mismatch(name: &str, whole: (DType, usize), part: (DType, usize), n: usize) -> Option<String> {
    let ((dtype, numel), (part_dtype, part_numel)) = (whole, part);
    (dtype != part_dtype || numel != part_numel * n).then(|| {
        format!(
            "{name} is {dtype} x {numel}, expected {part_dtype} x {} ({n} ranks x {part_numel})",
            part_numel * n
        )
    })
}
