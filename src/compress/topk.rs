//! `topk`: each rank sends only its k largest-magnitude entries per bucket.
//!
//! Per bucket, a rank adds its error-feedback residual to the gradient, selects the
//! `k = ceil(ratio * numel)` entries of largest magnitude (ties broken by the lower index, so the
//! choice is deterministic), and all-gathers them as (index, value) pairs: k indices (i32, or i64
//! for buckets past 2^31 elements) followed by k f32 values, one byte buffer per rank. Every rank
//! then sums all ranks' pairs into a dense zero buffer in rank order (so every rank gets the same
//! bits) and divides by the world size. What a rank did not send stays in its residual.
//!
//! Bytes per rank are `k * 8` instead of `numel * 4`; the all-gather fans out to `n - 1` peers, so
//! unlike an all-reduce the transport cost grows with the world size. A bucket where the pairs
//! would not be smaller than the dense f32 gradient is averaged densely (exact, and cheaper).

use super::codec::{check_shapes, collective, CodecStats, GradCodec};
use super::error::CompressError;
use super::feedback::{relative_error, ErrorFeedback};
use super::state::StateTensor;
use super::uncompressed::Uncompressed;
use crate::comm::ProcessGroup;

/// Top-k sparsification with error feedback.
#[derive(Debug)]
pub struct TopK {
    ratio: f32,
    feedback: ErrorFeedback,
}

impl TopK {
    /// Sends `ceil(ratio * numel)` entries per bucket; `ratio` must be in (0, 1] (see
    /// [`CodecOptions::validate`](super::CodecOptions::validate)).
    pub fn new(ratio: f32, error_feedback: bool) -> Self {
        Self {
            ratio,
            feedback: ErrorFeedback::new(error_feedback),
        }
    }

    /// Entries a rank sends for a bucket of `numel` elements: `ceil(ratio * numel)`, at least 1
    /// and at most `numel` (0 for an empty bucket).
    pub fn k_for(&self, numel: usize) -> usize {
        if numel == 0 {
            return 0;
        }
        // The ratio is an f32 (0.1 is stored as 0.100000001...): a product within its representation
        // error (under f32::EPSILON relative) of a whole number is that number: 0.1 of 100 is 10, not 11.
        let exact = f64::from(self.ratio) * numel as f64;
        let whole = exact.round();
        let k = if (exact - whole).abs() <= exact * f64::from(f32::EPSILON) {
            whole
        } else {
            exact.ceil()
        };
        (k as usize).clamp(1, numel)
    }

    /// Bytes of one (index, value) pair for a bucket of `numel` elements.
    pub fn pair_bytes(numel: usize) -> usize {
        index_bytes(numel) + 4
    }
}

fn index_bytes(numel: usize) -> usize {
    if numel <= i32::MAX as usize {
        4
    } else {
        8
    }
}

impl GradCodec for TopK {
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
        let (rank, world) = (group.rank(), group.world_size());
        let numel = grads.len();
        let k = self.k_for(numel);
        let residual = self.feedback.residual_mut(rank, method, bucket, numel)?;

        // Input of this step: the gradient plus what earlier steps held back. The old residual
        // stays untouched until the step is known to be finite.
        if let Some(r) = residual.as_deref() {
            grads.iter_mut().zip(r).for_each(|(g, &r)| *g += r);
        }
        let (ib, pair) = (index_bytes(numel), Self::pair_bytes(numel));
        if k * pair >= numel * 4 {
            if let Some(r) = residual {
                r.fill(0.0);
            }
            return Uncompressed::average(group, method, bucket, grads, step);
        }
        let before = group.bytes_sent();

        // Select: the k entries of largest |value|, lower index first on ties. `total_cmp` makes
        // NaN (and inf) the largest, so a non-finite entry is always sent and reaches every rank.
        let magnitude_desc = |&a: &usize, &b: &usize| grads[b].abs().total_cmp(&grads[a].abs()).then(a.cmp(&b));
        let mut selected: Vec<usize> = (0..numel).collect();
        if k < numel {
            selected.select_nth_unstable_by(k - 1, magnitude_desc);
            selected.truncate(k);
        }
        selected.sort_unstable();

        // Encode: [k indices][k values], little-endian.
        let mut payload = Vec::with_capacity(k * pair);
        for &i in &selected {
            // Invariant: i < numel, and numel fits i32 whenever ib == 4.
            match ib {
                4 => payload.extend_from_slice(&(i as i32).to_le_bytes()),
                _ => payload.extend_from_slice(&(i as i64).to_le_bytes()),
            }
        }
        let (mut input_sq, mut sent_sq) = (0f64, 0f64);
        for &i in &selected {
            payload.extend_from_slice(&grads[i].to_le_bytes());
            sent_sq += f64::from(grads[i]) * f64::from(grads[i]);
        }
        grads.iter().for_each(|&x| input_sq += f64::from(x) * f64::from(x));

        let mut gathered = vec![0u8; payload.len() * world];
        collective(method, bucket, step, group.all_gather(&payload, &mut gathered))?;

        // Decode every rank's pairs, checking indices before writing anything.
        let decode = |chunk: &[u8], j: usize| -> (i64, f32) {
            let index = match ib {
                4 => i64::from(i32::from_le_bytes(le_bytes(&chunk[j * 4..]))),
                _ => i64::from_le_bytes(le_bytes(&chunk[j * 8..])),
            };
            (index, f32::from_le_bytes(le_bytes(&chunk[k * ib + j * 4..])))
        };
        let mut finite = true;
        for (peer, chunk) in gathered.chunks_exact(payload.len()).enumerate() {
            for j in 0..k {
                let (index, value) = decode(chunk, j);
                if index < 0 || index as u64 >= numel as u64 {
                    return Err(CompressError::CorruptPayload {
                        rank,
                        bucket,
                        peer,
                        index,
                        numel,
                    });
                }
                finite &= value.is_finite();
            }
        }

        // Every rank saw the same pairs, so all agree whether the step is finite: only then does
        // the residual become this step's input minus what was sent.
        if let (Some(r), true) = (residual, finite) {
            r.copy_from_slice(grads);
            selected.iter().for_each(|&i| r[i] = 0.0);
        }
        grads.fill(0.0);
        for chunk in gathered.chunks_exact(payload.len()) {
            for j in 0..k {
                let (index, value) = decode(chunk, j);
                grads[index as usize] += value;
            }
        }
        let world = world as f32;
        grads.iter_mut().for_each(|g| *g /= world);

        Ok(CodecStats {
            wire_bytes: payload.len() as u64,
            transport_bytes: group.bytes_sent().saturating_sub(before),
            relative_error: relative_error((input_sq - sent_sq).max(0.0), input_sq),
            compressed: true,
        })
    }

    fn name(&self) -> &'static str {
        "topk"
    }

    fn residual(&self, bucket: usize) -> Option<&[f32]> {
        self.feedback.get(bucket)
    }

    fn reset(&mut self) {
        self.feedback.clear();
    }

    fn describe(&self) -> String {
        format!("topk(ratio={}, error_feedback={})", self.ratio, self.feedback.enabled())
    }

    fn state(&self) -> Vec<StateTensor> {
        self.feedback.state()
    }

    fn load_state(&mut self, buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        self.feedback.load_only_state(self.name(), buckets, tensors)
    }
}

/// The first `N` bytes of `bytes` as an array.
fn le_bytes<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}
