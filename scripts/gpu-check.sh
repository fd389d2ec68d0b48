#!/usr/bin/env bash
# Every GPU check of vovdet in one run (well inside 10 minutes on one H100/H200), ending with ONE JSON summary:
#   1. CUDA-vs-CPU parity of the detection ops (ops-check), and the peak memory of RoIAlign's backward, old and
#      new construction (scripts/bench_pool_rows.py),
#   2. a 1-GPU NCCL world: `trainer train --num-gpus 1` with AMP on the synthetic shapes (images/s, max memory),
#      with the gradient all-reduce overlapped with backward (the default) and after backward, then 2 processes
#      sharing that GPU over Gloo (`--num-gpus 2 --set ddp.backend="gloo"`),
#   3. `trainer bench train` for V-57 GN and R-50-FPN (BN, torchvision's random-init model) with AMP at 800x1333,
#      batch 2 and 4, next to torchvision's maskrcnn_resnet50_fpn on the same inputs and GPU; both also with
#      `[model.static_shapes]` (the step without host syncs in the detector); R-50 at batch 2 also with
#      channels_last and with bf16 autocast,
#      R-50 and torchvision at batch 2 also in float32 (eager, no autocast),
#   4. a short training run of the GPU-shaped step with `log.sync_counts` (host syncs and blocking copies of every
#      step, counted in a real run on the GPU), and one under CUDA's sync debug mode (`log.cuda_sync_debug`),
#   5. the host-overhead proxy (`scripts/bench.sh --proxy`: ours and torchvision at 64..128 pixels, the fitted
#      per-step host time and its ratio),
#   6. `trainer bench infer` (V-57 GN, R-50-FPN) and torchvision's inference,
#   7. the backbone efficiency table (V-39/57/99, R-50/101, DenseNet-201 GN at 800x1344).
#
# Usage: scripts/gpu-check.sh [--device cuda:N] [--quick]
#   --quick: a few iterations at 320x320 (a smoke run of the script itself; with --device cpu it runs anywhere,
#            Gloo with 2 processes standing in for NCCL).
# Environment: TRAINER_BIN (default target/release/trainer), OPS_CHECK_BIN (default target/release/ops-check),
#   PYTHON (default .venv/bin/python, else python3, which must have torch and torchvision).
# On a machine without Rust, build here with `cargo build --release -p trainer -p detector --bin trainer --bin
# ops-check`, copy the two binaries, and the script points LD_LIBRARY_PATH at that machine's torch/lib.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda:0; QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
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
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT
if [ "$QUICK" = 1 ]; then SIZE=320x320; ITERS=(--iters 3 --warmup 1); else SIZE=800x1333; ITERS=(--iters 50 --warmup 15); fi
AMP=(--amp); LAUNCH=(--num-gpus 1)
case "$DEVICE" in cpu) AMP=(); LAUNCH=(--num-procs 2) ;; esac
R50=(configs/torchvision_maskrcnn_r50_fpn.toml --set 'model.backbone.norm="BN"' --set model.backbone.freeze_at=0
  --set model.roi_heads.num_classes=90)
V57=(configs/vovnet57_maskrcnn.toml)

# step NAME COMMAND...: runs COMMAND, keeps its last stdout line (a JSON object) as RESULTS/NAME.json, or an error.
step() {
  local name=$1; shift
  echo "== $name: $*" >&2
  local out
  if out=$("$@" 2> "$RESULTS/$name.err"); then
    printf '%s\n' "$out" | tail -n 1 > "$RESULTS/$name.json"
  else
    echo "gpu-check: $name failed: $(tail -n 3 "$RESULTS/$name.err")" >&2
    "$PYTHON" -c 'import json, sys; print(json.dumps({"error": sys.argv[1]}))' "$(tail -n 3 "$RESULTS/$name.err")" \
      > "$RESULTS/$name.json"
  fi
}

# ops-check compares the device with the CPU, so it has nothing to do in a CPU smoke run.
[ "$DEVICE" = cpu ] || step ops_parity "$OPS_CHECK_BIN" --device "$DEVICE"
# Peak memory of RoIAlign's reduction backward: embedding_bag's own against the transposed one vovdet runs.
step pool_rows_memory "$PYTHON" scripts/bench_pool_rows.py --device "$DEVICE" --repeats $([ "$QUICK" = 1 ] && echo 1 || echo 5)

# The 1-GPU NCCL world (Gloo on CPU): a short AMP training run through the launcher; the last log line carries
# images/s and the CUDA allocator's peak.
# Run once with the gradient all-reduce overlapped with backward (the default) and once after backward.
nccl_world() {
  local out; out=$(mktemp -d)
  "$TRAINER_BIN" train configs/demo_shapes.toml "${LAUNCH[@]}" --quiet --output "$out" \
    --set solver.max_iter=$([ "$QUICK" = 1 ] && echo 4 || echo 200) --set log.period=2 \
    --set "solver.amp.enabled=$([ ${#AMP[@]} -gt 0 ] && echo true || echo false)" --set eval.at_end=false "$@" >&2 \
    || return 1
  tail -n 1 "$out/metrics.jsonl"
}
step nccl_world nccl_world
step nccl_world_reduce_after_backward nccl_world --set ddp.overlap_grad_reduce=false
# Two processes sharing the one GPU over Gloo (the multi-process CUDA path without NCCL; two CPU workers on CPU).
[ "$DEVICE" = cpu ] || LAUNCH=(--num-gpus 2)
step gloo_two_workers_one_gpu nccl_world --set 'ddp.backend="gloo"'
[ "$DEVICE" = cpu ] || LAUNCH=(--num-gpus 1)

for batch in 2 4; do
  step "train_r50_b$batch" "$TRAINER_BIN" bench train "${R50[@]}" --device "$DEVICE" --size "$SIZE" --batch "$batch" \
    "${ITERS[@]}" "${AMP[@]}" --json
  step "train_torchvision_b$batch" "$PYTHON" scripts/bench_torchvision.py train --device "$DEVICE" --size "$SIZE" \
    --batch "$batch" "${ITERS[@]}" "${AMP[@]}" --num-classes 90
  step "train_v57_b$batch" "$TRAINER_BIN" bench train "${V57[@]}" --device "$DEVICE" --size "$SIZE" --batch "$batch" \
    "${ITERS[@]}" "${AMP[@]}" --json
done
# Float32 (eager), ours and torchvision's.
step train_r50_b2_fp32 "$TRAINER_BIN" bench train "${R50[@]}" --device "$DEVICE" --size "$SIZE" --batch 2 \
  "${ITERS[@]}" --json
step train_torchvision_b2_fp32 "$PYTHON" scripts/bench_torchvision.py train --device "$DEVICE" --size "$SIZE" \
  --batch 2 "${ITERS[@]}" --num-classes 90
# The GPU-shaped step: fixed shapes, loader-made bitmap masks and fixed RoIAlign sampling (no host sync between
# reads of the training log).
STATIC=(--set model.static_shapes.enabled=true --set 'input.mask_format="bitmask"'
  --set model.box_head.pooler_sampling_ratio=2 --set model.mask_head.pooler_sampling_ratio=2)
for batch in 2 4; do
  step "train_r50_static_b$batch" "$TRAINER_BIN" bench train "${R50[@]}" "${STATIC[@]}" --device "$DEVICE" \
    --size "$SIZE" --batch "$batch" "${ITERS[@]}" "${AMP[@]}" --json
done
step train_v57_static_b2 "$TRAINER_BIN" bench train "${V57[@]}" "${STATIC[@]}" --device "$DEVICE" --size "$SIZE" \
  --batch 2 "${ITERS[@]}" "${AMP[@]}" --json
# The GPU-shaped step in a real training run, with every step's host syncs and copies in metrics.jsonl.
static_run() {
  local out; out=$(mktemp -d)
  "$TRAINER_BIN" train configs/demo_shapes.toml --set "device=\"$DEVICE\"" --quiet --output "$out" "${STATIC[@]}" \
    --set solver.max_iter=$([ "$QUICK" = 1 ] && echo 6 || echo 40) --set log.period=$([ "$QUICK" = 1 ] && echo 6 || echo 20) \
    --set log.sync_counts=true --set "solver.amp.enabled=$([ ${#AMP[@]} -gt 0 ] && echo true || echo false)" \
    --set eval.at_end=false >&2 || return 1
  tail -n 1 "$out/metrics.jsonl"
}
step train_static_sync_counts static_run
# The same run under CUDA's own sync debug mode (log.cuda_sync_debug = "warn", on in the steps that read nothing
# after the first two): libtorch prints one warning per sync; the count should be 0.
cuda_sync_debug_run() {
  local out; out=$(mktemp -d)
  "$TRAINER_BIN" train configs/demo_shapes.toml --set "device=\"$DEVICE\"" --quiet --output "$out" "${STATIC[@]}" \
    --set solver.max_iter=40 --set log.period=20 --set 'log.cuda_sync_debug="warn"' \
    --set "solver.amp.enabled=$([ ${#AMP[@]} -gt 0 ] && echo true || echo false)" --set eval.at_end=false \
    > "$out/train.log" 2>&1 || { tail -n 3 "$out/train.log" >&2; return 1; }
  echo "{\"cuda_sync_warnings\": $(grep -c 'synchronizing CUDA operation' "$out/train.log")}"
}
[ "$DEVICE" = cpu ] || step train_static_cuda_sync_debug cuda_sync_debug_run
step proxy scripts/bench.sh --proxy --device "$DEVICE" $([ "$QUICK" = 1 ] && echo "--iters 2 --warmup 1" || echo "--iters 20 --warmup 5") \
  "${AMP[@]}"
step train_r50_b2_channels_last "$TRAINER_BIN" bench train "${R50[@]}" --set channels_last=true --device "$DEVICE" \
  --size "$SIZE" --batch 2 "${ITERS[@]}" "${AMP[@]}" --json
[ "$DEVICE" = cpu ] || step train_r50_b2_bf16 "$TRAINER_BIN" bench train "${R50[@]}" --device "$DEVICE" --size "$SIZE" \
  --batch 2 "${ITERS[@]}" --amp=bf16 --json
step infer_r50 "$TRAINER_BIN" bench infer "${R50[@]}" --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" "${AMP[@]}" --json
step infer_torchvision "$PYTHON" scripts/bench_torchvision.py infer --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" \
  "${AMP[@]}" --num-classes 90
step infer_v57 "$TRAINER_BIN" bench infer "${V57[@]}" --device "$DEVICE" --size "$SIZE" "${ITERS[@]}" "${AMP[@]}" --json
for cfg in vovnet39 vovnet57 vovnet99 r50_gn r101_gn densenet201; do
  step "backbone_$cfg" "$TRAINER_BIN" bench backbone "configs/${cfg}_maskrcnn.toml" --device "$DEVICE" \
    --size "$([ "$QUICK" = 1 ] && echo 320x320 || echo 800x1344)" "${ITERS[@]}" --json
done

# One JSON summary: every step's object, plus ours/torchvision ratios of the training throughput and memory.
"$PYTHON" - "$RESULTS" "$DEVICE" <<'PY'
import json, os, sys
folder, device = sys.argv[1], sys.argv[2]
steps = {}
for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
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
print(json.dumps({"device": device, "gpu": gpu, "failed": failed, "ratios": ratios, "steps": steps}))
sys.exit(1 if failed else 0)
PY
