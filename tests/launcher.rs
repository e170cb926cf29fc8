//! The launcher, end to end: the real `burnrun` binary starting real processes (`sh` ranks).
//! Every test runs under a deadline: a launcher that does not exit in time is killed and the test fails.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BURNRUN: &str = env!("CARGO_BIN_EXE_burnrun");
/// Deadline of a job that should end by itself (a loaded 2-core machine is slow).
const JOB_DEADLINE: Duration = Duration::from_secs(30);
/// A failure must tear the job down within this, although its other ranks sleep a minute.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(15);
/// Processes killed by the launcher or the kernel are gone within this.
const GONE_DEADLINE: Duration = Duration::from_secs(10);

/// A running launcher whose stdout and stderr lines are collected as they come.
struct Launcher {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, source: impl Read + Send + 'static) {
        let lines = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until `count` lines satisfy `pred`, and returns them.
    fn wait_for(&self, count: usize, within: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let found: Vec<String> = self.all().into_iter().filter(|l| pred(l)).collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {count} line(s); got:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Launcher {
    fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Self::command(args);
        for (key, value) in env {
            command.env(key, value);
        }
        Self::start_with_command(command)
    }

    /// The binary with `args`, no job secret inherited, quiet logs.
    fn command(args: &[&str]) -> Command {
        let mut command = Command::new(BURNRUN);
        command.args(args).env_remove("BURNRUN_SECRET").env("RUST_LOG", "warn");
        command
    }

    /// Starts `command` (from [`Launcher::command`], maybe with more environment) with piped output.
    fn start_with_command(mut command: Command) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("burnrun starts");
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.collect(child.stdout.take().unwrap());
        stderr.collect(child.stderr.take().unwrap());
        Launcher { child, stdout, stderr }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the launcher to exit; kills it and fails the test past `within`.
    fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "burnrun did not exit within {within:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout.text(), self.stderr.text())
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // A failed assertion must not leave a launcher (and its ranks) behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a launcher to its end.
fn run(args: &[&str]) -> (ExitStatus, Launcher) {
    let mut launcher = Launcher::start(args);
    let status = launcher.wait(JOB_DEADLINE);
    (status, launcher)
}

/// `(state, pgrp)` of a process from /proc, or `None` if it does not exist.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces, so fields start after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Live (not zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((state, pgrp)) if pgrp == pgid && state != 'Z'))
        .collect()
}

fn assert_gone(pgids: &[i32], what: &str) {
    let deadline = Instant::now() + GONE_DEADLINE;
    loop {
        let alive: Vec<i32> = pgids.iter().flat_map(|&g| group_members(g)).collect();
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for &pid in &alive {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
            panic!("{what}: processes {alive:?} still alive {GONE_DEADLINE:?} later");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The numbers printed as `pid=N` by the ranks.
fn pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .filter_map(|l| l.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnrun-launcher-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

const PRINT_ENV: &str = "echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR $MASTER_PORT \
                         $BURNRUN_RUN_ID ${#BURNRUN_SECRET} $BURNRUN_TIMEOUT_SECS $BURNRUN_RDZV_TIMEOUT_SECS";

#[test]
fn every_rank_gets_its_rank_the_world_and_the_job_in_its_environment() {
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "--run-id",
        "envtest",
        "--timeout",
        "42",
        "--rdzv-timeout",
        "17",
        "--",
        "sh",
        "-c",
        PRINT_ENV,
    ]);
    assert!(status.success(), "{}", launcher.output());
    let mut lines = launcher.stdout.all();
    lines.sort();
    assert_eq!(lines.len(), 2, "{}", launcher.output());
    for (rank, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], format!("[rank{rank}]:"), "{line}");
        let port: u16 = fields[7].parse().expect("MASTER_PORT is a port");
        assert_ne!(port, 0, "{line}");
        let expected = format!("{rank} {rank} 2 2 0 127.0.0.1 {port} envtest 64 42 17");
        assert_eq!(fields[1..].join(" "), expected);
    }
}

#[test]
fn nccl_and_cuda_variables_reach_every_rank_unchanged_and_cuda_visible_devices_is_never_set() {
    // NCCL reads its settings (interface, HCAs, debug) from the environment of each rank; like
    // torchrun, the launcher passes its own environment through and does not pick GPUs: each rank
    // uses device LOCAL_RANK among those CUDA_VISIBLE_DEVICES shows.
    let program = "echo $RANK nccl=$NCCL_SOCKET_IFNAME,$NCCL_IB_HCA,$NCCL_DEBUG,$NCCL_ANY_OTHER \
                   cuda=${CUDA_VISIBLE_DEVICES-unset}";
    let mut with_env = Launcher::start_with_env(
        &["--nproc-per-node", "2", "--", "sh", "-c", program],
        &[
            ("NCCL_SOCKET_IFNAME", "eth0"),
            ("NCCL_IB_HCA", "mlx5_0,mlx5_1"),
            ("NCCL_DEBUG", "INFO"),
            ("NCCL_ANY_OTHER", "x y"),
            ("CUDA_VISIBLE_DEVICES", "2,3"),
        ],
    );
    assert!(with_env.wait(JOB_DEADLINE).success(), "{}", with_env.output());
    let mut lines = with_env.stdout.all();
    lines.sort();
    assert_eq!(
        lines,
        [
            "[rank0]: 0 nccl=eth0,mlx5_0,mlx5_1,INFO,x y cuda=2,3",
            "[rank1]: 1 nccl=eth0,mlx5_0,mlx5_1,INFO,x y cuda=2,3"
        ],
        "{}",
        with_env.output()
    );
    let mut command = Launcher::command(&["--nproc-per-node", "2", "--", "sh", "-c", program]);
    command.env_remove("CUDA_VISIBLE_DEVICES");
    let mut without = Launcher::start_with_command(command);
    assert!(without.wait(JOB_DEADLINE).success(), "{}", without.output());
    let lines = without.stdout.all();
    assert_eq!(lines.len(), 2, "{}", without.output());
    assert!(lines.iter().all(|l| l.ends_with("cuda=unset")), "{lines:?}");
}

#[test]
fn each_output_line_is_prefixed_with_its_rank_on_the_same_stream() {
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        "echo out $RANK; echo err $RANK >&2; printf 'no newline %s' $RANK",
    ]);
    assert!(status.success(), "{}", launcher.output());
    let out: HashSet<String> = launcher.stdout.all().into_iter().collect();
    for rank in 0..2 {
        assert!(
            out.contains(&format!("[rank{rank}]: out {rank}")),
            "{}",
            launcher.output()
        );
        assert!(
            out.contains(&format!("[rank{rank}]: no newline {rank}")),
            "{}",
            launcher.output()
        );
        assert!(
            launcher.stderr.all().contains(&format!("[rank{rank}]: err {rank}")),
            "{}",
            launcher.output()
        );
    }
}

#[test]
fn the_log_dir_holds_each_ranks_stdout_and_stderr_unprefixed() {
    let dir = temp_dir("logs");
    let dir_arg = dir.to_str().unwrap();
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "--log-dir",
        dir_arg,
        "--",
        "sh",
        "-c",
        "echo hello $RANK; echo oops $RANK >&2",
    ]);
    assert!(status.success(), "{}", launcher.output());
    for rank in 0..2 {
        let out = std::fs::read_to_string(dir.join(format!("rank_{rank}.stdout"))).unwrap();
        let err = std::fs::read_to_string(dir.join(format!("rank_{rank}.stderr"))).unwrap();
        assert_eq!(out, format!("hello {rank}\n"));
        assert_eq!(err, format!("oops {rank}\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_exiting_with_code_3_stops_the_others_and_the_summary_names_it() {
    let started = Instant::now();
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ "$RANK" = 1 ]; then echo "about to fail" >&2; sleep 0.5; exit 3; else echo pid=$$; exec sleep 60; fi"#,
    ]);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(started.elapsed() < TEARDOWN_DEADLINE);
    let stderr = launcher.stderr.text();
    let summary: Vec<&str> = stderr.lines().filter(|l| l.contains("job failed")).collect();
    assert_eq!(summary.len(), 1, "one summary:\n{stderr}");
    assert!(summary[0].contains("rank 1 (node 0, local rank 1, pid"), "{stderr}");
    assert!(summary[0].contains("exited with code 3"), "{stderr}");
    assert!(
        stderr.contains("burnrun:   [rank1]: about to fail"),
        "the stderr tail is in the summary:\n{stderr}"
    );
    let sleeper = pids(&launcher.stdout.all());
    assert_eq!(sleeper.len(), 1, "{}", launcher.output());
    assert_gone(&sleeper, "the sleeping rank");
}

#[test]
fn a_rank_killed_by_sigkill_is_reported_by_the_signal_name() {
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ "$RANK" = 0 ]; then kill -KILL $$; else exec sleep 60; fi"#,
    ]);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let stderr = launcher.stderr.text();
    assert!(stderr.contains("rank 0 (node 0, local rank 0"), "{stderr}");
    assert!(stderr.contains("was killed by signal SIGKILL"), "{stderr}");
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank_and_it_exits_143() {
    let mut launcher = Launcher::start(&["--nproc-per-node", "2", "--", "sh", "-c", "echo pid=$$; exec sleep 60"]);
    let ranks = pids(&launcher.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid=")));
    signal(launcher.pid(), nix::sys::signal::SIGTERM);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(143), "{}", launcher.output());
    assert_gone(&ranks, "ranks after SIGTERM to the launcher");
}

#[test]
fn sigint_reaches_the_ranks_which_may_exit_cleanly_and_the_launcher_exits_130() {
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        "trap 'echo got-int; exit 0' INT; echo pid=$$; while :; do sleep 0.1; done",
    ]);
    let ranks = pids(&launcher.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid=")));
    signal(launcher.pid(), nix::sys::signal::SIGINT);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(130), "{}", launcher.output());
    assert_eq!(
        launcher.stdout.all().iter().filter(|l| l.ends_with("got-int")).count(),
        2,
        "{}",
        launcher.output()
    );
    assert_gone(&ranks, "ranks after SIGINT to the launcher");
}

#[test]
fn a_rank_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let started = Instant::now();
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--grace-period",
        "1",
        "--",
        "sh",
        "-c",
        r#"trap '' TERM; if [ "$RANK" = 1 ]; then sleep 0.3; exit 7; fi; echo pid=$$; while :; do sleep 0.1; done"#,
    ]);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        launcher.stderr.text().contains("sending SIGKILL"),
        "{}",
        launcher.output()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the grace period was honoured"
    );
    assert_gone(&pids(&launcher.stdout.all()), "the rank that ignored SIGTERM");
}

#[test]
fn a_launcher_killed_with_sigkill_leaves_no_rank_or_rank_child_behind() {
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--",
        "sh",
        "-c",
        // The rank's child `sleep` is what PDEATHSIG alone would leave behind.
        "echo pid=$$; sleep 60 & wait",
    ]);
    let groups = pids(&launcher.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid=")));
    assert!(groups.iter().all(|&g| !group_members(g).is_empty()));
    signal(launcher.pid(), nix::sys::signal::SIGKILL);
    launcher.wait(GONE_DEADLINE);
    assert_gone(&groups, "rank process groups after the launcher was SIGKILLed");
}

#[test]
fn two_single_node_jobs_started_at_once_pick_different_ports() {
    let args = ["--nproc-per-node", "2", "--", "sh", "-c", "echo port=$MASTER_PORT"];
    let mut first = Launcher::start(&args);
    let mut second = Launcher::start(&args);
    let (a, b) = (first.wait(JOB_DEADLINE), second.wait(JOB_DEADLINE));
    assert!(a.success(), "{}", first.output());
    assert!(b.success(), "{}", second.output());
    let port = |l: &Launcher| -> HashSet<String> {
        l.stdout
            .all()
            .iter()
            .filter_map(|line| line.split("port=").nth(1).map(str::to_owned))
            .collect()
    };
    let (pa, pb) = (port(&first), port(&second));
    assert_eq!(pa.len(), 1, "{}", first.output());
    assert_eq!(pb.len(), 1, "{}", second.output());
    assert_ne!(pa, pb);
}

fn node_args(node_rank: usize, port: u16, extra: &[&str], program: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--nnodes",
        "2",
        "--node-rank",
        &node_rank.to_string(),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--", "sh", "-c", program].iter().map(|s| s.to_string()));
    args
}

fn start_node(args: &[String], env: &[(&str, &str)]) -> Launcher {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Launcher::start_with_env(&args, env)
}

#[test]
fn two_launchers_with_nnodes_2_on_one_machine_form_one_world_of_four() {
    let port = free_port();
    let program = "echo $RANK $WORLD_SIZE $GROUP_RANK $LOCAL_RANK $BURNRUN_RUN_ID";
    // Node 1 first: it must wait for node 0's store. No secret and no run id: both are derived
    // from the port (with a warning), and node 1 adopts node 0's random run id.
    let mut node1 = start_node(&node_args(1, port, &[], program), &[]);
    std::thread::sleep(Duration::from_millis(300));
    let mut node0 = start_node(&node_args(0, port, &[], program), &[]);
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(s0.success(), "{}", node0.output());
    assert!(s1.success(), "{}", node1.output());
    let mut lines: Vec<String> = node0.stdout.all().into_iter().chain(node1.stdout.all()).collect();
    lines.sort();
    assert_eq!(lines.len(), 4, "{}\n{}", node0.output(), node1.output());
    let run_id = lines[0].split_whitespace().last().unwrap().to_owned();
    let expected: Vec<String> = ["0 4 0 0", "1 4 0 1", "2 4 1 0", "3 4 1 1"]
        .iter()
        .enumerate()
        .map(|(rank, fields)| format!("[rank{rank}]: {fields} {run_id}"))
        .collect();
    assert_eq!(lines, expected);
    assert!(
        node0.stderr.text().contains("WARNING: no job secret"),
        "{}",
        node0.output()
    );
}

#[test]
fn a_node_given_another_run_id_than_node_0_is_refused() {
    let port = free_port();
    let secret = "ef".repeat(32);
    let env = [("BURNRUN_SECRET", secret.as_str())];
    let mut node0 = start_node(
        &node_args(0, port, &["--run-id", "a", "--rdzv-timeout", "3"], "true"),
        &env,
    );
    let mut node1 = start_node(
        &node_args(1, port, &["--run-id", "b", "--rdzv-timeout", "3"], "true"),
        &env,
    );
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(!s0.success() && !s1.success());
    assert!(
        node1
            .stderr
            .text()
            .contains(r#"--run-id "b" differs from node 0's run id "a""#),
        "{}",
        node1.output()
    );
}

#[test]
fn a_failure_on_node_1_tears_down_node_0_too() {
    let port = free_port();
    let program =
        r#"if [ "$RANK" = 3 ]; then echo "node 1 breaks" >&2; sleep 0.5; exit 3; fi; echo pid=$$; exec sleep 60"#;
    let env = [("BURNRUN_SECRET", "ab".repeat(32))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node0 = start_node(&node_args(0, port, &[], program), &env);
    let mut node1 = start_node(&node_args(1, port, &[], program), &env);
    let (s0, s1) = (node0.wait(TEARDOWN_DEADLINE), node1.wait(TEARDOWN_DEADLINE));
    assert_eq!(s1.code(), Some(1), "{}", node1.output());
    assert_eq!(s0.code(), Some(1), "{}", node0.output());
    for node in [&node0, &node1] {
        let stderr = node.stderr.text();
        assert!(stderr.contains("job failed: rank 3 (node 1, local rank 1"), "{stderr}");
        assert!(stderr.contains("exited with code 3"), "{stderr}");
        assert!(stderr.contains("[rank3]: node 1 breaks"), "{stderr}");
    }
    let sleepers: Vec<i32> = pids(&node0.stdout.all())
        .into_iter()
        .chain(pids(&node1.stdout.all()))
        .collect();
    assert_eq!(sleepers.len(), 3, "{}\n{}", node0.output(), node1.output());
    assert_gone(&sleepers, "the other ranks of both nodes");
}

#[test]
fn nodes_started_with_different_commands_are_refused_naming_both() {
    let port = free_port();
    let mut node0 = start_node(&node_args(0, port, &["--rdzv-timeout", "20"], "echo a"), &[]);
    let mut node1 = start_node(&node_args(1, port, &["--rdzv-timeout", "20"], "echo b"), &[]);
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(!s0.success() && !s1.success());
    for node in [&node0, &node1] {
        let stderr = node.stderr.text();
        assert!(
            stderr.contains("node 1 was started with the command `sh -c 'echo b'` but node 0"),
            "{stderr}"
        );
        assert!(stderr.contains("`sh -c 'echo a'`"), "{stderr}");
    }
    assert!(
        node0.stdout.all().is_empty() && node1.stdout.all().is_empty(),
        "no rank ran"
    );
}

#[test]
fn a_node_with_another_secret_cannot_join_and_node_0_gives_up_at_its_deadline() {
    let port = free_port();
    let dir = temp_dir("secret");
    let key = dir.join("job.key");
    let key_arg = key.to_str().unwrap();
    let mut node0 = start_node(
        &node_args(0, port, &["--rdzv-timeout", "3", "--secret-file", key_arg], "true"),
        &[],
    );
    let deadline = Instant::now() + JOB_DEADLINE;
    while !key.exists() {
        assert!(
            Instant::now() < deadline,
            "node 0 did not create {key:?}: {}",
            node0.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let intruder_secret = "cd".repeat(32);
    let mut node1 = start_node(
        &node_args(1, port, &["--rdzv-timeout", "3"], "true"),
        &[("BURNRUN_SECRET", &intruder_secret)],
    );
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(!s1.success(), "{}", node1.output());
    assert!(node1.stderr.text().contains("secret"), "{}", node1.output());
    assert!(!s0.success(), "{}", node0.output());
    assert!(
        node0.stderr.text().contains("node(s) [1] did not join"),
        "{}",
        node0.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nodes_sharing_a_secret_file_run_together_and_node_1_waits_for_node_0_to_write_it() {
    let port = free_port();
    let dir = temp_dir("shared-secret");
    let key = dir.join("job.key");
    let key_arg = key.to_str().unwrap();
    let program = "echo $RANK ${#BURNRUN_SECRET}";
    let mut node1 = start_node(&node_args(1, port, &["--secret-file", key_arg], program), &[]);
    std::thread::sleep(Duration::from_millis(300));
    let mut node0 = start_node(&node_args(0, port, &["--secret-file", key_arg], program), &[]);
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(s0.success(), "{}", node0.output());
    assert!(s1.success(), "{}", node1.output());
    assert!(!node0.stderr.text().contains("WARNING"), "{}", node0.output());
    assert!(
        node0.stderr.text().contains("wrote a new job secret"),
        "{}",
        node0.output()
    );
    assert_eq!(node1.stdout.all().len(), 2, "{}", node1.output());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_secret_file_other_users_can_read_is_refused_naming_its_mode_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("open-secret");
    let key = dir.join("job.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    for mode in [0o644, 0o640, 0o602] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (status, launcher) = run(&["--secret-file", key.to_str().unwrap(), "--", "sh", "-c", "echo ran"]);
        assert_eq!(status.code(), Some(1), "{}", launcher.output());
        let stderr = launcher.stderr.text();
        let expected = format!("job secret file {} has mode {mode:04o}", key.display());
        assert!(stderr.contains(&expected), "{expected:?} missing from:\n{stderr}");
        assert!(stderr.contains(&format!("chmod 600 {}", key.display())), "{stderr}");
        assert!(launcher.stdout.all().is_empty(), "a rank ran: {}", launcher.output());
    }
    // The same file, private, is taken.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, launcher) = run(&["--secret-file", key.to_str().unwrap(), "--", "sh", "-c", "echo ran"]);
    assert!(status.success(), "{}", launcher.output());
    assert_eq!(launcher.stdout.all(), ["[rank0]: ran"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_help_and_the_warning_name_the_same_source_of_a_derived_secret() {
    let output = Command::new(BURNRUN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("derives its secret from --run-id, or without one from --master-port"),
        "{help}"
    );
    // A two-node job without a secret says the same at run time (node 1 never comes: node 0 gives up).
    let port = free_port().to_string();
    let (_, launcher) = run(&[
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--master-port",
        &port,
        "--rdzv-timeout",
        "1",
        "--",
        "true",
    ]);
    let stderr = launcher.stderr.text();
    assert!(
        stderr.contains(&format!(
            "deriving one from the store port {port} (--run-id, or without one --master-port)"
        )),
        "{stderr}"
    );
}

#[test]
fn a_program_that_cannot_start_is_an_error_naming_the_rank() {
    let (status, launcher) = run(&["--nproc-per-node", "2", "--", "/nonexistent/program"]);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    assert!(
        launcher
            .stderr
            .text()
            .contains("cannot start rank 0 (/nonexistent/program)"),
        "{}",
        launcher.output()
    );
}

#[test]
fn without_launch_options_a_program_after_the_separator_still_runs_as_one_rank() {
    let (status, launcher) = run(&["--", "sh", "-c", "echo $RANK/$WORLD_SIZE"]);
    assert!(status.success(), "{}", launcher.output());
    assert_eq!(launcher.stdout.all(), ["[rank0]: 0/1"]);
}

#[test]
fn the_exit_code_is_zero_only_if_every_rank_succeeds() {
    let (status, launcher) = run(&["--nproc-per-node", "3", "--", "sh", "-c", "exit 0"]);
    assert!(status.success(), "{}", launcher.output());
    assert!(!launcher.stderr.text().contains("job failed"));
}

#[test]
fn node_1_tears_down_when_node_0s_launcher_is_killed() {
    let port = free_port();
    let program = "echo pid=$$; exec sleep 60";
    let mut node0 = start_node(&node_args(0, port, &[], program), &[]);
    let mut node1 = start_node(&node_args(1, port, &[], program), &[]);
    let mut groups = pids(&node0.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid=")));
    groups.extend(pids(&node1.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid="))));
    signal(node0.pid(), nix::sys::signal::SIGKILL);
    node0.wait(GONE_DEADLINE);
    let status = node1.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", node1.output());
    assert!(
        node1.stderr.text().contains("lost node 0's store"),
        "{}",
        node1.output()
    );
    assert_gone(&groups, "the ranks of both nodes");
}

#[test]
fn node_0_stops_the_job_when_node_1s_launcher_goes_silent() {
    let port = free_port();
    let program = "echo pid=$$; exec sleep 60";
    let mut node0 = start_node(&node_args(0, port, &[], program), &[]);
    let mut node1 = start_node(&node_args(1, port, &[], program), &[]);
    let mut groups = pids(&node0.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid=")));
    groups.extend(pids(&node1.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid="))));
    signal(node1.pid(), nix::sys::signal::SIGKILL);
    node1.wait(GONE_DEADLINE);
    // Node 1's ranks die with their launcher; node 0 notices when node 1's heartbeat stalls (10 s).
    let status = node0.wait(JOB_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", node0.output());
    assert!(node0.stderr.text().contains("node 1 (") && node0.stderr.text().contains("stopped reporting"));
    assert_gone(&groups, "the ranks of both nodes");
}

#[test]
fn a_collective_benchmark_runs_through_the_launcher() {
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "bench",
        "allreduce",
        "--max-bytes",
        "8K",
        "--iters",
        "2",
        "--warmup",
        "1",
    ]);
    assert!(status.success(), "{}", launcher.output());
    let rows: Vec<String> = launcher
        .stdout
        .all()
        .into_iter()
        .filter(|l| l.starts_with("[rank0]:") && l.contains(" f32 "))
        .collect();
    assert_eq!(rows.len(), 2, "4K and 8K rows:\n{}", launcher.output());
    assert!(
        rows.iter().all(|row| row.ends_with(" 0")),
        "no wrong elements:\n{}",
        launcher.output()
    );
}

#[test]
fn a_collective_benchmark_runs_across_two_launchers() {
    let port = free_port();
    let node = |node_rank: usize| -> Vec<String> {
        let mut args = node_args(node_rank, port, &[], "");
        args.truncate(args.len() - 4); // drop `-- sh -c ""`
        args.extend(
            [
                "bench",
                "allgather",
                "--max-bytes",
                "4K",
                "--iters",
                "2",
                "--warmup",
                "1",
            ]
            .map(String::from),
        );
        args
    };
    let mut node0 = start_node(&node(0), &[]);
    let mut node1 = start_node(&node(1), &[]);
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(s0.success(), "{}", node0.output());
    assert!(s1.success(), "{}", node1.output());
    let header = node0
        .stdout
        .all()
        .into_iter()
        .find(|l| l.contains("burnrun bench allgather"));
    assert!(header.is_some_and(|h| h.contains("4 rank(s)")), "{}", node0.output());
}

#[test]
fn a_rank_killed_in_the_middle_of_an_all_reduce_takes_the_job_down_with_a_summary() {
    let started = Instant::now();
    // Rank 1 runs the benchmark in a loop of 4 MiB all-reduces and is SIGKILLed after 1.5 s,
    // mid-collective; ranks 0 and 2 are blocked in the same all-reduce at that moment.
    let script = format!(
        r#"if [ "$RANK" = 1 ]; then (sleep 1.5; kill -9 $$) & fi; exec {} bench allreduce --min-bytes 4M --max-bytes 4M --iters 100000 --warmup 0"#,
        env!("CARGO_BIN_EXE_burnrun")
    );
    let mut launcher = Launcher::start(&["--nproc-per-node", "3", "--", "sh", "-c", &script]);
    let status = launcher.wait(TEARDOWN_DEADLINE + Duration::from_secs(5));
    assert!(!status.success(), "{}", launcher.output());
    assert!(
        started.elapsed() < TEARDOWN_DEADLINE + Duration::from_secs(5),
        "no hang"
    );
    let stderr = launcher.stderr.text();
    let summary: Vec<&str> = stderr.lines().filter(|l| l.contains("job failed")).collect();
    assert_eq!(summary.len(), 1, "one summary:\n{stderr}");
    assert!(summary[0].contains("rank 1 (node 0"), "{stderr}");
    assert!(summary[0].contains("SIGKILL"), "{stderr}");
}

/// Shell lines that make rank 0 exit (after printing `rank0_says` on stderr) before rank 1 ends,
/// and rank 1 end (with `rank1_ends`) 50 ms after rank 0's exit, without ever being stopped by
/// the launcher: it ignores SIGTERM, which the launcher sends on rank 0's exit. Files in `dir`
/// order the two: rank 0 waits until rank 1 ignores SIGTERM, rank 1 waits until rank 0 exits.
fn rank_0_exits_first_then_rank_1(dir: &std::path::Path, rank0_says: &str, rank1_ends: &str) -> String {
    let d = dir.display();
    format!(
        r#"if [ "$RANK" = 1 ]; then trap '' TERM; touch {d}/ready; while [ ! -e {d}/exiting ]; do sleep 0.01; done; sleep 0.05; {rank1_ends}; fi
while [ ! -e {d}/ready ]; do sleep 0.01; done; echo "{rank0_says}" >&2; touch {d}/exiting; exit 1"#
    )
}

/// The summary's `job failed` line (not the teardown's line quoting it); asserts there is exactly one.
fn summary_line(launcher: &Launcher) -> String {
    let stderr = launcher.stderr.text();
    let summary: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("burnrun: job failed") && !l.contains("stopping rank(s)"))
        .collect();
    assert_eq!(summary.len(), 1, "one summary:\n{stderr}");
    summary[0].to_owned()
}

#[test]
fn a_rank_killed_by_sigkill_is_the_root_cause_although_a_peer_exit_was_observed_first() {
    let dir = temp_dir("root-cause-signal");
    let script = rank_0_exits_first_then_rank_1(&dir, "rank 0 gives up", "kill -KILL $$");
    let mut launcher = Launcher::start(&["--nproc-per-node", "2", "--", "sh", "-c", &script]);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let summary = summary_line(&launcher);
    assert!(
        summary.contains("job failed: rank 1 (node 0, local rank 1, pid"),
        "{}",
        launcher.output()
    );
    assert!(
        summary.contains("was killed by signal SIGKILL"),
        "{}",
        launcher.output()
    );
    let stderr = launcher.stderr.text();
    assert!(
        stderr.contains("burnrun: also failed: rank 0 (exited with code 1)"),
        "{}",
        launcher.output()
    );
    // The launcher saw rank 0 go first and started the teardown then.
    assert!(
        stderr.contains("rank 0 exited with code 1: stopping rank(s) [1]"),
        "{}",
        launcher.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_that_lost_its_connection_to_a_failed_peer_is_not_the_root_cause() {
    let dir = temp_dir("root-cause-lost-peer");
    let script = rank_0_exits_first_then_rank_1(
        &dir,
        "Error: rank 0: all_reduce #4: connection to peer 1 lost (early eof); that rank likely exited",
        "echo 'rank 1 breaks' >&2; exit 3",
    );
    let mut launcher = Launcher::start(&["--nproc-per-node", "2", "--", "sh", "-c", &script]);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let summary = summary_line(&launcher);
    assert!(summary.contains("job failed: rank 1 (node 0"), "{}", launcher.output());
    assert!(summary.contains("exited with code 3"), "{}", launcher.output());
    let stderr = launcher.stderr.text();
    assert!(
        stderr.contains("burnrun:   [rank1]: rank 1 breaks"),
        "{}",
        launcher.output()
    );
    assert!(
        stderr.contains("burnrun: also failed: rank 0 (exited with code 1, lost peer 1)"),
        "{}",
        launcher.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_killed_on_node_1_replaces_the_earlier_failure_of_the_node_0_rank_that_lost_it() {
    let port = free_port();
    let dir = temp_dir("root-cause-nodes");
    let d = dir.display();
    // Rank 0 (node 0) exits first, saying it lost peer 3; node 0 publishes that. Rank 3 (node 1)
    // ignores the teardown's SIGTERM and is SIGKILLed half a second later.
    let program = format!(
        r#"case $RANK in
0) while [ ! -e {d}/ready ]; do sleep 0.01; done; echo "Error: rank 0: all_reduce #9: connection to peer 3 lost (reset); that rank likely exited" >&2; touch {d}/exiting; exit 1;;
3) trap '' TERM; touch {d}/ready; while [ ! -e {d}/exiting ]; do sleep 0.01; done; sleep 0.5; kill -KILL $$;;
*) exec sleep 60;;
esac"#
    );
    let env = [("BURNRUN_SECRET", "ab".repeat(32))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node0 = start_node(&node_args(0, port, &[], &program), &env);
    let mut node1 = start_node(&node_args(1, port, &[], &program), &env);
    let (s0, s1) = (node0.wait(TEARDOWN_DEADLINE), node1.wait(TEARDOWN_DEADLINE));
    assert_eq!(s0.code(), Some(1), "{}", node0.output());
    assert_eq!(s1.code(), Some(1), "{}", node1.output());
    for node in [&node0, &node1] {
        let summary = summary_line(node);
        assert!(
            summary.contains("job failed: rank 3 (node 1, local rank 1")
                && summary.contains("was killed by signal SIGKILL"),
            "node 0:\n{}\nnode 1:\n{}",
            node0.output(),
            node1.output()
        );
    }
    assert!(
        node0
            .stderr
            .text()
            .contains("burnrun: also failed: rank 0 (exited with code 1, lost peer 3)"),
        "{}",
        node0.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a job of run id `run_id` whose two ranks each leave a file, a symbolic link (to a file
/// outside the directory) and a directory in /dev/shm under the run's prefix, then exit with
/// `exit_code` once both ranks made theirs (so no teardown stops a rank before); asserts that the
/// launcher removed them all, and nothing else.
fn assert_shared_memory_is_swept(run_id: &str, exit_code: i32) {
    let shm = std::path::Path::new(burnrun::transport::SHM_DIR);
    let prefix = burnrun::transport::shm_file_prefix(run_id);
    let outside = temp_dir(&format!("shm-target-{exit_code}"));
    let target = outside.join("target");
    std::fs::write(&target, b"keep me").unwrap();
    // A file of another run that merely starts like this one's id.
    let other = shm.join(format!("{}x-other-run", prefix.trim_end_matches('.')));
    std::fs::write(&other, b"other run").unwrap();
    let script = format!(
        "p={}/{prefix}r$RANK-; m={}/made-; touch ${{p}}leftover && ln -s {} ${{p}}link && mkdir ${{p}}dir && echo made=$RANK && touch ${{m}}$RANK; \
         while [ ! -e ${{m}}0 ] || [ ! -e ${{m}}1 ]; do sleep 0.01; done; exit {exit_code}",
        shm.display(),
        outside.display(),
        target.display()
    );
    let (status, launcher) = run(&["--nproc-per-node", "2", "--run-id", run_id, "--", "sh", "-c", &script]);
    let expected = if exit_code == 0 { 0 } else { 1 };
    assert_eq!(status.code(), Some(expected), "{}", launcher.output());
    let made = launcher.stdout.all().iter().filter(|l| l.contains("made=")).count();
    assert_eq!(made, 2, "both ranks created their files:\n{}", launcher.output());
    let left: Vec<String> = std::fs::read_dir(shm)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert!(
        left.is_empty(),
        "left in {}: {left:?}\n{}",
        shm.display(),
        launcher.output()
    );
    assert!(target.is_file(), "the link's target outside {} was kept", shm.display());
    assert!(other.is_file(), "another run's file was kept");
    let _ = std::fs::remove_file(&other);
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn a_failing_job_leaves_no_shared_memory_file_of_its_run_behind() {
    assert_shared_memory_is_swept(&format!("sweep-fail-{}", std::process::id()), 3);
}

#[test]
fn a_succeeding_job_leaves_no_shared_memory_file_of_its_run_behind() {
    assert_shared_memory_is_swept(&format!("sweep-ok-{}", std::process::id()), 0);
}

/// The pid of the launcher's child that runs global rank `rank` (read from its environment).
fn rank_pid(launcher: i32, rank: usize) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|end| stat[end + 1..].split_whitespace().nth(1)?.parse::<i32>().ok());
            ppid == Some(launcher)
        })
        .find(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.split(|&b| b == 0)
                        .any(|var| var == format!("RANK={rank}").as_bytes())
                })
                .unwrap_or(false)
        })
}

/// Continues and kills a process a test stopped, whatever the test's outcome.
struct StoppedProcess(i32);

impl Drop for StoppedProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
    }
}

#[test]
fn a_rank_stopped_with_sigstop_is_named_as_the_cause_when_the_others_time_out_waiting_for_it() {
    // Four ranks time an all-reduce for far longer than the test; each collective may wait 3 s.
    let mut launcher = Launcher::start(&[
        "--timeout",
        "3",
        "--nproc-per-node",
        "4",
        "bench",
        "allreduce",
        "--min-bytes",
        "64K",
        "--max-bytes",
        "64K",
        "--iters",
        "100000000",
    ]);
    launcher.stdout.wait_for(1, JOB_DEADLINE, |l| {
        l.starts_with("[rank0]: #") && l.contains("size(B)")
    });
    let pid =
        rank_pid(launcher.pid(), 1).unwrap_or_else(|| panic!("no rank 1 under the launcher\n{}", launcher.output()));
    let _guard = StoppedProcess(pid);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let status = launcher.wait(JOB_DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let stderr = launcher.stderr.text();
    let headline = stderr
        .lines()
        .find(|l| l.starts_with("burnrun: job failed"))
        .unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    let expected = format!("job failed: rank 1 (node 0, local rank 1, pid {pid} on ");
    assert!(headline.contains(&expected), "{headline}\n{stderr}");
    assert!(
        headline.contains("was stopped (SIGSTOP) and did not respond") && headline.contains("timed out waiting for it"),
        "{headline}"
    );
    let also = stderr
        .lines()
        .find(|l| l.starts_with("burnrun: also failed"))
        .unwrap_or_default();
    assert!(also.contains("timed out waiting for peer "), "{stderr}");
    // Rank 1's connections stayed open: nobody lost it (a rank may lose a peer that exited).
    assert!(
        !also.contains("lost peer 1"),
        "a timeout is not a lost connection: {also}"
    );
}

#[test]
fn with_max_restarts_a_failed_job_starts_again_and_its_ranks_see_the_restart_count() {
    // Generation 0 fails on rank 1; generation 1 succeeds. Both of torchrun's names are set.
    let program = r#"echo "gen=$BURNRUN_RESTART_COUNT te=$TORCHELASTIC_RESTART_COUNT max=$TORCHELASTIC_MAX_RESTARTS rank=$RANK"; if [ "$BURNRUN_RESTART_COUNT" = 0 ] && [ "$RANK" = 1 ]; then exit 3; fi; sleep 0.2"#;
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--",
        "sh",
        "-c",
        program,
    ]);
    assert!(status.success(), "{}", launcher.output());
    let mut lines = launcher.stdout.all();
    lines.retain(|l| l.contains("gen=1"));
    lines.sort();
    assert_eq!(
        lines,
        ["[rank0]: gen=1 te=1 max=2 rank=0", "[rank1]: gen=1 te=1 max=2 rank=1"],
        "{}",
        launcher.output()
    );
    let stderr = launcher.stderr.text();
    assert!(
        stderr.contains("job failed: rank 1") && stderr.contains("exited with code 3"),
        "{stderr}"
    );
    assert!(stderr.contains("restarting the job: restart 1 of 2"), "{stderr}");
    assert!(!stderr.contains("restart 2 of 2"), "{stderr}");
}

#[test]
fn the_restart_budget_is_spent_then_the_job_fails_with_the_last_root_cause() {
    let (status, launcher) = run(&[
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ "$RANK" = 0 ]; then echo "attempt $BURNRUN_RESTART_COUNT fails" >&2; exit 4; fi; exec sleep 30"#,
    ]);
    assert_eq!(status.code(), Some(1), "{}", launcher.output());
    let stderr = launcher.stderr.text();
    assert_eq!(stderr.matches("restarting the job").count(), 2, "{stderr}");
    assert!(
        stderr.contains("the job failed after 2 restart(s): --max-restarts 2 is spent"),
        "{stderr}"
    );
    assert!(stderr.contains("[rank0]: attempt 2 fails"), "{stderr}");
}

#[test]
fn sigterm_to_a_launcher_with_restarts_left_stops_the_job_without_restarting() {
    let mut launcher = Launcher::start(&[
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "3",
        "--",
        "sh",
        "-c",
        "echo pid=$$; exec sleep 60",
    ]);
    launcher.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("pid="));
    signal(launcher.pid(), nix::sys::signal::SIGTERM);
    let status = launcher.wait(TEARDOWN_DEADLINE);
    assert_eq!(status.code(), Some(143), "{}", launcher.output());
    assert!(
        !launcher.stderr.text().contains("restarting the job"),
        "{}",
        launcher.output()
    );
}

#[test]
fn both_nodes_restart_after_a_rank_of_node_1_fails_and_the_second_generation_succeeds() {
    let port = free_port();
    let program = r#"if [ "$BURNRUN_RESTART_COUNT" = 0 ] && [ "$RANK" = 3 ]; then sleep 0.3; exit 3; fi; echo "gen=$BURNRUN_RESTART_COUNT"; [ "$BURNRUN_RESTART_COUNT" = 1 ] || exec sleep 60"#;
    let env = [("BURNRUN_SECRET", "cd".repeat(32))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node0 = start_node(&node_args(0, port, &["--max-restarts", "1"], program), &env);
    let mut node1 = start_node(&node_args(1, port, &["--max-restarts", "1"], program), &env);
    let (s0, s1) = (node0.wait(JOB_DEADLINE), node1.wait(JOB_DEADLINE));
    assert!(s0.success(), "{}", node0.output());
    assert!(s1.success(), "{}", node1.output());
    for node in [&node0, &node1] {
        let stderr = node.stderr.text();
        assert!(stderr.contains("job failed: rank 3 (node 1, local rank 1"), "{stderr}");
        assert!(stderr.contains("restarting the job: restart 1 of 1"), "{stderr}");
        let gen1 = node.stdout.all().iter().filter(|l| l.contains("gen=1")).count();
        assert_eq!(gen1, 2, "{}", node.output());
    }
}

#[test]
fn a_node_whose_launcher_was_killed_is_started_again_and_the_job_goes_on_in_the_next_generation() {
    let port = free_port();
    let program = r#"echo "gen=$BURNRUN_RESTART_COUNT pid=$$"; [ "$BURNRUN_RESTART_COUNT" = 1 ] || exec sleep 60"#;
    let env = [("BURNRUN_SECRET", "ef".repeat(32))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let extra = ["--max-restarts", "1", "--rdzv-timeout", "60"];
    let mut node0 = start_node(&node_args(0, port, &extra, program), &env);
    let mut node1 = start_node(&node_args(1, port, &extra, program), &env);
    node0.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("gen=0"));
    node1.stdout.wait_for(2, JOB_DEADLINE, |l| l.contains("gen=0"));
    signal(node1.pid(), nix::sys::signal::SIGKILL);
    node1.wait(GONE_DEADLINE);
    // A new launcher for node 1: its node is taken in generation 0, so it waits for generation 1,
    // which node 0 opens once node 1's silence (10 s) failed generation 0.
    let mut again = start_node(&node_args(1, port, &extra, program), &env);
    let deadline = Duration::from_secs(60);
    let (s0, s1) = (node0.wait(deadline), again.wait(deadline));
    assert!(s0.success(), "{}", node0.output());
    assert!(s1.success(), "{}", again.output());
    assert!(
        again.stderr.text().contains("joining generation 1"),
        "{}",
        again.output()
    );
    assert!(node0.stderr.text().contains("stopped reporting"), "{}", node0.output());
    let gen1 = |l: &Launcher| l.stdout.all().iter().filter(|l| l.contains("gen=1")).count();
    assert_eq!(
        (gen1(&node0), gen1(&again)),
        (2, 2),
        "{}\n{}",
        node0.output(),
        again.output()
    );
}
