//! Benchmark results: one row per size, printed as nccl-tests' table or as JSON lines.

use std::io::Write;

use crate::comm::{DType, ReduceOp};

use super::options::{BenchOp, CollectiveBenchOptions};

/// The measurement of one operation at one size.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// The operation.
    pub op: BenchOp,
    /// Size in bytes (nccl-tests' convention: see [`BenchOp`]).
    pub bytes: usize,
    /// Elements in that buffer.
    pub count: usize,
    /// Element type.
    pub dtype: DType,
    /// Number of ranks.
    pub ranks: usize,
    /// Reduction operator, for the reducing operations.
    pub redop: Option<ReduceOp>,
    /// Root rank, for rooted operations.
    pub root: Option<usize>,
    /// Time of one operation in microseconds: the mean over the timed iterations on the slowest
    /// rank.
    pub time_us: f64,
    /// Algorithm bandwidth, `bytes / time`, in GB/s (10^9 bytes).
    pub algbw_gbps: f64,
    /// Bus bandwidth, `algbw` times the operation's [`BenchOp::bus_factor`], in GB/s.
    pub busbw_gbps: f64,
    /// Wrong elements summed over ranks; `None` when results were not checked.
    pub wrong: Option<u64>,
    /// CPU time of one operation in microseconds, summed over ranks (every thread of each rank's
    /// process): what it costs, whatever else the machine runs.
    pub cpu_us: f64,
}

/// The JSON line of a row, with its keys in a fixed order.
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    op: &'a str,
    bytes: usize,
    dtype: &'a str,
    ranks: usize,
    time_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: Option<u64>,
    cpu_us: f64,
}

impl BenchRow {
    /// The row as one JSON object (no newline):
    /// `{"op","bytes","dtype","ranks","time_us","algbw_gbps","busbw_gbps","wrong"}`;
    /// `wrong` is `null` when results were not checked; a last key, `cpu_us`, is the CPU time of one
    /// operation summed over ranks.
    pub fn to_json(&self) -> String {
        let row = JsonRow {
            op: self.op.name(),
            bytes: self.bytes,
            dtype: self.dtype.name(),
            ranks: self.ranks,
            time_us: round3(self.time_us),
            algbw_gbps: round3(self.algbw_gbps),
            busbw_gbps: round3(self.busbw_gbps),
            wrong: self.wrong,
            cpu_us: round3(self.cpu_us),
        };
        // Invariant: a struct of numbers and strings always serialises.
        serde_json::to_string(&row).expect("a benchmark row serialises to JSON")
    }

    /// The row as a line of the table (no newline).
    pub fn to_table_line(&self) -> String {
        let redop = self.redop.map_or("none", ReduceOp::name);
        let root = self.root.map_or_else(|| "-1".to_string(), |r| r.to_string());
        let wrong = self.wrong.map_or_else(|| "N/A".to_string(), |w| w.to_string());
        format!(
            "{:>12}  {:>12}  {:>5}  {:>5}  {:>4}  {:>11.2}  {:>11.3}  {:>11.3}  {:>6}",
            self.bytes,
            self.count,
            self.dtype.name(),
            redop,
            root,
            self.time_us,
            self.algbw_gbps,
            self.busbw_gbps,
            wrong
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How the run was set up, for the table's header.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo<'a> {
    pub(crate) opts: &'a CollectiveBenchOptions,
    pub(crate) ranks: usize,
    /// What runs the collectives and how it is tuned, for the `# engine:` line.
    pub(crate) engine: String,
    /// This rank's links (e.g. `shared memory to 1 peer(s)`).
    pub(crate) links: String,
}

/// The table's header: what was measured and how, then the column names.
pub(crate) fn write_header(out: &mut dyn Write, info: &RunInfo<'_>) -> std::io::Result<()> {
    let opts = info.opts;
    let n = info.ranks;
    writeln!(
        out,
        "# burnrun bench {}: {n} rank(s), dtype {}, {} timed iterations after {} warm-up, check {}",
        opts.op,
        opts.dtype,
        opts.iters
            .map_or_else(|| "1 GiB / size (10 to 10000)".to_string(), |n| n.to_string()),
        opts.warmup
            .map_or_else(|| "a tenth as many".to_string(), |n| n.to_string()),
        if opts.check { "on" } else { "off" }
    )?;
    writeln!(out, "# engine: {}", info.engine)?;
    if !info.links.is_empty() {
        writeln!(out, "# rank 0 links: {}", info.links)?;
    }
    let what = match opts.op {
        BenchOp::AllReduce => "in-place sum; busbw = algbw * 2(n-1)/n".to_string(),
        BenchOp::AllGather => "size = the gathered buffer; busbw = algbw * (n-1)/n".to_string(),
        BenchOp::ReduceScatter => "sum; size = the input buffer; busbw = algbw * (n-1)/n".to_string(),
        BenchOp::Broadcast => format!("root {}; busbw = algbw", opts.root),
        BenchOp::AllToAll => "size = each rank's whole buffer; busbw = algbw * (n-1)/n".to_string(),
        BenchOp::SendRecv => {
            "ring: rank r sends to r+1 while it receives from r-1 (both at once); busbw = algbw".to_string()
        }
    };
    writeln!(out, "# {what}")?;
    writeln!(
        out,
        "# time: mean of the back-to-back timed iterations, slowest rank; GB/s = 10^9 B/s"
    )?;
    writeln!(out, "#")?;
    writeln!(
        out,
        "# {:>10}  {:>12}  {:>5}  {:>5}  {:>4}  {:>11}  {:>11}  {:>11}  {:>6}",
        "size(B)", "count", "type", "redop", "root", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
    )
}

/// The footer: nccl-tests' average bus bandwidth and the number of wrong elements.
pub(crate) fn write_footer(out: &mut dyn Write, rows: &[BenchRow]) -> std::io::Result<()> {
    let avg = if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len() as f64
    };
    let wrong: u64 = rows.iter().filter_map(|r| r.wrong).sum();
    writeln!(
        out,
        "# out of bounds values : {wrong} {}",
        if wrong == 0 { "OK" } else { "FAILED" }
    )?;
    writeln!(out, "# avg bus bandwidth    : {avg:.3} GB/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> BenchRow {
        BenchRow {
            op: BenchOp::AllReduce,
            bytes: 4096,
            count: 1024,
            dtype: DType::F32,
            ranks: 2,
            redop: Some(ReduceOp::Sum),
            root: None,
            time_us: 12.3456,
            algbw_gbps: 0.33178,
            busbw_gbps: 0.33178,
            wrong: Some(0),
            cpu_us: 20.5,
        }
    }

    #[test]
    fn a_json_row_has_the_documented_keys_in_order() {
        assert_eq!(
            row().to_json(),
            concat!(
                r#"{"op":"allreduce","bytes":4096,"dtype":"f32","ranks":2,"time_us":12.346,"#,
                r#""algbw_gbps":0.332,"busbw_gbps":0.332,"wrong":0,"cpu_us":20.5}"#
            )
        );
        let unchecked = BenchRow { wrong: None, ..row() };
        assert!(unchecked.to_json().ends_with(r#""wrong":null,"cpu_us":20.5}"#));
    }

    #[test]
    fn a_table_line_lines_up_with_the_header() {
        let opts = CollectiveBenchOptions::new(BenchOp::AllReduce);
        let info = RunInfo {
            opts: &opts,
            ranks: 2,
            engine: "tcp".into(),
            links: String::new(),
        };
        let mut header = Vec::new();
        write_header(&mut header, &info).unwrap();
        let header = String::from_utf8(header).unwrap();
        let columns = header.lines().last().unwrap();
        let line = row().to_table_line();
        assert_eq!(columns.len(), line.len(), "\n{columns}\n{line}");
        assert!(line.contains(" sum ") && line.trim_end().ends_with('0'));
    }
}
