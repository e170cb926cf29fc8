//! `fp16` / `bf16`: gradients travel as 16-bit floats, halving the bytes.
//!
//! What torch's `fp16_compress_hook` / `bf16_compress_hook` and Horovod's fp16 compression do:
//! each rank divides its gradient by the world size, casts it to half, the group sums the halves
//! (the engine widens to f32 for every addition and rounds once per step), and each rank widens
//! the sum back, which already is the average. Dividing *before* the cast (as torch does) keeps
//! the partial sums of `n` ranks inside f16's range (max 65504); the price is that entries below
//! `n * 6e-8` underflow, which error feedback then carries to the next step.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::codec::{check_shapes, collective, CodecStats, GradCodec};
use super::error::CompressError;
use super::feedback::{relative_error, ErrorFeedback};
use super::state::StateTensor;
use crate::comm::{Element, ProcessGroup, ReduceOp};

/// Elements converted per block (stack buffers, so the casts vectorise without allocating).
const BLOCK: usize = 256;

/// The 16-bit type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireHalf {
    /// IEEE binary16: 10-bit mantissa, max 65504.
    F16,
    /// bfloat16: 7-bit mantissa, f32's range.
    Bf16,
}

/// Casts each bucket to half precision for the all-reduce.
#[derive(Debug)]
pub struct HalfCast {
    wire: WireHalf,
    feedback: ErrorFeedback,
}

impl HalfCast {
    /// A codec sending `wire`; with `error_feedback`, the rounding error of the cast is carried
    /// to the next step.
    pub fn new(wire: WireHalf, error_feedback: bool) -> Self {
        Self {
            wire,
            feedback: ErrorFeedback::new(error_feedback),
        }
    }

    fn run<H: HalfElement>(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        let method = self.name();
        let before = group.bytes_sent();
        let world = group.world_size() as f32;
        let numel = grads.len();
        let residual = self.feedback.residual_mut(group.rank(), method, bucket, numel)?;

        // Encode: wire = half((g + r) / n); measure what the cast loses: (g + r) - n * wire.
        let mut wire = vec![H::ZERO; numel];
        let (mut lost_sq, mut input_sq) = (0f64, 0f64);
        let (mut input, mut back) = ([0f32; BLOCK], [0f32; BLOCK]);
        for (start, (g, w)) in (0..numel)
            .step_by(BLOCK)
            .zip(grads.chunks(BLOCK).zip(wire.chunks_mut(BLOCK)))
        {
            let len = g.len();
            input[..len].copy_from_slice(g);
            if let Some(r) = residual.as_deref() {
                input[..len]
                    .iter_mut()
                    .zip(&r[start..start + len])
                    .for_each(|(x, &r)| *x += r);
            }
            for (b, &x) in back[..len].iter_mut().zip(&input[..len]) {
                *b = x / world;
            }
            H::narrow(&back[..len], w);
            H::widen(w, &mut back[..len]);
            for (&x, &b) in input[..len].iter().zip(&back[..len]) {
                let lost = x - b * world;
                lost_sq += f64::from(lost) * f64::from(lost);
                input_sq += f64::from(x) * f64::from(x);
            }
        }
        let sent_local = if residual.is_some() { wire.clone() } else { Vec::new() };

        if numel > 0 {
            collective(method, bucket, step, group.all_reduce(&mut wire, ReduceOp::Sum))?;
        }

        // The sum is identical on every rank, so every rank takes the same decision: a non-finite
        // average is a step the loss scaler skips, and the residual stays as it was.
        let finite = wire.iter().all(|&h| H::is_finite(h));
        if let (Some(r), true) = (residual, finite) {
            for (start, (g, s)) in (0..numel)
                .step_by(BLOCK)
                .zip(grads.chunks(BLOCK).zip(sent_local.chunks(BLOCK)))
            {
                let len = g.len();
                H::widen(s, &mut back[..len]);
                for ((r, &g), &b) in r[start..start + len].iter_mut().zip(g).zip(&back[..len]) {
                    *r = (g + *r) - b * world;
                }
            }
        }
        for (g, w) in grads.chunks_mut(BLOCK).zip(wire.chunks(BLOCK)) {
            H::widen(w, g);
        }
        Ok(CodecStats {
            wire_bytes: (numel * std::mem::size_of::<H>()) as u64,
            transport_bytes: group.bytes_sent().saturating_sub(before),
            relative_error: relative_error(lost_sq, input_sq),
            compressed: true,
        })
    }
}

impl GradCodec for HalfCast {
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        check_shapes(group, self.name(), bucket, shapes, grads.len())?;
        match self.wire {
            WireHalf::F16 => self.run::<f16>(group, bucket, grads, step),
            WireHalf::Bf16 => self.run::<bf16>(group, bucket, grads, step),
        }
    }

    fn name(&self) -> &'static str {
        match self.wire {
            WireHalf::F16 => "fp16",
            WireHalf::Bf16 => "bf16",
        }
    }

    fn residual(&self, bucket: usize) -> Option<&[f32]> {
        self.feedback.get(bucket)
    }

    fn reset(&mut self) {
        self.feedback.clear();
    }

    fn describe(&self) -> String {
        format!("{}(error_feedback={})", self.name(), self.feedback.enabled())
    }

    fn state(&self) -> Vec<StateTensor> {
        self.feedback.state()
    }

    fn load_state(&mut self, buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        self.feedback.load_only_state(self.name(), buckets, tensors)
    }
}

/// f16 and bf16, converted a slice at a time.
trait HalfElement: Element + Copy {
    const ZERO: Self;
    fn narrow(src: &[f32], dst: &mut [Self]);
    fn widen(src: &[Self], dst: &mut [f32]);
    fn is_finite(self) -> bool;
}

impl HalfElement for f16 {
    const ZERO: Self = f16::ZERO;
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn is_finite(self) -> bool {
        f16::is_finite(self)
    }
}

impl HalfElement for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn is_finite(self) -> bool {
        bf16::is_finite(self)
    }
}
