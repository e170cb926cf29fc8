#!/usr/bin/env python3
"""burnrun's NCCL all-reduce against torch.distributed's NCCL backend, on the same GPUs.

Each round runs `burnrun --nproc-per-node N bench allreduce --device cuda --json` and
benches/gloo_allreduce.py --backend nccl (torch, N processes, rank r on GPU r) with the same
sizes, iterations and warm-up, one right after the other (the order alternates between rounds),
then prints the median over rounds per size: burnrun's busbw, torch's, and the median per-round
ratio burnrun/torch. The ratio is taken on algbw, which equals the busbw ratio (both are scaled
by the same 2(n-1)/n) and still means something on one GPU, where busbw is 0 by definition.

Timing: burnrun waits for every call (its communicator polls the CUDA stream); torch queues the
timed calls and synchronises once at the end (nccl-tests' way). --torch-sync-each adds a torch run
that waits for every call too, the like-for-like comparison for small sizes, where the wait
itself costs microseconds.

Exits 0 with "skipped: ..." when torch is missing or torch.cuda.is_available() is false. Every
run has a deadline and the whole comparison stays within --timeout seconds.

Usage (on a GPU machine, after `cargo build --release --no-default-features --features nccl`):
  python3 benches/nccl_vs_torch.py --rounds 3 --max-bytes 256M
  python3 benches/nccl_vs_torch.py --burnrun gpu-bundle/burnrun --timeout 240   # the GPU check
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare_allreduce import human, run  # noqa: E402
from gloo_allreduce import parse_size, sizes  # noqa: E402

# Seconds a run is given at least, and what the last run needs to be worth starting.
MIN_RUN_SECS = 20


def gpus_or_skip():
    """The number of GPUs torch sees; exits 0 with the reason when there are none to use."""
    try:
        import torch
    except ImportError as e:
        print(f"skipped: no GPU comparison: torch is not installed ({e})")
        sys.exit(0)
    if not torch.cuda.is_available():
        print("skipped: no GPU (torch.cuda.is_available() is false)")
        sys.exit(0)
    import torch.distributed as dist

    if not dist.is_nccl_available():
        print("skipped: this torch has no NCCL backend")
        sys.exit(0)
    return torch.cuda.device_count()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--burnrun", default="target/release/burnrun",
                   help="the burnrun binary, built with --features nccl (the GPU check: gpu-bundle/burnrun)")
    p.add_argument("--nproc", type=int, help="ranks, one per GPU [default: every GPU torch sees]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-bytes", default="8")
    p.add_argument("--max-bytes", default="256M")
    p.add_argument("--step-factor", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--torch-sync-each", action="store_true",
                   help="also time torch waiting for every call, as burnrun does")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole comparison")
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout

    gpus = gpus_or_skip()
    nproc = args.nproc or gpus
    if nproc > gpus:
        sys.exit(f"--nproc {nproc} but torch sees {gpus} GPU(s): NCCL needs one GPU per rank")
    burnrun = os.path.abspath(args.burnrun)
    if not os.access(burnrun, os.X_OK):
        sys.exit(f"no burnrun binary at {burnrun}: build it with `cargo build --release --no-default-features "
                 f"--features nccl` or pass --burnrun")

    # Checked here, in the form both sides parse, so a bad size fails before anything runs.
    min_bytes, max_bytes = parse_size(args.min_bytes), parse_size(args.max_bytes)
    sizes_args = ["--min-bytes", str(min_bytes), "--max-bytes", str(max_bytes),
                  "--step-factor", str(args.step_factor), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    expected = len(sizes(argparse.Namespace(min_bytes=min_bytes, max_bytes=max_bytes, step_factor=args.step_factor)))
    torch_script = os.path.join(HERE, "gloo_allreduce.py")
    jobs = [
        ("burnrun", [burnrun, "--nproc-per-node", str(nproc), "bench", "allreduce", "--device", "cuda", "--json"]),
        ("torch", [sys.executable, torch_script, "--backend", "nccl", "--nproc", str(nproc)]),
    ]
    if args.torch_sync_each:
        jobs.append(("torch-each", jobs[1][1] + ["--sync-each"]))
    names = [name for name, _ in jobs]
    results = {name: [] for name in names}
    print(f"{nproc} rank(s), {expected} sizes {human(min_bytes)}..{human(max_bytes)}, {args.rounds} round(s), "
          f"burnrun {burnrun}", file=sys.stderr, flush=True)
    for rnd in range(args.rounds):
        order = jobs if rnd % 2 == 0 else list(reversed(jobs))
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, cmd in order:
            left = deadline - time.monotonic()
            if left < MIN_RUN_SECS:
                break
            # The torch script needs its own deadline too: it is given a little less.
            extra = ["--timeout", str(int(left - 5))] if name != "burnrun" else []
            results[name].append(run(cmd + sizes_args + extra, {}, left, f"{name} round {rnd + 1}"))
        if any(len(results[name]) <= rnd for name in names):
            print(f"stopping after {rnd} complete round(s): --timeout {args.timeout:g} s is nearly spent",
                  file=sys.stderr, flush=True)
            break
    rounds = min(len(runs) for runs in results.values())
    if rounds == 0:
        sys.exit(f"no complete round within --timeout {args.timeout:g} s")
    for name in names:
        del results[name][rounds:]

    print(f"\n### all-reduce over NCCL, {nproc} rank(s) (f32, median of {rounds} interleaved round(s))\n")
    header = "| size | burnrun busbw | torch busbw | ratio | burnrun time | torch time |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if args.torch_sync_each:
        header += " torch time, each call waited | ratio to it |"
        rule += "---:|---:|"
    if nproc == 1:
        print("One rank: busbw = algbw x 2(n-1)/n is 0 by definition, and an in-place all-reduce on one rank "
              "has nothing to move, so the times are what a call costs; the ratio is of algbw.\n")
    print(header)
    print(rule)

    def median(name, size, key):
        return statistics.median(r[size][key] for r in results[name])

    def ratio(ours, theirs, size):
        pairs = zip(ours, theirs)
        values = [o[size]["algbw_gbps"] / t[size]["algbw_gbps"] for o, t in pairs if t[size]["algbw_gbps"] > 0]
        return statistics.median(values) if values else float("nan")

    last = None
    for size in sorted(results["burnrun"][0]):
        if any(size not in r for runs in results.values() for r in runs):
            continue
        r = ratio(results["burnrun"], results["torch"], size)
        line = (f"| {human(size)} | {median('burnrun', size, 'busbw_gbps'):.3f} | {median('torch', size, 'busbw_gbps'):.3f} "
                f"| {r:.2f}x | {median('burnrun', size, 'time_us'):.1f} us | {median('torch', size, 'time_us'):.1f} us |")
        if args.torch_sync_each:
            line += (f" {median('torch-each', size, 'time_us'):.1f} us "
                     f"| {ratio(results['burnrun'], results['torch-each'], size):.2f}x |")
        print(line)
        last = (size, r)
    if last:
        size, r = last
        print(f"\nsummary: {nproc} rank(s), largest size {human(size)}: burnrun busbw "
              f"{median('burnrun', size, 'busbw_gbps'):.3f} GB/s, algbw {median('burnrun', size, 'algbw_gbps'):.3f} "
              f"GB/s; torch busbw {median('torch', size, 'busbw_gbps'):.3f} GB/s, algbw "
              f"{median('torch', size, 'algbw_gbps'):.3f} GB/s; ratio burnrun/torch {r:.2f}x "
              f"(median of {rounds} round(s))")


if __name__ == "__main__":
    main()
