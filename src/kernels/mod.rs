//! CUDA kernels for the codecs' hot loops (feature `nccl`), compiled at run time with NVRTC.
//!
//! The sources live in `kernels/` at the top of the repository (CUDA C, no headers: conversions
//! are PTX `cvt` instructions) and are built into the binary; [`Nvrtc`] compiles them to PTX for
//! the architectures burnrun supports ([`ARCHITECTURES`]). NVRTC needs no GPU, so CI compiles
//! every kernel for every architecture and checks the PTX; running them (and the parity test
//! against the CPU codecs in `compress/`) needs a GPU.

mod error;
mod nvrtc;

pub use error::KernelError;
pub use nvrtc::{candidates, Nvrtc, Ptx};

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
        entries: &["cast_bf16_ef", "cast_f16_ef", "widen_bf16", "widen_f16"],
    },
    KernelSource {
        file: "topk.cu",
        source: include_str!("../../kernels/topk.cu"),
        entries: &["count_at_least", "gather_at_least"],
    },
];

/// The virtual architectures the kernels are compiled for: Ampere (sm_80, the first with a bf16
/// `cvt`) and Hopper (sm_90).
pub const ARCHITECTURES: [&str; 2] = ["compute_80", "compute_90"];
