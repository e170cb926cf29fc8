//! One job per `train.out_dir`, and resuming in it (issue 9): a second job on a folder in use is
//! refused naming the first, a lock left by a dead job is taken over, `checkpoint.resume = true`
//! both starts and restarts a job, a finished run says so, and metrics.jsonl holds each step once.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{burnrun, config, metrics, out_dir, sets, train, train_args, Job};

/// A refusal at start comes well within this (the 2-core machine is shared).
const REFUSE_WITHIN: Duration = Duration::from_secs(30);

fn steps_logged(out: &Path) -> Vec<u64> {
    metrics(out).iter().map(|l| l["step"].as_u64().expect("step")).collect()
}

#[test]
fn a_second_job_on_the_same_out_dir_is_refused_naming_the_first() {
    let out = out_dir("outdir-busy");
    let mut args = vec!["--run-id".to_string(), "first-job".to_string()];
    args.extend(train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["train.steps=1000000", "log.every_steps=1", "log.progress=plain"]),
    ));
    let mut first = Job::start(&args);
    first.wait_for_output("step ", Duration::from_secs(60));

    let second = Job::start(&train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["train.steps=5", "log.progress=plain"]),
    ))
    .wait(REFUSE_WITHIN);
    assert!(!second.status.success(), "the second job ran\n{}", second.output());
    let all = format!("{}\n{}", second.stdout, second.stderr);
    assert!(all.contains("is in use by another job"), "{}", second.output());
    assert!(
        all.contains("run id first-job"),
        "the first job is not named\n{}",
        second.output()
    );
    assert!(all.contains("pid ") && all.contains("on host "), "{}", second.output());
    assert!(!all.contains("trained"), "{}", second.output());
    // The first job still runs, undisturbed.
    first.wait_for_output("step ", Duration::from_secs(5));
    drop(first);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_lock_left_by_a_job_that_died_is_taken_over_with_a_warning() {
    let out = out_dir("outdir-stale");
    // What a killed job leaves: a filled lock file that nobody holds.
    std::fs::write(
        out.join(burnrun::train::lock::LOCK_FILE),
        r#"{"pid":999999,"host":"gone","run_id":"dead-job"}"#,
    )
    .unwrap();
    let finished = train(1, &config("mlp_synthetic.toml"), &out, &sets(&["train.steps=2"]));
    let all = format!("{}\n{}", finished.stdout, finished.stderr);
    assert!(
        all.contains("dead-job") && all.contains("taking it over"),
        "{}",
        finished.output()
    );
    // A job that ends normally leaves the lock file empty.
    assert_eq!(
        std::fs::read_to_string(out.join(burnrun::train::lock::LOCK_FILE)).unwrap(),
        ""
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resume_on_an_empty_out_dir_starts_fresh_but_a_missing_resume_path_is_an_error() {
    let out = out_dir("outdir-fresh");
    let finished = train(
        2,
        &config("mlp_synthetic.toml"),
        &out.join("new"),
        &sets(&["train.steps=3", "checkpoint.resume=true", "log.progress=plain"]),
    );
    let all = format!("{}\n{}", finished.stdout, finished.stderr);
    assert!(all.contains("starting from step 0"), "{}", finished.output());
    // The same command again resumes (and finds the run complete).
    let again = train(
        2,
        &config("mlp_synthetic.toml"),
        &out.join("new"),
        &sets(&["train.steps=5", "checkpoint.resume=true", "log.progress=plain"]),
    );
    assert!(again.stderr.contains("resumed from"), "{}", again.output());

    let missing = out.join("no-such-checkpoint");
    let mut args = train_args(
        1,
        &config("mlp_synthetic.toml"),
        &out.join("other"),
        &sets(&["train.steps=3"]),
    );
    args.push("--resume".to_string());
    args.push(missing.display().to_string());
    let finished = burnrun(&args);
    assert!(!finished.status.success(), "{}", finished.output());
    assert!(
        finished.stderr.contains(&missing.display().to_string()),
        "{}",
        finished.output()
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn resuming_a_finished_run_says_it_is_complete_and_fewer_steps_than_the_checkpoint_is_an_error() {
    let out = out_dir("outdir-finished");
    let cfg = config("mlp_synthetic.toml");
    train(2, &cfg, &out, &sets(&["train.steps=6", "log.progress=plain"]));

    let done = train(
        2,
        &cfg,
        &out,
        &sets(&["train.steps=6", "checkpoint.resume=true", "log.progress=plain"]),
    );
    let all = format!("{}\n{}", done.stdout, done.stderr);
    assert!(all.contains("already complete"), "{}", done.output());
    assert!(!all.contains("NaN"), "{}", done.output());

    let fewer = burnrun(&train_args(
        2,
        &cfg,
        &out,
        &sets(&["train.steps=3", "checkpoint.resume=true", "log.progress=plain"]),
    ));
    assert!(!fewer.status.success(), "{}", fewer.output());
    let all = format!("{}\n{}", fewer.stdout, fewer.stderr);
    assert!(
        all.contains("at step 6, past train.steps = 3") && all.contains("step_00000006"),
        "{}",
        fewer.output()
    );
    assert!(!all.contains("NaN"), "{}", fewer.output());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn metrics_hold_each_step_once_after_resuming_from_a_checkpoint_older_than_the_last_logged_step() {
    let out = out_dir("outdir-metrics");
    let cfg = config("mlp_synthetic.toml");
    let common_sets = [
        "train.steps=20",
        "checkpoint.every_steps=10",
        "log.every_steps=5",
        "log.progress=plain",
    ];
    train(2, &cfg, &out, &sets(&common_sets));
    assert_eq!(steps_logged(&out), [5, 10, 15, 20]);
    // A job that stopped after logging step 15 and 20 but before its checkpoint at 20 was complete.
    std::fs::remove_file(burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), 20).join("state.json"))
        .unwrap();
    let mut resumed = common_sets.to_vec();
    resumed.push("checkpoint.resume=true");
    train(2, &cfg, &out, &sets(&resumed));
    assert_eq!(steps_logged(&out), [5, 10, 15, 20]);
    let _ = std::fs::remove_dir_all(&out);
}
