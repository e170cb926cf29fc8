//! Watching a node's ranks until they have all ended: exits, the launcher's own signals and the
//! other nodes' failures (through the store) all lead to one teardown (the signal to every rank's
//! process group, SIGKILL after the grace period), then one summary.

use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::coordination::Coordinator;
use super::output::{say, RankOutput};
use super::report::{
    root_cause, unresponsive_peer, ExitCause, Failure, RankFailure, Unresponsive, UnresponsiveProcess,
    LAUNCHER_SIGNALLED, STALL_STOP, STUCK_STATES,
};
use super::shm_sweep;
use super::signals;
use super::spawn::Placement;
use super::watchdog::Watchdog;
use crate::names::shm_rank_file_prefix;

/// Longest sleep of the supervision loop between two looks at signals and deadlines.
const TICK: Duration = Duration::from_millis(50);
/// How long a failed rank's stderr may take to drain, from its exit, before its summary is published.
const TAIL_WAIT: Duration = Duration::from_millis(300);
/// After the first failure of a local rank, how long other failures are still collected before
/// the root cause is chosen (see [`root_cause`]). When a rank dies its peers fail within
/// milliseconds ("connection to peer 1 lost"), and on a loaded machine a survivor's exit can be
/// observed first: the threads waiting for the ranks run in no particular order. A quarter second
/// covers that reordering with room to spare. It never delays the teardown, which starts at the
/// first failure, and never outlasts it: the window closes as soon as every local rank has ended.
/// Only the publication to the other nodes waits for it.
const ROOT_CAUSE_WINDOW: Duration = Duration::from_millis(250);
/// How long ranks get to die after SIGKILL before the launcher stops waiting for them.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the output threads get to drain the pipes once every rank has ended.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Node 0 says it waits for other nodes once they take longer than this to finish.
const WAIT_NOTICE: Duration = Duration::from_secs(2);
/// Extra time node 0 keeps the store up, after a failure, for the other nodes to read it and report.
const STORE_LINGER: Duration = Duration::from_secs(5);

/// One local rank as the supervisor tracks it.
#[derive(Debug)]
pub(crate) struct RankState {
    pub(crate) placement: Placement,
    pub(crate) pid: u32,
    pub(crate) started: Instant,
    pub(crate) output: RankOutput,
    pub(crate) exit: Option<ExitCause>,
}

impl RankState {
    fn pgid(&self) -> Pid {
        // Each rank leads its own process group (`process_group(0)` at spawn).
        Pid::from_raw(self.pid as i32)
    }
}

/// A rank's process ended.
#[derive(Debug)]
pub(crate) struct ExitEvent {
    local_rank: usize,
    cause: ExitCause,
}

/// A local rank's failure, not caused by the launcher, collected while the root cause is open.
#[derive(Debug)]
struct Candidate {
    local_rank: usize,
    cause: ExitCause,
    observed: Instant,
}

/// The local failures collected since the first one, until `until`.
#[derive(Debug)]
struct Collecting {
    until: Instant,
    candidates: Vec<Candidate>,
    /// The process state (`/proc/PID/stat`) of every local rank still running when the first
    /// failure was seen, by local rank: read before the teardown signals them, so a rank that was
    /// stopped (SIGSTOP) is known as such.
    states: Vec<(usize, char)>,
}

/// A process's state letter in `/proc/PID/stat` (`R`, `S`, `D`, `T`, `t`, `Z`...), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ...": comm may hold spaces and parentheses, so the state follows the last ')'.
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

/// What the supervisor needs to know about its node and run.
#[derive(Debug)]
pub(crate) struct NodeJob {
    /// This node's rank.
    pub(crate) node_rank: usize,
    /// This node's host name.
    pub(crate) host: String,
    /// The run's id (names its shared-memory files).
    pub(crate) run_id: String,
    /// Time between the teardown signal and SIGKILL.
    pub(crate) grace_period: Duration,
    /// How often the store is polled (`--monitor-interval`).
    pub(crate) monitor_interval: Duration,
    /// `--stall-timeout`.
    pub(crate) stall_timeout: Option<Duration>,
    /// `--log-dir`, where node 0 writes the flight report of a failed generation.
    pub(crate) log_dir: Option<std::path::PathBuf>,
}

/// Starts the thread that waits for `child` and reports its exit on `events`.
pub(crate) fn watch_exit(local_rank: usize, mut child: Child, events: mpsc::Sender<ExitEvent>) {
    let pid = child.id();
    let body = move || {
        let cause = match child.wait() {
            Ok(status) => ExitCause::from_status(status),
            Err(e) => {
                say(format_args!("cannot wait for local rank {local_rank} (pid {pid}): {e}"));
                ExitCause::Code(-1)
            }
        };
        // The receiver outlives every rank (the supervisor waits for all of them); a send error
        // means the launcher is already returning.
        let _ = events.send(ExitEvent { local_rank, cause });
    };
    if let Err(e) = std::thread::Builder::new()
        .name(format!("wait-rank{local_rank}"))
        .spawn(body)
    {
        say(format_args!(
            "cannot start the thread waiting for local rank {local_rank} (pid {pid}): {e}"
        ));
    }
}

/// Sends `signal` to a process group; false if the group no longer exists.
fn signal_group(pgid: Pid, signal: Signal) -> bool {
    match killpg(pgid, signal) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => {
            say(format_args!("cannot send {signal} to process group {pgid}: {e}"));
            false
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Teardown {
    signal: Signal,
    started: Instant,
    killed: Option<Instant>,
}

/// How a node's part of the job ended.
#[derive(Debug)]
pub(crate) struct Ended {
    /// The job's root cause as this node knows it.
    pub(crate) failure: Option<Failure>,
    /// The stop signal this launcher received.
    pub(crate) signal: Option<Signal>,
    /// The orphan watchdog, no longer guarding this generation's ranks (they have all ended):
    /// disarmed when the launcher ends, kept for the ranks of a restart.
    pub(crate) watchdog: Watchdog,
}

/// Supervises the ranks of one node.
#[derive(Debug)]
pub(crate) struct Supervisor<'a> {
    node_rank: usize,
    host: String,
    run_id: String,
    grace_period: Duration,
    monitor_interval: Duration,
    stall_timeout: Option<Duration>,
    log_dir: Option<std::path::PathBuf>,
    /// When this node last published its ranks' flight records while they looked stalled.
    suspect_published: Option<Instant>,
    coordinator: &'a mut Coordinator,
    ranks: Vec<RankState>,
    events: mpsc::Receiver<ExitEvent>,
    watchdog: Watchdog,
    teardown: Option<Teardown>,
    /// Local failures collected before the root cause is chosen.
    collecting: Option<Collecting>,
    /// The local failures the root cause was chosen from (once chosen), in observed order.
    local_failures: Vec<RankFailure>,
    failure: Option<Failure>,
    signal: Option<Signal>,
    store_lost: bool,
}

impl<'a> Supervisor<'a> {
    /// A supervisor for ranks already started.
    pub(crate) fn new(
        node: NodeJob,
        coordinator: &'a mut Coordinator,
        ranks: Vec<RankState>,
        events: mpsc::Receiver<ExitEvent>,
        watchdog: Watchdog,
    ) -> Self {
        Self {
            node_rank: node.node_rank,
            host: node.host,
            run_id: node.run_id,
            grace_period: node.grace_period,
            monitor_interval: node.monitor_interval,
            stall_timeout: node.stall_timeout,
            log_dir: node.log_dir,
            suspect_published: None,
            coordinator,
            ranks,
            events,
            watchdog,
            teardown: None,
            collecting: None,
            local_failures: Vec::new(),
            failure: None,
            signal: None,
            store_lost: false,
        }
    }

    fn running(&self) -> impl Iterator<Item = &RankState> {
        self.ranks.iter().filter(|r| r.exit.is_none())
    }

    /// Runs until every rank has ended (or survived SIGKILL), then cleans up and waits for the
    /// other nodes as node 0 must. Prints the summary.
    pub(crate) fn run(mut self) -> Ended {
        let mut next_poll = Instant::now();
        while self.running().next().is_some() {
            let tick = match &self.collecting {
                Some(collecting) => TICK.min(collecting.until.saturating_duration_since(Instant::now())),
                None => TICK,
            };
            match self.events.recv_timeout(tick) {
                Ok(event) => self.on_exit(event),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    say("lost track of the ranks' exits (every waiting thread is gone); stopping them");
                    self.kill_all_groups();
                    break;
                }
            }
            if let Some(signal) = signals::take() {
                self.on_signal(signal);
            }
            if !self.store_lost && Instant::now() >= next_poll {
                next_poll = Instant::now() + self.monitor_interval;
                self.poll_store();
                if self.teardown.is_none() {
                    self.check_stall();
                }
            }
            if self.collecting.as_ref().is_some_and(|c| Instant::now() >= c.until) {
                self.choose_root_cause();
            }
            if !self.escalate() {
                break;
            }
        }
        // The window also closes when every local rank has ended.
        self.choose_root_cause();
        self.finish()
    }

    fn on_exit(&mut self, event: ExitEvent) {
        let observed = Instant::now();
        let caused_by_launcher = self.sent_by_launcher(&event.cause);
        let Some(rank) = self.ranks.get_mut(event.local_rank) else {
            return;
        };
        rank.exit = Some(event.cause.clone());
        let placement = rank.placement;
        if event.cause.success() {
            tracing::debug!(rank = placement.rank, "rank exited with code 0");
            return;
        }
        if caused_by_launcher {
            tracing::debug!(rank = placement.rank, cause = %event.cause, "rank stopped by the teardown");
            return;
        }
        let candidate = Candidate {
            local_rank: event.local_rank,
            cause: event.cause,
            observed,
        };
        if let Some(collecting) = &mut self.collecting {
            collecting.candidates.push(candidate);
            return;
        }
        if self.teardown.is_some() {
            // The teardown was started by another node's failure (a local one would be collected
            // or already chosen from). A rank exiting with a code now may do so because it was
            // stopped; only a signal the launcher did not send makes it a failure of its own,
            // which may explain the other node's (see `Coordinator::publish_failure`).
            let stopped_by_store = self.signal.is_none() && !self.store_lost && self.local_failures.is_empty();
            if !(stopped_by_store && candidate.cause.is_fatal_signal()) {
                tracing::debug!(rank = placement.rank, cause = %candidate.cause, "rank ended during teardown");
                return;
            }
        }
        let states = self
            .running()
            .filter_map(|r| Some((r.placement.local_rank, process_state(r.pid)?)))
            .collect();
        self.begin_teardown(Signal::SIGTERM, &format!("rank {} {}", placement.rank, candidate.cause));
        self.collecting = Some(Collecting {
            until: observed + ROOT_CAUSE_WINDOW,
            candidates: vec![candidate],
            states,
        });
    }

    /// Whether the launcher's own teardown explains `cause`: killed by a signal it sent (the
    /// teardown signal, SIGKILL once it escalated), or an exit code 128 + that signal, which is
    /// how shells and most runtimes report a child killed by it.
    fn sent_by_launcher(&self, cause: &ExitCause) -> bool {
        let Some(teardown) = self.teardown else { return false };
        let sent = |number: i32| {
            number == teardown.signal as i32 || (teardown.killed.is_some() && number == Signal::SIGKILL as i32)
        };
        match cause {
            ExitCause::Signal { number, .. } => sent(*number),
            ExitCause::Code(code) => *code > 128 && sent(code - 128),
        }
    }

    /// Ends the collection window: waits (bounded) for the failed ranks' stderr, picks the root
    /// cause by [`root_cause`] and publishes it. Nothing to do when no window is open.
    fn choose_root_cause(&mut self) {
        let Some(collecting) = self.collecting.take() else {
            return;
        };
        let failures: Vec<RankFailure> = collecting
            .candidates
            .into_iter()
            .map(|candidate| {
                let rank = &self.ranks[candidate.local_rank];
                rank.output.wait_closed(candidate.observed + TAIL_WAIT);
                RankFailure {
                    rank: rank.placement.rank,
                    node_rank: rank.placement.node_rank,
                    local_rank: rank.placement.local_rank,
                    pid: rank.pid,
                    host: self.host.clone(),
                    cause: candidate.cause,
                    runtime_ms: candidate.observed.saturating_duration_since(rank.started).as_millis() as u64,
                    stderr_tail: rank.output.stderr_tail(),
                }
            })
            .collect();
        let refs: Vec<&RankFailure> = failures.iter().collect();
        let stuck: Vec<usize> = collecting
            .states
            .iter()
            .filter(|(_, state)| STUCK_STATES.contains(state))
            .map(|(local_rank, _)| self.ranks[*local_rank].placement.rank)
            .collect();
        if let Some((rank, waiters)) = unresponsive_peer(&refs, &stuck) {
            let local = self.ranks.iter().find(|r| r.placement.rank == rank);
            let process = local.map(|r| UnresponsiveProcess {
                node_rank: r.placement.node_rank,
                local_rank: r.placement.local_rank,
                pid: r.pid,
                host: self.host.clone(),
                state: collecting
                    .states
                    .iter()
                    .find(|(local_rank, _)| *local_rank == r.placement.local_rank)
                    .map(|(_, state)| *state),
            });
            let marker = format!("waiting for peer {rank}");
            let evidence = failures.iter().find_map(|f| {
                let line = f.stderr_tail.iter().find(|line| line.contains(&marker))?;
                Some(format!("[rank{}]: {line}", f.rank))
            });
            let stall = Failure::Unresponsive(Unresponsive {
                rank,
                waiters,
                process,
                evidence,
                stalled: false,
            });
            self.local_failures = failures;
            self.record_failure(stall);
            return;
        }
        // Invariant: a window opens with one candidate and never loses one.
        let chosen = root_cause(&refs).expect("a collection window holds a failure");
        if failures.len() > 1 {
            tracing::debug!(
                root_cause = failures[chosen].rank,
                failed = ?failures.iter().map(|f| f.rank).collect::<Vec<_>>(),
                "chose the root cause among this node's failures"
            );
        }
        let local = Failure::Rank(failures[chosen].clone());
        self.local_failures = failures;
        self.record_failure(local);
    }

    /// Publishes this node's failure; the job's is whichever the store then holds (the first
    /// published, or this one if it is preferred, see [`Failure::replaces`]).
    fn record_failure(&mut self, local: Failure) {
        if self.store_lost {
            self.failure.get_or_insert(local);
            return;
        }
        if self.failure.is_some() && matches!(local, Failure::Node { .. }) {
            return;
        }
        match self.coordinator.publish_failure(&local) {
            Ok(first) => self.failure = Some(first),
            Err(e) => {
                say(format_args!("cannot tell the other nodes about the failure: {e}"));
                self.failure.get_or_insert(local);
            }
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        // A rank failed before the signal came: that failure is the root cause, chosen now.
        self.choose_root_cause();
        if self.signal.is_some() || self.teardown.is_some() {
            say(format_args!("received {signal} again: killing every rank now"));
            self.signal.get_or_insert(signal);
            self.kill_now();
            return;
        }
        self.signal = Some(signal);
        self.begin_teardown(signal, &format!("the launcher received {signal}"));
        self.record_failure(Failure::Node {
            node_rank: self.node_rank,
            host: self.host.clone(),
            reason: format!("{LAUNCHER_SIGNALLED} {signal}"),
        });
    }

    fn poll_store(&mut self) {
        match self.coordinator.poll() {
            Ok(None) => {}
            Ok(Some(failure)) => {
                // Another node blamed a rank of this node without seeing its process: say what
                // state it is in (read before the teardown signals it), for every node's summary.
                let described = self.describe_blamed(&failure);
                if self.failure.is_none() {
                    self.failure = Some(failure.clone());
                }
                if self.teardown.is_none() {
                    let what = failure.summary_lines().into_iter().next().unwrap_or_default();
                    self.begin_teardown(Signal::SIGTERM, &what);
                }
                if let Some(described) = described {
                    self.record_failure(described);
                }
            }
            Err(e) if self.node_rank != 0 => {
                self.store_lost = true;
                let reason = format!("lost node 0's store at {}: {e}", self.coordinator.addr());
                if self.failure.is_none() {
                    self.failure = Some(Failure::Node {
                        node_rank: self.node_rank,
                        host: self.host.clone(),
                        reason: reason.clone(),
                    });
                }
                self.begin_teardown(Signal::SIGTERM, &reason);
            }
            // Node 0's store lives in this process; a failing call is worth a line, not a teardown.
            Err(e) => say(format_args!("store poll failed: {e}")),
        }
    }

    /// `failure` with the process of the rank it blames, when that rank runs here and the node
    /// that published it could not describe it; `None` otherwise.
    fn describe_blamed(&self, failure: &Failure) -> Option<Failure> {
        let Failure::Unresponsive(stall) = failure else {
            return None;
        };
        if stall.process.is_some() {
            return None;
        }
        let rank = self.ranks.iter().find(|r| r.placement.rank == stall.rank)?;
        Some(Failure::Unresponsive(Unresponsive {
            process: Some(UnresponsiveProcess {
                node_rank: rank.placement.node_rank,
                local_rank: rank.placement.local_rank,
                pid: rank.pid,
                host: self.host.clone(),
                state: process_state(rank.pid),
            }),
            ..stall.clone()
        }))
    }

    /// The flight record of every local rank that has one (see `crate::flight`).
    fn local_records(&self) -> Vec<(usize, crate::flight::Record)> {
        self.ranks
            .iter()
            .enumerate()
            .filter_map(|(local, r)| {
                let path = crate::flight::path(&shm_rank_file_prefix(&self.run_id, r.placement.rank));
                Some((local, crate::flight::read(&path)?))
            })
            .collect()
    }

    /// `--stall-timeout`: a local rank whose record shows no progress for that long stops the
    /// job. The failure names the rank the flight records show behind (when it runs here), with
    /// the verdict as evidence; otherwise this node stops the job saying which of its ranks stalled.
    fn check_stall(&mut self) {
        let Some(limit) = self.stall_timeout else { return };
        let now = crate::flight::now_ns();
        let records = self.local_records();
        let quiet_for = |r: &crate::flight::Record| Duration::from_nanos(now.saturating_sub(r.progress_ns));
        let running = |local: usize| self.ranks[local].exit.is_none();
        // Half way to the limit, the records go to the store, so that the node that reaches the
        // limit first sees every node's ranks, not only its own.
        let suspect = records.iter().any(|(l, r)| running(*l) && quiet_for(r) >= limit / 2);
        if suspect && self.suspect_published.is_none_or(|t| t.elapsed() >= limit / 2) {
            let plain: Vec<crate::flight::Record> = records.iter().map(|(_, r)| r.clone()).collect();
            if let Err(e) = self.coordinator.publish_flight(&plain) {
                tracing::debug!("cannot publish the flight records: {e}");
            }
            self.suspect_published = Some(Instant::now());
        }
        let stalled: Vec<u64> = records
            .iter()
            .filter(|(l, r)| running(*l) && quiet_for(r) >= limit)
            .map(|(_, r)| r.rank)
            .collect();
        if stalled.is_empty() {
            return;
        }
        // Every node's records: the others' as published, this node's fresh.
        let mut plain: Vec<crate::flight::Record> = self
            .coordinator
            .flight_records()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !records.iter().any(|(_, own)| own.rank == r.rank))
            .collect();
        plain.extend(records.iter().map(|(_, r)| r.clone()));
        plain.sort_by_key(|r| r.rank);
        let verdict = crate::flight::verdict(&plain, now);
        let states: Vec<(usize, char)> = self
            .running()
            .filter_map(|r| Some((r.placement.local_rank, process_state(r.pid)?)))
            .collect();
        let why = format!(
            "{STALL_STOP} {limit:?} on rank(s) {} (--stall-timeout)",
            crate::flight::ranks_text(&stalled)
        );
        let evidence = format!(
            "{why}; flight recorder: {}",
            verdict.unwrap_or_else(|| "no collective recorded".into())
        );
        // The rank behind the others (its process described when it runs here); when every rank
        // reached the same call, no rank is to blame: this node stops the job with the verdict.
        let behind = crate::flight::behind(&plain);
        let failure = match behind.first() {
            Some(&culprit) => {
                let local = records.iter().find(|(_, r)| r.rank == culprit).map(|(l, _)| *l);
                Failure::Unresponsive(Unresponsive {
                    rank: culprit as usize,
                    waiters: plain
                        .iter()
                        .filter(|r| !behind.contains(&r.rank))
                        .map(|r| r.rank as usize)
                        .collect(),
                    process: local.map(|local| {
                        let rank = &self.ranks[local];
                        UnresponsiveProcess {
                            node_rank: rank.placement.node_rank,
                            local_rank: rank.placement.local_rank,
                            pid: rank.pid,
                            host: self.host.clone(),
                            state: states.iter().find(|(l, _)| *l == local).map(|(_, s)| *s),
                        }
                    }),
                    evidence: Some(evidence),
                    stalled: true,
                })
            }
            None => Failure::Node {
                node_rank: self.node_rank,
                host: self.host.clone(),
                reason: evidence,
            },
        };
        self.begin_teardown(Signal::SIGTERM, &why);
        self.record_failure(failure);
    }

    /// After a failure: publishes this node's flight records; node 0 then gathers every node's,
    /// prints the verdict and writes the report under `--log-dir`.
    fn report_flight(&mut self, records: Vec<crate::flight::Record>) {
        if records.is_empty() && !self.coordinator.hosts_store() {
            return;
        }
        if let Err(e) = self.coordinator.publish_flight(&records) {
            say(format_args!("cannot publish this node's flight records: {e}"));
        }
    }

    /// Node 0, once every node reported: the job's flight report.
    fn write_flight_report(&self) {
        let records = match self.coordinator.flight_records() {
            Ok(records) if !records.is_empty() => records,
            Ok(_) => return,
            Err(e) => {
                say(format_args!("cannot read the nodes' flight records: {e}"));
                return;
            }
        };
        let now = crate::flight::now_ns();
        // A node that could not reach the store (its link was cut) published nothing: say so,
        // rather than judge from the others' records as if they were all.
        let world_size = self.ranks.first().map_or(0, |r| r.placement.world_size) as u64;
        let missing: Vec<u64> = (0..world_size)
            .filter(|rank| !records.iter().any(|r| r.rank == *rank))
            .collect();
        let verdict = crate::flight::verdict(&records, now).map(|verdict| {
            if missing.is_empty() {
                verdict
            } else {
                format!(
                    "{verdict}; no record from rank(s) {} (their node did not publish it)",
                    crate::flight::ranks_text(&missing)
                )
            }
        });
        if let Some(verdict) = &verdict {
            say(format_args!("flight recorder: {verdict}"));
        }
        let Some(dir) = &self.log_dir else { return };
        let path = dir.join(format!("flight_report_g{}.txt", self.coordinator.generation()));
        let text = crate::flight::report(&records, verdict.as_deref(), now);
        match std::fs::write(&path, text) {
            Ok(()) => say(format_args!("flight report of every rank: {}", path.display())),
            Err(e) => say(format_args!("cannot write the flight report {}: {e}", path.display())),
        }
    }

    fn begin_teardown(&mut self, signal: Signal, why: &str) {
        if self.teardown.is_some() {
            return;
        }
        let running: Vec<usize> = self.running().map(|r| r.placement.rank).collect();
        if !running.is_empty() {
            say(format_args!(
                "{why}: stopping rank(s) {running:?} on node {} with {signal} (SIGKILL after {:?})",
                self.node_rank, self.grace_period
            ));
        }
        // Every group, also of ranks that have exited: what they started may still run. A rank
        // stopped by SIGSTOP acts on the signal only once continued.
        for rank in &self.ranks {
            if signal_group(rank.pgid(), signal) {
                signal_group(rank.pgid(), Signal::SIGCONT);
            }
        }
        self.teardown = Some(Teardown {
            signal,
            started: Instant::now(),
            killed: None,
        });
    }

    fn kill_all_groups(&self) {
        for rank in &self.ranks {
            signal_group(rank.pgid(), Signal::SIGKILL);
        }
    }

    fn kill_now(&mut self) {
        self.kill_all_groups();
        let now = Instant::now();
        let teardown = self.teardown.get_or_insert(Teardown {
            signal: Signal::SIGKILL,
            started: now,
            killed: None,
        });
        teardown.killed.get_or_insert(now);
    }

    /// Applies the grace period; false when ranks survived SIGKILL and the launcher stops waiting.
    fn escalate(&mut self) -> bool {
        let Some(teardown) = self.teardown else { return true };
        let now = Instant::now();
        let running: Vec<usize> = self.running().map(|r| r.placement.rank).collect();
        if running.is_empty() {
            return true;
        }
        match teardown.killed {
            None if now >= teardown.started + self.grace_period => {
                say(format_args!(
                    "rank(s) {running:?} still running {:?} after {}: sending SIGKILL",
                    self.grace_period, teardown.signal
                ));
                self.kill_now();
                true
            }
            Some(killed) if now >= killed + KILL_WAIT => {
                say(format_args!(
                    "rank(s) {running:?} survived SIGKILL for {KILL_WAIT:?} (stuck in the kernel?); no longer waiting"
                ));
                false
            }
            _ => true,
        }
    }

    /// After the ranks: leftovers, output, the other nodes, the summary.
    fn finish(mut self) -> Ended {
        // Whatever a rank started and left behind goes with it.
        for rank in &self.ranks {
            if signal_group(rank.pgid(), Signal::SIGKILL) {
                tracing::debug!(rank = rank.placement.rank, "killed processes the rank left behind");
            }
        }
        // The flight records live in shared memory: read them before it is swept.
        let records: Vec<crate::flight::Record> = self.local_records().into_iter().map(|(_, r)| r).collect();
        let first = self.ranks.iter().map(|r| r.placement.rank).min().unwrap_or(0);
        shm_sweep::sweep_run(&self.run_id, first..first + self.ranks.len());
        let drain_deadline = Instant::now() + DRAIN_WAIT;
        for rank in &self.ranks {
            if !rank.output.wait_closed(drain_deadline) {
                say(format_args!(
                    "rank {}'s output is still open (a process outside its group holds it); not waiting",
                    rank.placement.rank
                ));
            }
        }
        let succeeded = self.failure.is_none()
            && self
                .ranks
                .iter()
                .all(|r| r.exit.as_ref().is_some_and(ExitCause::success));
        if !self.store_lost && self.failure.is_some() {
            self.report_flight(records);
        }
        if !self.store_lost {
            if let Err(e) = self.coordinator.report_done(succeeded) {
                say(format_args!("cannot report this node's end to the store: {e}"));
            }
            if self.coordinator.hosts_store() {
                self.wait_for_other_nodes(succeeded);
                if self.failure.is_some() {
                    self.write_flight_report();
                }
            }
            self.reread_failure();
        }
        let Self {
            failure,
            signal,
            mut watchdog,
            ranks,
            local_failures,
            ..
        } = self;
        for rank in &ranks {
            watchdog.unguard(rank.pgid().as_raw());
        }
        if let Some(failure) = &failure {
            for line in failure.summary_lines() {
                say(line);
            }
            let is_root = |rank: usize| failure.root_rank() == Some(rank);
            let also: Vec<String> = local_failures
                .iter()
                .filter(|f| !is_root(f.rank))
                .map(RankFailure::brief)
                .collect();
            if !also.is_empty() {
                say(format_args!("also failed: {}", also.join("; ")));
            }
            let stopped = ranks
                .iter()
                .filter(|r| !is_root(r.placement.rank))
                .filter(|r| !local_failures.iter().any(|f| f.rank == r.placement.rank))
                .filter(|r| r.exit.as_ref().is_some_and(|c| !c.success()))
                .count();
            if stopped > 0 {
                say(format_args!("{stopped} other rank(s) on this node were stopped"));
            }
        }
        Ended {
            failure,
            signal,
            watchdog,
        }
    }

    /// Takes the job's failure from the store once more before the summary: a slower node may have
    /// replaced it with one it prefers (see [`Failure::replaces`]). Node 0 reads it after every
    /// node reported its end, so it prints the final choice; another node prints what the store
    /// held when its own ranks had ended, which is the earlier failure if a node replaced it later.
    fn reread_failure(&mut self) {
        if self.failure.is_none() {
            return;
        }
        match self.coordinator.failure() {
            Ok(Some(failure)) => self.failure = Some(failure),
            Ok(None) => {}
            // Node 0 may be gone already; this node's view stands.
            Err(e) => tracing::debug!("cannot read the job's failure again: {e}"),
        }
    }

    /// Node 0 keeps the store up until every node reported its end: while they run, for as long
    /// as their heartbeats go on; after a failure, for a bounded time.
    fn wait_for_other_nodes(&mut self, succeeded: bool) {
        let started = Instant::now();
        let linger_until = started + self.grace_period + KILL_WAIT + STORE_LINGER;
        let mut told = false;
        loop {
            let pending = match self.coordinator.nodes_not_done() {
                Ok(pending) => pending,
                Err(e) => {
                    say(format_args!("cannot read which nodes are done: {e}"));
                    return;
                }
            };
            if pending.is_empty() {
                return;
            }
            let still_fine = succeeded && self.failure.is_none() && self.signal.is_none();
            if !still_fine && Instant::now() >= linger_until {
                say(format_args!(
                    "node(s) {pending:?} did not report their end; closing the store"
                ));
                return;
            }
            if !told && started.elapsed() >= WAIT_NOTICE {
                say(format_args!("this node is done; waiting for node(s) {pending:?}"));
                told = true;
            }
            if let Some(signal) = signals::take() {
                self.on_signal(signal);
            }
            if still_fine {
                match self.coordinator.poll() {
                    Ok(Some(failure)) => self.failure = Some(failure),
                    Ok(None) => {}
                    Err(e) => say(format_args!("store poll failed: {e}")),
                }
            }
            std::thread::sleep(self.monitor_interval);
        }
    }
}
