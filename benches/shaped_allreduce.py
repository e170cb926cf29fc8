#!/usr/bin/env python3
"""All-reduce across two "nodes" on a shaped link: burnrun against OpenMPI and gloo, side by side.

Two nodes of 2 ranks each (4 ranks), each node a network namespace, joined by a veth pair that
launch/netns.sh shapes with `tc tbf` (RATE, each way; LOSS and DELAY too, see its header). For each
link profile (default 1gbit and 10gbit) and each round, one after the other, the order rotating
between rounds, every implementation runs the same sweep on a fresh pair of namespaces shaped the
same way:
  burnrun    `launch/netns.sh bench allreduce --json` (burnrun's launcher on each node: shared
             memory between the ranks of a node, TCP across)
  MPI tcp    OpenMPI, `--mca btl tcp,self`: TCP between every pair of ranks, inside a node too
  MPI sm+tcp OpenMPI, `--mca btl vader,tcp,self`: shared memory inside a node, TCP across
  gloo       benches/gloo_allreduce.py --nnodes 2 (torch.distributed gloo, TCP everywhere)
OpenMPI starts its node-1 daemon without ssh: mpirun runs in node 0's namespace and its
`plm_rsh_agent` is a small script (written to a temporary directory) that maps the host name to
the namespace and runs the command there with `ip netns exec`, under its own UTS namespace and
host name, so OpenMPI sees two hosts and its shared memory stays inside a node. Each node declares
2 slots for its 2 ranks, so OpenMPI does not know the 4 ranks share the machine's 2 cores and would
spin while it waits (4 KiB then takes ~13 ms instead of ~0.1 ms); `--mca mpi_yield_when_idle 1`
is what it sets by itself when it knows it is oversubscribed (one node, -np 4 on 2 cores).
Every implementation runs the same fixed iterations (--iters 5 after --warmup 1 by default), not
burnrun's default rule (1 GiB of buffers per size), which would take ~9 s per size at 1 Gbit/s.
The script prints, per profile, a markdown table: the median over rounds of each one's busbw and
the link-limited bounds, and the median per-round ratio of each peer's time to burnrun's.

The bound. n = 4 ranks, ranks 0,1 on node 0 and 2,3 on node 1 (every implementation numbers
them by node); the link carries B bytes/s each way (full duplex). busbw = algbw * 2(n-1)/n =
1.5 * S / t for an S-byte buffer.
  * Flat ring 0->1->2->3->0: it crosses the link twice, 1->2 one way and 3->0 the other, and a ring
    all-reduce sends 2(n-1)/n * S = 1.5 S over every edge. So t >= 1.5 S / B: busbw <= B.
  * Any algorithm (the hierarchical optimum: reduce inside each node, exchange, broadcast inside):
    every rank of node 1 needs node 0's S-byte partial sum, and the reverse, so at least S bytes
    cross the link each way: t >= S / B, busbw <= 1.5 B.
  * Recursive doubling on 4 ranks (small messages) swaps whole buffers: the step between nodes
    sends S per rank, two ranks per direction: t >= 2 S / B, busbw <= 0.75 B.
B here is the TCP payload rate: tbf counts whole Ethernet frames, and a full frame of 1514 bytes
carries 1448 bytes of TCP payload (20 IP + 32 TCP with timestamps + 14 Ethernet), so
B = RATE / 8 * 1448 / 1514. Small sizes are bound by latency instead (and DELAY cannot be applied
without sch_netem; see launch/netns.sh). On a 2-core machine the 10gbit link is faster than the
CPUs can move data through veth and TCP, so that profile measures the hosts more than the link.

Needs root (namespaces, tc), iproute2, util-linux `unshare`, target/release/burnrun; OpenMPI
(mpicc, mpirun) and torch are optional: a missing one is skipped with a line saying so. Every run
is bounded (--timeout) and its namespaces are removed (netns.sh's trap; a run killed outright
leaves them for the next netns.sh, which removes stale ones).

Usage (after `cargo build --release`), about 5 minutes:
  sudo python3 benches/shaped_allreduce.py
  sudo python3 benches/shaped_allreduce.py --profiles 1gbit --rounds 3 --max-bytes 64M --loss 0.01%
"""
import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from compare_allreduce import build_mpi, duration, human, mpi_missing, run, torch_missing  # noqa: E402
from gloo_allreduce import parse_size  # noqa: E402

NPROC = 2  # ranks per node
NNODES = 2
# TCP payload per full Ethernet frame on a 1500-byte MTU: 1448 of 1514 bytes (see the docstring).
PAYLOAD_SHARE = 1448 / 1514
SUBNET = "192.168.77.0/24"  # launch/netns.sh's addresses

# plm_rsh_agent: called like ssh, `agent [options] HOST COMMAND...`; runs COMMAND in HOST's
# namespace, under a UTS namespace of its own named after the node.
AGENT = r"""#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host="$1"; shift
case "$host" in
  "$NETNS_ADDR0"|node0) ns="$NETNS_NS0"; name=node0 ;;
  "$NETNS_ADDR1"|node1) ns="$NETNS_NS1"; name=node1 ;;
  *) echo "mpi agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$1"; shift; exec sh -c "$*"' agent "$name" "$@"
"""

# Runs under `launch/netns.sh --with-nodes`: mpirun in node 0's namespace (host name node0), one
# slot per rank on each node. Arguments: the agent, the deadline in seconds, then mpirun's options
# and command.
MPI_RUNNER = r"""#!/bin/sh
set -e
agent="$1"; deadline="$2"; shift 2
hosts="$(dirname "$agent")/hosts.$$"
printf '%s slots=__NPROC__\n%s slots=__NPROC__\n' "$NETNS_ADDR0" "$NETNS_ADDR1" > "$hosts"
ip netns exec "$NETNS_NS0" unshare --uts sh -c 'hostname node0; exec "$@"' runner \
    timeout -k 10 "$deadline" mpirun --hostfile "$hosts" --mca plm_rsh_agent "$agent" "$@"
"""

# Runs under `launch/netns.sh --with-nodes`: gloo_allreduce.py on each node; fails if either does.
GLOO_RUNNER = r"""#!/bin/sh
deadline="$1"; shift
ip netns exec "$NETNS_NS1" timeout -k 10 "$deadline" "$@" --node-rank 1 --master-addr "$NETNS_ADDR0" \
    --ifname "$NETNS_IF1" > /dev/null &
other=$!
ip netns exec "$NETNS_NS0" timeout -k 10 "$deadline" "$@" --node-rank 0 --master-addr "$NETNS_ADDR0" \
    --ifname "$NETNS_IF0"
status=$?
wait "$other" || status=$?
exit "$status"
"""


def rate_gbytes(rate):
    """tc's bit units (100mbit, 1gbit, 2.5gbit) in GB/s (10^9 bytes)."""
    text = rate.lower()
    for suffix, scale in (("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale / 8 / 1e9
    sys.exit(f"--profiles: {rate!r} is not a rate in tc's bit units (e.g. 1gbit)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profiles", default="1gbit,10gbit", help="comma-separated link rates (launch/netns.sh RATE)")
    p.add_argument("--loss", default="", help="LOSS for every profile, e.g. 0.01%% (default none)")
    p.add_argument("--delay", default="", help="DELAY for every profile (needs sch_netem), e.g. 0.2ms")
    p.add_argument("--burst", default="", help="tbf bucket in bytes (launch/netns.sh BURST; default 1 ms of traffic, at least 128 KiB; "
                        "a smaller one keeps TCP below the rate, see launch/netns.sh)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--step-factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=5,
                   help="timed iterations per size, every implementation (64 MiB at 1 Gbit/s: ~1 s each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--burnrun", default="target/release/burnrun")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for burnrun")
    p.add_argument("--no-mpi", action="store_true")
    p.add_argument("--no-mpi-sm", action="store_true", help="skip the MPI variant with shared memory inside a node")
    p.add_argument("--no-gloo", action="store_true")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = p.parse_args()

    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces and tc (run with sudo)")
    for tool in ("ip", "tc", "unshare", "timeout"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (iproute2, util-linux, coreutils)")
    burnrun = os.path.join(ROOT, args.burnrun)
    if not os.access(burnrun, os.X_OK):
        sys.exit(f"{burnrun} not found: cargo build --release")
    impls = ["burnrun"]
    if not args.no_mpi:
        why = mpi_missing()
        if why:
            print(f"MPI skipped: {why}", file=sys.stderr)
        else:
            impls += ["mpi-tcp"] + ([] if args.no_mpi_sm else ["mpi-sm"])
    if not args.no_gloo:
        why = torch_missing()
        if why:
            print(f"gloo skipped: {why}", file=sys.stderr)
        else:
            impls.append("gloo")
    names = {"burnrun": "burnrun", "mpi-tcp": "MPI tcp", "mpi-sm": "MPI sm+tcp", "gloo": "gloo"}

    sizes_args = ["--min-bytes", args.min_bytes, "--max-bytes", args.max_bytes,
                  "--step-factor", str(args.step_factor), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    parse_size(args.min_bytes), parse_size(args.max_bytes)  # fail early on a malformed size
    netns = os.path.join(ROOT, "launch", "netns.sh")
    deadline = str(int(args.timeout))
    # The outer bound (Python's) leaves the inner ones (timeout in the scripts) time to clean up.
    outer = args.timeout + 30
    profiles = [r for r in args.profiles.split(",") if r]
    results = {(rate, impl): [] for rate in profiles for impl in impls}
    applied = {}  # profile -> netns.sh's lines about the shaping
    with tempfile.TemporaryDirectory(prefix="burnrun-shaped-") as tmp:
        agent = os.path.join(tmp, "agent.sh")
        mpi_runner = os.path.join(tmp, "mpi_runner.sh")
        gloo_runner = os.path.join(tmp, "gloo_runner.sh")
        for path, text in ((agent, AGENT), (mpi_runner, MPI_RUNNER.replace("__NPROC__", str(NPROC))),
                           (gloo_runner, GLOO_RUNNER)):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        mpi_binary = build_mpi(tmp) if any(i.startswith("mpi") for i in impls) else None
        mpi_common = ["--allow-run-as-root", "--oversubscribe", "-np", str(NPROC * NNODES),
                      "--mca", "oob_tcp_if_include", SUBNET, "--mca", "btl_tcp_if_include", SUBNET,
                      "--mca", "mpi_yield_when_idle", "1"]
        commands = {
            "burnrun": ["timeout", "-k", "10", deadline, netns, "bench", "allreduce", "--json"] + sizes_args,
            "mpi-tcp": [netns, "--with-nodes", mpi_runner, agent, deadline] + mpi_common
                       + ["--mca", "btl", "tcp,self", mpi_binary or "-"] + sizes_args,
            "mpi-sm": [netns, "--with-nodes", mpi_runner, agent, deadline] + mpi_common
                      + ["--mca", "btl", "vader,tcp,self", mpi_binary or "-"] + sizes_args,
            "gloo": [netns, "--with-nodes", gloo_runner, deadline, sys.executable,
                     os.path.join(HERE, "gloo_allreduce.py"), "--nproc", str(NPROC), "--nnodes", str(NNODES),
                     "--master-port", "29600", "--timeout", deadline] + sizes_args,
        }
        burnrun_env = dict(kv.split("=", 1) for kv in args.env)
        for rnd in range(args.rounds):
            for rate in profiles:
                shaping = {"RATE": rate, "LOSS": args.loss, "DELAY": args.delay, "BURST": args.burst}
                k = rnd % len(impls)
                order = impls[k:] + impls[:k]
                print(f"round {rnd + 1}/{args.rounds}, RATE={rate}: {', '.join(order)}", file=sys.stderr, flush=True)
                for impl in order:
                    env = dict(shaping)
                    if impl == "burnrun":
                        env.update(burnrun_env, BURNRUN=burnrun, NPROC=str(NPROC))
                    log = []
                    rows = run(commands[impl], env, outer, f"{names[impl]} RATE={rate}", stderr_log=log)
                    results[(rate, impl)].append(rows)
                    # launch/netns.sh's own lines: what shaping it applied, and what it could not.
                    for line in log[0].splitlines():
                        if line.startswith("netns: ") and line not in applied.setdefault(rate, []):
                            applied[rate].append(line)
                            print(f"  {line}", file=sys.stderr, flush=True)

    asked = "".join(f", {k} {v}" for k, v in (("LOSS", args.loss), ("DELAY", args.delay),
                                               ("BURST", args.burst and f"{args.burst} B")) if v)
    for rate in profiles:
        link = rate_gbytes(rate)
        payload = link * PAYLOAD_SHARE
        print(f"\n### all-reduce across 2 nodes x 2 ranks, RATE {rate}{asked} "
              f"(f32, busbw GB/s, median of {args.rounds} rounds)\n")
        for line in applied.get(rate, []):
            print(f"launch/netns.sh: {line.removeprefix('netns: ')}  ")
        burst = int(args.burst) if args.burst else max(int(link * 1e9 / 1000), 128 << 10)
        print(f"Link: {link:.4g} GB/s each way, {payload:.4g} GB/s of TCP payload (B). Link-limited busbw "
              f"bounds for 4 ranks: flat ring B = {payload:.3f}; any algorithm (hierarchical) 1.5 B = "
              f"{1.5 * payload:.3f}; recursive doubling 0.75 B = {0.75 * payload:.3f}. They hold for sizes well "
              f"above tbf's bucket ({human(burst) if burst % 1024 == 0 else f'{burst} B'}): a smaller message "
              f"can cross at once on a full bucket.\n")
        heads = ["size"] + [names[i] for i in impls] + [f"{names[i]}/burnrun" for i in impls if i != "burnrun"]
        heads += ["burnrun time", "bound: ring", "bound: any"]
        print("| " + " | ".join(heads) + " |")
        print("|" + "---:|" * len(heads))
        ours_runs = results[(rate, "burnrun")]
        for size in sorted(ours_runs[0]):
            cells = [human(size)]
            for impl in impls:
                values = [r[size]["busbw_gbps"] for r in results[(rate, impl)] if size in r]
                cells.append(f"{statistics.median(values):.3f}" if values else "-")
            for impl in impls:
                if impl == "burnrun":
                    continue
                ratios = [t[size]["time_us"] / o[size]["time_us"] for o, t in zip(ours_runs, results[(rate, impl)])
                          if size in o and size in t and o[size]["time_us"] > 0]
                cells.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
            cells.append(duration(statistics.median(r[size]["time_us"] for r in ours_runs if size in r)))
            cells += [f"{payload:.3f}", f"{1.5 * payload:.3f}"]
            print("| " + " | ".join(cells) + " |")
        print("\nPeer/burnrun: median over rounds of the peer's time / burnrun's (above 1, burnrun is faster). "
              "Bounds: busbw a link of B each way allows (see the script's header).")
    print(f"\nCommand: {shlex.join([sys.argv[0]] + sys.argv[1:])}")


if __name__ == "__main__":
    main()
