//! The CUDA kernels of `kernels/`, in three rings:
//! - every build: each kernel's CPU reference (`burnrun::kernels::reference`) is the CPU codec of
//!   `compress/` it stands for, bit for bit, on N ranks over TCP (threads, 127.0.0.1);
//! - feature `nccl`, no GPU needed: every kernel compiles with NVRTC for every supported
//!   architecture (CI installs PyPI's `nvidia-cuda-nvrtc-cu12` wheel; without NVRTC each such test
//!   says it is skipped), and opening the device without a CUDA driver is a clean error;
//! - feature `nccl` on a GPU (the GPU check runs this binary as `gpu-bundle/kernel-tests`): every
//!   kernel launched on seeded data of awkward sizes agrees with its reference, bit for bit.
//!   Without a driver or device each such test prints `skipped: <reason>` and passes.

use std::time::Duration;

use burnrun::comm::{spawn_ranks, InitOptions};
use burnrun::compress::{GradCodec, HalfCast, TopK, WireHalf};
use burnrun::kernels::reference::{self, HalfFormat};

/// Seeded values: gradients of magnitudes 2^-14 to 1, with, when `specials`, what the casts must
/// round right or refuse: +-0, f32 subnormals, f16 and bf16 rounding midpoints, values past f16's
/// range, inf and NaN. Without specials, still -0, subnormals and midpoints (all finite after
/// the casts).
fn values(seed: u64, len: usize, specials: bool) -> Vec<f32> {
    let mut rng = burnrun::rng::SplitMix64::new(seed);
    (0..len)
        .map(|_| {
            let state = rng.next_u64();
            let sign = if state & 1 == 0 { 1.0f32 } else { -1.0 };
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            let odd = ((state >> 20) & 0x3F) as f32 * 2.0 + 1.0;
            match (state >> 58, specials) {
                (0, _) => -0.0,
                (1, _) => sign * f32::from_bits(((state >> 24) & 0x7F_FFFF) as u32 | 1),
                (2, _) => sign * (1.0 + odd / 2048.0),
                (3, _) => sign * (1.0 + odd / 256.0),
                (4, true) => sign * (65520.0 + unit as f32 * 1e6),
                (5, true) => sign * f32::INFINITY,
                (6, true) => f32::from_bits(0x7FC0_0000 | ((state >> 30) as u32 & 0xFFFF)) * sign,
                _ => sign * (2f64.powf(-14.0 * unit)) as f32,
            }
        })
        .collect()
}

/// Gradients with many equal magnitudes: top-k's ties at the threshold.
fn quantized(seed: u64, len: usize) -> Vec<f32> {
    values(seed, len, false)
        .into_iter()
        .map(|x| (x * 4.0).round() / 4.0)
        .collect()
}

/// Bits, with every NaN alike (a half conversion's NaN payload is the hardware's).
fn bits(values: &[f32]) -> Vec<u32> {
    values
        .iter()
        .map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() })
        .collect()
}

fn options() -> InitOptions {
    InitOptions {
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

fn wire(format: HalfFormat) -> WireHalf {
    match format {
        HalfFormat::F16 => WireHalf::F16,
        HalfFormat::Bf16 => WireHalf::Bf16,
    }
}

const STEPS: u64 = 3;

fn step_seed(step: u64, rank: usize) -> u64 {
    1000 * step + rank as u64
}

#[test]
fn the_half_cast_references_are_the_cpu_codec_bit_for_bit_over_steps_of_error_feedback() {
    let len = 777;
    for format in HalfFormat::ALL {
        for world in [1usize, 3] {
            // The codec: per rank and step, its output and its residual.
            let codec_runs = spawn_ranks(world, &options(), |pg| {
                let mut codec = HalfCast::new(wire(format), true);
                (0..STEPS)
                    .map(|step| {
                        let mut grads = values(step_seed(step, pg.rank()), len, false);
                        codec.all_reduce_avg(&pg, 0, &[vec![len]], &mut grads, step).unwrap();
                        (grads, codec.residual(0).unwrap().to_vec())
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
            // The kernels' references, rank by rank.
            for (rank, run) in codec_runs.iter().enumerate() {
                let mut residual = vec![0f32; len];
                for (step, (output, codec_residual)) in run.iter().enumerate() {
                    let grad = values(step_seed(step as u64, rank), len, false);
                    let mut sent = vec![0u16; len];
                    reference::cast(format, &grad, Some(&residual), &mut sent, world as f32);
                    assert_eq!(reference::count_nonfinite_half(format, &sent), 0);
                    if world == 1 {
                        // The sum of one rank is its own cast: the output is its widening.
                        let mut widened = vec![0f32; len];
                        reference::widen(format, &sent, &mut widened);
                        assert_eq!(bits(&widened), bits(output), "{format:?} step {step}: output");
                    }
                    reference::half_residual(format, &grad, &mut residual, &sent, world as f32);
                    assert_eq!(
                        bits(&residual),
                        bits(codec_residual),
                        "{format:?} world {world} rank {rank} step {step}: residual"
                    );
                }
            }
        }
    }
}

#[test]
fn without_feedback_the_half_cast_reference_is_the_codec_and_a_non_finite_step_keeps_the_residual() {
    let len = 300;
    for format in HalfFormat::ALL {
        let grad = values(7, len, false);
        let out = spawn_ranks(1, &options(), |pg| {
            let mut grads = grad.clone();
            HalfCast::new(wire(format), false)
                .all_reduce_avg(&pg, 0, &[vec![len]], &mut grads, 0)
                .unwrap();
            grads
        })
        .unwrap();
        let mut sent = vec![0u16; len];
        reference::cast(format, &grad, None, &mut sent, 1.0);
        let mut widened = vec![0f32; len];
        reference::widen(format, &sent, &mut widened);
        assert_eq!(
            bits(&widened),
            bits(&out[0]),
            "{format:?}: -0 stays -0 without a residual"
        );
    }
    // A step whose cast overflows: the codec keeps its residual, the reference says not to update.
    let first = values(8, len, false);
    let mut second = values(9, len, false);
    second[5] = 1e6;
    let out = spawn_ranks(1, &options(), |pg| {
        let mut codec = HalfCast::new(WireHalf::F16, true);
        let mut grads = first.clone();
        codec.all_reduce_avg(&pg, 0, &[vec![len]], &mut grads, 0).unwrap();
        let before = codec.residual(0).unwrap().to_vec();
        let mut grads = second.clone();
        codec.all_reduce_avg(&pg, 0, &[vec![len]], &mut grads, 1).unwrap();
        (before, codec.residual(0).unwrap().to_vec())
    })
    .unwrap();
    let (before, after) = &out[0];
    assert_eq!(bits(before), bits(after), "the codec skipped the residual");
    let mut sent = vec![0u16; len];
    reference::cast(HalfFormat::F16, &second, Some(before), &mut sent, 1.0);
    assert_eq!(reference::count_nonfinite_half(HalfFormat::F16, &sent), 1);
}

/// The reference pipeline of one top-k step over all ranks: select per rank, check the indices,
/// scatter the ranks' pairs in rank order, commit every residual when all values are finite,
/// divide. Returns the average; updates `residuals`.
fn reference_topk_step(grads: &[Vec<f32>], residuals: &mut [Option<Vec<f32>>], k: usize) -> Vec<f32> {
    let (world, len) = (grads.len(), grads[0].len());
    let selections: Vec<reference::Selection> = grads
        .iter()
        .zip(residuals.iter())
        .map(|(g, r)| reference::topk_select(g, r.as_deref(), k))
        .collect();
    let mut out = vec![0f32; len];
    let mut nonfinite = 0;
    for s in &selections {
        assert_eq!(s.indices.len(), k);
        assert_eq!(reference::count_out_of_range(&s.indices, len), 0);
        nonfinite += reference::count_nonfinite(&s.values);
        reference::scatter_add(&s.indices, &s.values, &mut out);
    }
    if nonfinite == 0 {
        for ((g, r), s) in grads.iter().zip(residuals.iter_mut()).zip(&selections) {
            if let Some(r) = r {
                let old = r.clone();
                reference::residual_topk(g, r, s.threshold);
                // Nothing is lost: what was sent plus what stays is exactly the step's input.
                let mut sent = vec![0f32; len];
                reference::scatter_add(&s.indices, &s.values, &mut sent);
                for i in 0..len {
                    assert_eq!((sent[i] + r[i]).to_bits(), (g[i] + old[i]).to_bits(), "element {i}");
                }
            }
        }
    }
    reference::divide(&mut out, world as f32);
    out
}

#[test]
fn the_top_k_references_are_the_cpu_codec_bit_for_bit_ties_included() {
    let (len, world, ratio) = (1000usize, 3usize, 0.05f32);
    for feedback in [true, false] {
        for tied in [false, true] {
            let data = |step: u64, rank: usize| {
                let seed = step_seed(step, rank) + 77;
                let mut g = if tied {
                    quantized(seed, len)
                } else {
                    values(seed, len, false)
                };
                if step == STEPS - 1 && rank == 1 {
                    g[123] = f32::INFINITY; // a step the loss scaler skips: no residual changes
                }
                g
            };
            let codec_runs = spawn_ranks(world, &options(), |pg| {
                let mut codec = TopK::new(ratio, feedback);
                (0..STEPS)
                    .map(|step| {
                        let mut grads = data(step, pg.rank());
                        codec.all_reduce_avg(&pg, 0, &[vec![len]], &mut grads, step).unwrap();
                        (grads, codec.residual(0).map(<[f32]>::to_vec))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap();
            let k = TopK::new(ratio, feedback).k_for(len);
            let mut residuals: Vec<Option<Vec<f32>>> = vec![feedback.then(|| vec![0f32; len]); world];
            for step in 0..STEPS {
                let grads: Vec<Vec<f32>> = (0..world).map(|rank| data(step, rank)).collect();
                let average = reference_topk_step(&grads, &mut residuals, k);
                for (rank, run) in codec_runs.iter().enumerate() {
                    let (output, codec_residual) = &run[step as usize];
                    let case = format!("feedback {feedback} ties {tied} step {step} rank {rank}");
                    assert_eq!(bits(&average), bits(output), "{case}: the average");
                    assert_eq!(
                        residuals[rank].as_deref().map(bits),
                        codec_residual.as_deref().map(bits),
                        "{case}: the residual"
                    );
                }
            }
        }
    }
}

#[cfg(feature = "nccl")]
mod nvrtc_and_gpu {
    use std::path::PathBuf;
    use std::time::Duration;

    use burnrun::env::LibrarySearch;
    use burnrun::kernels::reference::{self, HalfFormat};
    use burnrun::kernels::{candidates, KernelError, KernelSource, Kernels, Nvrtc, ARCHITECTURES, SOURCES};

    use super::{bits, quantized, values};

    fn nvrtc_or_skip(test: &str) -> Option<&'static Nvrtc> {
        match Nvrtc::get() {
            Ok(nvrtc) => Some(nvrtc),
            Err(e) => {
                eprintln!("{test}: skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn every_kernel_compiles_to_ptx_for_every_architecture_with_its_entries_and_conversions() {
        let Some(nvrtc) = nvrtc_or_skip("every_kernel_compiles") else {
            return;
        };
        eprintln!("NVRTC {:?} from {}", nvrtc.version(), nvrtc.path.display());
        for kernel in &SOURCES {
            for arch in ARCHITECTURES {
                let ptx = nvrtc.compile(kernel, arch).unwrap_or_else(|e| panic!("{e}"));
                let target = arch.replace("compute_", "sm_");
                assert!(
                    ptx.text.contains(&format!(".target {target}")),
                    "{} {arch}",
                    kernel.file
                );
                for entry in kernel.entries {
                    assert!(
                        ptx.text.contains(&format!(".entry {entry}(")),
                        "{} for {arch} lacks the entry {entry}",
                        kernel.file
                    );
                }
            }
        }
        // The casts are the hardware's round-to-nearest-even conversions, not a software emulation.
        let cast = nvrtc.compile(&SOURCES[0], "compute_90").unwrap();
        assert!(cast.text.contains("cvt.rn.bf16.f32") && cast.text.contains("cvt.rn.f16.f32"));
        // Every f32 operation rounds once, as in the Rust references: no fused multiply-add, no
        // flush of subnormals to zero, a correctly rounded division.
        for kernel in &SOURCES {
            for arch in ARCHITECTURES {
                let ptx = nvrtc.compile(kernel, arch).unwrap();
                for unwanted in ["fma.rn.f32", "mad.f32", "mad.rn.f32", ".ftz", "div.approx", "div.full"] {
                    assert!(
                        !ptx.text.contains(unwanted),
                        "{} for {arch} has {unwanted}",
                        kernel.file
                    );
                }
            }
        }
        assert!(cast.text.contains("div.rn.f32") && cast.text.contains("sub.rn.f32"));
    }

    #[test]
    fn a_kernel_that_does_not_compile_is_an_error_with_nvrtcs_log_naming_the_line() {
        let Some(nvrtc) = nvrtc_or_skip("a_kernel_that_does_not_compile") else {
            return;
        };
        let broken = KernelSource {
            file: "broken.cu",
            source: "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n",
            entries: &["broken"],
        };
        match nvrtc.compile(&broken, "compute_90") {
            Err(e @ KernelError::Compile { .. }) => {
                let text = e.to_string();
                assert!(text.contains("broken.cu") && text.contains("undefined_name"), "{text}");
                assert!(text.contains("broken.cu(2)"), "the log names the line: {text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nvrtc_is_searched_in_nvrtc_library_then_ld_library_path_then_cuda_then_the_wheels() {
        let search = LibrarySearch {
            nvrtc_library: Some(PathBuf::from("/opt/nvrtc/libnvrtc.so.12")),
            ld_library_path: vec![PathBuf::from("/opt/ld")],
            ..LibrarySearch::default()
        };
        let list = candidates(&search);
        let at = |p: &str| {
            list.iter()
                .position(|c| c == &PathBuf::from(p))
                .unwrap_or_else(|| panic!("{p}: {list:?}"))
        };
        assert!(at("/opt/nvrtc/libnvrtc.so.12") < at("/opt/ld/libnvrtc.so.12"));
        assert!(at("/opt/ld/libnvrtc.so.12") < at("/usr/local/cuda/lib64/libnvrtc.so.12"));
        assert!(at("/usr/local/cuda/lib64/libnvrtc.so.12") < at("libnvrtc.so.12"));
    }

    /// Every launch is tried empty, on one element, on less than a warp, on less than a block's
    /// multiple, and past a million elements on no multiple of anything.
    const SIZES: [usize; 5] = [0, 1, 31, 1023, (1 << 20) + 3];

    /// Bound of every wait for the device.
    const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);

    /// The kernels on device 0, or `None` (the test says it is skipped) without a CUDA driver, a
    /// device or NVRTC. Any other failure (a compile or load error on a GPU) fails the test.
    fn kernels_or_skip(test: &str) -> Option<Kernels> {
        match Kernels::open(0, DEVICE_TIMEOUT) {
            Ok(kernels) => {
                eprintln!("{test}: GPU: the kernels compiled for {} and loaded", kernels.arch());
                Some(kernels)
            }
            Err(e @ (KernelError::NoDevice { .. } | KernelError::LibraryNotFound { .. })) => {
                eprintln!("{test}: skipped: {e}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// Half bits, with every NaN alike (the hardware's NaN payload is its own).
    fn half_bits(format: HalfFormat, values: &[u16]) -> Vec<u16> {
        let nan = |h: u16| {
            h & format.exponent_mask() == format.exponent_mask() && h & !(format.exponent_mask() | 0x8000) != 0
        };
        values.iter().map(|&h| if nan(h) { 0x7FFF } else { h }).collect()
    }

    /// Small residuals, as error feedback leaves them.
    fn small(seed: u64, len: usize) -> Vec<f32> {
        values(seed, len, false).into_iter().map(|x| x / 64.0).collect()
    }

    /// Top-k data: NaN turned into inf (the GPU's arithmetic returns a canonical NaN where the
    /// CPU keeps the payload, so the order among several NaNs is not comparable).
    fn no_nan(values: Vec<f32>) -> Vec<f32> {
        values
            .into_iter()
            .map(|x| if x.is_nan() { f32::INFINITY } else { x })
            .collect()
    }

    #[test]
    fn opening_the_kernels_without_a_cuda_driver_is_an_error_naming_it() {
        if nvrtc_or_skip("opening_the_kernels").is_none() {
            return;
        }
        match Kernels::open(0, DEVICE_TIMEOUT) {
            Ok(kernels) => eprintln!("GPU: the kernels compiled for {} and loaded", kernels.arch()),
            Err(e @ KernelError::NoDevice { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with("no CUDA device 0: "), "{text}");
                eprintln!("no GPU here: {text}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn casts_widening_and_half_residuals_on_the_gpu_are_their_references_bit_for_bit() {
        let Some(kernels) = kernels_or_skip("casts_widening_and_half_residuals") else {
            return;
        };
        for format in HalfFormat::ALL {
            for n in SIZES {
                for world in [1usize, 3] {
                    for feedback in [false, true] {
                        let case = format!("{format:?} n {n} world {world} feedback {feedback}");
                        let grad = values(n as u64 + world as u64, n, true);
                        let mut residual = small(n as u64 + 99, n);
                        let grad_d = kernels.upload(&grad).unwrap();
                        let mut residual_d = kernels.upload(&residual).unwrap();
                        let mut sent_d = kernels.zeros::<u16>(n).unwrap();
                        kernels
                            .cast(format, &grad_d, feedback.then_some(&residual_d), &mut sent_d, world)
                            .unwrap();
                        let sent = kernels.download(&sent_d).unwrap();
                        let mut want = vec![0u16; n];
                        let r = feedback.then_some(residual.as_slice());
                        reference::cast(format, &grad, r, &mut want, world as f32);
                        assert_eq!(half_bits(format, &sent), half_bits(format, &want), "{case}: cast");

                        let mut wide_d = kernels.zeros::<f32>(n).unwrap();
                        kernels.widen(format, &sent_d, &mut wide_d).unwrap();
                        let mut wide = vec![0f32; n];
                        reference::widen(format, &sent, &mut wide);
                        assert_eq!(bits(&kernels.download(&wide_d).unwrap()), bits(&wide), "{case}: widen");

                        assert_eq!(
                            kernels.count_nonfinite_half(format, &sent_d).unwrap(),
                            reference::count_nonfinite_half(format, &sent),
                            "{case}: count_nonfinite_half"
                        );

                        kernels
                            .half_residual(format, &grad_d, &mut residual_d, &sent_d, world)
                            .unwrap();
                        reference::half_residual(format, &grad, &mut residual, &sent, world as f32);
                        assert_eq!(
                            bits(&kernels.download(&residual_d).unwrap()),
                            bits(&residual),
                            "{case}: residual"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_on_the_gpu_selects_the_references_set_and_leaves_its_residual() {
        let Some(kernels) = kernels_or_skip("top_k_on_the_gpu") else {
            return;
        };
        for n in SIZES {
            for tied in [false, true] {
                let grad = if tied {
                    quantized(n as u64 + 5, n)
                } else {
                    no_nan(values(n as u64 + 5, n, true))
                };
                let residual = small(n as u64 + 6, n);
                let grad_d = kernels.upload(&grad).unwrap();
                let residual_d = kernels.upload(&residual).unwrap();
                let mut ks = vec![0, 1, n / 100 + 1, n / 2, n];
                ks.retain(|&k| k <= n);
                ks.dedup();
                for feedback in [false, true] {
                    for &k in &ks {
                        let case = format!("n {n} ties {tied} feedback {feedback} k {k}");
                        let r = feedback.then_some(residual.as_slice());
                        let got = kernels
                            .topk_select(&grad_d, feedback.then_some(&residual_d), k)
                            .unwrap();
                        let want = reference::topk_select(&grad, r, k);
                        assert_eq!(got.threshold, want.threshold, "{case}: threshold");
                        assert_eq!(got.probes, want.probes, "{case}: probes");
                        assert!(got.probes <= reference::max_probes(n), "{case}: {} probes", got.probes);
                        let (indices, values) = (
                            kernels.download(&got.indices).unwrap(),
                            kernels.download(&got.values).unwrap(),
                        );
                        let mut pairs: Vec<(u32, u32)> =
                            indices.iter().zip(&values).map(|(&i, v)| (i, v.to_bits())).collect();
                        pairs.sort_unstable();
                        let want_pairs: Vec<(u32, u32)> = want
                            .indices
                            .iter()
                            .zip(&want.values)
                            .map(|(&i, v)| (i, v.to_bits()))
                            .collect();
                        assert_eq!(pairs, want_pairs, "{case}: the selected set and its values");
                        assert_eq!(
                            kernels.count_nonfinite(&got.values).unwrap(),
                            reference::count_nonfinite(&want.values),
                            "{case}: count_nonfinite"
                        );
                        assert_eq!(
                            kernels
                                .count_selected(&grad_d, feedback.then_some(&residual_d), got.threshold)
                                .unwrap(),
                            k as u64,
                            "{case}: count_selected"
                        );
                        if feedback {
                            let mut after_d = kernels.upload(&residual).unwrap();
                            kernels.topk_residual(&grad_d, &mut after_d, got.threshold).unwrap();
                            let mut after = residual.clone();
                            reference::residual_topk(&grad, &mut after, want.threshold);
                            assert_eq!(
                                bits(&kernels.download(&after_d).unwrap()),
                                bits(&after),
                                "{case}: residual"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scatter_add_and_divide_on_the_gpu_sum_the_ranks_pairs_like_the_reference() {
        let Some(kernels) = kernels_or_skip("scatter_add_and_divide") else {
            return;
        };
        let world = 3usize;
        for n in SIZES {
            let k = (n / 50).max(1).min(n);
            let (mut all_indices, mut all_values) = (Vec::new(), Vec::new());
            let mut want = vec![0f32; n];
            for rank in 0..world {
                let grad = values(n as u64 * 10 + rank as u64, n, false);
                let selection = reference::topk_select(&grad, None, k);
                reference::scatter_add(&selection.indices, &selection.values, &mut want);
                // A rank's pairs come in any order from the gather: reversed here.
                all_indices.extend(selection.indices.iter().rev());
                all_values.extend(selection.values.iter().rev());
            }
            reference::divide(&mut want, world as f32);
            let indices_d = kernels.upload(&all_indices).unwrap();
            let values_d = kernels.upload(&all_values).unwrap();
            let mut out_d = kernels.zeros::<f32>(n).unwrap();
            kernels.scatter_add(&indices_d, &values_d, k, &mut out_d).unwrap();
            kernels.divide(&mut out_d, world as f32).unwrap();
            assert_eq!(bits(&kernels.download(&out_d).unwrap()), bits(&want), "n {n}");
        }

        // A corrupt index: refused, nothing written.
        let indices_d = kernels.upload(&[0u32, 7, 2, 1]).unwrap();
        let values_d = kernels.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let mut out_d = kernels.zeros::<f32>(5).unwrap();
        match kernels.scatter_add(&indices_d, &values_d, 2, &mut out_d) {
            Err(
                e @ KernelError::OutOfRange {
                    count: 1,
                    pairs: 4,
                    numel: 5,
                },
            ) => {
                assert!(e.to_string().contains("nothing was written"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(kernels.download(&out_d).unwrap(), vec![0.0; 5]);
        // Arguments that do not fit: an error naming the kernel and the buffer, nothing launched.
        let short = kernels.upload(&[1.0f32]).unwrap();
        let text = kernels
            .scatter_add(&indices_d, &short, 2, &mut out_d)
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("scatter_add: values holds 1 elements"), "{text}");
        let text = kernels
            .scatter_add(&indices_d, &values_d, 3, &mut out_d)
            .unwrap_err()
            .to_string();
        assert!(text.contains("not whole ranks of 3"), "{text}");
        let mut sent_d = kernels.zeros::<u16>(4).unwrap();
        let text = kernels
            .cast(HalfFormat::Bf16, &short, None, &mut sent_d, 1)
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("cast_bf16: out holds 4 elements, the input 1"),
            "{text}"
        );
        let text = kernels.topk_select(&short, None, 2).unwrap_err().to_string();
        assert!(text.contains("k = 2 of only 1"), "{text}");
    }
}
