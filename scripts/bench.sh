#!/usr/bin/env bash
# Ours against torchvision's maskrcnn_resnet50_fpn, back to back on the same settings: `trainer bench MODE --json`
# and scripts/bench_torchvision.py MODE on the same synthetic inputs (same seed and recipe, checked by
# input_checksum), size, batch, threads and device; prints both JSON objects and a ratio table (ours / theirs).
#
# Usage: scripts/bench.sh [--config FILE] [--mode train|infer|both] [--size HxW] [--batch B] [--iters N]
#                         [--warmup K] [--device D] [--amp[=fp16|bf16]] [--threads T] [--set KEY=VALUE]...
#                         [--proxy]
# --proxy: the host-overhead proxy. Training steps at 64x64, 96x96 and 128x128 (batch 2 unless --batch, narrowed
# heads on both sides: 200/100 proposals per level/image before/after NMS, 64 anchors and 32 RoIs sampled per
# image), where a step's time is mostly dispatch rather than arithmetic; each side's times are fitted as
# host + c x pixels and the table gives the intercepts (the per-step host overhead), their ratio and the operator
# counts.
# Defaults: configs/torchvision_maskrcnn_r50_fpn.toml made trainable like torchvision's random-init model
# (--set model.backbone.norm="BN" --set model.backbone.freeze_at=0; torchvision uses BatchNorm when no weights are
# given), mode both, 512x512, 5 iterations after 2 warm-up ones, cpu, threads = nproc.
# Environment: TRAINER_BIN (default target/release/trainer, built with cargo when missing), PYTHON (default
# .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/torchvision_maskrcnn_r50_fpn.toml
MODES=(train infer); SIZE=512x512; BATCH=""; ITERS=5; WARMUP=2; DEVICE=cpu; AMP=(); THREADS=$(nproc); SETS=()
PROXY=0
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
    --proxy) PROXY=1; shift ;;
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

# pair MODE ARGS...: ours (`trainer bench MODE` with the config, its --set overrides and OURS_EXTRA) and then
# torchvision's (`bench_torchvision.py MODE` for the same number of classes, with THEIRS_EXTRA), both with ARGS;
# prints both JSON objects and appends them to `rows`.
OURS_EXTRA=(); THEIRS_EXTRA=(); rows=()
pair() {
  local mode=$1; shift
  local ours theirs classes
  ours=$("$TRAINER_BIN" bench "$mode" --config "$CONFIG" "${SETS[@]}" "${OURS_EXTRA[@]}" "$@" --json)
  classes=$(printf '%s' "$ours" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["num_classes"])')
  theirs=$("$PYTHON" scripts/bench_torchvision.py "$mode" "$@" --num-classes "$classes" "${THEIRS_EXTRA[@]}" \
    2> >(grep -v -e 'trainable_backbone_layers' -e 'warnings.warn' -e 'Profiler clears events' -e '_warn_once' -e 'gpuGetDeviceCount' >&2))
  echo "ours:   $ours"
  echo "theirs: $theirs"
  rows+=("$ours" "$theirs")
}

if [ "$PROXY" = 1 ]; then
  OURS_EXTRA=(--set model.rpn.pre_nms_topk_train=200 --set model.rpn.post_nms_topk_train=100
              --set model.rpn.batch_size_per_image=64 --set model.roi_heads.batch_size_per_image=32)
  THEIRS_EXTRA=(--narrow)
  for size in 64x64 96x96 128x128; do
    pair train --size "$size" --batch "${BATCH:-2}" --iters "$ITERS" --warmup "$WARMUP" --device "$DEVICE" \
      --threads "$THREADS" "${AMP[@]}"
  done
  "$PYTHON" - "${rows[@]}" <<'PY'
import json, sys
values = [json.loads(v) for v in sys.argv[1:]]
ours, theirs = values[::2], values[1::2]

def fit(runs):
    """Least squares of seconds per step = host + c * pixels per step; returns (host, c)."""
    xs = [r["batch"] * r["size"][0] * r["size"][1] for r in runs]
    ys = [r["seconds_per_iter"] for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - c * mx, c

print()
print("| size | batch | s/iter ours | s/iter theirs | ops/iter ours | ops/iter theirs | host syncs/iter ours |")
print("|---|---|---|---|---|---|---|")
for o, t in zip(ours, theirs):
    print(f"| {'x'.join(map(str, o['size']))} | {o['batch']} | {o['seconds_per_iter']:.4f} | {t['seconds_per_iter']:.4f} "
          f"| {o['ops_per_iter']} | {t.get('ops_per_iter', 'n/a')} | {o['host_syncs_per_iter']} |")
(host_o, c_o), (host_t, c_t) = fit(ours), fit(theirs)
print()
print("| host intercept ours (s) | theirs (s) | ours/theirs | ns per pixel ours | theirs |")
print("|---|---|---|---|---|")
print(f"| {host_o:.4f} | {host_t:.4f} | {host_o / host_t:.2f} | {c_o * 1e9:.1f} | {c_t * 1e9:.1f} |")
# The summary as one JSON line last (scripts/gpu-check.sh keeps it).
print(json.dumps({"mode": "proxy", "device": ours[0]["device"], "host_seconds_ours": host_o, "host_seconds_theirs": host_t,
                  "host_ours_over_theirs": host_o / host_t, "ops_per_iter_ours": ours[0]["ops_per_iter"],
                  "ops_per_iter_theirs": theirs[0].get("ops_per_iter"),
                  "host_syncs_per_iter_ours": ours[0]["host_syncs_per_iter"]}))
PY
  exit 0
fi

common=(--size "$SIZE" --iters "$ITERS" --warmup "$WARMUP" --device "$DEVICE" --threads "$THREADS" "${AMP[@]}")
for mode in "${MODES[@]}"; do
  batch=()
  # infer always measures batch 1.
  if [ -n "$BATCH" ] && [ "$mode" = train ]; then batch=(--batch "$BATCH"); fi
  pair "$mode" "${common[@]}" "${batch[@]}"
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
