#!/usr/bin/env python3
"""How long burnrun takes to deal with a failure (issue 12's figures), over several rounds.

Each case trains the embedded MLP on 2 ranks through the launcher and injects one fault with
BURNRUN_FAULT at a fixed step (see burnrun::fault); every output line is time-stamped as it
arrives, and the time from the fault's own line (`burnrun fault injection: ...`, printed by the
rank just before it acts) to the event is taken:

- kill: rank 1 SIGKILLs itself; until the launcher has exited (job down, summary printed);
- stop: rank 1 SIGSTOPs itself under --stall-timeout T; until the launcher prints the flight
  recorder's verdict (the hang report), and the same minus T (what the detection adds);
- restart: rank 1 SIGKILLs itself at step S with a checkpoint at S, --max-restarts 1; until the
  restarted job logs step S + 1 (back where it was, one step further).

Prints a markdown table with the median, min and max of each over ROUNDS runs (default 10).

    python3 benches/failure_times.py [ROUNDS]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "burnrun")
STEP = 10
STALL_TIMEOUT = 2.0
SETS = [
    "data.synthetic.features=16",
    "data.synthetic.samples=1024",
    "model.mlp.hidden=[32, 32]",
    "train.steps=40",
    "train.batch_size=16",
    "train.threads=1",
    f"checkpoint.every_steps={STEP}",
    "log.every_steps=1",
    "log.progress=plain",
]


def run(launch_args, fault, extra_sets, out):
    """Runs one job; returns [(time, line)] of both streams and the exit time."""
    args = [BIN] + launch_args + ["train", os.path.join(ROOT, "configs", "mlp_synthetic.toml")]
    for s in SETS + extra_sets + [f"train.out_dir={out}"]:
        args += ["--set", s]
    env = dict(os.environ, BURNRUN_FAULT=fault)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    lines, lock = [], threading.Lock()

    def pump(stream):
        for line in stream:
            now = time.monotonic()
            with lock:
                lines.append((now, line.rstrip("\n")))

    threads = [threading.Thread(target=pump, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(f"a run did not end within 120 s: {args}")
    ended = time.monotonic()
    for t in threads:
        t.join(10)
    return sorted(lines), ended, proc.returncode


def first(lines, needle, after=0.0):
    for t, line in lines:
        if t >= after and needle in line:
            return t
    return None


def case_kill(out):
    lines, ended, code = run(["--nproc-per-node", "2"], f"kill,rank=1,step={STEP}", [], out)
    fault = first(lines, "burnrun fault injection")
    if fault is None or code == 0:
        raise SystemExit("kill: no fault line or the job succeeded:\n" + "\n".join(l for _, l in lines))
    return ended - fault


def case_stop(out):
    lines, _, code = run(
        ["--nproc-per-node", "2", "--stall-timeout", str(STALL_TIMEOUT)],
        f"stop,rank=1,step={STEP}",
        ["comm.timeout_secs=60"],
        out,
    )
    fault = first(lines, "burnrun fault injection")
    report = first(lines, "flight recorder:")
    if fault is None or report is None:
        raise SystemExit("stop: no fault line or no report:\n" + "\n".join(l for _, l in lines))
    return report - fault


def case_restart(out):
    lines, _, code = run(["--nproc-per-node", "2", "--max-restarts", "1"], f"kill,rank=1,step={STEP}", [], out)
    fault = first(lines, "burnrun fault injection")
    back = first(lines, f"step {STEP + 1:>6}/", after=fault or 0.0)
    if code != 0 or fault is None or back is None:
        raise SystemExit("restart: the job did not come back:\n" + "\n".join(l for _, l in lines))
    return back - fault


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    if not os.access(BIN, os.X_OK):
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    cases = [("kill -9 of a rank -> job down", case_kill), ("SIGSTOP of a rank -> hang report", case_stop),
             ("kill -9 -> restarted job back at the same step", case_restart)]
    times = {name: [] for name, _ in cases}
    for r in range(rounds):
        for name, case in cases:
            with tempfile.TemporaryDirectory() as out:
                times[name].append(case(out))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    print(f"| case ({rounds} runs, 2 ranks) | median | min | max |")
    print("|---|---|---|---|")
    for name, _ in cases:
        t = times[name]
        print(f"| {name} | {statistics.median(t):.2f} s | {min(t):.2f} s | {max(t):.2f} s |")
    stop = [t - STALL_TIMEOUT for t in times["SIGSTOP of a rank -> hang report"]]
    print(f"\nhang report beyond --stall-timeout {STALL_TIMEOUT:g} s: median {statistics.median(stop):.2f} s")


if __name__ == "__main__":
    main()
