#!/usr/bin/env bash
# A two-node job on one machine, each node in its own network namespace: the namespaces are joined
# by a veth pair with private addresses that never leave this machine, and node 0's store and the
# ranks' data connections go over it, as between two hosts. The link can be shaped (rate, loss,
# delay) to stand in for a real network. Needs root (ip netns; tc and iptables when shaped).
# Everything it creates is removed on exit, on Ctrl-C and on SIGTERM (a `timeout` around it).
#
#   sudo launch/netns.sh bench allreduce --max-bytes 16M
#   sudo NPROC=1 launch/netns.sh -- sh -c 'echo $RANK of $WORLD_SIZE on $(hostname -I)'
#   sudo RATE=1gbit LOSS=0.1% launch/netns.sh bench allreduce --max-bytes 64M
#   sudo RATE=10gbit launch/netns.sh --with-nodes sh -c 'ip netns exec "$NETNS_NS1" ping -c1 "$NETNS_ADDR0"'
#
# NPROC: ranks per node (default 2). MASTER_PORT: default 29500. BURNRUN: the binary (default:
# burnrun on PATH; e.g. BURNRUN=target/release/burnrun).
#
# Shaping, each applied to both directions of the link (unset = not shaped):
#   RATE   bandwidth each way, tc's bit units: 100mbit, 1gbit, 2.5gbit, 10gbit. A `tbf` qdisc on
#          both veth ends; its bucket (burst) is 1 ms of traffic at RATE but at least 128 KiB, so a
#          64 KiB GSO packet always fits and TCP reaches the rate, and the queue holds 50 ms more
#          (a shorter queue drops packets when several ranks' flows burst at once, and each drop
#          costs a TCP retransmission timeout of 200 ms or more). A full bucket lets a message up to
#          the burst through at once, so only larger transfers see RATE.
#   BURST  the bucket in bytes, instead of the above. Below 128 KiB TCP no longer reaches RATE
#          here (tbf cuts 64 KiB GSO packets to fit): measured at 1gbit, a 64 KiB bucket gave about
#          half of it and 16 KiB a third, so a smaller bucket models a slower link, not a faithful one.
#   DELAY  one-way delay, e.g. 0.2ms, 5ms. Needs `sch_netem`. Without it (no netem in this kernel:
#          it has no fq/etf either, so an eBPF departure-time delay cannot work) DELAY is NOT applied
#          and a line on stderr says so: a userspace delay line (NFQUEUE, as tests/netem does for its
#          fault tests) would cap the bandwidth it is meant to model.
#   LOSS   share of packets dropped at random each way, e.g. 0.1%. netem where the kernel has it,
#          else `iptables -m statistic --mode random --probability P -j DROP` on each namespace's
#          output to the link (same effect: each direction loses P).
# The shaping applied is printed on stderr ("netns: link ...").
#
# --with-nodes CMD ARGS...: set up the two shaped nodes but run CMD (in the root namespace) instead of
# burnrun, with NETNS_NS0, NETNS_NS1 (namespace names), NETNS_ADDR0, NETNS_ADDR1 (addresses) and
# NETNS_IF0, NETNS_IF1 (each node's end of the link) in its environment; tear down when it exits.
# benches/shaped_allreduce.py runs OpenMPI and gloo this way, on links shaped as burnrun's.
set -euo pipefail

BURNRUN="${BURNRUN:-burnrun}"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
RATE="${RATE:-}"
BURST="${BURST:-}"
DELAY="${DELAY:-}"
LOSS="${LOSS:-}"
ns0="burnrun-n0-$$" ns1="burnrun-n1-$$"
link0="brn0-$$" link1="brn1-$$"
addr0=192.168.77.1 addr1=192.168.77.2
work="$(mktemp -d)"
pids=()

say() { echo "netns: $*" >&2; }
die() { say "$*"; exit 2; }

# True while any of the given children runs (an exited, unreaped child is a zombie: state Z).
running() {
    local pid state
    for pid in "$@"; do
        state="$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null)" || continue
        [[ -n "$state" && "$state" != Z ]] && return 0
    done
    return 1
}

# Stops what still runs (TERM, then KILL after 10 s), then removes the namespaces.
cleanup() {
    local pid
    if (( ${#pids[@]} )); then
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for _ in $(seq 100); do
            running "${pids[@]}" || break
            sleep 0.1
        done
        for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    fi
    ip netns del "$ns0" 2>/dev/null || true
    ip netns del "$ns1" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# A signal ends the script through the EXIT trap (children stopped, namespaces removed).
trap 'exit 130' INT
trap 'exit 143' TERM

# Namespaces left by an earlier run that was killed outright (SIGKILL skips the trap): the pid in
# the name is gone.
for stale in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^burnrun-n[01]-[0-9]+$' || true); do
    if ! kill -0 "${stale##*-}" 2>/dev/null; then
        ip netns del "$stale" 2>/dev/null && say "removed stale namespace $stale"
    fi
done

# RATE in bits per second (integer), from tc's bit units.
rate_bps() {
    local text="${1,,}"
    [[ "$text" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)$ ]] ||
        die "RATE=$1: expected a number with bit, kbit, mbit, gbit or tbit (e.g. 1gbit)"
    local scale
    case "${BASH_REMATCH[3]}" in
        bit) scale=1 ;; kbit) scale=1e3 ;; mbit) scale=1e6 ;; gbit) scale=1e9 ;; tbit) scale=1e12 ;;
    esac
    awk -v n="${BASH_REMATCH[1]}" -v s="$scale" 'BEGIN { printf "%.0f", n * s }'
}

# LOSS as a probability for iptables' statistic match, from a percentage.
loss_probability() {
    [[ "$1" =~ ^([0-9]+(\.[0-9]+)?)%$ ]] || die "LOSS=$1: expected a percentage (e.g. 0.1%)"
    awk -v p="${BASH_REMATCH[1]}" 'BEGIN { if (p > 100) exit 1; printf "%.8f", p / 100 }' ||
        die "LOSS=$1: above 100%"
}

[[ -z "$DELAY" || "$DELAY" =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die "DELAY=$DELAY: expected a time such as 0.2ms or 5ms"
rate_bits=""
[[ -n "$RATE" ]] && rate_bits="$(rate_bps "$RATE")"
loss_p=""
[[ -n "$LOSS" ]] && loss_p="$(loss_probability "$LOSS")"
[[ -z "$BURST" || -n "$RATE" ]] || die "BURST=$BURST needs RATE"

ip netns add "$ns0"
ip netns add "$ns1"
ip link add "$link0" netns "$ns0" type veth peer name "$link1" netns "$ns1"
ip -n "$ns0" addr add "$addr0/24" dev "$link0"
ip -n "$ns1" addr add "$addr1/24" dev "$link1"
for ns in "$ns0" "$ns1"; do ip -n "$ns" link set lo up; done
ip -n "$ns0" link set "$link0" up
ip -n "$ns1" link set "$link1" up

# Shaping. netem (delay, loss) is the root qdisc of each end when the kernel has it, tbf (rate) its
# child; without netem tbf is the root and loss goes to iptables.
shaping=()
tbf_parent=(root)
if [[ -n "$DELAY" || -n "$LOSS" ]]; then
    netem_args=()
    [[ -n "$DELAY" ]] && netem_args+=(delay "$DELAY")
    [[ -n "$LOSS" ]] && netem_args+=(loss "$LOSS")
    if tc -n "$ns0" qdisc add dev "$link0" root handle 1: netem "${netem_args[@]}" 2>"$work/netem.err"; then
        tc -n "$ns1" qdisc add dev "$link1" root handle 1: netem "${netem_args[@]}"
        tbf_parent=(parent 1:1)
        [[ -n "$DELAY" ]] && shaping+=("delay $DELAY each way (netem)")
        [[ -n "$LOSS" ]] && shaping+=("loss $LOSS each way (netem)")
    elif grep -q "unknown" "$work/netem.err"; then
        if [[ -n "$DELAY" ]]; then
            say "DELAY=$DELAY is NOT applied: delay needs sch_netem, which this kernel does not have"
            shaping+=("no delay (DELAY=$DELAY not applied: no sch_netem)")
        fi
        if [[ -n "$LOSS" ]]; then
            command -v iptables >/dev/null || die "LOSS=$LOSS: no sch_netem in this kernel and no iptables for the stand-in"
            for pair in "$ns0:$link0" "$ns1:$link1"; do
                ip netns exec "${pair%%:*}" iptables -w 10 -A OUTPUT -o "${pair#*:}" \
                    -m statistic --mode random --probability "$loss_p" -j DROP
            done
            shaping+=("loss $LOSS each way (iptables statistic, p=$loss_p; no sch_netem)")
        fi
    else
        die "tc netem failed: $(cat "$work/netem.err")"
    fi
fi
if [[ -n "$rate_bits" ]]; then
    if [[ -n "$BURST" ]]; then
        [[ "$BURST" =~ ^[0-9]+$ ]] && (( BURST >= 1600 )) || die "BURST=$BURST: expected bytes, at least 1600 (one frame)"
        burst="$BURST"
    else
        # Bucket: 1 ms of traffic, at least 128 KiB (two 64 KiB GSO packets).
        burst=$(( rate_bits / 8 / 1000 ))
        (( burst < 131072 )) && burst=131072
    fi
    for pair in "$ns0:$link0" "$ns1:$link1"; do
        tc -n "${pair%%:*}" qdisc add dev "${pair#*:}" "${tbf_parent[@]}" handle 10: \
            tbf rate "$RATE" burst "$burst" latency 50ms
    done
    shaping=("rate $RATE each way (tbf, burst $burst B, queue 50 ms)" "${shaping[@]}")
fi
if (( ${#shaping[@]} )); then
    summary="$(printf '%s; ' "${shaping[@]}")"
    say "link $addr0 <-> $addr1 shaped: ${summary%; }"
else
    say "link $addr0 <-> $addr1 not shaped (set RATE, DELAY, LOSS to shape it)"
fi

if [[ "${1:-}" == "--with-nodes" ]]; then
    shift
    (( $# )) || die "--with-nodes needs a command"
    NETNS_NS0="$ns0" NETNS_NS1="$ns1" NETNS_ADDR0="$addr0" NETNS_ADDR1="$addr1" \
        NETNS_IF0="$link0" NETNS_IF1="$link1" "$@" &
    pids+=($!)
    status=0
    wait "${pids[0]}" || status=$?
    pids=()
    exit "$status"
fi

node() {
    local ns="$1" rank="$2"
    shift 2
    exec ip netns exec "$ns" "$BURNRUN" \
        --nnodes 2 \
        --node-rank "$rank" \
        --nproc-per-node "$NPROC" \
        --master-addr "$addr0" \
        --master-port "$MASTER_PORT" \
        --secret-file "$work/job.key" \
        "$@"
}

node "$ns0" 0 "$@" &
pids+=($!)
node "$ns1" 1 "$@" &
pids+=($!)
status=0
wait "${pids[0]}" || status=$?
wait "${pids[1]}" || status=$?
pids=()
exit "$status"
