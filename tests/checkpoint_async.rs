//! Asynchronous checkpoints (`checkpoint.async = true`, issue 12): the checkpoints written in the
//! background hold exactly what a synchronous run writes and resume to the same end; the final
//! checkpoint is complete when `train` returns, on every rank, with the job's store and without
//! one; a write that fails fails the run at a later step naming the file, never hangs, and never
//! leaves a folder marked complete with files missing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burnrun::train::checkpoint::{self, LoadedTensor};
use common::{burnrun, config, metrics, out_dir, sets, train, train_args, Job};

/// The background writer copies the very values the synchronous save writes, and a resumed run
/// replays the same arithmetic from them: the runs agree bit for bit.
const ASYNC_TOL: f32 = 0.0;

/// Steps of the comparison runs, and their checkpoint interval.
const STEPS: u64 = 20;
const EVERY: u64 = 5;

/// A small MLP with 2 ranks and top-k compression, so every kind of checkpoint file is written:
/// the model and optimizer (replica 0) and each rank's codec state (error-feedback residuals).
fn small_run(extra: &[&str]) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32]",
        "train.batch_size=8",
        "train.seed=1",
        "train.threads=1",
        "compression.method=topk",
        "compression.topk_ratio=0.1",
        "checkpoint.keep_last=0",
        "log.progress=plain",
    ]);
    out.push(format!("train.steps={STEPS}"));
    out.push(format!("checkpoint.every_steps={EVERY}"));
    out.push(format!("log.every_steps={EVERY}"));
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

/// Every tensor of every safetensors file of the checkpoint folder `dir`, by file and name.
fn all_tensors(dir: &Path) -> BTreeMap<String, BTreeMap<String, LoadedTensor>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let tensors = checkpoint::read_tensors(&path).unwrap_or_else(|e| panic!("{e}"));
            out.insert(name, tensors.into_iter().collect());
        }
    }
    out
}

/// Asserts that two checkpoint folders hold the same files with the same tensors, within `tol`.
fn assert_same_checkpoint(a: &Path, b: &Path, tol: f32) {
    let (ta, tb) = (all_tensors(a), all_tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    for (file, tensors) in &ta {
        let params: common::Params = tensors.clone().into_iter().collect();
        let other: common::Params = tb[file].clone().into_iter().collect();
        common::assert_params_close(&params, &other, tol, &format!("{file} of {}", a.display()));
    }
}

/// Every complete checkpoint under `root` loads and verifies (no `state.json` beside a missing
/// or changed file).
fn assert_every_complete_checkpoint_loads(root: &Path) {
    for (_, dir) in checkpoint::complete_checkpoints(root) {
        checkpoint::load(&dir).unwrap_or_else(|e| panic!("a folder marked complete does not load: {e}"));
    }
}

#[test]
fn an_async_run_writes_what_a_sync_run_does_bit_for_bit_and_resumes_from_it_to_the_same_end() {
    let cfg = config("mlp_synthetic.toml");
    let sync = out_dir("async-parity-sync");
    let background = out_dir("async-parity-async");
    train(2, &cfg, &sync, &small_run(&["checkpoint.async=false"]));
    train(2, &cfg, &background, &small_run(&["checkpoint.async=true"]));
    let (sync_root, async_root) = (sync.join("checkpoints"), background.join("checkpoints"));
    for step in (EVERY..=STEPS).step_by(EVERY as usize) {
        let dir = checkpoint::step_dir(&async_root, step);
        // Complete, and every file matches the checksum state.json recorded for it.
        let loaded = checkpoint::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded.state.step, step);
        assert!(
            loaded.state.checksums.contains_key("codec-rank1.safetensors"),
            "{:?}",
            loaded.state.checksums
        );
        assert_same_checkpoint(&dir, &checkpoint::step_dir(&sync_root, step), ASYNC_TOL);
    }
    // Every checkpoint's stall is in the metrics line of its step.
    for line in metrics(&background) {
        assert!(
            line["checkpoint_stall_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );
    }

    // A job stopped after step 10 resumes from the asynchronous checkpoint to where the
    // synchronous run ended.
    for step in [15, 20] {
        std::fs::remove_dir_all(checkpoint::step_dir(&async_root, step)).unwrap();
    }
    let resumed = train(
        2,
        &cfg,
        &background,
        &small_run(&["checkpoint.async=true", "checkpoint.resume=true"]),
    );
    assert!(
        format!("{}{}", resumed.stdout, resumed.stderr).contains("resumed from"),
        "{}",
        resumed.output()
    );
    assert_same_checkpoint(
        &checkpoint::step_dir(&async_root, STEPS),
        &checkpoint::step_dir(&sync_root, STEPS),
        ASYNC_TOL,
    );
    let _ = std::fs::remove_dir_all(&sync);
    let _ = std::fs::remove_dir_all(&background);
}

/// Trains on 2 ranks in this process, each on the world group of `spawn_ranks` (which has a
/// store) or, with `without_store`, on a copy of it made by `split` (which has none). Each rank
/// checks, as soon as `train_on` returns, that the final checkpoint is complete and loads.
fn train_in_process(out: &Path, without_store: bool) -> Vec<Vec<f64>> {
    let mut overrides = small_run(&[
        "checkpoint.async=true",
        "checkpoint.every_steps=3",
        "log.progress=off",
        "compression.method=none",
    ]);
    overrides.push(format!("train.out_dir={}", out.display()));
    let init = burnrun::comm::InitOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let results = burnrun::comm::spawn_ranks(2, &init, |pg| {
        let world = if without_store {
            let copy = pg.split(&[0, 0]).expect("split");
            assert!(copy.store().is_none());
            copy
        } else {
            assert!(pg.store().is_some());
            pg
        };
        let cfg = burnrun::config::RunConfig::load(config("mlp_synthetic.toml"), &overrides).expect("config");
        let summary = burnrun::train::train_on(world, cfg, &Default::default())?;
        let dir = summary.checkpoint.clone().expect("a final checkpoint");
        let loaded = checkpoint::load(&dir).expect("the final checkpoint is complete when train returns");
        assert_eq!(loaded.state.step, STEPS);
        Ok::<_, burnrun::train::TrainError>(summary.checkpoint_stall_ms)
    })
    .expect("ranks join");
    results
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
        .collect()
}

#[test]
fn the_final_async_checkpoint_is_complete_when_train_returns_on_every_rank_with_a_store_and_without() {
    for without_store in [false, true] {
        let out = out_dir(&format!("async-final-{without_store}"));
        let stalls = train_in_process(&out, without_store);
        let root = out.join("checkpoints");
        // Steps 3, 6, ..., 18 and the final 20: all complete (without a store, each one was
        // agreed on at the next).
        let steps: Vec<u64> = checkpoint::complete_checkpoints(&root)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [3, 6, 9, 12, 15, 18, 20], "without a store: {without_store}");
        assert_every_complete_checkpoint_loads(&root);
        for rank_stalls in &stalls {
            assert_eq!(rank_stalls.len(), steps.len(), "{stalls:?}");
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// The run's whole output.
fn all_output(finished: &common::Finished) -> String {
    format!("{}\n{}", finished.stdout, finished.stderr)
}

/// Runs 2 ranks checkpointing every 2 steps (in the background or not) where rank 1's codec file
/// of step 4 cannot be renamed into place (a folder holds its name), and checks the failure: the
/// run fails naming that file, step 4 is never marked complete, step 2 is, and no rank saw the
/// folder vanish under it (only rank 0 removes it, once every rank stopped writing).
fn rank_one_cannot_write_step_4(name: &str, asynchronous: bool) {
    let out = out_dir(name);
    let root = out.join("checkpoints");
    let blocked: PathBuf = checkpoint::step_dir(&root, 4).join("codec-rank1.safetensors");
    std::fs::create_dir_all(&blocked).unwrap();
    let mode = format!("checkpoint.async={asynchronous}");
    let finished = burnrun(&train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &small_run(&[&mode, "checkpoint.every_steps=2", "train.steps=400"]),
    ));
    assert!(!finished.status.success(), "{}", finished.output());
    let all = all_output(&finished);
    assert!(
        all.contains(&blocked.display().to_string()),
        "the error does not name the file\n{}",
        finished.output()
    );
    assert!(
        !all.contains("No such file or directory"),
        "a rank found the checkpoint folder gone while writing\n{}",
        finished.output()
    );
    if asynchronous {
        assert!(
            all.contains("asynchronous checkpoint of step 4") && all.contains("noticed after step"),
            "{}",
            finished.output()
        );
    }
    assert!(!all.contains("trained 400 steps"), "{}", finished.output());
    assert!(
        !checkpoint::step_dir(&root, 4).join("state.json").exists(),
        "step 4 was marked complete"
    );
    // Step 2 was complete before; nothing marked complete lacks a file.
    assert!(checkpoint::step_dir(&root, 2).join("state.json").is_file());
    assert_every_complete_checkpoint_loads(&root);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_rank_that_cannot_write_its_part_fails_the_run_naming_the_file_and_the_checkpoint_is_never_complete() {
    rank_one_cannot_write_step_4("async-peer-fails", true);
}

#[test]
fn a_rank_that_cannot_write_its_part_of_a_synchronous_checkpoint_fails_the_run_naming_the_file() {
    rank_one_cannot_write_step_4("sync-peer-fails", false);
}

#[test]
fn a_checkpoints_folder_replaced_by_a_file_mid_run_fails_an_async_run_at_a_later_step_naming_it() {
    let out = out_dir("async-folder-gone");
    let root = out.join("checkpoints");
    let mut job = Job::start(&train_args(
        1,
        &config("mlp_synthetic.toml"),
        &out,
        &small_run(&[
            "checkpoint.async=true",
            "checkpoint.every_steps=3",
            "compression.method=none",
            "train.steps=100000000",
            "log.every_steps=1",
        ]),
    ));
    job.wait_for_output("step ", Duration::from_secs(60));
    // Once a checkpoint is complete, the folder goes away and a file takes its name.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while checkpoint::complete_checkpoints(&root).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let moved = out.join("checkpoints.moved");
    std::fs::rename(&root, &moved).unwrap();
    std::fs::write(&root, b"not a folder").unwrap();

    let finished = job.wait(common::JOB_DEADLINE);
    assert!(!finished.status.success(), "{}", finished.output());
    let all = all_output(&finished);
    assert!(
        all.contains(&format!("{}/step_", root.display())) && all.contains("noticed after step"),
        "the error does not name the checkpoint folder\n{}",
        finished.output()
    );
    assert!(all.contains("rank 0"), "{}", finished.output());
    assert_every_complete_checkpoint_loads(&moved);
    let _ = std::fs::remove_dir_all(&out);
}
