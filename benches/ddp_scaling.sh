#!/usr/bin/env bash
# Throughput of a user's model under burnrun::Ddp: examples/resnet_digits on 1 rank, on 2 ranks,
# and as 2 independent 1-rank trainers running at once (what the cores give with no communication:
# the ceiling for 2 ranks). Interleaved over ROUNDS rounds; prints the median samples/s of each.
#   cargo build --release --examples && benches/ddp_scaling.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-40}
exe=target/release/examples/resnet_digits
burnrun=target/release/burnrun
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
rate() { sed -n 's/.*: \([0-9]*\) samples\/s.*/\1/p' | tail -1; }
one() { timeout 300 "$exe" --steps "$steps" --batch 32 --data "$data" | rate; }
two() { timeout 300 "$burnrun" --nproc-per-node 2 -- "$exe" --steps "$steps" --batch 32 --data "$data" 2>/dev/null | rate; }
pair() {
  local a b
  a=$(mktemp); b=$(mktemp)
  one >"$a" & one >"$b"; wait
  echo $(( $(cat "$a") + $(cat "$b") )); rm -f "$a" "$b"
}
one >/dev/null  # writes the data set
declare -a r1 r2 rp
for ((i = 0; i < rounds; i++)); do
  r1+=("$(one)"); r2+=("$(two)"); rp+=("$(pair)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m1=$(median "${r1[@]}"); m2=$(median "${r2[@]}"); mp=$(median "${rp[@]}")
echo "| run | samples/s (median of $rounds) | all rounds |"
echo "|---|---|---|"
echo "| 1 rank, batch 32 | $m1 | ${r1[*]} |"
echo "| 2 ranks (Ddp), batch 32 each | $m2 | ${r2[*]} |"
echo "| 2 independent 1-rank trainers | $mp | ${rp[*]} |"
awk -v a="$m2" -v b="$mp" -v c="$m1" 'BEGIN { printf "2 ranks / ceiling = %.2f, 2 ranks / 1 rank = %.2f\n", a / b, a / c }'
