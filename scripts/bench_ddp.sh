#!/usr/bin/env bash
# Step time of multi-process training with the gradient all-reduce overlapped with backward (`ddp.overlap_grad_reduce
# = true`, the default) against all-reducing after backward, alternating the two for ROUNDS rounds on the same
# machine: median and mean seconds per iteration after the first 10 iterations, read from metrics.jsonl.
#
# Usage: scripts/bench_ddp.sh [--config FILE] [--procs N] [--iters N] [--rounds R] [--set KEY=VALUE]...
# Defaults: configs/demo_shapes.toml, 2 CPU processes over Gloo (--num-procs), 40 iterations, 2 rounds.
# Environment: TRAINER_BIN (default target/release/trainer, built with cargo when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/demo_shapes.toml; PROCS=2; ITERS=40; ROUNDS=2; SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --procs) PROCS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    *) echo "bench_ddp.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$ITERS" -gt 10 ] || { echo "bench_ddp.sh: --iters must be above 10 (the first 10 are not timed)" >&2; exit 2; }
TRAINER_BIN=${TRAINER_BIN:-target/release/trainer}
if [ ! -x "$TRAINER_BIN" ]; then
  echo "bench_ddp.sh: building $TRAINER_BIN (cargo build --release -p trainer)" >&2
  cargo build --release -q -p trainer
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for round in $(seq "$ROUNDS"); do
  for overlap in true false; do
    out="$work/$overlap-$round"
    "$TRAINER_BIN" train "$CONFIG" --num-procs "$PROCS" --quiet --output "$out" --set "solver.max_iter=$ITERS" \
      --set eval.at_end=false --set checkpoint.period=0 --set log.period=1 \
      --set "ddp.overlap_grad_reduce=$overlap" "${SETS[@]}" > "$out.log" 2>&1 \
      || { echo "bench_ddp.sh: training failed, see below" >&2; tail -n 20 "$out.log" >&2; exit 1; }
    python3 - "$out/metrics.jsonl" "$overlap" "$round" <<'PY'
import json, statistics, sys
times = [r["time"] for r in map(json.loads, open(sys.argv[1])) if "time" in r][10:]
print(f"round {sys.argv[3]}: overlap_grad_reduce={sys.argv[2]:5}  median {statistics.median(times):.4f} s/iter  "
      f"mean {statistics.mean(times):.4f} s/iter  ({len(times)} iterations)")
PY
  done
done
