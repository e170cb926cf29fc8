//! Data parallelism (DDP): parameters broadcast at start, gradients averaged in buckets, replicas
//! checked for divergence.
//!
//! Gradients are grouped into buckets of whole parameters up to `bucket_cap_bytes` (DDP's
//! `bucket_cap_mb`) and averaged in place, bucket by bucket, once the whole backward is done (no
//! overlap with backward yet: burn's backward is one call).

use std::ops::Range;
use std::time::Instant;

use crate::comm::{CommError, ProcessGroup, ReduceOp};
use crate::compress::{CompressError, GradCodec};

/// Gradient buckets over a flat parameter order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketLayout {
    /// Per bucket, the range of parameter indices it holds.
    pub params: Vec<Range<usize>>,
    /// Per bucket, its range of elements in the flat gradient vector.
    pub elements: Vec<Range<usize>>,
}

impl BucketLayout {
    /// Packs parameters (in order) into buckets of at most `cap_bytes` of f32 each; a parameter
    /// larger than the cap gets a bucket of its own.
    pub fn new(param_numels: &[usize], cap_bytes: usize) -> Self {
        let cap = (cap_bytes / 4).max(1);
        let (mut params, mut elements) = (Vec::new(), Vec::new());
        let (mut first_param, mut first_elem, mut offset) = (0, 0, 0);
        for (i, &numel) in param_numels.iter().enumerate() {
            if i > first_param && offset + numel - first_elem > cap {
                params.push(first_param..i);
                elements.push(first_elem..offset);
                first_param = i;
                first_elem = offset;
            }
            offset += numel;
        }
        if first_param < param_numels.len() {
            params.push(first_param..param_numels.len());
            elements.push(first_elem..offset);
        }
        Self { params, elements }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

/// What one gradient synchronisation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncStats {
    /// Buckets all-reduced.
    pub buckets: usize,
    /// Gradient bytes all-reduced (before any compression).
    pub bytes: usize,
    /// Wall time from the first launch to the last completion, in milliseconds.
    pub comm_ms: f64,
    /// Time spent blocked waiting for results, in milliseconds (comm not hidden by compute).
    pub wait_ms: f64,
    /// Payload bytes this rank put on the wire for the gradients (after compression).
    pub wire_bytes: u64,
    /// Per bucket, the relative error of what compression dropped this step (empty without one).
    pub compression_error: Vec<f64>,
}

/// Gradient synchronisation failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The all-reduce failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The codec failed.
    #[error(transparent)]
    Codec(#[from] CompressError),
}

/// Replicas drifted apart.
#[derive(Debug, thiserror::Error)]
pub enum DivergenceError {
    /// A parameter differs across ranks.
    #[error(
        "replica divergence at step {step}: parameter `{name}` differs between rank {rank_a} and rank {rank_b} \
         (checksums {checksum_a:#018x} vs {checksum_b:#018x}); gradients were not synchronised identically"
    )]
    Diverged {
        /// Training step.
        step: u64,
        /// The first parameter (in model order) that differs.
        name: String,
        /// A rank holding one value.
        rank_a: usize,
        /// A rank holding another.
        rank_b: usize,
        /// Checksum on `rank_a`.
        checksum_a: u64,
        /// Checksum on `rank_b`.
        checksum_b: u64,
    },
    /// The check's own collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Per bucket, the shapes of its parameters.
type BucketShapes = Vec<Vec<Vec<usize>>>;

/// Data parallelism over one group of replicas.
#[derive(Debug)]
pub struct DataParallel {
    group: ProcessGroup,
    layout: BucketLayout,
    /// A gradient codec and the shapes of each bucket's parameters; `None`: plain f32 average.
    codec: Option<(Box<dyn GradCodec>, BucketShapes)>,
}

impl DataParallel {
    /// DDP over `group` for parameters of the given sizes (model order).
    pub fn new(group: ProcessGroup, param_numels: &[usize], bucket_cap_bytes: usize) -> Self {
        Self {
            layout: BucketLayout::new(param_numels, bucket_cap_bytes),
            group,
            codec: None,
        }
    }

    /// The gradient codec, if gradients are compressed (checkpoints save its state).
    pub fn codec(&self) -> Option<&dyn GradCodec> {
        self.codec.as_ref().map(|(codec, _)| codec.as_ref())
    }

    /// The gradient codec, mutably (a resume restores its state).
    pub fn codec_mut(&mut self) -> Option<&mut (dyn GradCodec + 'static)> {
        self.codec.as_mut().map(|(codec, _)| codec.as_mut())
    }

    /// Sends gradients through `codec` (compression), bucket by bucket; `shapes` are the shapes
    /// of the parameters in model order.
    pub fn with_codec(mut self, codec: Box<dyn GradCodec>, shapes: &[Vec<usize>]) -> Self {
        let per_bucket = self.layout.params.iter().map(|r| shapes[r.clone()].to_vec()).collect();
        self.codec = Some((codec, per_bucket));
        self
    }

    /// Averages a flat gradient vector: through the codec when there is one, else bucketed async
    /// all-reduces. `step` lets a codec warm up uncompressed.
    pub fn sync_flat(&mut self, grads: &mut [f32], step: u64) -> Result<SyncStats, SyncError> {
        let Some((codec, shapes)) = &mut self.codec else {
            let stats = self.all_reduce_flat(grads)?;
            let single = self.group.world_size() == 1;
            return Ok(SyncStats {
                wire_bytes: if single { 0 } else { stats.bytes as u64 },
                ..stats
            });
        };
        let start = Instant::now();
        let mut stats = SyncStats {
            buckets: self.layout.len(),
            ..Default::default()
        };
        for (bucket, range) in self.layout.elements.iter().enumerate() {
            stats.bytes += range.len() * 4;
            let c = codec.all_reduce_avg(&self.group, bucket, &shapes[bucket], &mut grads[range.clone()], step)?;
            stats.wire_bytes += c.wire_bytes;
            stats.compression_error.push(c.relative_error);
        }
        stats.comm_ms = start.elapsed().as_secs_f64() * 1e3;
        stats.wait_ms = stats.comm_ms;
        Ok(stats)
    }

    /// The replicas' group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The bucket layout.
    pub fn layout(&self) -> &BucketLayout {
        &self.layout
    }

    /// Makes every replica start from rank 0's parameters.
    pub fn broadcast_params(&self, flat: &mut [f32]) -> Result<(), CommError> {
        self.group.broadcast(flat, 0)
    }

    /// Averages a flat gradient vector in place, bucket by bucket.
    ///
    /// The whole vector is ready when this is called, so there is no backward left to overlap
    /// with: each bucket is all-reduced in place on the calling thread, with no copy out to an
    /// owned buffer and back (two passes over the gradients into freshly faulted pages, which cost
    /// as much as the all-reduce itself on one core). One replica averages with nobody: no work.
    pub fn all_reduce_flat(&self, grads: &mut [f32]) -> Result<SyncStats, CommError> {
        let start = Instant::now();
        let ranges = &self.layout.elements;
        let mut stats = SyncStats {
            buckets: ranges.len(),
            bytes: ranges.iter().map(|r| r.len() * 4).sum(),
            ..Default::default()
        };
        if self.group.world_size() == 1 {
            return Ok(stats);
        }
        for range in ranges {
            self.group.all_reduce(&mut grads[range.clone()], ReduceOp::Avg)?;
        }
        stats.comm_ms = start.elapsed().as_secs_f64() * 1e3;
        stats.wait_ms = stats.comm_ms;
        Ok(stats)
    }

    /// Compares a checksum of every parameter across replicas; fails naming the first parameter
    /// (in model order) that differs. One small all-gather.
    pub fn check_replicas(
        &self,
        step: u64,
        names: &[String],
        flat: &[f32],
        ranges: &[Range<usize>],
    ) -> Result<(), DivergenceError> {
        let n = self.group.world_size();
        if n == 1 {
            return Ok(());
        }
        let local: Vec<i64> = ranges.iter().map(|r| checksum(&flat[r.clone()]) as i64).collect();
        let mut all = vec![0i64; local.len() * n];
        self.group.all_gather(&local, &mut all)?;
        for (p, name) in names.iter().enumerate() {
            let rank0 = all[p];
            if let Some(other) = (1..n).find(|&r| all[r * local.len() + p] != rank0) {
                return Err(DivergenceError::Diverged {
                    step,
                    name: name.clone(),
                    rank_a: self.group.global_ranks()[0],
                    rank_b: self.group.global_ranks()[other],
                    checksum_a: rank0 as u64,
                    checksum_b: all[other * local.len() + p] as u64,
                });
            }
        }
        Ok(())
    }
}

/// FNV-1a over the bit patterns: any difference in any bit changes it (almost surely).
fn checksum(values: &[f32]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        hash ^= v.to_bits() as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_parameters_up_to_the_cap() {
        let layout = BucketLayout::new(&[10, 10, 30, 5, 5], 80);
        assert_eq!(layout.params, vec![0..2, 2..3, 3..5]);
        assert_eq!(layout.elements, vec![0..20, 20..50, 50..60]);
    }
}
