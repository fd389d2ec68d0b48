#!/usr/bin/env bash
# Every GPU check of vovdet in one run, within a time budget (default 450 s, for a 10-minute call), ending with
# ONE JSON summary. Steps run in this order, most important first; once the budget is spent the rest are recorded
# as skipped, and every step is killed (with its worker processes) when it would overrun the budget:
#   1. CUDA-vs-CPU parity of the detection ops (ops-check),
#   2. `trainer bench train` with AMP at 800x1333, batch 2: V-57 GN and R-50-FPN (BN, torchvision's random-init
#      model) next to torchvision's maskrcnn_resnet50_fpn on the same inputs and GPU, then both with the
#      GPU-shaped step (`[model.static_shapes]`, bitmap masks, fixed RoIAlign sampling),
#   3. a short training run of the GPU-shaped step under CUDA's own sync debug mode (`log.cuda_sync_debug`, its
#      warnings counted) and one with `log.sync_counts` (the trainer's own per-step count),
#   4. the peak memory of RoIAlign's backward, old and new construction (scripts/bench_pool_rows.py),
#   5. a 1-GPU NCCL world (`trainer train --num-gpus 1`, AMP, images/s and max memory) with the gradient
#      all-reduce overlapped with backward, 2 processes sharing that GPU over Gloo (`--num-gpus 2 --set
#      ddp.backend="gloo"`), and the NCCL world with the all-reduce after backward,
#   6. batch 4 (R-50, torchvision, V-57, R-50 GPU-shaped), then R-50 and torchvision in float32 (eager),
#   7. the host-overhead proxy (`scripts/bench.sh --proxy`: ours and torchvision at 64..128 pixels, the fitted
#      per-step host time and its ratio),
#   8. R-50 with channels_last and with bf16 autocast,
#   9. `trainer bench infer` (V-57 GN, R-50-FPN) and torchvision's inference,
#  10. the backbone efficiency table (V-39/57/99, R-50/101, DenseNet-201 GN at 800x1344).
#
# Usage: scripts/gpu-check.sh [--device cuda:N] [--quick] [--budget SECONDS] [--results DIR]
#   --quick: a few iterations at 320x320 (a smoke run of the script itself; with --device cpu it runs anywhere,
#            Gloo with 2 processes standing in for NCCL).
#   --results: where each step's JSON (NAME.json, NAME.err) and summary.json are written as the run goes (default:
#            $OUT when set, as on the device machine, so a cut-off run still returns what it finished; else a
#            temporary folder, removed at the end).
# Environment: TRAINER_BIN (default target/release/trainer), OPS_CHECK_BIN (default target/release/ops-check),
#   PYTHON (default .venv/bin/python, else python3, which must have torch and torchvision).
# On a machine without Rust, build here with `cargo build --release -p trainer -p detector --bin trainer --bin
# ops-check`, copy the two binaries, and the script points LD_LIBRARY_PATH at that machine's torch/lib.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda:0; QUICK=0; BUDGET=450; RESULTS=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu-check: --budget $BUDGET: expected whole seconds" >&2; exit 2 ;; esac
TRAINER_BIN=${TRAINER_BIN:-target/release/trainer}
OPS_CHECK_BIN=${OPS_CHECK_BIN:-target/release/ops-check}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TORCH_LIB=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "gpu-check: $PYTHON has no torch" >&2; exit 2; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for bin in "$TRAINER_BIN" "$OPS_CHECK_BIN"; do
  [ -x "$bin" ] || { echo "gpu-check: $bin is missing; cargo build --release -p trainer -p detector" >&2; exit 2; }
done
if [ -z "$RESULTS" ]; then
  RESULTS=$(mktemp -d)
  trap 'rm -rf "$RESULTS"' EXIT
fi
mkdir -p "$RESULTS" || { echo "gpu-check: cannot create --results $RESULTS" >&2; exit 2; }
if [ "$QUICK" = 1 ]; then SIZE=320x320; ITERS=(--iters 3 --warmup 1); else SIZE=800x1333; ITERS=(--iters 30 --warmup 10); fi
AMP=(--amp); LAUNCH=(--num-gpus 1)
case "$DEVICE" in cpu) AMP=(); LAUNCH=(--num-procs 2) ;; esac
AMP_SET="solver.amp.enabled=$([ ${#AMP[@]} -gt 0 ] && echo true || echo false)"
R50=(configs/torchvision_maskrcnn_r50_fpn.toml --set 'model.backbone.norm="BN"' --set model.backbone.freeze_at=0
  --set model.roi_heads.num_classes=90)
V57=(configs/vovnet57_maskrcnn.toml)
# The GPU-shaped step: fixed shapes, loader-made bitmap masks and fixed RoIAlign sampling (no host sync between
# reads of the training log).
STATIC=(--set model.static_shapes.enabled=true --set 'input.mask_format="bitmask"'
  --set model.box_head.pooler_sampling_ratio=2 --set model.mask_head.pooler_sampling_ratio=2)

# Seconds the current step may still run (set by `step`; the helpers below pass it to `timeout`).
LIMIT=$BUDGET
# step NAME COMMAND...: runs COMMAND (a program or one of the functions below) within what is left of the budget,
# keeps its last stdout line (a JSON object) as RESULTS/NAME.json, or an error, or a skip past the budget.
step() {
  local name=$1; shift
  LIMIT=$((BUDGET - SECONDS))
  if [ "$LIMIT" -le 5 ]; then
    echo "== $name: skipped (budget of $BUDGET s spent)" >&2
    echo '{"skipped": "time budget spent"}' > "$RESULTS/$name.json"
    return
  fi
  echo "== $name ($SECONDS s in, $LIMIT s left): $*" >&2
  local out command=("$@")
  # A program runs under timeout, which kills its whole process group (a launcher's workers too) at the limit.
  declare -F "$1" > /dev/null || command=(timeout -k 5 "$LIMIT" "$@")
  out=$("${command[@]}" 2> "$RESULTS/$name.err")
  local status=$?
  if [ "$status" = 0 ]; then
    printf '%s\n' "$out" | tail -n 1 > "$RESULTS/$name.json"
    return
  fi
  local why; why=$(tail -n 3 "$RESULTS/$name.err")
  case "$status" in 124|137) why="killed at the time budget ($LIMIT s left when it started); last output: $why" ;; esac
  echo "gpu-check: $name failed: $why" >&2
  "$PYTHON" -c 'import json, sys; print(json.dumps({"error": sys.argv[1]}))' "$why" > "$RESULTS/$name.json"
}

# A short AMP training run on the synthetic shapes through the launcher (LAUNCH: 1 NCCL GPU, or 2 Gloo CPU
# workers); the last log line carries images/s and the CUDA allocator's peak.
world_run() {
  local out; out=$(mktemp -d)
  timeout -k 5 "$LIMIT" "$TRAINER_BIN" train configs/demo_shapes.toml "${LAUNCH[@]}" --quiet --output "$out" \
    --set solver.max_iter=$([ "$QUICK" = 1 ] && echo 4 || echo 60) --set log.period=2 --set "$AMP_SET" \
    --set eval.at_end=false "$@" >&2 || return
  tail -n 1 "$out/metrics.jsonl"
}
# Two processes sharing the one GPU over Gloo (the multi-process CUDA path without NCCL; two CPU workers on CPU).
gloo_shared_gpu_run() {
  local saved=("${LAUNCH[@]}")
  [ "$DEVICE" = cpu ] || LAUNCH=(--num-gpus 2)
  world_run --set 'ddp.backend="gloo"'
  local status=$?
  LAUNCH=("${saved[@]}")
  return $status
}
# The GPU-shaped step in a real training run, with every step's host syncs and copies in metrics.jsonl.
static_run() {
  local out; out=$(mktemp -d)
  timeout -k 5 "$LIMIT" "$TRAINER_BIN" train configs/demo_shapes.toml --set "device=\"$DEVICE\"" --quiet \
    --output "$out" "${STATIC[@]}" --set solver.max_iter=$([ "$QUICK" = 1 ] && echo 6 || echo 40) \
    --set log.period=$([ "$QUICK" = 1 ] && echo 6 || echo 20) --set log.sync_counts=true --set "$AMP_SET" \
    --set eval.at_end=false >&2 || return
  tail -n 1 "$out/metrics.jsonl"
}
# The same run under CUDA's own sync debug mode (log.cuda_sync_debug = "warn", on in the steps that read nothing
# after the first two): libtorch prints one warning per sync; the count should be 0.
cuda_sync_debug_run() {
  local out; out=$(mktemp -d)
  timeout -k 5 "$LIMIT" "$TRAINER_BIN" train configs/demo_shapes.toml --set "device=\"$DEVICE\"" --quiet \
    --output "$out" "${STATIC[@]}" --set solver.max_iter=40 --set log.period=20 \
    --set 'log.cuda_sync_debug="warn"' --set "$AMP_SET" --set eval.at_end=false > "$out/train.log" 2>&1 \
    || { local status=$?; tail -n 3 "$out/train.log" >&2; return $status; }
  echo "{\"cuda_sync_warnings\": $(grep -c 'synchronizing CUDA operation' "$out/train.log")}"
}
train_bench() {
  local name=$1 batch=$2; shift 2
  step "$name" "$TRAINER_BIN" bench train "$@" --device "$DEVICE" --size "$SIZE" --batch "$batch" "${ITERS[@]}" --json
}
torchvision_train() {
  local name=$1 batch=$2; shift 2
  step "$name" "$PYTHON" scripts/bench_torchvision.py train --device "$DEVICE" --size "$SIZE" --batch "$batch" \
    "${ITERS[@]}" --num-classes 90 "$@"
}

# 1. ops-check compares the device with the CPU, so it has nothing to do in a CPU smoke run.
[ "$DEVICE" = cpu ] || step ops_parity "$OPS_CHECK_BIN" --device "$DEVICE"
# 2. The headline: AMP training at batch 2, ours against torchvision's, then the GPU-shaped step.
train_bench train_r50_b2 2 "${R50[@]}" "${AMP[@]}"
torchvision_train train_torchvision_b2 2 "${AMP[@]}"
train_bench train_v57_b2 2 "${V57[@]}" "${AMP[@]}"
train_bench train_r50_static_b2 2 "${R50[@]}" "${STATIC[@]}" "${AMP[@]}"
train_bench train_v57_static_b2 2 "${V57[@]}" "${STATIC[@]}" "${AMP[@]}"
# 3. Host syncs of the GPU-shaped step in real runs: CUDA's count, then ours.
[ "$DEVICE" = cpu ] || step train_static_cuda_sync_debug cuda_sync_debug_run
step train_static_sync_counts static_run
# 4. Peak memory of RoIAlign's reduction backward: embedding_bag's own against the transposed one vovdet runs.
step pool_rows_memory "$PYTHON" scripts/bench_pool_rows.py --device "$DEVICE" --repeats $([ "$QUICK" = 1 ] && echo 1 || echo 5)
# 5. Multi-process training.
step nccl_world world_run
step gloo_two_workers_one_gpu gloo_shared_gpu_run
step nccl_world_reduce_after_backward world_run --set ddp.overlap_grad_reduce=false
# 6. Batch 4, then float32 (eager).
train_bench train_r50_b4 4 "${R50[@]}" "${AMP[@]}"
torchvision_train train_torchvision_b4 4 "${AMP[@]}"
train_bench train_v57_b4 4 "${V57[@]}" "${AMP[@]}"
train_bench train_r50_static_b4 4 "${R50[@]}" "${STATIC[@]}" "${AMP[@]}"
train_bench train_r50_b2_fp32 2 "${R50[@]}"
torchvision_train train_torchvision_b2_fp32 2
# 7. The host-overhead proxy.
step proxy scripts/bench.sh --proxy --device "$DEVICE" $([ "$QUICK" = 1 ] && echo "--iters 2 --warmup 1" || echo "--iters 20 --warmup 5") \
  "${AMP[@]}"
# 8. Memory layout and bf16.
train_bench train_r50_b2_channels_last 2 "${R50[@]}" --set channels_last=true "${AMP[@]}"
[ "$DEVICE" = cpu ] || train_bench train_r50_b2_bf16 2 "${R50[@]}" --amp=bf16
# 9. Inference.
step infer_r50 "$TRAINER_BIN" bench infer "${R50[@]}" --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" "${AMP[@]}" --json
step infer_torchvision "$PYTHON" scripts/bench_torchvision.py infer --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" \
  "${AMP[@]}" --num-classes 90
step infer_v57 "$TRAINER_BIN" bench infer "${V57[@]}" --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" "${AMP[@]}" --json
# 10. The backbone table.
for cfg in vovnet39 vovnet57 vovnet99 r50_gn r101_gn densenet201; do
  step "backbone_$cfg" "$TRAINER_BIN" bench backbone "configs/${cfg}_maskrcnn.toml" --device "$DEVICE" \
    --size "$([ "$QUICK" = 1 ] && echo 320x320 || echo 800x1344)" "${ITERS[@]}" --json
done

# One JSON summary: every step's object, plus ours/torchvision ratios of the training throughput and memory.
"$PYTHON" - "$RESULTS" "$DEVICE" "$SECONDS" <<'PY'
import json, os, sys
folder, device, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = {}
for name in sorted(os.listdir(folder)):
    if name.endswith(".json") and name != "summary.json":
        with open(os.path.join(folder, name)) as f:
            text = f.read().strip()
        try:
            steps[name[:-5]] = json.loads(text)
        except json.JSONDecodeError:
            steps[name[:-5]] = {"error": "not JSON: " + text[-300:]}
ratios = {}
for batch in (2, 4):
    ours, theirs = steps.get(f"train_r50_b{batch}", {}), steps.get(f"train_torchvision_b{batch}", {})
    if "images_per_second" in ours and "images_per_second" in theirs:
        ratios[f"train_r50_b{batch}"] = {
            "throughput_ours_over_torchvision": ours["images_per_second"] / theirs["images_per_second"],
            "peak_memory_ours_over_torchvision": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"],
        }
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
except Exception as error:  # the summary must print even when torch cannot see the GPU
    gpu = f"unknown ({error})"
failed = sorted(name for name, value in steps.items() if isinstance(value, dict) and "error" in value)
skipped = sorted(name for name, value in steps.items() if isinstance(value, dict) and "skipped" in value)
summary = json.dumps({"device": device, "gpu": gpu, "seconds": seconds, "failed": failed, "skipped": skipped,
                      "ratios": ratios, "steps": steps})
with open(os.path.join(folder, "summary.json"), "w") as f:
    f.write(summary + "\n")
print(summary)
sys.exit(1 if failed else 0)
PY
