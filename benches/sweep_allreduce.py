#!/usr/bin/env python3
"""Sweep burnrun's all-reduce tuning: several configurations measured side by side.

Every round runs `burnrun --nproc-per-node N bench allreduce --json` once per configuration
(the order rotates between rounds), then prints, per world size, the median busbw over rounds of
each configuration at each size, and which configuration won. A configuration is a name and
environment overrides, e.g.

  python3 benches/sweep_allreduce.py --nprocs 2,4 \\
      --config doubling:BURNRUN_RING_THRESHOLD_BYTES=18446744073709551615 \\
      --config ring:BURNRUN_RING_THRESHOLD_BYTES=0

finds the switch point between recursive doubling and ring (the size from which ring wins).
"""
import argparse
import os
import statistics
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare_allreduce import human, run  # noqa: E402


def parse_config(text):
    name, _, assignments = text.partition(":")
    env = dict(kv.split("=", 1) for kv in assignments.split(",") if kv)
    return name, env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", default="2,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--step-factor", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--burnrun-cmd", default="target/release/burnrun --nproc-per-node {n} bench allreduce")
    p.add_argument("--config", action="append", type=parse_config, required=True, metavar="NAME:KEY=VAL,...")
    p.add_argument("--metric", action="append", choices=["busbw_gbps", "time_us", "cpu_us"],
                   help="column(s) to report (default busbw_gbps); cpu_us is the CPU time of one all-reduce "
                        "summed over ranks, which the machine's other load disturbs much less than the wall time")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()

    sizes_args = ["--min-bytes", args.min_bytes, "--max-bytes", args.max_bytes,
                  "--step-factor", str(args.step_factor), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    nprocs = [int(x) for x in args.nprocs.split(",")]
    names = [name for name, _ in args.config]
    results = {(n, name): [] for n in nprocs for name in names}
    for rnd in range(args.rounds):
        for n in nprocs:
            cmd = shlex.split(args.burnrun_cmd.format(n=n)) + ["--json"] + sizes_args
            k = rnd % len(args.config)
            for name, env in args.config[k:] + args.config[:k]:
                results[(n, name)].append(run(cmd, env, args.timeout, f"{name} n={n} round {rnd + 1}"))

    for metric in args.metric or ["busbw_gbps"]:
        # Higher bandwidth is better; lower times are.
        pick = max if metric == "busbw_gbps" else min
        for n in nprocs:
            print(f"\n### all-reduce, {n} ranks: {metric}, median of {args.rounds} rounds\n")
            print("| size | " + " | ".join(names) + " | best |")
            print("|---:|" + "---:|" * len(names) + "---|")
            for size in sorted(results[(n, names[0])][0]):
                medians = [statistics.median(r[size][metric] for r in results[(n, name)]) for name in names]
                best = names[pick(range(len(names)), key=lambda i: medians[i])]
                print(f"| {human(size)} | " + " | ".join(f"{m:.3f}" for m in medians) + f" | {best} |")


if __name__ == "__main__":
    main()
