//! Checkpoints of a run: finding the one to resume from, loading it into the model, the master
//! weights, the optimizer, the codec and the loss scaler, and writing one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::comm::ProcessGroup;
use crate::compress::StateTensor;
use crate::config::RunConfig;
use crate::parallel::tensor::TensorSplit;
use crate::parallel::zero::ShardLayout;
use crate::parallel::ParamLayout;

use super::checkpoint::{self as ckpt, CheckpointError, LoadedCheckpoint, NamedTensor, TrainState};
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
/// With ZeRO (`shard`) only the elements this rank owns: the checkpoint holds whole tensors
/// (shards saved by another layout were joined when it was read), so any layout loads any other.
pub(crate) fn load_optimizer(
    optimizer: &mut FlatOptimizer,
    layout: &ParamLayout,
    shard: Option<&ShardLayout>,
    loaded: &LoadedCheckpoint,
) {
    for (suffix, buffer) in optimizer.state_mut() {
        for p in &layout.params {
            let Some(t) = loaded.optim.get(&format!("{}.{suffix}", p.name)) else {
                continue;
            };
            if t.data.len() != p.numel {
                continue;
            }
            match shard {
                None => buffer[p.range()].copy_from_slice(&t.data),
                Some(shard) => {
                    for (elements, state) in shard.owned_within(p.range()) {
                        let from = elements.start - p.offset..elements.end - p.offset;
                        buffer[state..state + elements.len()].copy_from_slice(&t.data[from]);
                    }
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
    pub(crate) device_codec_state: Option<Vec<StateTensor>>,
    /// ZeRO: the share of the optimizer state this rank holds.
    pub(crate) shard: Option<&'a ShardLayout>,
    /// ZeRO-3: the master weights are this rank's share too.
    pub(crate) params_sharded: bool,
    /// Tensor parallelism: this rank's slices.
    pub(crate) tensor: Option<TensorPart<'a>>,
}

/// What one rank writes into a checkpoint folder: replica 0 of each pipeline stage writes its
/// stage's parameters and optimizer state, every rank its own codec state. Borrowed from the live
/// buffers (a synchronous save) or from a copy of them (an asynchronous one).
pub(crate) struct RankPart<'a> {
    /// Whether this rank writes its stage's model and optimizer files (replica 0 does).
    pub(crate) writes_stage: bool,
    /// The rank's pipeline stage.
    pub(crate) stage: usize,
    /// Where each parameter lies in `master` and in the optimizer's buffers.
    pub(crate) layout: &'a ParamLayout,
    /// The f32 master weights, layout order (empty when `writes_stage` is false).
    pub(crate) master: &'a [f32],
    /// The optimizer's buffers by name suffix (`exp_avg`, `exp_avg_sq`), layout order; with
    /// `shard`, this rank's share of them.
    pub(crate) optim: Vec<(&'a str, &'a [f32])>,
    /// ZeRO: the share of the optimizer state this rank holds (and writes, whatever its replica).
    pub(crate) shard: Option<&'a ShardLayout>,
    /// ZeRO-3: `master` is this rank's share of the parameters (laid out as the optimizer
    /// state), which it writes as slices, whatever its replica.
    pub(crate) params_sharded: bool,
    /// Tensor parallelism: this rank's slices, written beside the other ranks'.
    pub(crate) tensor: Option<TensorPart<'a>>,
    /// The codec's slot, description and state, when gradients are compressed.
    pub(crate) codec: Option<CodecPart<'a>>,
}

/// A tensor-parallel rank's part of a checkpoint: its rank and, per parameter (layout order),
/// where its slice lies in the full parameter (`None`: replicated, written by rank 0).
#[derive(Clone, Copy)]
pub(crate) struct TensorPart<'a> {
    pub(crate) rank: usize,
    pub(crate) splits: &'a [Option<TensorSplit>],
}

/// A rank's gradient-codec state as a checkpoint holds it.
pub(crate) struct CodecPart<'a> {
    /// Where this rank's codec state goes and what it must match to load.
    pub(crate) slot: &'a ckpt::CodecCheckpoint,
    /// The codec's [`crate::compress::GradCodec::describe`].
    pub(crate) describe: &'a str,
    /// Its tensors: the codec's own copy (`GradCodec::state`, a device codec's read-back), or
    /// borrowed from a snapshot.
    pub(crate) state: Cow<'a, [StateTensor]>,
}

/// Writes this rank's `part` of the checkpoint into `dir`, each file atomically; returns the
/// sha256 (hex) of every file written, by file name.
pub(crate) fn write_part(dir: &Path, part: &RankPart<'_>) -> Result<BTreeMap<String, String>, CheckpointError> {
    let mut written = BTreeMap::new();
    let mut record = |path: PathBuf, digest: String| {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        written.insert(name, digest);
    };
    if let Some(shard) = part.shard.filter(|_| part.params_sharded) {
        let slices: Vec<(String, Vec<usize>, &[f32])> = part
            .layout
            .params
            .iter()
            .flat_map(|p| {
                shard.owned_within(p.range()).map(move |(elements, state)| {
                    (
                        ckpt::shard_tensor_name(&p.name, elements.start - p.offset),
                        vec![elements.len()],
                        &part.master[state..state + elements.len()],
                    )
                })
            })
            .collect();
        let named: Vec<NamedTensor<'_>> = slices
            .iter()
            .map(|(name, shape, data)| NamedTensor { name, shape, data })
            .collect();
        let shapes = part.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice()));
        let path = dir.join(format!("model-stage{}-shard{}.safetensors", part.stage, shard.index));
        let digest = ckpt::write_param_slices(&path, &named, shapes, std::iter::empty())?;
        record(path, digest);
    } else if let Some(tp) = part.tensor.as_ref().filter(|_| part.writes_stage) {
        // Tensor parallelism: each rank its slices (`<param>@tp<rank>`), rank 0 the replicated
        // parameters too; a load joins them by the splits in the headers.
        let mut files = vec![("model", vec![("", part.master)])];
        files.push(("optim", part.optim.iter().map(|&(suffix, b)| (suffix, b)).collect()));
        for (kind, buffers) in files {
            let mut names = Vec::new();
            for (suffix, buffer) in &buffers {
                for (p, split) in part.layout.params.iter().zip(tp.splits) {
                    let base = if suffix.is_empty() {
                        p.name.clone()
                    } else {
                        format!("{}.{suffix}", p.name)
                    };
                    match split {
                        Some(split) => names.push((
                            ckpt::tensor_slice_name(&base, tp.rank),
                            p.shape.clone(),
                            &buffer[p.range()],
                            Some(split),
                        )),
                        None if tp.rank == 0 => names.push((base, p.shape.clone(), &buffer[p.range()], None)),
                        None => {}
                    }
                }
            }
            let named: Vec<NamedTensor<'_>> = names
                .iter()
                .map(|(name, shape, data, _)| NamedTensor { name, shape, data })
                .collect();
            let shapes = part
                .layout
                .params
                .iter()
                .zip(tp.splits)
                .filter_map(|(p, split)| split.as_ref().map(|s| (p.name.as_str(), s.full_shape.as_slice())));
            let splits = names
                .iter()
                .filter_map(|(name, _, _, split)| split.map(|s| (name.clone(), s)));
            let path = dir.join(format!("{kind}-stage{}-tp{}.safetensors", part.stage, tp.rank));
            let digest = ckpt::write_param_slices(&path, &named, shapes, splits)?;
            record(path, digest);
        }
    } else if part.writes_stage {
        let params: Vec<NamedTensor<'_>> = part
            .layout
            .params
            .iter()
            .map(|p| NamedTensor {
                name: &p.name,
                shape: &p.shape,
                data: &part.master[p.range()],
            })
            .collect();
        let path = dir.join(format!("model-stage{}.safetensors", part.stage));
        let digest = ckpt::write_tensors(&path, &params)?;
        record(path, digest);
    }
    if let Some(shard) = part.shard {
        // Each replica its slices of each parameter's state, named by where they start in it.
        let slices = part
            .optim
            .iter()
            .flat_map(|&(suffix, buf)| {
                part.layout.params.iter().flat_map(move |p| {
                    shard.owned_within(p.range()).map(move |(elements, state)| {
                        (
                            ckpt::shard_tensor_name(&format!("{}.{suffix}", p.name), elements.start - p.offset),
                            vec![elements.len()],
                            &buf[state..state + elements.len()],
                        )
                    })
                })
            })
            .collect();
        let path = dir.join(format!("optim-stage{}-shard{}.safetensors", part.stage, shard.index));
        let digest = write_owned_names(&path, slices)?;
        record(path, digest);
    } else if part.writes_stage && part.tensor.is_none() {
        let state = part
            .optim
            .iter()
            .flat_map(|&(suffix, buf)| {
                part.layout
                    .params
                    .iter()
                    .map(move |p| (format!("{}.{suffix}", p.name), p.shape.clone(), &buf[p.range()]))
            })
            .collect();
        let path = dir.join(format!("optim-stage{}.safetensors", part.stage));
        let digest = write_owned_names(&path, state)?;
        record(path, digest);
    }
    // Every rank's own codec state (residuals differ between ranks), before state.json.
    if let Some(codec) = &part.codec {
        let digest = codec.slot.save_state(dir, codec.describe, &codec.state)?;
        record(codec.slot.file(dir), digest);
    }
    Ok(written)
}

/// [`ckpt::write_tensors`] of tensors whose names and shapes are built on the fly.
fn write_owned_names(path: &Path, tensors: Vec<(String, Vec<usize>, &[f32])>) -> Result<String, CheckpointError> {
    let named: Vec<NamedTensor<'_>> = tensors
        .iter()
        .map(|(name, shape, data)| NamedTensor { name, shape, data })
        .collect();
    ckpt::write_tensors(path, &named)
}

/// The `state.json` of the checkpoint of step `step` (its checksums still empty).
pub(crate) fn train_state(cfg: &RunConfig, place: &Placement, step: u64, scale: (f32, u64)) -> TrainState {
    TrainState {
        step,
        micro_batches_seen: step * cfg.train.grad_accum_steps as u64,
        seed: cfg.train.seed,
        loss_scale: scale.0,
        good_steps: scale.1,
        pipeline_stages: place.dims.pipeline,
        data_replicas: place.dims.data,
        config: cfg.to_toml_string(),
        checksums: BTreeMap::new(),
    }
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
    optim: Vec<(&str, &[f32])>,
    extras: SaveExtras<'_>,
) -> Result<PathBuf, TrainError> {
    let dir = ckpt::step_dir(root, step);
    let written = (|| -> Result<(), TrainError> {
        let rank = world.rank();
        let ck = |source| TrainError::Checkpoint { rank, source };
        let codec_state = match (extras.codec, extras.device_codec_state) {
            (Some((slot, codec)), state) => Some((slot, codec.describe(), state.unwrap_or_else(|| codec.state()))),
            (None, _) => None,
        };
        let part = RankPart {
            writes_stage: place.replica == 0,
            stage: place.stage,
            layout,
            master,
            optim,
            shard: extras.shard,
            params_sharded: extras.params_sharded,
            tensor: extras.tensor,
            codec: codec_state.as_ref().map(|(slot, describe, state)| CodecPart {
                slot,
                describe,
                state: Cow::Borrowed(state.as_slice()),
            }),
        };
        let own = write_part(&dir, &part).map_err(ck);
        // Every rank says whether its part is on disk, failed or not: the folder is removed only
        // after that, by rank 0, so no rank finds it gone while still writing into it.
        let mut failed = vec![0u8; world.world_size()];
        world
            .all_gather(&[u8::from(own.is_err())], &mut failed)
            .map_err(|source| TrainError::Comm { rank, source })?;
        own?;
        let peers: Vec<usize> = (0..failed.len()).filter(|&r| failed[r] != 0).collect();
        if !peers.is_empty() {
            return Err(ck(CheckpointError::PeersFailed {
                dir: dir.clone(),
                peers,
            }));
        }
        if rank == 0 {
            let mut state = train_state(cfg, place, step, extras.scale);
            // Every rank's files are on disk (the barrier above): rank 0 hashes them all.
            state.checksums = ckpt::checksum_files(&dir).map_err(ck)?;
            ckpt::write_state(&dir, &state).map_err(ck)?;
            ckpt::prune(root, cfg.checkpoint.keep_last).map_err(ck)?;
        }
        Ok(())
    })();
    match written {
        Ok(()) => Ok(dir),
        Err(e) => {
            // Rank 0 only: a peer may still be writing if the agreement above never happened,
            // and an incomplete folder (no state.json) is never loaded anyway.
            if world.rank() == 0 {
                ckpt::discard_incomplete(&dir);
            }
            Err(e)
        }
    }
}
