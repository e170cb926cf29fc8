//! `metrics.jsonl`: one JSON object per logged step, aggregated over every rank.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One logged step.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Mean training loss over the step's global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global samples per second over the logging window.
    pub samples_per_sec: f64,
    /// Mean wall time of a step over the window, in milliseconds.
    pub step_ms: f64,
    /// Mean time in forward and backward per step (max over ranks), in milliseconds.
    pub compute_ms: f64,
    /// Mean wall time of gradient synchronisation per step, from the first bucket's launch to
    /// the last one's completion (max over ranks), in milliseconds. Overlapped with backward when
    /// the model is a block chain (`comm.overlap`).
    pub comm_ms: f64,
    /// The part of `comm_ms` the step was blocked on, not hidden behind backward (max over
    /// ranks), in milliseconds: equal to `comm_ms` without overlap.
    pub exposed_comm_ms: f64,
    /// Rank whose compute was slowest over the window (straggler attribution).
    pub slowest_rank: usize,
    /// Pipeline bubble: mean over ranks of the time blocked waiting for activations or
    /// gradients, as a fraction of the step (0 without a pipeline).
    pub bubble_fraction: f64,
    /// Gradient global norm before clipping.
    pub grad_norm: f64,
    /// Bytes this rank sent for gradient synchronisation per step.
    pub wire_bytes: u64,
    /// Peak resident memory of the largest rank so far (RSS; `VmHWM`), MiB.
    pub peak_rss_mb: f64,
    /// Dynamic loss scale, when used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps skipped by the loss scaler so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// Relative compression error per bucket (norm of what was lost / norm of the gradient).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compression_error: Vec<f64>,
    /// Time a checkpoint held the training thread, per checkpoint of the window (max over
    /// ranks), in milliseconds; only in lines whose window holds a checkpoint. The whole write
    /// without `checkpoint.async`; with it, the wait for the previous write and the copy, and the
    /// whole write for the final checkpoint (always waited for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_stall_ms: Option<f64>,
}

/// Appends metrics lines to a file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens for a run that starts after step `start_step` (0 for a fresh run): lines of later
    /// steps, left by a run that logged past its last checkpoint before it stopped, are dropped
    /// first, so the steps this run logs again appear once. Lines that are not metrics are kept.
    pub fn open_after(path: &Path, start_step: u64) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let logged_later = |line: &str| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|step| step > start_step)
                };
                if text.lines().any(logged_later) {
                    let kept: String = text
                        .lines()
                        .filter(|line| !logged_later(line))
                        .map(|line| format!("{line}\n"))
                        .collect();
                    // Written aside and renamed: a crash here leaves the old file or the new one.
                    let tmp = path.with_extension("jsonl.tmp");
                    std::fs::write(&tmp, kept)?;
                    std::fs::rename(&tmp, path)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Self::open(path)
    }

    /// Opens (appending: a resumed run continues the same file).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes one line and flushes it (a crash loses at most the current line).
    pub fn write(&mut self, metrics: &StepMetrics) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, metrics)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
