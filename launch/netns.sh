#!/usr/bin/env bash
# A two-node job on one machine, each node in its own network namespace: the namespaces are joined
# by a veth pair with private addresses that never leave this machine, and node 0's store and the
# ranks' data connections go over it, as between two hosts. Needs root (ip netns). Everything it
# creates is removed on exit.
#
#   sudo launch/netns.sh bench allreduce --max-bytes 16M
#   sudo NPROC=1 launch/netns.sh -- sh -c 'echo $RANK of $WORLD_SIZE on $(hostname -I)'
#
# NPROC: ranks per node (default 2). MASTER_PORT: default 29500. BURNRUN: the binary (default:
# burnrun on PATH; e.g. BURNRUN=target/release/burnrun).
set -euo pipefail

BURNRUN="${BURNRUN:-burnrun}"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
ns0="burnrun-n0-$$" ns1="burnrun-n1-$$"
link0="brn0-$$" link1="brn1-$$"
addr0=192.168.77.1 addr1=192.168.77.2
work="$(mktemp -d)"

cleanup() {
    ip netns del "$ns0" 2>/dev/null || true
    ip netns del "$ns1" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns0"
ip netns add "$ns1"
ip link add "$link0" netns "$ns0" type veth peer name "$link1" netns "$ns1"
ip -n "$ns0" addr add "$addr0/24" dev "$link0"
ip -n "$ns1" addr add "$addr1/24" dev "$link1"
for ns in "$ns0" "$ns1"; do ip -n "$ns" link set lo up; done
ip -n "$ns0" link set "$link0" up
ip -n "$ns1" link set "$link1" up

node() {
    local ns="$1" rank="$2"
    shift 2
    ip netns exec "$ns" "$BURNRUN" \
        --nnodes 2 \
        --node-rank "$rank" \
        --nproc-per-node "$NPROC" \
        --master-addr "$addr0" \
        --master-port "$MASTER_PORT" \
        --secret-file "$work/job.key" \
        "$@"
}

node "$ns0" 0 "$@" &
pid0=$!
node "$ns1" 1 "$@" &
pid1=$!
status=0
wait "$pid0" || status=$?
wait "$pid1" || status=$?
exit "$status"
