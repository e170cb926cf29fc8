//! The unique id every rank of an NCCL communicator joins with: rank 0 makes it, and it travels
//! through the job's store (authenticated like every store connection), never through NCCL's own
//! unauthenticated bootstrap of the id.

use std::time::Duration;

use crate::rendezvous::Store;

use super::error::NcclError;
use super::library::{Nccl, UniqueId};

/// Rank 0 makes a fresh id and sets it under `key`; every other rank reads it, waiting up to
/// `timeout` (rank 0 not reaching this point in time is an error naming the key).
pub fn exchange_unique_id(
    nccl: &Nccl,
    store: &dyn Store,
    key: &str,
    rank: usize,
    timeout: Duration,
) -> Result<UniqueId, NcclError> {
    let exchange_err = |why: String| NcclError::IdExchange {
        rank,
        key: key.to_string(),
        why,
    };
    if rank == 0 {
        let id = nccl.unique_id()?;
        store
            .set(key, &id.to_bytes())
            .map_err(|e| exchange_err(e.to_string()))?;
        return Ok(id);
    }
    let bytes = store.get(key, timeout).map_err(|e| exchange_err(e.to_string()))?;
    UniqueId::from_bytes(&bytes)
}
