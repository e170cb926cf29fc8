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
    #[error("bench {op} on {ranks} ranks: wrong results at {} size(s): {}", failures.len(), list_failures(failures))]
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

fn list_failures(failures: &[(usize, u64)]) -> String {
    let sizes: Vec<String> = failures
        .iter()
        .map(|(bytes, wrong)| format!("{bytes} B ({wrong} wrong elements)"))
        .collect();
    sizes.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_results_name_every_failing_size() {
        let err = BenchError::WrongResults {
            op: BenchOp::AllGather,
            ranks: 3,
            failures: vec![(4096, 7), (8192, 1)],
        };
        assert_eq!(
            err.to_string(),
            "bench allgather on 3 ranks: wrong results at 2 size(s): 4096 B (7 wrong elements), 8192 B (1 wrong elements)"
        );
    }
}
