#!/usr/bin/env python3
"""Gradient sync overlapped with backward against sync after backward, and peak memory per rank.

Runs, interleaved over --rounds rounds, on a built-in model (default configs/mlp_bench.toml):

  1 rank          burnrun train CONFIG                       (single process: the memory baseline)
  2 ranks overlap burnrun --nproc-per-node 2 train CONFIG --set comm.overlap=true
  2 ranks after   burnrun --nproc-per-node 2 train CONFIG --set comm.overlap=false

and prints, per run, the median over rounds of: samples/s (all steps but the first), step_ms,
compute_ms, comm_ms (all-reduce wall time, first launch to last completion), exposed_comm_ms (the
part the step waited for) from metrics.jsonl (windows after the first), and the largest rank's
peak RSS. Each run is bounded by --timeout seconds.

Usage: python3 benches/overlap.py [--rounds 5] [--steps 60] [--config configs/mlp_bench.toml]
                                  [--burnrun PATH] [--set key=value]...
Build first: cargo build --release. On wgpu: --burnrun <a --features wgpu build> --set train.device=wgpu
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BURNRUN = os.path.join(ROOT, "target", "release", "burnrun")  # --burnrun overrides
TRAINED = re.compile(r"burnrun: trained \d+ steps: .*?([0-9.]+) samples/s")


def run(nproc, config, steps, overlap, out, timeout, burnrun=BURNRUN, extra=()):
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    sets = [
        f"train.steps={steps}",
        f"train.out_dir={out}",
        "log.metrics=true",
        "log.every_steps=10",
        "log.progress=plain",
        f"comm.overlap={'true' if overlap else 'false'}",
        *extra,
    ]
    cmd = [burnrun, *launch, "train", config]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BURNRUN_", "MASTER_", "RANK", "WORLD_"))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    rate = float(TRAINED.search(done.stdout + done.stderr).group(1))
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    timed = lines[1:] or lines
    pick = lambda key: statistics.median(l[key] for l in timed)
    return {
        "samples_per_sec": rate,
        "step_ms": pick("step_ms"),
        "compute_ms": pick("compute_ms"),
        "comm_ms": pick("comm_ms"),
        "exposed_comm_ms": pick("exposed_comm_ms"),
        "peak_rss_mb": max(l["peak_rss_mb"] for l in lines),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--config", default="configs/mlp_bench.toml")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--burnrun", default=BURNRUN, help="the burnrun binary (e.g. a --features wgpu build)")
    parser.add_argument("--set", action="append", default=[], help="extra config override, repeatable")
    args = parser.parse_args()
    runs = {"1 rank": (1, True), "2 ranks, overlap": (2, True), "2 ranks, after backward": (2, False)}
    results = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (nproc, overlap) in runs.items():
                out = os.path.join(tmp, f"{r}-{nproc}-{overlap}")
                results[name].append(run(nproc, args.config, args.steps, overlap, out, args.timeout, args.burnrun, args.set))
                print(f"round {r + 1}: {name}: {results[name][-1]}", file=sys.stderr)
    keys = ["samples_per_sec", "step_ms", "compute_ms", "comm_ms", "exposed_comm_ms", "peak_rss_mb"]
    print(f"{args.config} {' '.join(args.set)}, {args.steps} steps, median of {args.rounds} rounds")
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    med = {name: {k: statistics.median(x[k] for x in rs) for k in keys} for name, rs in results.items()}
    for name, m in med.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |")
    on, off, one = med["2 ranks, overlap"], med["2 ranks, after backward"], med["1 rank"]
    print(f"overlap / after backward: {on['samples_per_sec'] / off['samples_per_sec']:.2f}x samples/s; "
          f"exposed comm {on['exposed_comm_ms']:.1f} of {on['comm_ms']:.1f} ms "
          f"({1 - on['exposed_comm_ms'] / max(on['comm_ms'], 1e-9):.0%} hidden)")
    print(f"peak RSS per rank, 2 ranks / 1 rank: {on['peak_rss_mb'] / one['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
