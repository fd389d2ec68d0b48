#!/usr/bin/env bash
# Ours against torchvision's maskrcnn_resnet50_fpn, back to back on the same settings: `trainer bench MODE --json`
# and scripts/bench_torchvision.py MODE on the same synthetic inputs (same seed and recipe, checked by
# input_checksum), size, batch, threads and device; prints both JSON objects and a ratio table (ours / theirs).
#
# Usage: scripts/bench.sh [--config FILE] [--mode train|infer|both] [--size HxW] [--batch B] [--iters N]
#                         [--warmup K] [--device D] [--amp[=fp16|bf16]] [--threads T] [--set KEY=VALUE]...
# Defaults: configs/torchvision_maskrcnn_r50_fpn.toml made trainable like torchvision's random-init model
# (--set model.backbone.norm="BN" --set model.backbone.freeze_at=0; torchvision uses BatchNorm when no weights are
# given), mode both, 512x512, 5 iterations after 2 warm-up ones, cpu, threads = nproc.
# Environment: TRAINER_BIN (default target/release/trainer, built with cargo when missing), PYTHON (default
# .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/torchvision_maskrcnn_r50_fpn.toml
MODES=(train infer); SIZE=512x512; BATCH=""; ITERS=5; WARMUP=2; DEVICE=cpu; AMP=(); THREADS=$(nproc); SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --mode) if [ "$2" = both ]; then MODES=(train infer); else MODES=("$2"); fi; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --amp|--amp=*) AMP=("$1"); shift ;;
    --threads) THREADS=$2; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ ${#SETS[@]} -eq 0 ] && [ "$CONFIG" = configs/torchvision_maskrcnn_r50_fpn.toml ]; then
  SETS=(--set 'model.backbone.norm="BN"' --set model.backbone.freeze_at=0)
fi
TRAINER_BIN=${TRAINER_BIN:-target/release/trainer}
if [ ! -x "$TRAINER_BIN" ]; then
  echo "bench.sh: building $TRAINER_BIN (cargo build --release -p trainer)" >&2
  cargo build --release -q -p trainer
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# torchvision's device spelling: cuda:N stays, auto is not accepted there.
case "$DEVICE" in auto) echo "bench.sh: give --device cpu or cuda[:N]" >&2; exit 2 ;; esac

common=(--size "$SIZE" --iters "$ITERS" --warmup "$WARMUP" --device "$DEVICE" --threads "$THREADS" "${AMP[@]}")
rows=()
for mode in "${MODES[@]}"; do
  batch=()
  # infer always measures batch 1.
  if [ -n "$BATCH" ] && [ "$mode" = train ]; then batch=(--batch "$BATCH"); fi
  ours=$("$TRAINER_BIN" bench "$mode" --config "$CONFIG" "${SETS[@]}" "${common[@]}" "${batch[@]}" --json)
  classes=$(printf '%s' "$ours" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["num_classes"])')
  theirs=$("$PYTHON" scripts/bench_torchvision.py "$mode" "${common[@]}" "${batch[@]}" \
    --num-classes "$classes" 2> >(grep -v -e 'trainable_backbone_layers' -e 'warnings.warn' -e 'Profiler clears events' -e '_warn_once' -e 'gpuGetDeviceCount' >&2))
  echo "ours:   $ours"
  echo "theirs: $theirs"
  rows+=("$ours" "$theirs")
done
"$PYTHON" - "${rows[@]}" <<'PY'
import json, sys
values = [json.loads(v) for v in sys.argv[1:]]
print()
print("| mode | device | amp | batch | size | threads | s/iter ours | s/iter theirs | time ours/theirs "
      "| img/s ours | img/s theirs | img/s ours/theirs | peak mem ours (GiB) | theirs (GiB) | mem ours/theirs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
gib = lambda b: f"{b / 2**30:.2f}" if b else "n/a"
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
for ours, theirs in zip(values[::2], values[1::2]):
    if ours.get("input_checksum") != theirs.get("input_checksum"):
        print(f"warning: {ours['mode']}: the inputs differ (checksums {ours.get('input_checksum')} and "
              f"{theirs.get('input_checksum')})", file=sys.stderr)
    size = "x".join(map(str, ours["size"]))
    print(f"| {ours['mode']} | {ours['device']} | {ours['amp']} | {ours['batch']} | {size} | {ours['threads']} "
          f"| {ours['seconds_per_iter']:.4f} | {theirs['seconds_per_iter']:.4f} "
          f"| {ratio(ours['seconds_per_iter'], theirs['seconds_per_iter'])} "
          f"| {ours['images_per_second']:.2f} | {theirs['images_per_second']:.2f} "
          f"| {ratio(ours['images_per_second'], theirs['images_per_second'])} "
          f"| {gib(ours['peak_memory_bytes'])} | {gib(theirs['peak_memory_bytes'])} "
          f"| {ratio(ours['peak_memory_bytes'], theirs['peak_memory_bytes'])} |")
PY
