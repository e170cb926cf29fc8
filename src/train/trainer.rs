//! The training loop: forward, backward, gradient sync, unscale, clip, step, checkpoint, log.
//!
//! Every rank runs this. Rank r sits at (replica, stage) in the `data x pipeline` mesh; with one
//! stage it holds a whole replica (plain data parallelism). The parameters of the rank's blocks
//! live in one flat f32 vector (the master weights), with the optimizer state beside it; burn
//! computes the gradients, we average them over the replicas and apply the update ourselves.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::FloatDType;

use crate::comm::{ProcessGroup, ReduceOp};
use crate::compress::build_codec;
use crate::config::{
    CommBackend, ComputeDtype, LrSchedule, Partition, PipelineSchedule, Progress as ProgressChoice, Resolved, RunConfig,
};
use crate::data::{Dataset, DistributedSampler};
use crate::models::{BlockStack, ModelSpec};
use crate::parallel::{flatten_params_into, load_params, load_params_by_name, ParamLayout};
use crate::parallel::{
    partition_balanced, schedule, Action, DataParallel, ParallelDims, PipelineStage, ScheduleKind, StepTimes, SyncError,
};
use crate::precision::{DynamicLossScaler, LossScalerOptions, ParamSpan};

use super::build;
use super::checkpoint::{self as ckpt, LoadedCheckpoint, NamedTensor, TrainState};
use super::error::TrainError;
use super::lock::{LockOwner, OutDirLock};
use super::memory::{self, MemoryAvailable, MemoryEstimate};
use super::metrics::{MetricsWriter, StepMetrics};
use super::optim::{clip_by_global_norm, learning_rate, sum_of_squares, FlatOptimizer};
use super::progress::{Progress, ProgressMode};
use super::stage::StageRunner;

/// Options that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Resume from this checkpoint folder (or the latest complete one under it).
    pub resume: Option<PathBuf>,
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
    /// Per-step pipeline timers of this rank (empty without a pipeline).
    pub pipeline: Vec<StepTimes>,
}

/// Where this rank sits and who it talks to.
struct Placement {
    dims: ParallelDims,
    replica: usize,
    stage: usize,
    data_group: ProcessGroup,
    pipe_group: Option<ProcessGroup>,
    blocks: Range<usize>,
}

/// Per-rank numbers gathered at every log step: loss sum, loss count, compute ms, comm ms, wait
/// ms, wire bytes, grad norm, idle ms.
const STAT_FIELDS: usize = 8;

/// Joins the job from the environment and trains.
pub fn train(cfg: RunConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let init_err = |e: crate::Error| TrainError::Init {
        rank: 0,
        source: Box::new(e),
    };
    let mut env = crate::env::DistEnv::from_env().map_err(|e| init_err(e.into()))?;
    if cfg.comm.backend != CommBackend::Tcp {
        return Err(TrainError::Unsupported {
            rank: env.rank,
            what: format!("comm.backend = \"{}\"", cfg.comm.backend),
            why: "this build has the CPU engine only (the NCCL backend needs the `cuda` feature and a GPU)".into(),
        });
    }
    // The config's [comm] settings apply to this run's process group; the timeout set in the
    // file (or by --set) wins over the launcher's --timeout, its default does not.
    let launcher_default = std::time::Duration::from_secs(crate::env::DEFAULT_TIMEOUT_SECS);
    if cfg.source().is_set("comm.timeout_secs") || env.timeout == launcher_default {
        env.timeout = std::time::Duration::from_secs(cfg.comm.timeout_secs);
    }
    env.ring_threshold_bytes = cfg.comm.ring_threshold_bytes.or(env.ring_threshold_bytes);
    env.segment_bytes = cfg.comm.segment_bytes.or(env.segment_bytes);
    env.shm = cfg.comm.shm.or(env.shm);
    env.shm_ring_bytes = cfg.comm.shm_ring_bytes.or(env.shm_ring_bytes);
    let world = crate::comm::init_from(&env).map_err(init_err)?;
    train_on(world, cfg, options)
}

/// Trains on an existing world group (tests run ranks on threads with [`crate::comm::spawn_ranks`]).
pub fn train_on(world: ProcessGroup, cfg: RunConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let rank = world.rank();
    let resolved = cfg.validate(world.world_size())?;
    let cfg = &resolved.config;
    // Before anything is written to out_dir; held until this function returns.
    let _out_dir_lock = lock_out_dir(&world, cfg)?;
    configure_compute_threads(cfg.train.threads);
    keep_freed_memory();
    let comm_err = |source| TrainError::Comm { rank, source };
    let data_err = |source| TrainError::Data { rank, source };
    let model_err = |source| TrainError::Model { rank, source };
    let params_err = |source| TrainError::Params { rank, source };

    let dataset = build::dataset(cfg, resolved.seq_len).map_err(data_err)?;
    let spec = build::model_spec(cfg, dataset.as_ref());
    spec.validate().map_err(model_err)?;
    let place = place(&world, &resolved, &spec)?;
    if rank == 0 {
        announce(&resolved, &spec, &place, dataset.as_ref());
    }
    // Refuse a model that cannot fit before allocating any of it (an allocation that fails
    // aborts the process).
    let estimate = MemoryEstimate::for_rank(&resolved, &spec, place.blocks.clone(), dataset.input_width());
    let local_ranks = crate::env::DistEnv::from_env().map_or(1, |e| e.local_world_size);
    let available = MemoryAvailable::of_this_node(local_ranks);
    if !memory::fits(&estimate, &available) {
        return Err(TrainError::OutOfMemory {
            rank,
            estimate,
            available,
        });
    }
    if rank == 0 {
        tracing::info!("memory: {estimate}; {available}");
    }

    // Resume: read the checkpoint before building anything, so a finished run ends here.
    let ckpt_root = Path::new(&cfg.train.out_dir).join("checkpoints");
    let resume = find_resume(cfg, options, &ckpt_root, rank)?;
    if let Some(loaded) = &resume {
        let (step, steps) = (loaded.state.step, cfg.train.steps);
        if step > steps {
            return Err(TrainError::PastEnd {
                rank,
                checkpoint: loaded.dir.display().to_string(),
                step,
                steps,
            });
        }
        if step == steps {
            if rank == 0 {
                eprintln!(
                    "burnrun: the run is already complete: checkpoint {} is at step {step} = train.steps; nothing to \
                     train (raise train.steps to train on)",
                    loaded.dir.display()
                );
            }
            return Ok(TrainSummary {
                steps,
                first_loss: f64::NAN,
                final_loss: f64::NAN,
                samples_per_sec: 0.0,
                step_ms: 0.0,
                checkpoint: Some(loaded.dir.clone()),
                pipeline: Vec::new(),
            });
        }
    }

    // The large flat buffers are reserved before burn builds the model, so memory that the
    // estimate missed ends as an error naming the buffer rather than an abort.
    let numel = spec.param_count(place.blocks.clone());
    let bytes = numel as u64 * 4;
    let alloc_err = |what, source| TrainError::Alloc {
        rank,
        what,
        bytes,
        source,
    };
    let mut master: Vec<f32> = Vec::new();
    master
        .try_reserve_exact(numel)
        .map_err(|e| alloc_err("master weights", e))?;
    let mut grads: Vec<f32> = Vec::new();
    grads
        .try_reserve_exact(numel)
        .map_err(|e| alloc_err("gradient buffer", e))?;
    let mut optimizer =
        FlatOptimizer::try_new(build::optimizer_kind(cfg), numel).map_err(|e| alloc_err("optimizer state", e))?;

    let local_rank = crate::env::DistEnv::from_env().map(|e| e.local_rank).unwrap_or(0);
    let mut base = crate::device::base_device(resolved.device, local_rank).map_err(|e| TrainError::Unsupported {
        rank,
        what: format!("train.device = {}", resolved.device),
        why: e.to_string(),
    })?;
    let compute = match cfg.precision.compute {
        ComputeDtype::F32 => None,
        ComputeDtype::Bf16 => Some(FloatDType::BF16),
        ComputeDtype::F16 => Some(FloatDType::F16),
    };
    if let Some(dtype) = compute {
        base.configure(dtype).map_err(|e| TrainError::Unsupported {
            rank,
            what: format!("precision.compute = {}", cfg.precision.compute),
            why: format!("{e:?}"),
        })?;
        if rank == 0 {
            tracing::info!(
                "mixed precision: forward and backward in {} on {}, f32 master weights and optimizer state, \
                 gradients reduced in f32{}{}",
                cfg.precision.compute,
                resolved.device,
                if cfg.precision.compute == ComputeDtype::F16 {
                    ", dynamic loss scaling"
                } else {
                    ""
                },
                if resolved.device.is_cpu() {
                    "; on CPU this saves memory, not time"
                } else {
                    ""
                }
            );
        }
    }
    let device = base.autodiff();
    let mut model =
        BlockStack::new_range(spec.clone(), place.blocks.clone(), cfg.train.seed, &device).map_err(model_err)?;
    let layout = ParamLayout::of(&model);
    let names: Vec<String> = layout.params.iter().map(|p| p.name.clone()).collect();
    let ranges: Vec<Range<usize>> = layout.params.iter().map(|p| p.range()).collect();
    let numels: Vec<usize> = layout.params.iter().map(|p| p.numel).collect();
    flatten_params_into(&model, &mut master).map_err(params_err)?;
    let bucket_cap = (cfg.comm.bucket_cap_mb * 1024.0 * 1024.0) as usize;
    let mut ddp = DataParallel::new(place.data_group.clone(), &numels, bucket_cap);
    let mut codec_ckpt = None; // The codec's state in checkpoints (residuals, PowerSGD's Q).
    if build::compressed(cfg) {
        let shapes: Vec<Vec<usize>> = layout.params.iter().map(|p| p.shape.clone()).collect();
        let codec = build_codec(&build::codec_options(cfg)).map_err(|e| TrainError::Sync {
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
    let spans = ParamSpan::from_numels(&names, &numels);

    // Resume, or start every replica from rank 0's parameters.
    let mut start_step = 0;
    let mut resumed_scale = None;
    if let Some(LoadedCheckpoint {
        dir,
        state,
        params,
        optim,
    }) = resume
    {
        model = load_params_by_name(model, |p| params.get(&p.name).map(|t| t.data.clone())).map_err(params_err)?;
        flatten_params_into(&model, &mut master).map_err(params_err)?;
        for (suffix, buffer) in optimizer.state_mut() {
            for (name, range) in names.iter().zip(&ranges) {
                if let Some(t) = optim.get(&format!("{name}.{suffix}")) {
                    if t.data.len() == range.len() {
                        buffer[range.clone()].copy_from_slice(&t.data);
                    }
                }
            }
        }
        if let (Some(slot), Some(codec)) = (&codec_ckpt, ddp.codec_mut()) {
            slot.load(&dir, codec)
                .map_err(|source| TrainError::Checkpoint { rank, source })?;
        }
        optimizer.set_steps(state.step);
        start_step = state.step;
        resumed_scale = Some((state.loss_scale, state.good_steps));
        if rank == 0 {
            tracing::info!("resumed from {} at step {}", dir.display(), state.step);
        }
    } else {
        ddp.broadcast_params(&mut master).map_err(comm_err)?;
        model = load_params(model, &master).map_err(params_err)?;
    }

    if let (Some(scaler), Some((scale, good))) = (&mut scaler, resumed_scale) {
        scaler.scale = scale;
        scaler.good_steps = good;
    }

    let sampler = DistributedSampler::new(
        dataset.len(),
        place.dims.data,
        place.replica,
        cfg.train.batch_size,
        cfg.train.seed,
        cfg.data.shuffle,
        cfg.data.drop_last,
    )
    .map_err(data_err)?;

    let mut pipeline = place.pipe_group.clone().map(PipelineStage::new);
    let micro_batches = cfg.parallel.micro_batches.max(1);
    let micro_size = resolved.micro_batch_size;
    let (first, last) = (place.blocks.start == 0, place.blocks.end == spec.num_blocks());
    if let Some(stage) = &mut pipeline {
        let input_width = dataset.input_width();
        let width = |block| spec.activation_width(block, input_width).map_err(model_err);
        let produces = [micro_size, width(place.blocks.end)?];
        let expects = [micro_size, width(place.blocks.start)?];
        stage
            .agree_shapes((!last).then_some(&produces[..]), (!first).then_some(&expects[..]))
            .map_err(|source| TrainError::Pipeline { rank, source })?;
    }
    let output_shape = [
        micro_size,
        spec.activation_width(place.blocks.end, dataset.input_width())
            .map_err(model_err)?,
    ];
    let kind = match cfg.parallel.schedule {
        PipelineSchedule::GPipe => ScheduleKind::GPipe,
        PipelineSchedule::OneFOneB => ScheduleKind::OneFOneB,
    };
    let actions: Vec<Action> = schedule(kind, place.stage, place.dims.pipeline, micro_batches);

    let progress_mode = match cfg.log.progress {
        ProgressChoice::Auto => ProgressMode::Auto,
        ProgressChoice::Bar => ProgressMode::Bar,
        ProgressChoice::Plain => ProgressMode::Plain,
        ProgressChoice::Off => ProgressMode::Off,
    };
    let progress = Progress::new(progress_mode, cfg.train.steps, start_step, rank == 0);
    let mut metrics = if rank == 0 && cfg.log.metrics {
        let path = Path::new(&cfg.train.out_dir).join("metrics.jsonl");
        Some(
            MetricsWriter::open_after(&path, start_step).map_err(|source| TrainError::Metrics {
                rank,
                path: path.display().to_string(),
                source,
            })?,
        )
    } else {
        None
    };

    let accum = cfg.train.grad_accum_steps.max(1);
    let global_batch = resolved.global_batch as f64;
    let log_every = cfg.log.every_steps.max(1);
    let mut window = vec![0f64; STAT_FIELDS];
    let mut window_steps = 0u64;
    let mut window_start = Instant::now();
    let (mut first_loss, mut final_loss) = (f64::NAN, f64::NAN);
    let run_start = Instant::now();
    let mut timed_from: Option<(Instant, u64)> = None;
    let mut pipeline_times = Vec::new();
    let mut last_ckpt = None;
    let stage_device = device.clone();

    for step in start_step..cfg.train.steps {
        if step == start_step + 1 {
            timed_from = Some((Instant::now(), step));
        }
        let bytes_before = world.bytes_sent();
        // Emptied, not zeroed: the first backward of the step writes into it (see StageRunner).
        grads.clear();
        let (mut loss_sum, mut loss_count, mut compute_secs, mut idle_ms) = (0.0f64, 0usize, 0.0f64, 0.0f64);
        for micro_step in 0..accum {
            let indices = sampler.step_indices(step * accum as u64 + micro_step as u64);
            let batch = dataset.batch(&indices, &stage_device).map_err(data_err)?;
            let mut runner = StageRunner::new(
                &model,
                place.blocks.clone(),
                stage_device.clone(),
                &batch,
                micro_size,
                first,
                last,
                &mut grads,
            );
            runner.loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            match &pipeline {
                Some(stage) => {
                    let times = stage
                        .run(&actions, Some(&output_shape), &mut runner)
                        .map_err(|source| TrainError::Pipeline { rank, source })?;
                    idle_ms += times.idle_ms;
                    pipeline_times.push(times);
                }
                None => {
                    use crate::parallel::StageCompute;
                    for m in 0..micro_batches {
                        runner
                            .forward(m, None)
                            .map_err(|source| TrainError::Pipeline { rank, source })?;
                        runner
                            .backward(m, None)
                            .map_err(|source| TrainError::Pipeline { rank, source })?;
                    }
                }
            }
            loss_sum += runner.loss_sum;
            loss_count += runner.loss_count;
            compute_secs += runner.compute_secs;
        }
        // Every stage runs a backward each step, so this only guards the layout.
        grads.resize(master.len(), 0.0);
        // The loss of a step is the mean over its micro-batches: scale the summed gradients alike.
        let scale = 1.0 / (accum * micro_batches) as f32;
        if scale != 1.0 {
            grads.iter_mut().for_each(|g| *g *= scale);
        }
        if loss_count > 0 && !(loss_sum / loss_count as f64).is_finite() {
            return Err(TrainError::NonFinite {
                rank,
                step: step + 1,
                loss: loss_sum / loss_count as f64,
            });
        }

        // Dynamic loss scaling: every rank agrees whether any gradient overflowed, and all skip.
        if let Some(scaler) = &mut scaler {
            let decision = scaler
                .check_and_update(Some(&world), step + 1, &grads, &spans)
                .map_err(|source| TrainError::Precision { rank, source })?;
            if decision.skip {
                if rank == 0 {
                    progress.println(&format!(
                        "burnrun: step {}: gradient overflow on rank(s) {:?} (first: {}); skipped, loss scale -> {}",
                        step + 1,
                        decision.overflow_ranks,
                        decision.first_overflow.as_deref().unwrap_or("?"),
                        decision.scale
                    ));
                }
                progress.tick(step + 1);
                continue;
            }
            scaler.unscale(&mut grads);
        }

        let sync = ddp
            .sync_flat(&mut grads, step)
            .map_err(|source| TrainError::Sync { rank, source })?;

        // Clip by the global norm: the stages' shares add up over the pipeline group.
        let mut sum_sq = sum_of_squares(&grads);
        if let Some(pipe) = &place.pipe_group {
            let mut total = [sum_sq];
            pipe.all_reduce(&mut total, ReduceOp::Sum).map_err(comm_err)?;
            sum_sq = total[0];
        }
        let grad_norm = clip_by_global_norm(&mut grads, sum_sq, cfg.optim.grad_clip_norm as f32);
        let lr = learning_rate(
            step,
            cfg.optim.lr as f32,
            cfg.optim.min_lr as f32,
            cfg.optim.warmup_steps,
            cfg.train.steps,
            cfg.optim.schedule == LrSchedule::Cosine,
        );
        optimizer.step(lr, &mut master, &grads);
        model = load_params(model, &master).map_err(params_err)?;
        progress.tick(step + 1);

        let stats = [
            loss_sum,
            loss_count as f64,
            compute_secs * 1e3,
            sync.comm_ms,
            sync.wait_ms,
            (world.bytes_sent() - bytes_before) as f64,
            grad_norm as f64,
            idle_ms,
        ];
        for (w, s) in window.iter_mut().zip(stats) {
            *w += s;
        }
        window_steps += 1;

        let done = step + 1;
        if done % log_every == 0 || done == cfg.train.steps {
            let mut m = gather_metrics(&world, &window, window_steps, window_start, global_batch, done, lr)
                .map_err(comm_err)?;
            if let Some(scaler) = &scaler {
                m.loss_scale = Some(scaler.scale as f64);
                m.skipped_steps = Some(scaler.skipped_steps);
            }
            m.compression_error = sync.compression_error.clone();
            if first_loss.is_nan() {
                first_loss = m.loss;
            }
            final_loss = m.loss;
            if let Some(writer) = &mut metrics {
                writer.write(&m).map_err(|source| TrainError::Metrics {
                    rank,
                    path: writer.path().display().to_string(),
                    source,
                })?;
            }
            progress.log(&m);
            window.iter_mut().for_each(|w| *w = 0.0);
            window_steps = 0;
            window_start = Instant::now();
        }

        let check_every = cfg.train.check_replicas_every;
        if check_every > 0 && done % check_every == 0 {
            ddp.check_replicas(done, &names, &master, &ranges)
                .map_err(|source| TrainError::Divergence { rank, source })?;
        }
        let every = cfg.checkpoint.every_steps;
        if (every > 0 && done % every == 0) || done == cfg.train.steps {
            let scale = scaler.as_ref().map_or((1.0, 0), |s| (s.scale, s.good_steps));
            let codec = codec_ckpt.as_ref().zip(ddp.codec());
            let dir = ckpt::step_dir(&ckpt_root, done);
            match save_checkpoint(
                &world, &place, &ckpt_root, cfg, done, scale, &layout, &master, &optimizer, codec,
            ) {
                Ok(()) => last_ckpt = Some(dir),
                Err(e) => {
                    // A partial step_N folder (a full disk, a peer that failed) would never be
                    // resumed from and only hold space: every rank that got here removes it.
                    ckpt::discard_incomplete(&dir);
                    return Err(e);
                }
            }
        }
    }
    progress.finish();
    if !pipeline_times.is_empty() {
        // Each stage reports its own timers (the first step, which includes warm-up, left out).
        let timed = if pipeline_times.len() > 1 {
            &pipeline_times[1..]
        } else {
            &pipeline_times[..]
        };
        let count = timed.len() as f64;
        let step_ms = timed.iter().map(|t| t.step_ms).sum::<f64>() / count;
        let idle_ms = timed.iter().map(|t| t.idle_ms).sum::<f64>() / count;
        let (p, m) = (place.dims.pipeline as f64, micro_batches as f64);
        tracing::info!(
            "pipeline stage {} of {}: schedule {}, {} micro-batches: step {step_ms:.2} ms, idle {idle_ms:.2} ms, \
             bubble {:.3} (theory (P-1)/(M+P-1) = {:.3}), peak held activations {}",
            place.stage,
            place.dims.pipeline,
            cfg.parallel.schedule,
            micro_batches,
            idle_ms / step_ms,
            (p - 1.0) / (m + p - 1.0),
            timed.iter().map(|t| t.peak_held).max().unwrap_or(0),
        );
    }
    let (samples_per_sec, step_ms) = match timed_from {
        Some((t0, s0)) if cfg.train.steps > s0 => {
            let secs = t0.elapsed().as_secs_f64();
            let steps = (cfg.train.steps - s0) as f64;
            (global_batch * steps / secs, secs * 1e3 / steps)
        }
        _ => (0.0, run_start.elapsed().as_secs_f64() * 1e3),
    };
    if rank == 0 {
        // Only finite numbers: a run whose steps were all skipped (loss scaler) logged no loss.
        let loss = if first_loss.is_finite() && final_loss.is_finite() {
            format!("loss {first_loss:.4} -> {final_loss:.4}")
        } else {
            "no loss logged".to_string()
        };
        let resumed = if start_step > 0 {
            format!(" (resumed at step {start_step})")
        } else {
            String::new()
        };
        progress.println(&format!(
            "burnrun: trained {} steps{resumed}: {loss}, {samples_per_sec:.0} samples/s",
            cfg.train.steps
        ));
    }
    Ok(TrainSummary {
        steps: cfg.train.steps,
        first_loss,
        final_loss,
        samples_per_sec,
        step_ms,
        checkpoint: last_ckpt,
        pipeline: pipeline_times,
    })
}

/// Sizes burn's CPU thread pool before the first tensor exists: `threads`, or with 0 the cores
/// shared out among this node's ranks (torchrun sets `OMP_NUM_THREADS=1` for the same reason:
/// ranks that each take every core fight over them).
fn configure_compute_threads(threads: usize) {
    let local = crate::env::DistEnv::from_env()
        .map(|e| e.local_world_size)
        .unwrap_or(1)
        .max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if threads == 0 { (cores / local).max(1) } else { threads };
    // A second call in one process (tests running several trainers) keeps the first pool.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
}

/// Lets the allocator keep the memory a step frees for the next step. Every step allocates and
/// frees the same few MB blocks (activations, gradient and parameter tensors); by default glibc
/// serves blocks over its mmap threshold with fresh mappings and trims the heap's free top, so
/// each step faulted its whole working set in again: on the benchmark MLP 280k page faults in 60
/// steps and a third of the step time. Blocks up to 32 MiB now come from the heap, and the heap is
/// trimmed only past 512 MiB of free top. Process-wide; repeated calls are harmless.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under the allocator's lock, so it is safe
    // with other threads allocating); both values are within glibc's accepted ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Rank 0 locks `train.out_dir` (see [`super::lock`]) and tells the other ranks whether it could,
/// so they stop too instead of waiting for it in the first collective.
fn lock_out_dir(world: &ProcessGroup, cfg: &RunConfig) -> Result<Option<OutDirLock>, TrainError> {
    let rank = world.rank();
    let dir = Path::new(&cfg.train.out_dir);
    let (mut lock, mut failure) = (None, None);
    if rank == 0 {
        let env = crate::env::DistEnv::from_env().ok().filter(|e| e.launched());
        let owner = LockOwner::this_process(env.as_ref().map(|e| e.run_id.as_str()));
        match OutDirLock::acquire(dir, &owner) {
            Ok(held) => lock = Some(held),
            Err(source) => failure = Some(source),
        }
    }
    if world.world_size() > 1 {
        let mut locked = [u8::from(failure.is_none())];
        world
            .broadcast(&mut locked, 0)
            .map_err(|source| TrainError::Comm { rank, source })?;
        if rank != 0 && locked[0] == 0 {
            return Err(TrainError::OutDirRefused {
                rank,
                dir: dir.display().to_string(),
            });
        }
    }
    match failure {
        Some(source) => Err(TrainError::OutDir { rank, source }),
        None => Ok(lock),
    }
}

/// The checkpoint this run resumes from, read and verified: `--resume PATH` (or
/// `checkpoint.path`) names a checkpoint folder (loaded as is: a corrupt one is an error) or a
/// folder of checkpoints; with `checkpoint.resume = true` alone, the latest under `root`, or none
/// (a fresh start, noted) when there is none yet, so one command both starts and restarts a job.
/// From a folder of checkpoints, a corrupt latest one falls back to the previous complete one.
fn find_resume(
    cfg: &RunConfig,
    options: &TrainOptions,
    root: &Path,
    rank: usize,
) -> Result<Option<LoadedCheckpoint>, TrainError> {
    let ck = |source| TrainError::Checkpoint { rank, source };
    let explicit: Option<PathBuf> = options.resume.clone().or_else(|| {
        cfg.checkpoint
            .path
            .as_ref()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    match explicit {
        Some(path) if path.join("state.json").is_file() => ckpt::load(&path).map(Some).map_err(ck),
        Some(path) if path.join("checkpoints").is_dir() => {
            ckpt::load_latest(&path.join("checkpoints"), rank).map(Some).map_err(ck)
        }
        Some(path) => ckpt::load_latest(&path, rank).map(Some).map_err(ck),
        None if cfg.checkpoint.resume => {
            if ckpt::complete_checkpoints(root).is_empty() {
                if rank == 0 {
                    tracing::info!(
                        "checkpoint.resume = true, but {} holds no complete checkpoint yet: starting from step 0",
                        root.display()
                    );
                }
                Ok(None)
            } else {
                ckpt::load_latest(root, rank).map(Some).map_err(ck)
            }
        }
        None => Ok(None),
    }
}

fn place(world: &ProcessGroup, resolved: &Resolved, spec: &ModelSpec) -> Result<Placement, TrainError> {
    let rank = world.rank();
    let cfg = &resolved.config;
    let comm_err = |source| TrainError::Comm { rank, source };
    let dims = ParallelDims::new(resolved.mesh.data, resolved.mesh.pipeline, world.world_size()).map_err(|e| {
        TrainError::Unsupported {
            rank,
            what: "parallel".into(),
            why: e.to_string(),
        }
    })?;
    let coords = dims.coords(rank);
    let blocks = stage_blocks(&cfg.parallel.partition, spec, dims.pipeline).map_err(|why| TrainError::Unsupported {
        rank,
        what: "parallel.partition".into(),
        why,
    })?;
    let (data_group, pipe_group) = if dims.pipeline == 1 {
        (world.clone(), None)
    } else {
        let data_group = world.split(&dims.data_colors()).map_err(comm_err)?;
        let pipe_group = world.split(&dims.pipeline_colors()).map_err(comm_err)?;
        (data_group, Some(pipe_group))
    };
    Ok(Placement {
        dims,
        replica: coords.data,
        stage: coords.stage,
        data_group,
        pipe_group,
        blocks: blocks[coords.stage].clone(),
    })
}

/// The block ranges of the stages.
pub fn stage_blocks(partition: &Partition, spec: &ModelSpec, stages: usize) -> Result<Vec<Range<usize>>, String> {
    let n = spec.num_blocks();
    if stages > n {
        return Err(format!("{stages} pipeline stages but the model has only {n} blocks"));
    }
    Ok(match partition {
        Partition::Balanced => partition_balanced(&spec.block_param_counts(), stages),
        Partition::Boundaries(starts) => {
            let mut bounds = vec![0];
            bounds.extend(starts.iter().copied());
            bounds.push(n);
            if bounds.len() != stages + 1 || bounds.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!(
                    "partition {starts:?} must give {} increasing first blocks within 1..{n} for {stages} stages",
                    stages - 1
                ));
            }
            bounds.windows(2).map(|w| w[0]..w[1]).collect()
        }
    })
}

fn announce(resolved: &Resolved, spec: &ModelSpec, place: &Placement, data: &dyn Dataset) {
    let cfg = &resolved.config;
    for note in &resolved.notes {
        tracing::warn!("config: {note}");
    }
    tracing::info!(
        "training {} ({} blocks) on {} samples of {} data: {} steps, global batch {} = {} x {} accum x {} replicas, \
         {} ranks (data {} x pipeline {}) on {}",
        spec.name(),
        spec.num_blocks(),
        data.len(),
        data.name(),
        cfg.train.steps,
        resolved.global_batch,
        cfg.train.batch_size,
        cfg.train.grad_accum_steps,
        place.dims.data,
        resolved.world_size,
        place.dims.data,
        place.dims.pipeline,
        resolved.device,
    );
    if place.dims.pipeline > 1 {
        let counts = spec.block_param_counts();
        if let Ok(all) = stage_blocks(&cfg.parallel.partition, spec, place.dims.pipeline) {
            for (s, r) in all.iter().enumerate() {
                let params: usize = counts[r.clone()].iter().sum();
                tracing::info!(
                    "pipeline stage {s}: blocks {}..{} ({params} parameters)",
                    r.start,
                    r.end
                );
            }
        }
    }
}

/// Gathers every rank's window numbers and turns them into one metrics line (on every rank).
fn gather_metrics(
    world: &ProcessGroup,
    window: &[f64],
    steps: u64,
    window_start: Instant,
    global_batch: f64,
    step: u64,
    lr: f32,
) -> Result<StepMetrics, crate::comm::CommError> {
    let n = world.world_size();
    let mut all = vec![0f64; STAT_FIELDS * n];
    world.all_gather(window, &mut all)?;
    let per_rank: Vec<&[f64]> = all.chunks(STAT_FIELDS).collect();
    let steps_f = steps.max(1) as f64;
    let loss_sum: f64 = per_rank.iter().map(|r| r[0]).sum();
    let loss_count: f64 = per_rank.iter().map(|r| r[1]).sum();
    let (slowest_rank, compute) = per_rank
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r[2]))
        .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
    let max = |i: usize| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max);
    let secs = window_start.elapsed().as_secs_f64();
    Ok(StepMetrics {
        step,
        loss: if loss_count > 0.0 {
            loss_sum / loss_count
        } else {
            f64::NAN
        },
        lr: lr as f64,
        samples_per_sec: global_batch * steps_f / secs.max(1e-9),
        step_ms: secs * 1e3 / steps_f,
        compute_ms: compute / steps_f,
        comm_ms: max(3) / steps_f,
        wait_ms: max(4) / steps_f,
        slowest_rank,
        grad_norm: per_rank[0][6] / steps_f,
        bubble_fraction: per_rank.iter().map(|r| r[7] / steps_f).sum::<f64>() / n as f64 / (secs * 1e3 / steps_f),
        wire_bytes: (per_rank.iter().map(|r| r[5]).sum::<f64>() / steps_f / n as f64) as u64,
        ..Default::default()
    })
}

/// Writes a checkpoint: replica 0 of every stage writes its tensors; rank 0 writes `state.json`
/// last, after a barrier, so the folder is complete only once every stage is on disk.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    world: &ProcessGroup,
    place: &Placement,
    root: &Path,
    cfg: &RunConfig,
    step: u64,
    scale: (f32, u64),
    layout: &ParamLayout,
    master: &[f32],
    optimizer: &FlatOptimizer,
    codec: Option<(&ckpt::CodecCheckpoint, &dyn crate::compress::GradCodec)>,
) -> Result<(), TrainError> {
    let rank = world.rank();
    let dir = ckpt::step_dir(root, step);
    let ck = |source| TrainError::Checkpoint { rank, source };
    if place.replica == 0 {
        let params: Vec<NamedTensor<'_>> = layout
            .params
            .iter()
            .map(|p| NamedTensor {
                name: &p.name,
                shape: &p.shape,
                data: &master[p.range()],
            })
            .collect();
        ckpt::write_tensors(&dir.join(format!("model-stage{}.safetensors", place.stage)), &params).map_err(ck)?;
        let state_names: Vec<(String, &[usize], &[f32])> = optimizer
            .state()
            .into_iter()
            .flat_map(|(suffix, buf)| {
                layout
                    .params
                    .iter()
                    .map(move |p| (format!("{}.{suffix}", p.name), p.shape.as_slice(), &buf[p.range()]))
            })
            .collect();
        let tensors: Vec<NamedTensor<'_>> = state_names
            .iter()
            .map(|(n, s, d)| NamedTensor {
                name: n,
                shape: s,
                data: d,
            })
            .collect();
        ckpt::write_tensors(&dir.join(format!("optim-stage{}.safetensors", place.stage)), &tensors).map_err(ck)?;
    }
    // Every rank's own codec state (residuals differ between ranks), before state.json.
    if let Some((slot, codec)) = codec {
        slot.save(&dir, codec).map_err(ck)?;
    }
    world.barrier().map_err(|source| TrainError::Comm { rank, source })?;
    if rank == 0 {
        let state = TrainState {
            step,
            micro_batches_seen: step * cfg.train.grad_accum_steps as u64,
            seed: cfg.train.seed,
            loss_scale: scale.0,
            good_steps: scale.1,
            pipeline_stages: place.dims.pipeline,
            data_replicas: place.dims.data,
            config: cfg.to_toml_string(),
            // Every rank's files are on disk (the barrier above): rank 0 hashes them all.
            checksums: ckpt::checksum_files(&dir).map_err(ck)?,
        };
        ckpt::write_state(&dir, &state).map_err(ck)?;
        ckpt::prune(root, cfg.checkpoint.keep_last).map_err(ck)?;
    }
    Ok(())
}
