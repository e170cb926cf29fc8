//! Training progress through the real binary: never silent, one bar on a terminal (drawn by the
//! launcher from rank 0's control lines), plain lines in pipes and `--log-dir` files.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{burnrun, config, out_dir, sets, train_args};

/// Thirty steps logged every ten: three step lines and the final line.
const STEPS: &str = "train.steps=30";
const CONTROL_BYTE: char = '\u{1e}';

#[test]
fn a_progress_bar_under_the_launcher_with_stderr_piped_becomes_plain_step_lines_also_in_the_log_dir() {
    let out = out_dir("progress-bar-piped");
    let logs = out.join("logs");
    let mut args = vec!["--log-dir".to_string(), logs.display().to_string()];
    args.extend(train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["log.progress=bar", STEPS]),
    ));
    let finished = burnrun(&args);
    finished.assert_success("training with progress = bar under the launcher");
    let stderr = &finished.stderr;
    for step in ["10/30", "20/30", "30/30"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("[rank0]: step") && l.contains(step) && l.contains("loss")),
            "no plain line for step {step}:\n{}",
            finished.output()
        );
    }
    assert!(
        stderr.contains("[rank0]: burnrun: trained 30 steps"),
        "{}",
        finished.output()
    );
    assert!(
        !stderr.contains(CONTROL_BYTE) && !finished.stdout.contains(CONTROL_BYTE),
        "{stderr:?}"
    );
    let file = std::fs::read_to_string(logs.join("rank_0.stderr")).unwrap();
    assert!(
        file.lines().any(|l| l.starts_with("step") && l.contains("30/30")),
        "{file}"
    );
    assert!(file.contains("burnrun: trained 30 steps"), "{file}");
    assert!(!file.contains(CONTROL_BYTE), "{file:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_progress_bar_without_a_launcher_or_terminal_prints_plain_lines_and_the_final_line() {
    let out = out_dir("progress-bar-single");
    let out_set = format!("train.out_dir={}", out.display());
    let config = config("mlp_synthetic.toml");
    let args = [
        "train",
        config.to_str().unwrap(),
        "--set",
        &out_set,
        "--set",
        "log.progress=bar",
        "--set",
        STEPS,
    ];
    let finished = burnrun(&args);
    finished.assert_success("training alone with progress = bar");
    assert!(
        finished
            .stderr
            .lines()
            .any(|l| l.starts_with("step") && l.contains("30/30")),
        "{}",
        finished.output()
    );
    assert!(
        finished.stderr.contains("burnrun: trained 30 steps"),
        "{}",
        finished.output()
    );
    assert!(!finished.stderr.contains(CONTROL_BYTE), "{:?}", finished.stderr);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn progress_off_under_the_launcher_prints_neither_steps_nor_the_final_line() {
    let out = out_dir("progress-off");
    let finished = burnrun(&train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["log.progress=off", STEPS]),
    ));
    finished.assert_success("training with progress = off");
    assert!(!finished.stderr.contains("step "), "{}", finished.output());
    assert!(!finished.stderr.contains("trained 30 steps"), "{}", finished.output());
    let _ = std::fs::remove_dir_all(&out);
}

/// Runs `command` on a pseudo-terminal through util-linux's `script`, which copies what the
/// terminal shows to its stdout; `None` when `script` is not installed.
fn on_a_terminal(command: &str, within: Duration) -> Option<String> {
    let mut child = Command::new("script")
        .args(["-qefc", command, "/dev/null"])
        .current_dir(common::repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("BURNRUN_SECRET")
        .env_remove("RUST_LOG")
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut bytes);
        bytes
    });
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait().ok()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bytes = reader.join().ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[test]
fn on_a_terminal_the_launcher_draws_one_bar_from_rank_0s_progress_and_no_control_line_leaks() {
    let out = out_dir("progress-bar-terminal");
    let args = train_args(
        2,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["log.progress=bar", STEPS]),
    );
    let command = format!("{} {}", env!("CARGO_BIN_EXE_burnrun"), args.join(" "));
    let Some(screen) = on_a_terminal(&command, common::JOB_DEADLINE) else {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    };
    // The bar's own text: position and length, from the launcher's template.
    assert!(screen.contains("30/30 steps"), "no bar on the terminal:\n{screen}");
    assert!(screen.contains("[rank0]: burnrun: trained 30 steps"), "{screen}");
    assert!(
        !screen.contains(CONTROL_BYTE),
        "a control line reached the terminal:\n{screen:?}"
    );
    assert!(!screen.contains("burnrun:{"), "{screen:?}");
    let _ = std::fs::remove_dir_all(&out);
}
