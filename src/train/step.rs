//! One optimizer step: forward and backward over the step's micro-batches, gradient sync (after
//! backward, or block by block during it), loss scaling, clipping, the update, the buffers.
//!
//! **Overlap.** With a model that is a chain of blocks ([`super::BlockChain`]) trained by plain
//! data parallelism, the last micro-batch of a step runs forward block by block (each block's
//! input a fresh leaf) and backward from the last block to the first: as soon as block b's
//! backward is done its gradients are final, and their all-reduce is launched on the process
//! group's communication thread while the backward of blocks b-1, …, 0 goes on (torch DDP does
//! the same with autograd hooks and buckets in reverse order). The cost is one elementwise
//! product and sum per block boundary (`sum(out_b * g_b)` back-propagates the received gradient
//! `g_b` exactly).

use std::ops::Range;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::comm::{ReduceOp, Work};
use crate::config::Resolved;
use crate::parallel::params::{
    flatten_selected_grads_into, flatten_selected_grads_via_device, flatten_selected_into, load_selected_as,
    release_selected,
};
use crate::parallel::{load_params, DataParallel, ParamLayout, StageCompute, SyncStats};

use crate::precision::ParamSpan;

use super::optim::{clip_by_global_norm, learning_rate, sum_of_squares};
use super::report::StepStats;
use super::run::Run;
use super::setup::Placement;
use super::sharded::Sharded;
use super::stage::{loss_value, scaled, Accumulator, GradSink, StageRunner, StageTensorParallel};
use super::task::{BlockChain, Task};
use super::TrainError;

/// What a step that was not skipped reports.
#[derive(Debug)]
pub(crate) struct StepOutcome {
    pub(crate) stats: StepStats,
    /// The learning rate the update used.
    pub(crate) lr: f32,
    /// Per bucket, the relative error of what compression dropped.
    pub(crate) compression_error: Vec<f64>,
}

/// Which parameters each block holds: its element range in the flat layout and its mask.
#[derive(Debug)]
pub(crate) struct Overlap {
    /// Per block, its elements of the flat gradient buffer.
    pub(crate) ranges: Vec<Range<usize>>,
    /// Per block, one flag per parameter (layout order): the block's own.
    pub(crate) select: Vec<Vec<bool>>,
}

impl Overlap {
    /// The block layout of a block-chain model trained data parallel on one stage, when
    /// `comm.overlap` is on (by default on GPU devices) and nothing needs the whole gradient before the all-reduce (a codec
    /// compresses buckets of its own, the loss scaler checks every gradient for overflow first).
    /// An error when the model's parameters are not laid out block after block as its
    /// [`BlockChain::block_param_counts`] say.
    pub(crate) fn plan<M, B>(
        resolved: &Resolved,
        chain: Option<&dyn BlockChain<M, B>>,
        place: &Placement,
        layout: &ParamLayout,
        ddp: &DataParallel,
        loss_scaling: bool,
    ) -> Result<Option<Self>, String> {
        let cfg = &resolved.config;
        // The contract is checked whenever the rank holds the whole chain, used or not.
        let Some(chain) = chain.filter(|_| place.dims.pipeline == 1) else {
            return Ok(None);
        };
        let counts = chain.block_param_counts();
        let (mut ranges, mut select) = (Vec::new(), Vec::new());
        let mut params = layout.params.iter().enumerate().peekable();
        let mut offset = 0;
        for (block, &count) in counts.iter().enumerate() {
            let mut mask = vec![false; layout.len()];
            let end = offset + count;
            while let Some((k, p)) = params.next_if(|(_, p)| p.range().end <= end) {
                if p.range().start < offset {
                    break;
                }
                mask[k] = true;
            }
            let reached = params.peek().map_or(layout.numel, |(_, p)| p.range().start);
            if reached != end {
                return Err(format!(
                    "block {block} of the model should hold {count} parameter values (BlockChain::block_param_counts), \
                     but its parameters in visit order end at value {reached}, not {end}: the model's parameters must \
                     be those of block 0, then block 1, and so on (fix block_param_counts or the order of the model's fields)"
                ));
            }
            ranges.push(offset..end);
            select.push(mask);
            offset = end;
        }
        if offset != layout.numel {
            return Err(format!(
                "the blocks hold {offset} parameter values (BlockChain::block_param_counts) but the model {}",
                layout.numel
            ));
        }
        // ZeRO-2 reduce-scatters each block as its backward ends, so the whole flat gradient is
        // never held: on by default there.
        let wanted = cfg
            .comm
            .overlap
            .unwrap_or(!resolved.device.is_cpu() || cfg.parallel.shard == crate::config::ShardMode::Gradients);
        // On NCCL the gradients are averaged as one buffer on the GPU after backward.
        // ZeRO-3 computes block by block whatever the settings (validation refused the rest).
        let fsdp = cfg.parallel.shard == crate::config::ShardMode::Parameters;
        // Tensor parallelism runs segment by segment too.
        let used = fsdp
            || place.dims.tensor > 1
            || wanted
                && place.dims.data > 1
                && ddp.codec().is_none()
                && !loss_scaling
                && resolved.backend != crate::config::CommBackend::Nccl;
        Ok(used.then_some(Self { ranges, select }))
    }
}

/// Gradient all-reduces (or with ZeRO-2 reduce-scatters) launched during backward, one per
/// block, each with where its result goes: the block's elements of the flat gradient, or with
/// ZeRO-2 this rank's chunk of the block in the sharded gradient.
#[derive(Default)]
struct InFlight {
    launched: Vec<(Range<usize>, Work<Vec<f32>>)>,
    first_launch: Option<Instant>,
    /// Gradient bytes launched (before any padding).
    bytes: usize,
    /// Collectives launched.
    buckets: usize,
}

impl<T: Task> Run<'_, T> {
    /// Runs step `step` (0-based) on `model` and returns the model with the updated parameters;
    /// `None` as outcome when the loss scaler skipped the step (a gradient overflowed).
    pub(crate) fn step(&mut self, model: T::Model, step: u64) -> Result<(T::Model, Option<StepOutcome>), TrainError> {
        let rank = self.rank;
        let cfg = &self.resolved.config;
        let bytes_before = self.world.bytes_sent();
        let accum = cfg.train.grad_accum_steps.max(1);
        let micro_batches = cfg.parallel.micro_batches.max(1);
        // The loss of a step is the mean over its micro-batches: scale the summed gradients alike.
        let scale = 1.0 / (accum * micro_batches) as f32;
        let mut stats = StepStats::default();
        let mut in_flight = None;
        let mut model = model;
        self.grads.clear();
        if let Some(zero) = self.zero.as_mut().filter(|z| z.shards_parameters()) {
            zero.begin_accumulation();
        }
        for micro_step in 0..accum {
            let indices = self.sampler.step_indices(step * accum as u64 + micro_step as u64);
            let slices: Vec<&[usize]> = indices.chunks(self.resolved.micro_batch_size.max(1)).collect();
            let last_micro_step = micro_step + 1 == accum;
            if self.tp.is_some() && self.pipeline.is_none() {
                for slice in &slices {
                    self.tp_backward(&model, slice, &mut stats)?;
                }
                continue;
            }
            if self.zero.as_ref().is_some_and(|z| z.shards_parameters()) {
                let in_flight = in_flight.get_or_insert_with(InFlight::default);
                for slice in &slices {
                    model = self.fsdp_backward(model, slice, scale, &mut stats, in_flight)?;
                }
                continue;
            }
            match (&self.pipeline, &self.overlap) {
                (Some(_), _) => self.pipeline_micro_step(&model, &slices, &mut stats)?,
                (None, Some(_)) if last_micro_step => {
                    let (last, earlier) = slices.split_last().expect("a step has at least one micro-batch");
                    self.whole_backward(&model, earlier, &mut stats)?;
                    in_flight = Some(self.overlapped_backward(&model, last, scale, &mut stats)?);
                }
                (None, _) => self.whole_backward(&model, &slices, &mut stats)?,
            }
        }
        if stats.loss_count > 0 && !(stats.loss_sum / stats.loss_count as f64).is_finite() {
            return Err(TrainError::NonFinite {
                rank,
                step: step + 1,
                loss: stats.loss_sum / stats.loss_count as f64,
            });
        }

        crate::flight::phase(crate::flight::Phase::GradientSync);
        if let Some(tp) = &self.tp {
            tp.sum_partial_grads(&mut self.grads)
                .map_err(|source| TrainError::Comm { rank, source })?;
        }
        let sync = match in_flight {
            Some(in_flight) => self.finish_overlap(in_flight)?,
            None => {
                // The NCCL path averages on the GPU first, after scaling the summed gradients to
                // the step's mean and out of the loss scale there: a codec on the device then
                // sees what the host codec sees (its residual and factors in the same units, so
                // checkpoints cross between the paths, and a changing loss scale does not mix
                // units in a residual); for a plain average the factor (a power of two, unless
                // grad_accum_steps x micro_batches is not) commutes with it.
                let inverse_loss_scale = 1.0 / self.scaler.as_ref().map_or(1.0, |s| s.scale);
                let on_device = match &mut self.device_grads {
                    Some(device) => {
                        Some(device.average_into(rank, step, scale * inverse_loss_scale, &mut self.grads)?)
                    }
                    None => None,
                };
                // Every stage runs a backward each step, so this only guards the layout.
                self.grads.resize(self.master.len(), 0.0);
                if on_device.is_none() && scale != 1.0 {
                    self.grads.iter_mut().for_each(|g| *g *= scale);
                }
                // Dynamic loss scaling: every rank agrees whether any gradient overflowed, and all skip.
                if let Some(scaler) = &mut self.scaler {
                    let spans = ParamSpan::from_numels(&self.names, &self.numels);
                    let decision = scaler
                        .check_and_update(Some(&self.world), step + 1, &self.grads, &spans)
                        .map_err(|source| TrainError::Precision { rank, source })?;
                    if decision.skip {
                        if rank == 0 {
                            tracing::warn!(
                                "step {}: gradient overflow on rank(s) {:?} (first: {}); skipped, loss scale -> {}",
                                step + 1,
                                decision.overflow_ranks,
                                decision.first_overflow.as_deref().unwrap_or("?"),
                                decision.scale
                            );
                        }
                        return Ok((model, None));
                    }
                    if on_device.is_none() {
                        // By the scale the gradients carry: a growth step has raised it already.
                        decision.unscale(&mut self.grads);
                    }
                }
                match (on_device, self.zero.as_mut().filter(|z| z.scatters_gradients())) {
                    (Some(sync), _) => sync,
                    (None, Some(zero)) => {
                        let comm_ms = zero.reduce_scatter(rank, &self.grads)?;
                        SyncStats {
                            buckets: zero.layout().pieces.len(),
                            bytes: self.grads.len() * 4,
                            comm_ms,
                            wait_ms: comm_ms,
                            ..SyncStats::default()
                        }
                    }
                    (None, None) => self
                        .ddp
                        .sync_flat(&mut self.grads, step)
                        .map_err(|source| TrainError::Sync { rank, source })?,
                }
            }
        };

        // Clip by the global norm: the stages' shares add up over the pipeline group (and with
        // ZeRO-2 the replicas' chunks over the data-parallel group).
        let scattered = self.zero.as_ref().filter(|z| z.scatters_gradients());
        let mut sum_sq = match (scattered, &self.tp) {
            (Some(zero), _) => zero.grad_sum_of_squares(rank)?,
            (None, Some(tp)) => tp
                .sum_of_squares(&self.layout, &self.grads)
                .map_err(|source| TrainError::Comm { rank, source })?,
            (None, None) => sum_of_squares(&self.grads),
        };
        if let Some(pipe) = &self.place.pipe_group {
            let mut total = [sum_sq];
            pipe.all_reduce(&mut total, ReduceOp::Sum)
                .map_err(|source| TrainError::Comm { rank, source })?;
            sum_sq = total[0];
        }
        let clipped = match self.zero.as_mut().filter(|z| z.scatters_gradients()) {
            Some(zero) => &mut zero.grads,
            None => &mut self.grads,
        };
        let grad_norm = clip_by_global_norm(clipped, sum_sq, cfg.optim.grad_clip_norm as f32);
        let lr = learning_rate(
            step,
            cfg.optim.lr as f32,
            cfg.optim.min_lr as f32,
            cfg.optim.warmup_steps,
            cfg.train.steps,
            cfg.optim.schedule == crate::config::LrSchedule::Cosine,
        );
        crate::flight::phase(crate::flight::Phase::Optimizer);
        let mut sync = sync;
        match &mut self.zero {
            None => self.optimizer.step(lr, &mut self.master, &self.grads),
            Some(zero) => {
                let gather = zero.step(rank, &mut self.optimizer, lr, &mut self.master, &self.grads)?;
                sync.comm_ms += gather.comm_ms;
                sync.wait_ms += gather.wait_ms + zero.take_gather_wait_ms();
            }
        }
        let model = if self.zero.as_ref().is_some_and(|z| z.shards_parameters()) {
            // The model holds no parameter between steps; buffers were kept block by block.
            for (state, values) in &self.fsdp_kept {
                self.master[state.clone()].copy_from_slice(values);
            }
            model
        } else {
            self.keep_buffers(&model)?;
            load_params(model, &self.master).map_err(|source| TrainError::Params { rank, source })?
        };

        stats.comm_ms = sync.comm_ms;
        stats.exposed_ms = sync.wait_ms;
        stats.wire_bytes = self.world.bytes_sent() - bytes_before;
        if self
            .device_grads
            .as_ref()
            .is_some_and(|d| d.counts_own_bytes(self.resolved))
        {
            stats.wire_bytes += sync.wire_bytes;
        }
        stats.grad_norm = grad_norm;
        Ok((
            model,
            Some(StepOutcome {
                stats,
                lr,
                compression_error: sync.compression_error,
            }),
        ))
    }

    /// Forward and backward of the whole model on each of `slices`, gradients summed.
    fn whole_backward(
        &mut self,
        model: &T::Model,
        slices: &[&[usize]],
        stats: &mut StepStats,
    ) -> Result<(), TrainError> {
        let rank = self.rank;
        let task_err = |what, source| TrainError::Task { rank, what, source };
        let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        let mut acc = Accumulator {
            sum: &mut self.grads,
            scratch: &mut self.scratch,
            via_device: !self.resolved.device.is_cpu(),
        };
        for indices in slices {
            let started = Instant::now();
            crate::flight::phase(crate::flight::Phase::Data);
            let batch = self
                .task
                .batch(indices, &self.device)
                .map_err(|e| task_err("reading a batch", e))?;
            crate::flight::phase(crate::flight::Phase::Forward);
            let loss = self
                .task
                .loss(model, &batch)
                .map_err(|e| task_err("computing the loss", e))?;
            stats.loss_sum += loss_value(&loss);
            stats.loss_count += 1;
            crate::flight::phase(crate::flight::Phase::Backward);
            let grads = scaled(loss, loss_scale).backward();
            match &mut self.device_grads {
                Some(device) => device.add(model, grads),
                None => acc.add(model, grads),
            }
            .map_err(|source| TrainError::Params { rank, source })?;
            stats.compute_ms += started.elapsed().as_secs_f64() * 1e3;
        }
        Ok(())
    }

    /// The micro-batches of one accumulation step through this rank's pipeline stage.
    fn pipeline_micro_step(
        &mut self,
        model: &T::Model,
        slices: &[&[usize]],
        stats: &mut StepStats,
    ) -> Result<(), TrainError> {
        let rank = self.rank;
        let pipe_err = |source| TrainError::Pipeline { rank, source };
        let (Some(stage), Some(chain)) = (self.pipeline.as_mut(), self.chain) else {
            return Ok(());
        };
        let mut runner = StageRunner::new(
            self.task,
            chain,
            model,
            self.place.blocks.clone(),
            self.device.clone(),
            slices.to_vec(),
            (self.place.first(), self.place.last()),
            match &mut self.device_grads {
                Some(device) => GradSink::Device(device),
                None => GradSink::Host(Accumulator {
                    sum: &mut self.grads,
                    scratch: &mut self.scratch,
                    via_device: !self.resolved.device.is_cpu(),
                }),
            },
        );
        runner.loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        runner.tensor_parallel = self.tp.as_ref().map(|tp| StageTensorParallel {
            group: &tp.group,
            split: tp.blocks.clone(),
        });
        if self.place.dims.pipeline > 1 {
            let times = stage
                .run(&self.actions, Some(&self.output_shape), &mut runner)
                .map_err(pipe_err)?;
            stats.idle_ms += times.idle_ms;
            self.pipeline_times.push(times);
        } else {
            for m in 0..slices.len() {
                runner.forward(m, None).map_err(pipe_err)?;
                runner.backward(m, None).map_err(pipe_err)?;
            }
        }
        stats.loss_sum += runner.loss_sum;
        stats.loss_count += runner.loss_count;
        stats.compute_ms += runner.compute_secs * 1e3;
        Ok(())
    }

    /// Forward block by block on `indices`, then backward from the last block to the first,
    /// launching each block's gradient all-reduce as soon as its backward is done.
    fn overlapped_backward(
        &mut self,
        model: &T::Model,
        indices: &[usize],
        scale: f32,
        stats: &mut StepStats,
    ) -> Result<InFlight, TrainError> {
        let rank = self.rank;
        let task_err = |what, source| TrainError::Task { rank, what, source };
        let (Some(chain), Some(overlap)) = (self.chain, &self.overlap) else {
            return Ok(InFlight {
                launched: Vec::new(),
                first_launch: None,
                bytes: 0,
                buckets: 0,
            });
        };
        let started = Instant::now();
        let batch = self
            .task
            .batch(indices, &self.device)
            .map_err(|e| task_err("reading a batch", e))?;
        // Forward: block b's input is a fresh leaf, so its backward stops at the block.
        let blocks = overlap.ranges.len();
        let mut x = chain.input(&batch).map_err(|e| task_err("reading a batch", e))?;
        let mut held: Vec<(Option<Tensor<2>>, Tensor<2>)> = Vec::with_capacity(blocks);
        for b in 0..blocks {
            let leaf = (b > 0).then(|| x.clone().detach().require_grad());
            let input = leaf.clone().unwrap_or(x);
            let out = chain
                .forward_range(model, input, b..b + 1)
                .map_err(|e| task_err("running the forward", e))?;
            x = out.clone();
            held.push((leaf, out));
        }
        let loss = chain
            .loss_of_output(x, &batch)
            .map_err(|e| task_err("computing the loss", e))?;
        stats.loss_sum += loss_value(&loss);
        stats.loss_count += 1;

        // Backward, last block first. The step's earlier micro-batches (if any) already summed
        // their gradients into `grads`; this one adds its own, then the block's sum is scaled to
        // the step's mean and leaves for the all-reduce.
        // ZeRO-2 launches each block from a block-sized buffer and keeps only its own chunk, so
        // without earlier micro-batches the flat gradient is never filled.
        let fresh = self.grads.is_empty();
        let scatter = self.zero.as_ref().is_some_and(|z| z.scatters_gradients());
        if fresh && !scatter {
            self.grads.resize(self.master.len(), 0.0);
        }
        let group = self.place.data_group.clone();
        let mut in_flight = InFlight {
            launched: Vec::with_capacity(blocks),
            first_launch: None,
            bytes: 0,
            buckets: 0,
        };
        let mut present = Vec::new();
        let mut upstream: Option<Tensor<2>> = None;
        let mut loss = Some(loss);
        for b in (0..blocks).rev() {
            // Invariant: one entry was pushed per block above.
            let (leaf, out) = held.pop().expect("one held output per block");
            let grads = match (upstream.take(), loss.take()) {
                (Some(g), _) => (out * g).sum().backward(),
                (None, Some(loss)) => loss.backward(),
                (None, None) => {
                    return Err(task_err(
                        "running the backward",
                        format!("block {b} got no gradient from block {}", b + 1).into(),
                    ))
                }
            };
            if let Some(leaf) = &leaf {
                upstream = Some(input_grad(rank, leaf, &grads, b)?);
            }
            let params = GradientsParams::from_grads(grads, model);
            let select = &overlap.select[b];
            read_block_grads(
                &self.resolved.device,
                rank,
                model,
                &params,
                select,
                &mut self.scratch,
                &mut present,
            )?;
            let range = overlap.ranges[b].clone();
            if range.is_empty() {
                continue;
            }
            in_flight.first_launch.get_or_insert_with(Instant::now);
            in_flight.bytes += range.len() * 4;
            in_flight.buckets += 1;
            // The step's mean: this micro-batch's gradients plus the earlier ones', scaled.
            let (scratch, earlier) = (&self.scratch, (!fresh).then(|| &self.grads[range.clone()]));
            let fill = |block: &mut Vec<f32>| match earlier {
                None => block.extend(scratch.iter().map(|g| g * scale)),
                Some(earlier) => block.extend(earlier.iter().zip(scratch).map(|(acc, g)| (acc + g) * scale)),
            };
            match self.zero.as_mut().filter(|z| z.scatters_gradients()) {
                // The shards follow the blocks (`shard_buckets`): piece b is block b.
                Some(zero) => {
                    debug_assert_eq!(
                        zero.layout().pieces[b].bucket,
                        range,
                        "ZeRO's piece {b} is not block {b}"
                    );
                    zero.launch_scatter(rank, b, fill)?
                }
                None => {
                    let mut block = Vec::with_capacity(range.len());
                    fill(&mut block);
                    in_flight
                        .launched
                        .push((range, group.all_reduce_async(block, ReduceOp::Avg)));
                }
            }
        }
        stats.compute_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(in_flight)
    }

    /// ZeRO-3 (FSDP) on the micro-batch `indices`: the model holds no block's parameters
    /// between uses. Forward: each block's parameters are all-gathered (the next block's gather
    /// launched before this block computes), loaded untracked, the block runs without building a
    /// graph, and its parameters are released; only the activations between blocks are kept.
    /// Backward, last block first: the block is gathered again (the previous one prefetched),
    /// loaded tracked, recomputed from its kept input (a fresh leaf) and back-propagated with the
    /// upstream gradient (`sum(out * g)`), and its gradients are reduce-scattered at once; the
    /// last block's forward is the backward's first (it is computed once). Recomputing is the
    /// price of freeing: burn's graph would hold every block's parameters until backward.
    /// Returns the model, every block released.
    fn fsdp_backward(
        &mut self,
        model: T::Model,
        indices: &[usize],
        scale: f32,
        stats: &mut StepStats,
        in_flight: &mut InFlight,
    ) -> Result<T::Model, TrainError> {
        let rank = self.rank;
        let task_err = |what, source| TrainError::Task { rank, what, source };
        let params_err = |source| TrainError::Params { rank, source };
        let (Some(chain), Some(blocks), Some(zero)) = (self.chain, &self.overlap, self.zero.as_mut()) else {
            // Setup gives ZeRO-3 a block chain and its layout.
            return Ok(model);
        };
        let started = Instant::now();
        let batch = self
            .task
            .batch(indices, &self.device)
            .map_err(|e| task_err("reading a batch", e))?;
        let count = blocks.ranges.len();
        let untracked = vec![false; self.layout.len()];
        let mut model = model;
        // Loads block b's gathered values (or, with one replica, its share: the whole block),
        // after launching the gather of block `next`, which runs while block b computes.
        let load = |model: T::Model,
                    zero: &mut Sharded,
                    (b, next): (usize, Option<usize>),
                    master: &[f32],
                    tracked: &[bool]|
         -> Result<T::Model, TrainError> {
            let gathered = zero.take_gathered(rank, b, master)?;
            if let Some(next) = next {
                zero.prefetch(next, master);
            }
            let len = blocks.ranges[b].len();
            let values = match &gathered {
                Some((_, all)) => &all[..len],
                None => &master[zero.layout().pieces[b].state.clone()],
            };
            let model =
                load_selected_as(model, &self.layout, &blocks.select[b], values, tracked).map_err(params_err)?;
            if let Some(buffers) = gathered {
                zero.recycle(buffers);
            }
            Ok(model)
        };

        // Forward of every block but the last, untracked; the inputs are kept.
        let mut inputs = Vec::with_capacity(count);
        let mut x = chain.input(&batch).map_err(|e| task_err("reading a batch", e))?;
        zero.prefetch(0, &self.master);
        for b in 0..count - 1 {
            model = load(model, zero, (b, Some(b + 1)), &self.master, &untracked)?;
            let out = chain
                .forward_range(&model, x.clone(), b..b + 1)
                .map_err(|e| task_err("running the forward", e))?;
            inputs.push(x);
            x = out;
            model = release_selected(model, &blocks.select[b]);
        }
        inputs.push(x);

        // Backward, last block first.
        self.fsdp_kept.clear();
        let mut present = Vec::new();
        let mut upstream: Option<Tensor<2>> = None;
        for b in (0..count).rev() {
            model = load(model, zero, (b, b.checked_sub(1)), &self.master, &self.trainable)?;
            // Invariant: one input was pushed per block above.
            let input = inputs.pop().expect("one kept input per block");
            let leaf = (b > 0).then(|| input.clone().detach().require_grad());
            let out = chain
                .forward_range(&model, leaf.clone().unwrap_or(input), b..b + 1)
                .map_err(|e| task_err("running the forward", e))?;
            let grads = if b + 1 == count {
                let loss = chain
                    .loss_of_output(out, &batch)
                    .map_err(|e| task_err("computing the loss", e))?;
                stats.loss_sum += loss_value(&loss);
                stats.loss_count += 1;
                loss.backward()
            } else {
                let g = upstream.take().ok_or_else(|| {
                    task_err(
                        "running the backward",
                        format!("block {b} got no gradient from block {}", b + 1).into(),
                    )
                })?;
                (out * g).sum().backward()
            };
            if let Some(leaf) = &leaf {
                upstream = Some(input_grad(rank, leaf, &grads, b)?);
            }
            let params = GradientsParams::from_grads(grads, &model);
            let select = &blocks.select[b];
            read_block_grads(
                &self.resolved.device,
                rank,
                &model,
                &params,
                select,
                &mut self.scratch,
                &mut present,
            )?;
            let range = blocks.ranges[b].clone();
            if !range.is_empty() {
                in_flight.first_launch.get_or_insert_with(Instant::now);
                in_flight.bytes += range.len() * 4;
                in_flight.buckets += 1;
                let scratch = &self.scratch;
                zero.launch_scatter(rank, b, |block| block.extend(scratch.iter().map(|g| g * scale)))?;
            }
            // Buffers (running statistics, frozen weights): rank 0's values after this
            // recompute, the block's only tracked forward, as `keep_buffers` does for DDP.
            let kept: Vec<bool> = select.iter().zip(&self.trainable).map(|(&s, &t)| s && !t).collect();
            if kept.iter().any(|&k| k) {
                drop(model.valid());
                rank_zeros_values(&self.place, rank, &model, &kept, &mut self.scratch)?;
                let mut offset = 0;
                for (p, _) in self.layout.params.iter().zip(&kept).filter(|(_, &k)| k) {
                    for (elements, state) in zero.layout().owned_within(p.range()) {
                        let from = offset + elements.start - p.offset;
                        let values = self.scratch[from..from + elements.len()].to_vec();
                        let state = state..state + elements.len();
                        self.master[state.clone()].copy_from_slice(&values);
                        self.fsdp_kept.push((state, values));
                    }
                    offset += p.numel;
                }
            }
            model = release_selected(model, select);
        }
        stats.compute_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(model)
    }

    /// Waits for the all-reduces launched during backward and puts the averages in place.
    fn finish_overlap(&mut self, in_flight: InFlight) -> Result<SyncStats, TrainError> {
        let rank = self.rank;
        let mut stats = SyncStats {
            buckets: in_flight.buckets,
            bytes: in_flight.bytes,
            ..SyncStats::default()
        };
        let waited = Instant::now();
        for (range, work) in in_flight.launched {
            let averaged = work.wait().map_err(|source| TrainError::Comm { rank, source })?;
            self.grads[range].copy_from_slice(&averaged);
        }
        stats.wait_ms = waited.elapsed().as_secs_f64() * 1e3;
        if let Some(zero) = self.zero.as_mut().filter(|z| z.scatters_gradients()) {
            stats.wait_ms += zero.finish_scatters(rank)?;
        }
        stats.comm_ms = in_flight.first_launch.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        stats.wire_bytes = stats.bytes as u64;
        Ok(stats)
    }

    /// Buffers (parameters autodiff does not train: running statistics, frozen weights) keep the
    /// values the model computed, rank 0's on every replica (torch DDP's `broadcast_buffers`).
    fn keep_buffers(&mut self, model: &T::Model) -> Result<(), TrainError> {
        if self.trainable.iter().all(|&t| t) {
            return Ok(());
        }
        let rank = self.rank;
        let buffers: Vec<bool> = self.trainable.iter().map(|t| !t).collect();
        // burn's `RunningState` keeps a forward's update aside until a read folds it in; `valid()`
        // folds every pending one (the inference copy it returns is dropped at once).
        drop(model.valid());
        rank_zeros_values(&self.place, rank, model, &buffers, &mut self.scratch)?;
        let mut offset = 0;
        for (p, _) in self.layout.params.iter().zip(&buffers).filter(|(_, &b)| b) {
            self.master[p.range()].copy_from_slice(&self.scratch[offset..offset + p.numel]);
            offset += p.numel;
        }
        Ok(())
    }
}

/// Reads the gradients of the parameters `select` marks into `out` (zeros where one has none):
/// straight from each buffer on the CPU, concatenated on the device and read back once elsewhere.
pub(crate) fn read_block_grads<M: Module>(
    device: &crate::config::DeviceSpec,
    rank: usize,
    model: &M,
    params: &GradientsParams,
    select: &[bool],
    out: &mut Vec<f32>,
    present: &mut Vec<u8>,
) -> Result<(), TrainError> {
    if device.is_cpu() {
        flatten_selected_grads_into(model, params, select, out, present)
    } else {
        flatten_selected_grads_via_device(model, params, Some(select), out)
    }
    .map_err(|source| TrainError::Params { rank, source })
}

/// The gradient `grads` hold for `leaf`, the input of block `block` (an error naming the block
/// when it has none: the block did not use its input).
pub(crate) fn input_grad(
    rank: usize,
    leaf: &Tensor<2>,
    grads: &burn::tensor::Gradients,
    block: usize,
) -> Result<Tensor<2>, TrainError> {
    let g = leaf.grad(grads).ok_or_else(|| TrainError::Task {
        rank,
        what: "running the backward",
        source: format!("the input of block {block} got no gradient").into(),
    })?;
    Ok(Tensor::from_inner(g))
}

/// Reads the parameters `select` marks into `out` (back to back, layout order) as data-parallel
/// rank 0 holds them: broadcast over the data-parallel group.
pub(crate) fn rank_zeros_values<M: Module>(
    place: &Placement,
    rank: usize,
    model: &M,
    select: &[bool],
    out: &mut Vec<f32>,
) -> Result<(), TrainError> {
    flatten_selected_into(model, select, out).map_err(|source| TrainError::Params { rank, source })?;
    if place.dims.data > 1 {
        place
            .data_group
            .broadcast(out, 0)
            .map_err(|source| TrainError::Comm { rank, source })?;
    }
    Ok(())
}
