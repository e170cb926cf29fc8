//! PowerSGD on the gradients' device (`compression.method = "powersgd"` on the device path): the
//! host codec's algorithm ([`PowerSgd`], whose text has the steps and the reasons), bucket by
//! bucket over the host engine's buckets and parameter shapes, computed with burn tensor ops on
//! the device where the flat gradient lives. Per bucket:
//!
//! 1. `M = gradient + residual` (error feedback);
//! 2. `P = M Q` for every factored matrix (a matmul), then the dense tensors: ONE sum over the
//!    ranks through a [`DeviceSum`];
//! 3. one read of one number: whether that sum is finite. If not (an overflow the loss scaler
//!    will skip), every rank returns NaN for the factored matrices and the dense average, and
//!    keeps its state, as the host codec does;
//! 4. Gram-Schmidt on each `P`'s r columns, on the device: a column's projections on the earlier
//!    ones are removed twice (two matmuls per pass: "twice is enough"), then it is normalised, or
//!    dropped (zeroed) when what is left is below [`DEPENDENT_COLUMN_RATIO`] of its norm before;
//!    that comparison runs on the device too (a mask), so no norm is read back;
//! 5. `Q_i = M_i^T P^` and the residual `M_i - P^ Q_i^T` (matmuls); ONE sum of the Q factors;
//! 6. the decoded average `P^ Q_avg^T`, the dense tensors `sum / n`;
//! 7. one read of one number plus r per factored matrix: whether `Q_avg` is finite (then it is
//!    the next step's warm start) and which of its columns vanished (redrawn from the seed and
//!    the step, the host codec's draw, uploaded: a rare path).
//!
//! So a bucket costs two small reads (two synchronisations of the device) besides its two sums.
//!
//! The plans (which parameters are factored, by `min_compression_rate`), the seeded initial Q and
//! the redraws are the host codec's own code, so both agree on every decision but the ones that
//! turn on the last bits of a norm. The arithmetic differs in rounding only: sums in f32 on the
//! device (the host sums column dots and norms in f64), classical Gram-Schmidt run twice (the
//! host: modified, twice), and burn's matmuls add in their own order. The relative error of
//! what was held back is not measured here (the device path reports none).
//!
//! The state is kept on the device: a residual per bucket and the Q factors of a bucket
//! concatenated, as the host codec keeps them; [`FlatReduce::residual`] and
//! [`FlatReduce::factors`] read them back under the host codec's names, so a checkpoint of
//! either path resumes the other.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::ddp::{DdpError, FlatReduce};
use super::params::read_flat;
use crate::comm::{ProcessGroup, ReduceOp};
use crate::compress::{
    fresh_column, q_name, BucketPlan, CompressError, GradCodec, LowRank, PowerSgd, StateTensor, DEPENDENT_COLUMN_RATIO,
};

/// Sums a 1-D f32 tensor over the ranks of a group, on the tensor's device: the one collective
/// of a codec that runs on the device (PowerSGD's P and Q factors).
pub trait DeviceSum: Send + std::fmt::Debug {
    /// The element-wise sum over the ranks of `values` (same length on every rank), on
    /// `values`' device. Collective: every rank calls it with the same length, in the same order.
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DdpError>;

    /// Ranks summed over.
    fn world_size(&self) -> usize;

    /// This rank's global rank, for messages.
    fn rank(&self) -> usize;
}

/// [`DeviceSum`] through the host: one read from the device, the host group's all-reduce, one
/// upload. Runs on any device; the device path's stand-in for NCCL in tests.
#[derive(Debug, Clone)]
pub struct HostDeviceSum {
    group: ProcessGroup,
}

impl HostDeviceSum {
    /// Sums over `group`.
    pub fn new(group: &ProcessGroup) -> Self {
        Self { group: group.clone() }
    }
}

impl DeviceSum for HostDeviceSum {
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        let rank = self.rank();
        let device = values.device();
        let mut host = Vec::with_capacity(values.dims()[0]);
        read_flat(values, &mut host).map_err(|source| DdpError::Model { rank, source })?;
        self.group.all_reduce(&mut host, ReduceOp::Sum)?;
        Ok(upload(host, &device))
    }

    fn world_size(&self) -> usize {
        self.group.world_size()
    }

    fn rank(&self) -> usize {
        self.group.global_ranks()[self.group.rank()]
    }
}

/// NCCL's sum on the device pointer (`ReduceOp::Sum` in place, feature `cuda`).
#[cfg(feature = "cuda")]
impl DeviceSum for super::DeviceAllReduce {
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        Ok(super::DeviceAllReduce::sum(self, values)?)
    }

    fn world_size(&self) -> usize {
        use crate::comm::Communicator;
        self.communicator().world_size()
    }

    fn rank(&self) -> usize {
        super::DeviceAllReduce::rank(self)
    }
}

/// PowerSGD with error feedback on the gradients' device (see the module's text).
pub struct DevicePowerSgd {
    sum: Box<dyn DeviceSum>,
    /// The host codec: its options, plans and draws (its own state is not used).
    codec: PowerSgd,
    buckets: Vec<DeviceBucket>,
    state: Mutex<State>,
}

/// One bucket: its elements in the flat gradient and the host codec's plan of it (whose `q` is
/// the seeded initial factor).
#[derive(Debug)]
struct DeviceBucket {
    elements: Range<usize>,
    plan: BucketPlan,
}

/// What changes from step to step.
#[derive(Debug, Default)]
struct State {
    /// The optimizer step of the next average ([`FlatReduce::set_step`]).
    step: u64,
    /// Per bucket, the residual; `None` until the bucket is first averaged (or loaded).
    residuals: Vec<Option<Stored>>,
    /// Per bucket, its Q factors concatenated; `None` until first averaged (or loaded).
    factors: Vec<Option<Stored>>,
}

/// A state tensor: on the host as loaded from a checkpoint (the device is known at the first
/// step), on the device after (boxed: a burn tensor is large with the CUDA backend built in).
#[derive(Debug)]
enum Stored {
    Host(Vec<f32>),
    Device(Box<Tensor<1>>),
}

impl Stored {
    /// The tensor on `device`, uploaded (once) if it is still on the host.
    fn on(&mut self, device: &Device) -> Tensor<1> {
        let tensor = match self {
            Stored::Device(tensor) => return (**tensor).clone(),
            Stored::Host(values) => upload(std::mem::take(values), device),
        };
        *self = Stored::Device(Box::new(tensor.clone()));
        tensor
    }

    /// The values, read back if on the device.
    fn read(&self, rank: usize) -> Result<Vec<f32>, DdpError> {
        match self {
            Stored::Host(values) => Ok(values.clone()),
            Stored::Device(tensor) => read((**tensor).clone(), rank),
        }
    }
}

impl std::fmt::Debug for DevicePowerSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePowerSgd")
            .field("codec", &self.codec.describe())
            .field("buckets", &self.buckets.len())
            .field("sum", &self.sum)
            .finish_non_exhaustive()
    }
}

impl DevicePowerSgd {
    /// PowerSGD with `codec`'s options (rank, error feedback, seed, `min_compression_rate`) over
    /// `buckets` (ranges of the flat gradient, in order, covering it from element 0: the host
    /// engine's buckets), whose parameters have the shapes `shapes[b]`, summing through `sum`.
    pub fn new(
        sum: Box<dyn DeviceSum>,
        codec: PowerSgd,
        buckets: &[Range<usize>],
        shapes: &[Vec<Vec<usize>>],
    ) -> Result<Self, DdpError> {
        let rank = sum.rank();
        let layout = |bucket: usize, reason: String| {
            DdpError::Codec(CompressError::Layout {
                rank,
                method: codec.name(),
                bucket,
                reason,
            })
        };
        if buckets.len() != shapes.len() {
            return Err(layout(
                buckets.len().min(shapes.len()),
                format!("{} buckets but shapes for {}", buckets.len(), shapes.len()),
            ));
        }
        let mut next = 0;
        let mut planned = Vec::with_capacity(buckets.len());
        for (bucket, (elements, shapes)) in buckets.iter().zip(shapes).enumerate() {
            if elements.start != next {
                return Err(layout(
                    bucket,
                    format!("it starts at element {}, the one before ends at {next}", elements.start),
                ));
            }
            let numel: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            if numel != elements.len() {
                return Err(layout(
                    bucket,
                    format!(
                        "the shapes {shapes:?} hold {numel} elements but the bucket has {}",
                        elements.len()
                    ),
                ));
            }
            next = elements.end;
            planned.push(DeviceBucket {
                elements: elements.clone(),
                plan: codec.plan(bucket, shapes),
            });
        }
        let state = State {
            step: 0,
            residuals: planned.iter().map(|_| None).collect(),
            factors: planned.iter().map(|_| None).collect(),
        };
        Ok(Self {
            sum,
            codec,
            buckets: planned,
            state: Mutex::new(state),
        })
    }

    /// The average of `flat` (the whole flat gradient, on its device) over the ranks, each bucket
    /// sent as its rank-r factors and dense tensors; f32, on `flat`'s device.
    pub fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        let rank = self.sum.rank();
        let numel = flat.dims()[0];
        let covered = self.covered();
        if covered != numel {
            return Err(DdpError::Device {
                reason: format!(
                    "rank {rank}: powersgd on the device: the buckets cover {covered} gradient elements, the flat \
                     gradient has {numel}"
                ),
            });
        }
        if self.buckets.is_empty() {
            return Ok(flat);
        }
        let device = flat.device();
        let flat = flat.cast(DType::F32);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut averaged = Vec::with_capacity(self.buckets.len());
        for (index, bucket) in self.buckets.iter().enumerate() {
            let grad = flat.clone().slice(bucket.elements.clone());
            averaged.push(self.bucket(index, bucket, grad, &mut state, &device)?);
        }
        Ok(Tensor::cat(averaged, 0))
    }

    /// Elements of the flat gradient the buckets cover.
    fn covered(&self) -> usize {
        self.buckets.last().map_or(0, |b| b.elements.end)
    }

    /// Averages bucket `b` (`grad`, its elements) and updates its state.
    fn bucket(
        &self,
        b: usize,
        bucket: &DeviceBucket,
        grad: Tensor<1>,
        state: &mut State,
        device: &Device,
    ) -> Result<Tensor<1>, DdpError> {
        let (plan, numel) = (&bucket.plan, bucket.elements.len());
        if numel == 0 {
            return Ok(grad);
        }
        let rank = self.sum.rank();
        let step = state.step;
        let world = self.sum.world_size() as f32;
        let feedback = self.codec.error_feedback();
        // The pieces that hold elements, with their index in the bucket (the host codec's).
        let pieces: Vec<_> = plan.pieces.iter().enumerate().filter(|(_, p)| p.numel > 0).collect();

        // First sight: a zero residual and the seeded Q, kept even if this step is not finite.
        let residual = feedback.then(|| {
            state.residuals[b]
                .get_or_insert_with(|| Stored::Device(Box::new(Tensor::zeros([numel], (device, DType::F32)))))
                .on(device)
        });
        let q = state.factors[b]
            .get_or_insert_with(|| Stored::Host(plan.q.clone()))
            .on(device);

        // 1. M = gradient + residual.
        let m = match residual {
            Some(residual) => grad + residual,
            None => grad,
        };

        // 2. P = M Q for every factored matrix, the dense tensors after them; one sum.
        let mut sent = Vec::with_capacity(pieces.len());
        for (_, piece) in &pieces {
            if let Some(low) = piece.low_rank {
                // [rows, cols] x [cols, r] = [rows, r]
                let p = matrix(&m, piece.start, low).matmul(factor(&q, low));
                sent.push(p.reshape([low.rows * low.rank]));
            }
        }
        for (_, piece) in &pieces {
            if piece.low_rank.is_none() {
                sent.push(m.clone().slice(piece.start..piece.start + piece.numel));
            }
        }
        let p = self
            .sum
            .sum(Tensor::cat(sent, 0))
            .map_err(|e| self.collective_err(b, step, "P", e))?;
        let dense = |start: usize, numel: usize| p.clone().slice(start..start + numel).div_scalar(world);

        // 3. The sum is identical on every rank: a non-finite one makes every rank return
        // non-finite values and keep its state.
        if !all_finite(p.clone(), rank)? {
            let out = pieces
                .iter()
                .map(|(_, piece)| match piece.low_rank {
                    Some(_) => Tensor::full([piece.numel], f32::NAN, (device, DType::F32)),
                    None => dense(piece.p_offset, piece.numel),
                })
                .collect();
            return Ok(Tensor::cat(out, 0));
        }

        // 4.-5. Orthonormalise each P, then this rank's Q_i = M_i^T P^ and residual M_i - P^ Q_i^T.
        // Per piece, its P^ when factored.
        let mut p_hats: Vec<Option<Tensor<2>>> = Vec::with_capacity(pieces.len());
        let mut q_parts = Vec::new();
        let mut residual_parts = Vec::new();
        for (_, piece) in &pieces {
            let Some(low) = piece.low_rank else {
                if feedback {
                    residual_parts.push(Tensor::zeros([piece.numel], (device, DType::F32)));
                }
                p_hats.push(None);
                continue;
            };
            let m_i = matrix(&m, piece.start, low); // [rows, cols]
            let p_i = p
                .clone()
                .slice(piece.p_offset..piece.p_offset + low.rows * low.rank)
                .reshape([low.rows, low.rank]);
            let p_hat = orthonormalize(p_i); // [rows, r]
            let q_i = m_i.clone().transpose().matmul(p_hat.clone()); // [cols, r]
            if feedback {
                let lost = m_i - p_hat.clone().matmul(q_i.clone().transpose()); // [rows, cols]
                residual_parts.push(lost.reshape([piece.numel]));
            }
            q_parts.push(q_i.reshape([low.cols * low.rank]));
            p_hats.push(Some(p_hat));
        }
        if feedback {
            state.residuals[b] = Some(Stored::Device(Box::new(Tensor::cat(residual_parts, 0))));
        }
        if q_parts.is_empty() {
            // Nothing factored: every tensor went dense.
            let out = pieces
                .iter()
                .map(|(_, piece)| dense(piece.p_offset, piece.numel))
                .collect();
            return Ok(Tensor::cat(out, 0));
        }

        // 6. Q_avg, and the decoded average P^ Q_avg^T; dense tensors are their sum / n.
        let q_avg = self
            .sum
            .sum(Tensor::cat(q_parts, 0))
            .map_err(|e| self.collective_err(b, step, "Q", e))?
            .div_scalar(world);
        let out: Vec<Tensor<1>> = pieces
            .iter()
            .zip(p_hats)
            .map(|((_, piece), p_hat)| match (piece.low_rank, p_hat) {
                // [rows, r] x [r, cols] = [rows, cols]
                (Some(low), Some(p_hat)) => p_hat.matmul(factor(&q_avg, low).transpose()).reshape([piece.numel]),
                _ => dense(piece.p_offset, piece.numel),
            })
            .collect();

        // 7. Warm start: the averaged Q (identical everywhere) seeds the next step, if finite;
        // a column that vanished (a zero gradient) would stay zero forever, so it is redrawn.
        let lows: Vec<(usize, LowRank)> = pieces
            .iter()
            .filter_map(|(index, piece)| piece.low_rank.map(|low| (*index, low)))
            .collect();
        let mut probes = vec![q_avg.clone().mul_scalar(0.0).sum()];
        for (_, low) in &lows {
            // Per column, the sum of magnitudes: exactly 0 when the column is all zeros.
            probes.push(factor(&q_avg, *low).abs().sum_dim(0).reshape([low.rank]));
        }
        let probed = read(Tensor::cat(probes, 0), rank)?;
        if probed[0] == 0.0 {
            let mut next = q_avg;
            let mut column_sums = probed[1..].iter().copied();
            for (index, low) in lows {
                for column in 0..low.rank {
                    if column_sums.next() == Some(0.0) {
                        let fresh = fresh_column(self.codec.seed(), step, b, index, column, low.cols);
                        next = replace_column(next, low, column, fresh, device);
                    }
                }
            }
            state.factors[b] = Some(Stored::Device(Box::new(next)));
        }
        Ok(Tensor::cat(out, 0))
    }

    /// A failed sum of bucket `b`'s `what` factors, named: a collective's error as the host
    /// codec names it (method, bucket, step), anything else with this rank.
    fn collective_err(&self, b: usize, step: u64, what: &str, e: DdpError) -> DdpError {
        match e {
            DdpError::Comm(source) => DdpError::Codec(CompressError::Comm {
                method: self.codec.name(),
                bucket: b,
                step,
                source,
            }),
            other => DdpError::Device {
                reason: format!(
                    "rank {}: powersgd on the device, bucket {b}, step {step}: the sum of the {what} factors: {other}",
                    self.sum.rank()
                ),
            },
        }
    }
}

impl FlatReduce for DevicePowerSgd {
    fn average(&self, flat: Tensor<1>) -> Result<Tensor<1>, DdpError> {
        DevicePowerSgd::average(self, flat)
    }

    /// Every bucket's residual one after another; `None` without error feedback and before the
    /// first step (or load).
    fn residual(&self) -> Result<Option<Vec<f32>>, DdpError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.codec.error_feedback() || state.residuals.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut flat = Vec::with_capacity(self.covered());
        for (bucket, residual) in self.buckets.iter().zip(&state.residuals) {
            match residual {
                Some(residual) => flat.extend(residual.read(self.sum.rank())?),
                None => flat.resize(bucket.elements.end, 0.0),
            }
        }
        Ok(Some(flat))
    }

    fn load_residual(&self, flat: &[f32]) -> Result<(), DdpError> {
        if !self.codec.error_feedback() {
            return Ok(());
        }
        let covered = self.covered();
        if flat.len() != covered {
            return Err(DdpError::Device {
                reason: format!(
                    "rank {}: powersgd on the device: a residual of {} values for buckets of {covered}",
                    self.sum.rank(),
                    flat.len()
                ),
            });
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.residuals = self
            .buckets
            .iter()
            .map(|b| Some(Stored::Host(flat[b.elements.clone()].to_vec())))
            .collect();
        Ok(())
    }

    /// The Q factor (`[cols, r]`) of every factored parameter of every bucket averaged (or
    /// loaded) so far, as `q.bucket<b>.param<i>`: the host codec's [`GradCodec::state`] names.
    fn factors(&self) -> Result<Vec<StateTensor>, DdpError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (b, (bucket, stored)) in self.buckets.iter().zip(&state.factors).enumerate() {
            let Some(stored) = stored else { continue };
            let q = stored.read(self.sum.rank())?;
            for (index, piece) in bucket.plan.pieces.iter().enumerate() {
                if let Some(low) = piece.low_rank {
                    out.push(StateTensor {
                        name: q_name(b, index),
                        shape: vec![low.cols, low.rank],
                        data: q[low.q_offset..low.q_offset + low.cols * low.rank].to_vec(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// As the host codec's `load_state`: a bucket with at least one saved factor takes it (its
    /// other factors freshly seeded), a bucket with none starts as on its first step. All or
    /// nothing: a factor of another shape than the bucket's plan is an error naming both.
    fn load_factors(&self, tensors: &[StateTensor]) -> Result<(), DdpError> {
        let by_name: HashMap<&str, &StateTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut loaded = Vec::with_capacity(self.buckets.len());
        for (b, bucket) in self.buckets.iter().enumerate() {
            let mut q = bucket.plan.q.clone();
            let mut any = false;
            for (index, piece) in bucket.plan.pieces.iter().enumerate() {
                let Some(low) = piece.low_rank else { continue };
                let name = q_name(b, index);
                let Some(tensor) = by_name.get(name.as_str()) else {
                    continue;
                };
                let expected = vec![low.cols, low.rank];
                if tensor.shape != expected || tensor.data.len() != low.cols * low.rank {
                    return Err(DdpError::Codec(CompressError::StateShape {
                        method: self.codec.name(),
                        name,
                        expected,
                        found: tensor.shape.clone(),
                    }));
                }
                q[low.q_offset..low.q_offset + tensor.data.len()].copy_from_slice(&tensor.data);
                any = true;
            }
            loaded.push(any.then_some(Stored::Host(q)));
        }
        self.state.lock().unwrap_or_else(|p| p.into_inner()).factors = loaded;
        Ok(())
    }

    fn set_step(&self, step: u64) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).step = step;
    }
}

/// `values` as a 1-D f32 tensor on `device`.
fn upload(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), (device, DType::F32))
}

/// A small tensor's values, read back (one synchronisation).
fn read(tensor: Tensor<1>, rank: usize) -> Result<Vec<f32>, DdpError> {
    let mut out = Vec::with_capacity(tensor.dims()[0]);
    read_flat(tensor, &mut out).map_err(|source| DdpError::Model { rank, source })?;
    Ok(out)
}

/// Whether every element is finite: `x * 0` is 0 for finite `x` and NaN otherwise, so the sum is
/// 0 exactly when all are (one number read back).
fn all_finite(values: Tensor<1>, rank: usize) -> Result<bool, DdpError> {
    Ok(read(values.mul_scalar(0.0).sum(), rank)?[0] == 0.0)
}

/// The parameter at `start` of the bucket `m`, viewed as its `[rows, cols]` matrix.
fn matrix(m: &Tensor<1>, start: usize, low: LowRank) -> Tensor<2> {
    m.clone()
        .slice(start..start + low.rows * low.cols)
        .reshape([low.rows, low.cols])
}

/// The `[cols, r]` factor of `low` in a bucket's concatenated Q factors.
fn factor(q: &Tensor<1>, low: LowRank) -> Tensor<2> {
    q.clone()
        .slice(low.q_offset..low.q_offset + low.cols * low.rank)
        .reshape([low.cols, low.rank])
}

/// `q` (a bucket's concatenated factors) with column `column` of `low`'s factor set to `values`.
fn replace_column(q: Tensor<1>, low: LowRank, column: usize, values: Vec<f32>, device: &Device) -> Tensor<1> {
    let fresh = upload(values, device).reshape([low.cols, 1]);
    let updated = factor(&q, low).slice_assign([0..low.cols, column..column + 1], fresh);
    q.slice_assign(
        low.q_offset..low.q_offset + low.cols * low.rank,
        updated.reshape([low.cols * low.rank]),
    )
}

/// Gram-Schmidt on the columns of `p` (`[rows, r]`), on its device: each column's projections on
/// the earlier (orthonormal or zero) columns removed twice, then normalised, or zeroed when what
/// is left is below [`DEPENDENT_COLUMN_RATIO`] of its norm before (linearly dependent).
fn orthonormalize(p: Tensor<2>) -> Tensor<2> {
    let [rows, r] = p.dims();
    let mut columns: Vec<Tensor<2>> = Vec::with_capacity(r);
    for c in 0..r {
        let mut column = p.clone().slice([0..rows, c..c + 1]); // [rows, 1]
        let norm_before = column.clone().square().sum().sqrt(); // [1]
        if c > 0 {
            let basis = Tensor::cat(columns.clone(), 1); // [rows, c]
            for _pass in 0..2 {
                let dots = basis.clone().transpose().matmul(column.clone()); // [c, 1]
                column = column - basis.clone().matmul(dots); // [rows, 1]
            }
        }
        let norm = column.clone().square().sum().sqrt(); // [1]
                                                         // norm > ratio * norm_before also rules out a zero norm (the host codec's two tests).
        let keep = norm.clone().greater(norm_before.mul_scalar(DEPENDENT_COLUMN_RATIO));
        let scale = norm.zeros_like().mask_where(keep, norm.recip()); // [1]
        columns.push(column * scale.unsqueeze::<2>());
    }
    Tensor::cat(columns, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_schmidt_on_the_device_gives_orthonormal_columns_and_drops_dependent_ones() {
        let device = Device::flex();
        let (rows, r) = (6, 3);
        let mut values: Vec<f32> = (0..rows * r).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
        // Column 2 = column 0 + column 1: dependent.
        for i in 0..rows {
            values[i * r + 2] = values[i * r] + values[i * r + 1];
        }
        let p = upload(values, &device).reshape([rows, r]);
        let p_hat = orthonormalize(p);
        let gram = read(p_hat.clone().transpose().matmul(p_hat.clone()).reshape([r * r]), 0).unwrap();
        for a in 0..2 {
            for b in 0..2 {
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((gram[a * r + b] - want).abs() < 1e-6, "columns {a}, {b}: {gram:?}");
            }
        }
        let out = read(p_hat.reshape([rows * r]), 0).unwrap();
        assert!(
            (0..rows).all(|i| out[i * r + 2] == 0.0),
            "the dependent column is dropped: {out:?}"
        );
    }
}
