//! Sharded data parallelism, ZeRO stages 1, 2 and 3 (`parallel.shard = "optimizer" | "gradients" |
//! "parameters"`).
//!
//! Plain data parallelism keeps the whole optimizer state on every replica: with Adam, 8 of the
//! 16 bytes a parameter costs. ZeRO (Rajbhandari et al., 2020) gives each of the N replicas of a
//! stage one N-th of it: a replica steps only the parameters it owns, then the replicas all-gather
//! the updated values so that every replica holds the whole model again for the next forward.
//!
//! **Who owns what.** Sharding follows the gradient buckets (DDP's buckets, or the blocks of the
//! block-wise backward), so that each bucket's collective can start as soon as that bucket is
//! ready: bucket b of L values is cut into N chunks of `ceil(L / N)` values, and replica i owns
//! chunk i (the last chunks may be shorter, or empty for a tiny bucket). A replica's optimizer
//! state is its chunks of every bucket, one after the other ([`ShardLayout::pieces`]): about
//! `numel / N` values.
//!
//! **Stage 1** (`"optimizer"`): gradients are all-reduced as in plain data parallelism (codecs and
//! the block-wise overlap included), each replica steps its chunks, and each bucket's all-gather
//! is launched as soon as its chunk is stepped, so the gathers of the first buckets run while the
//! later ones are stepped.
//! **Stage 2** (`"gradients"`): gradients are reduce-scattered instead: each replica receives the
//! average of its own chunks only (half the traffic of an all-reduce; the all-gather of the
//! parameters is the other half), into a buffer of its chunks' size. With the block-wise backward
//! each block's reduce-scatter is launched from a block-sized buffer as soon as the block's
//! backward is done, so the whole flat gradient is never held.
//!
//! **Stage 3** (`"parameters"`, FSDP): the master weights are sharded like the optimizer state, so
//! a replica holds only its chunks of them; a block's parameters are all-gathered just before the
//! block computes (prefetched one block ahead) and freed after (`crate::train` runs it).
//!
//! Collectives of equal size are required: a chunk is padded with zeros to `ceil(L / N)` values on
//! the wire (at most N - 1 values per bucket).

use std::ops::Range;

use crate::comm::{CommError, ProcessGroup, ReduceOp, Work};

/// One bucket's share of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The bucket's elements in the flat parameter vector.
    pub bucket: Range<usize>,
    /// The elements this replica owns (chunk `index` of the bucket; may be empty).
    pub owned: Range<usize>,
    /// Where the owned elements' state lies in this replica's sharded buffers.
    pub state: Range<usize>,
    /// Values per chunk on the wire, `ceil(bucket.len() / N)`.
    pub chunk: usize,
}

/// Which elements of every bucket one replica of N owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Replicas sharing the state.
    pub replicas: usize,
    /// This replica's index among them.
    pub index: usize,
    /// One piece per bucket, in bucket order.
    pub pieces: Vec<Piece>,
}

impl ShardLayout {
    /// The shards of `buckets` (consecutive ranges of the flat vector) for replica `index` of
    /// `replicas`.
    pub fn new(buckets: &[Range<usize>], replicas: usize, index: usize) -> Self {
        assert!(index < replicas.max(1), "replica {index} of {replicas}");
        let replicas = replicas.max(1);
        let mut state_offset = 0;
        let pieces = buckets
            .iter()
            .map(|bucket| {
                let chunk = bucket.len().div_ceil(replicas);
                let start = (bucket.start + index * chunk).min(bucket.end);
                let end = (start + chunk).min(bucket.end);
                let state = state_offset..state_offset + (end - start);
                state_offset = state.end;
                Piece {
                    bucket: bucket.clone(),
                    owned: start..end,
                    state,
                    chunk,
                }
            })
            .collect();
        Self {
            replicas,
            index,
            pieces,
        }
    }

    /// Values of state this replica holds (the sum of its owned lengths).
    pub fn state_numel(&self) -> usize {
        self.pieces.last().map_or(0, |p| p.state.end)
    }

    /// For every element of `range` (of the flat vector) that this replica owns: the element
    /// range and where its state lies, in order. Used to write and read a parameter's state.
    pub fn owned_within(&self, range: Range<usize>) -> impl Iterator<Item = (Range<usize>, usize)> + '_ {
        self.pieces.iter().filter_map(move |p| {
            let start = p.owned.start.max(range.start);
            let end = p.owned.end.min(range.end);
            (start < end).then(|| (start..end, p.state.start + (start - p.owned.start)))
        })
    }
}

/// The two buffers of a bucket's collective: the whole (padded) bucket and this rank's chunk of
/// it (a reduce-scatter's input and output), or this rank's chunk and the gathered bucket (an
/// all-gather's).
pub type GatherBuffers = (Vec<f32>, Vec<f32>);

/// The collectives of ZeRO over one data-parallel group.
#[derive(Debug, Clone)]
pub struct ZeroComm {
    group: ProcessGroup,
    layout: ShardLayout,
}

impl ZeroComm {
    /// Shards `buckets` across `group` (this rank's index is its rank in the group).
    pub fn new(group: ProcessGroup, buckets: &[Range<usize>]) -> Self {
        let layout = ShardLayout::new(buckets, group.world_size(), group.rank());
        Self { group, layout }
    }

    /// What this rank owns.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The data-parallel group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// Launches the reduce-scatter (average) of bucket `piece`'s gradients, the first
    /// `bucket.len()` values of `buffers.0` (padded here; `buffers.1` is resized to the chunk);
    /// the result, both buffers back, holds this rank's chunk in `.1`, of which the first
    /// `owned.len()` values are meaningful.
    pub fn reduce_scatter_async(&self, piece: usize, buffers: GatherBuffers) -> Work<GatherBuffers> {
        let p = &self.layout.pieces[piece];
        let (mut padded, mut chunk) = buffers;
        padded.resize(p.chunk * self.layout.replicas, 0.0);
        chunk.resize(p.chunk, 0.0);
        self.group.reduce_scatter_into_async(padded, chunk, ReduceOp::Avg)
    }

    /// Reduce-scatters every bucket of the whole flat gradient `grads`, writing this rank's
    /// averaged chunks into `shard` (`state_numel` values). One bucket at a time, on the calling
    /// thread (nothing is left to overlap with); straight from `grads` into `shard`, through a
    /// padded copy only for a bucket that N does not divide.
    pub fn reduce_scatter(&self, grads: &[f32], shard: &mut [f32]) -> Result<(), CommError> {
        let n = self.layout.replicas;
        let mut padded = Vec::new();
        let mut chunk = Vec::new();
        for p in &self.layout.pieces {
            if p.bucket.is_empty() {
                continue;
            }
            if n == 1 {
                shard[p.state.clone()].copy_from_slice(&grads[p.owned.clone()]);
                continue;
            }
            let bucket = &grads[p.bucket.clone()];
            let input = if bucket.len() == p.chunk * n {
                bucket
            } else {
                padded.clear();
                padded.extend_from_slice(bucket);
                padded.resize(p.chunk * n, 0.0);
                &padded
            };
            if p.owned.len() == p.chunk {
                self.group
                    .reduce_scatter(input, &mut shard[p.state.clone()], ReduceOp::Avg)?;
            } else {
                chunk.resize(p.chunk, 0.0);
                self.group.reduce_scatter(input, &mut chunk, ReduceOp::Avg)?;
                shard[p.state.clone()].copy_from_slice(&chunk[..p.owned.len()]);
            }
        }
        Ok(())
    }

    /// Launches the all-gather of bucket `piece` from this rank's updated chunk of `master`, in
    /// `buffers` (a chunk and a gathered bucket, resized here; reused from the last gather); the
    /// result goes back with [`Self::place_gathered`], and the buffers with it. `Err(buffers)`
    /// when there is nothing to gather (one replica: it owns everything; an empty bucket).
    pub fn all_gather_async(
        &self,
        piece: usize,
        master: &[f32],
        buffers: GatherBuffers,
    ) -> Result<Work<GatherBuffers>, GatherBuffers> {
        let owned = self.layout.pieces[piece].owned.clone();
        self.gather_chunk_async(piece, &master[owned], buffers)
    }

    /// [`Self::all_gather_async`] from this rank's share alone (`shard`, laid out as the optimizer
    /// state: ZeRO-3's sharded master weights). The gathered bucket is the block's values in
    /// layout order.
    pub fn all_gather_shard_async(
        &self,
        piece: usize,
        shard: &[f32],
        buffers: GatherBuffers,
    ) -> Result<Work<GatherBuffers>, GatherBuffers> {
        let state = self.layout.pieces[piece].state.clone();
        self.gather_chunk_async(piece, &shard[state], buffers)
    }

    /// Launches the all-gather of bucket `piece` whose chunk on this rank is `own`.
    fn gather_chunk_async(
        &self,
        piece: usize,
        own: &[f32],
        buffers: GatherBuffers,
    ) -> Result<Work<GatherBuffers>, GatherBuffers> {
        let p = &self.layout.pieces[piece];
        if self.layout.replicas == 1 || p.bucket.is_empty() {
            return Err(buffers);
        }
        let (mut chunk, mut gathered) = buffers;
        chunk.clear();
        chunk.extend_from_slice(own);
        chunk.resize(p.chunk, 0.0);
        gathered.resize(p.chunk * self.layout.replicas, 0.0);
        Ok(self.group.all_gather_into_async(chunk, gathered))
    }

    /// Copies the gathered bucket `piece` (every replica's chunk, padded) into `master`.
    pub fn place_gathered(&self, piece: usize, gathered: &[f32], master: &mut [f32]) {
        let p = &self.layout.pieces[piece];
        master[p.bucket.clone()].copy_from_slice(&gathered[..p.bucket.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_owned_by_exactly_one_replica_and_states_are_dense() {
        let buckets = [0..10, 10..11, 11..11, 11..40, 40..43];
        for n in 1..=5 {
            let mut owner = vec![usize::MAX; 43];
            let mut total = 0;
            for i in 0..n {
                let layout = ShardLayout::new(&buckets, n, i);
                let mut expected_state = 0;
                for p in &layout.pieces {
                    assert_eq!(p.state.start, expected_state);
                    assert_eq!(p.state.len(), p.owned.len());
                    assert!(p.owned.len() <= p.chunk && p.chunk * n >= p.bucket.len());
                    expected_state = p.state.end;
                    for e in p.owned.clone() {
                        assert_eq!(owner[e], usize::MAX, "element {e} owned twice with {n} replicas");
                        owner[e] = i;
                    }
                }
                total += layout.state_numel();
            }
            assert_eq!(total, 43);
            assert!(owner.iter().all(|&o| o < n), "{owner:?}");
        }
    }

    #[test]
    fn a_replica_owns_chunk_index_of_each_bucket() {
        let layout = ShardLayout::new(&[0..10, 10..13], 4, 1);
        assert_eq!(layout.pieces[0].owned, 3..6);
        assert_eq!(layout.pieces[1].owned, 11..12);
        assert_eq!(layout.state_numel(), 4);
        let last = ShardLayout::new(&[0..10, 10..13], 4, 3);
        assert_eq!(last.pieces[0].owned, 9..10);
        assert_eq!(last.pieces[1].owned, 13..13);
    }

    #[test]
    fn owned_within_a_parameter_maps_to_its_state() {
        let layout = ShardLayout::new(&[0..10, 10..20], 2, 1);
        // Owned: 5..10 (state 0..5) and 15..20 (state 5..10).
        let parts: Vec<_> = layout.owned_within(8..17).collect();
        assert_eq!(parts, vec![(8..10, 3), (15..17, 5)]);
    }
}
