//! The job's NCCL communicator over every rank, from the launcher's environment.
//!
//! As under torchrun, a rank uses CUDA device `LOCAL_RANK` among those `CUDA_VISIBLE_DEVICES`
//! shows it (the launcher never sets that variable). NCCL refuses two ranks on one device, late
//! and obscurely ("Duplicate GPU detected"), so more local ranks than visible devices is refused
//! here first, naming both numbers.

use std::sync::Arc;

use crate::env::DistEnv;
use crate::error::Error;
use crate::rendezvous::{MemoryStore, PrefixStore, Store};

use super::super::init::{connect_job_store, job_secret};
use super::communicator::NcclCommunicator;
use super::error::NcclError;

/// The store key of the world communicator's unique id (under the run's prefix).
const WORLD_ID_KEY: &str = "nccl/world/id";

/// The number of CUDA devices this process sees ([`crate::env::cuda_device_count`]). Without the
/// driver library, or with a driver that finds no device, an error saying so (never a panic).
pub fn cuda_device_count() -> Result<usize, NcclError> {
    crate::env::cuda_device_count().map_err(|why| NcclError::Cuda {
        call: "loading the driver",
        why: format!("{why}: NCCL needs a GPU"),
    })
}

/// Joins the NCCL communicator of every rank of the job `env` describes, on CUDA device
/// `env.local_rank`; the unique id travels through the job's store (a rank alone, without a
/// launcher, needs none). Refuses, naming the numbers, when this node runs more ranks than it has
/// visible devices.
pub fn init_world(env: &DistEnv) -> Result<NcclCommunicator, Error> {
    check_local_ranks(env, cuda_device_count()?, crate::env::cuda_visible_devices())?;
    let store: Arc<dyn Store> = if env.launched() && env.world_size > 1 {
        let secret = job_secret(env)?;
        let store = connect_job_store(env, &secret)?;
        Arc::new(PrefixStore::new(env.store_prefix(), Arc::new(store)))
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

/// One CUDA device per local rank: an error naming the ranks of this node, the devices it sees and
/// `CUDA_VISIBLE_DEVICES` (`visible`) when there are fewer devices than ranks.
fn check_local_ranks(env: &DistEnv, devices: usize, visible: Option<String>) -> Result<(), NcclError> {
    if env.local_world_size <= devices && env.local_rank < devices {
        return Ok(());
    }
    Err(NcclError::TooFewDevices {
        rank: env.rank,
        local_rank: env.local_rank,
        local_world_size: env.local_world_size.max(env.local_rank + 1),
        devices,
        visible: visible
            .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, local_rank: usize, local_world_size: usize) -> DistEnv {
        DistEnv {
            rank,
            local_rank,
            local_world_size,
            world_size: local_world_size * 2,
            ..DistEnv::from_env().expect("the test environment parses")
        }
    }

    #[test]
    fn more_local_ranks_than_visible_devices_is_refused_naming_both_numbers() {
        let err = check_local_ranks(&env(5, 1, 4), 2, Some("0,1".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "rank 5 (local rank 1): 4 rank(s) on this node but 2 CUDA device(s) visible (CUDA_VISIBLE_DEVICES=0,1): \
             NCCL needs one GPU per rank (two ranks on one GPU are refused); start at most 2 rank(s) per node \
             (--nproc-per-node 2)"
        );
        let err = check_local_ranks(&env(0, 0, 1), 0, None).unwrap_err().to_string();
        assert!(
            err.contains("1 rank(s) on this node but 0 CUDA device(s) visible: "),
            "{err}"
        );
    }

    #[test]
    fn one_rank_per_device_or_fewer_is_accepted() {
        assert!(check_local_ranks(&env(3, 3, 4), 4, None).is_ok());
        assert!(check_local_ranks(&env(0, 0, 2), 8, Some("0,1,2,3,4,5,6,7".into())).is_ok());
    }
}
