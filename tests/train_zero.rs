//! Sharded data parallelism (ZeRO-1 `parallel.shard = "optimizer"`, ZeRO-2 `"gradients"`, ZeRO-3
//! `"parameters"`, issue 14), end to end through the real launcher: a sharded run ends where
//! plain data parallelism and the single-process run end, its checkpoints hold the same
//! parameters and optimizer state as a plain run's (joined from every replica's shard files),
//! and a checkpoint saved under one layout resumes under another to the end of the uninterrupted
//! run.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burnrun::train::checkpoint::{self, LoadedTensor};
use common::{assert_params_close, config, final_params, out_dir, params_at, sets, train, Params};

/// ZeRO against plain data parallelism on the same ranks: each element is updated by the same
/// optimizer arithmetic on the same averaged gradient (two replicas: one addition and a halving,
/// whether all-reduced or reduce-scattered; the block-wise backward hands each block exactly the
/// gradient the whole backward does, and ZeRO-3's recomputed forward is the same arithmetic on
/// the same gathered values), and the all-gather copies values. Clipping is off in these
/// runs, so the sharded norm (summed in another order) does not enter.
const ZERO_VS_DDP_TOL: f32 = 0.0;

/// With clipping, ZeRO-2 sums the squared norm of each replica's chunks, then over the replicas:
/// another order of f64 additions than the whole gradient's, which may move the norm's last f64
/// bits (the f32 clip factor then agrees: measured bit-identical parameters, so the parameters
/// are held to `ZERO_VS_DDP_TOL`).
const CLIP_NORM_REL_TOL: f64 = 1e-9;

/// Against one rank running the whole batch: the f32 sums of one batch of N x B differ in order
/// from N averaged batches of B (as in plain data parallelism, tests/train_parity.rs); Adam
/// magnifies the rounding of parameters with tiny gradients but its updates stay below the
/// learning rate (1e-3). Measured: 3e-8 on 2 and 3 ranks.
const SINGLE_PROCESS_TOL: f32 = 1e-5;

/// ZeRO-3 with gradient accumulation reduce-scatters each micro-batch and sums the averages
/// (`avg(g1 s) + avg(g2 s)`), where plain data parallelism averages the sum (`avg((g1 + g2) s)`):
/// one more f32 rounding per element and step, which Adam can magnify for tiny gradients like
/// the single-process comparison's. Measured: 9e-8 after 20 steps (with clipping on).
const ACCUM_ORDER_TOL: f32 = 1e-5;

/// A resumed run replays the same arithmetic from exactly saved f32 state (the shards are
/// copies of the optimizer's values, joined by position), also as a pipeline (each stage runs
/// the same blocks on the same samples).
const RESUME_TOL: f32 = 0.0;

/// Seed, steps and per-rank batch of every run (seed 1: no ReLU tie within 20 steps, see
/// tests/train_parity.rs).
const SEED: u64 = 1;
const STEPS: u64 = 20;
const B: usize = 8;

/// The small MLP of the parity tests, with Adam (whose two state buffers are what ZeRO shards),
/// one compute thread, checkpoints every 10 steps, no clipping.
fn mlp(batch_size: usize, extra: &[&str]) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32]",
        "optim.kind=adam",
        "optim.lr=1e-3",
        "optim.grad_clip_norm=0",
        "train.threads=1",
        "train.check_replicas_every=5",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=0",
        "log.every_steps=5",
        "log.progress=plain",
    ]);
    out.push(format!("train.seed={SEED}"));
    out.push(format!("train.steps={STEPS}"));
    out.push(format!("train.batch_size={batch_size}"));
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

/// Trains into a fresh folder named `test` and returns it.
fn run(test: &str, ranks: usize, batch_size: usize, extra: &[&str]) -> std::path::PathBuf {
    let out = out_dir(test);
    let finished = train(ranks, &config("mlp_synthetic.toml"), &out, &mlp(batch_size, extra));
    let all = format!("{}{}", finished.stdout, finished.stderr);
    if let Some(mode) = extra.iter().find_map(|s| s.strip_prefix("parallel.shard=")) {
        if mode != "none" && ranks > 1 {
            assert!(all.contains(&format!("parallel.shard = \"{mode}\"")), "{all}");
        }
    }
    out
}

/// The optimizer state of the checkpoint at `step` under `out`, whole tensors by name (shard
/// files joined).
fn optim_at(out: &Path, step: u64) -> HashMap<String, LoadedTensor> {
    let dir = checkpoint::step_dir(&out.join("checkpoints"), step);
    checkpoint::load(&dir).unwrap_or_else(|e| panic!("{e}")).optim
}

fn cleanup(dirs: &[&Path]) {
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `mode` on 2 ranks (into folders named after `test`) against plain data parallelism on 2 ranks and one rank with 2B: final
/// parameters and the saved optimizer state.
fn assert_two_ranks_match(test: &str, mode: &str, extra: &[&str]) {
    let shard = format!("parallel.shard={mode}");
    let mut args = vec![shard.as_str()];
    args.extend_from_slice(extra);
    let sharded = run(test, 2, B, &args);
    let ddp = run(&format!("{test}-ddp"), 2, B, extra);
    let one = run(&format!("{test}-one"), 1, 2 * B, extra);

    // Each replica wrote its shard of the optimizer state (with ZeRO-3 of the parameters too),
    // and no whole file of what is sharded.
    let dir = checkpoint::step_dir(&sharded.join("checkpoints"), STEPS);
    let mut sharded_files = vec!["optim"];
    if mode == "parameters" {
        sharded_files.push("model");
    }
    for kind in sharded_files {
        for file in [
            format!("{kind}-stage0-shard0.safetensors"),
            format!("{kind}-stage0-shard1.safetensors"),
        ] {
            assert!(dir.join(&file).is_file(), "{} lacks {file}", dir.display());
        }
        assert!(
            !dir.join(format!("{kind}-stage0.safetensors")).exists(),
            "a whole {kind} file"
        );
    }

    let (z, d, o): (Params, Params, Params) = (final_params(&sharded), final_params(&ddp), final_params(&one));
    assert_params_close(&z, &d, ZERO_VS_DDP_TOL, &format!("{mode} vs plain data parallel"));
    assert_params_close(&z, &o, SINGLE_PROCESS_TOL, &format!("{mode} on 2 ranks vs 1 rank x 2B"));
    assert_params_close(
        &optim_at(&sharded, STEPS),
        &optim_at(&ddp, STEPS),
        ZERO_VS_DDP_TOL,
        &format!("{mode}: optimizer state joined from the shards vs plain data parallel's"),
    );
    cleanup(&[&sharded, &ddp, &one]);
}

#[test]
fn zero_1_on_two_ranks_ends_where_plain_data_parallel_and_one_process_end() {
    assert_two_ranks_match("zero1-dp2", "optimizer", &[]);
}

#[test]
fn zero_2_on_two_ranks_ends_where_plain_data_parallel_and_one_process_end() {
    // The block-wise backward (on by default with ZeRO-2): each block reduce-scattered as it ends.
    assert_two_ranks_match("zero2-dp2", "gradients", &[]);
}

#[test]
fn zero_3_on_two_ranks_ends_where_plain_data_parallel_and_one_process_end() {
    // Parameters gathered block by block, the forward recomputed in backward.
    assert_two_ranks_match("zero3-dp2", "parameters", &[]);
}

#[test]
fn zero_3_with_accumulation_and_clipping_ends_where_plain_data_parallel_does() {
    // Two micro-batches per step, each reduce-scattered and summed into the shard; the clip
    // norm summed over the replicas' chunks.
    let extra = ["train.grad_accum_steps=2", "optim.grad_clip_norm=0.05"];
    let sharded = run("zero3-accum", 2, B, &["parallel.shard=parameters", extra[0], extra[1]]);
    let ddp = run("zero3-accum-ddp", 2, B, &extra);
    assert_params_close(
        &final_params(&sharded),
        &final_params(&ddp),
        ACCUM_ORDER_TOL,
        "ZeRO-3 accumulating and clipping vs plain data parallel",
    );
    cleanup(&[&sharded, &ddp]);
}

#[test]
fn zero_2_after_a_whole_backward_with_accumulation_ends_where_plain_data_parallel_does() {
    // The flat path: the whole gradient summed over 2 micro-steps, then reduce-scattered.
    assert_two_ranks_match(
        "zero2-dp2-flat-accum",
        "gradients",
        &["comm.overlap=false", "train.grad_accum_steps=2"],
    );
}

#[test]
fn zero_1_with_a_codec_ends_where_plain_data_parallel_with_the_codec_does() {
    let codec = ["compression.method=fp16"];
    let sharded = run("zero-codec", 2, B, &["parallel.shard=optimizer", codec[0]]);
    let ddp = run("zero-codec-ddp", 2, B, &codec);
    assert_params_close(
        &final_params(&sharded),
        &final_params(&ddp),
        ZERO_VS_DDP_TOL,
        "ZeRO-1 + fp16 vs plain data parallel + fp16",
    );
    cleanup(&[&sharded, &ddp]);
}

#[test]
fn zero_on_three_ranks_with_uneven_shards_ends_where_one_process_does() {
    // 3 does not divide the blocks' sizes: the last chunks are shorter (padded on the wire).
    for mode in ["optimizer", "gradients", "parameters"] {
        let shard = format!("parallel.shard={mode}");
        let sharded = run(&format!("zero-3r-{mode}"), 3, B, &[&shard]);
        let one = run(&format!("zero-3r-{mode}-one"), 1, 3 * B, &[]);
        assert_params_close(
            &final_params(&sharded),
            &final_params(&one),
            SINGLE_PROCESS_TOL,
            &format!("{mode} on 3 ranks vs 1 rank x 3B"),
        );
        cleanup(&[&sharded, &one]);
    }
}

#[test]
fn zero_inside_each_stage_of_a_pipeline_ends_where_the_plain_pipeline_does() {
    // data 2 x pipeline 2: each stage's two replicas share that stage's state.
    let mesh = ["parallel.pipeline=2", "parallel.micro_batches=2"];
    let sharded = run("zero-pp", 4, B, &[mesh[0], mesh[1], "parallel.shard=gradients"]);
    let plain = run("zero-pp-plain", 4, B, &mesh);
    let dir = checkpoint::step_dir(&sharded.join("checkpoints"), STEPS);
    for file in [
        "optim-stage0-shard0",
        "optim-stage0-shard1",
        "optim-stage1-shard0",
        "optim-stage1-shard1",
    ] {
        assert!(dir.join(format!("{file}.safetensors")).is_file(), "{file}");
    }
    assert_params_close(
        &final_params(&sharded),
        &final_params(&plain),
        ZERO_VS_DDP_TOL,
        "ZeRO-2 per stage vs the plain pipeline",
    );
    cleanup(&[&sharded, &plain]);
}

/// 20 steps uninterrupted with `whole`, against 10 steps with `first` and 10 more resumed with
/// `second` (each a list of `--set`s on top of the MLP's; `ranks` each).
fn assert_resume_across(
    test: &str,
    (ranks_first, first): (usize, &[&str]),
    (ranks_second, second): (usize, &[&str]),
    tol: f32,
) {
    let whole = run(&format!("{test}-whole"), 2, B, &[]);
    let parts = out_dir(&format!("{test}-parts"));
    let mut leg = first.to_vec();
    leg.push("train.steps=10");
    train(ranks_first, &config("mlp_synthetic.toml"), &parts, &mlp(B, &leg));
    let mut leg = second.to_vec();
    leg.push("checkpoint.resume=true");
    let finished = train(ranks_second, &config("mlp_synthetic.toml"), &parts, &mlp(B, &leg));
    let all = format!("{}{}", finished.stdout, finished.stderr);
    assert!(all.contains("resumed from"), "{all}");
    assert_params_close(
        &params_at(&parts, STEPS),
        &params_at(&whole, STEPS),
        tol,
        &format!("{test}: resumed under another layout vs uninterrupted"),
    );
    assert_params_close(
        &optim_at(&parts, STEPS),
        &optim_at(&whole, STEPS),
        tol,
        &format!("{test}: optimizer state"),
    );
    cleanup(&[&whole, &parts]);
}

#[test]
fn a_zero_2_checkpoint_resumes_without_sharding_to_the_end_of_the_uninterrupted_run() {
    assert_resume_across(
        "zero-resume-2-to-none",
        (2, &["parallel.shard=gradients"]),
        (2, &["parallel.shard=none"]),
        RESUME_TOL,
    );
}

#[test]
fn a_plain_checkpoint_resumes_under_zero_1_to_the_end_of_the_uninterrupted_run() {
    assert_resume_across(
        "zero-resume-none-to-1",
        (2, &[]),
        (2, &["parallel.shard=optimizer"]),
        RESUME_TOL,
    );
}

#[test]
fn a_zero_1_checkpoint_resumes_as_a_zero_2_pipeline_to_the_end_of_the_uninterrupted_run() {
    // 2 ranks sharding the whole model -> 4 ranks: 2 stages, each sharded over 2 replicas.
    assert_resume_across(
        "zero-resume-1-to-pp",
        (2, &["parallel.shard=optimizer"]),
        (4, &["parallel.shard=gradients", "parallel.pipeline=2"]),
        RESUME_TOL,
    );
}

#[test]
fn a_zero_3_checkpoint_resumes_without_sharding_to_the_end_of_the_uninterrupted_run() {
    // The parameters joined from both replicas' slices.
    assert_resume_across(
        "zero-resume-3-to-none",
        (2, &["parallel.shard=parameters"]),
        (2, &["parallel.shard=none"]),
        RESUME_TOL,
    );
}

#[test]
fn a_zero_2_pipeline_checkpoint_resumes_under_zero_3_to_the_end_of_the_uninterrupted_run() {
    // 4 ranks (2 stages, each sharded over 2 replicas) -> 2 ranks, each with half of everything.
    assert_resume_across(
        "zero-resume-pp-to-3",
        (4, &["parallel.shard=gradients", "parallel.pipeline=2"]),
        (2, &["parallel.shard=parameters"]),
        RESUME_TOL,
    );
}

#[test]
fn sharding_that_cannot_run_is_refused_before_any_rank_starts_naming_the_keys() {
    for (shard, set, expect) in [
        ("gradients", "compression.method=topk", "compression.method = \"topk\""),
        ("parameters", "compression.method=fp16", "compression.method = \"fp16\""),
        ("parameters", "parallel.pipeline=2", "parallel.pipeline = 2"),
        ("parameters", "precision.compute=f16", "precision.compute = \"f16\""),
    ] {
        let out = out_dir("zero-refused");
        let mut sets = mlp(B, &[&format!("parallel.shard={shard}")]);
        sets.push(set.to_string());
        let finished = common::burnrun(&common::train_args(2, &config("mlp_synthetic.toml"), &out, &sets));
        assert!(!finished.status.success(), "{}", finished.output());
        let all = format!("{}{}", finished.stdout, finished.stderr);
        assert!(all.contains(expect) && all.contains("parallel.shard"), "{all}");
        assert!(!all.contains("[rank0]"), "a rank started:\n{all}");
        cleanup(&[&out]);
    }
}

#[test]
fn zero_2_clips_by_the_norm_of_the_whole_gradient_summed_over_the_replicas_chunks() {
    // A bound every step exceeds: a missing sum over the replicas would clip by a smaller norm.
    let clip = ["optim.grad_clip_norm=0.05"];
    let sharded = run("zero2-clip", 2, B, &["parallel.shard=gradients", clip[0]]);
    let ddp = run("zero2-clip-ddp", 2, B, &clip);
    let norms = |out: &Path| -> Vec<f64> {
        common::metrics(out)
            .iter()
            .map(|m| m["grad_norm"].as_f64().expect("grad_norm in the metrics"))
            .collect()
    };
    let (zn, dn) = (norms(&sharded), norms(&ddp));
    assert!(dn.iter().all(|&n| n > 0.05), "the bound does not clip: {dn:?}");
    for (z, d) in zn.iter().zip(&dn) {
        assert!((z - d).abs() <= CLIP_NORM_REL_TOL * d, "norms {zn:?} vs {dn:?}");
    }
    assert_params_close(
        &final_params(&sharded),
        &final_params(&ddp),
        ZERO_VS_DDP_TOL,
        "ZeRO-2 clipped vs plain data parallel clipped",
    );
    cleanup(&[&sharded, &ddp]);
}
