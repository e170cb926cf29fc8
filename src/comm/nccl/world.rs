//! The job's NCCL communicator over every rank, from the launcher's environment.
//!
//! As under torchrun, a rank uses CUDA device `LOCAL_RANK` among those `CUDA_VISIBLE_DEVICES`
//! shows it (the launcher never sets that variable). NCCL refuses two ranks on one device, late
//! and obscurely ("Duplicate GPU detected"), so more local ranks than visible devices is refused
//! here first, naming both numbers.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::env::DistEnv;
use crate::error::Error;
use crate::rendezvous::{MemoryStore, PrefixStore, Store};

use super::super::init::{connect_job_store, job_secret};
use super::communicator::NcclCommunicator;
use super::error::NcclError;

/// The store key of the world communicator's unique id (under the run's prefix).
const WORLD_ID_KEY: &str = "nccl/world/id";

/// The number of CUDA devices this process sees. Without the driver library, or with a driver
/// that finds no device, an error saying so (never a panic).
pub fn cuda_device_count() -> Result<usize, NcclError> {
    let cuda = |call: &'static str, why: String| NcclError::Cuda { call, why };
    // SAFETY: only checks whether the driver library loads; calls nothing in it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(cuda(
            "loading the driver",
            "libcuda.so (the NVIDIA driver) is not on this machine: NCCL needs a GPU".into(),
        ));
    }
    let count = CudaContext::device_count().map_err(|e| cuda("counting the devices", e.to_string()))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Joins the NCCL communicator of every rank of the job `env` describes, on CUDA device
/// `env.local_rank`; the unique id travels through the job's store (a rank alone, without a
/// launcher, needs none). Refuses, naming the numbers, when this node runs more ranks than it has
/// visible devices.
pub fn init_world(env: &DistEnv) -> Result<NcclCommunicator, Error> {
    let devices = cuda_device_count()?;
    if env.local_world_size > devices || env.local_rank >= devices {
        let visible = crate::env::cuda_visible_devices()
            .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
            .unwrap_or_default();
        return Err(NcclError::TooFewDevices {
            rank: env.rank,
            local_rank: env.local_rank,
            local_world_size: env.local_world_size.max(env.local_rank + 1),
            devices,
            visible,
        }
        .into());
    }
    let store: Arc<dyn Store> = if env.launched() && env.world_size > 1 {
        let secret = job_secret(env)?;
        let store = connect_job_store(env, &secret)?;
        Arc::new(PrefixStore::new(
            format!("burnrun/{}/world", env.run_id),
            Arc::new(store),
        ))
    } else {
        Arc::new(MemoryStore::new())
    };
    Ok(NcclCommunicator::new(
        store.as_ref(),
        WORLD_ID_KEY,
        env.rank,
        env.world_size,
        env.local_rank,
        env.timeout,
    )?)
}
