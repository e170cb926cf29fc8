#!/usr/bin/env bash
# Issue 4's measurement: step time, measured bubble (idle / step, from each stage's own timers)
# and peak held activations, for P = 2 and 4 stages, M = 1, 2, 4, 8 micro-batches, GPipe and 1F1B,
# next to the theoretical bubble (P-1)/(M+P-1). Prints a markdown table (one row per stage).
#   bash benches/pipeline_bubble.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-40}
bin=target/release/burnrun
[ -x "$bin" ] || cargo build --release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| P | M | schedule | stage | step ms | idle ms | bubble (measured) | bubble (theory) | peak held |"
echo "|---|---|---|---|---|---|---|---|---|"
for p in 2 4; do
  for m in 1 2 4 8; do
    for sched in gpipe 1f1b; do
      # 4 blocks (hidden [256,256,256]) so P=4 puts one block on each stage; batch 64 splits into M.
      timeout 300 "$bin" --nproc-per-node "$p" train configs/mlp_pipeline.toml \
        --set parallel.pipeline="$p" --set parallel.micro_batches="$m" --set parallel.schedule="$sched" \
        --set train.batch_size=64 --set train.steps="$steps" --set train.threads=1 \
        --set log.progress=off --set train.out_dir="$out/p${p}m${m}$sched" 2>&1 |
        sed -n 's/.*pipeline stage \([0-9]*\) of [0-9]*: schedule [a-z0-9]*, [0-9]* micro-batches: step \([0-9.]*\) ms, idle \([0-9.]*\) ms, bubble \([0-9.]*\) (theory (P-1)\/(M+P-1) = \([0-9.]*\)), peak held activations \([0-9]*\).*/\1 \2 \3 \4 \5 \6/p' |
        sort -n | while read -r stage step idle bubble theory peak; do
          echo "| $p | $m | $sched | $stage | $step | $idle | $bubble | $theory | $peak |"
        done
    done
  done
done
