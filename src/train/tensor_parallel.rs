//! The trainer's side of tensor parallelism (`parallel.tensor = T`, see
//! [`crate::parallel::tensor`]): the segment-wise forward and backward of one micro-batch with
//! the group's two all-reduces per segment, the sums of the replicated parameters' partial
//! gradients, the clipping norm's share, and checkpoints of full tensors.
//!
//! A block the model marks tensor-parallel ([`BlockChain::tensor_parallel`]) runs as segments,
//! each from the replicated activation to this rank's partial output: forward sums the partial
//! outputs over the group (the value every rank continues with), backward back-propagates the
//! summed gradient from the segment after (the sum's gradient is the identity) and sums the
//! gradient of the segment's input over the group (Megatron's "f" and "g"). Other blocks run
//! whole on every rank of the group, identically.

use std::ops::Range;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::comm::{CommError, ProcessGroup, ReduceOp};
use crate::parallel::tensor::TensorSplit;
use crate::parallel::ParamLayout;

use super::checkpoint::LoadedCheckpoint;
use super::optim::sum_of_squares;
use super::report::StepStats;
use super::resume::TensorPart;
use super::run::Run;
use super::stage::{loss_value, scaled};
use super::step::{input_grad, read_block_grads};
use super::task::{BlockChain, Task};
use super::TrainError;

/// A rank's tensor-parallel group and what of its parameters is split.
#[derive(Debug)]
pub(crate) struct TensorParallel {
    pub(crate) group: ProcessGroup,
    /// Per block of the rank's stage: whether it is split over the group.
    pub(crate) blocks: Vec<bool>,
    /// Per parameter (layout order): its split on every rank of the group (`None`: replicated).
    splits: Vec<Option<Vec<TensorSplit>>>,
    /// Per parameter: this rank's split (`None`: replicated).
    own: Vec<Option<TensorSplit>>,
    /// Flat ranges of the replicated parameters of split blocks: their gradients are partial
    /// sums, summed over the group after backward.
    partial: Vec<Range<usize>>,
}

impl TensorParallel {
    /// The split of the blocks `blocks` of `chain` (the rank's stage) laid out as `layout`, over
    /// `group`.
    pub(crate) fn new<M, B>(
        group: ProcessGroup,
        chain: &dyn BlockChain<M, B>,
        blocks: Range<usize>,
        layout: &ParamLayout,
    ) -> Self {
        let ranks = group.world_size();
        let counts = chain.block_param_counts();
        let mut offset = 0;
        let block_ranges: Vec<Range<usize>> = counts[blocks.clone()]
            .iter()
            .map(|&count| {
                offset += count;
                offset - count..offset
            })
            .collect();
        let split_blocks: Vec<bool> = blocks.clone().map(|b| chain.tensor_parallel(b)).collect();
        let splits: Vec<Option<Vec<TensorSplit>>> = layout
            .params
            .iter()
            .map(|p| {
                let all: Vec<Option<TensorSplit>> = (0..ranks).map(|r| chain.tensor_split(&p.name, r)).collect();
                all.into_iter().collect()
            })
            .collect();
        let partial = layout
            .params
            .iter()
            .zip(&splits)
            .filter(|(p, split)| {
                split.is_none()
                    && block_ranges
                        .iter()
                        .zip(&split_blocks)
                        .any(|(range, &split)| split && range.contains(&p.offset))
            })
            .map(|(p, _)| p.range())
            .collect();
        let own = splits
            .iter()
            .map(|s| s.as_ref().map(|all| all[group.rank()].clone()))
            .collect();
        Self {
            group,
            blocks: split_blocks,
            splits,
            own,
            partial,
        }
    }

    /// Sums the partial gradients of the split blocks' replicated parameters over the group.
    pub(crate) fn sum_partial_grads(&self, grads: &mut [f32]) -> Result<(), CommError> {
        let mut buffer: Vec<f32> = self
            .partial
            .iter()
            .flat_map(|r| grads[r.clone()].iter().copied())
            .collect();
        if buffer.is_empty() {
            return Ok(());
        }
        self.group.all_reduce(&mut buffer, ReduceOp::Sum)?;
        let mut offset = 0;
        for r in &self.partial {
            grads[r.clone()].copy_from_slice(&buffer[offset..offset + r.len()]);
            offset += r.len();
        }
        Ok(())
    }

    /// The squared norm of the whole model's gradient, from this rank's `grads`: its slices
    /// summed over the group, the replicated parameters (the same on every rank) once.
    pub(crate) fn sum_of_squares(&self, layout: &ParamLayout, grads: &[f32]) -> Result<f64, CommError> {
        let ranks = self.group.world_size() as f64;
        let mut share = [layout
            .params
            .iter()
            .zip(&self.splits)
            .map(|(p, split)| {
                let sq = sum_of_squares(&grads[p.range()]);
                if split.is_some() {
                    sq
                } else {
                    sq / ranks
                }
            })
            .sum::<f64>()];
        self.group.all_reduce(&mut share, ReduceOp::Sum)?;
        Ok(share[0])
    }

    /// This rank's part of a checkpoint: its slices' places in the full parameters.
    pub(crate) fn part(&self) -> TensorPart<'_> {
        TensorPart {
            rank: self.group.rank(),
            splits: &self.own,
        }
    }

    /// Cuts the full parameters (and their optimizer state) of `loaded` to this rank's slices,
    /// in place, so the rest of a resume reads it as if it had been saved by this layout.
    pub(crate) fn localize(&self, layout: &ParamLayout, loaded: &mut LoadedCheckpoint) {
        let rank = self.group.rank();
        for (p, split) in layout.params.iter().zip(&self.splits) {
            let Some(split) = split.as_ref().map(|s| &s[rank]) else {
                continue;
            };
            let full_numel: usize = split.full_shape.iter().product();
            let cut = |t: &mut super::checkpoint::LoadedTensor| {
                if t.data.len() == full_numel {
                    t.data = split.take(&t.data);
                    t.shape = split.local_shape();
                }
            };
            if let Some(t) = loaded.params.get_mut(&p.name) {
                cut(t);
            }
            let prefix = format!("{}.", p.name);
            for (name, t) in loaded.optim.iter_mut() {
                if name.strip_prefix(&prefix).is_some_and(|rest| !rest.contains('.')) {
                    cut(t);
                }
            }
        }
    }
}

/// `t` summed over `group`, a new tensor on `t`'s device and dtype (untracked).
pub(crate) fn sum_over(group: &ProcessGroup, t: Tensor<2>) -> Result<Tensor<2>, CommError> {
    let (dims, device, dtype) = (t.dims(), t.device(), t.dtype());
    let mut values: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .try_into_vec_as::<f32>()
        .unwrap_or_default();
    group.all_reduce(&mut values, ReduceOp::Sum)?;
    Ok(Tensor::from_data(TensorData::new(values, dims), (&device, dtype)))
}

impl<T: Task> Run<'_, T> {
    /// Forward and backward of one micro-batch, segment by segment, with the tensor-parallel
    /// group's sums; the gradients of this rank's parameters are added to `grads` (its slices of
    /// the split layers, partial sums for their replicated parameters until
    /// [`TensorParallel::sum_partial_grads`]).
    pub(crate) fn tp_backward(
        &mut self,
        model: &T::Model,
        indices: &[usize],
        stats: &mut StepStats,
    ) -> Result<(), TrainError> {
        let rank = self.rank;
        let task_err = |what, source| TrainError::Task { rank, what, source };
        let comm_err = |source| TrainError::Comm { rank, source };
        let (Some(chain), Some(blocks), Some(tp)) = (self.chain, &self.overlap, &self.tp) else {
            return Ok(());
        };
        let started = Instant::now();
        let batch = self
            .task
            .batch(indices, &self.device)
            .map_err(|e| task_err("reading a batch", e))?;
        if self.grads.is_empty() {
            self.grads.resize(self.master.len(), 0.0);
        }
        let stage_start = self.place.blocks.start;
        // Forward: every segment's input a fresh leaf; a split block's outputs summed.
        let mut x = chain.input(&batch).map_err(|e| task_err("reading a batch", e))?;
        let mut held: Vec<(usize, Option<Tensor<2>>, Tensor<2>)> = Vec::new();
        for (local, &split) in tp.blocks.iter().enumerate() {
            let b = stage_start + local;
            for segment in 0..chain.segments(b) {
                let leaf = (!held.is_empty()).then(|| x.clone().detach().require_grad());
                let out = chain
                    .forward_segment(model, leaf.clone().unwrap_or(x), b, segment)
                    .map_err(|e| task_err("running the forward", e))?;
                x = if split {
                    sum_over(&tp.group, out.clone()).map_err(comm_err)?
                } else {
                    out.clone()
                };
                held.push((local, leaf, out));
            }
        }
        if tp.blocks.last().copied().unwrap_or(false) {
            return Err(task_err(
                "running the forward",
                "the last block is split over the tensor-parallel group; the loss needs a whole one".into(),
            ));
        }
        let loss = chain
            .loss_of_output(x, &batch)
            .map_err(|e| task_err("computing the loss", e))?;
        stats.loss_sum += loss_value(&loss);
        stats.loss_count += 1;
        let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);

        // Backward, last segment first.
        let mut loss = Some(loss);
        let mut upstream: Option<Tensor<2>> = None;
        let mut present = Vec::new();
        while let Some((local, leaf, out)) = held.pop() {
            let grads = match (upstream.take(), loss.take()) {
                (Some(g), _) => (out * g).sum().backward(),
                (None, Some(loss)) => scaled(loss, loss_scale).backward(),
                (None, None) => {
                    return Err(task_err(
                        "running the backward",
                        format!("block {} got no gradient from the block after it", stage_start + local).into(),
                    ))
                }
            };
            if let Some(leaf) = &leaf {
                let g = input_grad(rank, leaf, &grads, stage_start + local)?;
                upstream = Some(if tp.blocks[local] {
                    sum_over(&tp.group, g).map_err(comm_err)?
                } else {
                    g
                });
            }
            let params = GradientsParams::from_grads(grads, model);
            let select = &blocks.select[local];
            read_block_grads(
                &self.resolved.device,
                rank,
                model,
                &params,
                select,
                &mut self.scratch,
                &mut present,
            )?;
            let range = blocks.ranges[local].clone();
            self.grads[range]
                .iter_mut()
                .zip(&self.scratch)
                .for_each(|(sum, g)| *sum += g);
        }
        stats.compute_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }
}
