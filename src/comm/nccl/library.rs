//! Finding and loading NCCL, and the part of its C API burnrun calls.
//!
//! cudarc loads `libnccl.so` and a few versioned names, never `libnccl.so.2`, the name NCCL
//! installs and the only one PyPI's `nvidia-nccl-cu12`/`-cu13` wheels (which every PyTorch
//! install carries) ship. So the library is found here, where users have it (see
//! [`LibrarySearch`]), loaded with `dlopen`, and its functions are resolved once into [`Nccl`]. A
//! library that is nowhere is an error listing every place looked, never a panic; so is a missing
//! symbol (an NCCL too old for a call).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::env::LibrarySearch;

use super::error::NcclError;

/// The file name NCCL installs (its SONAME).
pub const NCCL_SONAME: &str = "libnccl.so.2";

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: an opaque 128-byte value (NCCL puts rank 0's socket address in it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    /// The bytes.
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id holds a socket address: not secret, but no use in a log either.
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// The id as bytes (to publish in the store).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.internal.iter().map(|&c| c as u8).collect()
    }

    /// An id from the bytes [`UniqueId::to_bytes`] gave.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NcclError> {
        if bytes.len() != UNIQUE_ID_BYTES {
            return Err(NcclError::BadUniqueId { len: bytes.len() });
        }
        let mut internal = [0 as c_char; UNIQUE_ID_BYTES];
        for (dst, &src) in internal.iter_mut().zip(bytes) {
            *dst = src as c_char;
        }
        Ok(Self { internal })
    }
}

/// `ncclComm_t`.
pub type RawComm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream`).
pub type RawStream = *mut c_void;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int;
type CommHandle = unsafe extern "C" fn(RawComm) -> c_int;
type CommGetAsyncError = unsafe extern "C" fn(RawComm, *mut c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> c_int;
type Reduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, c_int, RawComm, RawStream) -> c_int;
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, RawStream) -> c_int;
type ReduceScatter = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> c_int;
type SendRecv = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, RawStream) -> c_int;
type GroupCall = unsafe extern "C" fn() -> c_int;
type CommSplit = unsafe extern "C" fn(RawComm, c_int, c_int, *mut RawComm, *mut c_void) -> c_int;

/// `NCCL_SPLIT_NOCOLOR`: the color of a rank that joins no sub-communicator.
const NCCL_SPLIT_NOCOLOR: c_int = -1;

/// NCCL's functions, resolved from the loaded library.
pub struct Nccl {
    /// Where the library was loaded from.
    pub path: PathBuf,
    // Kept alive for the function pointers below.
    _library: libloading::Library,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    get_error_string: GetErrorString,
    comm_init_rank: CommInitRank,
    comm_abort: CommHandle,
    comm_destroy: CommHandle,
    comm_get_async_error: CommGetAsyncError,
    pub(crate) all_reduce: AllReduce,
    pub(crate) reduce: Reduce,
    pub(crate) broadcast: Broadcast,
    pub(crate) all_gather: AllGather,
    pub(crate) reduce_scatter: ReduceScatter,
    pub(crate) send: SendRecv,
    pub(crate) recv: SendRecv,
    pub(crate) group_start: GroupCall,
    pub(crate) group_end: GroupCall,
    /// `ncclCommSplit` (NCCL 2.18+), absent from older libraries.
    comm_split: Option<CommSplit>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl").field("path", &self.path).finish_non_exhaustive()
    }
}

/// `ncclSuccess`.
const NCCL_SUCCESS: c_int = 0;

impl Nccl {
    /// The process's NCCL, found and loaded on first use with the search of this process's
    /// environment.
    pub fn get() -> Result<&'static Nccl, NcclError> {
        static LOADED: OnceLock<Result<Nccl, NcclError>> = OnceLock::new();
        LOADED
            .get_or_init(|| Nccl::find(&LibrarySearch::from_env()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Finds NCCL where `search` says and loads the first candidate that loads.
    pub fn find(search: &LibrarySearch) -> Result<Nccl, NcclError> {
        let mut looked = Vec::new();
        let mut failures = Vec::new();
        for candidate in candidates(search) {
            let shown = candidate.display().to_string();
            let is_bare_name = candidate.components().count() == 1;
            if !is_bare_name && !candidate.exists() {
                looked.push(shown);
                continue;
            }
            match Self::load(&candidate) {
                Ok(nccl) => return Ok(nccl),
                Err(e) => failures.push(format!("{shown}: {e}")),
            }
            looked.push(shown);
        }
        Err(NcclError::LibraryNotFound { looked, failures })
    }

    /// Loads the library at `path` (a bare file name goes through the loader's own search).
    pub fn load(path: &Path) -> Result<Nccl, NcclError> {
        // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| NcclError::Load {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let path = path.to_path_buf();
        macro_rules! symbol {
            ($name:literal) => {{
                // SAFETY: the symbol is NCCL's function of that name, whose C signature the type
                // this is assigned to repeats (nccl.h, NCCL 2.x).
                let f =
                    unsafe { library.get(concat!($name, "\0").as_bytes()) }.map_err(|_| NcclError::MissingSymbol {
                        path: path.display().to_string(),
                        symbol: $name,
                    })?;
                *f
            }};
        }
        Ok(Nccl {
            get_version: symbol!("ncclGetVersion"),
            get_unique_id: symbol!("ncclGetUniqueId"),
            get_error_string: symbol!("ncclGetErrorString"),
            comm_init_rank: symbol!("ncclCommInitRank"),
            comm_abort: symbol!("ncclCommAbort"),
            comm_destroy: symbol!("ncclCommDestroy"),
            comm_get_async_error: symbol!("ncclCommGetAsyncError"),
            all_reduce: symbol!("ncclAllReduce"),
            reduce: symbol!("ncclReduce"),
            broadcast: symbol!("ncclBroadcast"),
            all_gather: symbol!("ncclAllGather"),
            reduce_scatter: symbol!("ncclReduceScatter"),
            send: symbol!("ncclSend"),
            recv: symbol!("ncclRecv"),
            group_start: symbol!("ncclGroupStart"),
            group_end: symbol!("ncclGroupEnd"),
            // SAFETY: as above; optional, since NCCL before 2.18 lacks it.
            comm_split: unsafe { library.get::<CommSplit>(b"ncclCommSplit\0") }.ok().map(|f| *f),
            path,
            _library: library,
        })
    }

    /// NCCL's version as one number (`major * 10000 + minor * 100 + patch` since 2.9: 23007 is
    /// 2.30.7).
    pub fn version(&self) -> Result<i32, NcclError> {
        let mut version: c_int = 0;
        // SAFETY: ncclGetVersion writes one int through the pointer, which is valid.
        let code = unsafe { (self.get_version)(&mut version) };
        self.check("ncclGetVersion", code)?;
        Ok(version)
    }

    /// A fresh unique id (rank 0 makes it; everyone joins with it). Works without a GPU.
    pub fn unique_id(&self) -> Result<UniqueId, NcclError> {
        let mut id = UniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId fills the 128-byte struct the pointer points to.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        self.check("ncclGetUniqueId", code)?;
        Ok(id)
    }

    /// Joins the communicator of `world_size` ranks that `id` names as `rank`, on the CUDA device
    /// current on this thread. Without a GPU (or a CUDA driver) NCCL returns an error, which this
    /// returns.
    pub fn init_rank(&'static self, id: UniqueId, rank: usize, world_size: usize) -> Result<Comm, NcclError> {
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank writes the new communicator through the pointer; the id is
        // passed by value as NCCL's signature takes it.
        let code = unsafe { (self.comm_init_rank)(&mut raw, world_size as c_int, id, rank as c_int) };
        self.check("ncclCommInitRank", code)?;
        Ok(Comm { nccl: self, raw })
    }

    /// Splits `parent` (a collective call: every rank of `parent` makes it): the ranks passing
    /// the same `color` form one new communicator, ordered by `key`; `None` as color joins none
    /// and gets `None` back. An NCCL older than 2.18 has no split: an error saying so.
    pub fn split(&'static self, parent: &Comm, color: Option<usize>, key: usize) -> Result<Option<Comm>, NcclError> {
        // SAFETY: the parent is alive for the call (borrowed).
        unsafe { self.split_raw(parent.raw, color, key) }
    }

    /// [`Nccl::split`] of a raw parent handle, for a caller that runs the split on another thread.
    ///
    /// # Safety
    /// `parent` must be a live communicator of this library, not destroyed during the call.
    pub(crate) unsafe fn split_raw(
        &'static self,
        parent: RawComm,
        color: Option<usize>,
        key: usize,
    ) -> Result<Option<Comm>, NcclError> {
        let Some(split) = self.comm_split else {
            return Err(NcclError::MissingSymbol {
                path: self.path.display().to_string(),
                symbol: "ncclCommSplit (NCCL 2.18 or newer)",
            });
        };
        let color = color.map_or(NCCL_SPLIT_NOCOLOR, |c| c as c_int);
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: the parent is alive (the caller's contract); NCCL writes the new communicator
        // (or null for NCCL_SPLIT_NOCOLOR) through the pointer; a null config means the parent's.
        let code = unsafe { split(parent, color, key as c_int, &mut raw, std::ptr::null_mut()) };
        self.check("ncclCommSplit", code)?;
        Ok((!raw.is_null()).then_some(Comm { nccl: self, raw }))
    }

    /// NCCL's name for a result code.
    pub fn error_string(&self, code: i32) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { (self.get_error_string)(code) };
        if text.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: not null (checked), NUL-terminated and static (NCCL's contract).
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }

    /// `Ok` for `ncclSuccess`, else an error naming `call`, the code and NCCL's message.
    pub(crate) fn check(&self, call: &'static str, code: c_int) -> Result<(), NcclError> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        Err(NcclError::Call {
            call,
            code,
            message: self.error_string(code),
        })
    }
}

/// Where to try, in order: `NCCL_LIBRARY` (a file, or a folder holding the library), the folders
/// of `LD_LIBRARY_PATH`, a CUDA install, the PyPI wheels in the Python environments, then the
/// loader's own search by name.
pub fn candidates(search: &LibrarySearch) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(given) = &search.nccl_library {
        if given.is_dir() {
            out.push(given.join(NCCL_SONAME));
            out.push(given.join("libnccl.so"));
        } else {
            out.push(given.clone());
        }
    }
    for dir in &search.ld_library_path {
        out.push(dir.join(NCCL_SONAME));
    }
    for dir in ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"] {
        out.push(Path::new(dir).join(NCCL_SONAME));
    }
    for site in search.site_packages() {
        out.push(site.join("nvidia/nccl/lib").join(NCCL_SONAME));
    }
    out.push(PathBuf::from(NCCL_SONAME));
    out
}

/// An NCCL communicator handle: destroyed when dropped, or aborted ([`Comm::abort`]) when a peer
/// failed or a deadline passed, so no call is left waiting on a dead rank.
#[derive(Debug)]
pub struct Comm {
    nccl: &'static Nccl,
    raw: RawComm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap,
// which the owner (one communicator thread) ensures; the pointer itself is just an address.
unsafe impl Send for Comm {}

impl Comm {
    /// The raw `ncclComm_t`, for the collective calls.
    pub fn raw(&self) -> RawComm {
        self.raw
    }

    /// An error NCCL found in the background (a peer gone, a network failure), if any.
    pub fn async_error(&self) -> Result<(), NcclError> {
        let mut code: c_int = 0;
        // SAFETY: the communicator is alive (owned by self); NCCL writes one int.
        let call = unsafe { (self.nccl.comm_get_async_error)(self.raw, &mut code) };
        self.nccl.check("ncclCommGetAsyncError", call)?;
        self.nccl.check("an operation in the background", code)
    }

    /// Aborts every operation on the communicator and frees it: what a deadline or a dead peer
    /// calls for (a destroy would wait for the operations).
    pub fn abort(mut self) -> Result<(), NcclError> {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: raw is this handle's live communicator; it is not used again (nulled above).
        let code = unsafe { (self.nccl.comm_abort)(raw) };
        self.nccl.check("ncclCommAbort", code)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: raw is this handle's live communicator, destroyed once.
            let _ = unsafe { (self.nccl.comm_destroy)(self.raw) };
        }
    }
}
