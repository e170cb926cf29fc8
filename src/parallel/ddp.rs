//! `Ddp`: data parallelism for any burn [`Module`], in a hand-written training loop.
//!
//! The burn counterpart of torch's `DistributedDataParallel(model)`:
//!
//! ```no_run
//! # fn demo<M: burn::module::Module>(model: M, loss: impl Fn(&M) -> burn::tensor::Tensor<1>) -> Result<(), Box<dyn std::error::Error>> {
//! use burn::optim::{AdamConfig, GradientsParams};
//! let pg = burnrun::init()?;
//! let (mut model, mut ddp) = burnrun::Ddp::new(&pg, model, burnrun::DdpOptions::default())?;
//! let mut optim = AdamConfig::new().init();
//! for _step in 0..100 {
//!     let grads = GradientsParams::from_grads(loss(&model).backward(), &model);
//!     let grads = ddp.sync(&model, grads)?; // averaged over the ranks
//!     model = optim.step(1e-3, model, grads);
//!     model = ddp.sync_buffers(model)?;     // running statistics: rank 0's everywhere
//! }
//! # Ok(()) }
//! ```
//!
//! What it does, and the rules a user can rely on:
//! - **Matching.** Parameters are matched across ranks by their position in burn's visit order,
//!   and checked by module path, shape and trainability before anything else happens: a rank
//!   whose model differs (another config, another layer) fails on every rank with the first
//!   differing path and both sides, never a hang or a silent mix. `ParamId`s are random per
//!   process and never used.
//! - **Start.** Every float tensor of the model, parameters and buffers alike, is broadcast from
//!   rank 0, so replicas start identical whatever seed each rank used.
//! - **Gradients.** [`Ddp::sync`] reads the gradient of every trainable parameter (zeros where
//!   this rank has none), averages them across the ranks in buckets of `bucket_cap_mb`, through
//!   the gradient codec if one is set, and returns burn's `GradientsParams` for the optimizer.
//! - **Unused parameters** (torch's `find_unused_parameters`, always on and cheap): every rank
//!   sends every trainable parameter in every sync, so ranks whose losses touch different
//!   parameters never wait on each other. One small all-reduce (a byte per parameter) agrees on
//!   which parameters had a gradient on some rank: those get the average (a rank without one
//!   counts as zero, as in torch), those that had none anywhere get no gradient at all, so the
//!   optimizer leaves them (and their momentum) alone.
//! - **Frozen parameters and buffers**: float tensors autodiff does not track (parameters set
//!   `require_grad(false)`, burn's `RunningState` such as BatchNorm's running mean and variance)
//!   are never all-reduced as gradients. They are broadcast at start, and
//!   [`Ddp::sync_buffers`] brings them in line afterwards as [`BufferSync`] says (default: rank
//!   0's values, torch's `broadcast_buffers=True`).
//! - **Accumulation** (torch's `no_sync`): [`Ddp::accumulate`] adds a micro-batch's gradients
//!   locally with no communication; the next [`Ddp::sync`] adds its own and averages the sum. As
//!   in torch, micro-batch gradients are summed: scale the loss by `1 / micro_batches` for a mean.
//! - Every collective runs on the process group, so every blocking call has the group's deadline
//!   and a rank that dies or calls something else fails the others with its name.

use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use sha2::{Digest, Sha256};

use super::params::{
    flat_selected_grads_on_device, flatten_selected_grads_into, flatten_selected_into, grads_from_selected,
    grads_from_selected_tensor, load_params, load_selected, read_flat, selected_numel, trainable_mask, ParamLayout,
};
use super::params::{flatten_params, ParamError};
use crate::comm::{CommError, ProcessGroup, ReduceOp};
use crate::compress::{build_codec, CodecOptions, CompressError, CompressionMethod, StateTensor};

use super::data::{DataParallel, DivergenceError, SyncError, SyncStats};

/// How [`Ddp::sync_buffers`] treats float tensors autodiff does not track (running statistics,
/// frozen parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufferSync {
    /// Every rank takes rank 0's values (torch's `broadcast_buffers=True`).
    #[default]
    Broadcast,
    /// Every rank takes the average over the ranks (running statistics of every replica's data).
    Average,
    /// Left as each rank computed them (after the broadcast at start).
    Off,
}

/// Options of [`Ddp`]; the defaults are torch DDP's.
#[derive(Debug, Clone)]
pub struct DdpOptions {
    /// Gradients are averaged in buckets of whole parameters of at most this many MiB (f32).
    /// Default 25, torch's `bucket_cap_mb`.
    pub bucket_cap_mb: f64,
    /// Gradient compression on the wire: `fp16`/`bf16` casts, top-k or PowerSGD with error
    /// feedback. Default: none (f32).
    pub compression: CodecOptions,
    /// What [`Ddp::sync_buffers`] does. Default [`BufferSync::Broadcast`].
    pub buffers: BufferSync,
}

impl Default for DdpOptions {
    fn default() -> Self {
        Self {
            bucket_cap_mb: 25.0,
            compression: CodecOptions::default(),
            buffers: BufferSync::default(),
        }
    }
}

/// What went wrong in [`Ddp`]; every variant names this rank.
#[derive(Debug, thiserror::Error)]
pub enum DdpError {
    /// A collective failed (a peer died, timed out, or called something else).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The replicas are not the same model.
    #[error(
        "rank {rank}: the model differs between rank {rank_a} and rank {rank_b}: float tensor #{index} is \
         `{a}` on rank {rank_a} but `{b}` on rank {rank_b} (every rank must build the same model)"
    )]
    ModelMismatch {
        /// This rank.
        rank: usize,
        /// A rank holding one model (the group's first).
        rank_a: usize,
        /// The first rank whose model differs from it.
        rank_b: usize,
        /// Position of the first difference in visit order.
        index: usize,
        /// `path [shape] trainable|buffer` on `rank_a`, or `(nothing)`.
        a: String,
        /// The same on `rank_b`.
        b: String,
    },
    /// The model has no parameter autodiff tracks.
    #[error(
        "rank {rank}: the model has no trainable parameter ({tensors} float tensors, none tracked by autodiff): \
         build it on an autodiff device (`device.autodiff()`)"
    )]
    NothingToTrain {
        /// This rank.
        rank: usize,
        /// Float tensors seen.
        tensors: usize,
    },
    /// Reading or writing the model's tensors failed.
    #[error("rank {rank}: {source}")]
    Model {
        /// This rank.
        rank: usize,
        /// What failed.
        source: ParamError,
    },
    /// The gradient codec refused its options or failed.
    #[error(transparent)]
    Codec(#[from] CompressError),
    /// The device path could not be set up or failed.
    #[error("{reason}")]
    Device {
        /// What happened, naming the rank.
        reason: String,
    },
    /// Replicas drifted apart ([`Ddp::check_replicas`]).
    #[error(transparent)]
    Diverged(#[from] DivergenceError),
}

impl From<SyncError> for DdpError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Comm(e) => DdpError::Comm(e),
            SyncError::Codec(e) => DdpError::Codec(e),
        }
    }
}

/// Data parallelism for one model replica per rank (see the module docs).
#[derive(Debug)]
pub struct Ddp {
    group: ProcessGroup,
    layout: ParamLayout,
    /// Per layout entry: tracked by autodiff (its gradient is averaged).
    trainable: Vec<bool>,
    /// Per layout entry: a buffer or frozen parameter ([`BufferSync`]).
    buffers: Vec<bool>,
    buffer_numel: usize,
    data: DataParallel,
    options: DdpOptions,
    /// Gradients of the trainable parameters, back to back (the bucketed all-reduce's buffer).
    flat: Vec<f32>,
    /// Per layout entry, whether this rank (then: any rank) had a gradient for it.
    present: Vec<u8>,
    /// Micro-batches added by [`Ddp::accumulate`] since the last sync.
    pending: usize,
    scratch: Vec<f32>,
    scratch_present: Vec<u8>,
    syncs: u64,
    last: SyncStats,
    /// Wall time of the last [`Ddp::sync`], read-back and write-back of the gradients included.
    last_sync_ms: f64,
    /// The device path ([`Ddp::on_device`]): gradients summed, averaged and handed back on their
    /// device.
    device: Option<Box<dyn FlatReduce>>,
    /// The device path's sum of the micro-batches so far.
    device_sum: Option<Tensor<1>>,
}

/// Averages one flat f32 gradient tensor over the replicas, on its device: what [`Ddp`]'s device
/// path ([`Ddp::on_device`]) hands its gradients to. NCCL's implementation (feature `cuda`)
/// reduces the buffer in place through its device pointer; [`HostFlatReduce`] reads it back,
/// all-reduces it on the host group and puts it back on the device.
pub trait FlatReduce: Send + std::fmt::Debug {
    /// The average over the replicas of `flat`, on `flat`'s device.
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError>;

    /// A codec's error-feedback residual over the whole flat gradient (its buckets one after
    /// another), read back for a checkpoint; `None` when there is none (no codec, or no step
    /// made yet).
    fn residual(&self) -> Result<Option<Vec<f32>>, DdpError> {
        Ok(None)
    }

    /// Replaces the residual by `flat` (one value per gradient element), from a checkpoint.
    fn load_residual(&self, flat: &[f32]) -> Result<(), DdpError> {
        let _ = flat;
        Ok(())
    }

    /// A codec's state besides its residual, read back for a checkpoint as named tensors under
    /// the host codec's names (PowerSGD's warm-started factors, `q.bucket<b>.param<i>`), so
    /// either path resumes the other's checkpoint; empty when there is none.
    fn factors(&self) -> Result<Vec<StateTensor>, DdpError> {
        Ok(Vec::new())
    }

    /// Takes the factors this codec keeps out of `tensors` (a host codec's state, as resumed from
    /// a checkpoint, names as [`FlatReduce::factors`] gives them); the other tensors (residuals)
    /// are left alone.
    fn load_factors(&self, tensors: &[StateTensor]) -> Result<(), DdpError> {
        let _ = tensors;
        Ok(())
    }

    /// The optimizer step the next [`FlatReduce::average`] belongs to (0-based): PowerSGD draws
    /// a factor column that vanished afresh from it, as the host codec does. Ignored by the
    /// others.
    fn set_step(&self, step: u64) {
        let _ = step;
    }
}

/// [`FlatReduce`] through the host: one read from the device, the host engine's all-reduce, one
/// write back. For any burn device; on a GPU without NCCL, one transfer each way per step.
#[derive(Debug, Clone)]
pub struct HostFlatReduce {
    group: ProcessGroup,
}

impl HostFlatReduce {
    /// Averages over `group`.
    pub fn new(group: &ProcessGroup) -> Self {
        Self { group: group.clone() }
    }
}

impl FlatReduce for HostFlatReduce {
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        let rank = self.group.global_ranks()[self.group.rank()];
        let device = flat.device();
        let mut values = Vec::with_capacity(flat.dims()[0]);
        read_flat(flat, &mut values).map_err(|source| DdpError::Model { rank, source })?;
        self.group.all_reduce(&mut values, ReduceOp::Avg)?;
        let n = values.len();
        Ok(Tensor::from_data(TensorData::new(values, [n]), &device))
    }
}

#[cfg(feature = "cuda")]
impl From<super::DeviceSyncError> for DdpError {
    fn from(e: super::DeviceSyncError) -> Self {
        match e {
            super::DeviceSyncError::Comm(e) => DdpError::Comm(e),
            other => DdpError::Device {
                reason: other.to_string(),
            },
        }
    }
}

#[cfg(feature = "cuda")]
impl FlatReduce for super::DeviceAllReduce {
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        Ok(super::DeviceAllReduce::average(self, flat)?.0)
    }
}

#[cfg(feature = "cuda")]
impl FlatReduce for super::DeviceHalfWire {
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        Ok(super::DeviceHalfWire::average(self, flat)?.0)
    }

    fn residual(&self) -> Result<Option<Vec<f32>>, DdpError> {
        Ok(super::DeviceHalfWire::residual(self)?)
    }

    fn load_residual(&self, flat: &[f32]) -> Result<(), DdpError> {
        Ok(super::DeviceHalfWire::load_residual(self, flat)?)
    }
}

#[cfg(feature = "cuda")]
impl FlatReduce for super::DeviceTopK {
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        Ok(super::DeviceTopK::average(self, flat)?.0)
    }

    fn residual(&self) -> Result<Option<Vec<f32>>, DdpError> {
        Ok(super::DeviceTopK::residual(self)?)
    }

    fn load_residual(&self, flat: &[f32]) -> Result<(), DdpError> {
        Ok(super::DeviceTopK::load_residual(self, flat)?)
    }
}

impl Ddp {
    /// Wraps `model` for data parallelism over `group`: checks that every rank built the same
    /// model, then gives every rank rank 0's tensors. Collective: every rank of `group` calls it.
    pub fn new<M: Module>(group: &ProcessGroup, model: M, options: DdpOptions) -> Result<(M, Self), DdpError> {
        let rank = group.global_ranks()[group.rank()];
        let layout = ParamLayout::of(&model);
        let trainable = trainable_mask(&model);
        agree_on_layout(group, &layout, &trainable)?;
        if !trainable.iter().any(|&t| t) {
            return Err(DdpError::NothingToTrain {
                rank,
                tensors: layout.len(),
            });
        }
        let model_err = |source| DdpError::Model { rank, source };
        let mut values = flatten_params(&model).map_err(model_err)?;
        group.broadcast(&mut values, 0)?;
        let model = load_params(model, &values).map_err(model_err)?;

        let numels: Vec<usize> = layout
            .params
            .iter()
            .zip(&trainable)
            .filter(|(_, &t)| t)
            .map(|(p, _)| p.numel)
            .collect();
        let shapes: Vec<Vec<usize>> = layout
            .params
            .iter()
            .zip(&trainable)
            .filter(|(_, &t)| t)
            .map(|(p, _)| p.shape.clone())
            .collect();
        let cap_bytes = (options.bucket_cap_mb.max(0.0) * (1 << 20) as f64) as usize;
        let mut data = DataParallel::new(group.clone(), &numels, cap_bytes);
        if options.compression.method != CompressionMethod::None {
            data = data.with_codec(build_codec(&options.compression)?, &shapes);
        }
        let buffers: Vec<bool> = trainable.iter().map(|&t| !t).collect();
        let buffer_numel = selected_numel(&layout, &buffers);
        Ok((
            model,
            Self {
                group: group.clone(),
                layout,
                trainable,
                buffers,
                buffer_numel,
                data,
                options,
                flat: Vec::new(),
                present: Vec::new(),
                pending: 0,
                scratch: Vec::new(),
                scratch_present: Vec::new(),
                syncs: 0,
                last: SyncStats::default(),
                last_sync_ms: 0.0,
                device: None,
                device_sum: None,
            },
        ))
    }

    /// Keeps the gradients on their device: each backward's are concatenated there into one
    /// flat tensor (summed over [`Ddp::accumulate`]d micro-batches on the device), `reduce`
    /// averages it (NCCL by device pointer on CUDA), and [`Ddp::sync`] hands back slices of the
    /// result as the gradients; only one byte per parameter (which had a gradient) crosses to
    /// the host. Not with a gradient codec (the codecs run on the host engine).
    pub fn on_device(mut self, reduce: Box<dyn FlatReduce>) -> Result<Self, DdpError> {
        if self.data.codec().is_some() {
            return Err(DdpError::Device {
                reason: format!(
                    "rank {}: the device path has no gradient codec yet: set compression off, or keep the host path",
                    self.rank()
                ),
            });
        }
        self.device = Some(reduce);
        Ok(self)
    }

    /// [`Ddp::on_device`] with NCCL on CUDA device `ordinal` beside this group (feature `cuda`;
    /// the group must come from a launched job, whose store carries NCCL's id).
    #[cfg(feature = "cuda")]
    pub fn on_nccl(self, ordinal: usize, timeout: std::time::Duration) -> Result<Self, DdpError> {
        let reduce = super::DeviceAllReduce::new(&self.group, ordinal, timeout)
            .map_err(|e| DdpError::Device { reason: e.to_string() })?;
        self.on_device(Box::new(reduce))
    }

    /// Adds this micro-batch's gradients to the ones kept for the next [`Ddp::sync`], with no
    /// communication (torch's `no_sync`). Local: ranks may call it different numbers of times.
    pub fn accumulate<M: Module>(&mut self, model: &M, grads: GradientsParams) -> Result<(), DdpError> {
        self.read(model, &grads)?;
        self.pending += 1;
        Ok(())
    }

    /// Averages the gradients (this micro-batch's plus any accumulated) across the ranks and
    /// returns them for the optimizer. Collective: every rank calls it once per optimizer step.
    pub fn sync<M: Module>(&mut self, model: &M, grads: GradientsParams) -> Result<GradientsParams, DdpError> {
        let start = Instant::now();
        self.read(model, &grads)?;
        drop(grads);
        let rank = self.rank();
        // Which parameters had a gradient on some rank: those get one, the rest none.
        self.group.all_reduce(&mut self.present, ReduceOp::Max)?;
        let select: Vec<bool> = self.present.iter().map(|&p| p != 0).collect();
        let (out, stats) = match &self.device {
            Some(reduce) => {
                let started = Instant::now();
                let sum = self.device_sum.take().ok_or_else(|| DdpError::Device {
                    reason: format!("rank {rank}: no trainable parameter got a gradient to sync"),
                })?;
                let bytes = sum.dims()[0] * 4;
                let averaged = reduce.average(sum)?;
                let comm_ms = started.elapsed().as_secs_f64() * 1e3;
                let out = grads_from_selected_tensor(model, &self.trainable, &select, averaged)
                    .map_err(|source| DdpError::Model { rank, source })?;
                let stats = SyncStats {
                    buckets: 1,
                    bytes,
                    comm_ms,
                    wait_ms: comm_ms,
                    wire_bytes: if self.group.world_size() == 1 { 0 } else { bytes as u64 },
                    compression_error: Vec::new(),
                };
                (out, stats)
            }
            None => {
                let stats = self.data.sync_flat(&mut self.flat, self.syncs)?;
                let out = grads_from_selected(model, &self.trainable, &select, &self.flat)
                    .map_err(|source| DdpError::Model { rank, source })?;
                (out, stats)
            }
        };
        self.pending = 0;
        self.flat.clear();
        self.present.clear();
        self.syncs += 1;
        self.last = stats;
        self.last_sync_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }

    /// Brings buffers and frozen parameters in line across the ranks as [`DdpOptions::buffers`]
    /// says. Collective (unless the option is [`BufferSync::Off`]): call it at the same point on
    /// every rank, e.g. after the optimizer step.
    pub fn sync_buffers<M: Module>(&mut self, model: M) -> Result<M, DdpError> {
        if self.buffer_numel == 0 || self.options.buffers == BufferSync::Off || self.group.world_size() == 1 {
            return Ok(model);
        }
        // burn's `RunningState` keeps a forward's update aside until the next read folds it in;
        // reading it through a visitor would see the value before the last update, and that
        // update would later overwrite what we load. `valid()` folds every pending update into
        // the shared state (the inference copy it returns is dropped at once).
        drop(model.valid());
        let rank = self.rank();
        let model_err = |source| DdpError::Model { rank, source };
        let mut values = Vec::with_capacity(self.buffer_numel);
        flatten_selected_into(&model, &self.buffers, &mut values).map_err(model_err)?;
        match self.options.buffers {
            BufferSync::Broadcast => self.group.broadcast(&mut values, 0)?,
            BufferSync::Average => self.group.all_reduce(&mut values, ReduceOp::Avg)?,
            BufferSync::Off => {}
        }
        load_selected(model, &self.buffers, &values).map_err(model_err)
    }

    /// Compares a checksum of every trainable parameter across the ranks and fails naming the
    /// first one that differs (a skipped sync, a rank-dependent update). Collective.
    pub fn check_replicas<M: Module>(&self, model: &M) -> Result<(), DdpError> {
        let rank = self.rank();
        let mut values = Vec::new();
        flatten_selected_into(model, &self.trainable, &mut values)
            .map_err(|source| DdpError::Model { rank, source })?;
        let mut names = Vec::new();
        let mut ranges = Vec::new();
        let mut offset = 0;
        for (p, _) in self.layout.params.iter().zip(&self.trainable).filter(|(_, &t)| t) {
            names.push(p.name.clone());
            ranges.push(offset..offset + p.numel);
            offset += p.numel;
        }
        self.data.check_replicas(self.syncs, &names, &values, &ranges)?;
        Ok(())
    }

    /// What the last [`Ddp::sync`] did: buckets, bytes, wire bytes, communication time and the
    /// part of it this rank waited for.
    pub fn stats(&self) -> &SyncStats {
        &self.last
    }

    /// Wall time of the last [`Ddp::sync`] in milliseconds, reading the gradients off the device
    /// and writing the averages back included (`stats().comm_ms` is the communication alone).
    pub fn last_sync_ms(&self) -> f64 {
        self.last_sync_ms
    }

    /// Optimizer steps synchronised so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The model's float tensors in the order they are matched and sent.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Per entry of [`Ddp::layout`]: whether its gradient is averaged (false: buffer or frozen).
    pub fn trainable(&self) -> &[bool] {
        &self.trainable
    }

    /// The replicas' process group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    fn rank(&self) -> usize {
        self.group.global_ranks()[self.group.rank()]
    }

    /// Adds `grads` (trainable parameters only, zeros where missing) to `flat` and ORs which were
    /// present into `present`.
    fn read<M: Module>(&mut self, model: &M, grads: &GradientsParams) -> Result<(), DdpError> {
        let rank = self.rank();
        let model_err = |source| DdpError::Model { rank, source };
        if self.device.is_some() {
            let present = if self.pending == 0 {
                &mut self.present
            } else {
                &mut self.scratch_present
            };
            let flat =
                flat_selected_grads_on_device(model, grads, Some(&self.trainable), present).map_err(model_err)?;
            if self.pending > 0 {
                for (any, p) in self.present.iter_mut().zip(&self.scratch_present) {
                    *any |= p;
                }
            }
            self.device_sum = match (self.device_sum.take(), flat) {
                (Some(sum), Some(flat)) => Some(sum + flat),
                (sum, flat) => sum.or(flat),
            };
            return Ok(());
        }
        if self.pending == 0 {
            flatten_selected_grads_into(model, grads, &self.trainable, &mut self.flat, &mut self.present)
                .map_err(model_err)?;
            return Ok(());
        }
        flatten_selected_grads_into(
            model,
            grads,
            &self.trainable,
            &mut self.scratch,
            &mut self.scratch_present,
        )
        .map_err(model_err)?;
        for (sum, g) in self.flat.iter_mut().zip(&self.scratch) {
            *sum += g;
        }
        for (any, p) in self.present.iter_mut().zip(&self.scratch_present) {
            *any |= p;
        }
        Ok(())
    }
}

/// One line per float tensor: `path [shape] trainable|buffer`.
fn describe(layout: &ParamLayout, trainable: &[bool]) -> Vec<String> {
    layout
        .params
        .iter()
        .zip(trainable)
        .map(|(p, &t)| format!("{} {:?} {}", p.name, p.shape, if t { "trainable" } else { "buffer" }))
        .collect()
}

/// Checks that every rank of `group` holds the same model: one all-gather of a 64-bit digest;
/// only when they differ, a second exchange of the descriptions so that every rank reports the
/// same first difference.
fn agree_on_layout(group: &ProcessGroup, layout: &ParamLayout, trainable: &[bool]) -> Result<(), DdpError> {
    let lines = describe(layout, trainable);
    let text = lines.join("\n");
    let digest = Sha256::digest(text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let ours = i64::from_le_bytes(first);
    let n = group.world_size();
    let mut digests = vec![0i64; n];
    group.all_gather(&[ours], &mut digests)?;
    let Some(rank_b) = (1..n).find(|&r| digests[r] != digests[0]) else {
        return Ok(());
    };
    // Rare path: exchange the descriptions (padded to the longest) to name the difference.
    let mut lengths = vec![0i64; n];
    group.all_gather(&[text.len() as i64], &mut lengths)?;
    let longest = lengths.iter().copied().max().unwrap_or(0).max(0) as usize;
    let mut padded = text.clone().into_bytes();
    padded.resize(longest, 0);
    let mut all = vec![0u8; longest * n];
    group.all_gather(&padded, &mut all)?;
    let text_of = |r: usize| {
        let bytes = &all[r * longest..r * longest + lengths[r].max(0) as usize];
        String::from_utf8_lossy(bytes).into_owned()
    };
    let (a, b) = (text_of(0), text_of(rank_b));
    let (a_lines, b_lines): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let index = (0..a_lines.len().max(b_lines.len()))
        .find(|&i| a_lines.get(i) != b_lines.get(i))
        .unwrap_or(0);
    let line = |lines: &[&str]| lines.get(index).map_or("(nothing)".to_owned(), |l| (*l).to_owned());
    let ranks = group.global_ranks();
    Err(DdpError::ModelMismatch {
        rank: ranks[group.rank()],
        rank_a: ranks[0],
        rank_b: ranks[rank_b],
        index,
        a: line(&a_lines),
        b: line(&b_lines),
    })
}
