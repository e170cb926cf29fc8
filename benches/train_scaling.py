#!/usr/bin/env python3
"""Training throughput of burnrun's data-parallel trainer against PyTorch DDP (gloo), side by side.

Issue 3's benchmark: the MLP 784-1024-1024-10 of configs/mlp_bench.toml, 128 samples per rank per
step, one compute thread per rank, on this machine. Measured, interleaved over --rounds rounds:

  burnrun N      target/release/burnrun --nproc-per-node N train CONFIG --set train.threads=1 ...
  torch N        benches/torch_ddp_mlp.py --nproc N            (DDP, gloo, one thread per rank)
  burnrun x2     two `burnrun train CONFIG` (no launcher options: two separate single-rank jobs)
                 started at the same moment; their samples/s summed. No communication at all:
                 the ceiling that the machine allows two replicas.
  torch x2       benches/torch_ddp_mlp.py --nproc 2 --no-ddp   (two independent trainers)
  torch x1       benches/torch_ddp_mlp.py --nproc 1 --no-ddp   (plain PyTorch, for the step time)

Every run executes --steps steps and times all but the first (burnrun's `samples/s` excludes step 1;
the torch script gets --warmup 1 --steps STEPS-1). The reported numbers are medians over rounds.

  efficiency(n)       = throughput(n) / (n * throughput(1))         (same framework)
  ceiling efficiency  = sum of the two independent trainers / (2 * throughput(1))
  of ceiling          = efficiency(2) / ceiling efficiency

burnrun's runs also write metrics.jsonl (log.metrics = true); the per-step breakdown (step_ms,
compute_ms = forward + backward + gradient flattening on the slowest rank, comm_ms = gradient
all-reduce wall time, wait_ms, and the rest = optimizer, parameter reload, data, logging) is the
median over the logged windows after the first.

The machine is shared: before every run the script samples /proc/stat and waits (up to --quiet-wait
seconds) for the other processes' CPU use to fall below --max-foreign of the cores; during the run
it measures the CPU time not spent by its own children ("foreign" load, a fraction of all cores),
and re-runs (up to --retries times) a measurement whose foreign load exceeds --max-foreign beyond
the cores the run leaves free (a 1-rank run leaves one of two cores to others). --nice -20 (root)
runs every measurement in its own session at nice -20, the session's autogroup included, so other
sessions' processes do not share its cores; the foreign load of every kept run is printed.

Usage: python3 benches/train_scaling.py [--rounds 5] [--steps 60] [--nice -20] [--json runs.json]
Build first: cargo build --release. Needs torch for the PyTorch side. About 6 minutes on 2 idle cores.

Note: PyTorch's "ceiling efficiency" can exceed 1: its 1-rank baseline is DDP at world size 1, which
still copies the gradients into buckets and all-reduces them, while the independent trainers run
without DDP. The "of ceiling" ratio, throughput(2) / sum of the independent trainers, does not
depend on the 1-rank baseline and is the steadiest number here.
"""
import argparse
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAINED = re.compile(r"burnrun: trained (\d+) steps: loss (\S+) -> (\S+), ([0-9.]+) samples/s")
# The launcher's and the trainer's environment: a run must not inherit a surrounding job.
JOB_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
           "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def busy_secs():
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_cpu_secs():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_for_quiet(max_foreign, max_wait):
    """Waits until one second passes with the machine's busy fraction below max_foreign."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = busy_secs()
        time.sleep(1.0)
        load = (busy_secs() - b0) / CORES
        if load <= max_foreign or time.monotonic() >= deadline:
            return load


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV}
    env.setdefault("RUST_LOG", "warn")
    return env


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="train_scaling-")
        self.count = 0

    def burnrun_cmd(self, nproc, out_dir, seed=None):
        a = self.args
        cmd = [a.burnrun]
        if nproc is not None:
            cmd += ["--nproc-per-node", str(nproc), "--timeout", str(a.timeout)]
        cmd += ["train", a.config, "--set", f"train.steps={a.steps}", "--set", "train.threads=1",
                "--set", f"train.out_dir={out_dir}", "--set", "log.metrics=true", "--set", "log.progress=plain",
                "--set", "checkpoint.every_steps=0"]
        if seed is not None:
            cmd += ["--set", f"train.seed={seed}"]
        return cmd

    def torch_cmd(self, nproc, independent):
        a = self.args
        cmd = [sys.executable, os.path.join(HERE, "torch_ddp_mlp.py"), "--nproc", str(nproc),
               "--steps", str(a.steps - 1), "--warmup", "1", "--timeout", str(a.timeout)]
        return cmd + (["--no-ddp"] if independent else [])

    def prioritise(self):
        """In the run's process, after setsid: its niceness, also as its session's autogroup's.

        With autogroups (Linux's default for desktops and many VMs), CPU is first shared out
        between sessions and a process's own niceness only counts within its session, so the
        new session's autogroup gets the niceness too.
        """
        nice = self.args.nice
        if not nice:
            return
        os.nice(nice)
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
        except OSError:
            pass  # no autogroups: the process niceness is all there is

    def run_procs(self, cmds):
        """Starts cmds at once, waits for all; returns (outputs, wall secs, foreign load fraction)."""
        c0, b0, t0 = children_cpu_secs(), busy_secs(), time.monotonic()
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True, preexec_fn=self.prioritise) for cmd in cmds]
        outputs = []
        try:
            for proc, cmd in zip(procs, cmds):
                try:
                    out, err = proc.communicate(timeout=self.args.timeout)
                except subprocess.TimeoutExpired:
                    raise SystemExit(f"train_scaling: timed out after {self.args.timeout}s: {' '.join(cmd)}")
                if proc.returncode != 0:
                    raise SystemExit(f"train_scaling: exit {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
                outputs.append((out, err))
        finally:
            # On a failure, a timeout or a signal, no run outlives the script: stop each one's
            # process group (the launcher's ranks, the torch script's workers).
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
        wall = time.monotonic() - t0
        ours = children_cpu_secs() - c0
        foreign = max(0.0, (busy_secs() - b0 - ours) / (CORES * wall))
        return outputs, wall, foreign

    def burnrun_result(self, out_dir, stderr, stdout):
        m = None
        for line in (stderr + stdout).splitlines():
            m = TRAINED.search(line) or m
        if m is None:
            raise SystemExit(f"train_scaling: no `burnrun: trained` line in the output:\n{stderr[-3000:]}")
        windows = []
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                windows = [json.loads(line) for line in f if line.strip()]
        later = windows[1:] or windows  # the first window holds step 1 (allocation, first touch)

        def pick(key):
            return median([w.get(key) for w in later])

        return {
            "samples_per_sec": float(m.group(4)), "first_loss": float(m.group(2)), "last_loss": float(m.group(3)),
            "step_ms": pick("step_ms"), "compute_ms": pick("compute_ms"), "comm_ms": pick("comm_ms"),
            "wait_ms": pick("exposed_comm_ms"),
        }

    def measure_once(self, kind, n):
        self.count += 1
        tag = f"{self.count:03d}-{kind}-{n}"
        if kind == "burnrun":
            out_dir = os.path.join(self.work, tag)
            (outs, wall, foreign) = self.run_procs([self.burnrun_cmd(n, out_dir)])
            r = self.burnrun_result(out_dir, outs[0][1], outs[0][0])
        elif kind == "burnrun-x2":
            dirs = [os.path.join(self.work, f"{tag}-{i}") for i in range(2)]
            (outs, wall, foreign) = self.run_procs([self.burnrun_cmd(None, d) for d in dirs])
            each = [self.burnrun_result(d, err, out) for d, (out, err) in zip(dirs, outs)]
            r = {"samples_per_sec": sum(e["samples_per_sec"] for e in each), "each": each,
                 "step_ms": max(e["step_ms"] for e in each), "compute_ms": max(e["compute_ms"] for e in each),
                 "comm_ms": 0.0, "wait_ms": 0.0}
        else:
            (outs, wall, foreign) = self.run_procs([self.torch_cmd(n, kind in ("torch-x2", "torch-x1"))])
            r = json.loads(outs[0][0].strip().splitlines()[-1])
            r = {"samples_per_sec": r["samples_per_sec"], "step_ms": r["step_ms"], "per_rank": r["per_rank"]}
        # Other processes on cores this run leaves free do not slow it: only the excess counts.
        spare = (CORES - min(n, CORES)) / CORES
        r.update(kind=kind, n=n, wall_secs=wall, foreign=foreign, contention=max(0.0, foreign - spare))
        return r

    def measure(self, kind, n):
        a = self.args
        for attempt in range(a.retries + 1):
            before = wait_for_quiet(a.max_foreign, a.quiet_wait)
            r = self.measure_once(kind, n)
            r["foreign_before"] = before
            r["attempts"] = attempt + 1
            print(f"  {kind:<10} n={n}: {r['samples_per_sec']:8.0f} samples/s  step {r['step_ms']:6.1f} ms  "
                  f"wall {r['wall_secs']:5.1f} s  foreign load {r['foreign']:.2f} (on its cores {r['contention']:.2f})",
                  file=sys.stderr, flush=True)
            if r["contention"] <= a.max_foreign:
                break
        return r


def interrupt(_signum, _frame):
    """A SIGTERM unwinds like Ctrl-C, so the running measurement's processes are stopped too."""
    raise KeyboardInterrupt


def fmt(x, digits=0):
    return "-" if x != x else f"{x:.{digits}f}"


def report(results, args):
    def runs(kind, n):
        return [r for r in results if r["kind"] == kind and r["n"] == n]

    def thr(kind, n):
        return median([r["samples_per_sec"] for r in runs(kind, n)])

    def spread(kind, n):
        xs = [r["samples_per_sec"] for r in runs(kind, n)]
        return f"{fmt(median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})" if xs else "-"

    def col(kind, n, key):
        return median([r.get(key) for r in runs(kind, n)])

    lines = []
    b1, t1 = thr("burnrun", 1), thr("torch", 1)
    lines.append(f"MLP 784-1024-1024-10, batch 128 per rank, 1 thread per rank, {args.steps} steps per run "
                 f"(first excluded), median of {args.rounds} rounds (min-max in brackets), {CORES} cores"
                 + (f", runs at nice {args.nice}." if args.nice else "."))
    lines.append("")
    lines.append("| ranks | burnrun samples/s | efficiency | torch DDP (gloo) samples/s | efficiency |")
    lines.append("|---|---|---|---|---|")
    for n in args.ranks:
        be, te = thr("burnrun", n) / (n * b1), thr("torch", n) / (n * t1)
        lines.append(f"| {n} | {spread('burnrun', n)} | {fmt(be, 2)} | {spread('torch', n)} | {fmt(te, 2)} |")
    bc, tc = thr("burnrun-x2", 2), thr("torch-x2", 2)
    bce, tce = bc / (2 * b1), tc / (2 * t1)
    lines.append(f"| 2 independent trainers, no comm (ceiling) | {spread('burnrun-x2', 2)} | {fmt(bce, 2)} | "
                 f"{spread('torch-x2', 2)} | {fmt(tce, 2)} |")
    if 2 in args.ranks:
        b2, t2 = thr("burnrun", 2) / (2 * b1), thr("torch", 2) / (2 * t1)
        lines.append(f"| 2-rank efficiency / ceiling efficiency | | {fmt(b2 / bce, 2)} | | {fmt(t2 / tce, 2)} |")
    lines.append("")
    bs, ts, ps = col("burnrun", 1, "step_ms"), col("torch", 1, "step_ms"), col("torch-x1", 1, "step_ms")
    lines.append("Single rank, one thread (median ms/step): "
                 f"burnrun {fmt(bs, 1)} ms (forward+backward in burn {fmt(col('burnrun', 1, 'compute_ms'), 1)} ms); "
                 f"PyTorch DDP at 1 rank {fmt(ts, 1)} ms (ratio burnrun/PyTorch {fmt(bs / ts, 2)}); "
                 f"PyTorch without DDP {fmt(ps, 1)} ms (ratio {fmt(bs / ps, 2)}).")
    lines.append("")
    lines.append("burnrun per-step breakdown (median; compute and comm: the slowest rank):")
    lines.append("")
    lines.append("| run | step_ms | compute_ms | comm_ms | wait_ms | rest (optimizer, param reload, data) |")
    lines.append("|---|---|---|---|---|---|")
    for kind, n, label in [("burnrun", n, f"{n} ranks") for n in args.ranks] + [("burnrun-x2", 2, "2 independent")]:
        s, c, m, w = (col(kind, n, k) for k in ("step_ms", "compute_ms", "comm_ms", "wait_ms"))
        lines.append(f"| {label} | {fmt(s, 1)} | {fmt(c, 1)} | {fmt(m, 1)} | {fmt(w, 1)} | {fmt(s - c - m, 1)} |")
    lines.append("")
    foreign = [r["foreign"] for r in results]
    contention = [r["contention"] for r in results]
    lines.append(f"Foreign CPU load during the kept runs (other processes, fraction of all cores): median "
                 f"{median(foreign):.2f}, max {max(foreign):.2f}; beyond the cores a run leaves free: median "
                 f"{median(contention):.2f}, max {max(contention):.2f}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--burnrun", default=os.path.join(ROOT, "target", "release", "burnrun"))
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "mlp_bench.toml"))
    p.add_argument("--steps", type=int, default=60, help="steps per run; the first is not timed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (must include 1)")
    p.add_argument("--max-foreign", type=float, default=0.10,
                   help="re-run a measurement when other processes used more than this fraction of the cores, "
                        "beyond the cores the run leaves free")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a measurement taken under foreign load")
    p.add_argument("--quiet-wait", type=float, default=15.0, help="seconds to wait for a quiet machine per run")
    p.add_argument("--timeout", type=int, default=300, help="seconds before one run is abandoned")
    p.add_argument("--nice", type=int, default=0,
                   help="run every measurement at this niceness (negative needs root): on a shared machine, "
                        "-20 keeps other processes from taking the cores the ranks are measured on")
    p.add_argument("--skip-torch", action="store_true", help="burnrun only")
    p.add_argument("--json", help="also write every run's numbers to this file")
    args = p.parse_args()
    args.ranks = [int(x) for x in args.ranks.split(",")]
    if 1 not in args.ranks or args.steps < 3:
        p.error("--ranks must include 1 and --steps must be at least 3")
    if not os.access(args.burnrun, os.X_OK):
        p.error(f"{args.burnrun} not found: cargo build --release")

    signal.signal(signal.SIGTERM, interrupt)
    bench = Bench(args)
    ours = [("burnrun", n) for n in args.ranks] + [("burnrun-x2", 2)]
    theirs = [] if args.skip_torch else [("torch", n) for n in args.ranks] + [("torch-x2", 2), ("torch-x1", 1)]
    # Interleave burnrun and torch so slow drifts of the machine hit both alike.
    plan = [x for pair in itertools.zip_longest(ours, theirs) for x in pair if x is not None]
    results = []
    try:
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
            shift = rnd % len(plan)  # rotate the order so no measurement always follows the same one
            for kind, n in plan[shift:] + plan[:shift]:
                results.append(bench.measure(kind, n))
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(report(results, args))


if __name__ == "__main__":
    main()
