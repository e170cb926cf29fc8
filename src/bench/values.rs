//! The data a benchmark sends: small integers whose every sum is exact in every dtype.
//!
//! Element `i` of rank `r`'s buffer is `pattern(r, i)`, a hash of both folded to `0..=max`. The
//! hash (rather than `i % k`) makes a chunk delivered to the wrong place or from the wrong rank
//! show up as wrong elements. `max` is chosen so that a sum over every rank stays at most 255:
//! exact in u8, and an integer bf16 (8 significant bits) and f16 represent exactly, so every
//! partial sum the engine rounds is exact too and results compare with `==`.

use half::{bf16, f16};

use crate::comm::Element;

/// Largest sum over ranks that every dtype holds exactly (u8's maximum, bf16's exact range).
const EXACT_SUM_LIMIT: usize = 255;

/// Values per element: `0..=max_value(world_size)`.
pub(crate) fn max_value(world_size: usize) -> u32 {
    (EXACT_SUM_LIMIT / world_size.max(1)).min(3) as u32
}

/// The value of element `index` of rank `rank`'s buffer, in `0..=max`.
pub(crate) fn pattern(rank: usize, index: usize, max: u32) -> u32 {
    if max == 0 {
        return 0;
    }
    // Two odd multipliers spread rank and index over the word; a xor-shift and a third multiply
    // mix the high bits into the ones kept.
    let key = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (rank as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    let hashed = (key ^ (key >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((hashed >> 32) % (u64::from(max) + 1)) as u32
}

/// An element type the benchmark can fill with small integers.
pub(crate) trait BenchValue: Element + Copy {
    /// The small integer `v` (at most [`EXACT_SUM_LIMIT`]) in this type, exactly.
    fn from_small(v: u32) -> Self;
}

macro_rules! bench_value {
    ($($t:ty => $conv:expr),* $(,)?) => {
        $(impl BenchValue for $t {
            fn from_small(v: u32) -> Self {
                let convert: fn(u32) -> $t = $conv;
                convert(v)
            }
        })*
    };
}

bench_value!(
    f32 => |v| v as f32,
    f64 => f64::from,
    f16 => |v| f16::from_f32(v as f32),
    bf16 => |v| bf16::from_f32(v as f32),
    i32 => |v| v as i32,
    i64 => i64::from,
    // Invariant: callers pass at most EXACT_SUM_LIMIT (255).
    u8 => |v| v as u8,
);

/// Evaluates `$body` with the type alias `$t` naming the Rust type of the run-time `$dtype`
/// (a [`crate::comm::DType`]): the one place the benchmark turns a dtype into a type.
macro_rules! with_bench_value {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::comm::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::comm::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::comm::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::comm::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            $crate::comm::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::comm::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::comm::DType::U8 => {
                type $t = u8;
                $body
            }
        }
    };
}
pub(crate) use with_bench_value;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_possible_sum_is_exact_in_every_dtype() {
        for world_size in [1, 2, 3, 4, 8, 64, 85, 86, 255, 1000] {
            let top = max_value(world_size) as usize * world_size;
            assert!(top <= EXACT_SUM_LIMIT, "world {world_size}: {top}");
            let top = top as u32;
            assert_eq!(f16::from_small(top).to_f32(), top as f32);
            assert_eq!(bf16::from_small(top).to_f32(), top as f32);
            assert_eq!(u8::from_small(top) as u32, top);
        }
    }

    #[test]
    fn the_pattern_uses_every_value_and_depends_on_rank_and_index() {
        let max = max_value(4);
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[pattern(0, i, max) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        let differs = (0..1000).filter(|&i| pattern(0, i, max) != pattern(1, i, max)).count();
        assert!(differs > 500, "{differs}");
    }
}
