//! CPU references of the kernels of `kernels/`: one function per kernel, with the kernel's own
//! arithmetic (each f32 operation rounded once to nearest even, no fused multiply-add; the half
//! conversions round to nearest even), so a kernel's output on a GPU can be compared bit for bit
//! with its reference (`tests/kernels.rs`), and each reference with the CPU codec it stands for
//! in `compress/` (`tests/kernel_reference.rs`).
//!
//! Pure Rust, in every build (the GPU part, `Kernels`, needs feature `nccl`):
//! the default test suite checks the references against the codecs without CUDA anywhere.
//!
//! A `residual` of `None` is a codec without error feedback: the input is the gradient itself,
//! not `grad + 0` (which would turn `-0.0` into `+0.0`). The one place kernel and reference may
//! differ is the payload of a NaN made by a half conversion: both give a NaN, the kernel the
//! hardware's, the reference a quiet one (`half`'s).
//!
//! Lengths are the caller's business here: a reference panics when its slices disagree (it is a
//! test oracle); the GPU wrappers check them and return errors.

use half::{bf16, f16};

/// A 16-bit wire format of the half casts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfFormat {
    /// IEEE binary16 (`cast_f16`, `widen_f16`, `residual_f16`).
    F16,
    /// bfloat16 (`cast_bf16`, `widen_bf16`, `residual_bf16`).
    Bf16,
}

impl HalfFormat {
    /// Both formats.
    pub const ALL: [HalfFormat; 2] = [HalfFormat::F16, HalfFormat::Bf16];

    /// `f16` or `bf16`, the suffix of its kernels' names.
    pub fn name(self) -> &'static str {
        match self {
            HalfFormat::F16 => "f16",
            HalfFormat::Bf16 => "bf16",
        }
    }

    /// The exponent bits: a value with all of them set is inf or NaN.
    pub fn exponent_mask(self) -> u16 {
        match self {
            HalfFormat::F16 => 0x7C00,
            HalfFormat::Bf16 => 0x7F80,
        }
    }

    /// `x` rounded to nearest even, as bits (PTX `cvt.rn.f16.f32` / `cvt.rn.bf16.f32`).
    pub fn narrow(self, x: f32) -> u16 {
        match self {
            HalfFormat::F16 => f16::from_f32(x).to_bits(),
            HalfFormat::Bf16 => bf16::from_f32(x).to_bits(),
        }
    }

    /// The f32 of the half `bits` (exact).
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            HalfFormat::F16 => f16::from_bits(bits).to_f32(),
            HalfFormat::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }
}

/// Element `i` of the step's input: `grad + residual`, or `grad` without error feedback.
fn input(grad: &[f32], residual: Option<&[f32]>, i: usize) -> f32 {
    match residual {
        Some(r) => grad[i] + r[i],
        None => grad[i],
    }
}

fn check_len(kernel: &str, what: &str, len: usize, want: usize) {
    assert_eq!(len, want, "{kernel}: {what} holds {len} elements, the input {want}");
}

/// `cast_f16` / `cast_bf16`: `out = half((grad + residual) / world)`; the residual is not touched.
///
/// # Panics
/// When `residual` or `out` is not as long as `grad`.
pub fn cast(format: HalfFormat, grad: &[f32], residual: Option<&[f32]>, out: &mut [u16], world: f32) {
    check_len("cast", "out", out.len(), grad.len());
    if let Some(r) = residual {
        check_len("cast", "residual", r.len(), grad.len());
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = format.narrow(input(grad, residual, i) / world);
    }
}

/// `widen_f16` / `widen_bf16`: `out = f32(input)`.
///
/// # Panics
/// When `out` is not as long as `input`.
pub fn widen(format: HalfFormat, input: &[u16], out: &mut [f32]) {
    check_len("widen", "out", out.len(), input.len());
    for (o, &h) in out.iter_mut().zip(input) {
        *o = format.widen(h);
    }
}

/// `residual_f16` / `residual_bf16`: `residual = (grad + residual) - f32(sent) * world`, what this
/// rank's cast `sent` lost, kept for the next step (run only when the reduced sum is finite).
///
/// # Panics
/// When `residual` or `sent` is not as long as `grad`.
pub fn half_residual(format: HalfFormat, grad: &[f32], residual: &mut [f32], sent: &[u16], world: f32) {
    check_len("half_residual", "residual", residual.len(), grad.len());
    check_len("half_residual", "sent", sent.len(), grad.len());
    for ((r, &g), &s) in residual.iter_mut().zip(grad).zip(sent) {
        *r = (g + *r) - format.widen(s) * world;
    }
}

/// `count_nonfinite_half`: how many of `values` are inf or NaN.
pub fn count_nonfinite_half(format: HalfFormat, values: &[u16]) -> u64 {
    let mask = format.exponent_mask();
    values.iter().filter(|&&h| h & mask == mask).count() as u64
}

/// `count_nonfinite`: how many of `values` are inf or NaN.
pub fn count_nonfinite(values: &[f32]) -> u64 {
    values.iter().filter(|x| !x.is_finite()).count() as u64
}

/// A top-k selection threshold. Element `i` of the input `x` has the key `(|x_i|, -i)`, the bits
/// of `|x_i|` (which order as `f32::total_cmp` orders magnitudes: NaN above inf) first, the lower
/// index on ties; keys are distinct. The threshold selects every element whose magnitude bits
/// exceed `magnitude`, and those equal to it up to index `last_tie`: the elements whose key is at
/// least `(magnitude, -last_tie)`. [`find_threshold`] finds the one selecting exactly k, which
/// is the CPU codec's choice of the k largest magnitudes, lower index first on ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold {
    /// Bits of the smallest selected magnitude (`|x|.to_bits()`).
    pub magnitude: u32,
    /// The last index selected among the elements of exactly that magnitude.
    pub last_tie: u32,
}

impl Threshold {
    /// Selects every element.
    pub const ALL: Threshold = Threshold {
        magnitude: 0,
        last_tie: u32::MAX,
    };
    /// Selects no element (no magnitude's bits reach `u32::MAX`: the sign bit is cleared).
    pub const NONE: Threshold = Threshold {
        magnitude: u32::MAX,
        last_tie: 0,
    };

    /// Whether element `index` of value `x` is selected (the kernels' `selected`).
    pub fn selects(self, x: f32, index: usize) -> bool {
        let m = x.to_bits() & 0x7FFF_FFFF;
        m > self.magnitude || (m == self.magnitude && index as u64 <= u64::from(self.last_tie))
    }
}

/// `count_selected`: how many elements of `grad + residual` the threshold selects.
///
/// # Panics
/// When `residual` is not as long as `grad`.
pub fn count_selected(grad: &[f32], residual: Option<&[f32]>, threshold: Threshold) -> u64 {
    if let Some(r) = residual {
        check_len("count_selected", "residual", r.len(), grad.len());
    }
    (0..grad.len())
        .filter(|&i| threshold.selects(input(grad, residual, i), i))
        .count() as u64
}

/// `gather_selected`: the selected elements as (index, value) pairs, by ascending index (the
/// kernel writes them in no particular order); the residual is not touched.
///
/// # Panics
/// When `residual` is not as long as `grad`.
pub fn gather_selected(grad: &[f32], residual: Option<&[f32]>, threshold: Threshold) -> (Vec<u32>, Vec<f32>) {
    if let Some(r) = residual {
        check_len("gather_selected", "residual", r.len(), grad.len());
    }
    (0..grad.len())
        .filter_map(|i| {
            let x = input(grad, residual, i);
            threshold.selects(x, i).then_some((i as u32, x))
        })
        .unzip()
}

/// `residual_topk`: after a finite step, `residual = 0` where the element was sent and
/// `grad + residual` elsewhere.
///
/// # Panics
/// When `residual` is not as long as `grad`.
pub fn residual_topk(grad: &[f32], residual: &mut [f32], threshold: Threshold) {
    check_len("residual_topk", "residual", residual.len(), grad.len());
    for (i, (r, &g)) in residual.iter_mut().zip(grad).enumerate() {
        let x = g + *r;
        *r = if threshold.selects(x, i) { 0.0 } else { x };
    }
}

/// `count_out_of_range`: how many of `indices` are not below `n`.
pub fn count_out_of_range(indices: &[u32], n: usize) -> u64 {
    indices.iter().filter(|&&i| i as usize >= n).count() as u64
}

/// `scatter_add`: `out[index] += value` for one rank's pairs (an index not below `out.len()` is
/// skipped, as the kernel does).
///
/// # Panics
/// When `values` is not as long as `indices`.
pub fn scatter_add(indices: &[u32], values: &[f32], out: &mut [f32]) {
    check_len("scatter_add", "values", values.len(), indices.len());
    for (&i, &v) in indices.iter().zip(values) {
        if let Some(o) = out.get_mut(i as usize) {
            *o += v;
        }
    }
}

/// `divide`: `values /= divisor`.
pub fn divide(values: &mut [f32], divisor: f32) {
    values.iter_mut().for_each(|v| *v /= divisor);
}

/// Probes [`find_threshold`] needs at most for `n` elements: 31 (a bisection over the 2^31
/// magnitudes' bits), plus `ceil(log2 n)` when elements tie at the k-th magnitude (a bisection
/// over their indices). None when `k` is 0 or at least `n`.
pub fn max_probes(n: usize) -> u32 {
    31 + n.max(1).next_power_of_two().trailing_zeros()
}

/// The host side of top-k: the threshold selecting exactly `k` of `n` elements, found by
/// bisection with `count` (one [`count_selected`], on the CPU or the GPU, per probe), and the
/// number of probes it took (at most [`max_probes`]).
///
/// First the largest magnitude `t` with at least `k` elements at or above it (31 probes); when
/// more than `k` are (ties at `t`), the smallest `last_tie` selecting `k` (the count grows by at
/// most one per index, so it then selects exactly `k`). `n` must fit a `u32` index
/// (`n <= 2^32`); `count` is trusted to be that of the same data at every probe.
pub fn find_threshold<E>(
    n: usize,
    k: usize,
    mut count: impl FnMut(Threshold) -> Result<u64, E>,
) -> Result<(Threshold, u32), E> {
    if k == 0 {
        return Ok((Threshold::NONE, 0));
    }
    if k >= n {
        return Ok((Threshold::ALL, 0));
    }
    let k = k as u64;
    let mut probes = 0u32;
    // Invariant: `lo` selects `at_lo >= k` elements (0 selects all n); above `hi` fewer than k.
    let (mut lo, mut hi, mut at_lo) = (0u32, 0x7FFF_FFFFu32, n as u64);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        probes += 1;
        let c = count(Threshold {
            magnitude: mid,
            last_tie: u32::MAX,
        })?;
        if c >= k {
            (lo, at_lo) = (mid, c);
        } else {
            hi = mid - 1;
        }
    }
    if at_lo == k {
        return Ok((
            Threshold {
                magnitude: lo,
                last_tie: u32::MAX,
            },
            probes,
        ));
    }
    // Ties at `lo`: the smallest last index selecting k. `n - 1` selects `at_lo > k`.
    let (mut first, mut last) = (0u32, (n - 1) as u32);
    while first < last {
        let mid = first + (last - first) / 2;
        probes += 1;
        let c = count(Threshold {
            magnitude: lo,
            last_tie: mid,
        })?;
        if c >= k {
            last = mid;
        } else {
            first = mid + 1;
        }
    }
    Ok((
        Threshold {
            magnitude: lo,
            last_tie: first,
        },
        probes,
    ))
}

/// One rank's top-k selection: the threshold, the (index, value) pairs (ascending index) and the
/// probes it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The threshold selecting exactly the pairs.
    pub threshold: Threshold,
    /// The selected indices.
    pub indices: Vec<u32>,
    /// Their values, `grad + residual`.
    pub values: Vec<f32>,
    /// Calls of `count_selected` made.
    pub probes: u32,
}

/// The whole selection of one rank, as `Kernels::topk_select` runs it on the device:
/// [`find_threshold`] over [`count_selected`], then [`gather_selected`].
///
/// # Panics
/// When `residual` is not as long as `grad`, or `grad` has more than 2^32 elements.
pub fn topk_select(grad: &[f32], residual: Option<&[f32]>, k: usize) -> Selection {
    assert!(
        grad.len() as u64 <= 1 << 32,
        "topk_select: {} elements exceed u32 indices",
        grad.len()
    );
    let found = find_threshold(grad.len(), k, |t| {
        Ok::<_, std::convert::Infallible>(count_selected(grad, residual, t))
    });
    let (threshold, probes) = match found {
        Ok(found) => found,
        Err(never) => match never {},
    };
    let (indices, values) = gather_selected(grad, residual, threshold);
    Selection {
        threshold,
        indices,
        values,
        probes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU codec's rule: the k largest |x| (`total_cmp`), lower index first on ties.
    fn exact_top_k(x: &[f32], k: usize) -> Vec<u32> {
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_unstable();
        order.into_iter().map(|i| i as u32).collect()
    }

    fn values(seed: u64, len: usize, levels: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let level = (state >> 8) % levels;
                let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
                sign * level as f32 / 8.0
            })
            .collect()
    }

    #[test]
    fn the_threshold_selects_exactly_the_exact_top_k_ties_nan_inf_and_zeros_included() {
        let mut special = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::NEG_INFINITY,
        ];
        special.extend([f32::MIN_POSITIVE, -f32::MIN_POSITIVE / 2.0, f32::MAX, 1.0, -1.0]);
        let cases: Vec<Vec<f32>> = vec![
            special,
            values(1, 1000, 1 << 20), // few ties
            values(2, 1000, 5),       // mostly ties
            vec![0.5; 64],            // all equal
            vec![-0.0; 7],
            vec![3.0],
        ];
        for x in &cases {
            let n = x.len();
            for k in [0, 1, 2, n / 3, n / 2, n.saturating_sub(1), n, n + 5] {
                let selection = topk_select(x, None, k);
                assert_eq!(selection.indices, exact_top_k(x, k), "n {n} k {k}");
                let want: Vec<u32> = selection.values.iter().map(|v| v.to_bits()).collect();
                let got: Vec<u32> = selection.indices.iter().map(|&i| x[i as usize].to_bits()).collect();
                assert_eq!(want, got, "the values are the inputs");
                assert!(
                    selection.probes <= max_probes(n),
                    "n {n} k {k}: {} probes",
                    selection.probes
                );
                if k > 0 && k < n {
                    assert!(selection.probes >= 31, "the magnitude bisection always runs");
                }
            }
        }
    }

    #[test]
    fn the_residual_keeps_exactly_what_was_not_sent_and_nothing_is_lost() {
        let grad = values(3, 500, 9);
        let old = values(4, 500, 1 << 16);
        let selection = topk_select(&grad, Some(&old), 40);
        let mut residual = old.clone();
        residual_topk(&grad, &mut residual, selection.threshold);
        let mut sent = vec![0f32; grad.len()];
        scatter_add(&selection.indices, &selection.values, &mut sent);
        for i in 0..grad.len() {
            // Exactly: either everything was sent and nothing kept, or the reverse.
            assert_eq!(
                (sent[i] + residual[i]).to_bits(),
                (grad[i] + old[i]).to_bits(),
                "element {i}"
            );
            assert!(sent[i] == 0.0 || residual[i] == 0.0);
        }
        assert_eq!(selection.indices.len(), 40);
    }

    #[test]
    fn half_casts_round_to_nearest_even_and_widen_exactly() {
        // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even is 1. 1 + 3 * 2^-8 rounds up.
        assert_eq!(HalfFormat::Bf16.narrow(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(HalfFormat::Bf16.narrow(1.0 + 3.0 / 256.0), 0x3F82);
        // f16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
        assert_eq!(HalfFormat::F16.narrow(1.0 + 1.0 / 2048.0), 0x3C00);
        assert_eq!(HalfFormat::F16.narrow(65520.0), 0x7C00, "f16 overflows to inf");
        assert_eq!(HalfFormat::F16.narrow(-0.0), 0x8000);
        for format in HalfFormat::ALL {
            let mut out = [0f32; 3];
            widen(format, &[0x0001, 0x8000, format.exponent_mask()], &mut out);
            assert!(out[0] > 0.0 && out[1].to_bits() == 0x8000_0000 && out[2] == f32::INFINITY);
            assert_eq!(
                count_nonfinite_half(format, &[0, format.exponent_mask(), 0xFFFF, 0x3C00]),
                2
            );
        }
    }

    #[test]
    fn without_feedback_the_input_is_the_gradient_itself_so_negative_zero_stays() {
        let mut out = [0u16; 1];
        cast(HalfFormat::Bf16, &[-0.0], None, &mut out, 1.0);
        assert_eq!(out[0], 0x8000);
        cast(HalfFormat::Bf16, &[-0.0], Some(&[0.0]), &mut out, 1.0);
        assert_eq!(out[0], 0x0000, "with a residual, -0 + 0 is +0, as in the codec");
    }
}
