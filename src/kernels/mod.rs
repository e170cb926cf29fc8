//! CUDA kernels for the codecs' hot loops, compiled at run time with NVRTC (feature `nccl`), and
//! their CPU references (every build).
//!
//! The sources live in `kernels/` at the top of the repository (CUDA C, no headers: conversions
//! are PTX `cvt` instructions) and are built into the binary; `Nvrtc` compiles them to PTX for
//! the architectures burnrun supports ([`ARCHITECTURES`]), and `Kernels` loads them into a CUDA
//! context and launches them through typed, length-checked methods (both feature `nccl`).
//! [`reference`](mod@reference) repeats every kernel in Rust, operation for operation. NVRTC
//! needs no GPU, so CI compiles every kernel for every architecture and checks the PTX, and
//! checks the references against the CPU codecs of `compress/`; launching the kernels (and
//! comparing them with their references) needs a GPU.

mod error;
#[cfg(feature = "nccl")]
mod launch;
#[cfg(feature = "nccl")]
mod nvrtc;
pub mod reference;

pub use error::KernelError;
#[cfg(feature = "nccl")]
pub use launch::{Kernels, TopKSelection, BLOCK};
#[cfg(feature = "nccl")]
pub use nvrtc::{candidates, Nvrtc, Ptx};
pub use reference::{HalfFormat, Threshold};

/// A kernel source file of `kernels/`, and the functions it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name, for messages.
    pub file: &'static str,
    /// The CUDA C source.
    pub source: &'static str,
    /// Its `extern "C" __global__` functions.
    pub entries: &'static [&'static str],
}

/// Every kernel source.
pub const SOURCES: [KernelSource; 2] = [
    KernelSource {
        file: "half_cast.cu",
        source: include_str!("../../kernels/half_cast.cu"),
        entries: &[
            "cast_bf16",
            "cast_f16",
            "widen_bf16",
            "widen_f16",
            "residual_bf16",
            "residual_f16",
            "count_nonfinite_half",
        ],
    },
    KernelSource {
        file: "topk.cu",
        source: include_str!("../../kernels/topk.cu"),
        entries: &[
            "count_selected",
            "gather_selected",
            "residual_topk",
            "count_out_of_range",
            "count_nonfinite",
            "scatter_add",
            "divide",
        ],
    },
];

/// The virtual architectures the kernels are compiled for: Ampere (sm_80, the first with a bf16
/// `cvt`) and Hopper (sm_90).
pub const ARCHITECTURES: [&str; 2] = ["compute_80", "compute_90"];

/// The architecture of [`ARCHITECTURES`] to compile for on a device of compute capability
/// `major.minor`: the newest not above it (its PTX is JIT-compiled by the driver for the device:
/// 8.6 and 8.9 run `compute_80`, 10.0 and 12.0 run `compute_90`). Below 8.0 there is none: the
/// bf16 conversion needs sm_80.
pub fn architecture_for(major: i32, minor: i32) -> Result<&'static str, KernelError> {
    let capability = major * 10 + minor;
    ARCHITECTURES
        .iter()
        .rev()
        .find(|arch| {
            arch.trim_start_matches("compute_")
                .parse::<i32>()
                .is_ok_and(|a| a <= capability)
        })
        .copied()
        .ok_or_else(|| KernelError::Unsupported {
            what: format!(
                "a device of compute capability {major}.{minor}: the kernels need 8.0 or newer (Ampere; bf16 \
                 conversions), and compile for {}",
                ARCHITECTURES.join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_gets_the_newest_architecture_not_above_its_capability() {
        assert_eq!(architecture_for(8, 0), Ok("compute_80"));
        assert_eq!(architecture_for(8, 6), Ok("compute_80"));
        assert_eq!(architecture_for(8, 9), Ok("compute_80"));
        assert_eq!(architecture_for(9, 0), Ok("compute_90"));
        assert_eq!(architecture_for(12, 0), Ok("compute_90"));
        let old = architecture_for(7, 5).unwrap_err().to_string();
        assert!(old.contains("7.5") && old.contains("8.0"), "{old}");
    }

    #[test]
    fn every_source_names_its_entries_as_extern_c_kernels() {
        for kernel in &SOURCES {
            for entry in kernel.entries {
                assert!(
                    kernel.source.contains(&format!("__global__ void {entry}(")),
                    "{} lacks {entry}",
                    kernel.file
                );
            }
            let defined = kernel.source.matches("extern \"C\" __global__").count();
            assert_eq!(defined, kernel.entries.len(), "{}: every kernel is listed", kernel.file);
        }
    }
}
