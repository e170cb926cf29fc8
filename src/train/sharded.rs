//! The trainer's side of ZeRO (`parallel.shard`, see [`crate::parallel::zero`]): which buckets are
//! sharded, the optimizer step over this rank's share, and the all-gather of the updated values.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use crate::comm::{ProcessGroup, ReduceOp, Work};
use crate::config::ShardMode;
use crate::parallel::zero::{GatherBuffers, ShardLayout, ZeroComm};

use super::optim::{sum_of_squares, FlatOptimizer};
use super::TrainError;

/// A rank's share of its stage's optimizer state (and with ZeRO-2 of its averaged gradients).
#[derive(Debug)]
pub(crate) struct Sharded {
    pub(crate) mode: ShardMode,
    pub(crate) comm: ZeroComm,
    /// ZeRO-2: this rank's averaged gradient chunks, laid out as the optimizer state (empty with
    /// ZeRO-1, whose averaged gradients are whole).
    pub(crate) grads: Vec<f32>,
    /// The all-gather's buffers, reused every step (one gather is in flight at a time).
    gather_buffers: Option<GatherBuffers>,
    /// ZeRO-2's reduce-scatters launched during backward, oldest first (piece, work), and the
    /// buffers of those that ended, reused by the next.
    scatters: VecDeque<(usize, Work<GatherBuffers>)>,
    scatter_pool: Vec<GatherBuffers>,
    /// Waiting for reduce-scatters during backward this step, in milliseconds.
    scatter_wait_ms: f64,
    /// ZeRO-3: the parameter all-gathers launched ahead of their block, oldest first, and the
    /// buffers of those that were loaded, reused by the next.
    gathers: VecDeque<(usize, Work<GatherBuffers>)>,
    gather_pool: Vec<GatherBuffers>,
    /// ZeRO-3: waiting for parameter all-gathers this step, in milliseconds.
    gather_wait_ms: f64,
}

/// ZeRO-2's block-wise backward keeps at most this many reduce-scatters in flight: each holds a
/// block-sized buffer until it completes, and all of them at once would hold a whole gradient,
/// which ZeRO-2 exists not to hold. One is enough to overlap: block b's reduce-scatter runs while
/// block b-1's backward computes, and is waited for only when block b-1's gradient is ready to
/// go. Measured on an MLP of 4 blocks of 4-17 MB (2 ranks): 2 in flight held 43 MB more at the
/// peak than 1, for no gain in step time. The buffer is reused from block to block and step to
/// step.
const SCATTERS_IN_FLIGHT: usize = 1;

/// What the step's parameter all-gathers cost.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GatherStats {
    /// From the first launch to the last result placed, in milliseconds.
    pub(crate) comm_ms: f64,
    /// Waiting for results after the last piece was stepped, in milliseconds.
    pub(crate) wait_ms: f64,
}

impl Sharded {
    /// `mode`'s sharding of `buckets` over the stage's data-parallel `group`; `None` for
    /// `ShardMode::None`.
    pub(crate) fn new(mode: ShardMode, group: &ProcessGroup, buckets: &[Range<usize>]) -> Option<Self> {
        if mode == ShardMode::None {
            return None;
        }
        let comm = ZeroComm::new(group.clone(), buckets);
        Some(Self {
            mode,
            comm,
            grads: Vec::new(),
            gather_buffers: Some(GatherBuffers::default()),
            scatters: VecDeque::new(),
            scatter_pool: Vec::new(),
            scatter_wait_ms: 0.0,
            gathers: VecDeque::new(),
            gather_pool: Vec::new(),
            gather_wait_ms: 0.0,
        })
    }

    /// Whether gradients are reduce-scattered (ZeRO-2 and 3) rather than all-reduced.
    pub(crate) fn scatters_gradients(&self) -> bool {
        matches!(self.mode, ShardMode::Gradients | ShardMode::Parameters)
    }

    /// Whether the master weights are sharded too (ZeRO-3): this rank's master buffer holds its
    /// chunks only, laid out as the optimizer state.
    pub(crate) fn shards_parameters(&self) -> bool {
        self.mode == ShardMode::Parameters
    }

    /// ZeRO-3, before a step's first micro-batch: the sharded gradient starts at zero, and each
    /// micro-batch's reduce-scattered chunks are added to it.
    pub(crate) fn begin_accumulation(&mut self) {
        self.grads.clear();
        self.grads.resize(self.layout().state_numel(), 0.0);
    }

    /// ZeRO-3: launches the all-gather of block `piece`'s parameters from this rank's chunks of
    /// them (`shard`, the sharded master weights), to be taken by [`Self::take_gathered`]. Nothing
    /// is launched with one replica (the shard is the whole block).
    pub(crate) fn prefetch(&mut self, piece: usize, shard: &[f32]) {
        let buffers = self.gather_pool.pop().unwrap_or_default();
        match self.comm.all_gather_shard_async(piece, shard, buffers) {
            Ok(work) => self.gathers.push_back((piece, work)),
            Err(unused) => self.gather_pool.push(unused),
        }
    }

    /// ZeRO-3: the gathered parameters of block `piece` (launched by [`Self::prefetch`], or
    /// now if it was not): `Some(buffers)` whose `.1[..bucket.len()]` are the block's values,
    /// to be given back with [`Self::recycle`]; `None` when nothing needs gathering (one
    /// replica, or an empty block): the values are `shard[piece.state]`.
    pub(crate) fn take_gathered(
        &mut self,
        rank: usize,
        piece: usize,
        shard: &[f32],
    ) -> Result<Option<GatherBuffers>, TrainError> {
        let p = &self.comm.layout().pieces[piece];
        if self.comm.layout().replicas == 1 || p.bucket.is_empty() {
            return Ok(None);
        }
        if self.gathers.front().is_none_or(|(launched, _)| *launched != piece) {
            debug_assert!(self.gathers.is_empty(), "block {piece} gathered out of order");
            self.prefetch(piece, shard);
        }
        // Invariant: the gather of `piece` is at the front (launched just above if it was not).
        let (_, work) = self.gathers.pop_front().expect("a gather in flight");
        let waited = Instant::now();
        let buffers = work.wait().map_err(|source| TrainError::Comm { rank, source })?;
        self.gather_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        Ok(Some(buffers))
    }

    /// ZeRO-3: gives back the buffers of a gather whose values were loaded into the model.
    pub(crate) fn recycle(&mut self, buffers: GatherBuffers) {
        self.gather_pool.push(buffers);
    }

    /// ZeRO-3: the time this step waited for parameter all-gathers, in milliseconds (reset).
    pub(crate) fn take_gather_wait_ms(&mut self) -> f64 {
        std::mem::take(&mut self.gather_wait_ms)
    }

    /// The share this rank holds.
    pub(crate) fn layout(&self) -> &ShardLayout {
        self.comm.layout()
    }

    /// ZeRO-2: reduce-scatters the whole flat gradient `grads` into this rank's chunks.
    pub(crate) fn reduce_scatter(&mut self, rank: usize, grads: &[f32]) -> Result<f64, TrainError> {
        let started = Instant::now();
        self.grads.resize(self.layout().state_numel(), 0.0);
        self.comm
            .reduce_scatter(grads, &mut self.grads)
            .map_err(|source| TrainError::Comm { rank, source })?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }

    /// ZeRO-2 during backward: launches the reduce-scatter of block `piece`, whose gradients
    /// `fill` writes into an empty buffer (reused from an earlier block), once fewer than
    /// [`SCATTERS_IN_FLIGHT`] are in flight (the oldest is waited for and placed first).
    pub(crate) fn launch_scatter(
        &mut self,
        rank: usize,
        piece: usize,
        fill: impl FnOnce(&mut Vec<f32>),
    ) -> Result<(), TrainError> {
        if self.scatters.len() >= SCATTERS_IN_FLIGHT {
            self.settle_scatter(rank)?;
        }
        let (mut bucket, chunk) = self.scatter_pool.pop().unwrap_or_default();
        bucket.clear();
        fill(&mut bucket);
        let work = self.comm.reduce_scatter_async(piece, (bucket, chunk));
        self.scatters.push_back((piece, work));
        Ok(())
    }

    /// ZeRO-2 after backward: waits for every reduce-scatter still in flight and places them;
    /// returns the time this step waited for them (during backward too), in milliseconds.
    pub(crate) fn finish_scatters(&mut self, rank: usize) -> Result<f64, TrainError> {
        while !self.scatters.is_empty() {
            self.settle_scatter(rank)?;
        }
        Ok(std::mem::take(&mut self.scatter_wait_ms))
    }

    /// Waits for the oldest reduce-scatter in flight and copies its chunk into `grads`.
    fn settle_scatter(&mut self, rank: usize) -> Result<(), TrainError> {
        let Some((piece, work)) = self.scatters.pop_front() else {
            return Ok(());
        };
        let waited = Instant::now();
        let (bucket, chunk) = work.wait().map_err(|source| TrainError::Comm { rank, source })?;
        self.scatter_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        self.grads.resize(self.comm.layout().state_numel(), 0.0);
        let target = self.comm.layout().pieces[piece].state.clone();
        let len = target.len();
        if self.shards_parameters() {
            // ZeRO-3 reduce-scatters every micro-batch: the chunks add up over the step.
            self.grads[target]
                .iter_mut()
                .zip(&chunk[..len])
                .for_each(|(sum, g)| *sum += g);
        } else {
            self.grads[target].copy_from_slice(&chunk[..len]);
        }
        self.scatter_pool.push((bucket, chunk));
        Ok(())
    }

    /// ZeRO-2: the squared norm of the averaged gradient, summed over the data-parallel group
    /// (each rank holds its chunks only).
    pub(crate) fn grad_sum_of_squares(&self, rank: usize) -> Result<f64, TrainError> {
        let mut total = [sum_of_squares(&self.grads)];
        self.comm
            .group()
            .all_reduce(&mut total, ReduceOp::Sum)
            .map_err(|source| TrainError::Comm { rank, source })?;
        Ok(total[0])
    }

    /// One optimizer step over this rank's share of `master`, then the all-gather that gives
    /// every replica the whole updated `master` again. Each bucket's gather is launched as soon
    /// as its piece is stepped, so it runs while the next piece is stepped; one at a time, since
    /// each holds a bucket-sized buffer until it is placed (all at once would hold a second
    /// copy of the parameters, more than ZeRO-1 saves on two replicas). `grads` is the whole
    /// averaged gradient with ZeRO-1 (ignored with ZeRO-2, which steps from its chunks).
    pub(crate) fn step(
        &mut self,
        rank: usize,
        optimizer: &mut FlatOptimizer,
        lr: f32,
        master: &mut [f32],
        grads: &[f32],
    ) -> Result<GatherStats, TrainError> {
        let started = Instant::now();
        optimizer.begin_step();
        if self.shards_parameters() {
            // ZeRO-3: `master` is this rank's shard; the next forward gathers what it needs.
            for piece in &self.comm.layout().pieces {
                let state = piece.state.clone();
                optimizer.update(lr, state.start, &mut master[state.clone()], &self.grads[state]);
            }
            return Ok(GatherStats::default());
        }
        let mut wait_ms = 0.0;
        let mut spare = self.gather_buffers.take();
        let mut in_flight: Option<(usize, Work<GatherBuffers>)> = None;
        for (i, piece) in self.comm.layout().pieces.iter().enumerate() {
            let piece_grads = if self.scatters_gradients() {
                &self.grads[piece.state.clone()]
            } else {
                &grads[piece.owned.clone()]
            };
            optimizer.update(lr, piece.state.start, &mut master[piece.owned.clone()], piece_grads);
            // The previous bucket's gather ran while this piece stepped.
            if let Some(launched) = in_flight.take() {
                spare = Some(settle(&self.comm, rank, launched, master, &mut wait_ms)?);
            }
            match self.comm.all_gather_async(i, master, spare.take().unwrap_or_default()) {
                Ok(work) => in_flight = Some((i, work)),
                Err(unused) => spare = Some(unused),
            }
        }
        if let Some(launched) = in_flight {
            spare = Some(settle(&self.comm, rank, launched, master, &mut wait_ms)?);
        }
        self.gather_buffers = spare;
        Ok(GatherStats {
            comm_ms: started.elapsed().as_secs_f64() * 1e3,
            wait_ms,
        })
    }
}

/// Waits for the all-gather of piece `launched.0`, places it into `master` and returns its
/// buffers for the next one.
fn settle(
    comm: &ZeroComm,
    rank: usize,
    (piece, work): (usize, Work<GatherBuffers>),
    master: &mut [f32],
    wait_ms: &mut f64,
) -> Result<GatherBuffers, TrainError> {
    let waited = Instant::now();
    let (chunk, gathered) = work.wait().map_err(|source| TrainError::Comm { rank, source })?;
    *wait_ms += waited.elapsed().as_secs_f64() * 1e3;
    comm.place_gathered(piece, &gathered, master);
    Ok((chunk, gathered))
}
