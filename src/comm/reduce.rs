//! Element-wise reduction kernels over byte slices tagged with a dtype.
//!
//! `dst = dst op src`, element by element. Every operator is commutative, so two ranks that
//! combine the same partial results in either order get bit-identical answers (replicas stay
//! equal). f16 and bf16 are widened to f32, combined, and rounded once per step.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::dtype::{DType, ReduceOp};

/// Elements converted per block when widening half-precision data.
const HALF_BLOCK: usize = 256;

/// Combines `src` into `dst`. Both hold whole elements of `dtype` and have the same length.
/// `Avg` combines like `Sum`; [`finish_avg`] divides at the end.
pub(crate) fn reduce_into(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    match dtype {
        DType::F32 => float(op, cast_mut::<f32>(dst), cast::<f32>(src)),
        DType::F64 => float(op, cast_mut::<f64>(dst), cast::<f64>(src)),
        DType::I32 => int32(op, cast_mut(dst), cast(src)),
        DType::I64 => int64(op, cast_mut(dst), cast(src)),
        DType::U8 => uint8(op, dst, src),
        DType::F16 => half_blocks(op, cast_mut::<f16>(dst), cast::<f16>(src)),
        DType::BF16 => half_blocks(op, cast_mut::<bf16>(dst), cast::<bf16>(src)),
    }
}

fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> &[T] {
    // Invariant: buffers reach the kernels as views of typed slices or of u64-backed scratch,
    // at offsets that are whole elements, so they are aligned for their dtype.
    bytemuck::cast_slice(bytes)
}

fn cast_mut<T: bytemuck::Pod>(bytes: &mut [u8]) -> &mut [T] {
    // Invariant: see `cast`.
    bytemuck::cast_slice_mut(bytes)
}

fn float<T>(op: ReduceOp, dst: &mut [T], src: &[T])
where
    T: Copy + PartialOrd + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    // Separate loops per operator so each one vectorises.
    match op {
        ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + s),
        ReduceOp::Prod => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d * s),
        ReduceOp::Max => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = if s > *d { s } else { *d }),
        ReduceOp::Min => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = if s < *d { s } else { *d }),
    }
}

macro_rules! int_kernel {
    ($name:ident, $t:ty) => {
        fn $name(op: ReduceOp, dst: &mut [$t], src: &[$t]) {
            // Wrapping: integer overflow wraps like NCCL's, never panics.
            match op {
                ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = d.wrapping_add(s)),
                ReduceOp::Prod => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = d.wrapping_mul(s)),
                ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = (*d).max(s)),
                ReduceOp::Min => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = (*d).min(s)),
            }
        }
    };
}
int_kernel!(int32, i32);
int_kernel!(int64, i64);
int_kernel!(uint8, u8);

/// Half-precision types that widen to f32 in blocks.
trait HalfSlice: Copy + Default {
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl HalfSlice for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl HalfSlice for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

fn half_blocks<H: HalfSlice>(op: ReduceOp, dst: &mut [H], src: &[H]) {
    let mut wide_dst = [0f32; HALF_BLOCK];
    let mut wide_src = [0f32; HALF_BLOCK];
    for (d, s) in dst.chunks_mut(HALF_BLOCK).zip(src.chunks(HALF_BLOCK)) {
        let n = d.len();
        H::widen(d, &mut wide_dst[..n]);
        H::widen(s, &mut wide_src[..n]);
        float(op, &mut wide_dst[..n], &wide_src[..n]);
        H::narrow(&wide_dst[..n], d);
    }
}

/// Divides every element by `world_size` (the last step of `Avg`). Integers divide with
/// truncation.
pub(crate) fn finish_avg(dtype: DType, data: &mut [u8], world_size: usize) {
    let n = world_size as f64;
    match dtype {
        DType::F32 => cast_mut::<f32>(data).iter_mut().for_each(|x| *x /= n as f32),
        DType::F64 => cast_mut::<f64>(data).iter_mut().for_each(|x| *x /= n),
        DType::I32 => cast_mut::<i32>(data).iter_mut().for_each(|x| *x /= world_size as i32),
        DType::I64 => cast_mut::<i64>(data).iter_mut().for_each(|x| *x /= world_size as i64),
        DType::U8 => data.iter_mut().for_each(|x| *x /= world_size as u8),
        DType::F16 => cast_mut::<f16>(data)
            .iter_mut()
            .for_each(|x| *x = f16::from_f32(x.to_f32() / n as f32)),
        DType::BF16 => cast_mut::<bf16>(data)
            .iter_mut()
            .for_each(|x| *x = bf16::from_f32(x.to_f32() / n as f32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_operators_combine_elementwise() {
        let a = [1.0f32, -2.0, 3.0];
        let b = [4.0f32, 5.0, -6.0];
        for (op, want) in [
            (ReduceOp::Sum, [5.0, 3.0, -3.0]),
            (ReduceOp::Prod, [4.0, -10.0, -18.0]),
            (ReduceOp::Max, [4.0, 5.0, 3.0]),
            (ReduceOp::Min, [1.0, -2.0, -6.0]),
        ] {
            let mut d = a;
            reduce_into(
                DType::F32,
                op,
                bytemuck::cast_slice_mut(&mut d),
                bytemuck::cast_slice(&b),
            );
            assert_eq!(d, want, "{op}");
        }
    }

    #[test]
    fn bf16_sums_are_computed_in_f32_and_rounded_once() {
        let a: Vec<bf16> = (0..600).map(|i| bf16::from_f32(i as f32)).collect();
        let mut d = a.clone();
        reduce_into(
            DType::BF16,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&a),
        );
        for (x, y) in d.iter().zip(&a) {
            assert_eq!(*x, bf16::from_f32(y.to_f32() * 2.0));
        }
    }

    #[test]
    fn integer_sums_wrap_instead_of_panicking() {
        let mut d = [250u8];
        reduce_into(DType::U8, ReduceOp::Sum, &mut d, &[10u8]);
        assert_eq!(d, [4]);
    }
}
