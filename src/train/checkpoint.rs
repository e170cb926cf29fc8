//! Checkpoints: safetensors files of named tensors, written atomically, resharded by name.
//!
//! Layout: `<out_dir>/checkpoints/step_<N>/`
//! - `model-stage<S>.safetensors`: the parameters of pipeline stage S (all of them when there is
//!   one stage), named by module path (`blocks.0.linear.weight`), so PyTorch's
//!   `safetensors.torch.load_file` reads them;
//! - `optim-stage<S>.safetensors`: optimizer state, `<param>.exp_avg`, `<param>.exp_avg_sq`;
//!   with ZeRO (`parallel.shard`) every replica writes its share instead,
//!   `optim-stage<S>-shard<I>.safetensors`, as 1-D slices `<param>.exp_avg@<first element>`; a
//!   load joins every file's slices into whole tensors (an error names a tensor they do not
//!   cover), so a sharded checkpoint loads into any layout and any layout into a sharded run;
//! - with ZeRO-3 (`parallel.shard = "parameters"`) no rank holds a stage's whole parameters: every
//!   replica writes `model-stage<S>-shard<I>.safetensors` instead, 1-D slices `<param>@<first
//!   element>` with each parameter's shape in the header (`shape:<param>`), joined on load like
//!   the optimizer's;
//! - `codec-rank<R>.safetensors` (runs with `[compression]`): rank R's gradient-codec state, its
//!   error-feedback residuals and PowerSGD's warm-started Q factors ([`CodecCheckpoint`]). Every
//!   rank writes its own: residuals differ between ranks;
//! - `state.json`: step, data position, seeds, loss scale, the config; written LAST, so a folder
//!   without it is an incomplete checkpoint and is never resumed from.
//!
//! With `checkpoint.async = true` a writer thread writes the same files from a copy of the
//! training buffers while training goes on, and `state.json` still comes last, once every rank's
//! files are durable (`checkpoint_writer.rs`).
//!
//! Every file is written to a temporary name, fsynced, and renamed; the folder is fsynced after.
//! A write that fails (a full disk) removes its temporary file, and the trainer then removes the
//! incomplete `step_N` folder, so a failed checkpoint leaves no space taken behind.
//!
//! `state.json` records the sha256 of every file of the folder; loading verifies them, so a
//! truncated or silently corrupted file is caught (a checkpoint saved before checksums existed
//! has none and loads unverified). Resuming from the latest checkpoint falls back to the previous
//! complete one, with a warning naming the corrupt file, when the latest cannot be loaded.
//! Loading reads every stage file and picks tensors by name, so a checkpoint saved with one
//! pipeline layout loads into another with no conversion step.
//!
//! Codec state is the exception: it is per rank, so it loads only into the same rank of a job of
//! the same mesh (`data x pipeline`), with the same `[compression]` config and gradient buckets.
//! A resume that changes any of these (another world size, method, ratio, rank, seed, start step,
//! `comm.bucket_cap_mb`) drops it with a warning on each rank and goes on from zero residuals and
//! freshly seeded PowerSGD factors, as a new run would; the run then no longer matches an
//! uninterrupted one exactly, but trains normally.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compress::{GradCodec, StateTensor};
use crate::parallel::tensor::TensorSplit;

/// Errors reading or writing checkpoints; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system error.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The disk (or the quota) is full: the write failed and its temporary file was removed.
    #[error(
        "checkpoint {path}: the disk is full ({source}); free space there or set train.out_dir to a disk with room"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// The error (ENOSPC or EDQUOT).
        source: std::io::Error,
    },
    /// A file's sha256 differs from the one `state.json` recorded when the checkpoint was saved.
    #[error("checkpoint {path}: corrupt: its sha256 is {actual}, state.json recorded {expected}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The recorded digest (hex).
        expected: String,
        /// The digest of the file as it is now (hex).
        actual: String,
    },
    /// The safetensors data is malformed.
    #[error("checkpoint {path}: not a valid safetensors file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A tensor the model needs is missing or has another shape.
    #[error("checkpoint {dir}: tensor `{name}` {problem}")]
    Tensor {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The tensor.
        name: String,
        /// Missing, or the shapes.
        problem: String,
    },
    /// Other ranks could not write their part of a checkpoint this rank took part in.
    #[error(
        "checkpoint {dir}: rank(s) {peers:?} could not write their part (each one's own error names its file); not marked complete"
    )]
    PeersFailed {
        /// The checkpoint folder.
        dir: PathBuf,
        /// The ranks that failed.
        peers: Vec<usize>,
    },
    /// No complete checkpoint to resume from.
    #[error("no complete checkpoint (a step_N folder with state.json) under {0}")]
    NoneFound(PathBuf),
    /// `state.json` is malformed.
    #[error("checkpoint {path}: bad state.json: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A named f32 tensor to save.
#[derive(Debug, Clone, Copy)]
pub struct NamedTensor<'a> {
    /// Module path.
    pub name: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// Values, row-major.
    pub data: &'a [f32],
}

/// Everything beside the tensors that a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed so far per data-parallel rank (the data position).
    pub micro_batches_seen: u64,
    /// The run's seed.
    pub seed: u64,
    /// Current dynamic loss scale (1 when unused).
    pub loss_scale: f32,
    /// Steps since the last overflow (loss-scaler growth counter).
    pub good_steps: u64,
    /// Pipeline stages of the run that saved it.
    pub pipeline_stages: usize,
    /// Data-parallel replicas of the run that saved it.
    pub data_replicas: usize,
    /// The resolved config, as TOML.
    pub config: String,
    /// The sha256 (hex) of each file of the folder by file name, state.json excepted; empty in
    /// checkpoints saved before checksums existed (those load unverified).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
}

/// Folder of the checkpoint at `step`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step_{step:08}"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| {
        let path = path.to_path_buf();
        if is_disk_full(&source) {
            CheckpointError::DiskFull { path, source }
        } else {
            CheckpointError::Io { path, source }
        }
    }
}

/// Whether an I/O error means "no space left" (ENOSPC), or no quota left (EDQUOT).
fn is_disk_full(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder. On
/// failure the temporary file is removed: on a full disk it would keep the space the next
/// checkpoint (or anything else) needs.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    atomic_write_with(path, |tmp| {
        let mut file = fs::File::create(tmp).map_err(io(path))?;
        file.write_all(bytes).map_err(io(path))
    })
}

/// [`atomic_write`] of what `write` writes to the temporary file whose path it is given (it
/// creates the file); then the file is fsynced, renamed into place, and the folder fsynced.
fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io(dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let written = (|| {
        write(&tmp)?;
        fs::File::open(&tmp)
            .and_then(|file| file.sync_all())
            .map_err(io(path))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if let Err(e) = written {
        // Best effort: the write's own error is the one to report.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Removes the checkpoint folder `dir` after a failed save, unless it is complete (has
/// `state.json`: a complete checkpoint is never deleted here). Best effort: the failure that led
/// here is the error to report.
pub fn discard_incomplete(dir: &Path) {
    if dir.is_dir() && !dir.join("state.json").exists() {
        if let Err(e) = fs::remove_dir_all(dir) {
            tracing::warn!("cannot remove the incomplete checkpoint {}: {e}", dir.display());
        }
    }
}

/// The sha256 (hex) of every checkpoint file in `dir` (`*.safetensors`, temporary files
/// excepted), by file name: what [`write_state`]'s caller records in [`TrainState::checksums`].
pub fn checksum_files(dir: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".safetensors") {
            continue;
        }
        out.insert(name.to_string(), sha256_file(&path)?);
    }
    Ok(out)
}

/// The sha256 (hex) of the file at `path`, read in pieces (a checkpoint file can be as large as
/// the model).
fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut piece = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut piece).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&piece[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The sha256 of `bytes` in hex, as [`TrainState::checksums`] records it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A digest in lowercase hex.
fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks every file `state` records a checksum for (a missing file is an error too).
pub fn verify(dir: &Path, state: &TrainState) -> Result<(), CheckpointError> {
    for (name, expected) in &state.checksums {
        let path = dir.join(name);
        let actual = sha256_file(&path)?;
        if &actual != expected {
            return Err(CheckpointError::Checksum {
                path,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// A checkpoint read and verified: its state and the tensors of every stage.
#[derive(Debug, Clone)]
pub struct LoadedCheckpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Its `state.json`.
    pub state: TrainState,
    /// Parameters by module path (every stage's file together).
    pub params: HashMap<String, LoadedTensor>,
    /// Optimizer state by `<param>.<buffer>`.
    pub optim: HashMap<String, LoadedTensor>,
}

/// Reads the checkpoint folder `dir`: `state.json`, the checksums of its files, every stage's
/// tensors. Any failure is an error naming the file.
pub fn load(dir: &Path) -> Result<LoadedCheckpoint, CheckpointError> {
    let state = read_state(dir)?;
    verify(dir, &state)?;
    let params = read_params(dir)?;
    // An optimizer slice `<param>.<buffer>@<start>` has its parameter's shape.
    let param_shape = |base: &str| {
        let param = base.rsplit_once('.').map_or(base, |(param, _)| param);
        params.get(param).map(|t| t.shape.clone())
    };
    let mut headers = SliceHeaders::default();
    let optim = read_all_with_headers(dir, "optim-", &mut headers)?;
    let optim = join_shards(dir, param_shape, &headers.splits, optim)?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        params,
        optim,
        state,
    })
}

/// Reads every parameter of the checkpoint folder `dir`, all stages, whole tensors by name (the
/// slices of ZeRO-3's shard files joined). Checksums are not verified (see [`load`]).
pub fn read_params(dir: &Path) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    let mut headers = SliceHeaders::default();
    let params = read_all_with_headers(dir, "model-", &mut headers)?;
    join_shards(dir, |base| headers.shapes.get(base).cloned(), &headers.splits, params)
}

/// The name of the slice of tensor `base` that starts at element `start` (ZeRO's shards).
pub fn shard_tensor_name(base: &str, start: usize) -> String {
    format!("{base}@{start}")
}

/// Joins the slices `<base>@<start>` among `tensors` (ZeRO's shards: `<param>@<start>` of the
/// parameters, `<param>.<buffer>@<start>` of the optimizer state) into whole tensors of the shape
/// `shape_of(base)` gives; the slices must cover every element exactly once. Other tensors pass
/// through.
fn join_shards(
    dir: &Path,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    splits: &HashMap<String, String>,
    tensors: HashMap<String, LoadedTensor>,
) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    let problem = |name: &str, problem: String| CheckpointError::Tensor {
        dir: dir.to_path_buf(),
        name: name.to_string(),
        problem,
    };
    // Per tensor, its values and which of them a slice gave.
    let mut whole: HashMap<String, (LoadedTensor, Vec<bool>)> = HashMap::new();
    let mut out = HashMap::new();
    for (name, tensor) in tensors {
        let Some((base, start)) = name.rsplit_once('@') else {
            out.insert(name, tensor);
            continue;
        };
        let shape = shape_of(base).ok_or_else(|| {
            problem(
                &name,
                format!("is a slice of `{base}`, whose shape no file of the checkpoint records"),
            )
        })?;
        // Where the slice's values go: runs (full offset, slice offset, length).
        let mut runs = Vec::new();
        if start.starts_with("tp") {
            let split = splits
                .get(&name)
                .and_then(|text| TensorSplit::parse(text, shape.clone()))
                .ok_or_else(|| {
                    problem(
                        &name,
                        "is a tensor-parallel slice without a valid split in its header".into(),
                    )
                })?;
            if split.local_numel() != tensor.data.len() {
                return Err(problem(
                    &name,
                    format!(
                        "holds {} values where its split has {}",
                        tensor.data.len(),
                        split.local_numel()
                    ),
                ));
            }
            split.runs(|full, local, len| runs.push((full, local, len)));
        } else {
            let start: usize = start
                .parse()
                .map_err(|_| problem(&name, "is a shard slice whose start is not a number".into()))?;
            runs.push((start, 0, tensor.data.len()));
        }
        let numel: usize = shape.iter().product();
        let (joined, covered) = whole.entry(base.to_string()).or_insert_with(|| {
            (
                LoadedTensor {
                    shape,
                    data: vec![0.0; numel],
                },
                vec![false; numel],
            )
        });
        for (start, from, len) in runs {
            let end = start + len;
            if end > numel {
                return Err(problem(
                    &name,
                    format!("covers elements {start}..{end} of a tensor of {numel}"),
                ));
            }
            if covered[start..end].iter().any(|&c| c) {
                return Err(problem(&name, "overlaps another slice of the same tensor".into()));
            }
            covered[start..end].fill(true);
            joined.data[start..end].copy_from_slice(&tensor.data[from..from + len]);
        }
    }
    for (base, (joined, covered)) in whole {
        let count = covered.iter().filter(|&&c| c).count();
        if count != covered.len() {
            return Err(problem(
                &base,
                format!(
                    "its shards cover {count} of its {} values: a shard file is missing",
                    covered.len()
                ),
            ));
        }
        out.insert(base, joined);
    }
    Ok(out)
}

/// Loads the latest complete checkpoint under `root` that loads: one that is corrupt (truncated,
/// a bad header, a checksum that does not match) is skipped with a warning naming the file and the
/// checkpoint tried instead. Every rank reads and verifies the same files, so all choose the same
/// one. The error of the latest is returned when none loads.
pub fn load_latest(root: &Path, rank: usize) -> Result<LoadedCheckpoint, CheckpointError> {
    let mut candidates = complete_checkpoints(root);
    let mut first_error = None;
    while let Some((_, dir)) = candidates.pop() {
        match load(&dir) {
            Ok(loaded) => return Ok(loaded),
            Err(e) => {
                let next = match candidates.last() {
                    Some((_, previous)) => format!("falling back to the previous one, {}", previous.display()),
                    None => "and there is no earlier complete checkpoint".to_string(),
                };
                tracing::warn!("rank {rank}: cannot resume from {}: {e}; {next}", dir.display());
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| CheckpointError::NoneFound(root.to_path_buf())))
}

/// Serialises tensors to safetensors bytes (f32, little endian).
pub fn to_safetensors(tensors: &[NamedTensor<'_>]) -> Result<Vec<u8>, CheckpointError> {
    let (views, metadata) = views(tensors, HashMap::new())?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| CheckpointError::Format {
        path: PathBuf::new(),
        reason: e.to_string(),
    })
}

/// Safetensors views of `tensors` (borrowing their data), and `metadata` with `format = burnrun`.
#[allow(clippy::type_complexity)]
fn views<'a>(
    tensors: &'a [NamedTensor<'a>],
    mut metadata: HashMap<String, String>,
) -> Result<(Vec<(String, TensorView<'a>)>, HashMap<String, String>), CheckpointError> {
    let views = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(Dtype::F32, t.shape.to_vec(), bytemuck::cast_slice(t.data)).map_err(|e| {
                CheckpointError::Tensor {
                    dir: PathBuf::new(),
                    name: t.name.to_string(),
                    problem: e.to_string(),
                }
            })?;
            Ok((t.name.to_string(), view))
        })
        .collect::<Result<_, CheckpointError>>()?;
    metadata.insert("format".to_string(), "burnrun".to_string());
    Ok((views, metadata))
}

/// Writes tensors to `path` atomically, streamed from their buffers (no copy of the file in
/// memory); returns the sha256 (hex) of the file, what `state.json` records for it.
pub fn write_tensors(path: &Path, tensors: &[NamedTensor<'_>]) -> Result<String, CheckpointError> {
    write_tensors_with(path, tensors, HashMap::new())
}

/// Metadata key under which a shard file of ZeRO-3 records the shape of a parameter it holds
/// slices of (the slices are 1-D).
const SHAPE_KEY: &str = "shape:";

/// Metadata key under which a file records where a tensor-parallel slice (`<name>@tp<rank>`)
/// lies in its full tensor ([`TensorSplit::describe`]).
const SPLIT_KEY: &str = "split:";

/// [`write_tensors`] of slices of parameters or of their optimizer state: ZeRO-3's
/// (`<param>@<first element>`) and tensor parallelism's (`<name>@tp<rank>`, each with its
/// [`TensorSplit`] in `splits`), recording the whole shape of each parameter in `shapes` in the
/// header, so a load can join them.
pub fn write_param_slices<'a>(
    path: &Path,
    slices: &[NamedTensor<'_>],
    shapes: impl Iterator<Item = (&'a str, &'a [usize])>,
    splits: impl Iterator<Item = (String, &'a TensorSplit)>,
) -> Result<String, CheckpointError> {
    let mut metadata: HashMap<String, String> = shapes
        .map(|(name, shape)| {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            (format!("{SHAPE_KEY}{name}"), dims.join(","))
        })
        .collect();
    metadata.extend(splits.map(|(slice, split)| (format!("{SPLIT_KEY}{slice}"), split.describe())));
    write_tensors_with(path, slices, metadata)
}

/// The name of tensor-parallel rank `rank`'s slice of tensor `base`.
pub fn tensor_slice_name(base: &str, rank: usize) -> String {
    format!("{base}@tp{rank}")
}

/// What the headers of a checkpoint's slice files say: full shapes by parameter, splits by slice.
#[derive(Debug, Default)]
struct SliceHeaders {
    shapes: HashMap<String, Vec<usize>>,
    splits: HashMap<String, String>,
}

/// [`write_tensors`] with `metadata` in the header.
fn write_tensors_with(
    path: &Path,
    tensors: &[NamedTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<String, CheckpointError> {
    // Streamed from the tensors to the file: no copy of the file in memory (a checkpoint of the
    // optimizer state alone is twice the model), then hashed from the page cache.
    let (views, metadata) = views(tensors, metadata)?;
    atomic_write_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => io(path)(source),
            other => CheckpointError::Format {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })
    })?;
    sha256_file(path)
}

/// A loaded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// Reads every f32 tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    parse_tensors(path, &bytes)
}

/// The header's metadata of the safetensors `bytes` read from `path`.
fn parse_metadata(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Every f32 tensor of the safetensors `bytes` read from `path`.
fn parse_tensors(path: &Path, bytes: &[u8]) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    let format = |reason: String| CheckpointError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format(format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(
            name,
            LoadedTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Reads every file of a checkpoint folder whose name starts with `prefix` (`model-` or
/// `optim-`) into one map: all stages together.
pub fn read_all(dir: &Path, prefix: &str) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    read_all_with_headers(dir, prefix, &mut SliceHeaders::default())
}

/// [`read_all`], adding to `headers` the full shapes and splits that slice files record.
fn read_all_with_headers(
    dir: &Path,
    prefix: &str,
    headers: &mut SliceHeaders,
) -> Result<HashMap<String, LoadedTensor>, CheckpointError> {
    let mut out = HashMap::new();
    let entries = fs::read_dir(dir).map_err(io(dir))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(prefix) && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    for file in files {
        let bytes = fs::read(&file).map_err(io(&file))?;
        for (key, dims) in parse_metadata(&file, &bytes)? {
            if let Some(slice) = key.strip_prefix(SPLIT_KEY) {
                headers.splits.insert(slice.to_string(), dims);
                continue;
            }
            let Some(name) = key.strip_prefix(SHAPE_KEY) else {
                continue;
            };
            let shape = dims
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::parse)
                .collect::<Result<Vec<usize>, _>>()
                .map_err(|_| CheckpointError::Format {
                    path: file.clone(),
                    reason: format!("the shape `{dims}` recorded for `{name}` is not a list of sizes"),
                })?;
            headers.shapes.insert(name.to_string(), shape);
        }
        out.extend(parse_tensors(&file, &bytes)?);
    }
    Ok(out)
}

/// File of rank `rank`'s gradient-codec state in a checkpoint folder.
pub fn codec_state_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("codec-rank{rank}.safetensors"))
}

/// Where a rank sits in the job that saves or resumes codec state: state is loaded only by the
/// rank of the same number in a job of the same mesh (the same rank then holds the same replica
/// and stage, so the same buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecSlot {
    /// Global rank.
    pub rank: usize,
    /// Data-parallel replicas of the job.
    pub data_replicas: usize,
    /// Pipeline stages of the job.
    pub pipeline_stages: usize,
}

impl std::fmt::Display for CodecSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of a data({}) x pipeline({}) job",
            self.rank, self.data_replicas, self.pipeline_stages
        )
    }
}

/// What became of a rank's saved codec state on resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecResume {
    /// Loaded: this many tensors (0 when the checkpoint was saved before the first compressed
    /// step, e.g. during `compression.start_step`'s warm-up).
    Loaded {
        /// Tensors loaded.
        tensors: usize,
    },
    /// Did not fit this run (another world size or mesh, another `[compression]` config, another
    /// bucket layout) or was not saved: the codec starts from zero residuals and freshly seeded
    /// PowerSGD factors, as a new run does. Logged as a warning, not an error: training goes on.
    Dropped {
        /// Why, in words.
        reason: String,
    },
}

/// Metadata keys of a codec-state file.
const META_CODEC: &str = "codec";
const META_RANK: &str = "rank";
const META_DATA_REPLICAS: &str = "data_replicas";
const META_PIPELINE_STAGES: &str = "pipeline_stages";

/// Where a rank's gradient codec goes in checkpoints: [`CodecCheckpoint::save`] writes the
/// codec's state ([`GradCodec::state`]) to [`codec_state_path`], with the codec's description and
/// the rank's [`CodecSlot`] in the header; [`CodecCheckpoint::load`] restores it when all of these
/// match and every tensor fits this run's buckets, and otherwise drops it with a warning. The
/// codec itself stays with its owner (`DataParallel`) and is lent to each call.
#[derive(Debug, Clone)]
pub struct CodecCheckpoint {
    slot: CodecSlot,
    /// Per bucket, the shapes of its parameters.
    buckets: Vec<Vec<Vec<usize>>>,
}

impl CodecCheckpoint {
    /// For the codec of the rank at `slot`, whose gradient buckets hold the parameters
    /// `bucket_params[b]` (indices into `shapes`, the shapes of the parameters in order; both come
    /// from the same parameter list, as `DataParallel`'s bucket layout does, and a range past
    /// `shapes` panics).
    pub fn new(slot: CodecSlot, bucket_params: &[Range<usize>], shapes: &[Vec<usize>]) -> Self {
        let buckets = bucket_params.iter().map(|r| shapes[r.clone()].to_vec()).collect();
        Self { slot, buckets }
    }

    /// The file of this rank's codec state in the checkpoint folder `dir`.
    pub fn file(&self, dir: &Path) -> PathBuf {
        codec_state_path(dir, self.slot.rank)
    }

    /// Writes this rank's codec state into the checkpoint folder `dir`, atomically, and returns
    /// the file's sha256 (hex). Call it on every rank before `state.json` is written.
    pub fn save(&self, dir: &Path, codec: &dyn GradCodec) -> Result<String, CheckpointError> {
        self.save_state(dir, &codec.describe(), &codec.state())
    }

    /// [`CodecCheckpoint::save`] of `state`, a codec's tensors as `GradCodec::state` gives them,
    /// for the codec `describe` names (a codec on the device saves its residual this way).
    pub fn save_state(&self, dir: &Path, describe: &str, state: &[StateTensor]) -> Result<String, CheckpointError> {
        let tensors: Vec<NamedTensor<'_>> = state
            .iter()
            .map(|t| NamedTensor {
                name: &t.name,
                shape: &t.shape,
                data: &t.data,
            })
            .collect();
        let metadata = HashMap::from([
            (META_CODEC.to_string(), describe.to_string()),
            (META_RANK.to_string(), self.slot.rank.to_string()),
            (META_DATA_REPLICAS.to_string(), self.slot.data_replicas.to_string()),
            (META_PIPELINE_STAGES.to_string(), self.slot.pipeline_stages.to_string()),
        ]);
        write_tensors_with(&codec_state_path(dir, self.slot.rank), &tensors, metadata)
    }

    /// Restores this rank's codec state from the checkpoint folder `dir`. State that does not fit
    /// (see [`CodecResume::Dropped`]) is dropped with a warning naming the file and the reason,
    /// and the codec starts from zero state; only a file that cannot be read or parsed is an
    /// error.
    pub fn load(&self, dir: &Path, codec: &mut dyn GradCodec) -> Result<CodecResume, CheckpointError> {
        let path = codec_state_path(dir, self.slot.rank);
        let outcome = self.try_load(&path, codec)?;
        if let CodecResume::Dropped { reason } = &outcome {
            tracing::warn!(
                "rank {}: gradient codec state not resumed from {}: {reason}; error feedback and PowerSGD factors \
                 start from zero, so this run will not match an uninterrupted one exactly",
                self.slot.rank,
                path.display()
            );
        }
        Ok(outcome)
    }

    fn try_load(&self, path: &Path, codec: &mut dyn GradCodec) -> Result<CodecResume, CheckpointError> {
        let dropped = |reason: String| Ok(CodecResume::Dropped { reason });
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return dropped(
                    "the checkpoint has no codec state for this rank (saved without compression, by an older \
                     burnrun, or by a job with fewer ranks)"
                        .to_string(),
                )
            }
            Err(e) => return Err(io(path)(e)),
        };
        let metadata = parse_metadata(path, &bytes)?;
        let field = |key: &str| {
            metadata.get(key).cloned().ok_or_else(|| CheckpointError::Format {
                path: path.to_path_buf(),
                reason: format!("the header's metadata lacks `{key}`"),
            })
        };
        let number = |key: &str| {
            let text = field(key)?;
            text.parse::<usize>().map_err(|e| CheckpointError::Format {
                path: path.to_path_buf(),
                reason: format!("metadata `{key}` = {text:?}: {e}"),
            })
        };
        let saved_codec = field(META_CODEC)?;
        let saved_slot = CodecSlot {
            rank: number(META_RANK)?,
            data_replicas: number(META_DATA_REPLICAS)?,
            pipeline_stages: number(META_PIPELINE_STAGES)?,
        };
        let this_codec = codec.describe();
        if saved_codec != this_codec {
            return dropped(format!(
                "it was saved by the codec `{saved_codec}`, this run's is `{this_codec}`"
            ));
        }
        if saved_slot != self.slot {
            return dropped(format!("it was saved by {saved_slot}, this is {}", self.slot));
        }
        let tensors: Vec<StateTensor> = parse_tensors(path, &bytes)?
            .into_iter()
            .map(|(name, t)| StateTensor {
                name,
                shape: t.shape,
                data: t.data,
            })
            .collect();
        let count = tensors.len();
        match codec.load_state(&self.buckets, tensors) {
            Ok(()) => Ok(CodecResume::Loaded { tensors: count }),
            Err(e) => {
                // load_state left the state as it was; make sure it is the zero state.
                codec.reset();
                dropped(format!("it does not fit this run's gradient buckets: {e}"))
            }
        }
    }
}

/// Writes `state.json`: the mark of a complete checkpoint.
pub fn write_state(dir: &Path, state: &TrainState) -> Result<(), CheckpointError> {
    let path = dir.join("state.json");
    let json = serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    atomic_write(&path, &json)
}

/// Reads `state.json`.
pub fn read_state(dir: &Path) -> Result<TrainState, CheckpointError> {
    let path = dir.join("state.json");
    let bytes = fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::State {
        path,
        reason: e.to_string(),
    })
}

/// Complete checkpoints under `root`, oldest first.
pub fn complete_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step_")?.parse().ok()?;
            p.join("state.json").is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// The latest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Result<PathBuf, CheckpointError> {
    complete_checkpoints(root)
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| CheckpointError::NoneFound(root.to_path_buf()))
}

/// Deletes all but the newest `keep_last` complete checkpoints (0 keeps all).
pub fn prune(root: &Path, keep_last: usize) -> Result<(), CheckpointError> {
    if keep_last == 0 {
        return Ok(());
    }
    let all = complete_checkpoints(root);
    let excess = all.len().saturating_sub(keep_last);
    for (_, dir) in all.into_iter().take(excess) {
        fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_safetensors() {
        let dir = std::env::temp_dir().join(format!("burnrun-ckpt-{}", std::process::id()));
        let path = dir.join("model-stage0.safetensors");
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        write_tensors(
            &path,
            &[NamedTensor {
                name: "blocks.0.weight",
                shape: &[2, 3],
                data: &data,
            }],
        )
        .unwrap();
        let back = read_all(&dir, "model-").unwrap();
        assert_eq!(
            back["blocks.0.weight"],
            LoadedTensor {
                shape: vec![2, 3],
                data: data.to_vec()
            }
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_residual_saved_from_the_device_resumes_into_the_host_codec_bucket_by_bucket() {
        // The NCCL path saves its device residual with `save_state` under the host codec's
        // description and names; the host codec (or the device one, through it) must take it.
        let dir = std::env::temp_dir().join(format!("burnrun-codec-ckpt-{}", std::process::id()));
        let slot = CodecSlot {
            rank: 0,
            data_replicas: 2,
            pipeline_stages: 1,
        };
        let shapes = vec![vec![2, 3], vec![3], vec![4]];
        let ckpt = CodecCheckpoint::new(slot, &[0..2, 2..3], &shapes);
        let mut codec = crate::compress::TopK::new(0.25, true);
        let flat: Vec<f32> = (0..13).map(|i| i as f32 * 0.5 - 3.0).collect();
        let state: Vec<StateTensor> = [0..9, 9..13]
            .iter()
            .enumerate()
            .map(|(b, r)| StateTensor {
                name: crate::compress::residual_name(b),
                shape: vec![r.len()],
                data: flat[r.clone()].to_vec(),
            })
            .collect();
        ckpt.save_state(&dir, &codec.describe(), &state).unwrap();
        assert!(matches!(
            ckpt.load(&dir, &mut codec).unwrap(),
            CodecResume::Loaded { tensors: 2 }
        ));
        assert_eq!(codec.residual(0), Some(&flat[..9]));
        assert_eq!(codec.residual(1), Some(&flat[9..]));
        // Saved by another codec, it is dropped, not misread.
        let mut other = crate::compress::TopK::new(0.5, true);
        assert!(matches!(
            ckpt.load(&dir, &mut other).unwrap(),
            CodecResume::Dropped { .. }
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_folders_with_state_json_count_and_pruning_keeps_the_newest() {
        let root = std::env::temp_dir().join(format!("burnrun-prune-{}", std::process::id()));
        let state = TrainState {
            step: 0,
            micro_batches_seen: 0,
            seed: 1,
            loss_scale: 1.0,
            good_steps: 0,
            pipeline_stages: 1,
            data_replicas: 1,
            config: String::new(),
            checksums: BTreeMap::new(),
        };
        for step in [10, 20, 30] {
            write_state(&step_dir(&root, step), &TrainState { step, ..state.clone() }).unwrap();
        }
        fs::create_dir_all(step_dir(&root, 40)).unwrap();
        assert_eq!(latest(&root).unwrap(), step_dir(&root, 30));
        prune(&root, 2).unwrap();
        let left: Vec<u64> = complete_checkpoints(&root).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![20, 30]);
        fs::remove_dir_all(&root).unwrap();
    }
}
