//! `burnrun train` and `burnrun check` as users run them (issue 3): bad configs are refused
//! before any rank starts, every example config trains, metrics are written, `check` prints the
//! batch arithmetic.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{burnrun, config, metrics, out_dir, repo, sets, train, Finished};

/// A config error is found by the launcher before it starts any rank: well under this, although
/// the 2-core machine is shared.
const FAIL_FAST: Duration = Duration::from_secs(10);

/// What every metrics line holds (issue 3's list, plus the bytes each rank sent).
const METRICS_KEYS: [&str; 7] = [
    "step",
    "loss",
    "lr",
    "samples_per_sec",
    "comm_ms",
    "compute_ms",
    "wire_bytes",
];

/// Writes `text` as a config file in `dir`.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the config");
    path
}

/// Launches `nproc` ranks on a config that must be refused, and checks the refusal came from the
/// launcher, fast, before any rank started; returns the error text.
fn refused(nproc: usize, config: &Path, out: &Path, extra: &[&str]) -> String {
    let finished = burnrun(&common::train_args(nproc, config, &out.join("run"), &sets(extra)));
    assert!(
        !finished.status.success(),
        "a bad config was accepted\n{}",
        finished.output()
    );
    assert!(
        finished.elapsed < FAIL_FAST,
        "refusing took {:?}\n{}",
        finished.elapsed,
        finished.output()
    );
    assert_no_rank_started(&finished, out);
    finished.stderr
}

fn assert_no_rank_started(finished: &Finished, out: &Path) {
    let all = format!("{}\n{}", finished.stdout, finished.stderr);
    // The launcher announces the job (`burnrun: run <id>: N rank(s) ...`) before starting ranks,
    // whose lines are prefixed `[rankN]:`.
    assert!(
        !all.contains("[rank"),
        "a rank printed something\n{}",
        finished.output()
    );
    assert!(
        !all.contains("rank(s) ="),
        "the launcher started the job\n{}",
        finished.output()
    );
    assert!(!all.contains("trained"), "training ran\n{}", finished.output());
    assert!(!out.join("run").join("metrics.jsonl").exists(), "metrics were written");
}

#[test]
fn a_config_with_an_unknown_key_is_refused_before_any_rank_starts_naming_the_key_and_line() {
    let dir = out_dir("cli-unknown");
    let path = write_config(
        &dir,
        "unknown.toml",
        "[model]\nkind = \"mlp\"\n\n[train]\nsteps = 3\nstepz = 4\n",
    );
    let stderr = refused(2, &path, &dir, &[]);
    assert!(
        stderr.contains("unknown.toml:6"),
        "the message does not name line 6:\n{stderr}"
    );
    assert!(
        stderr.contains("stepz") && stderr.contains("[train]"),
        "the message does not name the key:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_value_of_the_wrong_type_is_refused_before_any_rank_starts_naming_the_key_and_line() {
    let dir = out_dir("cli-type");
    let path = write_config(&dir, "type.toml", "[train]\nsteps = 3\nbatch_size = \"big\"\n");
    let stderr = refused(2, &path, &dir, &[]);
    assert!(
        stderr.contains("type.toml:3"),
        "the message does not name line 3:\n{stderr}"
    );
    assert!(
        stderr.contains("train.batch_size"),
        "the message does not name the key:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_override_of_an_unknown_key_or_with_the_wrong_type_is_refused_before_any_rank_starts() {
    let dir = out_dir("cli-set");
    let stderr = refused(2, &config("mlp_synthetic.toml"), &dir, &["train.stepz=3"]);
    assert!(
        stderr.contains("train.stepz"),
        "the message does not name the key:\n{stderr}"
    );
    let stderr = refused(2, &config("mlp_synthetic.toml"), &dir, &["train.steps=many"]);
    assert!(
        stderr.contains("train.steps"),
        "the message does not name the key:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_mesh_of_data_times_pipeline_other_than_the_world_size_is_refused_before_any_rank_starts() {
    let dir = out_dir("cli-mesh");
    // data = 0 (the default) means WORLD_SIZE / pipeline: 3 ranks cannot hold pipelines of 2.
    let path = write_config(&dir, "mesh.toml", "[train]\nsteps = 3\n\n[parallel]\npipeline = 2\n");
    let stderr = refused(3, &path, &dir, &[]);
    assert!(
        stderr.contains("mesh.toml:5"),
        "the message does not name line 5:\n{stderr}"
    );
    assert!(
        stderr.contains("WORLD_SIZE(3)") && stderr.contains("pipeline(2)"),
        "the message does not give every term:\n{stderr}"
    );
    // An explicit data = 2 with pipeline = 2 on 3 ranks: every term in the message.
    let path = write_config(
        &dir,
        "mesh2.toml",
        "[train]\nsteps = 3\n\n[parallel]\ndata = 2\npipeline = 2\n",
    );
    let stderr = refused(3, &path, &dir, &[]);
    assert!(
        stderr.contains("mesh2.toml:5"),
        "the message does not name line 5:\n{stderr}"
    );
    assert!(
        stderr.contains("data(2)") && stderr.contains("pipeline(2)") && stderr.contains("WORLD_SIZE(3)"),
        "the message does not give every term:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `--nproc-per-node N` an example config's header comment runs it with (2 if it names none).
fn ranks_of(config: &Path) -> usize {
    let text = std::fs::read_to_string(config).expect("read the config");
    text.lines()
        .filter(|l| l.starts_with('#'))
        .find_map(|l| {
            l.split("--nproc-per-node")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(2)
}

/// Asserts that `out/metrics.jsonl` has one line per step `1..=steps` with every key, finite.
fn assert_metrics(out: &Path, steps: u64, what: &str) -> Vec<serde_json::Value> {
    let lines = metrics(out);
    assert_eq!(lines.len() as u64, steps, "{what}: metrics.jsonl lines: {lines:?}");
    for (i, line) in lines.iter().enumerate() {
        for key in METRICS_KEYS {
            let value = line.get(key).and_then(|v| v.as_f64());
            assert!(
                value.is_some_and(|v| v.is_finite() && v >= 0.0),
                "{what}: metrics line {i} has no finite {key}: {line}"
            );
        }
        assert_eq!(line["step"].as_u64(), Some(i as u64 + 1), "{what}: {line}");
    }
    lines
}

#[test]
fn every_example_config_trains_a_few_steps_and_writes_metrics_and_a_checkpoint() {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo().join("configs"))
        .expect("configs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    configs.sort();
    assert!(configs.len() >= 4, "expected the example configs, found {configs:?}");
    const STEPS: u64 = 3;
    for path in &configs {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let ranks = ranks_of(path);
        let out = out_dir(&format!("cli-example-{name}"));
        let overrides = sets(&[
            &format!("train.steps={STEPS}"),
            "log.every_steps=1",
            "log.progress=plain",
            // Some configs turn metrics off (the benchmark): every one must be able to write them.
            "log.metrics=true",
        ]);
        let finished = train(ranks, path, &out, &overrides);
        eprintln!("{name}: {ranks} rank(s), {:?}", finished.elapsed);
        let lines = assert_metrics(&out, STEPS, &name);
        if ranks > 1 {
            assert!(
                lines.iter().all(|l| l["wire_bytes"].as_f64() > Some(0.0)),
                "{name}: ranks sent nothing: {lines:?}"
            );
        }
        let last = burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), STEPS);
        let state = burnrun::train::checkpoint::read_state(&last).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(state.step, STEPS, "{name}");
        assert!(!common::final_params(&out).is_empty(), "{name}: empty checkpoint");
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn the_pipeline_example_also_runs_as_two_replicas_of_two_stages() {
    let out = out_dir("cli-pipeline-4");
    train(
        4,
        &config("mlp_pipeline.toml"),
        &out,
        &sets(&["train.steps=3", "log.every_steps=1", "log.progress=plain"]),
    );
    assert_metrics(&out, 3, "mlp_pipeline on 4 ranks");
    let ckpt = burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), 3);
    for stage in 0..2 {
        assert!(
            ckpt.join(format!("model-stage{stage}.safetensors")).is_file(),
            "stage {stage} wrote no parameters"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_quick_start_trains_to_a_visibly_falling_loss_on_two_ranks() {
    let out = out_dir("cli-quick-start");
    let finished = train(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["train.steps=60", "log.every_steps=10", "log.progress=plain"]),
    );
    let lines = metrics(&out);
    let losses: Vec<f64> = lines.iter().map(|l| l["loss"].as_f64().expect("loss")).collect();
    assert_eq!(losses.len(), 6, "{lines:?}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(
        last < 0.8 * first,
        "the loss did not fall: {losses:?}\n{}",
        finished.output()
    );
    // Rank 0 prints the progress as plain lines and a last summary.
    let all = format!("{}{}", finished.stdout, finished.stderr);
    assert!(all.contains("[rank0]: step     60/60"), "{}", finished.output());
    assert!(all.contains("trained 60 steps"), "{}", finished.output());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn check_prints_the_batch_arithmetic_and_the_rank_mesh_without_starting_ranks() {
    let finished = burnrun(&["check".to_string(), config("mlp_synthetic.toml").display().to_string()]);
    finished.assert_success("burnrun check");
    let report = &finished.stdout;
    assert!(
        report.contains("global batch = batch_size(32) x grad_accum_steps(1) x data-parallel ranks(1) = 32"),
        "{report}"
    );
    assert!(
        report.contains("data(1) x tensor(1) x pipeline(1) = WORLD_SIZE(1)"),
        "{report}"
    );
    // Every default is filled in.
    assert!(report.contains("check_replicas_every = 50"), "{report}");

    // With launch options, `check` takes the world size from them (and still starts nothing).
    let finished = burnrun(&[
        "--nproc-per-node",
        "4",
        "check",
        &config("mlp_pipeline.toml").display().to_string(),
        "--set",
        "train.grad_accum_steps=2",
    ]);
    finished.assert_success("burnrun check with 4 ranks");
    let report = &finished.stdout;
    assert!(
        report.contains("global batch = batch_size(32) x grad_accum_steps(2) x data-parallel ranks(2) = 128"),
        "{report}"
    );
    assert!(
        report.contains("micro-batch = batch_size(32) / micro_batches(4) = 8"),
        "{report}"
    );
    assert!(
        report.contains("data(2) x tensor(1) x pipeline(2) = WORLD_SIZE(4)"),
        "{report}"
    );
    assert!(!report.contains("[rank"), "check started ranks:\n{report}");
}

/// Runs `burnrun check CONFIG --set ...` (no launcher: `check` starts no rank).
fn check_with(config: &Path, extra: &[&str]) -> Finished {
    let mut args = vec!["check".to_string(), config.display().to_string()];
    for set in extra {
        args.push("--set".to_string());
        args.push(set.to_string());
    }
    burnrun(&args)
}

#[test]
fn a_gpu_device_is_refused_by_check_and_by_train_naming_it_and_the_devices_this_build_supports() {
    let finished = check_with(&config("mlp_synthetic.toml"), &["train.device=cuda:0"]);
    assert!(!finished.status.success(), "cuda:0 was accepted\n{}", finished.output());
    for needle in [
        "\"cuda:0\"",
        "\"cpu\"",
        "\"flex\"",
        "no CUDA backend (rebuild with `--features cuda`)",
    ] {
        assert!(finished.stderr.contains(needle), "no {needle}:\n{}", finished.output());
    }
    let dir = out_dir("cli-cuda");
    let stderr = refused(1, &config("mlp_synthetic.toml"), &dir, &["train.device=cuda"]);
    assert!(stderr.contains("\"cuda\" is not available"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_model_too_large_for_memory_is_refused_with_the_estimate_by_check_and_by_the_trainer_without_an_abort() {
    let huge = "model.mlp.hidden=[1000000000, 1000000000]";
    let finished = check_with(&config("mlp_synthetic.toml"), &[huge]);
    assert!(!finished.status.success(), "check accepted it\n{}", finished.output());
    for needle in [
        "does not fit in memory",
        "parameters",
        "gradients",
        "master weights",
        "optimizer state",
        "activations",
        "MemAvailable",
    ] {
        assert!(finished.stderr.contains(needle), "no {needle}:\n{}", finished.output());
    }
    // A model that fits: check prints its estimate and succeeds.
    let fine = check_with(&config("mlp_synthetic.toml"), &[]);
    fine.assert_success("check of the default");
    assert!(fine.stdout.contains("memory: about"), "{}", fine.output());

    let dir = out_dir("cli-huge");
    let finished = burnrun(&common::train_args(
        1,
        &config("mlp_synthetic.toml"),
        &dir,
        &sets(&[huge]),
    ));
    assert!(!finished.status.success(), "training started\n{}", finished.output());
    let all = format!("{}\n{}", finished.stdout, finished.stderr);
    assert!(all.contains("does not fit in memory"), "{}", finished.output());
    assert!(
        !all.contains("memory allocation of") && !all.contains("signal"),
        "a rank aborted\n{}",
        finished.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_directory_given_as_the_text_path_is_reported_as_a_directory() {
    let dir = out_dir("cli-text-dir");
    let finished = check_with(
        &config("gpt_text.toml"),
        &[&format!("data.text.path={}", dir.display())],
    );
    assert!(!finished.status.success(), "{}", finished.output());
    assert!(
        finished.stderr.contains("is a directory") && !finished.stderr.contains("no such file"),
        "{}",
        finished.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn data_paths_in_a_config_file_are_relative_to_its_folder_so_it_checks_and_trains_from_any_directory() {
    let elsewhere = out_dir("cli-cwd");
    let run = |args: &[String]| {
        let output = std::process::Command::new(common::BURNRUN)
            .args(args)
            .current_dir(&elsewhere)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("MASTER_PORT")
            .output()
            .expect("burnrun runs");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "{args:?} from {}:\n{text}",
            elsewhere.display()
        );
        text
    };
    let gpt = config("gpt_text.toml").display().to_string();
    run(&["check".to_string(), gpt.clone()]);
    let out = elsewhere.join("run");
    let text = run(&[
        "train".to_string(),
        gpt,
        "--set".to_string(),
        "train.steps=1".to_string(),
        "--set".to_string(),
        format!("train.out_dir={}", out.display()),
        "--set".to_string(),
        "log.progress=plain".to_string(),
    ]);
    assert!(text.contains("trained 1 steps"), "{text}");
    // A path given with --set is relative to the current directory.
    let copy = elsewhere.join("corpus.txt");
    std::fs::copy(repo().join("configs/data/lighthouse.txt"), &copy).expect("copy the corpus");
    run(&[
        "check".to_string(),
        config("gpt_text.toml").display().to_string(),
        "--set".to_string(),
        "data.text.path=corpus.txt".to_string(),
    ]);
    let _ = std::fs::remove_dir_all(&elsewhere);
}
