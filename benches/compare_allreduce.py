#!/usr/bin/env python3
"""burnrun's all-reduce against OpenMPI and torch.distributed gloo, measured side by side.

For each world size and each round, runs `burnrun --nproc-per-node N bench allreduce --json`,
benches/mpi_allreduce.c (built here with `mpicc -O2` into a temporary directory, run with
`mpirun -np N`) and benches/gloo_allreduce.py with the same sizes, iterations and warm-up, one
right after the other (the order rotates between rounds), then prints markdown tables per world
size: for the small sizes (up to --latency-max, 64 KiB by default) the median time of one
all-reduce, for the larger ones the median busbw; each with the median over rounds of the
per-round ratio peer time / burnrun time (the same number as burnrun busbw / peer busbw: above 1,
burnrun is faster), and the CPU time of one all-reduce summed over ranks. On a small shared machine
timings swing between runs; only ratios measured side by side mean much, and the CPU time is the
steadier measure of what an all-reduce costs.

Iterations: unless --iters/--warmup are given, every implementation follows burnrun's rule (1 GiB /
size timed iterations, 10..10000, a tenth as many warm-ups), except that gloo, at about a
millisecond per small all-reduce here, is capped so that one size's timed loop takes about
--gloo-max-seconds (2 s; at least 10 iterations): its means then rest on fewer calls.

MPI on one node runs over OpenMPI's shared-memory BTL (`vader`, with its default single-copy
mechanism, CMA, left on); `--mpi-args '--mca btl tcp,self'` makes it TCP only, to set against
`--env BURNRUN_SHM=0`. A peer whose tools are missing (no mpicc/mpirun; no torch) is skipped with
a line saying so; `--no-mpi` and `--no-gloo` skip them on purpose.

Usage (after `cargo build --release`):
  python3 benches/compare_allreduce.py --nprocs 2,4 --rounds 3
  python3 benches/compare_allreduce.py --nprocs 2,4 --rounds 3 --min-bytes 4 --max-bytes 256M --step-factor 4
  python3 benches/compare_allreduce.py --env BURNRUN_SHM=0 --mpi-args '--mca btl tcp,self'
  python3 benches/compare_allreduce.py --env BURNRUN_RING_THRESHOLD_BYTES=0 --no-gloo --no-mpi   # sweeps
"""
import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPI_SOURCE = os.path.join(HERE, "mpi_allreduce.c")
# Display names of the implementations, in table order.
NAMES = {"burnrun": "burnrun", "mpi": "MPI", "gloo": "gloo"}


def json_rows(text, label):
    """JSON objects of the output, one a line (a launcher's `[rank N]` prefix is skipped)."""
    rows = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            row = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "busbw_gbps" in row:
            rows.append(row)
    if not rows:
        sys.exit(f"{label}: no JSON rows in its output:\n{text[-2000:]}")
    return rows


def run(cmd, env_extra, timeout, label, stderr_log=None):
    """Runs one benchmark command; returns its rows by size. Exits on a failure, a timeout or a
    wrong element. `stderr_log`, a list, receives the command's stderr."""
    env = dict(os.environ, **env_extra)
    started = time.monotonic()
    try:
        # A new session, so that a timeout takes the whole process tree (mpirun's ranks, spawned
        # children) with it.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    except OSError as e:
        sys.exit(f"{label}: cannot start {shlex.join(cmd)}: {e}")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        sys.exit(f"{label}: no result within {timeout} s: {shlex.join(cmd)}")
    if stderr_log is not None:
        stderr_log.append(stderr)
    if proc.returncode != 0:
        sys.exit(f"{label} exited {proc.returncode}: {shlex.join(cmd)}\n{stdout[-2000:]}\n{stderr[-2000:]}")
    rows = json_rows(stdout, label)
    bad = [r for r in rows if r.get("wrong")]
    if bad:
        sys.exit(f"{label}: wrong results: {bad}")
    print(f"  {label}: {len(rows)} sizes in {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
    return {r["bytes"]: r for r in rows}


def kill_tree(proc):
    """TERM to the process group of `proc` (started with start_new_session), KILL after 5 s."""
    import signal
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def human(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}iB"
    return f"{n} B"


def cpu(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def duration(us):
    """A time in us as people read it: 3.1 us, 45 us, 1.25 ms, 2.31 s."""
    if us != us:  # NaN: not measured
        return "-"
    if us < 10:
        return f"{us:.1f} us"
    if us < 1000:
        return f"{us:.0f} us"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def mpi_missing():
    """Why OpenMPI cannot run here, or None."""
    missing = [tool for tool in ("mpicc", "mpirun") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install openmpi-bin libopenmpi-dev)"
    return None


def torch_missing():
    """Why gloo cannot run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return f"torch is not installed for {sys.executable} (pip install torch)"
    return None


def build_mpi(out_dir, timeout=120):
    """Compiles benches/mpi_allreduce.c with `mpicc -O2` into `out_dir`; returns the binary."""
    binary = os.path.join(out_dir, "mpi_allreduce")
    cmd = ["mpicc", "-O2", "-o", binary, MPI_SOURCE, "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"mpicc: not done within {timeout} s: {shlex.join(cmd)}")
    if done.returncode != 0:
        sys.exit(f"mpicc failed: {shlex.join(cmd)}\n{done.stderr[-2000:]}")
    return binary


def mpirun_prefix(n):
    """`mpirun -np N`, as root too, more ranks than cores allowed."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", *root, "--oversubscribe", "-np", str(n)]


def ratio_median(ours_runs, theirs_runs, size, key="time_us"):
    """Median over rounds of their time / our time at `size` (NaN when either is missing)."""
    ratios = [t[size][key] / o[size][key] for o, t in zip(ours_runs, theirs_runs)
              if size in o and size in t and o[size][key] > 0]
    return statistics.median(ratios) if ratios else float("nan")


def median_of(runs, size, key):
    values = [run[size][key] for run in runs if size in run and run[size].get(key) is not None]
    return statistics.median(values) if values else float("nan")


def print_tables(n, results, impls, rounds, note, latency_max):
    """Two markdown tables for `n` ranks: time per op up to `latency_max` bytes, busbw above."""
    ours_runs = results["burnrun"]
    peers = [i for i in impls if i != "burnrun"]
    sizes = sorted(ours_runs[0])
    small = [s for s in sizes if s <= latency_max]
    large = [s for s in sizes if s > latency_max]
    ratio_heads = [f"{NAMES[p]}/burnrun" for p in peers]
    cpu_heads = ["CPU/op burnrun"] + [NAMES[p] for p in peers]
    for part, part_sizes, what in (("time per all-reduce", small, "time_us"), ("busbw GB/s", large, "busbw_gbps")):
        if not part_sizes:
            continue
        print(f"\n### all-reduce, {n} ranks, {part} (f32, median of {rounds} rounds; {note})\n")
        heads = ["size"] + [NAMES[i] for i in impls] + ratio_heads + cpu_heads
        print("| " + " | ".join(heads) + " |")
        print("|" + "---:|" * len(heads))
        for size in part_sizes:
            cells = [human(size)]
            for impl in impls:
                value = median_of(results[impl], size, what)
                cells.append(duration(value) if what == "time_us" else f"{value:.3f}")
            for peer in peers:
                cells.append(f"{ratio_median(ours_runs, results[peer], size):.2f}x")
            for impl in impls:
                cells.append(cpu(median_of(results[impl], size, "cpu_us")))
            print("| " + " | ".join(cells) + " |")
    if peers:
        print(f"\nPeer/burnrun: median over rounds of the peer's time / burnrun's time (= burnrun busbw / "
              f"peer busbw); above 1, burnrun is faster. CPU/op: CPU time of one all-reduce summed over ranks.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", default="2,4", help="comma-separated world sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--step-factor", type=int, default=2)
    p.add_argument("--iters", type=int, help="timed iterations per size (default: burnrun's rule, 1 GiB / size, 10..10000)")
    p.add_argument("--warmup", type=int, help="untimed iterations per size (default: a tenth of the timed ones, >= 2)")
    p.add_argument("--gloo-max-seconds", type=float, default=2.0,
                   help="without --iters: cap gloo's iterations so one size's timed loop takes about this long (0: no cap)")
    p.add_argument("--burnrun-cmd", default="target/release/burnrun --nproc-per-node {n} bench allreduce",
                   help="command that runs burnrun's benchmark on {n} ranks (bench options are appended)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for burnrun's runs (e.g. BURNRUN_SEGMENT_BYTES=262144)")
    p.add_argument("--mpi", action=argparse.BooleanOptionalAction, default=None,
                   help="run OpenMPI too (default: when mpicc and mpirun are found)")
    p.add_argument("--mpi-args", default="", help="extra mpirun options, e.g. '--mca btl tcp,self'")
    p.add_argument("--no-gloo", action="store_true", help="skip torch.distributed gloo")
    p.add_argument("--latency-max", default="64K",
                   help="sizes up to this are tabled as time per op, larger ones as busbw (default 64K)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--raw", help="append every measured row (JSON lines, labelled) to this file")
    args = p.parse_args()

    sys.path.insert(0, HERE)
    from gloo_allreduce import parse_size  # noqa: E402  (same size syntax as burnrun's)
    latency_max = parse_size(args.latency_max)

    impls = ["burnrun"]
    if args.mpi is not False:
        why = mpi_missing()
        if why:
            print(f"MPI skipped: {why}", file=sys.stderr)
            if args.mpi:
                sys.exit("--mpi was asked for but OpenMPI is missing")
        else:
            impls.append("mpi")
    if not args.no_gloo:
        why = torch_missing()
        if why:
            print(f"gloo skipped: {why}", file=sys.stderr)
        else:
            impls.append("gloo")

    env_extra = dict(kv.split("=", 1) for kv in args.env)
    sizes_args = ["--min-bytes", args.min_bytes, "--max-bytes", args.max_bytes, "--step-factor", str(args.step_factor)]
    sizes_args += ["--iters", str(args.iters)] if args.iters is not None else []
    sizes_args += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    gloo_cap = ["--max-seconds", str(args.gloo_max_seconds)] if args.iters is None and args.gloo_max_seconds else []
    nprocs = [int(x) for x in args.nprocs.split(",")]
    results = {n: {impl: [] for impl in impls} for n in nprocs}
    with tempfile.TemporaryDirectory(prefix="burnrun-mpi-") as build_dir:
        mpi_binary = build_mpi(build_dir) if "mpi" in impls else None
        for rnd in range(args.rounds):
            for n in nprocs:
                commands = {
                    "burnrun": (shlex.split(args.burnrun_cmd.format(n=n)) + ["--json"] + sizes_args, env_extra),
                    "mpi": (mpirun_prefix(n) + shlex.split(args.mpi_args) + [mpi_binary or "-"] + sizes_args, {}),
                    "gloo": ([sys.executable, os.path.join(HERE, "gloo_allreduce.py"), "--nproc", str(n),
                              "--timeout", str(args.timeout)] + gloo_cap + sizes_args, {}),
                }
                k = rnd % len(impls)
                order = impls[k:] + impls[:k]
                print(f"round {rnd + 1}/{args.rounds}, {n} ranks: {', '.join(order)}", file=sys.stderr, flush=True)
                for name in order:
                    cmd, env = commands[name]
                    rows = run(cmd, env, args.timeout, f"{name} n={n}")
                    results[n][name].append(rows)
                    if args.raw:
                        with open(args.raw, "a") as f:
                            for r in rows.values():
                                f.write(json.dumps(dict(r, impl=name, round=rnd, env=env)) + "\n")

    notes = [f"burnrun: {' '.join(args.env) or 'defaults'}"]
    if "gloo" in impls and gloo_cap:
        notes.append(f"gloo: at most ~{args.gloo_max_seconds:g} s of timed calls per size")
    if "mpi" in impls:
        notes.append(f"MPI: OpenMPI {args.mpi_args or 'defaults (vader shared memory on one node)'}")
    note = "; ".join(notes)
    for n in nprocs:
        if len(impls) == 1:
            ours_runs = results[n]["burnrun"]
            print(f"\n### all-reduce, {n} ranks (f32, busbw GB/s, median of {args.rounds} rounds; {note})\n")
            print("| size | burnrun busbw | min | max |\n|---:|---:|---:|---:|")
            for size in sorted(ours_runs[0]):
                ours = [run[size]["busbw_gbps"] for run in ours_runs if size in run]
                print(f"| {human(size)} | {statistics.median(ours):.3f} | {min(ours):.3f} | {max(ours):.3f} |")
            continue
        print_tables(n, results[n], impls, args.rounds, note, latency_max)


if __name__ == "__main__":
    main()
