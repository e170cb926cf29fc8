//! What a run tells: the start-up lines, the per-window metrics (gathered from every rank), the
//! progress bar, and the closing summary.

use std::path::Path;
use std::time::Instant;

use crate::comm::{CommError, ProcessGroup};
use crate::config::{Progress as ProgressChoice, Resolved};
use crate::parallel::StepTimes;

use super::metrics::{MetricsWriter, StepMetrics};
use super::progress::{Progress, ProgressMode};
use super::setup::Placement;
use super::TrainError;

/// Per-rank numbers gathered at every log step.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepStats {
    /// Sum of the step's micro-batch losses (last pipeline stage only).
    pub(crate) loss_sum: f64,
    /// Number of losses summed.
    pub(crate) loss_count: usize,
    /// Forward and backward, ms.
    pub(crate) compute_ms: f64,
    /// Gradient sync wall time, ms.
    pub(crate) comm_ms: f64,
    /// Gradient sync time the step was blocked on, ms.
    pub(crate) exposed_ms: f64,
    /// Bytes this rank sent during the step.
    pub(crate) wire_bytes: u64,
    /// Global gradient norm before clipping.
    pub(crate) grad_norm: f32,
    /// Pipeline idle time, ms.
    pub(crate) idle_ms: f64,
}

/// Number of values of a rank's window exchanged at each log step: the fields of [`StepStats`],
/// the rank's peak resident memory and its checkpoint stall.
const STAT_FIELDS: usize = 10;

/// Index of the peak resident memory in a window (not summed: the latest value is kept).
const PEAK_RSS: usize = 8;

/// Index of the time the window's checkpoints held the training thread, ms (summed).
const CHECKPOINT_STALL: usize = 9;

/// This process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`; 0 where it
/// cannot be read).
pub(crate) fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

impl StepStats {
    fn values(&self) -> [f64; PEAK_RSS] {
        [
            self.loss_sum,
            self.loss_count as f64,
            self.compute_ms,
            self.comm_ms,
            self.exposed_ms,
            self.wire_bytes as f64,
            self.grad_norm as f64,
            self.idle_ms,
        ]
    }
}

/// Rank 0's outputs (progress bar, metrics file) and every rank's logging window.
pub(crate) struct Reporter {
    pub(crate) progress: Progress,
    metrics: Option<MetricsWriter>,
    window: [f64; STAT_FIELDS],
    window_steps: u64,
    /// Checkpoints taken in the window (the same on every rank: all checkpoint at the same steps).
    window_checkpoints: u64,
    /// This rank's stall per checkpoint before the final one, ms.
    stalls_ms: Vec<f64>,
    /// The final checkpoint's stall, ms.
    final_stall_ms: Option<f64>,
    window_start: Instant,
    pub(crate) first_loss: f64,
    pub(crate) final_loss: f64,
    run_start: Instant,
    timed_from: Option<(Instant, u64)>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("window_steps", &self.window_steps)
            .finish()
    }
}

impl Reporter {
    /// The progress bar from `start_step`, and on rank 0 `metrics.jsonl` (appended after
    /// `start_step` on a resume).
    pub(crate) fn new(resolved: &Resolved, rank: usize, start_step: u64) -> Result<Self, TrainError> {
        let cfg = &resolved.config;
        let mode = match cfg.log.progress {
            ProgressChoice::Auto => ProgressMode::Auto,
            ProgressChoice::Bar => ProgressMode::Bar,
            ProgressChoice::Plain => ProgressMode::Plain,
            ProgressChoice::Off => ProgressMode::Off,
        };
        let metrics = if rank == 0 && cfg.log.metrics {
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
        Ok(Self {
            progress: Progress::new(mode, cfg.train.steps, start_step, rank == 0),
            metrics,
            window: [0.0; STAT_FIELDS],
            window_steps: 0,
            window_checkpoints: 0,
            stalls_ms: Vec::new(),
            final_stall_ms: None,
            window_start: Instant::now(),
            first_loss: f64::NAN,
            final_loss: f64::NAN,
            run_start: Instant::now(),
            timed_from: None,
        })
    }

    /// Called as step `step` starts: throughput is timed from the second step of the run on (the
    /// first one warms caches and allocators up).
    pub(crate) fn step_started(&mut self, step: u64, start_step: u64) {
        if step == start_step + 1 {
            self.timed_from = Some((Instant::now(), step));
        }
    }

    /// Adds a finished step to the window.
    pub(crate) fn add(&mut self, stats: &StepStats) {
        for (w, s) in self.window.iter_mut().zip(stats.values()) {
            *w += s;
        }
        self.window[PEAK_RSS] = peak_rss_bytes() as f64;
        self.window_steps += 1;
    }

    /// Adds a checkpoint that held the training thread `stall_ms` (`last`: the final one).
    pub(crate) fn add_checkpoint(&mut self, stall_ms: f64, last: bool) {
        self.window[CHECKPOINT_STALL] += stall_ms;
        self.window_checkpoints += 1;
        if last {
            self.final_stall_ms = Some(stall_ms);
        } else {
            self.stalls_ms.push(stall_ms);
        }
    }

    /// This rank's stall per checkpoint, in order, ms.
    pub(crate) fn checkpoint_stalls(&self) -> Vec<f64> {
        self.stalls_ms.iter().copied().chain(self.final_stall_ms).collect()
    }

    /// Gathers the window from every rank, writes the metrics line and starts a new window.
    /// Every rank calls it at the same steps (it is a collective).
    pub(crate) fn log(
        &mut self,
        world: &ProcessGroup,
        global_batch: f64,
        step: u64,
        lr: f32,
        extra: impl FnOnce(&mut StepMetrics),
    ) -> Result<(), TrainError> {
        let rank = world.rank();
        let window = Window {
            values: &self.window,
            steps: self.window_steps,
            checkpoints: self.window_checkpoints,
            start: self.window_start,
        };
        let mut m = gather_metrics(world, &window, global_batch, step, lr)
            .map_err(|source| TrainError::Comm { rank, source })?;
        extra(&mut m);
        if self.first_loss.is_nan() {
            self.first_loss = m.loss;
        }
        self.final_loss = m.loss;
        if let Some(writer) = &mut self.metrics {
            writer.write(&m).map_err(|source| TrainError::Metrics {
                rank,
                path: writer.path().display().to_string(),
                source,
            })?;
        }
        self.progress.log(&m);
        self.window = [0.0; STAT_FIELDS];
        self.window_steps = 0;
        self.window_checkpoints = 0;
        self.window_start = Instant::now();
        Ok(())
    }

    /// Global samples per second and mean step ms of the timed steps (all but the first).
    pub(crate) fn throughput(&self, global_batch: f64, steps: u64) -> (f64, f64) {
        match self.timed_from {
            Some((t0, s0)) if steps > s0 => {
                let secs = t0.elapsed().as_secs_f64();
                let count = (steps - s0) as f64;
                (global_batch * count / secs, secs * 1e3 / count)
            }
            _ => (0.0, self.run_start.elapsed().as_secs_f64() * 1e3),
        }
    }

    /// The closing line about checkpoints: how long they held rank 0's training thread.
    fn checkpoint_line(&self, async_write: bool) -> Option<String> {
        let mode = if async_write { "async" } else { "sync" };
        let count = self.stalls_ms.len() + usize::from(self.final_stall_ms.is_some());
        if count == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if !self.stalls_ms.is_empty() {
            let mut sorted = self.stalls_ms.clone();
            sorted.sort_by(f64::total_cmp);
            parts.push(format!(
                "training stalled {:.1} ms per checkpoint before the final one (median; max {:.1} ms)",
                sorted[sorted.len() / 2],
                sorted[sorted.len() - 1]
            ));
        }
        if let Some(last) = self.final_stall_ms {
            parts.push(format!(
                "{last:.1} ms for the final one{}",
                if async_write { ", always waited for" } else { "" }
            ));
        }
        Some(format!(
            "burnrun: {count} checkpoint(s), {mode}: {} (rank 0)",
            parts.join(", ")
        ))
    }

    /// The closing line on rank 0, and each pipeline stage's timers.
    pub(crate) fn finish(
        &self,
        resolved: &Resolved,
        place: &Placement,
        pipeline_times: &[StepTimes],
        start_step: u64,
        samples_per_sec: f64,
    ) {
        self.progress.finish();
        let cfg = &resolved.config;
        if !pipeline_times.is_empty() {
            // Each stage reports its own timers (the first step, which includes warm-up, left out).
            let timed = if pipeline_times.len() > 1 {
                &pipeline_times[1..]
            } else {
                pipeline_times
            };
            let count = timed.len() as f64;
            let step_ms = timed.iter().map(|t| t.step_ms).sum::<f64>() / count;
            let idle_ms = timed.iter().map(|t| t.idle_ms).sum::<f64>() / count;
            let micro_batches = cfg.parallel.micro_batches.max(1);
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
        if place.rank == 0 {
            // Only finite numbers: a run whose steps were all skipped (loss scaler) logged no loss.
            let loss = if self.first_loss.is_finite() && self.final_loss.is_finite() {
                format!("loss {:.4} -> {:.4}", self.first_loss, self.final_loss)
            } else {
                "no loss logged".to_string()
            };
            let resumed = if start_step > 0 {
                format!(" (resumed at step {start_step})")
            } else {
                String::new()
            };
            self.progress.println(&format!(
                "burnrun: trained {} steps{resumed}: {loss}, {samples_per_sec:.0} samples/s, peak RSS {:.0} MiB (rank 0)",
                cfg.train.steps,
                peak_rss_bytes() as f64 / (1024.0 * 1024.0)
            ));
            if let Some(line) = self.checkpoint_line(cfg.checkpoint.async_write) {
                self.progress.println(&line);
            }
        }
    }
}

/// The start-up lines on rank 0: config notes, what is trained on what mesh, the stages.
pub(crate) fn announce(resolved: &Resolved, what: &str, place: &Placement, block_counts: Option<&[usize]>) {
    let cfg = &resolved.config;
    for note in &resolved.notes {
        tracing::warn!("config: {note}");
    }
    tracing::info!(
        "training {what}: {} steps, global batch {} = {} x {} accum x {} replicas, {} ranks (data {} x tensor {} x \
         pipeline {}) on {}",
        cfg.train.steps,
        resolved.global_batch,
        cfg.train.batch_size,
        cfg.train.grad_accum_steps,
        place.dims.data,
        resolved.world_size,
        place.dims.data,
        place.dims.tensor,
        place.dims.pipeline,
        resolved.device,
    );
    if let (true, Some(counts)) = (place.dims.pipeline > 1, block_counts) {
        for (s, r) in place.all_blocks.iter().enumerate() {
            let params: usize = counts[r.clone()].iter().sum();
            tracing::info!(
                "pipeline stage {s}: blocks {}..{} ({params} parameters)",
                r.start,
                r.end
            );
        }
    }
}

/// A rank's logging window: its summed values, its steps and checkpoints, and when it began.
struct Window<'a> {
    values: &'a [f64],
    steps: u64,
    checkpoints: u64,
    start: Instant,
}

/// Gathers every rank's window numbers and turns them into one metrics line (on every rank).
fn gather_metrics(
    world: &ProcessGroup,
    window: &Window<'_>,
    global_batch: f64,
    step: u64,
    lr: f32,
) -> Result<StepMetrics, CommError> {
    let (steps, window_start) = (window.steps, window.start);
    let n = world.world_size();
    let mut all = vec![0f64; STAT_FIELDS * n];
    world.all_gather(window.values, &mut all)?;
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
        exposed_comm_ms: max(4) / steps_f,
        slowest_rank,
        grad_norm: per_rank[0][6] / steps_f,
        bubble_fraction: per_rank.iter().map(|r| r[7] / steps_f).sum::<f64>() / n as f64 / (secs * 1e3 / steps_f),
        wire_bytes: (per_rank.iter().map(|r| r[5]).sum::<f64>() / steps_f / n as f64) as u64,
        peak_rss_mb: max(PEAK_RSS) / (1024.0 * 1024.0),
        checkpoint_stall_ms: (window.checkpoints > 0).then(|| max(CHECKPOINT_STALL) / window.checkpoints as f64),
        ..Default::default()
    })
}
