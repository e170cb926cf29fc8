//! Elastic restarts of the trainer (`--max-restarts`, issue 12): a job whose rank dies or hangs
//! mid-training is torn down, started again by the launcher, resumes from its latest complete
//! checkpoint by itself, and ends at the parameters of a run that was never interrupted. The
//! failures are injected at a chosen step with `BURNRUN_FAULT` (see `burnrun::fault`).

mod common;

use std::time::Duration;

use common::{assert_params_close, config, final_params, out_dir, sets, train, train_args, Job};

/// A restarted job replays the steps after its last checkpoint from the state saved there
/// (parameters, optimizer moments, data position, RNG), with the same arithmetic as the first
/// time: the run is deterministic, so it ends bit for bit where an uninterrupted one does.
const RESTART_TOL: f32 = 0.0;

/// Long enough for two attempts and a teardown on a loaded machine.
const RESTART_DEADLINE: Duration = Duration::from_secs(120);

fn mlp(extra: &[&str]) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32]",
        "train.steps=20",
        "train.batch_size=16",
        "train.threads=1",
        "checkpoint.every_steps=5",
        "log.progress=plain",
        "log.every_steps=5",
    ]);
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

fn restarted_run(test: &str, fault: &str, extra: &[&str]) -> (std::path::PathBuf, common::Finished) {
    let out = out_dir(test);
    let mut args = vec!["--max-restarts".to_string(), "1".to_string()];
    args.extend(train_args(2, &config("mlp_synthetic.toml"), &out, &mlp(extra)));
    let finished = Job::start_with_env(&args, &[("BURNRUN_FAULT", fault)]).wait(RESTART_DEADLINE);
    finished.assert_success(test);
    (out, finished)
}

#[test]
fn a_rank_killed_mid_training_restarts_the_job_which_ends_at_the_uninterrupted_parameters() {
    let reference = out_dir("elastic-reference");
    train(2, &config("mlp_synthetic.toml"), &reference, &mlp(&[]));
    let (out, finished) = restarted_run("elastic-kill", "kill,rank=1,step=7", &[]);
    let stderr = &finished.stderr;
    assert!(stderr.contains("rank 1 (node 0, local rank 1"), "{}", finished.output());
    assert!(stderr.contains("was killed by signal SIGKILL"), "{}", finished.output());
    assert!(
        stderr.contains("restarting the job: restart 1 of 1"),
        "{}",
        finished.output()
    );
    let all = finished.output();
    assert!(all.contains("restart 1: resuming from the latest checkpoint"), "{all}");
    assert!(all.contains("(step 5)"), "{all}");
    assert_params_close(
        &final_params(&out),
        &final_params(&reference),
        RESTART_TOL,
        "restarted after a kill at step 7 vs uninterrupted",
    );
    // metrics.jsonl holds each logged step once: the failed attempt's lines after the checkpoint
    // were dropped when the restart resumed.
    let steps: Vec<u64> = common::metrics(&out)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 10, 15, 20], "{all}");
    for dir in [&out, &reference] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_rank_that_hangs_is_reported_as_unresponsive_and_the_restarted_job_finishes() {
    // SIGSTOP at step 7: rank 0 waits in its collective until the deadline, then the launcher
    // names the stopped rank and restarts the job.
    let (out, finished) = restarted_run("elastic-stop", "stop,rank=1,step=7", &["comm.timeout_secs=3"]);
    let all = finished.output();
    assert!(finished.stderr.contains("rank 1"), "{all}");
    assert!(finished.stderr.contains("stopped"), "{all}");
    assert!(finished.stderr.contains("restarting the job: restart 1 of 1"), "{all}");
    assert!(all.contains("trained 20 steps (resumed at step 5)"), "{all}");
    let _ = std::fs::remove_dir_all(&out);
}

fn read_report(dir: &std::path::Path) -> String {
    let path = dir.join("flight_report_g0.txt");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn a_rank_stopped_with_sigstop_is_named_by_the_flight_recorder_within_the_stall_timeout() {
    // The collectives' deadline is a minute: the stall timeout (2 s) must find the hang first.
    let out = out_dir("flight-stop");
    let logs = out_dir("flight-stop-logs");
    let mut args: Vec<String> = ["--stall-timeout", "2", "--log-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(logs.display().to_string());
    args.extend(train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &mlp(&["comm.timeout_secs=60"]),
    ));
    let finished = Job::start_with_env(&args, &[("BURNRUN_FAULT", "stop,rank=1,step=7")]).wait(RESTART_DEADLINE);
    let all = finished.output();
    assert_eq!(finished.status.code(), Some(1), "{all}");
    assert!(finished.elapsed < Duration::from_secs(30), "{all}");
    let stderr = &finished.stderr;
    assert!(
        stderr.contains("job failed: rank 1 (node 0, local rank 1") && stderr.contains("was stopped (SIGSTOP)"),
        "{all}"
    );
    assert!(stderr.contains("rank 0 waited for it"), "{all}");
    let verdict = "rank 1 never entered all_reduce #";
    assert!(stderr.contains(&format!("flight recorder: {verdict}")), "{all}");
    assert!(
        stderr.contains("(step 7, data; its last collective: all_reduce #"),
        "{all}"
    );
    assert!(stderr.contains("rank(s) 0 waits in it for"), "{all}");
    let report = read_report(&logs);
    assert!(report.starts_with(&format!("verdict: {verdict}")), "{report}");
    assert!(
        report.contains("\nrank 0 (pid ") && report.contains("\nrank 1 (pid "),
        "{report}"
    );
    assert!(report.contains(": running for "), "rank 0's call in flight:\n{report}");
    for dir in [&out, &logs] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn across_two_nodes_the_report_of_node_0_holds_every_rank_and_names_the_stopped_rank_on_node_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "5a".repeat(32);
    let logs = out_dir("flight-2nodes-logs");
    // One folder: rank 0 (node 0) writes it; both nodes must run the same command.
    let out = out_dir("flight-2nodes");
    let start = |node: usize| {
        let mut args: Vec<String> = [
            "--nnodes",
            "2",
            "--node-rank",
            &node.to_string(),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port.to_string(),
            "--stall-timeout",
            "2",
            "--log-dir",
            &logs.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(train_args(
            1,
            &config("mlp_synthetic.toml"),
            &out,
            &mlp(&["comm.timeout_secs=60"]),
        ));
        Job::start_with_env(
            &args,
            &[("BURNRUN_SECRET", &secret), ("BURNRUN_FAULT", "stop,rank=1,step=7")],
        )
    };
    let (node0, node1) = (start(0), start(1));
    let (f0, f1) = (node0.wait(RESTART_DEADLINE), node1.wait(RESTART_DEADLINE));
    assert_eq!(f0.status.code(), Some(1), "{}", f0.output());
    assert_eq!(f1.status.code(), Some(1), "{}", f1.output());
    // Node 1 runs the stopped rank and names it; node 0 prints the verdict of both nodes' records.
    assert!(
        f1.stderr.contains("job failed: rank 1 (node 1, local rank 0"),
        "{}",
        f1.output()
    );
    assert!(
        f0.stderr.contains("flight recorder: rank 1 never entered all_reduce #"),
        "{}",
        f0.output()
    );
    let report = read_report(&logs);
    assert!(
        report.contains("\nrank 0 (pid ") && report.contains("\nrank 1 (pid "),
        "{report}"
    );
    for dir in [&out, &logs] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_connection_cut_between_two_ranks_fails_the_job_naming_it_and_the_restart_recovers() {
    let (out, finished) = restarted_run("elastic-drop", "drop,rank=1,peer=0,step=7", &[]);
    let all = finished.output();
    // Either side of the cut may fail first and be the one the launcher reports (under load the
    // other is stopped before it prints): rank 1 names its own cut, rank 0 the lost peer.
    let err = &finished.stderr;
    assert!(
        (err.contains("connection to peer 0 lost") && err.contains("cut by fault injection"))
            || err.contains("connection to peer 1 lost"),
        "{all}"
    );
    assert!(finished.stderr.contains("restarting the job: restart 1 of 1"), "{all}");
    assert!(all.contains("trained 20 steps (resumed at step 5)"), "{all}");
    let _ = std::fs::remove_dir_all(&out);
}
