//! What can go wrong compiling, loading and launching kernels.

use std::time::Duration;

/// A kernel failure: finding NVRTC, compiling, loading into a CUDA context, or a launch's
/// arguments, the device or its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// No NVRTC library loaded.
    #[error(
        "NVRTC not found: looked in {} place(s): {}{}; install the CUDA toolkit or `pip install \
         nvidia-cuda-nvrtc-cu12`, or set NVRTC_LIBRARY to the library or its folder",
        .looked.len(),
        .looked.join(", "),
        if .failures.is_empty() { String::new() } else { format!(" (found but not loadable: {})", .failures.join("; ")) }
    )]
    LibraryNotFound {
        /// Every path tried.
        looked: Vec<String>,
        /// Candidates that exist but did not load, with why.
        failures: Vec<String>,
    },
    /// The library at `path` did not load or lacks a function.
    #[error("cannot use NVRTC at {path}: {why}")]
    Load {
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
    /// An NVRTC call failed.
    #[error("{call} failed for {file} ({arch}): {message}")]
    Call {
        /// The function.
        call: &'static str,
        /// The kernel file.
        file: String,
        /// The architecture.
        arch: String,
        /// NVRTC's text for the code.
        message: String,
    },
    /// The source did not compile: NVRTC's log says where.
    #[error("{file} does not compile for {arch}:\n{log}")]
    Compile {
        /// The kernel file.
        file: String,
        /// The architecture.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// No CUDA device to run on: the driver library is absent, or it has no device `ordinal`.
    #[error("no CUDA device {ordinal}: {why}")]
    NoDevice {
        /// The device asked for.
        ordinal: usize,
        /// Why there is none.
        why: String,
    },
    /// The device cannot run the kernels.
    #[error("cannot run the kernels on {what}")]
    Unsupported {
        /// The device and what it lacks.
        what: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA: {call} for {kernel}: {why}")]
    Driver {
        /// What was asked of the driver.
        call: &'static str,
        /// The kernel (or kernel file) it was for.
        kernel: &'static str,
        /// The driver's error.
        why: String,
    },
    /// A kernel's arguments do not fit together (lengths, counts): nothing was launched.
    #[error("{kernel}: {reason}")]
    Arguments {
        /// The kernel.
        kernel: &'static str,
        /// What does not fit.
        reason: String,
    },
    /// The device did not finish the work queued on the stream in time.
    #[error("{kernel}: the device did not finish within {timeout:?} (a hung kernel or an overloaded GPU)")]
    Timeout {
        /// The kernel waited for.
        kernel: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// Gathered top-k indices point past the gradient: a corrupt payload. Nothing was written.
    #[error(
        "scatter_add: {count} of {pairs} gathered indices are not below the gradient's {numel} elements (a \
         corrupt payload); nothing was written"
    )]
    OutOfRange {
        /// Indices out of range.
        count: u64,
        /// Indices in all.
        pairs: usize,
        /// The gradient's length.
        numel: usize,
    },
    /// Two kernels disagree about the same data (it changed between them).
    #[error("{kernel}: {reason}")]
    Inconsistent {
        /// The kernel that found it.
        kernel: &'static str,
        /// What disagreed.
        reason: String,
    },
}
