//! Tensor parallelism (`parallel.tensor`, issue 14) on the built-in GPT, end to end through the
//! real launcher: a layer split over 2 ranks (Megatron's column/row split, attention heads
//! divided) ends where one process ends, alone, as 2 data-parallel replicas of 2 tensor-parallel
//! ranks and inside 2 pipeline stages; its checkpoints (every rank's slices, joined on load into
//! the full tensors) resume under another layout
//! and other layouts resume under it; a mesh or a model that cannot be split is refused before
//! any rank starts, naming the keys.

mod common;

use std::path::{Path, PathBuf};

use burnrun::train::checkpoint;
use common::{assert_params_close, config, final_params, out_dir, params_at, sets, train};

/// Split against whole: each rank's attention output projection and MLP projection are partial
/// matrix products over 1/T of the inner dimension, summed over the group, where one process
/// sums the whole inner dimension in one product; the residual and replicated biases are
/// divided by T and added back. Different f32 rounding, which AdamW at lr 3e-3 turns into steps
/// up to about the learning rate on parameters whose gradients are tiny. Measured: 1.6e-5 after 6
/// steps on 2 ranks, 2.2e-5 with 2 replicas of 2, 1.6e-5 as 2 x 2 pipeline stages.
const SPLIT_VS_WHOLE_TOL: f32 = 1e-4;

/// Resuming a split run from its own checkpoint replays the same arithmetic: the slices are
/// joined into full tensors and cut back into them exactly.
const RESUME_TOL: f32 = 0.0;

/// Seed, steps and per-replica batch of every run.
const SEED: u64 = 1;
const STEPS: u64 = 6;
const B: usize = 4;

/// The GPT of `configs/gpt_text.toml` (2 layers of 4 heads, n_embd 64), one compute thread,
/// a checkpoint every 3 steps, every `--set` of `extra` on top.
fn gpt(batch_size: usize, extra: &[&str]) -> Vec<String> {
    let mut out = sets(&[
        "train.threads=1",
        "optim.warmup_steps=0",
        // A schedule that does not depend on train.steps: a resumed run's first leg is shorter.
        "optim.schedule=constant",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=0",
        "log.every_steps=1",
        "log.progress=plain",
    ]);
    out.push(format!("train.seed={SEED}"));
    out.push(format!("train.steps={STEPS}"));
    out.push(format!("train.batch_size={batch_size}"));
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

/// Trains into a fresh folder named `test` and returns it.
fn run(test: &str, ranks: usize, batch_size: usize, extra: &[&str]) -> PathBuf {
    let out = out_dir(test);
    let finished = train(ranks, &config("gpt_text.toml"), &out, &gpt(batch_size, extra));
    let all = format!("{}{}", finished.stdout, finished.stderr);
    if let Some(t) = extra.iter().find_map(|s| s.strip_prefix("parallel.tensor=")) {
        assert!(all.contains(&format!("x tensor {t} x")), "{all}");
    }
    out
}

fn cleanup(dirs: &[&Path]) {
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_gpt_split_over_two_ranks_ends_where_one_process_ends_and_saves_full_tensors() {
    let split = run("tp2", 2, B, &["parallel.tensor=2"]);
    let whole = run("tp2-one", 1, B, &[]);
    // Each rank writes its slices (rank 0 also the replicated parameters); a load joins them
    // into the whole model's tensors, names and shapes.
    let dir = checkpoint::step_dir(&split.join("checkpoints"), STEPS);
    for file in [
        "model-stage0-tp0",
        "model-stage0-tp1",
        "optim-stage0-tp0",
        "optim-stage0-tp1",
    ] {
        assert!(dir.join(format!("{file}.safetensors")).is_file(), "{file}");
    }
    assert!(!dir.join("model-stage0.safetensors").exists());
    let (s, w) = (final_params(&split), final_params(&whole));
    for (name, t) in &w {
        assert_eq!(s[name].shape, t.shape, "{name}");
    }
    assert_params_close(&s, &w, SPLIT_VS_WHOLE_TOL, "tensor 2 vs one process");
    let loss = |out: &Path| -> Vec<f64> {
        common::metrics(out)
            .iter()
            .map(|m| m["loss"].as_f64().expect("loss in the metrics"))
            .collect()
    };
    let (ls, lw) = (loss(&split), loss(&whole));
    assert_eq!(ls.len(), lw.len());
    for (a, b) in ls.iter().zip(&lw) {
        assert!((a - b).abs() < 1e-4, "losses {ls:?} vs {lw:?}");
    }
    cleanup(&[&split, &whole]);
}

#[test]
fn two_replicas_of_a_gpt_split_over_two_ranks_end_where_one_process_with_their_batch_ends() {
    // data 2 x tensor 2: ranks 0-1 and 2-3 are the tensor groups, {0, 2} and {1, 3} the
    // data-parallel groups of each slice.
    let split = run("dp2-tp2", 4, B, &["parallel.tensor=2"]);
    let whole = run("dp2-tp2-one", 1, 2 * B, &[]);
    assert_params_close(
        &final_params(&split),
        &final_params(&whole),
        SPLIT_VS_WHOLE_TOL,
        "data 2 x tensor 2 vs one process with both replicas' batch",
    );
    cleanup(&[&split, &whole]);
}

#[test]
fn a_gpt_split_two_ways_in_each_of_two_pipeline_stages_ends_where_one_process_ends() {
    // tensor 2 x pipeline 2: stage 0 (embedding, layer 0) on ranks 0-1, stage 1 (layer 1, head)
    // on ranks 2-3; stage 0 ends on a split segment, whose sum goes to stage 1.
    let mesh = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.micro_batches=2"];
    let split = run("tp2-pp2", 4, B, &mesh);
    let whole = run("tp2-pp2-one", 1, B, &[]);
    let dir = checkpoint::step_dir(&split.join("checkpoints"), STEPS);
    for file in [
        "model-stage0-tp0",
        "model-stage0-tp1",
        "model-stage1-tp0",
        "model-stage1-tp1",
    ] {
        assert!(dir.join(format!("{file}.safetensors")).is_file(), "{file}");
    }
    assert_params_close(
        &final_params(&split),
        &final_params(&whole),
        SPLIT_VS_WHOLE_TOL,
        "tensor 2 x pipeline 2 vs one process",
    );
    cleanup(&[&split, &whole]);
}

#[test]
fn checkpoints_cross_between_split_and_whole_layouts() {
    // Split -> split: bit for bit with the uninterrupted split run.
    let uninterrupted = run("tp-resume-whole", 2, B, &["parallel.tensor=2"]);
    let parts = out_dir("tp-resume-parts");
    let cfg = config("gpt_text.toml");
    train(2, &cfg, &parts, &gpt(B, &["parallel.tensor=2", "train.steps=3"]));
    train(
        2,
        &cfg,
        &parts,
        &gpt(B, &["parallel.tensor=2", "checkpoint.resume=true"]),
    );
    assert_params_close(
        &params_at(&parts, STEPS),
        &params_at(&uninterrupted, STEPS),
        RESUME_TOL,
        "tensor 2 resumed from its own checkpoint vs uninterrupted",
    );

    // Split -> one process, and one process -> split: within the split's tolerance of one
    // process uninterrupted.
    let one = run("tp-resume-one", 1, B, &[]);
    let to_one = out_dir("tp-resume-to-one");
    train(2, &cfg, &to_one, &gpt(B, &["parallel.tensor=2", "train.steps=3"]));
    let finished = train(1, &cfg, &to_one, &gpt(B, &["checkpoint.resume=true"]));
    assert!(finished.stderr.contains("resumed from"), "{}", finished.output());
    assert_params_close(
        &params_at(&to_one, STEPS),
        &params_at(&one, STEPS),
        SPLIT_VS_WHOLE_TOL,
        "tensor 2 for 3 steps, then one process",
    );
    let from_one = out_dir("tp-resume-from-one");
    train(1, &cfg, &from_one, &gpt(B, &["train.steps=3"]));
    train(
        2,
        &cfg,
        &from_one,
        &gpt(B, &["parallel.tensor=2", "checkpoint.resume=true"]),
    );
    assert_params_close(
        &params_at(&from_one, STEPS),
        &params_at(&one, STEPS),
        SPLIT_VS_WHOLE_TOL,
        "one process for 3 steps, then tensor 2",
    );
    cleanup(&[&uninterrupted, &parts, &one, &to_one, &from_one]);
}

#[test]
fn a_mesh_or_model_that_cannot_be_split_is_refused_before_any_rank_starts_naming_the_keys() {
    for (ranks, extra, expect) in [
        // 3 does not divide the GPT's 4 heads (nor its 64-wide layers).
        (3, vec!["parallel.tensor=3"], "does not divide model.gpt.n_head(4)"),
        // data 2 x tensor 2 x pipeline 1 != 3 ranks.
        (
            3,
            vec!["parallel.tensor=2", "parallel.data=2"],
            "data(2) * tensor(2) * pipeline(1) = 4 != WORLD_SIZE(3)",
        ),
        (2, vec!["parallel.tensor=2", "model.kind=mlp"], "model \"mlp\" has none"),
        (
            2,
            vec!["parallel.tensor=2", "parallel.shard=optimizer"],
            "parallel.shard",
        ),
    ] {
        let out = out_dir("tp-refused");
        let finished = common::burnrun(&common::train_args(
            ranks,
            &config("gpt_text.toml"),
            &out,
            &gpt(B, &extra),
        ));
        assert!(!finished.status.success(), "{}", finished.output());
        let all = format!("{}{}", finished.stdout, finished.stderr);
        assert!(
            // Each message names its key (the mesh's: the first of its keys set, parallel.data).
            all.contains(expect) && all.contains("--set parallel."),
            "{expect}: {all}"
        );
        assert!(!all.contains("[rank0]"), "a rank started:\n{all}");
        cleanup(&[&out]);
    }
}

#[test]
fn check_shows_the_tensor_parallel_groups_next_to_each_other() {
    let finished = common::burnrun(&[
        "--nproc-per-node",
        "4",
        "check",
        &config("gpt_text.toml").display().to_string(),
        "--set",
        "parallel.tensor=2",
    ]);
    finished.assert_success("burnrun check");
    let out = &finished.stdout;
    assert!(
        out.contains("data(2) x tensor(2) x pipeline(1) = WORLD_SIZE(4)"),
        "{out}"
    );
    // Rank 1: replica 0, tensor rank 1; data-parallel with rank 3, tensor-parallel with rank 0.
    assert!(
        out.contains("   1  (0, 1, 0)              [1, 3]               [0, 1]                 [1]"),
        "{out}"
    );
}
