//! `burnrun bench <op>` through the real binary and launcher: every operation runs on two ranks,
//! prints one valid JSON line per size, and checks clean.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Long enough for two ranks to start, rendezvous and time five small sizes on a loaded machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the binary with `args`, killing it if it outlives [`RUN_TIMEOUT`].
fn burnrun(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burnrun"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start burnrun");
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for burnrun") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("burnrun {args:?} did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// The JSON objects of the output, one a line: every line of stdout must be one, as `jq` wants
/// (no launcher prefix, no control line).
fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|json| serde_json::from_str(json).unwrap_or_else(|e| panic!("invalid JSON line {json:?}: {e}")))
        .collect()
}

#[test]
fn every_operation_runs_on_two_ranks_and_prints_clean_json_lines() {
    for op in [
        "allreduce",
        "allgather",
        "reducescatter",
        "broadcast",
        "alltoall",
        "sendrecv",
    ] {
        let args = [
            "--nproc-per-node",
            "2",
            "bench",
            op,
            "--min-bytes",
            "4K",
            "--max-bytes",
            "64K",
            "--iters",
            "3",
            "--json",
        ];
        let out = burnrun(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "burnrun {args:?} failed ({}):\n{stderr}",
            out.status
        );
        let rows = json_lines(&out.stdout);
        let sizes: Vec<u64> = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).collect();
        assert_eq!(sizes, [4096, 8192, 16384, 32768, 65536], "{op}: {rows:?}");
        for row in &rows {
            assert_eq!(row["op"], op, "{row}");
            assert_eq!(row["dtype"], "f32", "{row}");
            assert_eq!(row["ranks"], 2, "{row}");
            assert_eq!(row["wrong"], 0, "{row}");
            for key in ["time_us", "algbw_gbps", "busbw_gbps"] {
                assert!(row[key].as_f64().is_some_and(|v| v >= 0.0), "{op}: {key} in {row}");
            }
            assert!(row["time_us"].as_f64().unwrap() > 0.0, "{row}");
        }
    }
}

#[test]
fn the_table_names_its_columns_and_a_single_rank_runs_without_a_launcher() {
    let out = burnrun(&[
        "bench",
        "allreduce",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "4K",
        "--iters",
        "2",
        "--dtype",
        "bf16",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "bench allreduce",
        "size(B)",
        "count",
        "type",
        "redop",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "#wrong",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    assert_eq!(stdout.lines().filter(|l| l.contains(" bf16 ")).count(), 3, "{stdout}");
}

#[test]
fn bad_options_fail_with_a_message_naming_them() {
    let out = burnrun(&["bench", "sendrecv", "--max-bytes", "4K", "--iters", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 2 ranks"), "{stderr}");
    let out = burnrun(&["bench", "allreduce", "--min-bytes", "4Q"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("4Q"));
}

#[test]
fn the_help_of_no_check_says_it_skips_the_check() {
    let out = burnrun(&["bench", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let start = help
        .find("--no-check")
        .unwrap_or_else(|| panic!("no --no-check in:\n{help}"));
    let entry: String = help[start..].lines().take(3).collect::<Vec<_>>().join(" ");
    assert!(entry.contains("Skip checking"), "{entry}");
    assert!(!entry.contains("Check results (on by default"), "{entry}");
}

#[test]
fn a_bad_size_range_is_refused_by_the_launcher_before_any_rank_starts() {
    let started = Instant::now();
    let out = burnrun(&[
        "--nproc-per-node",
        "2",
        "bench",
        "allreduce",
        "--min-bytes",
        "8K",
        "--max-bytes",
        "4K",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--min-bytes 8192 is above --max-bytes 4096"),
        "{stderr}"
    );
    // No rank, no store: neither the launcher's start line nor a rank's prefix nor a store warning.
    for absent in ["[rank", "burnrun: run ", "WARN"] {
        assert!(!stderr.contains(absent), "{absent:?} in:\n{stderr}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn json_lines_reach_the_launchers_stdout_unprefixed_so_every_line_parses() {
    let out = burnrun(&[
        "--nproc-per-node",
        "2",
        "bench",
        "allreduce",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "4K",
        "--iters",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("[rank") && !stdout.contains('\u{1e}'), "{stdout:?}");
    let rows = json_lines(&out.stdout);
    assert_eq!(rows.len(), 3, "{stdout}");
    assert!(!stderr.contains('\u{1e}'), "a control line leaked: {stderr:?}");
}

/// `bench --device cuda` must end quickly with the reason where it cannot run: no NCCL in this
/// build, or no CUDA driver or device on this machine.
const NO_GPU_DEADLINE: Duration = Duration::from_secs(30);

/// What `--device cuda` must say on a machine without a GPU: the build's missing feature, or the
/// missing driver or device.
fn assert_names_why_cuda_cannot_run(stderr: &str) {
    if cfg!(feature = "nccl") {
        assert!(
            stderr.contains("--device cuda")
                && stderr.contains("CUDA")
                && ["libcuda.so", "device", "NCCL not found"]
                    .iter()
                    .any(|why| stderr.contains(why)),
            "{stderr}"
        );
    } else {
        assert!(
            stderr.contains("built without NCCL") && stderr.contains("--features nccl"),
            "{stderr}"
        );
    }
}

#[test]
fn the_cuda_benchmark_without_a_gpu_fails_at_once_naming_the_reason() {
    let started = Instant::now();
    let out = burnrun(&[
        "bench",
        "allreduce",
        "--device",
        "cuda",
        "--max-bytes",
        "8K",
        "--iters",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // A GPU (and a build with NCCL): the benchmark ran for real; its rows must be clean.
        let rows = json_lines(&out.stdout);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|r| r["wrong"] == 0), "{rows:?}");
        eprintln!("GPU: bench --device cuda ran: {rows:?}");
        return;
    }
    assert_names_why_cuda_cannot_run(&stderr);
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() < NO_GPU_DEADLINE, "took {:?}", started.elapsed());
}

#[test]
fn the_cuda_benchmark_on_two_ranks_without_a_gpu_fails_through_the_launcher_naming_the_reason() {
    let started = Instant::now();
    let out = burnrun(&[
        "--nproc-per-node",
        "2",
        "bench",
        "allreduce",
        "--device",
        "cuda",
        "--max-bytes",
        "8K",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("two GPUs: bench --device cuda ran on 2 ranks");
        return;
    }
    assert_names_why_cuda_cannot_run(&stderr);
    if !cfg!(feature = "nccl") {
        // Refused by the launcher itself: no rank started.
        assert!(!stderr.contains("[rank"), "{stderr}");
    }
    assert!(started.elapsed() < NO_GPU_DEADLINE, "took {:?}", started.elapsed());
}
