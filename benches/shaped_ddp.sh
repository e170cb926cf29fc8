#!/usr/bin/env bash
# Data-parallel training across two shaped "nodes" against one node, with and without gradient
# compression: configs/mlp_bench.toml (MLP 784-1024-1024-10, 1.86 M parameters = 7.4 MB of f32
# gradients a step, batch 128 per rank, one compute thread per rank).
#
#   one node      burnrun --nproc-per-node 2 train CONFIG                    (2 ranks, shared memory)
#   two nodes     RATE=<rate> launch/netns.sh train CONFIG                   (2 x 2 ranks, a veth link
#                 shaped with tc tbf between two network namespaces; hierarchical all-reduce: each
#                 rank's half crosses the link once per direction)
# for every link rate of RATES and every codec of CODECS (compression.method; powersgd at rank 4).
# Interleaved over ROUNDS rounds; prints the median samples/s and the median gradient
# communication time per step (comm_ms of metrics.jsonl, slowest rank) of each.
#
# Four ranks share this machine's cores with each other (two nodes on one machine), so compute per
# step is slower with two nodes whatever the link: the comm_ms column is what the link costs, and
# the samples/s column what a user sees here.
#
#   cargo build --release && sudo benches/shaped_ddp.sh          # ROUNDS=3 STEPS=30
#   RATES="1gbit" CODECS="none fp16 powersgd" ROUNDS=2 sudo -E benches/shaped_ddp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-30}
RATES=${RATES:-"1gbit 10gbit"}
CODECS=${CODECS:-"none fp16 powersgd"}
CONFIG=${CONFIG:-configs/mlp_bench.toml}
BURNRUN=${BURNRUN:-$PWD/target/release/burnrun}
[ -x "$BURNRUN" ] || { echo "no $BURNRUN: cargo build --release first" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (ip netns, tc)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run: prints "samples/s comm_ms".
run() {
  local nodes=$1 rate=$2 codec=$3 out="$work/out.$$" dir
  dir=$(mktemp -d -p "$work")
  local sets=(--set "train.steps=$STEPS" --set train.threads=1 --set log.metrics=true
              --set "train.out_dir=\"$dir\"" --set "compression.method=\"$codec\"")
  [ "$codec" = powersgd ] && sets+=(--set compression.powersgd_rank=4)
  if [ "$nodes" = 1 ]; then
    timeout 600 "$BURNRUN" --nproc-per-node 2 train "$CONFIG" "${sets[@]}" >"$out" 2>&1 || { tail -20 "$out" >&2; return 1; }
  else
    RATE=$rate NPROC=2 BURNRUN=$BURNRUN timeout 600 launch/netns.sh train "$CONFIG" "${sets[@]}" >"$out" 2>&1 \
      || { tail -20 "$out" >&2; return 1; }
  fi
  local rate_s comm
  rate_s=$(sed -n 's/.*trained [0-9]* steps: .*, \([0-9.]*\) samples\/s.*/\1/p' "$out" | tail -1)
  # comm_ms of every logged window after the first (it holds the warm-up), median.
  comm=$(find "$dir" -name metrics.jsonl -exec cat {} + 2>/dev/null \
    | sed -n 's/.*"comm_ms":\([0-9.]*\).*/\1/p' | awk 'NR > 1 || 0' | sort -n \
    | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "?")}')
  echo "${rate_s:-?} ${comm:-?}"
}

# The median (the lower middle value for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A speed comm
cases=()
for codec in $CODECS; do
  cases+=("1 - $codec")
  for rate in $RATES; do cases+=("2 $rate $codec"); done
done
for ((round = 0; round < ROUNDS; round++)); do
  for c in "${cases[@]}"; do
    read -r nodes rate codec <<<"$c"
    read -r s m <<<"$(run "$nodes" "$rate" "$codec")"
    echo "round $round: nodes $nodes link $rate codec $codec: $s samples/s, comm $m ms/step" >&2
    speed[$c]+="$s "; comm[$c]+="$m "
  done
done

echo "| nodes x ranks | link | compression | samples/s (median of $ROUNDS) | comm ms/step | vs one node, same codec |"
echo "|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  read -r nodes rate codec <<<"$c"
  s=$(median ${speed[$c]}); base=$(median ${speed["1 - $codec"]})
  m=$(median ${comm[$c]} | awk '{ if ($1 + 0 == $1) printf "%.1f", $1; else print $1 }')
  ratio=$(awk -v a="$s" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }')
  if [ "$nodes" = 1 ]; then label="1 x 2"; link="shared memory"; else label="2 x 2"; link="$rate (tbf)"; fi
  echo "| $label | $link | $codec | $s | $m | $ratio |"
done
