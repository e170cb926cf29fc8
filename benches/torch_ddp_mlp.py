#!/usr/bin/env python3
"""PyTorch DDP (gloo) training throughput on issue 3's benchmark MLP, the baseline for burnrun's trainer.

The model, batch and optimizer are those of configs/mlp_bench.toml: an MLP 784-1024-1024-10
(Linear, ReLU, Linear, ReLU, Linear), mean cross-entropy, SGD with momentum 0.9 at lr 0.01
(--optim adam gives Adam at lr 1e-3), 128 samples per rank per step, synthetic data generated up
front (Gaussian inputs, uniform labels; a fixed pool of batches that the steps cycle through).

N ranks are N processes (multiprocessing "spawn", MASTER_ADDR/PORT over loopback, no torchrun),
each with ONE intra-op thread and one inter-op thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)),
the same rule as burnrun's `train.threads = 1`.

Modes:
  ddp (default)  the model wrapped in DistributedDataParallel over a gloo group: gradients
                 averaged in 25 MB buckets, overlapped with the backward (DDP's defaults).
  --no-ddp       N independent trainers, no process group, no communication at all: the ceiling
                 the machine allows for N concurrent replicas. Their start is aligned by a
                 multiprocessing barrier (not a network one) so they run side by side.

Timing: every rank runs --warmup untimed steps, meets the others at a barrier, then times --steps
steps. The reported throughput is, in ddp mode, global batch (128 * N) * steps / the slowest rank's
time; with --no-ddp, the sum of each trainer's own 128 * steps / time.

Prints one JSON object on stdout:
  {"framework": "torch", "mode": "ddp"|"independent", "nproc", "steps", "warmup", "batch",
   "samples_per_sec", "step_ms", "per_rank": [{"rank", "secs", "samples_per_sec", "step_ms",
   "first_loss", "last_loss"}], "torch": version}
step_ms is the slowest rank's mean step time over the timed steps.

Usage: python3 benches/torch_ddp_mlp.py --nproc 2 --steps 40
       python3 benches/torch_ddp_mlp.py --nproc 2 --steps 40 --no-ddp
Needs torch; nothing in the Rust tests depends on this script.
"""
import argparse
import json
import os
import socket
import sys
import time

INPUTS, HIDDEN, CLASSES = 784, 1024, 10
# Distinct batches generated up front per rank (the steps cycle through them): enough that the
# data is not one cached batch, small enough to stay a few tens of MB.
BATCH_POOL = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, args, port, queue, start_barrier):
    # One thread per rank, set before torch initialises its pools.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    ddp = not args.no_ddp
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(args.nproc), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=args.nproc)

    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP broadcasts it anyway)
    model = nn.Sequential(
        nn.Linear(INPUTS, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    if ddp:
        model = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    if args.optim == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its own shard
    pool = [(torch.randn(args.batch, INPUTS, generator=gen),
             torch.randint(0, CLASSES, (args.batch,), generator=gen)) for _ in range(BATCH_POOL)]

    def step(i):
        x, y = pool[i % BATCH_POOL]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    try:
        first_loss = None
        for i in range(args.warmup):
            loss = step(i)
            first_loss = first_loss if first_loss is not None else loss.item()
        if ddp:
            dist.barrier()
        else:
            start_barrier.wait(timeout=args.timeout)
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            loss = step(i)
        last_loss = loss.item()  # CPU work is synchronous: reading it waits for nothing
        secs = time.perf_counter() - start
        queue.put({
            "rank": rank, "secs": secs, "samples_per_sec": args.batch * args.steps / secs,
            "step_ms": secs * 1e3 / args.steps, "first_loss": first_loss, "last_loss": last_loss,
        })
    finally:
        if ddp:
            dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (burnrun excludes 1)")
    p.add_argument("--batch", type=int, default=128, help="samples per rank per step")
    p.add_argument("--no-ddp", action="store_true", help="independent trainers, no communication")
    p.add_argument("--optim", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default 0.01 for sgd, 1e-3 for adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds before the run is abandoned")
    args = p.parse_args()
    if args.lr is None:
        args.lr = 1e-3 if args.optim == "adam" else 0.01
    if args.nproc < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--nproc, --steps and --warmup must be at least 1")

    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_barrier = ctx.Barrier(args.nproc)
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, queue, start_barrier)) for r in range(args.nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    results = []
    failed = False
    while len(results) < args.nproc:
        try:
            results.append(queue.get(timeout=1.0))
        except Exception:
            if time.monotonic() > deadline or any(pr.exitcode not in (None, 0) for pr in procs):
                failed = True
                break
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
            failed = True
        elif proc.exitcode != 0:
            failed = True
    if failed:
        print(f"torch_ddp_mlp: a rank failed or timed out ({len(results)}/{args.nproc} reported)", file=sys.stderr)
        sys.exit(1)

    import torch
    results.sort(key=lambda r: r["rank"])
    slowest = max(r["secs"] for r in results)
    if args.no_ddp:
        samples_per_sec = sum(r["samples_per_sec"] for r in results)
    else:
        samples_per_sec = args.batch * args.nproc * args.steps / slowest
    print(json.dumps({
        "framework": "torch", "mode": "independent" if args.no_ddp else "ddp", "nproc": args.nproc,
        "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "optim": args.optim,
        "samples_per_sec": samples_per_sec, "step_ms": slowest * 1e3 / args.steps,
        "per_rank": results, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
