//! Network faults between nodes (issue 12, part 5): two or three "nodes", each a launcher in its
//! own network namespace, joined through a bridge by veth links (`net.rs`), train the embedded MLP
//! while the links are delayed, lossy, or cut (`ip link set down`) mid-training. Nothing may hang
//! past its deadline: every launcher is waited for under a bound derived from the configured
//! deadlines, and every case ends with the right report, or a restart where one is allowed.
//!
//! Delay and loss use `tc netem` where the kernel has it; this machine's kernel (and CI's) has no
//! `sch_netem`, so iptables stands in: `-m statistic` drops, and NFQUEUE hands the packets to a
//! thread that releases each after the delay (`nfqueue.rs`). The method used is printed. Needs root
//! and iproute2 (and iptables without netem), which `.ci/run` installs; a test says it is skipped
//! otherwise.
//!
//! The link cuts land at a known step: `BURNRUN_FAULT` makes every rank sleep before step
//! [`CUT_STEP`], and the test cuts the link as soon as node 0 prints that sleep.

#[path = "../common/mod.rs"]
mod common;
mod net;
mod nfqueue;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_params_close, config, final_params, sets, Finished, Job, Params};
use net::Net;

/// Training steps of every run (checkpoints every 5).
const STEPS: u64 = 40;
/// The lossy link's run is longer: about 6 packets cross the link per step, so at 2% some
/// hundreds of packets make a run in which none is dropped unlikely (e^-24).
const LOSS_STEPS: u64 = 200;
/// Node 0's store port; each namespace has its own ports, so tests running at once never collide.
const PORT: &str = "29500";
/// The collectives' deadline (`comm.timeout_secs`) where no fault is meant to reach it.
const EASY_TIMEOUT_SECS: u64 = 60;
/// The collectives' deadline in the link-cut cases.
const CUT_TIMEOUT_SECS: u64 = 5;
/// The restart case's deadline: the job must fail, and the link be back, well before the store's
/// I/O margin runs out on node 1 (see that case).
const RESTART_TIMEOUT_SECS: u64 = 2;
/// Every rank sleeps this long before step [`CUT_STEP`]: the window in which the test cuts the link.
const CUT_WINDOW: Duration = Duration::from_secs(2);
/// The step before which the link is cut (checkpoints at 5 and 10 are written by then).
const CUT_STEP: u64 = 10;
/// A store call waits this long for node 0's answer beyond its own timeout (the store client's
/// I/O margin): a node cut off from node 0 finds the store gone after it.
const STORE_IO_MARGIN: Duration = Duration::from_secs(10);
/// How long node 0 keeps its store up after a failure for nodes that did not report their end:
/// the grace period (5 s), the wait after SIGKILL (5 s) and the store's linger (5 s).
const NODE0_LINGER: Duration = Duration::from_secs(15);
/// Room for this loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(20);
/// A whole run without a cut, delays and losses included (a few seconds of training).
const RUN_BOUND: Duration = Duration::from_secs(120);
/// Delay of each direction of the delayed link.
const DELAY: Duration = Duration::from_millis(20);
/// Share of the packets dropped, each direction, on the lossy link.
const LOSS_PERCENT: f64 = 2.0;
/// The final parameters of a run over delayed or lossy links (or restarted after a cut) equal an
/// undisturbed run's: the network changes when the bytes arrive, never which bytes.
const SAME_PARAMS: f32 = 0.0;

/// The MLP of every run, small enough to train in about a second; `timeout_secs` does not change
/// the arithmetic.
fn mlp(steps: u64, timeout_secs: u64) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32]",
        "train.batch_size=16",
        "train.threads=1",
        "checkpoint.every_steps=5",
        "log.progress=plain",
        "log.every_steps=5",
    ]);
    out.push(format!("train.steps={steps}"));
    out.push(format!("comm.timeout_secs={timeout_secs}"));
    out
}

/// `BURNRUN_FAULT` for the cut cases: every rank sleeps through the window before [`CUT_STEP`].
fn cut_window_fault() -> String {
    format!("sleep,step={CUT_STEP},secs={}", CUT_WINDOW.as_secs())
}

/// What node 0 prints when its rank 0 starts the sleep: the moment to cut.
const WINDOW_OPEN: &str = "burnrun fault injection: Sleep(";

/// An undisturbed run of the same job (2 ranks on one host) for `steps` ([`STEPS`] or
/// [`LOSS_STEPS`]): its final parameters and loss, computed once for all tests.
fn reference(steps: u64) -> &'static (Params, String) {
    static SHORT: OnceLock<(Params, String)> = OnceLock::new();
    static LONG: OnceLock<(Params, String)> = OnceLock::new();
    let cell = if steps == STEPS { &SHORT } else { &LONG };
    cell.get_or_init(|| {
        let out = common::out_dir(&format!("netem-reference-{steps}"));
        let finished = common::train(2, &config("mlp_synthetic.toml"), &out, &mlp(steps, EASY_TIMEOUT_SECS));
        let params = final_params(&out);
        let loss = final_loss(&finished);
        let _ = std::fs::remove_dir_all(&out);
        (params, loss)
    })
}

/// The final loss rank 0 printed: `trained 40 steps: loss 2.3568 -> 2.1067, ...`.
fn final_loss(finished: &Finished) -> String {
    let all = finished.output();
    let line = all
        .lines()
        .find(|l| l.contains("burnrun: trained "))
        .unwrap_or_else(|| panic!("no `trained` line:\n{all}"));
    let after = line.split_once("-> ").map_or("", |(_, rest)| rest);
    after.split(',').next().unwrap_or_default().to_owned()
}

/// Milliseconds of communication per step in rank 0's last step line: `... (compute 0.2, comm 41.0)`.
fn last_comm_ms(finished: &Finished) -> f64 {
    let all = finished.output();
    all.lines()
        .rev()
        .find_map(|l| l.rsplit_once("comm ")?.1.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("no step line with the communication time:\n{all}"))
}

/// One test's nodes, secret and output folder (removed on drop, after the jobs it started).
struct Cluster {
    net: Net,
    nodes: usize,
    dir: PathBuf,
}

impl Cluster {
    /// `None` (and a line saying so) where network namespaces cannot be made.
    fn new(case: &str, subnet: u8, nodes: usize) -> Option<Self> {
        if !net::can_make_namespaces() {
            eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
            return None;
        }
        let net = Net::new(subnet, nodes).unwrap_or_else(|e| panic!("setting up {nodes} namespaces: {e}"));
        let dir = common::out_dir(&format!("netem-{case}"));
        let key = dir.join("job.key");
        std::fs::write(&key, "5a".repeat(32)).expect("write the job secret");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod 600 the secret");
        Some(Cluster { net, nodes, dir })
    }

    /// Where rank 0 writes checkpoints (the same path on every node: same command line).
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// Starts node `node`'s launcher in its namespace: one rank, `launch` options, the MLP of
    /// [`STEPS`] steps.
    fn start(&self, node: usize, launch: &[&str], timeout_secs: u64, env: &[(&str, &str)]) -> Job {
        self.start_steps(node, launch, STEPS, timeout_secs, env)
    }

    /// [`Cluster::start`] for `steps` steps.
    fn start_steps(&self, node: usize, launch: &[&str], steps: u64, timeout_secs: u64, env: &[(&str, &str)]) -> Job {
        let mut args: Vec<String> = vec![
            "--nnodes".into(),
            self.nodes.to_string(),
            "--node-rank".into(),
            node.to_string(),
            "--master-addr".into(),
            self.net.addr(0),
            "--master-port".into(),
            PORT.into(),
            "--secret-file".into(),
            self.dir.join("job.key").display().to_string(),
        ];
        args.extend(launch.iter().map(|s| s.to_string()));
        args.extend(common::train_args(
            1,
            &config("mlp_synthetic.toml"),
            &self.out(),
            &mlp(steps, timeout_secs),
        ));
        Job::start_wrapped(&self.net.exec(node), &args, env)
    }

    /// Every node's launcher with the same options and environment.
    fn start_all(&self, launch: &[&str], timeout_secs: u64, env: &[(&str, &str)]) -> Vec<Job> {
        (0..self.nodes)
            .map(|node| self.start(node, launch, timeout_secs, env))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for every job under `bound`, all at once (each exit is seen when it happens); also
/// returns when each ended, measured from `since`.
fn wait_all(jobs: Vec<Job>, bound: Duration, since: Instant) -> Vec<(Finished, Duration)> {
    std::thread::scope(|scope| {
        let waiting: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                scope.spawn(move || {
                    let started = job.started();
                    let finished = job.wait(bound);
                    let ended = (started + finished.elapsed).saturating_duration_since(since);
                    (finished, ended)
                })
            })
            .collect();
        // A job past its bound panics in its thread: the test fails with that message.
        waiting
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

#[test]
fn a_20ms_delay_each_way_slows_the_steps_but_the_job_ends_at_the_undisturbed_parameters() {
    let Some(mut cluster) = Cluster::new("delay", 201, 2) else {
        return;
    };
    let method = match cluster.net.delay(1, DELAY) {
        Ok(Some(method)) => method,
        Ok(None) => {
            eprintln!("skipped: no sch_netem in this kernel and no iptables for the stand-in");
            return;
        }
        Err(e) => panic!("delaying the link: {e}"),
    };
    let start = Instant::now();
    let ended = wait_all(cluster.start_all(&[], EASY_TIMEOUT_SECS, &[]), RUN_BOUND, start);
    for (finished, _) in &ended {
        finished.assert_success("training over a delayed link");
    }
    let node0 = &ended[0].0;
    let (params, loss) = reference(STEPS);
    assert_params_close(
        &final_params(&cluster.out()),
        params,
        SAME_PARAMS,
        "delayed link vs undisturbed",
    );
    assert_eq!(&final_loss(node0), loss, "{}", node0.output());
    // The delay was there: each step's all-reduce waits for the other node's bytes, sent at about
    // the same time, one delay away (half of it allows for the ranks drifting apart).
    let comm_ms = last_comm_ms(node0);
    assert!(
        comm_ms >= DELAY.as_millis() as f64 / 2.0,
        "comm {comm_ms} ms per step over a {DELAY:?} link\n{}",
        node0.output()
    );
    eprintln!(
        "delay {DELAY:?} each way ({method:?}): job done in {:.1} s, comm {comm_ms} ms per step, \
         final loss {loss} as undisturbed",
        ended[0].1.as_secs_f64()
    );
}

#[test]
fn a_link_dropping_2_percent_of_packets_each_way_still_trains_to_the_same_parameters() {
    let Some(cluster) = Cluster::new("loss", 202, 2) else {
        return;
    };
    let Some(method) = lossy(&cluster.net, LOSS_PERCENT) else {
        return;
    };
    let start = Instant::now();
    let jobs = (0..2)
        .map(|node| cluster.start_steps(node, &[], LOSS_STEPS, EASY_TIMEOUT_SECS, &[]))
        .collect();
    let ended = wait_all(jobs, RUN_BOUND, start);
    for (finished, _) in &ended {
        finished.assert_success("training over a lossy link");
    }
    let (params, loss) = reference(LOSS_STEPS);
    assert_params_close(
        &final_params(&cluster.out()),
        params,
        SAME_PARAMS,
        "lossy link vs undisturbed",
    );
    assert_eq!(&final_loss(&ended[0].0), loss, "{}", ended[0].0.output());
    // The loss was there: packets were dropped, and TCP sent them again.
    let dropped = cluster.net.dropped_packets(1);
    assert!(dropped.is_some_and(|n| n > 0), "dropped: {dropped:?}");
    eprintln!(
        "loss {LOSS_PERCENT}% each way ({method:?}): job done in {:.1} s, {} packet(s) dropped, \
         final loss {loss} as undisturbed",
        ended[0].1.as_secs_f64(),
        dropped.unwrap_or_default()
    );
}

/// Makes node 1's link drop `percent` of its packets each way; `None` (and a line saying the
/// test is skipped) where neither netem nor its iptables stand-in exists.
fn lossy(net: &Net, percent: f64) -> Option<net::Method> {
    match net.loss(1, percent) {
        Ok(Some(method)) => Some(method),
        Ok(None) => {
            eprintln!("skipped: no sch_netem in this kernel and no iptables for the stand-in");
            None
        }
        Err(e) => panic!("making the link lossy: {e}"),
    }
}

/// The shaped lossy link of the collectives case: slow enough that the large sizes queue in the
/// token bucket, lossy enough that TCP retransmits in every size.
const SHAPED_RATE: &str = "200mbit";
/// Share of the packets the shaped link drops, each way.
const SHAPED_LOSS_PERCENT: f64 = 1.0;
/// The shaped case's collective deadline: far above what a retransmission costs (200 ms and up),
/// so a result that comes late is a failure of the test, not of a slow link.
const SHAPED_TIMEOUT_SECS: &str = "30";

#[test]
fn two_nodes_of_two_ranks_on_a_shaped_lossy_link_get_exact_all_reduce_results_within_the_deadline() {
    // Two ranks a node: the all-reduce goes hierarchical (shared memory inside a node, the link
    // between the shard owners), small sizes by recursive doubling; `bench` checks every size's
    // result against the exact sum and exits 1 on a wrong element.
    let Some(cluster) = Cluster::new("shaped", 206, 2) else {
        return;
    };
    cluster.net.rate(1, SHAPED_RATE).expect("shaping the link");
    let Some(method) = lossy(&cluster.net, SHAPED_LOSS_PERCENT) else {
        return;
    };
    let start = Instant::now();
    let jobs: Vec<Job> = (0..2)
        .map(|node| {
            let args = [
                "--nnodes",
                "2",
                "--node-rank",
                &node.to_string(),
                "--nproc-per-node",
                "2",
                "--master-addr",
                &cluster.net.addr(0),
                "--master-port",
                PORT,
                "--secret-file",
                &cluster.dir.join("job.key").display().to_string(),
                "bench",
                "allreduce",
                "--min-bytes",
                "4",
                "--max-bytes",
                "8M",
                "--step-factor",
                "8",
                "--iters",
                "5",
                "--warmup",
                "1",
                "--json",
            ]
            .map(str::to_owned);
            Job::start_wrapped(
                &cluster.net.exec(node),
                &args,
                &[("BURNRUN_TIMEOUT_SECS", SHAPED_TIMEOUT_SECS)],
            )
        })
        .collect();
    let ended = wait_all(jobs, RUN_BOUND, start);
    for (finished, _) in &ended {
        finished.assert_success("all-reduce over a shaped lossy link");
    }
    let out = ended[0].0.output();
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("\"busbw_gbps\"")).collect();
    // 4 B to 8 MiB by 8: 8 sizes, each checked (`"wrong":0`).
    assert_eq!(rows.len(), 8, "{out}");
    assert!(rows.iter().all(|r| r.contains("\"wrong\":0")), "{out}");
    let dropped = cluster.net.dropped_packets(1);
    assert!(dropped.is_some_and(|n| n > 0), "dropped: {dropped:?}");
    eprintln!(
        "{SHAPED_RATE}, loss {SHAPED_LOSS_PERCENT}% each way ({method:?}): 8 sizes checked in {:.1} s, \
         {} packet(s) dropped",
        ended[0].1.as_secs_f64(),
        dropped.unwrap_or_default()
    );
}

#[test]
fn a_link_cut_mid_training_ends_both_nodes_within_the_deadlines_and_node_0_names_the_rank_cut_off() {
    let Some(cluster) = Cluster::new("cut", 203, 2) else {
        return;
    };
    let fault = cut_window_fault();
    let mut jobs = cluster.start_all(&[], CUT_TIMEOUT_SECS, &[("BURNRUN_FAULT", &fault)]);
    jobs[0].wait_for_output(WINDOW_OPEN, RUN_BOUND);
    cluster.net.set_link(1, false).expect("cut node 1's link");
    let cut = Instant::now();
    // Node 0: its rank times out after the window and the deadline, then it keeps the store up
    // for node 1, which never reports. Node 1: its launcher's store call goes unanswered.
    let timeout = Duration::from_secs(CUT_TIMEOUT_SECS);
    let bound = CUT_WINDOW + timeout + NODE0_LINGER + SLACK;
    let ended = wait_all(jobs, bound, cut);
    let ((node0, at0), (node1, at1)) = (&ended[0], &ended[1]);
    let hint = format!("(was the link cut within the {CUT_WINDOW:?} the ranks slept?)");
    assert_eq!(node0.status.code(), Some(1), "{hint}\n{}", node0.output());
    assert_eq!(node1.status.code(), Some(1), "{hint}\n{}", node1.output());
    let stderr = &node0.stderr;
    assert!(blames(stderr, 1, 0), "{}", node0.output());
    assert!(
        stderr.contains(&format!("timed out after {CUT_TIMEOUT_SECS}s waiting for peer 1")),
        "{}",
        node0.output()
    );
    assert!(
        stderr.contains("node(s) [1] did not report their end; closing the store"),
        "{}",
        node0.output()
    );
    // The flight verdict says rank 0's call failed and that node 1's records never came.
    assert!(
        stderr.contains("flight recorder: rank(s) 0 failed in all_reduce #")
            && stderr.contains("no record from rank(s) 1 (their node did not publish it)"),
        "{}",
        node0.output()
    );
    assert!(
        node1
            .stderr
            .contains(&format!("lost node 0's store at {}:{PORT}", cluster.net.addr(0))),
        "{}",
        node1.output()
    );
    // Node 1 ends once its store call has waited out its margin (started right after the cut).
    assert!(
        *at1 < STORE_IO_MARGIN + SLACK,
        "node 1 ended {at1:?} after the cut\n{}",
        node1.output()
    );
    eprintln!(
        "link cut at step {CUT_STEP}, deadline {timeout:?}, ranks asleep {CUT_WINDOW:?} after the cut: node 0 \
         exited after {:.1} s, node 1 after {:.1} s",
        at0.as_secs_f64(),
        at1.as_secs_f64()
    );
}

/// The link is back as soon as node 0's rank has timed out, about 4 s after the cut: before the
/// node-silence limit (10 s), so the outcome does not hang on a race with it. Node 1's launcher
/// sent a store request just after the cut and waits for its answer for up to
/// [`STORE_IO_MARGIN`]; its kernel retries a send that fails on the downed interface every half
/// second, so the request goes through as soon as the link is back, the launcher learns of the
/// failure and joins the restart. A cut longer than the margin leaves node 1's launcher without a
/// store: it stops, and the job needs it started again (see the README); the cut case shows that.
#[test]
fn a_link_cut_then_restored_restarts_the_job_which_resumes_from_its_checkpoint_and_finishes() {
    let Some(cluster) = Cluster::new("restore", 204, 2) else {
        return;
    };
    let fault = cut_window_fault();
    let mut jobs = cluster.start_all(
        &["--max-restarts", "1"],
        RESTART_TIMEOUT_SECS,
        &[("BURNRUN_FAULT", &fault)],
    );
    jobs[0].wait_for_output(WINDOW_OPEN, RUN_BOUND);
    cluster.net.set_link(1, false).expect("cut node 1's link");
    let cut = Instant::now();
    jobs[0].wait_for_output("timed out after", CUT_WINDOW + STORE_IO_MARGIN + SLACK);
    cluster.net.set_link(1, true).expect("restore node 1's link");
    let restored = cut.elapsed();
    let ended = wait_all(jobs, RUN_BOUND, cut);
    for (finished, _) in &ended {
        finished.assert_success("a job restarted after a link cut");
    }
    let node0 = &ended[0].0;
    for (finished, _) in &ended {
        assert!(
            finished.stderr.contains("restarting the job: restart 1 of 1"),
            "{}",
            finished.output()
        );
    }
    let all = node0.output();
    assert!(
        all.contains(&format!("trained {STEPS} steps (resumed at step {CUT_STEP})")),
        "{all}"
    );
    assert!(blames(&node0.stderr, 1, 0), "{all}");
    let (params, loss) = reference(STEPS);
    assert_params_close(
        &final_params(&cluster.out()),
        params,
        SAME_PARAMS,
        "restarted after a link cut vs undisturbed",
    );
    eprintln!(
        "link cut at step {CUT_STEP} for {:.1} s, deadline {RESTART_TIMEOUT_SECS} s: job restarted and done {:.1} s \
         after the cut, final loss {loss} as undisturbed",
        restored.as_secs_f64(),
        ended[0].1.as_secs_f64()
    );
}

/// Each node sees only its own rank's failure. Here rank 1 waits for rank 2 and rank 0 for rank 1,
/// so the order of their timeouts decides what each node reports; rank 0 sleeps a second longer
/// to fix it: rank 1 times out first, and rank 0 then loses rank 1 (a consequence). When the two
/// time out within milliseconds, node 0 first blames rank 1 and node 1's report moves the blame to
/// rank 2 (`Failure::instead_of`, unit-tested). When rank 0 times out first, node 1 is stopped
/// before its rank fails, and the summary blames rank 1 (a known limit; the flight verdict's "no
/// record from rank(s) 2" and "node(s) [2] did not report" still point at node 2).
#[test]
fn with_three_nodes_a_node_cut_off_is_named_by_the_other_two_as_the_rank_they_waited_for() {
    let Some(cluster) = Cluster::new("three", 205, 3) else {
        return;
    };
    let fault = format!("{};sleep,rank=0,step={CUT_STEP},secs=1", cut_window_fault());
    let mut jobs = cluster.start_all(&[], CUT_TIMEOUT_SECS, &[("BURNRUN_FAULT", &fault)]);
    jobs[0].wait_for_output(WINDOW_OPEN, RUN_BOUND);
    cluster.net.set_link(2, false).expect("cut node 2's link");
    let cut = Instant::now();
    let timeout = Duration::from_secs(CUT_TIMEOUT_SECS);
    let bound = CUT_WINDOW + timeout + NODE0_LINGER + SLACK;
    let ended = wait_all(jobs, bound, cut);
    let hint = format!("(was the link cut within the {CUT_WINDOW:?} the ranks slept?)");
    for (finished, _) in &ended {
        assert_eq!(finished.status.code(), Some(1), "{hint}\n{}", finished.output());
    }
    let (node0, node1, node2) = (&ended[0].0, &ended[1].0, &ended[2].0);
    for (node, finished) in [(0, node0), (1, node1)] {
        assert!(blames(&finished.stderr, 2, 1), "node {node}:\n{}", finished.output());
        assert!(
            finished
                .stderr
                .contains(&format!("timed out after {CUT_TIMEOUT_SECS}s waiting for peer 2")),
            "node {node}:\n{}",
            finished.output()
        );
    }
    assert!(
        node0
            .stderr
            .contains("also failed: rank 0 (exited with code 1, lost peer 1)"),
        "{}",
        node0.output()
    );
    assert!(
        node0.stderr.contains("node(s) [2] did not report their end"),
        "{}",
        node0.output()
    );
    assert!(node0.stderr.contains("no record from rank(s) 2"), "{}", node0.output());
    assert!(node2.stderr.contains("lost node 0's store"), "{}", node2.output());
    eprintln!(
        "3 nodes, node 2 cut at step {CUT_STEP}, deadline {timeout:?}: nodes exited after {:.1}, {:.1}, {:.1} s",
        ended[0].1.as_secs_f64(),
        ended[1].1.as_secs_f64(),
        ended[2].1.as_secs_f64()
    );
}

/// Whether `stderr` holds the summary line blaming `rank` for not responding while `waiter`
/// timed out waiting for it. The node that runs the blamed rank may add its process to the
/// line (`rank 1 (node 1, local rank 0, pid N on host) did not respond: ...`), when it saw the
/// report in time: both forms are right.
fn blames(stderr: &str, rank: usize, waiter: usize) -> bool {
    stderr.lines().any(|line| {
        line.contains(&format!("job failed: rank {rank} "))
            && line.ends_with(&format!("did not respond: rank {waiter} timed out waiting for it"))
    })
}
