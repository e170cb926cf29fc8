//! Which samples each data-parallel rank reads, batch by batch.
//!
//! Every epoch has one global ORDER of the sample indices, the same on every rank: `0..len`, or
//! its Fisher-Yates shuffle with a generator derived from `(seed, epoch)`. The order is cut into
//! GLOBAL batches of `world_size * batch_size` consecutive entries, and rank `r` takes the `r`-th
//! block of `batch_size` entries of each (a BLOCKED split). Hence rank `r`'s batch `i` is exactly
//! rows `r*B .. (r+1)*B` of the single-rank batch `i` of size `world_size * B` with the same seed:
//! data parallelism over `W` ranks sees the same samples, in the same steps, as one rank with a
//! `W` times larger batch. Ranks' batches within an epoch are disjoint (up to the padding below).
//!
//! The last, incomplete global batch (when `len` is not a multiple of `world_size * batch_size`):
//! - `drop_last = true`: it is dropped, so every rank gets `len / (W*B)` full batches of `B`
//!   samples (at most `W*B - 1` samples are skipped per epoch, different ones each epoch when
//!   shuffling). A dataset smaller than one global batch is refused up front.
//! - `drop_last = false`: it is completed by wrapping around to the start of the epoch's order
//!   (as torch's `DistributedSampler` pads), so every rank gets `ceil(len / (W*B))` full batches
//!   and a few samples are seen twice in that epoch.
//!
//! Either way all ranks run the same number of equally sized batches: uneven inputs, which hang
//! DDP in other frameworks, cannot happen.

use super::error::DataError;
use crate::rng::SplitMix64;

/// A rank's view of the dataset's order. Build it with [`DistributedSampler::new`], which checks
/// the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    world_size: usize,
    rank: usize,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
}

impl DistributedSampler {
    /// A sampler over `len` samples for data-parallel rank `rank` of `world_size`, with
    /// `batch_size` samples per rank per batch. Order: shuffled with `seed` and the epoch if
    /// `shuffle`; tail rule: see the module docs (`drop_last`).
    pub fn new(
        len: usize,
        world_size: usize,
        rank: usize,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        drop_last: bool,
    ) -> Result<Self, DataError> {
        let invalid = |what, why: String| Err(DataError::Invalid { what, why });
        if world_size == 0 {
            return invalid("sampler.world_size", "must be at least 1".into());
        }
        if rank >= world_size {
            return invalid(
                "sampler.rank",
                format!("rank {rank} is not below world_size {world_size}"),
            );
        }
        if batch_size == 0 {
            return invalid("sampler.batch_size", "must be at least 1".into());
        }
        if len == 0 {
            return invalid("sampler.len", "the dataset is empty".into());
        }
        let global = world_size * batch_size;
        if drop_last && len < global {
            return invalid(
                "sampler.drop_last",
                format!(
                    "the dataset's {len} samples are fewer than one global batch of world_size {world_size} x \
                     batch_size {batch_size} = {global}: every sample would be dropped (use drop_last = false or a \
                     smaller batch)"
                ),
            );
        }
        Ok(Self {
            len,
            world_size,
            rank,
            batch_size,
            seed,
            shuffle,
            drop_last,
        })
    }

    /// Samples in the dataset.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty dataset is refused by [`DistributedSampler::new`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This sampler's data-parallel rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of data-parallel ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Samples per rank per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Samples per batch over all ranks: `world_size * batch_size`.
    pub fn global_batch_size(&self) -> usize {
        self.world_size * self.batch_size
    }

    /// Batches per epoch, the same on every rank (see the tail rule in the module docs).
    pub fn batches_per_epoch(&self) -> usize {
        let global = self.global_batch_size();
        if self.drop_last {
            self.len / global
        } else {
            self.len.div_ceil(global)
        }
    }

    /// The epoch's global order of sample indices, `0..len` or a permutation of it (the same on
    /// every rank), before the tail rule.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            SplitMix64::derive(self.seed, epoch).shuffle(&mut order);
        }
        order
    }

    /// This rank's sample indices for batch `batch` of epoch `epoch`.
    pub fn batch_indices(&self, epoch: u64, batch: usize) -> Result<Vec<usize>, DataError> {
        self.check_batch(epoch, batch)?;
        Ok(self.take(&self.epoch_order(epoch), batch))
    }

    /// This rank's batches for the whole epoch (one permutation, computed once).
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.epoch_order(epoch);
        (0..self.batches_per_epoch())
            .map(|batch| self.take(&order, batch))
            .collect()
    }

    /// The `(epoch, batch)` of global step `step` (steps count batches from 0 across epochs), for
    /// resuming at a step.
    pub fn position(&self, step: u64) -> (u64, usize) {
        let per_epoch = self.batches_per_epoch() as u64;
        (step / per_epoch, (step % per_epoch) as usize)
    }

    /// This rank's sample indices for global step `step`.
    pub fn step_indices(&self, step: u64) -> Vec<usize> {
        let (epoch, batch) = self.position(step);
        self.take(&self.epoch_order(epoch), batch)
    }

    fn check_batch(&self, epoch: u64, batch: usize) -> Result<(), DataError> {
        let batches_per_epoch = self.batches_per_epoch();
        if batch < batches_per_epoch {
            Ok(())
        } else {
            Err(DataError::BatchOutOfRange {
                rank: self.rank,
                epoch,
                batch,
                batches_per_epoch,
            })
        }
    }

    /// Rank's block of global batch `batch` of `order`; positions past the end wrap around (the
    /// drop_last = false padding; with drop_last every position is in range).
    fn take(&self, order: &[usize], batch: usize) -> Vec<usize> {
        let start = batch * self.global_batch_size() + self.rank * self.batch_size;
        (start..start + self.batch_size)
            .map(|position| order[position % order.len()])
            .collect()
    }
}
