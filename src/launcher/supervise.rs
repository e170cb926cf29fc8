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
use super::report::{ExitCause, Failure, RankFailure};
use super::signals;
use super::spawn::Placement;
use super::watchdog::Watchdog;

/// How often the store is polled for another node's failure.
pub const POLL_INTERVAL: Duration = Duration::from_millis(150);
/// Longest sleep of the supervision loop between two looks at signals and deadlines.
const TICK: Duration = Duration::from_millis(50);
/// How long a failed rank's stderr may take to drain before its summary is published.
const TAIL_WAIT: Duration = Duration::from_millis(300);
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
    /// The job's first failure as this node knows it.
    pub(crate) failure: Option<Failure>,
    /// The stop signal this launcher received.
    pub(crate) signal: Option<Signal>,
}

/// Supervises the ranks of one node.
#[derive(Debug)]
pub(crate) struct Supervisor<'a> {
    node_rank: usize,
    host: String,
    grace_period: Duration,
    coordinator: &'a mut Coordinator,
    ranks: Vec<RankState>,
    events: mpsc::Receiver<ExitEvent>,
    watchdog: Watchdog,
    teardown: Option<Teardown>,
    failure: Option<Failure>,
    signal: Option<Signal>,
    store_lost: bool,
}

impl<'a> Supervisor<'a> {
    /// A supervisor for ranks already started.
    pub(crate) fn new(
        node_rank: usize,
        host: String,
        grace_period: Duration,
        coordinator: &'a mut Coordinator,
        ranks: Vec<RankState>,
        events: mpsc::Receiver<ExitEvent>,
        watchdog: Watchdog,
    ) -> Self {
        Self {
            node_rank,
            host,
            grace_period,
            coordinator,
            ranks,
            events,
            watchdog,
            teardown: None,
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
            match self.events.recv_timeout(TICK) {
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
                next_poll = Instant::now() + POLL_INTERVAL;
                self.poll_store();
            }
            if !self.escalate() {
                break;
            }
        }
        self.finish()
    }

    fn on_exit(&mut self, event: ExitEvent) {
        let Some(rank) = self.ranks.get_mut(event.local_rank) else {
            return;
        };
        rank.exit = Some(event.cause.clone());
        let placement = rank.placement;
        if event.cause.success() {
            tracing::debug!(rank = placement.rank, "rank exited with code 0");
            return;
        }
        if self.teardown.is_some() {
            // Stopped by the teardown, or failing because a peer was stopped: not the first failure.
            tracing::debug!(rank = placement.rank, cause = %event.cause, "rank ended during teardown");
            return;
        }
        self.begin_teardown(Signal::SIGTERM, &format!("rank {} {}", placement.rank, event.cause));
        let rank = &self.ranks[event.local_rank];
        rank.output.wait_closed(Instant::now() + TAIL_WAIT);
        let local = Failure::Rank(RankFailure {
            rank: placement.rank,
            node_rank: placement.node_rank,
            local_rank: placement.local_rank,
            pid: rank.pid,
            host: self.host.clone(),
            cause: event.cause,
            runtime_ms: rank.started.elapsed().as_millis() as u64,
            stderr_tail: rank.output.stderr_tail(),
        });
        self.record_failure(local);
    }

    /// Publishes this node's failure and keeps whichever one the store says came first.
    fn record_failure(&mut self, local: Failure) {
        if self.failure.is_some() {
            return;
        }
        let first = if self.store_lost {
            local
        } else {
            match self.coordinator.publish_failure(&local) {
                Ok(first) => first,
                Err(e) => {
                    say(format_args!("cannot tell the other nodes about the failure: {e}"));
                    local
                }
            }
        };
        self.failure = Some(first);
    }

    fn on_signal(&mut self, signal: Signal) {
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
            reason: format!("its launcher received {signal}"),
        });
    }

    fn poll_store(&mut self) {
        match self.coordinator.poll() {
            Ok(None) => {}
            Ok(Some(failure)) => {
                if self.failure.is_none() {
                    self.failure = Some(failure.clone());
                }
                if self.teardown.is_none() {
                    let what = failure.summary_lines().into_iter().next().unwrap_or_default();
                    self.begin_teardown(Signal::SIGTERM, &what);
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
        // Every group, also of ranks that have exited: what they started may still run.
        for rank in &self.ranks {
            signal_group(rank.pgid(), signal);
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
        if !self.store_lost {
            if let Err(e) = self.coordinator.report_done(succeeded) {
                say(format_args!("cannot report this node's end to the store: {e}"));
            }
            if self.coordinator.hosts_store() {
                self.wait_for_other_nodes(succeeded);
            }
        }
        let Self {
            failure,
            signal,
            watchdog,
            ranks,
            ..
        } = self;
        watchdog.disarm();
        if let Some(failure) = &failure {
            for line in failure.summary_lines() {
                say(line);
            }
            let stopped = ranks
                .iter()
                .filter(|r| !matches!(&failure, Failure::Rank(f) if f.rank == r.placement.rank))
                .filter(|r| r.exit.as_ref().is_some_and(|c| !c.success()))
                .count();
            if stopped > 0 {
                say(format_args!("{stopped} other rank(s) on this node were stopped"));
            }
        }
        Ended { failure, signal }
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
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
