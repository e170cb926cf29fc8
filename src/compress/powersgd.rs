//! `powersgd`: rank-r approximation of each gradient matrix (Vogels, Karimireddy and Jaggi, 2019).
//!
//! Each parameter of two or more dims is viewed as a matrix `M` of `[rows, cols] = [shape[0],
//! product of the rest]` (its row-major layout, unchanged). With `Q` of `[cols, r]`, identical on
//! every rank and warm-started from the previous step, one step is:
//!
//! 1. `M = gradient + residual` (error feedback);
//! 2. `P = M Q` (`[rows, r]`), summed over ranks: all P factors of the bucket go in ONE
//!    all-reduce, together with the tensors sent uncompressed;
//! 3. `P^ = orthonormal columns of P` (Gram-Schmidt, the one orthogonalization of the step);
//! 4. `Q_i = M_i^T P^` (`[cols, r]`), averaged over ranks: all Q factors in ONE all-reduce;
//! 5. decoded average `= P^ Q_avg^T = (1/n) sum_i P^ P^^T M_i`: rank i contributed the projection
//!    `P^ P^^T M_i` of its matrix onto the shared column space, and keeps the rest,
//!    `M_i - P^ Q_i^T`, as its residual;
//! 6. `Q_avg` is the next step's `Q` (warm start: one power iteration per step).
//!
//! Tensors of one dim (biases, norms), scalars, and matrices whose factors would not be at least
//! `min_compression_rate` times smaller than the matrix itself are summed uncompressed in step 2.

use super::codec::{check_shapes, collective, CodecStats, GradCodec};
use super::error::CompressError;
use super::feedback::{all_finite, relative_error, ErrorFeedback};
use super::state::{q_name, StateTensor, StateTensors};
use crate::comm::{ProcessGroup, ReduceOp};

/// Default of `min_compression_rate`: a matrix is factored only when its factors are at most half
/// its size (torch's PowerSGD default); below that the approximation error buys too few bytes.
pub const DEFAULT_MIN_COMPRESSION_RATE: f64 = 2.0;

/// A column of `P` whose norm after removing the earlier columns falls below this fraction of its
/// norm before is linearly dependent on them (f32 round-off is about 1e-7 per operation); it is
/// dropped rather than normalised into noise, and its share of `M` stays in the residual. The
/// device codec (`parallel::DevicePowerSgd`) takes the same decision with it.
pub(crate) const DEPENDENT_COLUMN_RATIO: f64 = 1e-5;

/// Low-rank gradient compression with error feedback and warm-started factors.
#[derive(Debug)]
pub struct PowerSgd {
    rank: usize,
    seed: u64,
    min_compression_rate: f64,
    feedback: ErrorFeedback,
    /// Indexed by bucket; `None` until the bucket is first seen.
    buckets: Vec<Option<BucketPlan>>,
}

/// How one bucket is cut into factored matrices and dense tensors, and its warm-start Q factors.
/// The device codec (`parallel::DevicePowerSgd`) plans its buckets with the same rules.
#[derive(Debug)]
pub(crate) struct BucketPlan {
    pub(crate) shapes: Vec<Vec<usize>>,
    pub(crate) pieces: Vec<Piece>,
    /// Elements of the P all-reduce: every P factor, then every dense tensor.
    pub(crate) p_len: usize,
    /// Elements of the Q all-reduce: every Q factor.
    pub(crate) q_len: usize,
    /// The current Q factors, concatenated (identical on every rank).
    pub(crate) q: Vec<f32>,
}

/// One parameter of a bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    /// First element in the bucket.
    pub(crate) start: usize,
    /// Elements.
    pub(crate) numel: usize,
    /// Offset of its P factor (or its dense copy) in the P buffer.
    pub(crate) p_offset: usize,
    /// `Some` when factored.
    pub(crate) low_rank: Option<LowRank>,
}

/// A factored parameter: its matrix view and where its Q factor sits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LowRank {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rank: usize,
    /// Offset of its Q factor in the Q buffer.
    pub(crate) q_offset: usize,
}

impl PowerSgd {
    /// Rank-`rank` factors (at least 1), Q initialised from `seed` (the same on every rank), with
    /// [`DEFAULT_MIN_COMPRESSION_RATE`].
    pub fn new(rank: usize, error_feedback: bool, seed: u64) -> Self {
        Self {
            rank: rank.max(1),
            seed,
            min_compression_rate: DEFAULT_MIN_COMPRESSION_RATE,
            feedback: ErrorFeedback::new(error_feedback),
            buckets: Vec::new(),
        }
    }

    /// Factors a matrix only when `rows * cols > rate * r * (rows + cols)`. 0 factors every matrix,
    /// even when the factors are larger than the matrix (useful to test full-rank reconstruction).
    pub fn with_min_compression_rate(mut self, rate: f64) -> Self {
        self.min_compression_rate = rate;
        self
    }

    /// The rank of the factors.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether what is not sent is carried into the next step.
    pub(crate) fn error_feedback(&self) -> bool {
        self.feedback.enabled()
    }

    /// The seed of the Q factors.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// Builds the plan for a bucket of these shapes, with freshly seeded Q factors.
    pub(crate) fn plan(&self, bucket: usize, shapes: &[Vec<usize>]) -> BucketPlan {
        let (mut pieces, mut start, mut p_len, mut q_len) = (Vec::new(), 0, 0, 0);
        for shape in shapes {
            let numel: usize = shape.iter().product();
            let rows = shape.first().copied().unwrap_or(1);
            let cols = numel.checked_div(rows).unwrap_or(0);
            let rank = self.rank.min(rows).min(cols);
            let factored = shape.len() >= 2
                && rank > 0
                && (rows * cols) as f64 > self.min_compression_rate * (rank * (rows + cols)) as f64;
            let low_rank = factored.then(|| {
                let low = LowRank {
                    rows,
                    cols,
                    rank,
                    q_offset: q_len,
                };
                q_len += cols * rank;
                low
            });
            pieces.push(Piece {
                start,
                numel,
                p_offset: 0,
                low_rank,
            });
            start += numel;
        }
        // P buffer: factors first, then the dense tensors.
        for piece in pieces.iter_mut().filter(|p| p.low_rank.is_some()) {
            piece.p_offset = p_len;
            p_len += piece.low_rank.map_or(0, |l| l.rows * l.rank);
        }
        for piece in pieces.iter_mut().filter(|p| p.low_rank.is_none()) {
            piece.p_offset = p_len;
            p_len += piece.numel;
        }
        let mut q = vec![0f32; q_len];
        for (index, piece) in pieces.iter().enumerate() {
            if let Some(low) = piece.low_rank {
                let mut rng = SplitMix64::for_factor(self.seed, bucket, index);
                q[low.q_offset..low.q_offset + low.cols * low.rank]
                    .iter_mut()
                    .for_each(|x| *x = rng.normal());
            }
        }
        BucketPlan {
            shapes: shapes.to_vec(),
            pieces,
            p_len,
            q_len,
            q,
        }
    }
}

impl GradCodec for PowerSgd {
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        let method = self.name();
        check_shapes(group, method, bucket, shapes, grads.len())?;
        let (rank, world) = (group.rank(), group.world_size() as f32);
        if self.buckets.len() <= bucket {
            self.buckets.resize_with(bucket + 1, || None);
        }
        if self.buckets[bucket].is_none() {
            self.buckets[bucket] = Some(self.plan(bucket, shapes));
        }
        // Invariant: the slot was filled just above.
        let plan = self.buckets[bucket].as_mut().expect("bucket plan exists");
        if plan.shapes != shapes {
            return Err(CompressError::Layout {
                rank,
                method,
                bucket,
                reason: format!(
                    "the shapes changed from {:?} to {shapes:?} since the first step",
                    plan.shapes
                ),
            });
        }
        let mut residual = self.feedback.residual_mut(rank, method, bucket, grads.len())?;
        let before = group.bytes_sent();

        // 1. M = gradient + residual (the old residual is kept until the step is known finite).
        if let Some(r) = residual.as_deref() {
            grads.iter_mut().zip(r).for_each(|(g, &r)| *g += r);
        }
        let input_sq: f64 = grads.iter().map(|&x| f64::from(x) * f64::from(x)).sum();

        // 2. P = M Q for every factored matrix, dense tensors copied after them; one sum.
        let mut p = vec![0f32; plan.p_len];
        for piece in &plan.pieces {
            let m = &grads[piece.start..piece.start + piece.numel];
            match piece.low_rank {
                Some(low) => {
                    let q = &plan.q[low.q_offset..low.q_offset + low.cols * low.rank];
                    mat_mul(m, q, &mut p[piece.p_offset..piece.p_offset + low.rows * low.rank], low);
                }
                None => p[piece.p_offset..piece.p_offset + piece.numel].copy_from_slice(m),
            }
        }
        if !p.is_empty() {
            collective(method, bucket, step, group.all_reduce(&mut p, ReduceOp::Sum))?;
        }
        let wire_bytes = 4 * (plan.p_len + plan.q_len) as u64;

        // The sum is identical on every rank: a non-finite one (an overflow the loss scaler will
        // skip) makes every rank return non-finite values and keep its state.
        if !all_finite(&p) {
            for piece in &plan.pieces {
                let out = &mut grads[piece.start..piece.start + piece.numel];
                match piece.low_rank {
                    Some(_) => out.fill(f32::NAN),
                    None => {
                        let sum = &p[piece.p_offset..piece.p_offset + piece.numel];
                        out.iter_mut().zip(sum).for_each(|(g, &s)| *g = s / world);
                    }
                }
            }
            return Ok(CodecStats {
                wire_bytes,
                transport_bytes: group.bytes_sent().saturating_sub(before),
                relative_error: f64::NAN,
                compressed: plan.q_len > 0,
            });
        }

        // 3.-4. Orthonormalise each P, then this rank's Q_i = M_i^T P^ and residual M_i - P^ Q_i^T.
        let mut q_sum = vec![0f32; plan.q_len];
        let mut lost_sq = 0f64;
        for piece in &plan.pieces {
            let range = piece.start..piece.start + piece.numel;
            let Some(low) = piece.low_rank else {
                if let Some(r) = residual.as_deref_mut() {
                    r[range].fill(0.0);
                }
                continue;
            };
            let p_hat = &mut p[piece.p_offset..piece.p_offset + low.rows * low.rank];
            orthonormalize_columns(p_hat, low.rows, low.rank);
            let q_i = &mut q_sum[low.q_offset..low.q_offset + low.cols * low.rank];
            mat_t_mul(&grads[range.clone()], p_hat, q_i, low);
            lost_sq += residual_of(
                &grads[range.clone()],
                p_hat,
                q_i,
                low,
                residual.as_deref_mut().map(|r| &mut r[range]),
            );
        }

        // 5. Q_avg, and the decoded average P^ Q_avg^T; dense tensors are their sum / n.
        if !q_sum.is_empty() {
            collective(method, bucket, step, group.all_reduce(&mut q_sum, ReduceOp::Sum))?;
        }
        q_sum.iter_mut().for_each(|q| *q /= world);
        for piece in &plan.pieces {
            let out = &mut grads[piece.start..piece.start + piece.numel];
            match piece.low_rank {
                Some(low) => {
                    let p_hat = &p[piece.p_offset..piece.p_offset + low.rows * low.rank];
                    let q_avg = &q_sum[low.q_offset..low.q_offset + low.cols * low.rank];
                    outer(p_hat, q_avg, out, low);
                }
                None => {
                    let sum = &p[piece.p_offset..piece.p_offset + piece.numel];
                    out.iter_mut().zip(sum).for_each(|(g, &s)| *g = s / world);
                }
            }
        }

        // 6. Warm start: the averaged Q (identical everywhere) seeds the next step. A column that
        // vanished (a zero gradient) would stay zero forever, so it is drawn afresh.
        if all_finite(&q_sum) {
            for (index, piece) in plan.pieces.iter().enumerate() {
                if let Some(low) = piece.low_rank {
                    let q = &mut q_sum[low.q_offset..low.q_offset + low.cols * low.rank];
                    reseed_zero_columns(q, low, self.seed, step, bucket, index);
                }
            }
            plan.q = q_sum;
        }

        Ok(CodecStats {
            wire_bytes,
            transport_bytes: group.bytes_sent().saturating_sub(before),
            relative_error: relative_error(lost_sq, input_sq),
            compressed: plan.q_len > 0,
        })
    }

    fn name(&self) -> &'static str {
        "powersgd"
    }

    fn residual(&self, bucket: usize) -> Option<&[f32]> {
        self.feedback.get(bucket)
    }

    fn reset(&mut self) {
        self.feedback.clear();
        self.buckets.clear();
    }

    fn describe(&self) -> String {
        format!(
            "powersgd(rank={}, error_feedback={}, min_compression_rate={}, seed={})",
            self.rank,
            self.feedback.enabled(),
            self.min_compression_rate,
            self.seed
        )
    }

    /// The residuals, and the current Q factor (`[cols, r]`) of every factored parameter of every
    /// bucket seen so far, as `q.bucket<b>.param<i>` (`i` counts the bucket's parameters).
    fn state(&self) -> Vec<StateTensor> {
        let mut out = self.feedback.state();
        for (bucket, plan) in self.buckets.iter().enumerate() {
            let Some(plan) = plan else { continue };
            for (index, piece) in plan.pieces.iter().enumerate() {
                if let Some(low) = piece.low_rank {
                    out.push(StateTensor {
                        name: q_name(bucket, index),
                        shape: vec![low.cols, low.rank],
                        data: plan.q[low.q_offset..low.q_offset + low.cols * low.rank].to_vec(),
                    });
                }
            }
        }
        out
    }

    /// Plans each bucket from its shapes and takes its Q factors from `tensors`; a bucket without
    /// saved factors keeps freshly seeded ones, as on its first step.
    fn load_state(&mut self, buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        let mut tensors = StateTensors::new(self.name(), tensors)?;
        let residuals = self.feedback.take_state(buckets, &mut tensors)?;
        let mut plans = Vec::with_capacity(buckets.len());
        for (bucket, shapes) in buckets.iter().enumerate() {
            let mut plan = self.plan(bucket, shapes);
            let mut loaded = false;
            for index in 0..plan.pieces.len() {
                let Some(low) = plan.pieces[index].low_rank else {
                    continue;
                };
                if let Some(q) = tensors.take(&q_name(bucket, index), &[low.cols, low.rank])? {
                    plan.q[low.q_offset..low.q_offset + q.len()].copy_from_slice(&q);
                    loaded = true;
                }
            }
            plans.push(loaded.then_some(plan));
        }
        tensors.finish()?;
        self.feedback.install(residuals);
        self.buckets = plans;
        Ok(())
    }
}

/// `p = m q`: m `[rows, cols]`, q `[cols, r]`, p `[rows, r]`, all row-major.
fn mat_mul(m: &[f32], q: &[f32], p: &mut [f32], low: LowRank) {
    let r = low.rank;
    for (m_row, p_row) in m.chunks_exact(low.cols).zip(p.chunks_exact_mut(r)) {
        p_row.fill(0.0);
        for (&m_ik, q_row) in m_row.iter().zip(q.chunks_exact(r)) {
            p_row.iter_mut().zip(q_row).for_each(|(p, &q)| *p += m_ik * q);
        }
    }
}

/// `q = m^T p`: m `[rows, cols]`, p `[rows, r]`, q `[cols, r]`.
fn mat_t_mul(m: &[f32], p: &[f32], q: &mut [f32], low: LowRank) {
    let r = low.rank;
    q.fill(0.0);
    for (m_row, p_row) in m.chunks_exact(low.cols).zip(p.chunks_exact(r)) {
        for (&m_ik, q_row) in m_row.iter().zip(q.chunks_exact_mut(r)) {
            q_row.iter_mut().zip(p_row).for_each(|(q, &p)| *q += m_ik * p);
        }
    }
}

/// `out = p q^T`: p `[rows, r]`, q `[cols, r]`, out `[rows, cols]`.
fn outer(p: &[f32], q: &[f32], out: &mut [f32], low: LowRank) {
    let r = low.rank;
    for (out_row, p_row) in out.chunks_exact_mut(low.cols).zip(p.chunks_exact(r)) {
        for (o, q_row) in out_row.iter_mut().zip(q.chunks_exact(r)) {
            *o = p_row.iter().zip(q_row).map(|(&p, &q)| p * q).sum();
        }
    }
}

/// `m - p q^T`, written to `residual` when error feedback is on; returns its squared norm.
fn residual_of(m: &[f32], p: &[f32], q: &[f32], low: LowRank, mut residual: Option<&mut [f32]>) -> f64 {
    let r = low.rank;
    let mut lost_sq = 0f64;
    for (i, (m_row, p_row)) in m.chunks_exact(low.cols).zip(p.chunks_exact(r)).enumerate() {
        for (k, (&m_ik, q_row)) in m_row.iter().zip(q.chunks_exact(r)).enumerate() {
            let sent: f32 = p_row.iter().zip(q_row).map(|(&p, &q)| p * q).sum();
            let lost = m_ik - sent;
            lost_sq += f64::from(lost) * f64::from(lost);
            if let Some(res) = residual.as_deref_mut() {
                res[i * low.cols + k] = lost;
            }
        }
    }
    lost_sq
}

/// Gram-Schmidt on the `r` columns of `p` (`[rows, r]`, row-major), each projected out twice
/// ("twice is enough": one pass loses orthogonality on ill-conditioned P in f32). Dependent
/// columns become zero.
fn orthonormalize_columns(p: &mut [f32], rows: usize, r: usize) {
    for c in 0..r {
        let norm_before = column_dot(p, rows, r, c, c).sqrt();
        for _pass in 0..2 {
            for d in 0..c {
                let dot = column_dot(p, rows, r, c, d) as f32;
                for i in 0..rows {
                    p[i * r + c] -= dot * p[i * r + d];
                }
            }
        }
        let norm = column_dot(p, rows, r, c, c).sqrt();
        let scale = if norm > 0.0 && norm > DEPENDENT_COLUMN_RATIO * norm_before {
            (1.0 / norm) as f32
        } else {
            0.0
        };
        for i in 0..rows {
            p[i * r + c] *= scale;
        }
    }
}

/// Dot product of columns `a` and `b` of a `[rows, r]` row-major matrix, accumulated in f64.
fn column_dot(p: &[f32], rows: usize, r: usize, a: usize, b: usize) -> f64 {
    (0..rows)
        .map(|i| f64::from(p[i * r + a]) * f64::from(p[i * r + b]))
        .sum()
}

/// Redraws every all-zero column of `q` (`[cols, r]`) at `step` ([`fresh_column`]).
fn reseed_zero_columns(q: &mut [f32], low: LowRank, seed: u64, step: u64, bucket: usize, index: usize) {
    let r = low.rank;
    for c in 0..r {
        if (0..low.cols).all(|k| q[k * r + c] == 0.0) {
            let fresh = fresh_column(seed, step, bucket, index, c, low.cols);
            (0..low.cols).for_each(|k| q[k * r + c] = fresh[k]);
        }
    }
}

/// The `rows` values that replace column `column` of the Q factor of parameter `index` of
/// `bucket` when it vanished at `step`: drawn from `seed` and the step, so every rank (and the
/// device codec) draws the same ones without sending them.
pub(crate) fn fresh_column(seed: u64, step: u64, bucket: usize, index: usize, column: usize, rows: usize) -> Vec<f32> {
    let mut rng = SplitMix64::for_factor(seed ^ step.rotate_left(32) ^ column as u64, bucket, index);
    (0..rows).map(|_| rng.normal()).collect()
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny seeded generator, so every rank draws the same
/// initial Q without sharing it.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for the factor of parameter `index` of `bucket`.
    fn for_factor(seed: u64, bucket: usize, index: usize) -> Self {
        let mut mix = SplitMix64(seed);
        let a = mix.next_u64() ^ bucket as u64;
        let mut mix = SplitMix64(a);
        SplitMix64(mix.next_u64() ^ (index as u64).rotate_left(17))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_schmidt_gives_orthonormal_columns_and_drops_dependent_ones() {
        let (rows, r) = (6, 3);
        let mut rng = SplitMix64(7);
        let mut p: Vec<f32> = (0..rows * r).map(|_| rng.normal()).collect();
        // Column 2 = column 0 + column 1: dependent.
        for i in 0..rows {
            p[i * r + 2] = p[i * r] + p[i * r + 1];
        }
        orthonormalize_columns(&mut p, rows, r);
        for a in 0..2 {
            for b in 0..2 {
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((column_dot(&p, rows, r, a, b) - want).abs() < 1e-6, "columns {a}, {b}");
            }
        }
        assert!(
            (0..rows).all(|i| p[i * r + 2] == 0.0),
            "the dependent column is dropped: {p:?}"
        );
    }
}
