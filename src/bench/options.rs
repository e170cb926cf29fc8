//! What `burnrun bench <op>` measures: the operation, the sizes, the iterations and the dtype.

use crate::comm::DType;

use super::error::BenchError;

/// The collective a benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum BenchOp {
    /// In-place sum all-reduce.
    #[value(name = "allreduce", alias = "all-reduce", alias = "all_reduce")]
    AllReduce,
    /// All-gather; the size is the gathered (output) buffer.
    #[value(name = "allgather", alias = "all-gather", alias = "all_gather")]
    AllGather,
    /// Sum reduce-scatter; the size is the input buffer.
    #[value(name = "reducescatter", alias = "reduce-scatter", alias = "reduce_scatter")]
    ReduceScatter,
    /// Broadcast from `--root`.
    #[value(name = "broadcast")]
    Broadcast,
    /// All-to-all; the size is each rank's whole buffer (one chunk per peer).
    #[value(name = "alltoall", alias = "all-to-all", alias = "all_to_all")]
    AllToAll,
    /// Ring send/receive: every rank sends to rank + 1 while it receives from rank - 1.
    #[value(name = "sendrecv", alias = "send-recv", alias = "send_recv")]
    SendRecv,
}

impl BenchOp {
    /// Every operation, in the order `bench` documents them.
    pub const ALL: [BenchOp; 6] = [
        BenchOp::AllReduce,
        BenchOp::AllGather,
        BenchOp::ReduceScatter,
        BenchOp::Broadcast,
        BenchOp::AllToAll,
        BenchOp::SendRecv,
    ];

    /// The name used on the command line and in JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "allreduce",
            BenchOp::AllGather => "allgather",
            BenchOp::ReduceScatter => "reducescatter",
            BenchOp::Broadcast => "broadcast",
            BenchOp::AllToAll => "alltoall",
            BenchOp::SendRecv => "sendrecv",
        }
    }

    /// nccl-tests' bus-bandwidth factor for `world_size` ranks: the fraction of the buffer each
    /// rank's busiest link carries, so that busbw compares with the hardware's bandwidth whatever
    /// the number of ranks. All-reduce moves 2(n-1)/n of the buffer (reduce-scatter, then
    /// all-gather); all-gather, reduce-scatter and all-to-all (n-1)/n (every chunk but one's own);
    /// broadcast and send/recv the whole buffer once.
    pub fn bus_factor(self, world_size: usize) -> f64 {
        let n = world_size.max(1) as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (n - 1.0) / n,
            BenchOp::AllGather | BenchOp::ReduceScatter | BenchOp::AllToAll => (n - 1.0) / n,
            BenchOp::Broadcast | BenchOp::SendRecv => 1.0,
        }
    }

    /// True for operations whose buffer is cut into one chunk per rank, so its element count
    /// must be a multiple of the world size.
    pub const fn chunked(self) -> bool {
        matches!(self, BenchOp::AllGather | BenchOp::ReduceScatter | BenchOp::AllToAll)
    }
}

impl std::fmt::Display for BenchOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the benchmark's buffers live and what moves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum BenchDevice {
    /// Host memory, burnrun's own engine (shared memory between ranks of a host, TCP between
    /// hosts).
    #[default]
    #[value(name = "cpu", alias = "host")]
    Cpu,
    /// CUDA device memory, NCCL (feature `nccl`): each rank on device `LOCAL_RANK`.
    #[value(name = "cuda")]
    Cuda,
}

impl BenchDevice {
    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BenchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default smallest size: 4 KiB.
pub const DEFAULT_MIN_BYTES: usize = 4 << 10;
/// Default largest size: 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Default growth factor between sizes.
pub const DEFAULT_STEP_FACTOR: usize = 2;
/// Bytes one size's timed iterations move when `--iters` is not given: iterations =
/// `AUTO_ITER_BYTES / size`, clamped to [`MIN_AUTO_ITERS`, `MAX_AUTO_ITERS`]. A fixed count (20,
/// the old default) times a 4 KiB all-reduce for a fraction of a millisecond, where one wake-up
/// of a descheduled rank weighs as much as the whole loop; nccl-tests and OSU run thousands of
/// small iterations for the same reason. `benches/mpi_allreduce.c` and `benches/gloo_allreduce.py`
/// use the same rule, so the peers are timed alike.
pub const AUTO_ITER_BYTES: usize = 1 << 30;
/// Fewest timed iterations of the automatic rule (the largest sizes).
pub const MIN_AUTO_ITERS: usize = 10;
/// Most timed iterations of the automatic rule (the smallest sizes).
pub const MAX_AUTO_ITERS: usize = 10_000;

/// Timed iterations for a buffer of `bytes` when `--iters` is not given (see [`AUTO_ITER_BYTES`]).
pub fn auto_iters(bytes: usize) -> usize {
    (AUTO_ITER_BYTES / bytes.max(1)).clamp(MIN_AUTO_ITERS, MAX_AUTO_ITERS)
}

/// Untimed iterations before `iters` timed ones when `--warmup` is not given: a tenth, at least 2.
pub fn auto_warmup(iters: usize) -> usize {
    (iters / 10).max(2)
}

/// Options of `burnrun bench <op>` (nccl-tests' flags, with burnrun's names).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct CollectiveBenchOptions {
    /// The collective to time.
    #[arg(value_enum)]
    pub op: BenchOp,
    /// Smallest buffer size in bytes (accepts 4K, 1M, 64M, 1G or plain bytes; K = 1024).
    #[arg(long, short = 'b', default_value = "4K", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest buffer size in bytes (same units as --min-bytes).
    #[arg(long, short = 'e', default_value = "64M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Each size is this many times the previous one.
    #[arg(long, short = 'f', default_value_t = DEFAULT_STEP_FACTOR)]
    pub step_factor: usize,
    /// Timed iterations per size (the reported time is their mean, the slowest rank's); default:
    /// 1 GiB / size, between 10 and 10000.
    #[arg(long, short = 'n')]
    pub iters: Option<usize>,
    /// Untimed iterations per size before the timed ones; default: a tenth of the timed ones, at
    /// least 2.
    #[arg(long, short = 'w')]
    pub warmup: Option<usize>,
    /// Element type (f32, f64, f16, bf16, i32, i64, u8).
    #[arg(long, short = 'd', default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Print one JSON object a line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Skip checking the results (they are checked by default, and a wrong element makes the
    /// command fail); `#wrong` then reads N/A.
    #[arg(long = "no-check", action = clap::ArgAction::SetFalse)]
    pub check: bool,
    /// Root rank of broadcast.
    #[arg(long, default_value_t = 0)]
    pub root: usize,
    /// Where the buffers live: `cpu` (burnrun's engine) or `cuda` (NCCL on device LOCAL_RANK;
    /// needs a build with the `nccl` feature and one GPU per rank).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
}

impl CollectiveBenchOptions {
    /// The defaults for `op`: 4 KiB to 64 MiB, doubling, iterations by size ([`auto_iters`]),
    /// f32, checked, root 0, on the CPU.
    pub fn new(op: BenchOp) -> Self {
        Self {
            op,
            min_bytes: DEFAULT_MIN_BYTES,
            max_bytes: DEFAULT_MAX_BYTES,
            step_factor: DEFAULT_STEP_FACTOR,
            iters: None,
            warmup: None,
            dtype: DType::F32,
            json: false,
            check: true,
            root: 0,
            device: BenchDevice::Cpu,
        }
    }

    /// Timed and untimed iterations for a buffer of `bytes`.
    pub fn iterations(&self, bytes: usize) -> (usize, usize) {
        let iters = self.iters.unwrap_or_else(|| auto_iters(bytes));
        (iters, self.warmup.unwrap_or_else(|| auto_warmup(iters)))
    }

    /// Checks the options against the group size; the error names every offending value.
    pub fn validate(&self, world_size: usize) -> Result<(), BenchError> {
        let mut problems = Vec::new();
        if self.min_bytes == 0 {
            problems.push("--min-bytes must be at least 1".to_string());
        }
        if self.min_bytes > self.max_bytes {
            problems.push(format!(
                "--min-bytes {} is above --max-bytes {}",
                self.min_bytes, self.max_bytes
            ));
        }
        if self.step_factor < 2 {
            problems.push(format!("--step-factor {} must be at least 2", self.step_factor));
        }
        if self.iters == Some(0) {
            problems.push("--iters must be at least 1".to_string());
        }
        if self.root >= world_size {
            problems.push(format!("--root {} is not a rank of the {world_size} ranks", self.root));
        }
        if self.op == BenchOp::SendRecv && world_size < 2 {
            problems.push("sendrecv needs at least 2 ranks (try --nproc-per-node 2)".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BenchError::InvalidOptions {
                op: self.op,
                reason: problems.join("; "),
            })
        }
    }

    /// The buffer sizes to time, in bytes, before rounding to whole elements: `min_bytes`,
    /// then times `step_factor` while at most `max_bytes`.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut bytes = self.min_bytes.max(1);
        while bytes <= self.max_bytes {
            sizes.push(bytes);
            match bytes.checked_mul(self.step_factor.max(2)) {
                Some(next) => bytes = next,
                None => break,
            }
        }
        sizes
    }
}

/// Parses a byte size: plain bytes (`4096`) or a number with a binary unit, `K`, `M`, `G`
/// (powers of 1024; `KB`, `KiB` and lowercase are accepted too), like nccl-tests' `-b 4K -e 64M`.
pub fn parse_size(s: &str) -> Result<usize, BenchError> {
    let invalid = |reason: &str| BenchError::InvalidSize {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    let text = s.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(invalid("expected a number of bytes, optionally followed by K, M or G"));
    }
    let value: usize = number
        .parse()
        .map_err(|_| invalid("the number does not fit in a usize"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(invalid("unknown unit (expected K, M or G, powers of 1024)")),
    };
    value
        .checked_mul(1usize << shift)
        .ok_or_else(|| invalid("the size does not fit in a usize"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_plain_bytes_and_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size(" 8KB ").unwrap(), 8192);
    }

    #[test]
    fn a_malformed_size_is_rejected_with_the_input_in_the_message() {
        for bad in ["", "K", "4X", "1.5M", "-4K", "99999999999999999999G"] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn iterations_scale_with_the_size_unless_given() {
        let mut opts = CollectiveBenchOptions::new(BenchOp::AllReduce);
        assert_eq!(opts.iterations(4), (MAX_AUTO_ITERS, MAX_AUTO_ITERS / 10));
        assert_eq!(opts.iterations(1 << 20), (1024, 102));
        assert_eq!(opts.iterations(256 << 20), (MIN_AUTO_ITERS, 2));
        opts.iters = Some(7);
        assert_eq!(opts.iterations(4), (7, 2));
        opts.warmup = Some(0);
        assert_eq!(opts.iterations(1 << 30), (7, 0));
    }

    #[test]
    fn sizes_double_from_min_to_max_inclusive() {
        let mut opts = CollectiveBenchOptions::new(BenchOp::AllReduce);
        opts.min_bytes = 4 << 10;
        opts.max_bytes = 64 << 10;
        assert_eq!(opts.sizes(), vec![4096, 8192, 16384, 32768, 65536]);
        opts.step_factor = 4;
        assert_eq!(opts.sizes(), vec![4096, 16384, 65536]);
    }

    #[test]
    fn invalid_options_name_every_problem() {
        let mut opts = CollectiveBenchOptions::new(BenchOp::SendRecv);
        opts.min_bytes = 8;
        opts.max_bytes = 4;
        opts.iters = Some(0);
        opts.root = 3;
        let err = opts.validate(1).unwrap_err().to_string();
        for needle in ["--min-bytes 8", "--iters", "--root 3", "at least 2 ranks"] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(BenchOp::AllReduce.bus_factor(4), 1.5);
        assert_eq!(BenchOp::AllGather.bus_factor(4), 0.75);
        assert_eq!(BenchOp::ReduceScatter.bus_factor(2), 0.5);
        assert_eq!(BenchOp::AllToAll.bus_factor(4), 0.75);
        assert_eq!(BenchOp::Broadcast.bus_factor(4), 1.0);
        assert_eq!(BenchOp::SendRecv.bus_factor(2), 1.0);
        assert_eq!(BenchOp::AllReduce.bus_factor(1), 0.0);
    }
}
