//! Gradient codecs against CPU references, on N ranks over real TCP (threads, 127.0.0.1).

use std::time::Duration;

use burnrun::comm::{spawn_ranks, InitOptions, ProcessGroup};
use burnrun::compress::{
    build_codec, CodecOptions, CodecStats, CompressError, CompressionMethod, GradCodec, HalfCast, PowerSgd, TopK,
    WireHalf,
};

/// IEEE half keeps 10 mantissa bits: one round-to-nearest loses at most 2^-11 of the value.
const F16_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
/// bfloat16 keeps 7 mantissa bits: at most 2^-8 per rounding.
const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
/// PowerSGD at full rank is exact in real arithmetic; in f32 the Gram-Schmidt and the short
/// products (at most 6 terms here) leave errors of a few 1e-7 relative to the largest entry.
const POWERSGD_FULL_RANK_TOLERANCE: f64 = 1e-4;
/// Error feedback is exact in real arithmetic; each step adds an f32 rounding of the input
/// (g + r) and of the average, about 1e-7 relative each, over a handful of steps.
const ERROR_FEEDBACK_TOLERANCE: f64 = 1e-5;

fn options() -> InitOptions {
    InitOptions {
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Deterministic values in ±[0.001, 1), never zero, different per (seed, index).
fn gradient(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = burnrun::rng::SplitMix64::new(seed);
    (0..len)
        .map(|_| {
            let state = rng.next_u64();
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            let magnitude = 0.001 + 0.999 * unit;
            (if state & 1 == 0 { magnitude } else { -magnitude }) as f32
        })
        .collect()
}

fn numel(shapes: &[Vec<usize>]) -> usize {
    shapes.iter().map(|s| s.iter().product::<usize>()).sum()
}

fn codec(method: CompressionMethod, topk_ratio: f32, powersgd_rank: usize) -> Box<dyn GradCodec> {
    build_codec(&CodecOptions {
        method,
        topk_ratio,
        powersgd_rank,
        ..Default::default()
    })
    .unwrap()
}

/// Runs one step of `codec` on every rank with rank `r`'s gradient `gradient(seed + r, ...)`.
fn one_step(pg: &ProcessGroup, codec: &mut dyn GradCodec, shapes: &[Vec<usize>], seed: u64) -> (Vec<f32>, CodecStats) {
    let mut grads = gradient(seed + pg.rank() as u64, numel(shapes));
    let stats = codec.all_reduce_avg(pg, 0, shapes, &mut grads, 0).unwrap();
    (grads, stats)
}

/// The exact average across `world` ranks, in f64.
fn exact_average(world: usize, seed: u64, len: usize) -> Vec<f64> {
    let mut sum = vec![0f64; len];
    for r in 0..world {
        sum.iter_mut()
            .zip(gradient(seed + r as u64, len))
            .for_each(|(s, g)| *s += f64::from(g));
    }
    sum.iter().map(|s| s / world as f64).collect()
}

#[test]
fn fp16_and_bf16_round_trips_stay_within_their_epsilon() {
    let shapes = vec![vec![37, 11], vec![300]];
    let len = numel(&shapes);
    for (wire, unit) in [(WireHalf::F16, F16_UNIT_ROUNDOFF), (WireHalf::Bf16, BF16_UNIT_ROUNDOFF)] {
        for world in [1usize, 3] {
            let out = spawn_ranks(world, &options(), |pg| {
                let mut codec = HalfCast::new(wire, false);
                one_step(&pg, &mut codec, &shapes, 10)
            })
            .unwrap();
            // Each rank rounds once when casting and the ring rounds once per addition:
            // at most `world` roundings, each relative to at most the sum of magnitudes.
            let mut mean_magnitude = vec![0f64; len];
            for r in 0..world {
                let g = gradient(10 + r as u64, len);
                mean_magnitude
                    .iter_mut()
                    .zip(g)
                    .for_each(|(m, g)| *m += f64::from(g.abs()) / world as f64);
            }
            let want = exact_average(world, 10, len);
            for (rank, (got, stats)) in out.iter().enumerate() {
                assert_eq!(stats.wire_bytes, 2 * len as u64, "{wire:?}: 2 bytes per element");
                assert!(stats.compressed);
                assert!(
                    stats.relative_error > 0.0 && stats.relative_error <= unit,
                    "{wire:?}: {stats:?}"
                );
                for i in 0..len {
                    let bound = (world + 1) as f64 * unit * mean_magnitude[i];
                    let err = (f64::from(got[i]) - want[i]).abs();
                    assert!(
                        err <= bound,
                        "{wire:?} world {world} rank {rank} [{i}]: {} vs {} ",
                        got[i],
                        want[i]
                    );
                }
                assert_eq!(got, &out[0].0, "every rank gets the same bits");
            }
        }
    }
}

#[test]
fn half_codecs_put_half_the_bytes_of_f32_on_the_wire() {
    let shapes = vec![vec![256, 256]];
    let out = spawn_ranks(2, &options(), |pg| {
        [
            CompressionMethod::None,
            CompressionMethod::Fp16,
            CompressionMethod::Bf16,
        ]
        .map(|method| one_step(&pg, &mut *codec(method, 0.01, 4), &shapes, 3).1)
    })
    .unwrap();
    for [none, fp16, bf16] in out {
        assert_eq!(none.wire_bytes, 4 * 256 * 256);
        assert_eq!(fp16.wire_bytes * 2, none.wire_bytes);
        assert_eq!(bf16.wire_bytes * 2, none.wire_bytes);
        // Measured on the transport (framing included), the halving holds within 5%.
        for half in [fp16, bf16] {
            let ratio = half.transport_bytes as f64 / none.transport_bytes as f64;
            assert!((0.45..0.55).contains(&ratio), "transport bytes {half:?} vs {none:?}");
        }
        assert_eq!(none.relative_error, 0.0);
    }
}

/// The CPU reference of top-k: indices of the k largest |values|, lower index first on ties.
fn reference_top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

#[test]
fn top_k_sends_exactly_k_entries_per_rank_and_sums_them_exactly() {
    let shapes = vec![vec![40, 25], vec![17]];
    let (len, world, ratio) = (numel(&shapes), 3usize, 0.05f32);
    let k = TopK::new(ratio, true).k_for(len);
    assert_eq!(k, (0.05f64 * len as f64).ceil() as usize);
    let out = spawn_ranks(world, &options(), |pg| {
        let mut codec = TopK::new(ratio, true);
        let (avg, stats) = one_step(&pg, &mut codec, &shapes, 100);
        (avg, stats, codec.residual(0).unwrap().to_vec())
    })
    .unwrap();

    // Reference: every rank's selected values summed in rank order into zeros, divided by n.
    let mut want = vec![0f32; len];
    for r in 0..world {
        let g = gradient(100 + r as u64, len);
        for i in reference_top_k(&g, k) {
            want[i] += g[i];
        }
    }
    want.iter_mut().for_each(|w| *w /= world as f32);
    for (rank, (avg, stats, residual)) in out.iter().enumerate() {
        assert_eq!(avg, &want, "rank {rank}: the sum of the selected entries is exact");
        assert_eq!(stats.wire_bytes, (k * 8) as u64, "k (i32 index, f32 value) pairs");
        let g = gradient(100 + rank as u64, len);
        let selected = reference_top_k(&g, k);
        let kept: Vec<usize> = (0..len).filter(|&i| residual[i] == 0.0).collect();
        assert_eq!(kept, selected, "rank {rank}: exactly its k entries left the residual");
        for i in (0..len).filter(|i| !selected.contains(i)) {
            assert_eq!(
                residual[i], g[i],
                "rank {rank}: entry {i} was not sent and waits in the residual"
            );
        }
        let lost: f64 = residual.iter().map(|&x| f64::from(x).powi(2)).sum();
        let total: f64 = g.iter().map(|&x| f64::from(x).powi(2)).sum();
        assert!((stats.relative_error - (lost / total).sqrt()).abs() < 1e-9, "{stats:?}");
    }
}

#[test]
fn top_k_breaks_ties_by_the_lower_index() {
    let shapes = vec![vec![100]];
    let out = spawn_ranks(2, &options(), |pg| {
        let mut grads: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        TopK::new(0.1, false)
            .all_reduce_avg(&pg, 0, &shapes, &mut grads, 0)
            .unwrap();
        grads
    })
    .unwrap();
    for grads in out {
        let sent: Vec<usize> = (0..100).filter(|&i| grads[i] != 0.0).collect();
        assert_eq!(sent, (0..10).collect::<Vec<_>>());
    }
}

#[test]
fn power_sgd_at_full_rank_reconstructs_the_averaged_gradient() {
    // A tall matrix, a wide one, a 3-d tensor (viewed as [3, 4]), a bias and a scalar.
    let shapes = vec![vec![6, 4], vec![4, 6], vec![3, 2, 2], vec![5], vec![]];
    let (len, world) = (numel(&shapes), 3usize);
    let out = spawn_ranks(world, &options(), |pg| {
        // Rank 8 >= min(rows, cols) of every matrix: r = min(rows, cols), full rank. Rate 0
        // factors every matrix although its factors are larger than itself.
        let mut codec = PowerSgd::new(8, true, 42).with_min_compression_rate(0.0);
        one_step(&pg, &mut codec, &shapes, 7)
    })
    .unwrap();
    let want = exact_average(world, 7, len);
    let largest = want.iter().fold(0f64, |m, &x| m.max(x.abs()));
    for (rank, (got, stats)) in out.iter().enumerate() {
        assert!(stats.compressed);
        // P: 6*4 + 4*4 + 3*3 factors + 5 + 1 dense; Q: 4*4 + 6*4 + 4*3.
        assert_eq!(stats.wire_bytes, 4 * ((24 + 16 + 9 + 6) + (16 + 24 + 12)));
        for i in 0..len {
            let err = (f64::from(got[i]) - want[i]).abs() / largest;
            assert!(
                err <= POWERSGD_FULL_RANK_TOLERANCE,
                "rank {rank} [{i}]: {} vs {}",
                got[i],
                want[i]
            );
        }
        assert_eq!(got, &out[0].0, "every rank decodes the same bits");
    }
}

#[test]
fn top_k_at_1_percent_and_power_sgd_at_rank_4_cut_the_bytes_of_a_1024_by_1024_gradient_20x() {
    let shapes = vec![vec![1024, 1024]];
    let out = spawn_ranks(2, &options(), |pg| {
        [
            CompressionMethod::None,
            CompressionMethod::TopK,
            CompressionMethod::PowerSgd,
        ]
        .map(|method| one_step(&pg, &mut *codec(method, 0.01, 4), &shapes, 5).1)
    })
    .unwrap();
    for [none, topk, powersgd] in out {
        assert_eq!(none.wire_bytes, 4 << 20);
        for (name, lossy) in [("topk", topk), ("powersgd", powersgd)] {
            assert!(lossy.compressed, "{name}");
            let payload = none.wire_bytes as f64 / lossy.wire_bytes as f64;
            let measured = none.transport_bytes as f64 / lossy.transport_bytes as f64;
            assert!(payload >= 20.0, "{name}: payload cut only {payload:.1}x ({lossy:?})");
            assert!(
                measured >= 20.0,
                "{name}: transport bytes cut only {measured:.1}x ({lossy:?} vs {none:?})"
            );
            assert!(
                lossy.relative_error > 0.0 && lossy.relative_error < 1.0,
                "{name}: {lossy:?}"
            );
        }
    }
}

/// Runs `steps` steps; returns per rank (sum of averaged outputs, final residual, sum of own inputs).
fn run_with_feedback(
    options_: &CodecOptions,
    shapes: &[Vec<usize>],
    world: usize,
    steps: u64,
) -> Vec<(Vec<f64>, Vec<f32>, Vec<f64>)> {
    let len = numel(shapes);
    spawn_ranks(world, &options(), |pg| {
        let mut codec = build_codec(options_).unwrap();
        let (mut sent, mut inputs) = (vec![0f64; len], vec![0f64; len]);
        for step in 0..steps {
            let mut grads = gradient(1000 * step + pg.rank() as u64, len);
            inputs.iter_mut().zip(&grads).for_each(|(s, &g)| *s += f64::from(g));
            let stats = codec.all_reduce_avg(&pg, 0, shapes, &mut grads, step).unwrap();
            assert!(stats.compressed && stats.relative_error > 0.0, "step {step}: {stats:?}");
            sent.iter_mut().zip(&grads).for_each(|(s, &g)| *s += f64::from(g));
        }
        (sent, codec.residual(0).unwrap().to_vec(), inputs)
    })
    .unwrap()
}

#[test]
fn error_feedback_carries_the_residual_so_nothing_is_lost_over_steps() {
    let shapes = vec![vec![16, 12], vec![12], vec![4, 3, 3]];
    let len = numel(&shapes);
    for method in [
        CompressionMethod::TopK,
        CompressionMethod::PowerSgd,
        CompressionMethod::Bf16,
    ] {
        // Half casts round again inside the reduction, where no rank can see it: check them on one rank.
        let worlds: &[usize] = if method == CompressionMethod::Bf16 {
            &[1]
        } else {
            &[1, 3]
        };
        for &world in worlds {
            let codec_options = CodecOptions {
                method,
                topk_ratio: 0.1,
                powersgd_rank: 1,
                ..Default::default()
            };
            let out = run_with_feedback(&codec_options, &shapes, world, 5);
            // sum over ranks of (what was sent + final residual) == sum over ranks of gradients;
            // what all ranks sent together is n times the sum of the averages.
            let mut lhs = vec![0f64; len];
            let mut rhs = vec![0f64; len];
            for (sent, residual, inputs) in &out {
                for i in 0..len {
                    lhs[i] += sent[i] + f64::from(residual[i]);
                    rhs[i] += inputs[i];
                }
            }
            let scale = rhs.iter().fold(0f64, |m, &x| m.max(x.abs()));
            for i in 0..len {
                assert!(
                    (lhs[i] - rhs[i]).abs() <= ERROR_FEEDBACK_TOLERANCE * scale * world as f64,
                    "{method} world {world} [{i}]: sent + residual {} != sum of gradients {}",
                    lhs[i],
                    rhs[i]
                );
            }
            let residual_norm: f64 = out.iter().flat_map(|o| &o.1).map(|&x| f64::from(x).powi(2)).sum();
            assert!(residual_norm > 0.0, "{method}: something was held back");
        }
    }
}

#[test]
fn a_non_finite_gradient_reaches_every_rank_and_leaves_the_codec_state_untouched() {
    let shapes = vec![vec![32, 16], vec![16]];
    let len = numel(&shapes);
    for method in [
        CompressionMethod::Fp16,
        CompressionMethod::TopK,
        CompressionMethod::PowerSgd,
    ] {
        let out = spawn_ranks(2, &options(), |pg| {
            let mut codec = codec(method, 0.05, 2);
            let mut grads = gradient(pg.rank() as u64, len);
            codec.all_reduce_avg(&pg, 0, &shapes, &mut grads, 0).unwrap();
            let before = codec.residual(0).unwrap().to_vec();
            let mut grads = gradient(10 + pg.rank() as u64, len);
            if pg.rank() == 1 {
                grads[77] = f32::INFINITY;
            }
            let stats = codec.all_reduce_avg(&pg, 0, &shapes, &mut grads, 1).unwrap();
            let after = codec.residual(0).unwrap().to_vec();
            (
                grads.iter().any(|x| !x.is_finite()),
                before == after,
                stats.relative_error,
            )
        })
        .unwrap();
        for (rank, (non_finite, unchanged, error)) in out.into_iter().enumerate() {
            assert!(non_finite, "{method} rank {rank}: the overflow must reach the output");
            assert!(
                unchanged,
                "{method} rank {rank}: a skipped step must not change the residual"
            );
            if rank == 1 {
                assert!(error.is_nan(), "{method}: {error}");
            }
        }
    }
}

#[test]
fn compression_starts_at_start_step_and_averages_exactly_before() {
    let shapes = vec![vec![64, 32]];
    let len = numel(&shapes);
    let out = spawn_ranks(2, &options(), |pg| {
        let mut codec = build_codec(&CodecOptions {
            method: CompressionMethod::PowerSgd,
            powersgd_rank: 2,
            start_step: 3,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(codec.name(), "powersgd");
        (0..5u64)
            .map(|step| {
                let mut grads = gradient(step * 10 + pg.rank() as u64, len);
                let stats = codec.all_reduce_avg(&pg, 0, &shapes, &mut grads, step).unwrap();
                (grads, stats)
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    for steps in out {
        for (step, (grads, stats)) in steps.iter().enumerate() {
            assert_eq!(stats.compressed, step >= 3, "step {step}");
            if step < 3 {
                let want = exact_average(2, step as u64 * 10, len);
                assert!(
                    grads.iter().zip(&want).all(|(&g, &w)| (f64::from(g) - w).abs() < 1e-6),
                    "step {step}"
                );
                assert_eq!(stats.wire_bytes, 4 * len as u64);
            } else {
                assert_eq!(stats.wire_bytes, 4 * 2 * (64 + 32));
            }
        }
    }
}

#[test]
fn build_codec_refuses_out_of_range_options_and_unknown_methods() {
    for ratio in [0.0f32, -0.5, 1.5, f32::NAN] {
        let err = build_codec(&CodecOptions {
            method: CompressionMethod::TopK,
            topk_ratio: ratio,
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, CompressError::InvalidOption { key: "topk_ratio", .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("compression.topk_ratio = "), "{err}");
    }
    let err = build_codec(&CodecOptions {
        method: CompressionMethod::PowerSgd,
        powersgd_rank: 0,
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("powersgd_rank"), "{err}");
    let err = "zstd".parse::<CompressionMethod>().unwrap_err();
    assert!(
        err.to_string().contains("\"zstd\"") && err.to_string().contains("powersgd"),
        "{err}"
    );
    for &method in CompressionMethod::ALL {
        assert_eq!(method.as_str().parse::<CompressionMethod>().unwrap(), method);
        assert_eq!(
            build_codec(&CodecOptions {
                method,
                ..Default::default()
            })
            .unwrap()
            .name(),
            method.as_str()
        );
    }
}

#[test]
fn shapes_that_do_not_cover_the_gradient_are_refused_before_anything_is_sent() {
    let out = spawn_ranks(1, &options(), |pg| {
        let mut grads = vec![1.0f32; 10];
        let sent_before = pg.bytes_sent();
        let err = codec(CompressionMethod::PowerSgd, 0.01, 4)
            .all_reduce_avg(&pg, 3, &[vec![3, 3]], &mut grads, 0)
            .unwrap_err();
        (err.to_string(), pg.bytes_sent() == sent_before)
    })
    .unwrap();
    let (message, nothing_sent) = &out[0];
    assert!(
        message.contains("rank 0") && message.contains("bucket 3") && message.contains("9 elements"),
        "{message}"
    );
    assert!(nothing_sent);
}

/// Two buckets: a matrix PowerSGD factors plus a bias, and a matrix alone.
fn two_buckets() -> Vec<Vec<Vec<usize>>> {
    vec![vec![vec![12, 9], vec![9]], vec![vec![20, 6]]]
}

/// Runs `steps` of `codec` over both buckets of [`two_buckets`] on this rank; returns every
/// averaged bucket, in order.
fn run_steps(pg: &ProcessGroup, codec: &mut dyn GradCodec, steps: std::ops::Range<u64>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for step in steps {
        for (bucket, shapes) in two_buckets().iter().enumerate() {
            let seed = 1000 * step + 100 * bucket as u64 + pg.rank() as u64;
            let mut grads = gradient(seed, numel(shapes));
            codec.all_reduce_avg(pg, bucket, shapes, &mut grads, step).unwrap();
            out.push(grads);
        }
    }
    out
}

#[test]
fn a_codec_loaded_with_another_codecs_exported_state_continues_bit_for_bit_like_it() {
    let lossy = |method, start_step| CodecOptions {
        method,
        topk_ratio: 0.1,
        powersgd_rank: 2,
        start_step,
        ..Default::default()
    };
    let cases = [
        lossy(CompressionMethod::TopK, 0),
        lossy(CompressionMethod::PowerSgd, 0),
        lossy(CompressionMethod::PowerSgd, 2),
        lossy(CompressionMethod::Fp16, 0),
        lossy(CompressionMethod::Bf16, 0),
    ];
    for codec_options in cases {
        let options = &codec_options;
        let out = spawn_ranks(2, &self::options(), |pg| {
            let mut original = build_codec(options).unwrap();
            run_steps(&pg, original.as_mut(), 0..3);
            let state = original.state();
            let mut restored = build_codec(options).unwrap();
            restored.load_state(&two_buckets(), state.clone()).unwrap();
            assert_eq!(restored.state(), state, "{options:?}: the state reads back as loaded");
            let mut fresh = build_codec(options).unwrap();
            let want = run_steps(&pg, original.as_mut(), 3..6);
            let got = run_steps(&pg, restored.as_mut(), 3..6);
            let from_zero = run_steps(&pg, fresh.as_mut(), 3..6);
            assert_eq!(got, want, "{options:?}, rank {}: the restored codec drifted", pg.rank());
            assert_eq!(restored.state(), original.state(), "{options:?}");
            (state, got != from_zero)
        })
        .unwrap();
        let (state0, state1) = (&out[0].0, &out[1].0);
        let residual = |state: &[burnrun::compress::StateTensor], name: &str| {
            state.iter().find(|t| t.name == name).map(|t| t.data.clone())
        };
        for bucket in 0..2 {
            let name = format!("residual.bucket{bucket}");
            let r0 = residual(state0, &name).unwrap_or_else(|| panic!("{options:?}: no {name}"));
            let r1 = residual(state1, &name).unwrap_or_else(|| panic!("{options:?}: no {name}"));
            assert!(r0.iter().any(|&x| x != 0.0), "{options:?}: {name} is zero");
            assert_ne!(r0, r1, "{options:?}: each rank keeps its own residual");
        }
        if options.method == CompressionMethod::PowerSgd {
            let q = |s: &[burnrun::compress::StateTensor]| {
                s.iter()
                    .filter(|t| t.name.starts_with("q."))
                    .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
                    .collect::<Vec<_>>()
            };
            let names: Vec<String> = q(state0).into_iter().map(|t| t.0).collect();
            assert_eq!(names.len(), 2, "{options:?}: one Q per factored matrix: {names:?}");
            assert_eq!(q(state0), q(state1), "{options:?}: Q is the same on every rank");
        }
        if matches!(options.method, CompressionMethod::TopK | CompressionMethod::PowerSgd) {
            assert!(
                out.iter().all(|(_, differs)| *differs),
                "{options:?}: a codec started from zero state computes the same: the test could not fail"
            );
        }
    }
}

#[test]
fn state_that_does_not_fit_is_refused_naming_the_tensor_and_both_shapes_and_the_old_state_stays() {
    use burnrun::compress::StateTensor;
    let tensor = |name: &str, shape: Vec<usize>| StateTensor {
        name: name.to_string(),
        data: vec![0.5; shape.iter().product()],
        shape,
    };
    let buckets = two_buckets();
    // A valid state first: residuals of 117 and 120 elements.
    let valid = vec![
        tensor("residual.bucket0", vec![117]),
        tensor("residual.bucket1", vec![120]),
    ];
    let mut topk = TopK::new(0.1, true);
    topk.load_state(&buckets, valid.clone()).unwrap();
    let sorted = |mut v: Vec<StateTensor>| {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    assert_eq!(sorted(topk.state()), valid);

    let err = topk
        .load_state(&buckets, vec![tensor("residual.bucket0", vec![100])])
        .unwrap_err();
    assert!(matches!(err, CompressError::StateShape { .. }), "{err:?}");
    let text = err.to_string();
    for part in ["topk", "residual.bucket0", "[100]", "[117]"] {
        assert!(text.contains(part), "`{text}` does not name {part}");
    }
    let err = topk
        .load_state(&buckets, vec![tensor("residual.bucket2", vec![5])])
        .unwrap_err();
    assert!(err.to_string().contains("residual.bucket2"), "{err}");
    assert_eq!(sorted(topk.state()), valid, "a refused load leaves the state as it was");

    // PowerSGD at rank 2: Q of the [12, 9] matrix is [9, 2]; one of rank 3 does not fit.
    let mut powersgd = PowerSgd::new(2, true, 0);
    let err = powersgd
        .load_state(&buckets, vec![tensor("q.bucket0.param0", vec![9, 3])])
        .unwrap_err();
    let text = err.to_string();
    for part in ["powersgd", "q.bucket0.param0", "[9, 3]", "[9, 2]"] {
        assert!(text.contains(part), "`{text}` does not name {part}");
    }
    // The bias (param 1) is sent uncompressed: it has no Q.
    let err = powersgd
        .load_state(&buckets, vec![tensor("q.bucket0.param1", vec![1, 2])])
        .unwrap_err();
    assert!(err.to_string().contains("q.bucket0.param1"), "{err}");
    assert!(powersgd.state().is_empty());
    powersgd
        .load_state(&buckets, vec![tensor("q.bucket1.param0", vec![6, 2])])
        .unwrap();
    assert_eq!(powersgd.state(), vec![tensor("q.bucket1.param0", vec![6, 2])]);

    // Without error feedback there is no residual to load; a stateless codec takes nothing.
    let err = TopK::new(0.1, false).load_state(&buckets, valid.clone()).unwrap_err();
    assert!(err.to_string().contains("residual.bucket0"), "{err}");
    let err = codec(CompressionMethod::None, 0.1, 1)
        .load_state(&buckets, valid.clone())
        .unwrap_err();
    assert!(err.to_string().contains("none codec state"), "{err}");
    // Data that does not fill its shape.
    let mut short = tensor("residual.bucket0", vec![117]);
    short.data.pop();
    let err = TopK::new(0.1, true).load_state(&buckets, vec![short]).unwrap_err();
    assert!(err.to_string().contains("116 values"), "{err}");
}

#[test]
fn codecs_describe_every_option_their_state_depends_on() {
    let describe = |options: CodecOptions| build_codec(&options).unwrap().describe();
    let base = CodecOptions {
        method: CompressionMethod::PowerSgd,
        ..Default::default()
    };
    let variants = [
        CodecOptions {
            powersgd_rank: 2,
            ..base.clone()
        },
        CodecOptions {
            error_feedback: false,
            ..base.clone()
        },
        CodecOptions {
            seed: 7,
            ..base.clone()
        },
        CodecOptions {
            start_step: 5,
            ..base.clone()
        },
        CodecOptions {
            method: CompressionMethod::TopK,
            ..base.clone()
        },
    ];
    for variant in variants {
        assert_ne!(describe(variant.clone()), describe(base.clone()), "{variant:?}");
    }
    assert_eq!(describe(base.clone()), describe(base.clone()));
    let topk = |ratio| {
        describe(CodecOptions {
            method: CompressionMethod::TopK,
            topk_ratio: ratio,
            ..Default::default()
        })
    };
    assert_ne!(topk(0.1), topk(0.2));
    assert_eq!(topk(0.1), "topk(ratio=0.1, error_feedback=true)");
}
