//! Errors of `burnrun bench`.

use crate::comm::CommError;

use super::options::BenchOp;

/// Why a benchmark failed. A benchmark whose results are wrong fails too: a fast wrong
/// collective is not a result.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A size argument does not parse.
    #[error("invalid size {input:?}: {reason}")]
    InvalidSize {
        /// What was given.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The options do not fit together or with the group.
    #[error("bench {op}: {reason}")]
    InvalidOptions {
        /// The operation.
        op: BenchOp,
        /// Every problem found.
        reason: String,
    },
    /// A collective failed.
    #[error("bench {op} at {bytes} bytes, {phase}: {source}")]
    Comm {
        /// The operation benchmarked.
        op: BenchOp,
        /// The buffer size in bytes.
        bytes: usize,
        /// What the benchmark was doing (`warm-up`, `timing`, `check`, `reducing the times`).
        phase: &'static str,
        /// The collective's error (it names the rank and peer).
        source: CommError,
    },
    /// Results were checked and some elements were wrong.
    #[error(
        "bench {op} on {ranks} ranks: wrong results at {} size(s): {}",
        failures.len(),
        failures.iter().map(|(bytes, wrong)| format!("{bytes} B ({wrong} wrong elements)")).collect::<Vec<_>>().join(", ")
    )]
    WrongResults {
        /// The operation.
        op: BenchOp,
        /// Number of ranks.
        ranks: usize,
        /// `(bytes, wrong elements summed over ranks)` for every failing size.
        failures: Vec<(usize, u64)>,
    },
    /// Writing the report failed.
    #[error("bench {op}: cannot write the report: {source}")]
    Output {
        /// The operation.
        op: BenchOp,
        /// The I/O error.
        source: std::io::Error,
    },
}
