//! What went wrong in a job, in a form every node's launcher can print: the root cause is
//! published in the store as JSON, so all nodes print the same summary; [`root_cause`] says which
//! of several failed ranks it is.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use serde::{Deserialize, Serialize};

/// How a rank's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitCause {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal {
        /// The signal number.
        number: i32,
        /// Its name (`SIGKILL`), or the number when unknown.
        name: String,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitCause {
    /// Reads a process's exit status.
    pub fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCause::Code(code),
            (None, Some(number)) => ExitCause::Signal {
                number,
                name: signal_name(number),
                core_dumped: status.core_dumped(),
            },
            // Neither a code nor a signal: a stopped/continued status, which `wait` never returns for
            // an exited process; reported as a failure rather than trusted as success.
            (None, None) => ExitCause::Code(-1),
        }
    }

    /// True for exit code 0.
    pub fn success(&self) -> bool {
        *self == ExitCause::Code(0)
    }

    /// True when a signal killed the process that is not a consequence of a peer going away:
    /// SIGPIPE is left out (a rank writing to a socket whose other end died gets it), so it counts
    /// like an exit code. Only meaningful for a signal the launcher did not send.
    pub(crate) fn is_fatal_signal(&self) -> bool {
        matches!(self, ExitCause::Signal { number, .. } if *number != libc::SIGPIPE)
    }
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitCause::Code(code) => write!(f, "exited with code {code}"),
            ExitCause::Signal { name, core_dumped, .. } => {
                write!(f, "was killed by signal {name}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// The name of a signal number (`9` → `SIGKILL`).
pub fn signal_name(number: i32) -> String {
    nix::sys::signal::Signal::try_from(number)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {number}"))
}

/// A rank that ended badly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankFailure {
    /// Global rank.
    pub rank: usize,
    /// Its node.
    pub node_rank: usize,
    /// Rank within its node.
    pub local_rank: usize,
    /// Its process id.
    pub pid: u32,
    /// Host name of its node.
    pub host: String,
    /// How it ended.
    pub cause: ExitCause,
    /// Milliseconds it ran.
    pub runtime_ms: u64,
    /// The last lines it wrote to stderr.
    pub stderr_tail: Vec<String>,
}

/// Markers of a message in which a rank says it lost a peer, each followed by that peer's rank: the
/// transport's and the collectives' "connection to peer N lost", and a failed connect.
const LOST_PEER_MARKERS: [&str; 2] = ["connection to peer ", "cannot connect to peer "];
/// Markers of a message in which a rank says it timed out waiting for a peer (the peer may be
/// alive but stopped or stuck, which no exit shows): the collectives' "timed out after .. waiting
/// for peer N".
const WAITED_PEER_MARKERS: [&str; 1] = ["waiting for peer "];

impl RankFailure {
    /// The ranks this rank's stderr tail names after one of `markers`, without duplicates.
    fn peers_named(&self, markers: &[&str]) -> Vec<usize> {
        let mut peers = Vec::new();
        for line in &self.stderr_tail {
            for marker in markers {
                for (at, _) in line.match_indices(marker) {
                    let rest = &line[at + marker.len()..];
                    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
                    let Ok(peer) = rest[..digits].parse::<usize>() else {
                        continue;
                    };
                    if peer != self.rank && !peers.contains(&peer) {
                        peers.push(peer);
                    }
                }
            }
        }
        peers
    }

    /// The ranks this rank's stderr tail says it lost, could not reach, or timed out waiting for.
    pub(crate) fn lost_peers(&self) -> Vec<usize> {
        let mut peers = self.peers_named(&LOST_PEER_MARKERS);
        for peer in self.waited_peers() {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
        peers
    }

    /// The ranks this rank timed out waiting for.
    pub(crate) fn waited_peers(&self) -> Vec<usize> {
        self.peers_named(&WAITED_PEER_MARKERS)
    }

    /// One phrase for the "also failed" line: `rank 0 (exited with code 1, lost peer 1)`, or
    /// `rank 0 (exited with code 1, timed out waiting for peer 1)`.
    pub(crate) fn brief(&self) -> String {
        let list = |peers: Vec<usize>| peers.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
        let mut text = format!("rank {} ({}", self.rank, self.cause);
        let waited = self.waited_peers();
        let lost: Vec<usize> = self
            .peers_named(&LOST_PEER_MARKERS)
            .into_iter()
            .filter(|p| !waited.contains(p))
            .collect();
        if !lost.is_empty() {
            let _ = write!(text, ", lost peer {}", list(lost));
        }
        if !waited.is_empty() {
            let _ = write!(text, ", timed out waiting for peer {}", list(waited));
        }
        text.push(')');
        text
    }
}

/// Process states (`/proc/PID/stat`) of a rank that cannot answer: stopped by a signal (`T`),
/// stopped by a debugger (`t`), or in an uninterruptible sleep (`D`).
pub(crate) const STUCK_STATES: [char; 3] = ['T', 't', 'D'];

/// The rank the job waited for, when the failures are ranks that timed out waiting for a rank
/// that did not fail itself (it did not exit: it was alive but stopped, stuck or slow). Returns
/// that rank and the failed ranks that waited for it (directly, or for a rank waiting for it).
///
/// Only when every failure names a peer (lost or waited for): a rank that failed for a reason of
/// its own is a root cause [`root_cause`] picks. `stuck` lists this node's ranks that were still
/// running in one of the [`STUCK_STATES`] when the first failure was seen: such a rank is the one
/// waited for, even if the first rank to time out named another (that one waited for it too).
/// Otherwise it is the rank not among the failures that most failed ranks waited for.
pub(crate) fn unresponsive_peer(failures: &[&RankFailure], stuck: &[usize]) -> Option<(usize, Vec<usize>)> {
    let failed: Vec<usize> = failures.iter().map(|f| f.rank).collect();
    if failures.is_empty() || failures.iter().any(|f| f.lost_peers().is_empty()) {
        return None;
    }
    let timed_out: Vec<(usize, Vec<usize>)> = failures
        .iter()
        .map(|f| (f.rank, f.waited_peers()))
        .filter(|(_, peers)| !peers.is_empty())
        .collect();
    if timed_out.is_empty() {
        return None;
    }
    // The failed ranks that waited for `peer`, directly or through a chain of waiting ranks.
    let waiters_of = |peer: usize| {
        let mut waiting = vec![peer];
        loop {
            let more: Vec<usize> = timed_out
                .iter()
                .filter(|(rank, peers)| !waiting.contains(rank) && peers.iter().any(|p| waiting.contains(p)))
                .map(|(rank, _)| *rank)
                .collect();
            if more.is_empty() {
                break;
            }
            waiting.extend(more);
        }
        let mut waiters: Vec<usize> = waiting.into_iter().filter(|&r| r != peer).collect();
        waiters.sort_unstable();
        waiters
    };
    if let Some(&peer) = stuck.iter().find(|r| !failed.contains(r)) {
        let mut waiters = waiters_of(peer);
        if waiters.is_empty() {
            // Nobody named it, but a stopped rank holds up every collective it is part of.
            waiters = timed_out.iter().map(|(rank, _)| *rank).collect();
            waiters.sort_unstable();
        }
        return Some((peer, waiters));
    }
    let mut best: Option<(usize, Vec<usize>)> = None;
    for (_, peers) in &timed_out {
        for &peer in peers.iter().filter(|p| !failed.contains(p)) {
            let waiters = waiters_of(peer);
            if best.as_ref().is_none_or(|(_, most)| waiters.len() > most.len()) {
                best = Some((peer, waiters));
            }
        }
    }
    best
}

/// A rank that did not fail itself but that the failed ranks timed out waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unresponsive {
    /// Global rank.
    pub rank: usize,
    /// The failed ranks that timed out waiting for it (directly or through each other).
    pub waiters: Vec<usize>,
    /// Its process, when it runs on the node that saw the timeouts.
    pub process: Option<UnresponsiveProcess>,
    /// A line of a waiter's stderr that says what it waited for, or the flight recorder's verdict.
    pub evidence: Option<String>,
    /// Found by `--stall-timeout` (the waiters were still waiting), not by their timeouts.
    #[serde(default)]
    pub stalled: bool,
}

/// Where an unresponsive rank ran, and in what state it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnresponsiveProcess {
    /// Its node.
    pub node_rank: usize,
    /// Rank within its node.
    pub local_rank: usize,
    /// Its process id.
    pub pid: u32,
    /// Host name of its node.
    pub host: String,
    /// Its state in `/proc/PID/stat` when the first failure was seen, if it was read.
    pub state: Option<char>,
}

impl Unresponsive {
    /// "was stopped (SIGSTOP) and did not respond", from the process state.
    fn what_happened(&self) -> &'static str {
        match self.process.as_ref().and_then(|p| p.state) {
            Some('T') => "was stopped (SIGSTOP) and did not respond",
            Some('t') => "was stopped by a debugger and did not respond",
            Some('D') => "was stuck in the kernel (uninterruptible sleep) and did not respond",
            _ => "did not respond",
        }
    }
}

/// Picks the job's root cause among rank failures listed in the order they were observed, and
/// returns its index. When one rank dies, its peers fail within milliseconds, and which exit a
/// launcher observes first is up to the scheduler; so the first observed is only the last resort:
///
/// 1. A failure is secondary when its stderr tail says it lost its connection to (or could not
///    reach, or timed out waiting for) peer N and rank N is in the list too; secondary failures are
///    left out, unless every failure is secondary (they name each other), then none is.
/// 2. Among the rest, a rank killed by a signal (not SIGPIPE, see [`ExitCause::is_fatal_signal`])
///    beats one that exited with a code: a crash or a kill from outside explains an exit, rarely
///    the other way round.
/// 3. Among equals, the earliest observed.
///
/// The list must hold only failures of their own: ranks the launcher itself stopped are not in it.
pub(crate) fn root_cause(failures: &[&RankFailure]) -> Option<usize> {
    let failed: Vec<usize> = failures.iter().map(|f| f.rank).collect();
    let secondary: Vec<bool> = failures
        .iter()
        .map(|f| f.lost_peers().iter().any(|peer| failed.contains(peer)))
        .collect();
    let all_secondary = secondary.iter().all(|&s| s);
    let mut best: Option<usize> = None;
    for (i, failure) in failures.iter().enumerate() {
        if secondary[i] && !all_secondary {
            continue;
        }
        // Replaced only by a strictly better one: ties keep the earlier.
        let better = |b: usize| failure.cause.is_fatal_signal() && !failures[b].cause.is_fatal_signal();
        if best.is_none_or(better) {
            best = Some(i);
        }
    }
    best
}

/// Why a job stopped before all ranks succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// A rank exited non-zero or was killed.
    Rank(RankFailure),
    /// Ranks timed out waiting for a rank that did not exit (stopped, stuck or too slow).
    Unresponsive(Unresponsive),
    /// A launcher stopped the job: it received a signal, lost the store, or saw a node go silent.
    Node {
        /// The node whose launcher stopped the job.
        node_rank: usize,
        /// Its host name.
        host: String,
        /// Why, in words.
        reason: String,
    },
}

/// How a [`Failure::Node`]'s reason begins when `--stall-timeout` stopped the job on a node that
/// does not run the rank behind.
pub(crate) const STALL_STOP: &str = "no progress for";

/// How a [`Failure::Node`]'s reason begins when its launcher received a stop signal.
pub(crate) const LAUNCHER_SIGNALLED: &str = "its launcher received";

impl Failure {
    /// Whether a person stopped the job (a launcher received SIGINT or SIGTERM): not a failure
    /// to restart after.
    pub fn stopped_on_purpose(&self) -> bool {
        matches!(self, Failure::Node { reason, .. } if reason.starts_with(LAUNCHER_SIGNALLED))
    }

    /// The summary printed by every launcher, one line per entry, without the `burnrun: ` prefix.
    pub fn summary_lines(&self) -> Vec<String> {
        match self {
            Failure::Rank(failure) => {
                let mut head = String::new();
                // Writing to a String cannot fail.
                let _ = write!(
                    head,
                    "job failed: rank {} (node {}, local rank {}, pid {} on {}) {} after {:.1} s",
                    failure.rank,
                    failure.node_rank,
                    failure.local_rank,
                    failure.pid,
                    failure.host,
                    failure.cause,
                    failure.runtime_ms as f64 / 1000.0
                );
                let mut lines = vec![head];
                if failure.stderr_tail.is_empty() {
                    lines.push(format!("rank {} wrote nothing to stderr", failure.rank));
                } else {
                    lines.push(format!(
                        "last {} line(s) of rank {}'s stderr:",
                        failure.stderr_tail.len(),
                        failure.rank
                    ));
                    lines.extend(
                        failure
                            .stderr_tail
                            .iter()
                            .map(|line| format!("  [rank{}]: {line}", failure.rank)),
                    );
                }
                lines
            }
            Failure::Unresponsive(stall) => {
                let waiters = stall
                    .waiters
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let ranks = if stall.waiters.len() == 1 { "rank" } else { "ranks" };
                let place = match &stall.process {
                    Some(p) => format!(
                        " (node {}, local rank {}, pid {} on {})",
                        p.node_rank, p.local_rank, p.pid, p.host
                    ),
                    None => String::new(),
                };
                let waited = if stall.stalled {
                    "waited for it"
                } else {
                    "timed out waiting for it"
                };
                let mut lines = vec![format!(
                    "job failed: rank {}{place} {}: {ranks} {waiters} {waited}",
                    stall.rank,
                    stall.what_happened()
                )];
                if let Some(evidence) = &stall.evidence {
                    lines.push(format!("  {evidence}"));
                }
                lines
            }
            Failure::Node {
                node_rank,
                host,
                reason,
            } => vec![format!("job stopped by node {node_rank} ({host}): {reason}")],
        }
    }

    /// The rank this failure blames, if it blames one.
    pub(crate) fn root_rank(&self) -> Option<usize> {
        match self {
            Failure::Rank(failure) => Some(failure.rank),
            Failure::Unresponsive(stall) => Some(stall.rank),
            Failure::Node { .. } => None,
        }
    }

    /// Whether this failure should replace `published` as the job's root cause: both are rank
    /// failures and [`root_cause`] prefers this one to the one published before it, or this one
    /// is the unresponsive rank the published one waited for (or whose waiter it lost). A
    /// launcher's stop ([`Failure::Node`]) is never replaced and never replaces.
    pub(crate) fn replaces(&self, published: &Failure) -> bool {
        match (self, published) {
            (Failure::Rank(ours), Failure::Rank(theirs)) => root_cause(&[theirs, ours]) == Some(1),
            // The rank that timed out explains less than the rank it waited for, and so does a rank
            // that lost one of the ranks that waited for it (on another node, it exited first).
            (Failure::Unresponsive(stall), Failure::Rank(theirs)) => {
                stall.waiters.contains(&theirs.rank)
                    || theirs
                        .lost_peers()
                        .iter()
                        .any(|peer| *peer == stall.rank || stall.waiters.contains(peer))
            }
            // The same rank blamed, now by the node that runs it: with its process and state.
            (Failure::Unresponsive(ours), Failure::Unresponsive(theirs)) => {
                ours.rank == theirs.rank && ours.process.is_some() && theirs.process.is_none()
            }
            // A node whose own ranks all waited stopped the job first; the node that runs the rank
            // they waited for names it.
            (Failure::Unresponsive(stall), Failure::Node { reason, .. }) => {
                stall.stalled && reason.starts_with(STALL_STOP)
            }
            _ => false,
        }
    }

    /// What the store should hold instead of `published` once this node knows its own failure:
    /// this one when it [`replaces`](Failure::replaces) it, the two joined when they blame ranks
    /// of one chain of waiting ranks, or `None` to keep `published`.
    ///
    /// Each node sees only its own ranks' timeouts. When node 2's link is cut, rank 0 (node 0)
    /// may time out waiting for rank 1 while rank 1 (node 1) times out waiting for rank 2: node 0
    /// blames rank 1, node 1 blames rank 2. Rank 1 timed out itself, so it is not the cause: the
    /// blame goes to the end of the chain, and the ranks that waited on both sides are listed.
    /// Two nodes that blame each other's ranks (a cycle) keep the one published first.
    pub(crate) fn instead_of(&self, published: &Failure) -> Option<Failure> {
        let (Failure::Unresponsive(ours), Failure::Unresponsive(theirs)) = (self, published) else {
            return self.replaces(published).then(|| self.clone());
        };
        // `blamed` with the waiters of `other` too, when `other` blamed one of them (or the same rank).
        let joined = |blamed: &Unresponsive, other: &Unresponsive| {
            let chain = blamed.rank == other.rank
                || (blamed.waiters.contains(&other.rank) && !other.waiters.contains(&blamed.rank));
            chain.then(|| {
                let mut waiters: Vec<usize> = blamed.waiters.iter().chain(&other.waiters).copied().collect();
                waiters.retain(|&r| r != blamed.rank);
                waiters.sort_unstable();
                waiters.dedup();
                Unresponsive {
                    waiters,
                    ..blamed.clone()
                }
            })
        };
        let better = if self.replaces(published) || (ours.rank != theirs.rank && ours.waiters.contains(&theirs.rank)) {
            joined(ours, theirs)
        } else {
            joined(theirs, ours)
        }?;
        (better != *theirs).then_some(Failure::Unresponsive(better))
    }

    /// Serializes for the store.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Invariant: the types hold only strings and integers, which always serialize.
        serde_json::to_vec(self).expect("a failure report always serializes")
    }

    /// Parses what another launcher published; a garbled value still stops the job, with its text.
    pub(crate) fn from_json(bytes: &[u8], published_by: &str) -> Self {
        serde_json::from_slice(bytes).unwrap_or_else(|e| Failure::Node {
            node_rank: usize::MAX,
            host: published_by.to_owned(),
            reason: format!(
                "unreadable failure report in the store ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_failure_summary_names_rank_node_pid_cause_and_stderr() {
        let failure = Failure::Rank(RankFailure {
            rank: 3,
            node_rank: 1,
            local_rank: 1,
            pid: 4242,
            host: "gpu7".into(),
            cause: ExitCause::Signal {
                number: 9,
                name: signal_name(9),
                core_dumped: false,
            },
            runtime_ms: 1500,
            stderr_tail: vec!["boom".into()],
        });
        let text = failure.summary_lines().join("\n");
        assert!(text.contains("rank 3 (node 1, local rank 1, pid 4242 on gpu7) was killed by signal SIGKILL"));
        assert!(text.contains("[rank3]: boom"), "{text}");
        assert_eq!(Failure::from_json(&failure.to_json(), "x"), failure);
    }

    fn failed(rank: usize, cause: ExitCause, stderr: &[&str]) -> RankFailure {
        RankFailure {
            rank,
            node_rank: 0,
            local_rank: rank,
            pid: 100 + rank as u32,
            host: "h".into(),
            cause,
            runtime_ms: 10,
            stderr_tail: stderr.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn killed(number: i32) -> ExitCause {
        ExitCause::Signal {
            number,
            name: signal_name(number),
            core_dumped: false,
        }
    }

    const LOST_1: &str = "Error: rank 0: all_reduce #7: connection to peer 1 lost (early eof); that rank likely exited";

    #[test]
    fn the_lost_peers_are_read_from_the_messages_of_the_transport_and_the_collectives() {
        let f = failed(
            0,
            ExitCause::Code(1),
            &[
                LOST_1,
                "rank 0: cannot connect to peer 12 at 10.0.0.2:4000: refused",
                "rank 0: barrier #3 timed out after 5s waiting for peer 3 (nothing arrived)",
                "connection to peer 1 lost: again",
                "connection to peer x lost, peer 0 is this rank",
            ],
        );
        assert_eq!(f.lost_peers(), [1, 12, 3]);
        assert_eq!(f.lost_peers(), [1, 12, 3]);
        assert_eq!(f.waited_peers(), [3]);
        assert_eq!(
            f.brief(),
            "rank 0 (exited with code 1, lost peer 1, 12, timed out waiting for peer 3)"
        );
        assert!(failed(2, ExitCause::Code(1), &["boom"]).lost_peers().is_empty());
    }

    #[test]
    fn a_rank_killed_by_a_signal_beats_an_earlier_rank_that_exited_with_a_code() {
        let first = failed(0, ExitCause::Code(1), &["boom"]);
        let second = failed(1, killed(libc::SIGKILL), &[]);
        let third = failed(2, killed(libc::SIGSEGV), &[]);
        assert_eq!(root_cause(&[&first, &second, &third]), Some(1), "earliest signal");
        assert_eq!(root_cause(&[&first]), Some(0));
        assert_eq!(root_cause(&[]), None);
        let code_2 = failed(2, ExitCause::Code(2), &[]);
        assert_eq!(root_cause(&[&first, &code_2]), Some(0), "earliest code");
    }

    #[test]
    fn sigpipe_counts_like_an_exit_code() {
        let first = failed(0, ExitCause::Code(1), &["boom"]);
        let piped = failed(1, killed(libc::SIGPIPE), &[]);
        assert_eq!(root_cause(&[&first, &piped]), Some(0));
    }

    #[test]
    fn a_rank_that_lost_a_failed_peer_is_secondary_even_if_a_signal_killed_it() {
        let lost = failed(0, killed(libc::SIGABRT), &[LOST_1]);
        let peer = failed(1, ExitCause::Code(3), &[]);
        assert_eq!(root_cause(&[&lost, &peer]), Some(1));
        // Peer 1 did not fail: the message alone makes nobody secondary.
        let other = failed(2, ExitCause::Code(3), &[]);
        assert_eq!(root_cause(&[&lost, &other]), Some(0));
        // Two ranks that name each other: neither is left out.
        let mutual = failed(1, ExitCause::Code(1), &["rank 1: connection to peer 0 lost: reset"]);
        assert_eq!(root_cause(&[&lost, &mutual]), Some(0));
    }

    #[test]
    fn a_published_failure_is_replaced_only_by_a_preferred_rank_failure() {
        let lost = Failure::Rank(failed(0, ExitCause::Code(1), &[LOST_1]));
        let peer = Failure::Rank(failed(1, ExitCause::Code(3), &[]));
        let node = Failure::Node {
            node_rank: 1,
            host: "h".into(),
            reason: "its launcher received SIGINT".into(),
        };
        assert!(peer.replaces(&lost));
        assert!(!lost.replaces(&peer));
        assert!(!peer.replaces(&peer), "a tie keeps the published one");
        assert!(!peer.replaces(&node) && !node.replaces(&lost));
    }

    fn waited(rank: usize, peer: usize) -> RankFailure {
        let line =
            format!("Error: rank {rank}: all_reduce #9 timed out after 5s waiting for peer {peer} (nothing arrived)");
        failed(rank, ExitCause::Code(1), &[&line])
    }

    #[test]
    fn the_rank_everyone_timed_out_waiting_for_is_the_cause_although_it_never_exited() {
        // Rank 1 is stopped: rank 3 timed out first, waiting for rank 2, which waited for rank 0,
        // which waited for rank 1. The exits name three ranks; the cause is the fourth.
        let (r3, r2, r0) = (waited(3, 2), waited(2, 0), waited(0, 1));
        let failures = [&r3, &r2, &r0];
        assert_eq!(unresponsive_peer(&failures, &[]), Some((1, vec![0, 2, 3])));
        // Only rank 3's exit was seen: without the process states rank 2 is the one it waited
        // for; with them, the stopped rank 1 is the cause.
        assert_eq!(unresponsive_peer(&[&r3], &[]), Some((2, vec![3])));
        assert_eq!(unresponsive_peer(&[&r3], &[1]), Some((1, vec![3])));
        // The old rule alone blamed a rank that merely timed out.
        assert_eq!(root_cause(&failures), Some(2));
    }

    #[test]
    fn a_rank_that_failed_for_a_reason_of_its_own_is_not_replaced_by_a_stalled_peer() {
        let crashed = failed(2, killed(libc::SIGSEGV), &["boom"]);
        let r0 = waited(0, 1);
        assert_eq!(unresponsive_peer(&[&r0, &crashed], &[1]), None);
        // Ranks that lost a peer that exited are secondary as before: no stall.
        let lost = failed(0, ExitCause::Code(1), &[LOST_1]);
        let peer = failed(1, ExitCause::Code(3), &[]);
        assert_eq!(unresponsive_peer(&[&lost, &peer], &[]), None);
        // A timeout naming a rank that did fail is no stall either.
        let r1 = waited(1, 0);
        assert_eq!(unresponsive_peer(&[&r0, &r1], &[]), None);
    }

    #[test]
    fn a_stalled_rank_summary_says_it_was_stopped_and_who_waited_and_replaces_a_waiter() {
        let stall = Failure::Unresponsive(Unresponsive {
            rank: 1,
            waiters: vec![0, 2, 3],
            process: Some(UnresponsiveProcess {
                node_rank: 0,
                local_rank: 1,
                pid: 4242,
                host: "h".into(),
                state: Some('T'),
            }),
            evidence: Some("[rank0]: all_reduce #9 timed out after 5s waiting for peer 1".into()),
            stalled: false,
        });
        let head = &stall.summary_lines()[0];
        assert_eq!(
            head,
            "job failed: rank 1 (node 0, local rank 1, pid 4242 on h) was stopped (SIGSTOP) and did not respond: \
             ranks 0, 2, 3 timed out waiting for it"
        );
        assert_eq!(stall.root_rank(), Some(1));
        assert_eq!(Failure::from_json(&stall.to_json(), "x"), stall);
        let waiter = Failure::Rank(waited(3, 2));
        assert!(stall.replaces(&waiter) && !waiter.replaces(&stall));
        assert_eq!(
            waited(0, 1).brief(),
            "rank 0 (exited with code 1, timed out waiting for peer 1)"
        );
    }

    fn blamed(rank: usize, waiters: &[usize]) -> Failure {
        Failure::Unresponsive(Unresponsive {
            rank,
            waiters: waiters.to_vec(),
            process: None,
            evidence: Some(format!("waiting for peer {rank}")),
            stalled: false,
        })
    }

    #[test]
    fn nodes_that_blame_ranks_of_one_chain_end_with_the_last_rank_and_every_waiter() {
        // Node 2 cut off: rank 0 (node 0) timed out waiting for rank 1, rank 1 (node 1) waiting
        // for rank 2. In either order of publication the store ends blaming rank 2.
        let (node0, node1) = (blamed(1, &[0]), blamed(2, &[1]));
        let end = blamed(2, &[0, 1]);
        assert_eq!(node1.instead_of(&node0), Some(end.clone()));
        assert_eq!(node0.instead_of(&node1), Some(end.clone()));
        // Once joined, nothing changes it again (publishing ends).
        assert_eq!(node0.instead_of(&end), None);
        assert_eq!(node1.instead_of(&end), None);
        // Two nodes that blame each other's ranks: the first published stays.
        assert_eq!(blamed(0, &[1]).instead_of(&blamed(1, &[0])), None);
        // The same rank blamed by two nodes: the waiters of both.
        assert_eq!(blamed(3, &[2]).instead_of(&blamed(3, &[0])), Some(blamed(3, &[0, 2])));
        // Unrelated ranks, or a launcher's own stop: kept.
        assert_eq!(blamed(3, &[2]).instead_of(&blamed(1, &[0])), None);
        let node = Failure::Node {
            node_rank: 1,
            host: "h".into(),
            reason: "lost node 0's store".into(),
        };
        assert_eq!(blamed(2, &[1]).instead_of(&node), None);
        // Node 0's rank lost rank 1, which had timed out waiting for rank 2 and exited: published
        // first, node 0's failure gives way to node 1's.
        let lost_1 = Failure::Rank(failed(0, ExitCause::Code(1), &[LOST_1]));
        assert_eq!(node1.instead_of(&lost_1), Some(node1.clone()));
        assert_eq!(lost_1.instead_of(&node1), None);
        // A preferred rank failure still replaces as before.
        let lost = Failure::Rank(failed(0, ExitCause::Code(1), &[LOST_1]));
        let peer = Failure::Rank(failed(1, ExitCause::Code(3), &[]));
        assert_eq!(peer.instead_of(&lost), Some(peer.clone()));
        assert_eq!(lost.instead_of(&peer), None);
    }

    #[test]
    fn a_garbled_report_still_reads_as_a_failure() {
        let failure = Failure::from_json(b"not json", "node0");
        assert!(matches!(failure, Failure::Node { ref reason, .. } if reason.contains("not json")));
    }
}
