//! A training run from start to end: [`train_task_on`] sets it up (placement, device, model,
//! buffers, resume), runs the steps, checkpoints and reports. Every rank runs this.
//!
//! Rank r sits at (replica, tensor rank, stage) in the `data x tensor x pipeline` mesh; with one stage it holds a whole
//! replica (plain data parallelism). The trainable parameters of the rank's blocks live in one
//! flat f32 vector (the master weights), with the optimizer state beside it; burn computes the
//! gradients, we average them over the replicas and apply the update ourselves.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;

use crate::comm::ProcessGroup;
use crate::compress::build_codec;
use crate::config::{ComputeDtype, HierarchicalMode, Resolved, RunConfig, ShardMode};
use crate::data::DistributedSampler;
use crate::parallel::params::{release_selected, trainable_mask};
use crate::parallel::{
    flatten_params_into, load_params, load_params_by_name, schedule, Action, DataParallel, ParamError, ParamLayout,
    PipelineStage, StepTimes, SyncError,
};
use crate::precision::{DynamicLossScaler, LossScalerOptions};

use super::builtin::BuiltIn;
use super::checkpoint::{self as ckpt, LoadedCheckpoint};
use super::checkpoint_writer::CheckpointWriter;
use super::device_grads::DeviceGrads;
use super::optim::FlatOptimizer;
use super::report::{announce, Reporter};
use super::resume::{self, CodecPart, RankPart, SaveExtras};
use super::setup::{self, Placement};
use super::sharded::Sharded;
use super::step::Overlap;
use super::task::{BlockChain, Task};
use super::tensor_parallel::TensorParallel;
use super::TrainError;

/// Options that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Resume from this checkpoint folder (or the latest complete one under it).
    pub resume: Option<PathBuf>,
    /// Runs the gradients through the device path (summed as one flat tensor on the device,
    /// averaged by the host group's all-reduce, read back once) on a device that would not take
    /// it: the path NCCL takes on CUDA, testable on any device. For tests.
    #[doc(hidden)]
    pub device_path_via_host: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps completed in total (resumed ones included).
    pub steps: u64,
    /// Mean loss of the first logged window of this run.
    pub first_loss: f64,
    /// Mean loss of the last logged window.
    pub final_loss: f64,
    /// Global samples per second over the whole run (excluding the first step).
    pub samples_per_sec: f64,
    /// Mean step time, ms.
    pub step_ms: f64,
    /// The checkpoint written at the end, if any.
    pub checkpoint: Option<PathBuf>,
    /// Per checkpoint this run wrote, in order, the time this rank's training thread spent in it
    /// (ms): the whole write without `checkpoint.async`; with it, the wait for the previous write
    /// and the copy, and for the final checkpoint the whole write (it is always waited for).
    pub checkpoint_stall_ms: Vec<f64>,
    /// Per-step pipeline timers of this rank (empty without a pipeline).
    pub pipeline: Vec<StepTimes>,
}

/// `burnrun train`: joins the job from the environment and trains the built-in model of `cfg`.
pub fn train(cfg: RunConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let world = join(&cfg)?;
    train_on(world, cfg, options)
}

/// The built-in model of `cfg` on an existing world group (tests run ranks on threads with
/// [`crate::comm::spawn_ranks`]).
pub fn train_on(world: ProcessGroup, cfg: RunConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let resolved = cfg.validate(world.world_size())?;
    let task = BuiltIn::new(&resolved, world.rank())?;
    run(world, &resolved, &task, options)
}

/// Joins the job from the environment and trains `task` as `cfg` says: a user's own model gets
/// everything `burnrun train` has.
pub fn train_task<T: Task>(task: &T, cfg: RunConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let world = join(&cfg)?;
    train_task_on(world, task, cfg, options)
}

/// [`train_task`] on an existing world group.
pub fn train_task_on<T: Task>(
    world: ProcessGroup,
    task: &T,
    cfg: RunConfig,
    options: &TrainOptions,
) -> Result<TrainSummary, TrainError> {
    let resolved = cfg.validate(world.world_size())?;
    run(world, &resolved, task, options)
}

/// The world group of the job the launcher started, with the config's `[comm]` settings.
fn join(cfg: &RunConfig) -> Result<ProcessGroup, TrainError> {
    let init_err = |e: crate::Error| TrainError::Init {
        rank: 0,
        source: Box::new(e),
    };
    let mut env = crate::env::DistEnv::from_env().map_err(|e| init_err(e.into()))?;
    // The timeout set in the file (or by --set) wins over the launcher's --timeout, its default
    // does not.
    let launcher_default = std::time::Duration::from_secs(crate::env::DEFAULT_TIMEOUT_SECS);
    if cfg.source().is_set("comm.timeout_secs") || env.timeout == launcher_default {
        env.timeout = std::time::Duration::from_secs(cfg.comm.timeout_secs);
    }
    env.ring_threshold_bytes = cfg.comm.ring_threshold_bytes.or(env.ring_threshold_bytes);
    env.segment_bytes = cfg.comm.segment_bytes.or(env.segment_bytes);
    env.hierarchical = match cfg.comm.hierarchical {
        None => env.hierarchical,
        Some(HierarchicalMode::Auto) => None,
        Some(HierarchicalMode::On) => Some(true),
        Some(HierarchicalMode::Off) => Some(false),
    };
    env.shm = cfg.comm.shm.or(env.shm);
    env.shm_ring_bytes = cfg.comm.shm_ring_bytes.or(env.shm_ring_bytes);
    crate::comm::init_from(&env).map_err(init_err)
}

/// Everything a rank holds between steps (the model itself travels through the loop by value:
/// loading parameters into a burn module consumes it).
pub(crate) struct Run<'a, T: Task> {
    pub(crate) world: ProcessGroup,
    pub(crate) rank: usize,
    pub(crate) resolved: &'a Resolved,
    pub(crate) task: &'a T,
    pub(crate) chain: Option<&'a dyn BlockChain<T::Model, T::Batch>>,
    pub(crate) place: Placement,
    pub(crate) device: Device,
    pub(crate) layout: ParamLayout,
    /// Per parameter, whether autodiff trains it; the others (BatchNorm's running statistics,
    /// frozen weights) are buffers: the model's own values, rank 0's on every replica.
    pub(crate) trainable: Vec<bool>,
    /// The f32 master copy of every float parameter (buffers included), layout order; with
    /// ZeRO-3 this rank's share of it, laid out as the optimizer state.
    pub(crate) master: Vec<f32>,
    /// The step's gradients, layout order.
    pub(crate) grads: Vec<f32>,
    pub(crate) scratch: Vec<f32>,
    /// The optimizer state: every parameter's, or with ZeRO (`zero`) this rank's share.
    pub(crate) optimizer: FlatOptimizer,
    /// ZeRO (`parallel.shard`): what this rank owns of the stage's optimizer state.
    pub(crate) zero: Option<Sharded>,
    pub(crate) ddp: DataParallel,
    pub(crate) codec_ckpt: Option<ckpt::CodecCheckpoint>,
    pub(crate) scaler: Option<DynamicLossScaler>,
    /// Parameter names and sizes, layout order (the loss scaler names the overflowing one).
    pub(crate) names: Vec<String>,
    pub(crate) numels: Vec<usize>,
    pub(crate) sampler: DistributedSampler,
    pub(crate) pipeline: Option<PipelineStage>,
    pub(crate) actions: Vec<Action>,
    /// The shape of this stage's output per micro-batch (pipelines agree on it up front).
    pub(crate) output_shape: [usize; 2],
    /// Block-wise backward with the gradient all-reduce overlapped (a block chain, one stage).
    pub(crate) overlap: Option<Overlap>,
    /// Per step, this stage's pipeline timers (empty without a pipeline).
    pub(crate) pipeline_times: Vec<StepTimes>,
    /// The device path: gradients summed and averaged on the device (NCCL when `comm.backend`
    /// resolves to nccl).
    pub(crate) device_grads: Option<DeviceGrads>,
    /// The background checkpoint writer (`checkpoint.async = true`).
    pub(crate) writer: Option<CheckpointWriter>,
    /// ZeRO-3: the buffers' values kept during the last backward, where they go in `master`
    /// (put back after the optimizer step, which must not move them).
    pub(crate) fsdp_kept: Vec<(Range<usize>, Vec<f32>)>,
    /// Tensor parallelism (`parallel.tensor > 1`): the group and the split of the parameters.
    pub(crate) tp: Option<TensorParallel>,
}

impl<T: Task> std::fmt::Debug for Run<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("rank", &self.rank)
            .field("place", &self.place)
            .finish()
    }
}

fn run<T: Task>(
    world: ProcessGroup,
    resolved: &Resolved,
    task: &T,
    options: &TrainOptions,
) -> Result<TrainSummary, TrainError> {
    let rank = world.rank();
    let cfg = &resolved.config;
    // Before anything is written to out_dir; held until this function returns.
    let _out_dir_lock = setup::lock_out_dir(&world, cfg)?;
    setup::configure_compute_threads(cfg.train.threads);
    setup::keep_freed_memory();
    let chain = task.blocks();
    let counts = chain.map(|c| c.block_param_counts());
    let place = setup::place(&world, resolved, counts.as_deref())?;
    if rank == 0 {
        announce(resolved, &task.describe(), &place, counts.as_deref());
    }
    if let (Some(chain), Some(counts)) = (chain, &counts) {
        let activations = super::memory::held_activations(resolved, chain, place.blocks.clone());
        setup::check_memory(resolved, rank, &counts[place.blocks.clone()], activations)?;
    }

    // Resume: read the checkpoint before building anything, so a finished run ends here.
    let ckpt_root = Path::new(&cfg.train.out_dir).join("checkpoints");
    let resume = resume::find_resume(cfg, options, &ckpt_root, rank)?;
    if let Some(loaded) = &resume {
        if resume::already_done(loaded, cfg, rank)? {
            return Ok(TrainSummary {
                steps: cfg.train.steps,
                first_loss: f64::NAN,
                final_loss: f64::NAN,
                samples_per_sec: 0.0,
                step_ms: 0.0,
                checkpoint: Some(loaded.dir.clone()),
                checkpoint_stall_ms: Vec::new(),
                pipeline: Vec::new(),
            });
        }
    }

    if cfg.parallel.shard == ShardMode::Parameters && chain.is_none() {
        return Err(TrainError::Unsupported {
            rank,
            what: "parallel.shard = \"parameters\"".into(),
            why: "the model is not a chain of blocks (its Task gives no `blocks()`), and ZeRO-3 gathers and frees \
                  parameters block by block: implement `Task::blocks`, or use parallel.shard = \"gradients\""
                .into(),
        });
    }
    let device = setup::device(resolved, rank)?;
    let task_err = |what, source| TrainError::Task { rank, what, source };
    let model = match chain {
        Some(chain) if place.dims.pipeline > 1 => chain.model_range(place.blocks.clone(), &device),
        _ => task.model(&device),
    }
    .map_err(|e| task_err("building the model", e))?;
    let (mut run, model, start_step) = Run::new(world, resolved, task, chain, place, device, model, resume)?;
    let buckets = run.ddp.layout().elements.clone();
    let shapes: Vec<Vec<usize>> = run.layout.params.iter().map(|p| p.shape.clone()).collect();
    run.device_grads = DeviceGrads::setup(
        &run.world,
        &run.place.data_group,
        run.ddp.layout(),
        &shapes,
        resolved,
        options,
    )?;
    if let (Some(device), Some(codec)) = (&run.device_grads, run.ddp.codec()) {
        // A resumed codec state went into the host codec: the device codec takes it over.
        device.resume_codec(rank, codec, buckets.len())?;
    }
    if run.device_grads.is_some() {
        // The device path averages the whole gradient after backward, not block by block.
        run.overlap = None;
    }
    if cfg.checkpoint.async_write {
        let shard = run.zero.as_ref().map(|z| z.layout().clone());
        run.writer = Some(CheckpointWriter::new(&run.world, &ckpt_root, cfg, &run.layout, shard));
    }
    let mut report = Reporter::new(resolved, rank, start_step)?;
    let global_batch = resolved.global_batch as f64;
    let mut model = model;
    let mut last_ckpt = None;
    for step in start_step..cfg.train.steps {
        crate::flight::step(step);
        crate::fault::at_step(step);
        if let Some(writer) = &mut run.writer {
            // A background write that failed fails the run here, at the next step boundary.
            writer.poll(step)?;
        }
        report.step_started(step, start_step);
        let (next, outcome) = run.step(model, step)?;
        model = next;
        report.progress.tick(step + 1);
        let Some(stats) = outcome else {
            continue; // skipped by the loss scaler
        };
        report.add(&stats.stats);
        let done = step + 1;
        let check_every = cfg.train.check_replicas_every;
        // Under ZeRO-3 no two replicas hold the same values: there is nothing to compare.
        if check_every > 0 && done % check_every == 0 && cfg.parallel.shard != ShardMode::Parameters {
            run.check_replicas(done)?;
        }
        // Before the log, so the step's metrics line holds the stall the checkpoint caused.
        let every = cfg.checkpoint.every_steps;
        if (every > 0 && done % every == 0) || done == cfg.train.steps {
            let started = Instant::now();
            last_ckpt = Some(run.save(&ckpt_root, done)?);
            report.add_checkpoint(started.elapsed().as_secs_f64() * 1e3, done == cfg.train.steps);
        }
        if done % cfg.log.every_steps.max(1) == 0 || done == cfg.train.steps {
            let scaler = run.scaler.as_ref();
            report.log(&run.world, global_batch, done, stats.lr, |m| {
                if let Some(scaler) = scaler {
                    m.loss_scale = Some(scaler.scale as f64);
                    m.skipped_steps = Some(scaler.skipped_steps);
                }
                m.compression_error = stats.compression_error;
            })?;
        }
    }
    if let Some(writer) = &mut run.writer {
        // Nothing in flight after a final checkpoint (it was waited for); this covers a run whose
        // last step the loss scaler skipped.
        writer.finish(&run.world, cfg.train.steps)?;
    }
    let (samples_per_sec, step_ms) = report.throughput(global_batch, cfg.train.steps);
    report.finish(resolved, &run.place, &run.pipeline_times, start_step, samples_per_sec);
    Ok(TrainSummary {
        steps: cfg.train.steps,
        first_loss: report.first_loss,
        final_loss: report.final_loss,
        samples_per_sec,
        step_ms,
        checkpoint: last_ckpt,
        checkpoint_stall_ms: report.checkpoint_stalls(),
        pipeline: run.pipeline_times,
    })
}

impl<'a, T: Task> Run<'a, T> {
    /// The flat buffers, gradient sync, loss scaler, sampler and pipeline of a rank holding
    /// `model`; then every replica starts from the checkpoint, or from rank 0's parameters.
    /// Returns the model with those parameters and the first step to run.
    #[allow(clippy::too_many_arguments)]
    fn new(
        world: ProcessGroup,
        resolved: &'a Resolved,
        task: &'a T,
        chain: Option<&'a dyn BlockChain<T::Model, T::Batch>>,
        place: Placement,
        device: Device,
        model: T::Model,
        resume: Option<LoadedCheckpoint>,
    ) -> Result<(Self, T::Model, u64), TrainError> {
        let rank = world.rank();
        let cfg = &resolved.config;
        let params_err = |source| TrainError::Params { rank, source };
        let layout = ParamLayout::of(&model);
        let trainable = trainable_mask(&model);
        let numel = layout.params.last().map_or(0, |p| p.range().end);
        // ZeRO-3 never holds the whole model in its flat buffers: only its share of the master
        // weights, allocated once the share is known.
        let fsdp = cfg.parallel.shard == ShardMode::Parameters;

        // The large flat buffers: a reservation that fails is an error naming the buffer, not
        // an abort.
        let alloc_err = |what, source| TrainError::Alloc {
            rank,
            what,
            bytes: numel as u64 * 4,
            source,
        };
        let mut master: Vec<f32> = Vec::new();
        let mut grads: Vec<f32> = Vec::new();
        if !fsdp {
            master
                .try_reserve_exact(numel)
                .map_err(|e| alloc_err("master weights", e))?;
            grads
                .try_reserve_exact(numel)
                .map_err(|e| alloc_err("gradient buffer", e))?;
            flatten_params_into(&model, &mut master).map_err(params_err)?;
        }

        let numels: Vec<usize> = layout.params.iter().map(|p| p.numel).collect();
        let names: Vec<String> = layout.params.iter().map(|p| p.name.clone()).collect();
        let bucket_cap = (cfg.comm.bucket_cap_mb * 1024.0 * 1024.0) as usize;
        let mut ddp = DataParallel::new(place.data_group.clone(), &numels, bucket_cap);
        let mut codec_ckpt = None; // The codec's state in checkpoints (residuals, PowerSGD's Q).
        if super::build::compressed(cfg) {
            let shapes: Vec<Vec<usize>> = layout.params.iter().map(|p| p.shape.clone()).collect();
            let codec = build_codec(&super::build::codec_options(cfg)).map_err(|e| TrainError::Sync {
                rank,
                source: SyncError::Codec(e),
            })?;
            ddp = ddp.with_codec(codec, &shapes);
            let slot = ckpt::CodecSlot {
                rank,
                data_replicas: place.dims.data,
                pipeline_stages: place.dims.pipeline,
            };
            codec_ckpt = Some(ckpt::CodecCheckpoint::new(slot, &ddp.layout().params, &shapes));
        }
        let mut scaler = if cfg.precision.compute == ComputeDtype::F16 {
            let options = LossScalerOptions {
                init_scale: cfg.precision.loss_scale_init as f32,
                growth_interval: cfg.precision.growth_interval,
                backoff_factor: cfg.precision.backoff as f32,
                growth_factor: cfg.precision.growth_factor as f32,
                min_scale: cfg.precision.min_scale as f32,
                ..LossScalerOptions::default()
            };
            Some(DynamicLossScaler::new(&options).map_err(|source| TrainError::Precision { rank, source })?)
        } else {
            None
        };
        let sampler = DistributedSampler::new(
            task.len(),
            place.dims.data,
            place.replica,
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.shuffle,
            cfg.data.drop_last,
        )
        .map_err(|source| TrainError::Data { rank, source })?;

        let overlap = Overlap::plan(resolved, chain, &place, &layout, &ddp, scaler.is_some()).map_err(|why| {
            TrainError::Unsupported {
                rank,
                what: "the model's BlockChain (Task::blocks)".into(),
                why,
            }
        })?;
        let zero = Sharded::new(
            cfg.parallel.shard,
            &place.data_group,
            &shard_buckets(chain, &place, numel, &ddp.layout().elements),
        );
        // With ZeRO the optimizer holds this rank's share only (and with ZeRO-3 so does master).
        let state_numel = zero.as_ref().map_or(numel, |z| z.layout().state_numel());
        if fsdp {
            if overlap.is_none() || place.dims.pipeline > 1 {
                return Err(TrainError::Unsupported {
                    rank,
                    what: "parallel.shard = \"parameters\"".into(),
                    why: "ZeRO-3 needs the whole model as a chain of blocks on each rank (parallel.pipeline = 1)"
                        .into(),
                });
            }
            master
                .try_reserve_exact(state_numel)
                .map_err(|e| alloc_err("master weights", e))?;
            master.resize(state_numel, 0.0);
        }
        // ZeRO-3 allocates its optimizer state once the whole model built above is released.
        let optimizer_kind = super::build::optimizer_kind(cfg);
        let optimizer = FlatOptimizer::try_new(optimizer_kind, if fsdp { 0 } else { state_numel })
            .map_err(|e| alloc_err("optimizer state", e))?;
        let mut run = Self {
            world,
            rank,
            resolved,
            task,
            chain,
            place,
            device,
            layout,
            trainable,
            master,
            grads,
            scratch: Vec::new(),
            optimizer,
            zero,
            ddp,
            codec_ckpt,
            scaler: None,
            names,
            numels,
            sampler,
            pipeline: None,
            actions: Vec::new(),
            output_shape: [resolved.micro_batch_size, 0],
            overlap,
            pipeline_times: Vec::new(),
            device_grads: None,
            writer: None,
            fsdp_kept: Vec::new(),
            tp: None,
        };
        if let (Some(group), Some(chain)) = (&run.place.tensor_group, chain) {
            run.tp = Some(TensorParallel::new(
                group.clone(),
                chain,
                run.place.blocks.clone(),
                &run.layout,
            ));
        } else if run.place.tensor_group.is_some() {
            return Err(TrainError::Unsupported {
                rank,
                what: format!("parallel.tensor = {}", run.place.dims.tensor),
                why: "tensor parallelism needs the model as a chain of blocks (Task::blocks)".into(),
            });
        }
        run.plan_pipeline()?;

        // Resume, or start every replica from rank 0's parameters.
        let mut model = model;
        let mut start_step = 0;
        let mut resume = resume;
        if let (Some(tp), Some(loaded)) = (&run.tp, resume.as_mut()) {
            // Full tensors in the checkpoint: this rank's slices of them.
            tp.localize(&run.layout, loaded);
        }
        match &resume {
            Some(loaded) if fsdp => run.load_shard(loaded)?,
            Some(loaded) => {
                model = load_params_by_name(model, |p| loaded.params.get(&p.name).map(|t| t.data.clone()))
                    .map_err(params_err)?;
                flatten_params_into(&model, &mut run.master).map_err(params_err)?;
            }
            None if fsdp => run.share_initial_params(&model)?,
            None => {
                run.ddp
                    .broadcast_params(&mut run.master)
                    .map_err(|source| TrainError::Comm { rank, source })?;
                model = load_params(model, &run.master).map_err(params_err)?;
            }
        }
        if fsdp {
            // From here on a block's parameters exist only while it computes; the whole model
            // built at the start is gone before the optimizer state is allocated, so the two
            // never add up.
            model = release_selected(model, &vec![true; run.layout.len()]);
            setup::return_freed_memory();
            run.optimizer =
                FlatOptimizer::try_new(optimizer_kind, state_numel).map_err(|e| alloc_err("optimizer state", e))?;
        }
        if let Some(loaded) = resume {
            resume::load_optimizer(
                &mut run.optimizer,
                &run.layout,
                run.zero.as_ref().map(|z| z.layout()),
                &loaded,
            );
            if let (Some(slot), Some(codec)) = (&run.codec_ckpt, run.ddp.codec_mut()) {
                slot.load(&loaded.dir, codec)
                    .map_err(|source| TrainError::Checkpoint { rank, source })?;
            }
            if let Some(scaler) = &mut scaler {
                scaler.scale = loaded.state.loss_scale;
                scaler.good_steps = loaded.state.good_steps;
            }
            start_step = loaded.state.step;
            if rank == 0 {
                tracing::info!("resumed from {} at step {}", loaded.dir.display(), loaded.state.step);
            }
        }
        run.scaler = scaler;
        Ok((run, model, start_step))
    }

    /// ZeRO-3 from scratch: every replica takes its share of rank 0's parameters, block by block
    /// (one block is broadcast at a time, so no rank holds a second copy of the model).
    fn share_initial_params(&mut self, model: &T::Model) -> Result<(), TrainError> {
        let rank = self.rank;
        let (Some(zero), Some(blocks)) = (&self.zero, &self.overlap) else {
            return Ok(());
        };
        for (b, piece) in zero.layout().pieces.iter().enumerate() {
            super::step::rank_zeros_values(&self.place, rank, model, &blocks.select[b], &mut self.scratch)?;
            let from = piece.owned.start - piece.bucket.start;
            self.master[piece.state.clone()].copy_from_slice(&self.scratch[from..from + piece.owned.len()]);
        }
        self.scratch = Vec::new();
        Ok(())
    }

    /// ZeRO-3 resuming: this rank's share of every parameter of `loaded` (whole tensors, shards
    /// of any layout joined when it was read).
    fn load_shard(&mut self, loaded: &LoadedCheckpoint) -> Result<(), TrainError> {
        let rank = self.rank;
        let Some(zero) = &self.zero else {
            return Ok(());
        };
        for p in &self.layout.params {
            let t = loaded.params.get(&p.name).ok_or_else(|| TrainError::Params {
                rank,
                source: ParamError::MissingParam {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                },
            })?;
            if t.data.len() != p.numel {
                return Err(TrainError::Params {
                    rank,
                    source: ParamError::ParamSizeMismatch {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        expected: p.numel,
                        got: t.data.len(),
                    },
                });
            }
            for (elements, state) in zero.layout().owned_within(p.range()) {
                let from = elements.start - p.offset..elements.end - p.offset;
                self.master[state..state + elements.len()].copy_from_slice(&t.data[from]);
            }
        }
        Ok(())
    }

    /// A pipeline stage's schedule and the activation shapes its neighbours agree on.
    fn plan_pipeline(&mut self) -> Result<(), TrainError> {
        let (Some(group), Some(chain)) = (&self.place.pipe_group, self.chain) else {
            return Ok(());
        };
        let rank = self.rank;
        let cfg = &self.resolved.config;
        let micro = self.resolved.micro_batch_size;
        let mut stage = PipelineStage::new(group.clone());
        let blocks = &self.place.blocks;
        let produces = [micro, chain.activation_width(blocks.end)];
        let expects = [micro, chain.activation_width(blocks.start)];
        let (first, last) = (self.place.first(), self.place.last());
        stage
            .agree_shapes((!last).then_some(&produces[..]), (!first).then_some(&expects[..]))
            .map_err(|source| TrainError::Pipeline { rank, source })?;
        self.actions = schedule(
            cfg.parallel.schedule,
            self.place.stage,
            self.place.dims.pipeline,
            cfg.parallel.micro_batches.max(1),
        );
        self.output_shape = produces;
        if let Some(link) = super::device_grads::nccl_stage_link(&self.world, group, self.resolved, &self.device)? {
            if rank == 0 {
                tracing::info!("pipeline: activations and their gradients between stages on NCCL ({link:?})");
            }
            stage = stage.with_link(link);
        }
        self.pipeline = Some(stage);
        Ok(())
    }

    /// Compares every parameter across replicas.
    fn check_replicas(&self, step: u64) -> Result<(), TrainError> {
        let names: Vec<String> = self.layout.params.iter().map(|p| p.name.clone()).collect();
        let ranges: Vec<Range<usize>> = self.layout.params.iter().map(|p| p.range()).collect();
        self.ddp
            .check_replicas(step, &names, &self.master, &ranges)
            .map_err(|source| TrainError::Divergence {
                rank: self.rank,
                source,
            })
    }

    /// Writes the checkpoint of step `step` under `root`, or with `checkpoint.async` copies it
    /// and starts writing it in the background.
    fn save(&mut self, root: &Path, step: u64) -> Result<PathBuf, TrainError> {
        crate::flight::phase(crate::flight::Phase::Checkpoint);
        let scale = self.scaler.as_ref().map_or((1.0, 0), |s| (s.scale, s.good_steps));
        let params_sharded = self.zero.as_ref().is_some_and(|z| z.shards_parameters());
        // A codec on the device keeps its own residual: that one is saved (read back here).
        let device_codec_state = match &self.device_grads {
            Some(device) => device.codec_state(self.rank, &self.ddp.layout().elements)?,
            None => None,
        };
        if let Some(writer) = &mut self.writer {
            let cfg = &self.resolved.config;
            let codec = self.codec_ckpt.as_ref().zip(self.ddp.codec());
            let describe = codec.map(|(_, codec)| codec.describe()).unwrap_or_default();
            let part = RankPart {
                writes_stage: self.place.replica == 0,
                stage: self.place.stage,
                layout: &self.layout,
                master: &self.master,
                optim: self.optimizer.state(),
                shard: self.zero.as_ref().map(|z| z.layout()),
                params_sharded,
                tensor: self.tp.as_ref().map(|tp| tp.part()),
                codec: codec.map(|(slot, codec)| CodecPart {
                    slot,
                    describe: &describe,
                    state: Cow::Owned(device_codec_state.unwrap_or_else(|| codec.state())),
                }),
            };
            let state = resume::train_state(cfg, &self.place, step, scale);
            return writer.save(&self.world, step, part, state, step == cfg.train.steps);
        }
        let extras = SaveExtras {
            scale,
            codec: self.codec_ckpt.as_ref().zip(self.ddp.codec()),
            device_codec_state,
            shard: self.zero.as_ref().map(|z| z.layout()),
            params_sharded,
            tensor: self.tp.as_ref().map(|tp| tp.part()),
        };
        resume::save(
            &self.world,
            &self.place,
            root,
            &self.resolved.config,
            step,
            &self.layout,
            &self.master,
            self.optimizer.state(),
            extras,
        )
    }
}

/// The buckets ZeRO shards: the blocks of a block chain (so that the block-wise backward can
/// reduce-scatter each block as soon as it is done), else the gradient buckets.
fn shard_buckets<M, B>(
    chain: Option<&dyn BlockChain<M, B>>,
    place: &Placement,
    numel: usize,
    gradient_buckets: &[Range<usize>],
) -> Vec<Range<usize>> {
    if let Some(chain) = chain {
        let counts = chain.block_param_counts();
        let mut offset = 0;
        let blocks: Vec<Range<usize>> = counts[place.blocks.clone()]
            .iter()
            .map(|&count| {
                offset += count;
                offset - count..offset
            })
            .collect();
        // A chain whose counts do not add up to the model is reported by the overlap's check;
        // here it falls back to the buckets.
        if offset == numel {
            return blocks;
        }
    }
    gradient_buckets.to_vec()
}
