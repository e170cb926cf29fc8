#!/usr/bin/env bash
# Sharded data parallelism (parallel.shard, ZeRO-1, -2 and -3) against plain data parallelism on
# the same model and ranks: peak resident memory per rank and throughput.
#
# Model: configs/mlp_bench.toml deepened to an MLP of LAYERS hidden layers of HIDDEN units
# (8 x 1024 by default: 784-1024x8-10, 8.16 M parameters, 32.6 MB per f32 copy, 9 blocks),
# Adam (2 state values per parameter), batch BATCH per rank, one compute thread per rank, STEPS
# steps, 2048 synthetic samples (the data set stays small beside the model). For every world size of SIZES and every mode of MODES,
# interleaved over ROUNDS rounds; prints the median samples/s, the median of the largest rank's
# peak RSS during training (VmHWM at the last logged step, metrics.jsonl's peak_rss_mb: the final
# checkpoint's write comes after it) and what burnrun's estimate ("memory:", the model's state
# by kind) says the rank holds.
#
#   cargo build --release && benches/zero.sh                # ROUNDS=2 SIZES="2 4"
#   HIDDEN=2048 LAYERS=3 ROUNDS=3 benches/zero.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-20}
SIZES=${SIZES:-"2 4"}
MODES=${MODES:-"none optimizer gradients parameters"}
HIDDEN=${HIDDEN:-1024}
LAYERS=${LAYERS:-8}
hidden=$(printf "$HIDDEN, %.0s" $(seq "$LAYERS")); hidden="[${hidden%, }]"
BATCH=${BATCH:-32}
CONFIG=${CONFIG:-configs/mlp_bench.toml}
BURNRUN=${BURNRUN:-$PWD/target/release/burnrun}
[ -x "$BURNRUN" ] || { echo "no $BURNRUN: cargo build --release first" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run: prints "samples/s peak_rss_mib estimate_mib".
run() {
  local ranks=$1 mode=$2 out="$work/out" dir
  dir=$(mktemp -d -p "$work")
  timeout 600 "$BURNRUN" --nproc-per-node "$ranks" train "$CONFIG" \
    --set "train.steps=$STEPS" --set "train.batch_size=$BATCH" --set train.threads=1 \
    --set "model.mlp.hidden=$hidden" --set optim.kind=adam --set optim.lr=1e-3 \
    --set data.synthetic.samples=2048 --set log.metrics=true --set log.every_steps=5 --set "train.out_dir=\"$dir\"" \
    --set "parallel.shard=\"$mode\"" >"$out" 2>&1 || { tail -20 "$out" >&2; return 1; }
  local rate rss est
  rate=$(sed -n 's/.*trained [0-9]* steps: .*, \([0-9.]*\) samples\/s.*/\1/p' "$out" | tail -1)
  rss=$(tail -1 "$dir/metrics.jsonl" | sed -n 's/.*"peak_rss_mb":\([0-9.]*\).*/\1/p')
  # "memory: about 123.4 MiB per rank: ..." (KiB, MiB or GiB).
  est=$(sed -n 's/.*memory: about \([0-9.]*\) \([KMG]\)iB per rank.*/\1 \2/p' "$out" | head -1 \
    | awk '{ f = ($2 == "K") ? 1 / 1024 : ($2 == "G") ? 1024 : 1; printf "%.0f", $1 * f }')
  rm -rf "$dir"
  echo "${rate:-?} ${rss:-?} ${est:-?}"
}

# The median (the lower middle value for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A speed rss est
for ((round = 0; round < ROUNDS; round++)); do
  for n in $SIZES; do
    for mode in $MODES; do
      read -r s r e <<<"$(run "$n" "$mode")"
      echo "round $round: $n ranks, shard $mode: $s samples/s, peak RSS $r MiB (estimate $e MiB)" >&2
      speed["$n $mode"]+="$s "; rss["$n $mode"]+="$r "; est["$n $mode"]=$e
    done
  done
done

echo "| ranks | parallel.shard | samples/s (median of $ROUNDS) | vs none | peak RSS per rank, MiB | vs none | burnrun's estimate, MiB |"
echo "|---|---|---|---|---|---|---|"
for n in $SIZES; do
  for mode in $MODES; do
    s=$(median ${speed["$n $mode"]}); r=$(median ${rss["$n $mode"]})
    s0=$(median ${speed["$n none"]:-$s}); r0=$(median ${rss["$n none"]:-$r})
    ds=$(awk -v a="$s" -v b="$s0" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }')
    dr=$(awk -v a="$r" -v b="$r0" 'BEGIN { printf "%+.0f", a - b }')
    echo "| $n | $mode | $s | $ds | $(printf '%.0f' "$r") | $dr | ${est["$n $mode"]} |"
  done
done
