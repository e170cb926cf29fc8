//! A real two-node job on one machine: `launch/netns.sh` puts each node's launcher in its own
//! network namespace, joined by a veth pair, so the store and the data between nodes cross a
//! network interface as between two hosts, while the ranks inside a node share memory. Needs root
//! and `ip` (iproute2, which `.ci/run` installs); the test says it is skipped otherwise.

use std::process::Command;

/// Whether this process may create network namespaces (tries one and removes it).
fn can_make_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    let name = format!("burnrun-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
    made
}

#[test]
fn a_job_across_two_network_namespaces_uses_tcp_between_nodes_and_shared_memory_inside() {
    if !can_make_namespaces() {
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return;
    }
    let out = Command::new("timeout")
        .args(["--kill-after=10", "120", "launch/netns.sh", "bench", "allreduce"])
        .args(["--min-bytes", "4K", "--max-bytes", "4M", "--step-factor", "32"])
        .args(["--iters", "5", "--warmup", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BURNRUN", env!("CARGO_BIN_EXE_burnrun"))
        .env("NPROC", "2")
        .output()
        .expect("run launch/netns.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the two-node job failed ({:?}):\n{all}",
        out.status
    );
    // Rank 0 (node 0) shares memory with rank 1 and reaches node 1's ranks 2 and 3 over TCP.
    assert!(
        stdout.contains("4 rank(s)") && stdout.contains("rank 0 links: shared memory to 1 peer(s), TCP to 2 peer(s)"),
        "the header names 4 ranks and rank 0's links:\n{all}"
    );
    // Table rows: size count type redop root time algbw busbw #wrong.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| {
            l.split_once("]: ")
                .map_or(l, |(_, rest)| rest)
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .filter(|cols| cols.len() == 9 && cols[0].parse::<u64>().is_ok())
        .collect();
    let sizes: Vec<&str> = rows.iter().map(|cols| cols[0]).collect();
    assert_eq!(sizes, ["4096", "131072", "4194304"], "rows:\n{all}");
    for cols in &rows {
        assert_eq!(cols[8], "0", "wrong results at {} bytes:\n{all}", cols[0]);
    }
}
