#!/usr/bin/env bash
# Tensor parallelism (parallel.tensor) against plain data parallelism on the same GPT and ranks:
# parameters held per rank, peak resident memory per rank and throughput.
#
# Model: configs/gpt_text.toml widened to n_embd = EMBD (8 heads) and n_layer = LAYERS; batch
# BATCH x 64 characters per data-parallel replica, AdamW, one compute thread per rank, STEPS
# steps. For every world size of SIZES, plain data parallelism (tensor 1) and every tensor size
# of TENSORS that divides it, interleaved over ROUNDS rounds; prints medians: samples/s (global),
# the largest rank's peak RSS (VmHWM at the last logged step, metrics.jsonl's peak_rss_mb) and
# the parameter values rank 0 holds (burnrun's "memory:" line).
#
#   cargo build --release && benches/tensor.sh          # ROUNDS=3 SIZES="2 4" TENSORS="2 4"
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-12}
SIZES=${SIZES:-"2 4"}
TENSORS=${TENSORS:-"2 4"}
EMBD=${EMBD:-256}
LAYERS=${LAYERS:-4}
BATCH=${BATCH:-8}
BURNRUN=${BURNRUN:-$PWD/target/release/burnrun}
[ -x "$BURNRUN" ] || { echo "no $BURNRUN: cargo build --release first" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run: prints "samples/s peak_rss_mib values_held".
run() {
  local ranks=$1 tensor=$2 out="$work/out" dir
  dir=$(mktemp -d -p "$work")
  timeout 900 "$BURNRUN" --nproc-per-node "$ranks" train configs/gpt_text.toml \
    --set "model.gpt.n_embd=$EMBD" --set model.gpt.n_head=8 --set "model.gpt.n_layer=$LAYERS" \
    --set "train.steps=$STEPS" --set "train.batch_size=$BATCH" --set train.threads=1 \
    --set optim.warmup_steps=0 --set log.metrics=true --set log.every_steps=4 \
    --set checkpoint.every_steps=0 --set "train.out_dir=\"$dir\"" --set "parallel.tensor=$tensor" \
    >"$out" 2>&1 || { tail -20 "$out" >&2; return 1; }
  local rate rss held
  rate=$(sed -n 's/.*trained [0-9]* steps: .*, \([0-9.]*\) samples\/s.*/\1/p' "$out" | tail -1)
  rss=$(tail -1 "$dir/metrics.jsonl" | sed -n 's/.*"peak_rss_mb":\([0-9.]*\).*/\1/p')
  held=$(sed -n 's/.*memory: about .* (\([0-9]*\) values).*/\1/p' "$out" | head -1)
  rm -rf "$dir"
  echo "${rate:-?} ${rss:-?} ${held:-?}"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A speed rss held
for ((round = 0; round < ROUNDS; round++)); do
  for n in $SIZES; do
    for t in 1 $TENSORS; do
      ((n % t == 0)) || continue
      read -r s r h <<<"$(run "$n" "$t")"
      echo "round $round: $n ranks, tensor $t: $s samples/s, peak RSS $r MiB, $h parameter values on rank 0" >&2
      speed["$n $t"]+="$s "; rss["$n $t"]+="$r "; held["$n $t"]=$h
    done
  done
done

echo "| ranks | mesh | parameter values per rank | vs data parallel | samples/s (median of $ROUNDS) | vs data parallel | peak RSS per rank, MiB | vs data parallel |"
echo "|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
  for t in 1 $TENSORS; do
    ((n % t == 0)) || continue
    s=$(median ${speed["$n $t"]}); r=$(median ${rss["$n $t"]}); h=${held["$n $t"]}
    s0=$(median ${speed["$n 1"]}); r0=$(median ${rss["$n 1"]}); h0=${held["$n 1"]}
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }'; }
    echo "| $n | data $((n / t)) x tensor $t | $h | $(ratio "$h" "$h0") | $s | $(ratio "$s" "$s0") | $(printf '%.0f' "$r") | $(ratio "$r" "$r0") |"
  done
done
