//! What can go wrong compiling kernels.

/// A kernel compilation failure.
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
}
