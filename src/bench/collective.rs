//! `burnrun bench <op>`: nccl-tests' measurement of one collective over a range of sizes.
//!
//! For each size every rank fills its buffers, runs `warmup` untimed iterations, meets the others
//! at a barrier and times `iters` back-to-back iterations. A rank's time is the mean of its
//! iterations; the reported time is the slowest rank's (a MAX all-reduce of the times, as
//! nccl-tests does), since a collective is done when its last rank is. Then the buffers are
//! filled again, the operation runs once more, and every rank counts the elements that differ
//! from the exact expected result; the counts are summed over ranks.

use std::io::Write;
use std::time::Instant;

use crate::comm::{BufMut, CommError, Communicator, Hierarchy, ProcessGroup, ReduceOp, Tuning};
use crate::env::DistEnv;
use crate::names::ControlLine;

use super::buffers::{OpBuffers, Workload};
use super::error::BenchError;
use super::options::{BenchDevice, BenchOp, CollectiveBenchOptions};
use super::report::{write_footer, write_header, BenchRow, RunInfo};
use super::values::with_bench_value;

/// Runs the benchmark on every rank of `pg` and prints the table (or JSON lines) on rank 0's
/// stdout. Every rank returns the same rows. Fails if a collective fails or, when results are
/// checked, if any element was wrong (after printing every row).
pub fn run_collective(pg: &ProcessGroup, opts: &CollectiveBenchOptions) -> Result<Vec<BenchRow>, BenchError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_collective_to(pg, opts, &engine_tuning(), &mut out)
}

/// [`run_collective`], writing rank 0's report to `out`; `tuning` is the engine's, for the header.
pub fn run_collective_to(
    pg: &ProcessGroup,
    opts: &CollectiveBenchOptions,
    tuning: &Tuning,
    out: &mut dyn Write,
) -> Result<Vec<BenchRow>, BenchError> {
    opts.validate(pg.world_size())?;
    if opts.device != BenchDevice::Cpu {
        return Err(BenchError::InvalidOptions {
            op: opts.op,
            reason: format!(
                "--device {} does not run on a process group of the CPU engine (the binary sends it to NCCL)",
                opts.device
            ),
        });
    }
    let info = RunInfo {
        opts,
        ranks: pg.world_size(),
        engine: format!(
            "{}, ring threshold {} B (all-reduce: recursive doubling below, ring from there), segment {} B, \
             hierarchical {}",
            pg.communicator().backend(),
            tuning.ring_threshold_bytes,
            tuning.segment_bytes,
            tuning.hierarchical.name()
        ),
        links: pg.communicator().links(),
    };
    with_bench_value!(opts.dtype, T => run_sweep(pg.communicator(), &info, out, |count| {
        Ok(OpBuffers::<T>::new(pg, opts.op, opts.root, count))
    }))
}

/// The CPU engine's tuning as `burnrun::init()` sets it: the defaults, overridden by
/// `BURNRUN_RING_THRESHOLD_BYTES`, `BURNRUN_SEGMENT_BYTES` and `BURNRUN_HIERARCHICAL`, the segment rounded down to a
/// multiple of 8 bytes.
pub fn engine_tuning() -> Tuning {
    let mut tuning = Tuning::default();
    if let Ok(env) = DistEnv::from_env() {
        tuning.ring_threshold_bytes = env.ring_threshold_bytes.unwrap_or(tuning.ring_threshold_bytes);
        tuning.segment_bytes = env.segment_bytes.unwrap_or(tuning.segment_bytes);
        tuning.hierarchical = Hierarchy::from_switch(env.hierarchical);
    }
    tuning.segment_bytes = (tuning.segment_bytes / 8 * 8).max(8);
    tuning
}

/// Element counts to time: each size in whole elements; for the chunked operations a multiple of
/// the world size (at least one element per rank). Sizes that round to the same count are timed
/// once.
fn element_counts(opts: &CollectiveBenchOptions, world_size: usize) -> Vec<usize> {
    let elem = opts.dtype.size_bytes();
    let mut counts: Vec<usize> = opts
        .sizes()
        .into_iter()
        .map(|bytes| {
            let count = bytes / elem;
            if opts.op.chunked() {
                (count / world_size * world_size).max(world_size)
            } else {
                count.max(1)
            }
        })
        .collect();
    counts.dedup();
    counts
}

/// The sweep over sizes, whatever memory the buffers live in: `make(count)` builds one size's
/// buffers; `control` (the same group) carries the barrier and the reductions of times and
/// wrong counts. Rank 0 writes the header, a row per size as it is measured, and the footer.
pub(crate) fn run_sweep<W: Workload>(
    control: &dyn Communicator,
    info: &RunInfo<'_>,
    out: &mut dyn Write,
    mut make: impl FnMut(usize) -> Result<W, CommError>,
) -> Result<Vec<BenchRow>, BenchError> {
    let opts = info.opts;
    let ranks = control.world_size();
    let printer = control.rank() == 0;
    let io = |source| BenchError::Output { op: opts.op, source };
    if printer && !opts.json {
        write_header(out, info).map_err(io)?;
    }
    if printer && opts.json && crate::env::control_lines() {
        // Under a launcher: the JSON lines must reach its stdout as written, without `[rank0]: `.
        writeln!(out, "{}", ControlLine::RawStream.encode()).map_err(io)?;
    }
    let mut rows = Vec::new();
    for count in element_counts(opts, ranks) {
        let bytes = count * opts.dtype.size_bytes();
        let mut workload = make(count).map_err(|source| BenchError::Comm {
            op: opts.op,
            bytes,
            phase: "allocating the buffers",
            source,
        })?;
        let row = measure(control, opts, count, &mut workload)?;
        // The buffers go before the next size's are made: on a device both may not fit.
        drop(workload);
        if printer {
            let line = if opts.json { row.to_json() } else { row.to_table_line() };
            writeln!(out, "{line}").and_then(|()| out.flush()).map_err(io)?;
        }
        rows.push(row);
    }
    if printer && !opts.json {
        write_footer(out, &rows).map_err(io)?;
        out.flush().map_err(io)?;
    }
    let failures: Vec<(usize, u64)> = rows
        .iter()
        .filter_map(|r| r.wrong.filter(|&w| w > 0).map(|w| (r.bytes, w)))
        .collect();
    if failures.is_empty() {
        Ok(rows)
    } else {
        Err(BenchError::WrongResults {
            op: opts.op,
            ranks,
            failures,
        })
    }
}

/// Times and checks one size.
fn measure<W: Workload>(
    control: &dyn Communicator,
    opts: &CollectiveBenchOptions,
    count: usize,
    buffers: &mut W,
) -> Result<BenchRow, BenchError> {
    let bytes = count * opts.dtype.size_bytes();
    let fail = |phase: &'static str| {
        move |source: CommError| BenchError::Comm {
            op: opts.op,
            bytes,
            phase,
            source,
        }
    };
    let world_size = control.world_size();

    let (iters, warmup) = opts.iterations(bytes);
    for _ in 0..warmup {
        buffers.step().map_err(fail("warm-up"))?;
    }
    control.barrier().map_err(fail("barrier before timing"))?;
    let cpu_start = process_cpu_us();
    let start = Instant::now();
    for _ in 0..iters {
        buffers.step().map_err(fail("timing"))?;
    }
    let local_us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
    let local_cpu_us = (process_cpu_us() - cpu_start) / iters as f64;
    let mut slowest_us = [local_us];
    control
        .all_reduce(BufMut::host(&mut slowest_us), ReduceOp::Max)
        .map_err(fail("reducing the times"))?;
    let time_us = slowest_us[0];
    let mut total_cpu_us = [local_cpu_us];
    control
        .all_reduce(BufMut::host(&mut total_cpu_us), ReduceOp::Sum)
        .map_err(fail("summing the CPU times"))?;

    let wrong = if opts.check {
        buffers.fill().map_err(fail("filling the buffers"))?;
        buffers.step().map_err(fail("check"))?;
        let mut wrong = [buffers.count_wrong().map_err(fail("reading the result"))? as i64];
        control
            .all_reduce(BufMut::host(&mut wrong), ReduceOp::Sum)
            .map_err(fail("summing the wrong counts"))?;
        Some(wrong[0] as u64)
    } else {
        None
    };

    let algbw_gbps = if time_us > 0.0 {
        bytes as f64 / (time_us * 1e-6) / 1e9
    } else {
        0.0
    };
    let reducing = matches!(opts.op, BenchOp::AllReduce | BenchOp::ReduceScatter);
    Ok(BenchRow {
        op: opts.op,
        bytes,
        count,
        dtype: opts.dtype,
        ranks: world_size,
        redop: reducing.then_some(ReduceOp::Sum),
        root: (opts.op == BenchOp::Broadcast).then_some(opts.root),
        time_us,
        algbw_gbps,
        busbw_gbps: algbw_gbps * opts.op.bus_factor(world_size),
        wrong,
        cpu_us: total_cpu_us[0],
    })
}

/// CPU time this process (every thread) has used, in microseconds. On a shared machine the wall
/// time of a collective swings with the load; the CPU it costs much less.
fn process_cpu_us() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec that outlives the call; the clock id is a
    // constant every Linux kernel supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return 0.0;
    }
    now.tv_sec as f64 * 1e6 + now.tv_nsec as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{spawn_ranks, DType, InitOptions};

    #[test]
    fn counts_of_chunked_operations_are_whole_chunks_per_rank() {
        let mut opts = CollectiveBenchOptions::new(BenchOp::AllGather);
        opts.min_bytes = 4;
        opts.max_bytes = 4096;
        opts.step_factor = 4;
        let counts = element_counts(&opts, 3);
        assert_eq!(counts, vec![3, 3 * 5, 3 * 21, 3 * 85, 3 * 341]);
        opts.op = BenchOp::AllReduce;
        assert_eq!(element_counts(&opts, 3), vec![1, 4, 16, 64, 256, 1024]);
    }

    #[test]
    fn every_operation_and_dtype_checks_clean_on_two_and_three_ranks() {
        // Small segments, and a threshold inside the range, so both algorithms and the
        // multi-segment paths run.
        let tuning = Tuning {
            ring_threshold_bytes: 2048,
            segment_bytes: 512,
            ..Default::default()
        };
        let init = InitOptions {
            tuning,
            ..Default::default()
        };
        for n in [2, 3] {
            for (op, dtype) in BenchOp::ALL
                .into_iter()
                .flat_map(|op| DType::ALL.map(|dtype| (op, dtype)))
            {
                let opts = CollectiveBenchOptions {
                    min_bytes: 100,
                    max_bytes: 8000,
                    step_factor: 4,
                    iters: Some(2),
                    warmup: Some(1),
                    dtype,
                    root: n - 1,
                    ..CollectiveBenchOptions::new(op)
                };
                let results = spawn_ranks(n, &init, |pg| {
                    let mut out = Vec::new();
                    let rows = run_collective_to(&pg, &opts, &tuning, &mut out);
                    (rows.map_err(|e| e.to_string()), String::from_utf8(out).unwrap())
                })
                .unwrap();
                let what = format!("{n} ranks, {op} {dtype}");
                let (rows, table) = &results[0];
                let rows = rows.as_ref().unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(rows.len(), 4, "{what}");
                assert!(
                    rows.iter().all(|r| r.wrong == Some(0) && r.time_us > 0.0),
                    "{what}: {rows:?}"
                );
                assert!(
                    table.contains(&format!("bench {op}")) && table.contains("OK"),
                    "{table}"
                );
                assert!(results[1].1.is_empty(), "only rank 0 prints");
            }
        }
    }

    #[test]
    fn json_lines_parse_and_a_single_rank_runs_in_process() {
        let opts = CollectiveBenchOptions {
            max_bytes: 16 << 10,
            iters: Some(2),
            warmup: Some(0),
            json: true,
            ..CollectiveBenchOptions::new(BenchOp::AllReduce)
        };
        let out = spawn_ranks(1, &InitOptions::default(), |pg| {
            let mut out = Vec::new();
            run_collective_to(&pg, &opts, &Tuning::default(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        })
        .unwrap();
        let lines: Vec<serde_json::Value> = out[0].lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["bytes"], 16384);
        assert_eq!(lines[0]["wrong"], 0);
        assert_eq!(lines[0]["busbw_gbps"], 0.0);
    }

    #[test]
    fn sendrecv_on_one_rank_is_refused_before_anything_runs() {
        let opts = CollectiveBenchOptions::new(BenchOp::SendRecv);
        let out = spawn_ranks(1, &InitOptions::default(), |pg| {
            run_collective_to(&pg, &opts, &Tuning::default(), &mut Vec::new())
                .unwrap_err()
                .to_string()
        })
        .unwrap();
        assert!(out[0].contains("at least 2 ranks"), "{}", out[0]);
    }
}
