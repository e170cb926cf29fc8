//! The trainer's side of ZeRO (`parallel.shard`, see [`crate::parallel::zero`]): which buckets are
//! sharded, the optimizer step over this rank's share, and the all-gather of the updated values.

use std::ops::Range;
use std::time::Instant;

use crate::comm::{ProcessGroup, ReduceOp};
use crate::config::ShardMode;
use crate::parallel::zero::{ShardLayout, ZeroComm};

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
}

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
        })
    }

    /// Whether gradients are reduce-scattered (ZeRO-2) rather than all-reduced.
    pub(crate) fn scatters_gradients(&self) -> bool {
        self.mode == ShardMode::Gradients
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
    /// as its piece is stepped, so it runs while the next pieces are stepped. `grads` is the
    /// whole averaged gradient with ZeRO-1 (ignored with ZeRO-2, which steps from its chunks).
    pub(crate) fn step(
        &self,
        rank: usize,
        optimizer: &mut FlatOptimizer,
        lr: f32,
        master: &mut [f32],
        grads: &[f32],
    ) -> Result<GatherStats, TrainError> {
        let started = Instant::now();
        optimizer.begin_step();
        let mut launched = Vec::with_capacity(self.layout().pieces.len());
        for (i, piece) in self.layout().pieces.iter().enumerate() {
            let piece_grads = if self.scatters_gradients() {
                &self.grads[piece.state.clone()]
            } else {
                &grads[piece.owned.clone()]
            };
            optimizer.update(lr, piece.state.start, &mut master[piece.owned.clone()], piece_grads);
            if let Some(work) = self.comm.all_gather_async(i, master) {
                launched.push((i, work));
            }
        }
        let waited = Instant::now();
        for (i, work) in launched {
            let gathered = work.wait().map_err(|source| TrainError::Comm { rank, source })?;
            self.comm.place_gathered(i, &gathered, master);
        }
        Ok(GatherStats {
            comm_ms: started.elapsed().as_secs_f64() * 1e3,
            wait_ms: waited.elapsed().as_secs_f64() * 1e3,
        })
    }
}
