#!/usr/bin/env bash
# Issue 12's measurement: how long a checkpoint holds the training thread (its stall), with
# `checkpoint.async` false and true, interleaved round by round so both see the same machine.
#
# 2 ranks train a wide MLP (784-2048-2048-10, 5.8M parameters, Adam: a 23 MB model file and a
# 47 MB optimizer file per checkpoint) with a checkpoint every 5 steps. Each checkpoint's stall
# (max over ranks) comes from `checkpoint_stall_ms` in metrics.jsonl (logged at every checkpoint
# step). The final checkpoint is always waited for, in both modes, so it is reported apart.
# Prints a markdown table: per mode, the median stall per checkpoint before the final one over
# all rounds, the range of the per-round medians, the final checkpoint's median stall, the
# median wall time of a run; then the ratio of the medians.
#   bash benches/checkpoint_stall.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
steps=${2:-40}
every=5
bin=target/release/burnrun
[ -x "$bin" ] || cargo build --release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for mode in false true; do
    dir="$out/r$round-$mode"
    started=$(date +%s.%N)
    timeout 600 "$bin" --nproc-per-node 2 train configs/mlp_bench.toml \
      --set 'model.mlp.hidden=[2048, 2048]' --set optim.kind=adam --set train.steps="$steps" \
      --set checkpoint.every_steps=$every --set checkpoint.keep_last=2 --set checkpoint.async=$mode \
      --set log.every_steps=$every --set log.metrics=true --set log.progress=off \
      --set train.out_dir="$dir" >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
    ended=$(date +%s.%N)
    jq -r --arg mode "$mode" --arg wall "$(echo "$ended - $started" | bc)" --argjson last "$steps" \
      'select(.checkpoint_stall_ms != null)
       | [$mode, (if .step == $last then "final" else "before" end), .checkpoint_stall_ms, '"$round"', $wall]
       | @tsv' "$dir/metrics.jsonl" >>"$out/stalls.tsv"
    rm -rf "$dir"
  done
done
python3 - "$out/stalls.tsv" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
median = statistics.median
print("| checkpoint.async | stall per checkpoint, median ms | per-round medians, ms | final checkpoint, median ms | run wall time, median s |")
print("|---|---|---|---|---|")
result = {}
for mode in ["false", "true"]:
    before = [float(r[2]) for r in rows if r[0] == mode and r[1] == "before"]
    final = [float(r[2]) for r in rows if r[0] == mode and r[1] == "final"]
    rounds = sorted({r[3] for r in rows if r[0] == mode})
    per_round = [median([float(r[2]) for r in rows if r[0] == mode and r[1] == "before" and r[3] == k]) for k in rounds]
    walls = [float(next(r[4] for r in rows if r[0] == mode and r[3] == k)) for k in rounds]
    result[mode] = median(before)
    print(f"| {mode} | {median(before):.1f} ({len(before)} checkpoints) | {min(per_round):.1f}-{max(per_round):.1f} "
          f"| {median(final):.1f} | {median(walls):.2f} |")
print(f"\nasync stalls training {result['false'] / result['true']:.1f}x less per checkpoint (median, before the final one)")
EOF
