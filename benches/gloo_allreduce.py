#!/usr/bin/env python3
"""torch.distributed gloo (or NCCL) all-reduce, measured the way `burnrun bench allreduce` measures.

Spawns N processes (no torchrun), each joins a gloo process group over loopback with one
intra-op thread, and for every size (min..max, times --step-factor) runs --warmup untimed and
--iters timed back-to-back in-place sum all-reduces after a barrier. A rank's time is the mean of
its timed iterations; the reported time is the slowest rank's (a MAX all-reduce, as nccl-tests
and burnrun do). busbw = algbw * 2(n-1)/n. Results are checked once per size on fresh data.
Without --iters the iterations follow burnrun's rule (src/bench/options.rs): 1 GiB / size timed
iterations, between 10 and 10000, after a tenth as many warm-ups (at least 2). gloo takes about a
millisecond per small all-reduce here, so 10000 of them per size make a sweep last many minutes:
--max-seconds caps the rule's count so that one size's timed loop takes about that long (the time
per call estimated from two first warm-up calls, the slowest rank's; at least 10 iterations).

With --backend nccl every rank uses the GPU of its local rank (torch.cuda.set_device) and CUDA
buffers. The timed calls are queued back to back and the device synchronised once at the end
(nccl-tests' way, and how torch code runs), or, with --sync-each, after every call (as `burnrun
bench --device cuda` waits for each call).

Prints the same JSON lines as `burnrun bench allreduce --json`:
  {"op","bytes","dtype","ranks","time_us","algbw_gbps","busbw_gbps","wrong","cpu_us"}
where cpu_us is the CPU time of one all-reduce summed over ranks (every thread of each process).

Several nodes (--nnodes): run the script once per node with the same options and its --node-rank;
node r's ranks are r*nproc .. r*nproc+nproc-1, they meet at --master-addr:--master-port (node 0
hosts torch's TCP store there), and gloo's sockets use --ifname (GLOO_SOCKET_IFNAME; loopback on
one node). Only node 0 prints rows. benches/shaped_allreduce.py runs it that way in two network
namespaces.

Usage: python3 benches/gloo_allreduce.py --nproc 2 --min-bytes 4K --max-bytes 64M
       python3 benches/gloo_allreduce.py --backend nccl --nproc 1 --max-bytes 256M
       python3 benches/gloo_allreduce.py --nproc 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 \
           --master-port 29600 --ifname eth0
Needs torch (pip install torch; CUDA for nccl); nothing in the Rust tests depends on this script.
"""
import argparse
import datetime
import json
import os
import re
import socket
import sys
import time

# burnrun's automatic iterations (src/bench/options.rs): AUTO_ITER_BYTES / size, clamped.
AUTO_ITER_BYTES = 1 << 30
MIN_AUTO_ITERS = 10
MAX_AUTO_ITERS = 10_000

DTYPES = {"f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16",
          "i32": "int32", "i64": "int64", "u8": "uint8"}


def parse_size(text):
    """4096, 4K, 1M, 64M, 1G (powers of 1024; KB/KiB accepted), like burnrun's --min-bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes or a number with K, M or G")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


def sizes(args):
    out, b = [], args.min_bytes
    while b <= args.max_bytes:
        out.append(b)
        b *= args.step_factor
    return out


def auto_iters(nbytes):
    """Timed iterations for a buffer of `nbytes` when --iters is not given (burnrun's rule)."""
    return min(max(AUTO_ITER_BYTES // max(nbytes, 1), MIN_AUTO_ITERS), MAX_AUTO_ITERS)


def auto_warmup(iters):
    """Untimed iterations before `iters` timed ones when --warmup is not given: a tenth, at least 2."""
    return max(iters // 10, 2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(local_rank, args, port, queue):
    rank = args.node_rank * args.nproc + local_rank
    n = args.nnodes * args.nproc
    os.environ.update(MASTER_ADDR=args.master_addr, MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(n), GLOO_SOCKET_IFNAME=args.ifname)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    gpu = args.backend == "nccl"
    if gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=args.timeout))
    dtype = getattr(torch, DTYPES[args.dtype])
    elem = torch.tensor([], dtype=dtype).element_size()

    def wait():
        """Returns once the device has finished what was queued (nothing to wait for on the CPU)."""
        if gpu:
            torch.cuda.synchronize()

    try:
        for size in sizes(args):
            count = max(size // elem, 1)
            buf = torch.full((count,), 1, dtype=dtype, device=device)
            iters = args.iters if args.iters is not None else auto_iters(count * elem)
            probed = 0
            if args.iters is None and args.max_seconds:
                # Two warm-up calls, timed: the slowest rank's time per call caps the count.
                dist.barrier()
                probe_start = time.perf_counter()
                for _ in range(2):
                    dist.all_reduce(buf)
                wait()
                per_call = torch.tensor([(time.perf_counter() - probe_start) / 2], dtype=torch.float64, device=device)
                dist.all_reduce(per_call, op=dist.ReduceOp.MAX)
                iters = max(MIN_AUTO_ITERS, min(iters, int(args.max_seconds / max(per_call.item(), 1e-9))))
                probed = 2
            warmup = args.warmup if args.warmup is not None else auto_warmup(iters)
            for _ in range(max(warmup - probed, 0)):
                dist.all_reduce(buf)
            dist.barrier()
            wait()
            cpu_start = time.process_time()
            start = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(buf)
                if args.sync_each:
                    wait()
            wait()
            local = (time.perf_counter() - start) / iters
            cpu = torch.tensor([(time.process_time() - cpu_start) / iters], dtype=torch.float64, device=device)
            slowest = torch.tensor([local], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            # Check on fresh data: rank r contributes (r % 3) + 1, small enough to be exact.
            buf.fill_((rank % 3) + 1)
            dist.all_reduce(buf)
            expected = sum((r % 3) + 1 for r in range(n))
            wrong = torch.tensor([int((buf != expected).sum())], dtype=torch.int64, device=device)
            dist.all_reduce(wrong)
            del buf
            if rank == 0:
                t = slowest.item()
                algbw = count * elem / t / 1e9
                queue.put(json.dumps({
                    "op": "allreduce", "bytes": count * elem, "dtype": args.dtype, "ranks": n,
                    "time_us": round(t * 1e6, 3), "algbw_gbps": round(algbw, 3),
                    "busbw_gbps": round(algbw * 2 * (n - 1) / n, 3), "wrong": int(wrong.item()),
                    "cpu_us": round(cpu.item() * 1e6, 3),
                }))
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks on this node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (several nodes)")
    p.add_argument("--master-port", type=int, help="torch's store port (default: a free one; several nodes: 29500)")
    p.add_argument("--ifname", default="lo", help="network interface of gloo's sockets (GLOO_SOCKET_IFNAME)")
    p.add_argument("--min-bytes", type=parse_size, default=parse_size("4K"))
    p.add_argument("--max-bytes", type=parse_size, default=parse_size("64M"))
    p.add_argument("--step-factor", type=int, default=2)
    p.add_argument("--iters", type=int, help="timed iterations per size (default: 1 GiB / size, 10..10000)")
    p.add_argument("--warmup", type=int, help="untimed iterations per size (default: a tenth of --iters, at least 2)")
    p.add_argument("--max-seconds", type=float,
                   help="without --iters: fewer iterations where the rule's count would time longer than this")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="gloo on the CPU, or nccl with rank r on GPU r")
    p.add_argument("--sync-each", action="store_true",
                   help="nccl: wait for every timed call (as burnrun does) instead of once after all of them")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the run is abandoned")
    args = p.parse_args()
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} is not a node of --nnodes {args.nnodes}")

    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    if args.master_port is not None:
        port = args.master_port
    else:
        port = free_port() if args.nnodes == 1 else 29500
    procs = [ctx.Process(target=rank_main, args=(r, args, port, queue)) for r in range(args.nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    # Global rank 0 (on node 0) prints the rows; the other nodes only wait for their ranks.
    expected_rows = len(sizes(args)) if args.node_rank == 0 else 0
    rows = 0
    failed = False
    while rows < expected_rows:
        try:
            line = queue.get(timeout=1.0)
        except Exception:
            if time.monotonic() > deadline or any(pr.exitcode not in (None, 0) for pr in procs):
                failed = True
                break
            continue
        print(line, flush=True)
        rows += 1
        if json.loads(line)["wrong"]:
            failed = True
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
            failed = True
        elif proc.exitcode != 0:
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
