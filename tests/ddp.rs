//! `burnrun::Ddp` on users' own burn modules: ranks on threads (real TCP and shared memory through
//! `spawn_ranks`) for the wrapper's rules, and the `resnet_digits` example through the real
//! launcher for parity against one process.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use burnrun::comm::{spawn_ranks, InitOptions};
use burnrun::parallel::HostFlatReduce;
use burnrun::parallel::{flatten_params, load_params, ParamLayout};
use burnrun::{BufferSync, Ddp, DdpError, DdpOptions, ProcessGroup};

/// Losses of 2 ranks x B against 1 rank x 2 micro-batches of B may differ by this much per step:
/// the two runs add the same f32 gradients in another order ((g0 + g1) / 2 against g0 / 2 + g1 / 2)
/// and SGD amplifies a last-bit difference a little each step. Measured: identical to 9 digits
/// over 20 steps.
const EXAMPLE_PARITY_TOLERANCE: f32 = 1e-4;

/// The same for the char_lm example: 2 ranks x 8 windows against 1 rank x 16 (AdamW), where only
/// the order of one f32 sum differs per step. Measured: 4.8e-7 over 30 steps.
const LM_PARITY_TOLERANCE: f32 = 1e-4;

/// The char_lm example with gradients sent as bf16 (error feedback on) against f32: bf16 keeps 8
/// bits of mantissa, and AdamW's normalised update turns a relative 2^-8 gradient error into a
/// small weight error each step. Measured: 1.0e-5 in the loss over 30 steps.
const LM_BF16_WIRE_TOLERANCE: f32 = 1e-2;

/// Gradients averaged by `Ddp` against the mean computed here: only the f32 rounding of one sum.
const AVERAGE_TOLERANCE: f32 = 1e-6;

/// A user's model: two trainable layers, one frozen layer, and a BatchNorm with running
/// statistics.
#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
    frozen: Linear,
    bn: BatchNorm,
}

impl Net {
    fn new(width: usize, device: &Device) -> Self {
        let frozen = LinearConfig::new(4, 4).init(device);
        let frozen = Linear {
            weight: frozen.weight.set_require_grad(false),
            bias: frozen.bias.map(|b| b.set_require_grad(false)),
        };
        Self {
            a: LinearConfig::new(4, width).init(device),
            b: LinearConfig::new(4, 4).init(device),
            frozen,
            bn: BatchNormConfig::new(4).init(device),
        }
    }
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// A `[rows, 4]` input whose values depend on `seed`.
fn input(rows: usize, seed: usize, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * 4)
        .map(|i| ((i * 7 + seed * 13) % 11) as f32 / 5.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, 4]), device)
}

/// Rank `rank`'s copy of a model, made different from every other rank's on purpose.
fn distinct_net(rank: usize, device: &Device) -> Net {
    let net = Net::new(4, device);
    let values: Vec<f32> = flatten_params(&net)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, _)| ((i + 31 * rank) % 17) as f32 / 17.0)
        .collect();
    load_params(net, &values).unwrap()
}

fn ranks<R: Send>(n: usize, f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
    let options = InitOptions {
        timeout: Duration::from_secs(30),
        ..InitOptions::default()
    };
    spawn_ranks(n, &options, f).expect("ranks join")
}

/// `Ddp` over `pg`, on the host path or on the device path (gradients concatenated, summed,
/// averaged and sliced back on their device; here the CPU device, with the host all-reduce as the
/// flat reduction NCCL takes on CUDA).
fn wrap(pg: &ProcessGroup, net: Net, on_device: bool) -> (Net, Ddp) {
    let (net, ddp) = Ddp::new(pg, net, DdpOptions::default()).unwrap();
    if !on_device {
        return (net, ddp);
    }
    (net, ddp.on_device(Box::new(HostFlatReduce::new(pg))).unwrap())
}

/// The gradient of parameter `name` in `grads`, if it has one.
fn grad_of(net: &Net, grads: &GradientsParams, name: &str) -> Option<Vec<f32>> {
    let layout = ParamLayout::of(net);
    let index = layout
        .params
        .iter()
        .position(|p| p.name == name)
        .expect("known parameter");
    let mut found = None;
    let mut k = 0;
    struct Find<'a> {
        grads: &'a GradientsParams,
        index: usize,
        k: &'a mut usize,
        found: &'a mut Option<Vec<f32>>,
    }
    impl burn::module::ModuleVisitor for Find<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if *self.k == self.index {
                *self.found = self
                    .grads
                    .get::<D>(param.id)
                    .map(|g| g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
            }
            *self.k += 1;
        }
    }
    net.visit(&mut Find {
        grads,
        index,
        k: &mut k,
        found: &mut found,
    });
    found
}

#[test]
fn every_rank_starts_from_rank_0s_parameters_and_buffers_whatever_it_built() {
    let params = ranks(3, |pg| {
        let device = device();
        let (net, _ddp) = Ddp::new(&pg, distinct_net(pg.rank(), &device), DdpOptions::default()).unwrap();
        flatten_params(&net).unwrap()
    });
    let rank0 = flatten_params(&distinct_net(0, &device())).unwrap();
    for (rank, p) in params.iter().enumerate() {
        assert_eq!(p, &rank0, "rank {rank} holds rank 0's tensors");
    }
}

#[test]
fn a_rank_with_another_model_fails_on_every_rank_naming_the_first_differing_tensor() {
    let results = ranks(2, |pg| {
        let device = device();
        let width = if pg.rank() == 1 { 5 } else { 4 };
        Ddp::new(&pg, Net::new(width, &device), DdpOptions::default()).map(|_| ())
    });
    for (rank, result) in results.into_iter().enumerate() {
        let err = result.expect_err("a model mismatch is an error on every rank");
        assert!(matches!(err, DdpError::ModelMismatch { .. }), "rank {rank}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("`a.weight [4, 4] trainable` on rank 0"),
            "rank {rank}: {text}"
        );
        assert!(
            text.contains("`a.weight [4, 5] trainable` on rank 1"),
            "rank {rank}: {text}"
        );
    }
}

#[test]
fn gradients_are_averaged_and_a_parameter_unused_on_every_rank_gets_none() {
    for on_device in [false, true] {
        averaged_and_unused(on_device);
    }
}

fn averaged_and_unused(on_device: bool) {
    let outcomes = ranks(2, |pg| {
        let device = device();
        let (net, mut ddp) = wrap(&pg, Net::new(4, &device), on_device);
        let x = input(3, pg.rank(), &device);
        // Rank 0's loss uses `a` only; rank 1's uses `a` and `b`; nobody uses `bn`'s gamma/beta.
        let loss = if pg.rank() == 0 {
            net.a.forward(x).sum()
        } else {
            net.a.forward(x.clone()).sum() + net.b.forward(x).mul_scalar(2.0).sum()
        };
        let local = GradientsParams::from_grads(loss.backward(), &net);
        let local_a = grad_of(&net, &local, "a.weight").unwrap();
        let local_b = grad_of(&net, &local, "b.weight");
        let synced = ddp.sync(&net, local).unwrap();
        (
            local_a,
            local_b,
            grad_of(&net, &synced, "a.weight").unwrap(),
            grad_of(&net, &synced, "b.weight"),
            grad_of(&net, &synced, "bn.gamma"),
            grad_of(&net, &synced, "frozen.weight"),
            ddp.stats().bytes,
        )
    });
    let (a0, b0, ..) = &outcomes[0];
    let (a1, b1, ..) = &outcomes[1];
    assert!(b0.is_none() && b1.is_some(), "only rank 1 has a local gradient for b");
    let b1 = b1.as_ref().unwrap();
    for (rank, (_, _, a, b, gamma, frozen, bytes)) in outcomes.iter().enumerate() {
        let mean_a: Vec<f32> = a0.iter().zip(a1).map(|(x, y)| (x + y) / 2.0).collect();
        assert_close(a, &mean_a, &format!("rank {rank} (device path: {on_device}): a.weight"));
        let b = b
            .as_ref()
            .expect("b had a gradient on some rank, so every rank gets one");
        let half_b1: Vec<f32> = b1.iter().map(|x| x / 2.0).collect();
        assert_close(b, &half_b1, &format!("rank {rank}: b.weight is half of rank 1's"));
        assert!(
            gamma.is_none(),
            "rank {rank}: bn.gamma was used nowhere and gets no gradient"
        );
        assert!(
            frozen.is_none(),
            "rank {rank}: a frozen parameter never gets a gradient"
        );
        // a and b weights + biases, bn gamma and beta: trainable; frozen and running stats: not.
        assert_eq!(
            *bytes,
            4 * (16 + 4 + 16 + 4 + 4 + 4),
            "rank {rank}: only trainable parameters are sent"
        );
    }
}

#[test]
fn accumulated_micro_batches_sync_once_as_their_sum() {
    for on_device in [false, true] {
        accumulated(on_device);
    }
}

fn accumulated(on_device: bool) {
    let outcomes = ranks(2, |pg| {
        let device = device();
        let (net, mut ddp) = wrap(&pg, Net::new(4, &device), on_device);
        let micro = |seed: usize| {
            let loss = net.a.forward(input(2, seed, &device)).sum();
            GradientsParams::from_grads(loss.backward(), &net)
        };
        // Rank r: micro-batches 2r and 2r+1, accumulated, then one sync.
        let first = micro(2 * pg.rank());
        let first_a = grad_of(&net, &first, "a.weight").unwrap();
        ddp.accumulate(&net, first).unwrap();
        let second = micro(2 * pg.rank() + 1);
        let second_a = grad_of(&net, &second, "a.weight").unwrap();
        let synced = ddp.sync(&net, second).unwrap();
        let sum: Vec<f32> = first_a.iter().zip(&second_a).map(|(x, y)| x + y).collect();
        (sum, grad_of(&net, &synced, "a.weight").unwrap(), ddp.syncs())
    });
    for (rank, (_, synced, syncs)) in outcomes.iter().enumerate() {
        assert_eq!(*syncs, 1, "rank {rank}: accumulate communicates nothing");
        let expected: Vec<f32> = outcomes[0]
            .0
            .iter()
            .zip(&outcomes[1].0)
            .map(|(x, y)| (x + y) / 2.0)
            .collect();
        assert_close(
            synced,
            &expected,
            &format!("rank {rank} (device path: {on_device}): a.weight"),
        );
    }
}

/// BatchNorm's default momentum: a running mean starts at 0 and moves this far to a batch's mean.
const BN_MOMENTUM: f32 = 0.1;

/// Per rank, the running mean of `bn` after one training forward on rank-specific data (computed
/// here from the data), and what it is after `sync_buffers`. The running mean is not read before
/// `sync_buffers`: burn keeps a forward's update aside until the next read, which is what
/// `sync_buffers` must handle.
fn running_means_after(buffers: BufferSync) -> Vec<(Vec<f32>, Vec<f32>)> {
    ranks(2, |pg| {
        let device = device();
        let options = DdpOptions {
            buffers,
            ..DdpOptions::default()
        };
        let (net, mut ddp) = Ddp::new(&pg, Net::new(4, &device), options).unwrap();
        let x = input(5, 10 + pg.rank(), &device).mul_scalar(1.0 + pg.rank() as f32);
        let rows = x.clone().into_data().try_into_vec::<f32>().unwrap();
        let own: Vec<f32> = (0..4)
            .map(|c| BN_MOMENTUM * (0..5).map(|r| rows[r * 4 + c]).sum::<f32>() / 5.0)
            .collect();
        let _ = net.bn.forward(x);
        let frozen_before = net.frozen.weight.val().into_data().try_into_vec::<f32>().unwrap();
        let net = ddp.sync_buffers(net).unwrap();
        let synced = net
            .bn
            .running_mean
            .value_sync()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let frozen_after = net.frozen.weight.val().into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(
            frozen_before, frozen_after,
            "frozen weights are identical on every rank already"
        );
        (own, synced)
    })
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= AVERAGE_TOLERANCE, "{what}[{i}]: {a:?} vs {b:?}");
    }
}

#[test]
fn running_statistics_follow_rank_0_by_default_or_the_average_when_asked() {
    let broadcast = running_means_after(BufferSync::Broadcast);
    assert_ne!(broadcast[0].0, broadcast[1].0, "the ranks' own statistics differ");
    assert_close(&broadcast[1].1, &broadcast[0].0, "rank 1 took rank 0's running mean");
    assert_close(&broadcast[0].1, &broadcast[0].0, "rank 0 kept its running mean");

    let average = running_means_after(BufferSync::Average);
    let mean: Vec<f32> = (0..4).map(|i| (average[0].0[i] + average[1].0[i]) / 2.0).collect();
    for (rank, (_, synced)) in average.iter().enumerate() {
        assert_close(synced, &mean, &format!("rank {rank}: averaged running mean"));
    }
    let off = running_means_after(BufferSync::Off);
    assert_close(&off[1].1, &off[1].0, "Off leaves each rank its own statistics");
}

#[test]
fn a_model_on_a_device_without_autodiff_is_refused_with_the_fix() {
    let results = ranks(1, |pg| {
        Ddp::new(&pg, Net::new(4, &Device::flex()), DdpOptions::default()).map(|_| ())
    });
    let text = results[0].as_ref().expect_err("nothing to train").to_string();
    assert!(
        text.contains("no trainable parameter") && text.contains("autodiff"),
        "{text}"
    );
}

/// `target/release/examples/resnet_digits`, built by `cargo test` beside the test binaries.
fn example(name: &str) -> PathBuf {
    let bin = PathBuf::from(common::BURNRUN);
    let path = bin.parent().expect("target folder").join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples first (cargo build --release --examples)",
        path.display()
    );
    path
}

fn read_losses(path: &std::path::Path) -> Vec<f32> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| l.parse().expect("a loss per line"))
        .collect()
}

#[test]
fn the_resnet_example_on_two_ranks_matches_one_rank_with_two_micro_batches() {
    let out = common::out_dir("ddp-resnet");
    let data = out.join("digits").display().to_string();
    let run = |nproc: usize, batch: &str, accum: &str, losses: &str| {
        let args = ["--steps", "12", "--batch", batch, "--accum", accum, "--data", &data];
        run_example("resnet_digits", nproc, &args, &out.join(losses))
    };
    // BatchNorm normalises over each rank's own batch, so 2 ranks x 16 is 1 rank with two
    // micro-batches of 16 (gradients summed), not one batch of 32.
    let single = run(1, "32", "2", "single.txt");
    let parallel = run(2, "16", "1", "ddp.txt");
    assert_eq!(single.len(), 12);
    assert!(single[11] < single[0], "the loss goes down: {single:?}");
    for (step, (s, p)) in single.iter().zip(&parallel).enumerate() {
        assert!(
            (s - p).abs() <= EXAMPLE_PARITY_TOLERANCE,
            "step {step}: 1 rank {s} vs 2 ranks {p}"
        );
    }
}

#[test]
fn gradients_sent_as_bf16_on_the_wire_average_within_bf16_precision() {
    use burnrun::compress::{CodecOptions, CompressionMethod};
    // bf16 keeps 8 bits of mantissa: each rank's gradient is rounded (relative 2^-9) before the
    // f32 sum, and the sum travels back as bf16 too (another 2^-9); 2^-7 leaves room for both
    // plus the sum's cancellation. Error feedback carries what was rounded off to the next step.
    const BF16_RELATIVE: f32 = 1.0 / 128.0;
    let outcomes = ranks(2, |pg| {
        let device = device();
        let options = DdpOptions {
            compression: CodecOptions {
                method: CompressionMethod::Bf16,
                ..CodecOptions::default()
            },
            ..DdpOptions::default()
        };
        let (net, mut ddp) = Ddp::new(&pg, Net::new(4, &device), options).unwrap();
        let loss = net.a.forward(input(3, pg.rank(), &device)).powf_scalar(2.0).sum();
        let local = GradientsParams::from_grads(loss.backward(), &net);
        let local_a = grad_of(&net, &local, "a.weight").unwrap();
        let synced = ddp.sync(&net, local).unwrap();
        (
            local_a,
            grad_of(&net, &synced, "a.weight").unwrap(),
            ddp.stats().clone(),
        )
    });
    for (rank, (_, synced, stats)) in outcomes.iter().enumerate() {
        assert!(
            stats.wire_bytes > 0 && (stats.wire_bytes as usize) < stats.bytes,
            "rank {rank}: {stats:?}"
        );
        for (i, s) in synced.iter().enumerate() {
            let exact = (outcomes[0].0[i] + outcomes[1].0[i]) / 2.0;
            let scale = outcomes[0].0[i].abs().max(outcomes[1].0[i].abs()).max(1e-6);
            assert!(
                (s - exact).abs() <= BF16_RELATIVE * scale,
                "rank {rank}: a.weight[{i}] {s} vs {exact}"
            );
        }
    }
}

/// Runs `burnrun --nproc-per-node N -- EXAMPLE ARGS... --losses FILE` and returns the losses.
fn run_example(name: &str, nproc: usize, args: &[&str], losses: &std::path::Path) -> Vec<f32> {
    let mut all: Vec<String> = vec!["--nproc-per-node".into(), nproc.to_string(), "--".into()];
    all.push(example(name).display().to_string());
    all.extend(args.iter().map(|s| s.to_string()));
    all.push("--losses".into());
    all.push(losses.display().to_string());
    common::burnrun(&all).assert_success(&format!("{name} on {nproc} rank(s)"));
    read_losses(losses)
}

/// Trains the char_lm example (a user's `Task` through `burnrun::train::main`) for 20 steps on
/// `nproc` ranks with `overrides`, and returns the loss of every step from its metrics.jsonl.
fn run_char_lm(nproc: usize, out: &std::path::Path, overrides: &[&str]) -> Vec<f32> {
    let mut args: Vec<String> = vec!["--nproc-per-node".into(), nproc.to_string(), "--".into()];
    args.push(example("char_lm").display().to_string());
    let dir = format!("train.out_dir={}", out.display());
    for set in [
        "train.steps=20",
        "log.every_steps=1",
        "log.progress=\"off\"",
        dir.as_str(),
    ]
    .iter()
    .chain(overrides)
    {
        args.push("--set".into());
        args.push(set.to_string());
    }
    common::burnrun(&args).assert_success(&format!("char_lm on {nproc} rank(s)"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    metrics
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            v["loss"].as_f64().expect("a loss") as f32
        })
        .collect()
}

#[test]
fn the_char_lm_task_on_two_ranks_matches_one_rank_with_the_same_global_batch_also_with_a_bf16_wire() {
    let out = common::out_dir("ddp-char-lm");
    let single = run_char_lm(1, &out.join("single"), &["train.batch_size=16"]);
    let parallel = run_char_lm(2, &out.join("ddp"), &["train.batch_size=8"]);
    let bf16 = run_char_lm(2, &out.join("bf16"), &["train.batch_size=8", "compression.method=bf16"]);
    assert_eq!(single.len(), 20);
    assert!(single[19] < single[0], "the loss goes down: {single:?}");
    for (step, ((s, p), b)) in single.iter().zip(&parallel).zip(&bf16).enumerate() {
        assert!(
            (s - p).abs() <= LM_PARITY_TOLERANCE,
            "step {step}: 1 rank {s} vs 2 ranks {p}"
        );
        assert!(
            (s - b).abs() <= LM_BF16_WIRE_TOLERANCE,
            "step {step}: f32 {s} vs bf16 wire {b}"
        );
    }
    // The trainer wrote a checkpoint of the user's model by module path.
    let ckpt = out.join("ddp/checkpoints/step_00000020/model-stage0.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap_or_else(|e| panic!("{}: {e}", ckpt.display()));
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).to_string();
    assert!(text.contains("tokens.weight") && text.contains("head.weight"), "{text}");
}

#[test]
fn a_misspelt_key_of_the_user_section_is_refused_naming_the_key_and_the_fix() {
    let out = common::out_dir("ddp-char-lm-bad");
    let run = common::burnrun(&[
        "--nproc-per-node".into(),
        "1".into(),
        "--".into(),
        example("char_lm").display().to_string(),
        "--set".into(),
        format!("train.out_dir={}", out.display()),
        "--set".into(),
        "user.widht=64".into(),
    ]);
    let text = run.output();
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("user.widht") && text.contains("did you mean `width`"),
        "{text}"
    );
}

#[test]
fn a_users_binary_checks_its_config_like_burnrun_check_with_its_task_and_its_own_section() {
    let run = std::process::Command::new(example("char_lm"))
        .args(["--check", "--set", "user.width=64", "--set", "train.batch_size=16"])
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .output()
        .expect("char_lm runs");
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    assert!(text.contains("# task: char_lm (2 layers, width 64"), "{text}");
    assert!(text.contains("[user]\ncontext = 32\nwidth = 64"), "{text}");
    assert!(!text.contains("[model]") && !text.contains("[data]"), "{text}");
    assert!(text.contains("global batch = batch_size(16)"), "{text}");
}
