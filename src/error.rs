//! The crate-level error: one variant per layer, each layer keeps its own `thiserror` enum.

use crate::{comm::CommError, env::EnvError, rendezvous::StoreError, transport::TransportError};

/// Any error a burnrun library call can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the launcher's environment variables failed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The rendezvous store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A point-to-point connection failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// NCCL failed: the library, the CUDA driver or devices, or a call.
    #[cfg(feature = "nccl")]
    #[error(transparent)]
    Nccl(#[from] crate::comm::nccl::NcclError),
    /// This build cannot give the device asked for.
    #[cfg(feature = "train")]
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}
