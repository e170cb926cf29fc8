#!/usr/bin/env python3
"""burnrun's all-reduce against torch.distributed gloo, measured side by side.

For each world size and each round, runs `burnrun --nproc-per-node N bench allreduce --json` and
benches/gloo_allreduce.py with the same sizes, iterations and warm-up, one right after the other
(the order alternates between rounds), then prints a markdown table per world size: the median
busbw over rounds of each, the median over rounds of the per-round ratio burnrun/gloo, and the
CPU time of one all-reduce (summed over ranks) of each, with gloo/burnrun as the CPU ratio. On a
small shared machine timings swing between runs; only ratios measured side by side mean much, and
the CPU time is the steadier measure of what an all-reduce costs.

Usage (after `cargo build --release`):
  python3 benches/compare_allreduce.py --nprocs 2,4 --rounds 3
  python3 benches/compare_allreduce.py --env BURNRUN_RING_THRESHOLD_BYTES=0 --no-gloo   # sweeps
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


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


def run(cmd, env_extra, timeout, label):
    env = dict(os.environ, **env_extra)
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{label}: no result within {timeout} s: {shlex.join(cmd)}")
    if done.returncode != 0:
        sys.exit(f"{label} exited {done.returncode}: {shlex.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = json_rows(done.stdout, label)
    bad = [r for r in rows if r.get("wrong")]
    if bad:
        sys.exit(f"{label}: wrong results: {bad}")
    print(f"  {label}: {len(rows)} sizes in {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
    return {r["bytes"]: r for r in rows}


def human(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}iB"
    return f"{n} B"


def cpu(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", default="2,4", help="comma-separated world sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--step-factor", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--burnrun-cmd", default="target/release/burnrun --nproc-per-node {n} bench allreduce",
                   help="command that runs burnrun's benchmark on {n} ranks (bench options are appended)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for burnrun's runs (e.g. BURNRUN_SEGMENT_BYTES=262144)")
    p.add_argument("--no-gloo", action="store_true", help="only run burnrun (threshold sweeps)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--raw", help="append every measured row (JSON lines, labelled) to this file")
    args = p.parse_args()

    env_extra = dict(kv.split("=", 1) for kv in args.env)
    sizes_args = ["--min-bytes", args.min_bytes, "--max-bytes", args.max_bytes,
                  "--step-factor", str(args.step_factor), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    nprocs = [int(x) for x in args.nprocs.split(",")]
    results = {n: {"burnrun": [], "gloo": []} for n in nprocs}
    for rnd in range(args.rounds):
        for n in nprocs:
            ours = shlex.split(args.burnrun_cmd.format(n=n)) + ["--json"] + sizes_args
            gloo = [sys.executable, os.path.join(HERE, "gloo_allreduce.py"), "--nproc", str(n)] + sizes_args
            jobs = [("burnrun", ours, env_extra)]
            if not args.no_gloo:
                jobs.append(("gloo", gloo, {}))
            if rnd % 2 == 1:
                jobs.reverse()
            print(f"round {rnd + 1}/{args.rounds}, {n} ranks", file=sys.stderr, flush=True)
            for name, cmd, env in jobs:
                rows = run(cmd, env, args.timeout, f"{name} n={n}")
                results[n][name].append(rows)
                if args.raw:
                    with open(args.raw, "a") as f:
                        for r in rows.values():
                            f.write(json.dumps(dict(r, impl=name, round=rnd, env=env)) + "\n")

    env_note = " ".join(args.env) or "defaults"
    for n in nprocs:
        ours_runs, gloo_runs = results[n]["burnrun"], results[n]["gloo"]
        print(f"\n### all-reduce, {n} ranks (f32, busbw GB/s, median of {args.rounds} rounds; burnrun: {env_note})\n")
        if args.no_gloo:
            print("| size | burnrun busbw | min | max |\n|---:|---:|---:|---:|")
        else:
            print("| size | burnrun busbw | gloo busbw | ratio | burnrun CPU/op | gloo CPU/op | CPU ratio |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
        for size in sorted(ours_runs[0]):
            ours = [run[size]["busbw_gbps"] for run in ours_runs if size in run]
            if args.no_gloo:
                print(f"| {human(size)} | {statistics.median(ours):.3f} | {min(ours):.3f} | {max(ours):.3f} |")
                continue
            theirs = [run[size]["busbw_gbps"] for run in gloo_runs if size in run]
            ratios = [o / g for o, g in zip(ours, theirs) if g > 0]
            ratio = statistics.median(ratios) if ratios else float("nan")
            # CPU time of one all-reduce summed over ranks: what it costs, whatever else runs.
            our_cpu = [run[size].get("cpu_us", float("nan")) for run in ours_runs if size in run]
            their_cpu = [run[size].get("cpu_us", float("nan")) for run in gloo_runs if size in run]
            cpu_ratios = [t / o for o, t in zip(our_cpu, their_cpu) if o > 0]
            cpu_ratio = statistics.median(cpu_ratios) if cpu_ratios else float("nan")
            print(f"| {human(size)} | {statistics.median(ours):.3f} | {statistics.median(theirs):.3f} | {ratio:.2f}x "
                  f"| {cpu(statistics.median(our_cpu))} | {cpu(statistics.median(their_cpu))} | {cpu_ratio:.2f}x |")


if __name__ == "__main__":
    main()
