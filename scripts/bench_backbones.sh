#!/usr/bin/env bash
# Backbone forward latency on this machine: V-39/V-57/V-99 against R-50/R-101 and DenseNet-201 (all GN), at
# 224x224 and 800x1344, with the release build of `trainer bench backbone`. Prints a Markdown table.
# Usage: scripts/bench_backbones.sh [--device cpu|cuda] [--iters N]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cpu; ITERS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    *) echo "bench_backbones: unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p trainer
BIN=target/release/trainer
echo "| backbone | params (M) | input | GFLOPs | s/img (median of $ITERS) | GFLOP/s | peak RSS (GiB) |"
echo "|---|---|---|---|---|---|---|"
for cfg in vovnet39 vovnet57 vovnet99 r50_gn r101_gn densenet201; do
  for size in 224x224 800x1344; do
    json=$("$BIN" bench backbone --config "configs/${cfg}_maskrcnn.toml" --device "$DEVICE" \
      --size "$size" --iters "$ITERS" --warmup 1 --json)
    python3 - "$json" "$size" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
peak = r["peak_memory_bytes"]
peak = f"{peak / 2**30:.2f}" if peak else "n/a"
print(f"| {r['backbone']} | {r['params'] / 1e6:.2f} | {sys.argv[2]} | {r['gflops']:.1f} | "
      f"{r['seconds_per_iter']:.4f} | {r['gflops_per_second']:.1f} | {peak} |")
PY
  done
done
