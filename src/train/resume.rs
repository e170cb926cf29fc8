//! Checkpoints of a run: finding the one to resume from, loading it into the model, the master
//! weights, the optimizer, the codec and the loss scaler, and writing one.

use std::path::{Path, PathBuf};

use crate::comm::ProcessGroup;
use crate::config::RunConfig;
use crate::parallel::ParamLayout;

use super::checkpoint::{self as ckpt, LoadedCheckpoint, NamedTensor, TrainState};
use super::optim::FlatOptimizer;
use super::setup::Placement;
use super::{TrainError, TrainOptions};

/// The checkpoint this run resumes from, read and verified: `--resume PATH` (or
/// `checkpoint.path`) names a checkpoint folder (loaded as is: a corrupt one is an error) or a
/// folder of checkpoints; with `checkpoint.resume = true` alone, the latest under `root`, or none
/// (a fresh start, noted) when there is none yet, so one command both starts and restarts a job.
/// From a folder of checkpoints, a corrupt latest one falls back to the previous complete one.
pub(crate) fn find_resume(
    cfg: &RunConfig,
    options: &TrainOptions,
    root: &Path,
    rank: usize,
) -> Result<Option<LoadedCheckpoint>, TrainError> {
    let ck = |source| TrainError::Checkpoint { rank, source };
    // A job the launcher restarted (`--max-restarts`) goes on from its own latest checkpoint,
    // whatever it was started from: that is where the failed attempt got to.
    let restart = crate::env::restart_count();
    if restart > 0 && !ckpt::complete_checkpoints(root).is_empty() {
        let loaded = ckpt::load_latest(root, rank).map_err(ck)?;
        if rank == 0 {
            tracing::info!(
                "restart {restart}: resuming from the latest checkpoint, {} (step {})",
                loaded.dir.display(),
                loaded.state.step
            );
        }
        return Ok(Some(loaded));
    }
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

/// A resume of a finished run: `Ok(true)` when there is nothing left to train (noted on rank 0),
/// an error when the checkpoint is past `train.steps`.
pub(crate) fn already_done(loaded: &LoadedCheckpoint, cfg: &RunConfig, rank: usize) -> Result<bool, TrainError> {
    let (step, steps) = (loaded.state.step, cfg.train.steps);
    if step > steps {
        return Err(TrainError::PastEnd {
            rank,
            checkpoint: loaded.dir.display().to_string(),
            step,
            steps,
        });
    }
    if step == steps && rank == 0 {
        eprintln!(
            "burnrun: the run is already complete: checkpoint {} is at step {step} = train.steps; nothing to \
             train (raise train.steps to train on)",
            loaded.dir.display()
        );
    }
    Ok(step == steps)
}

/// Copies the optimizer state of a checkpoint into `optimizer`, parameter by parameter (a
/// parameter this rank holds but the checkpoint lacks, or of another size, keeps fresh state).
pub(crate) fn load_optimizer(optimizer: &mut FlatOptimizer, layout: &ParamLayout, loaded: &LoadedCheckpoint) {
    for (suffix, buffer) in optimizer.state_mut() {
        for p in &layout.params {
            if let Some(t) = loaded.optim.get(&format!("{}.{suffix}", p.name)) {
                if t.data.len() == p.numel {
                    buffer[p.range()].copy_from_slice(&t.data);
                }
            }
        }
    }
    optimizer.set_steps(loaded.state.step);
}

/// What a checkpoint holds besides the parameters and the optimizer.
pub(crate) struct SaveExtras<'a> {
    /// Dynamic loss scale and its good-step count (`(1, 0)` without a scaler).
    pub(crate) scale: (f32, u64),
    /// The codec's state slot and the codec, when gradients are compressed.
    pub(crate) codec: Option<(&'a ckpt::CodecCheckpoint, &'a dyn crate::compress::GradCodec)>,
    /// The state of a codec running on the device, saved in place of the host codec's.
    pub(crate) device_codec_state: Option<Vec<crate::compress::StateTensor>>,
}

/// Writes a checkpoint: replica 0 of every stage writes its tensors; rank 0 writes `state.json`
/// last, after a barrier, so the folder is complete only once every stage is on disk. A failure
/// removes the partial folder (a full disk, a peer that failed): it would never be resumed from
/// and would only hold space.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save(
    world: &ProcessGroup,
    place: &Placement,
    root: &Path,
    cfg: &RunConfig,
    step: u64,
    layout: &ParamLayout,
    master: &[f32],
    optimizer: &FlatOptimizer,
    extras: SaveExtras<'_>,
) -> Result<PathBuf, TrainError> {
    let dir = ckpt::step_dir(root, step);
    let written = (|| -> Result<(), TrainError> {
        let rank = world.rank();
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
        match (extras.codec, &extras.device_codec_state) {
            (Some((slot, codec)), Some(state)) => slot.save_state(&dir, &codec.describe(), state).map_err(ck)?,
            (Some((slot, codec)), None) => slot.save(&dir, codec).map_err(ck)?,
            (None, _) => {}
        }
        world.barrier().map_err(|source| TrainError::Comm { rank, source })?;
        if rank == 0 {
            let state = TrainState {
                step,
                micro_batches_seen: step * cfg.train.grad_accum_steps as u64,
                seed: cfg.train.seed,
                loss_scale: extras.scale.0,
                good_steps: extras.scale.1,
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
    })();
    match written {
        Ok(()) => Ok(dir),
        Err(e) => {
            ckpt::discard_incomplete(&dir);
            Err(e)
        }
    }
}
