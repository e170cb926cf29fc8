//! Names two layers must agree on without depending on each other.
//!
//! # Control lines
//!
//! A rank started by a launcher (which sets `BURNRUN_CONTROL_LINES=1`, see
//! [`crate::env::control_lines`]) may talk to its launcher through its own stdout and stderr: a line
//! that starts with [`CONTROL_PREFIX`] (ASCII 0x1E, "record separator", then `burnrun:`) followed by
//! one JSON object, a [`ControlLine`], is read by the launcher and never printed as it is. The
//! trainer's progress travels this way (the launcher draws the bar or writes plain lines), and so
//! does a switch to unprefixed output for machine-readable data (`bench --json`).

use serde::{Deserialize, Serialize};

// Shared-memory files: written by the transport, swept by the launcher after its ranks ended.

/// Directory the shared-memory files of a job live in.
pub const SHM_DIR: &str = "/dev/shm";

/// Smallest ring accepted (a power of two; it must hold at least one frame header).
pub const MIN_SHM_RING_BYTES: usize = 4096;

/// Prefix of the names (inside [`SHM_DIR`]) of every shared-memory file of run `run_id`. It ends
/// with a character the sanitised id cannot contain, so run `a` never matches run `a-b`.
pub fn shm_file_prefix(run_id: &str) -> String {
    let safe: String = run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("burnrun-{safe}.")
}

/// Prefix of the names of the shared-memory files of one rank of run `run_id` (a launcher sweeps
/// its own ranks' files only: two nodes of one run may share a host).
pub fn shm_rank_file_prefix(run_id: &str, rank: usize) -> String {
    format!("{}r{rank}-", shm_file_prefix(run_id))
}

/// What starts a control line: ASCII RS, then `burnrun:`. RS never starts a line a person writes.
pub const CONTROL_PREFIX: &str = "\u{1e}burnrun:";

/// indicatif's template of the training progress bar, the same whether rank 0 draws it (alone on
/// a terminal) or its launcher does.
pub const PROGRESS_BAR_TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  {msg}  ETA {eta}";

/// One message from a rank to its launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlLine {
    /// Progress moved: `step` of `total` steps done. Only a progress bar shows it; rate-limited
    /// by the rank (about ten a second).
    Tick {
        /// Steps done.
        step: u64,
        /// Steps of the run.
        total: u64,
    },
    /// A logged step, always sent: the bar's message, or a plain line ([`ControlLine::plain_step`]).
    Step {
        /// Steps done.
        step: u64,
        /// Steps of the run.
        total: u64,
        /// The step's metrics in words (`loss 0.1234  lr ...`).
        text: String,
    },
    /// Progress is over: a bar is finished and lines go below it.
    Done,
    /// From this line on, the stream it came on is copied unprefixed (`[rankN]: ` left out), so
    /// machine-readable output (JSON lines) reaches the launcher's stdout as the rank wrote it.
    RawStream,
}

impl ControlLine {
    /// The line to write (without its newline).
    pub fn encode(&self) -> String {
        // Invariant: the variants hold only integers and strings, which always serialize.
        let json = serde_json::to_string(self).expect("a control line serializes");
        format!("{CONTROL_PREFIX}{json}")
    }

    /// `None` if `line` is not a control line; otherwise the message, or why it does not parse.
    pub fn decode(line: &[u8]) -> Option<Result<Self, String>> {
        let body = line.strip_prefix(CONTROL_PREFIX.as_bytes())?;
        Some(serde_json::from_slice(body).map_err(|e| e.to_string()))
    }

    /// How a logged step reads as a plain line: `step     30/30  loss ...`.
    pub fn plain_step(step: u64, total: u64, text: &str) -> String {
        format!("step {step:>6}/{total}  {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_line_round_trips_and_other_lines_are_not_control_lines() {
        let step = ControlLine::Step {
            step: 3,
            total: 30,
            text: "loss 1.0".into(),
        };
        let line = step.encode();
        assert!(line.starts_with('\u{1e}') && !line.contains('\n'));
        assert_eq!(ControlLine::decode(line.as_bytes()), Some(Ok(step)));
        assert_eq!(ControlLine::decode(b"step 3/30 loss 1.0"), None);
        assert!(matches!(
            ControlLine::decode(b"\x1eburnrun:{\"kind\":\"nope\"}"),
            Some(Err(_))
        ));
    }
}
