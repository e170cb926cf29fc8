//! Helpers of the trainer's end-to-end tests: run the real `burnrun` binary (always through the
//! launcher) under a deadline, and read and compare the parameters it checkpoints.
// Each test binary that declares `mod common;` uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burnrun::train::checkpoint;

/// The release binary under test.
pub const BURNRUN: &str = env!("CARGO_BIN_EXE_burnrun");

/// Deadline of one short training job (a few seconds of work; the 2-core machine is shared).
pub const JOB_DEADLINE: Duration = Duration::from_secs(90);

/// After the launcher exits, how long its output pipes may stay open (its ranks are gone by then).
const PIPE_DRAIN: Duration = Duration::from_secs(5);

/// The repository root: configs are found relative to it, and jobs run in it (the GPT config
/// names its text file by a relative path).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An example config by file name, e.g. `config("mlp_synthetic.toml")`.
pub fn config(name: &str) -> PathBuf {
    repo().join("configs").join(name)
}

/// A fresh, empty folder for one test's outputs, removed by a previous run of the same test.
pub fn out_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnrun-train-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test's output folder");
    dir
}

/// Output collected from a child's pipe by a reader thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl Captured {
    fn collect(&self, mut source: impl Read + Send + 'static) -> JoinHandle<()> {
        let text = Arc::clone(&self.0);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = source.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// A running `burnrun` (the launcher); killed when dropped, so a failed assertion leaves no job
/// behind (the launcher's ranks die with it).
pub struct Job {
    child: Child,
    stdout: Captured,
    stderr: Captured,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

/// A finished `burnrun`.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (the ranks' prefixed output included).
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
}

impl Finished {
    /// Both streams, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Panics with the whole output unless the job exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(self.status.success(), "{what} failed\n{}", self.output());
        self
    }
}

impl Job {
    /// Starts `burnrun ARGS` in the repository root.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Job::start`] with `env` added to its environment (e.g. `BURNRUN_FAULT`).
    pub fn start_with_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], args, env)
    }

    /// [`Job::start_with_env`] through `wrapper`, a command that runs its arguments (e.g.
    /// `ip netns exec NAME`, which execs `burnrun` in a network namespace: the pid stays the
    /// launcher's, so the drop still kills it).
    pub fn start_wrapped<S: AsRef<std::ffi::OsStr>>(wrapper: &[&str], args: &[S], env: &[(&str, &str)]) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(BURNRUN);
                command
            }
            None => Command::new(BURNRUN),
        };
        command
            .args(args)
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("BURNRUN_SECRET")
            .env_remove("RUST_LOG");
        // A test run inside another job must not join it.
        for key in [
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            command.env_remove(key);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("burnrun starts");
        let (stdout, stderr) = (Captured::default(), Captured::default());
        let readers = vec![
            stdout.collect(child.stdout.take().expect("stdout is piped")),
            stderr.collect(child.stderr.take().expect("stderr is piped")),
        ];
        Job {
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }

    /// The launcher's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was started ([`Finished::elapsed`] counts from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What it printed so far, both streams.
    pub fn output_so_far(&self) -> String {
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.text(),
            self.stderr.text()
        )
    }

    /// Waits until its output contains `needle`; panics (and the drop kills the job) past `within`
    /// or if it exits first.
    pub fn wait_for_output(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.stdout.text().contains(needle) || self.stderr.text().contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "burnrun exited ({status}) before printing {needle:?}\n{}",
                    self.output_so_far()
                );
            }
            assert!(
                Instant::now() < deadline,
                "burnrun did not print {needle:?} within {within:?}\n{}",
                self.output_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; kills the job and panics past `within` (a hang is a bug).
    pub fn wait(mut self, within: Duration) -> Finished {
        let deadline = self.started + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("burnrun did not exit within {within:?}\n{}", self.output_so_far());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        // The pipes close when the launcher and its ranks are gone: the readers then have it all.
        // A rank outliving its launcher would keep them open: wait for that only a little.
        let drained_by = Instant::now() + PIPE_DRAIN;
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < drained_by {
            std::thread::sleep(Duration::from_millis(10));
        }
        Finished {
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
            elapsed,
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `burnrun ARGS` to its end under [`JOB_DEADLINE`].
pub fn burnrun<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Finished {
    Job::start(args).wait(JOB_DEADLINE)
}

/// The command line of `burnrun --nproc-per-node N train CONFIG --set train.out_dir=OUT --set ...`:
/// always through the launcher, even for one rank.
pub fn train_args(nproc: usize, config: &Path, out: &Path, sets: &[String]) -> Vec<String> {
    let mut args = vec![
        "--nproc-per-node".to_string(),
        nproc.to_string(),
        "train".to_string(),
        config.display().to_string(),
        "--set".to_string(),
        format!("train.out_dir={}", out.display()),
    ];
    for set in sets {
        args.push("--set".to_string());
        args.push(set.clone());
    }
    args
}

/// Trains to the end and panics, with the job's output, unless it succeeded.
pub fn train(nproc: usize, config: &Path, out: &Path, sets: &[String]) -> Finished {
    let finished = burnrun(&train_args(nproc, config, out, sets));
    finished.assert_success(&format!("training with {nproc} rank(s) into {}", out.display()));
    finished
}

/// `--set` arguments from `key=value` literals.
pub fn sets(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Parameters by module path.
pub type Params = HashMap<String, checkpoint::LoadedTensor>;

/// The parameters of the checkpoint at `step` under `out` (every stage's file together).
pub fn params_at(out: &Path, step: u64) -> Params {
    let dir = checkpoint::step_dir(&out.join("checkpoints"), step);
    assert!(
        dir.join("state.json").is_file(),
        "no complete checkpoint at {}",
        dir.display()
    );
    checkpoint::read_params(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
}

/// The parameters of the latest complete checkpoint under `out`.
pub fn final_params(out: &Path) -> Params {
    let dir = checkpoint::latest(&out.join("checkpoints")).unwrap_or_else(|e| panic!("{e}"));
    checkpoint::read_params(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
}

/// The largest absolute difference between two parameter sets and the parameter where it is;
/// panics if they do not hold the same names and shapes.
pub fn max_abs_diff(a: &Params, b: &Params) -> (f32, String) {
    let mut names_a: Vec<&String> = a.keys().collect();
    let mut names_b: Vec<&String> = b.keys().collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "the two runs hold different parameters");
    assert!(!a.is_empty(), "no parameters to compare");
    let mut worst = (0.0f32, String::new());
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.shape, tb.shape, "parameter {name} has different shapes");
        for (x, y) in ta.data.iter().zip(&tb.data) {
            let d = (x - y).abs();
            assert!(d.is_finite(), "parameter {name} is not finite: {x} vs {y}");
            if d > worst.0 {
                worst = (d, name.clone());
            }
        }
    }
    worst
}

/// Asserts that two parameter sets agree within `tol` (absolute, per element).
pub fn assert_params_close(a: &Params, b: &Params, tol: f32, what: &str) {
    let (diff, name) = max_abs_diff(a, b);
    if diff == 0.0 {
        eprintln!("{what}: identical bit for bit");
    } else {
        eprintln!("{what}: max |difference| = {diff:e} (at {name}), tolerance {tol:e}");
    }
    assert!(
        diff <= tol,
        "{what}: parameters differ by {diff:e} at {name}, more than {tol:e}"
    );
}

/// The lines of `<out>/metrics.jsonl`, parsed.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad JSON line {l:?}: {e}", path.display())))
        .collect()
}

/// Trains `configs/<config_name>` with `overrides` on `ranks` ranks inside this process (threads,
/// each on the world group `spawn_ranks` gives, over real sockets), with `options`; panics, naming
/// the rank, unless every rank trained `steps` steps.
pub fn train_in_process(
    ranks: usize,
    config_name: &str,
    overrides: &[String],
    options: &burnrun::train::TrainOptions,
    steps: u64,
) {
    let init = burnrun::comm::InitOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let results = burnrun::comm::spawn_ranks(ranks, &init, |pg| {
        let cfg = burnrun::config::RunConfig::load(config(config_name), overrides).expect("config");
        burnrun::train::train_on(pg, cfg, options).map(|s| s.steps)
    })
    .expect("ranks join");
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(
            result.unwrap_or_else(|e| panic!("rank {rank}: {e}")),
            steps,
            "rank {rank}"
        );
    }
}
