//! What went wrong in a job, in a form every node's launcher can print: the first failure is
//! published in the store as JSON, so all nodes print the same summary.

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

/// Why a job stopped before all ranks succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// A rank exited non-zero or was killed.
    Rank(RankFailure),
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

impl Failure {
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
            Failure::Node {
                node_rank,
                host,
                reason,
            } => vec![format!("job stopped by node {node_rank} ({host}): {reason}")],
        }
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

    #[test]
    fn a_garbled_report_still_reads_as_a_failure() {
        let failure = Failure::from_json(b"not json", "node0");
        assert!(matches!(failure, Failure::Node { ref reason, .. } if reason.contains("not json")));
    }
}
