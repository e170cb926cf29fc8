#!/usr/bin/env bash
# The largest GPT that trains on RANKS ranks under a per-rank memory cap, for each
# parallel.shard mode (ZeRO-1, -2 and -3 against plain data parallelism) and tensor=T (tensor
# parallelism, parallel.tensor = T): every rank runs in a memory cgroup of its own (cgroup v1,
# /sys/fs/cgroup/memory, limit CAP_MB MiB, no swap), started by the launcher through a wrapper
# (`burnrun -- benches/zero_capacity.sh rank ...`), so a rank that needs more is killed by the
# kernel and the launcher fails the job.
#
# Model: configs/gpt_text.toml widened to n_embd = EMBD (8 heads) and deepened n_layer = FIRST,
# FIRST + STRIDE, ... (2, 4, 6, ... by default) until a run fails, or MAX_LAYERS; batch 4 x 64 characters per rank, one compute thread, AdamW, STEPS
# steps and the final checkpoint (which every run writes). Prints, per mode, the deepest GPT that
# trained and its parameter count (burnrun's "memory:" line).
#
#   cargo build --release && sudo benches/zero_capacity.sh          # RANKS=4 CAP_MB=1024 EMBD=512
#   MODES=parameters FIRST=20 STRIDE=4 benches/zero_capacity.sh    # skip the small ones
set -euo pipefail
cd "$(dirname "$0")/.."
BURNRUN=${BURNRUN:-$PWD/target/release/burnrun}

if [ "${1:-}" = rank ]; then
  # One rank inside its own capped cgroup; the launcher set RANK.
  shift
  cg=/sys/fs/cgroup/memory/burnrun-capacity-rank${RANK:?}
  mkdir -p "$cg"
  echo $((CAP_MB * 1024 * 1024)) >"$cg/memory.limit_in_bytes"
  echo 0 >"$cg/memory.swappiness" 2>/dev/null || true
  echo $$ >"$cg/cgroup.procs"
  exec "$BURNRUN" "$@"
fi

RANKS=${RANKS:-4}
export CAP_MB=${CAP_MB:-1024}
EMBD=${EMBD:-512}
STEPS=${STEPS:-3}
MODES=${MODES:-"none optimizer gradients parameters"}
FIRST=${FIRST:-2}
STRIDE=${STRIDE:-2}
MAX_LAYERS=${MAX_LAYERS:-80}
[ -x "$BURNRUN" ] || { echo "no $BURNRUN: cargo build --release first" >&2; exit 2; }
[ -d /sys/fs/cgroup/memory ] || { echo "needs cgroup v1's memory controller at /sys/fs/cgroup/memory" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (cgroups)" >&2; exit 2; }
export BURNRUN
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  for ((r = 0; r < RANKS; r++)); do rmdir "/sys/fs/cgroup/memory/burnrun-capacity-rank$r" 2>/dev/null || true; done
}
trap cleanup EXIT

# One run: exit status 0 when it trained; prints the parameter count. A mode is a
# parallel.shard value, or tensor=T (tensor parallelism over T ranks, no sharding).
run() {
  local mode=$1 layers=$2 out="$work/out" parallel
  case $mode in
    tensor=*) parallel=(--set "parallel.tensor=${mode#tensor=}" --set parallel.shard=\"none\") ;;
    *) parallel=(--set "parallel.shard=\"$mode\"") ;;
  esac
  rm -rf "$work/run"
  if timeout 900 "$BURNRUN" --nproc-per-node "$RANKS" -- "$PWD/benches/zero_capacity.sh" rank \
    train configs/gpt_text.toml --set "model.gpt.n_embd=$EMBD" --set model.gpt.n_head=8 \
    --set "model.gpt.n_layer=$layers" --set train.batch_size=4 --set "train.steps=$STEPS" \
    --set optim.warmup_steps=0 --set train.threads=1 --set log.progress=plain \
    --set "train.out_dir=\"$work/run\"" "${parallel[@]}" >"$out" 2>&1; then
    sed -n 's/.*memory: about .* (\([0-9]*\) values).*/\1/p' "$out" | head -1
    return 0
  fi
  grep -E "killed|SIGKILL|signal 9|memory" "$out" | head -3 >&2 || true
  return 1
}

echo "| parallel.shard | deepest GPT that trained ($RANKS ranks, $CAP_MB MiB per rank, n_embd $EMBD) | parameters | vs none |"
echo "|---|---|---|---|"
declare -A best
for mode in $MODES; do
  deepest=0 params=0
  for ((layers = FIRST; layers <= MAX_LAYERS; layers += STRIDE)); do
    if p=$(run "$mode" "$layers"); then
      deepest=$layers params=$p
      echo "$mode: n_layer $layers ($p parameters) trained" >&2
    else
      echo "$mode: n_layer $layers did not fit" >&2
      break
    fi
  done
  best[$mode]=$params
  ratio=$(awk -v a="$params" -v b="${best[none]:-$params}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }')
  echo "| $mode | n_layer $deepest | $(awk -v p="$params" 'BEGIN { printf "%.1f M", p / 1e6 }') | $ratio |"
done
