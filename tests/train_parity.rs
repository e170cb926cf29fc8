//! Numerical parity of data parallelism and gradient accumulation (issue 3), end to end through
//! the real launcher: N ranks with per-rank batch B must end where one rank with batch N x B ends,
//! because the sampler cuts every global batch into per-rank blocks (same samples, same steps) and
//! the averaged gradients equal the gradient of the mean loss over the whole global batch. Resuming
//! from a checkpoint must continue exactly where the uninterrupted run goes.

mod common;

use std::path::Path;

use common::{assert_params_close, config, final_params, max_abs_diff, out_dir, params_at, sets, train, Params};

/// SGD parity: f32 sums are taken in a different order in one batch of N x B than in N averaged
/// batches of B (and the all-reduce adds in its own order). Measured: at most 1.2e-7 after 20
/// steps of a 0.1 learning rate with momentum; this leaves room for the rounding to grow.
const SGD_PARITY_TOL: f32 = 2e-6;

/// Adam parity: Adam divides by the square root of the second moment, which is tiny for
/// parameters with tiny gradients, so it magnifies the same rounding differences; its updates
/// are bounded by the learning rate (1e-3 here), so this stays far below one update's size.
/// Measured: 3e-8 (1.4e-7 with seed 42).
const ADAM_PARITY_TOL: f32 = 1e-5;

/// Two ranks' averaged gradients are computed with the very additions one rank does when it
/// splits the batch into two micro-batches (sum of the two halves, then a halving, exact in f32).
const SAME_ARITHMETIC_TOL: f32 = 0.0;

/// Gradient sync overlapped with backward (block by block) against sync after backward: the
/// block-wise backward hands each block exactly the output gradient the whole backward does
/// (`d sum(out * g) / d out = g`), and averaging two ranks' values is one exact-order addition
/// whatever the bucket boundaries, so the runs agree bit for bit.
const OVERLAP_TOL: f32 = 0.0;

/// The gradients' device path (summed as one flat tensor on the device, averaged as one buffer,
/// read back once: the path NCCL takes on CUDA) against the host path (read back per backward,
/// averaged in buckets): the same f32 additions in the same order (two ranks: one addition per
/// value; accumulation: the same two micro-batch sums; the scale by 1/accum is a power of two),
/// so the runs agree bit for bit.
const DEVICE_PATH_TOL: f32 = 0.0;

/// A resumed run replays the same arithmetic on the same ranks from exactly saved f32 state.
const RESUME_TOL: f32 = 0.0;

/// The training seed of every run. Parity runs compare trajectories that differ only by f32
/// rounding, and a ReLU turns rounding into an O(1) difference when a pre-activation lies within
/// rounding distance of 0: with the default seed 42, at step 14 one sample's pre-activation of
/// unit 0 of block 0 does, and 2 ranks x B and one batch of 2B then differ by 6e-3 in that unit's
/// weights alone (while 2 ranks x B and one rank running 2B as 2 micro-batches agree bit for bit).
/// Seeds 1 to 8 have no such tie within 20 steps; this one is fixed so the tolerance stays tight.
const SEED: u64 = 1;

/// Steps of every parity run.
const STEPS: u64 = 20;

/// Per-rank batch B of the data-parallel runs.
const B: usize = 8;

/// A small MLP on a small synthetic set, trained with SGD with momentum. One compute thread per
/// rank, so that only the split of the batch differs between the runs compared. The replica
/// check runs every 5 steps.
fn mlp(batch_size: usize, accum: usize, extra: &[&str]) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32]",
        "optim.kind=sgd",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "train.threads=1",
        "train.check_replicas_every=5",
        "log.every_steps=5",
        "log.progress=plain",
    ]);
    out.push(format!("train.seed={SEED}"));
    out.push(format!("train.steps={STEPS}"));
    out.push(format!("train.batch_size={batch_size}"));
    out.push(format!("train.grad_accum_steps={accum}"));
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

/// Trains the MLP and returns its final parameters.
fn run(test: &str, ranks: usize, batch_size: usize, accum: usize, extra: &[&str]) -> Params {
    let out = out_dir(test);
    train(
        ranks,
        &config("mlp_synthetic.toml"),
        &out,
        &mlp(batch_size, accum, extra),
    );
    let params = final_params(&out);
    let _ = std::fs::remove_dir_all(&out);
    params
}

#[test]
fn two_ranks_with_batch_b_end_at_the_parameters_of_one_rank_with_batch_2b() {
    let two = run("dp2", 2, B, 1, &[]);
    let one = run("dp1-2b", 1, 2 * B, 1, &[]);
    assert_params_close(&two, &one, SGD_PARITY_TOL, "2 ranks x B vs 1 rank x 2B");

    // The tolerance tells runs apart: one rank on batch B alone (other samples) ends elsewhere.
    let other = run("dp1-b", 1, B, 1, &[]);
    let (diff, name) = max_abs_diff(&two, &other);
    assert!(
        diff > 100.0 * SGD_PARITY_TOL,
        "training on half the samples moved {name} by only {diff:e}: the parity check proves nothing"
    );
}

#[test]
fn two_ranks_with_batch_b_compute_exactly_what_one_rank_splitting_2b_into_two_micro_batches_does() {
    // The same additions in the same order: the rank-0 block plus the rank-1 block, halved.
    let two = run("dp2-exact", 2, B, 1, &[]);
    let split = run("dp1-micro2", 1, 2 * B, 1, &["parallel.micro_batches=2"]);
    assert_params_close(
        &two,
        &split,
        SAME_ARITHMETIC_TOL,
        "2 ranks x B vs 1 rank x 2B in 2 micro-batches",
    );
}

#[test]
fn gradient_sync_overlapped_with_backward_ends_where_sync_after_backward_does_also_when_accumulating() {
    for accum in [1, 2] {
        let overlapped = out_dir(&format!("overlap-on-{accum}"));
        train(
            2,
            &config("mlp_synthetic.toml"),
            &overlapped,
            &mlp(B, accum, &["comm.overlap=true"]),
        );
        let after = run(&format!("overlap-off-{accum}"), 2, B, accum, &["comm.overlap=false"]);
        assert_params_close(
            &final_params(&overlapped),
            &after,
            OVERLAP_TOL,
            &format!("overlapped vs after backward, accum {accum}"),
        );
        // The metrics split the sync into its wall time and the part the step waited for.
        let metrics = std::fs::read_to_string(overlapped.join("metrics.jsonl")).unwrap();
        for line in metrics.lines() {
            let m: serde_json::Value = serde_json::from_str(line).unwrap();
            let (comm, exposed) = (m["comm_ms"].as_f64().unwrap(), m["exposed_comm_ms"].as_f64().unwrap());
            assert!(comm > 0.0 && exposed <= comm, "{line}");
        }
        let _ = std::fs::remove_dir_all(&overlapped);
    }
}

#[test]
fn four_ranks_with_batch_b_end_at_the_parameters_of_one_rank_with_batch_4b() {
    let four = run("dp4", 4, B, 1, &[]);
    let one = run("dp1-4b", 1, 4 * B, 1, &[]);
    assert_params_close(&four, &one, SGD_PARITY_TOL, "4 ranks x B vs 1 rank x 4B");
}

#[test]
fn one_rank_accumulating_two_batches_of_b_ends_where_one_batch_of_2b_does() {
    let accum = run("accum2", 1, B, 2, &[]);
    let one = run("accum1-2b", 1, 2 * B, 1, &[]);
    assert_params_close(&accum, &one, SGD_PARITY_TOL, "1 rank x B x accum 2 vs 1 rank x 2B");
}

#[test]
fn two_ranks_accumulating_two_batches_of_b_end_where_one_rank_with_4b_does() {
    let two = run("dp2-accum2", 2, B, 2, &[]);
    let one = run("dp1-accum-4b", 1, 4 * B, 1, &[]);
    assert_params_close(&two, &one, SGD_PARITY_TOL, "2 ranks x B x accum 2 vs 1 rank x 4B");
}

#[test]
fn two_ranks_with_adam_end_near_the_parameters_of_one_rank_with_batch_2b() {
    let adam = ["optim.kind=adam", "optim.lr=1e-3"];
    let two = run("adam-dp2", 2, B, 1, &adam);
    let one = run("adam-dp1-2b", 1, 2 * B, 1, &adam);
    assert_params_close(&two, &one, ADAM_PARITY_TOL, "Adam: 2 ranks x B vs 1 rank x 2B");
}

/// Runs 20 steps uninterrupted (checkpoints every 10), and 10 steps then a resumed run to 20 with
/// `resume` (extra `--set`s or arguments), and compares the final parameters.
fn assert_resume_matches(test: &str, optim: &[&str], resume_by_flag: bool) {
    let whole = out_dir(&format!("{test}-whole"));
    let mut base: Vec<&str> = vec!["checkpoint.every_steps=10", "checkpoint.keep_last=0"];
    base.extend_from_slice(optim);
    train(2, &config("mlp_synthetic.toml"), &whole, &mlp(B, 1, &base));
    let uninterrupted = params_at(&whole, STEPS);

    // The same run stopped after step 10 ...
    let parts = out_dir(&format!("{test}-parts"));
    let mut first_leg = base.clone();
    first_leg.push("train.steps=10");
    train(2, &config("mlp_synthetic.toml"), &parts, &mlp(B, 1, &first_leg));
    let at_10_whole = params_at(&whole, 10);
    let at_10_parts = params_at(&parts, 10);
    assert_params_close(&at_10_parts, &at_10_whole, RESUME_TOL, "step 10 of both runs");

    // ... and resumed to step 20.
    let mut args = common::train_args(2, &config("mlp_synthetic.toml"), &parts, &mlp(B, 1, &base));
    if resume_by_flag {
        args.push("--resume".into());
        args.push(parts.display().to_string());
    } else {
        args.push("--set".into());
        args.push("checkpoint.resume=true".into());
    }
    let finished = common::burnrun(&args);
    finished.assert_success("the resumed run");
    assert!(
        finished.stdout.contains("resumed from") || finished.stderr.contains("resumed from"),
        "the second run did not say it resumed\n{}",
        finished.output()
    );
    let state = burnrun::train::checkpoint::read_state(&burnrun::train::checkpoint::step_dir(
        &parts.join("checkpoints"),
        STEPS,
    ))
    .expect("the resumed run's final checkpoint");
    assert_eq!(state.step, STEPS);
    assert_params_close(
        &params_at(&parts, STEPS),
        &uninterrupted,
        RESUME_TOL,
        "resumed vs uninterrupted",
    );
    cleanup(&[&whole, &parts]);
}

fn cleanup(dirs: &[&Path]) {
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_run_stopped_after_step_10_and_resumed_with_the_flag_ends_where_the_uninterrupted_run_does() {
    // Momentum makes the restored optimizer state matter: without it step 11 would differ.
    assert_resume_matches("resume-sgd", &[], true);
}

#[test]
fn a_run_stopped_after_step_10_and_resumed_by_config_ends_where_the_uninterrupted_run_does() {
    // Adam's moments and step count (bias correction) must all come back.
    assert_resume_matches("resume-adam", &["optim.kind=adam", "optim.lr=1e-3"], false);
}

/// Trains the MLP on `ranks` threads of this process (no launcher) with `options`, into `out`.
fn train_in_process(ranks: usize, out: &Path, accum: usize, options: &burnrun::train::TrainOptions) {
    let mut overrides = mlp(B, accum, &["log.progress=off"]);
    overrides.push(format!("train.out_dir={}", out.display()));
    common::train_in_process(ranks, "mlp_synthetic.toml", &overrides, options, STEPS);
}

#[test]
fn the_device_path_of_the_gradients_ends_where_the_host_path_does_also_when_accumulating() {
    let via_device = burnrun::train::TrainOptions {
        device_path_via_host: true,
        ..Default::default()
    };
    for accum in [1, 2] {
        let device = out_dir(&format!("device-path-{accum}"));
        let host = out_dir(&format!("host-path-{accum}"));
        train_in_process(2, &device, accum, &via_device);
        train_in_process(2, &host, accum, &Default::default());
        assert_params_close(
            &final_params(&device),
            &final_params(&host),
            DEVICE_PATH_TOL,
            &format!("device path vs host path, accum {accum}"),
        );
        // The device path's all-reduce is timed like the host one.
        for m in common::metrics(&device) {
            assert!(m["comm_ms"].as_f64().unwrap() > 0.0, "{m}");
        }
        cleanup(&[&device, &host]);
    }
}
