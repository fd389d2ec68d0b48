#!/usr/bin/env python3
"""torchvision's maskrcnn_resnet50_fpn measured the way `trainer bench train|infer` measures ours.

Random initialisation with a trainable backbone (weights=None, weights_backbone=None, trainable_backbone_layers=5,
so torchvision builds it with ordinary BatchNorm), the same synthetic inputs as `trainer bench` (see
`synthetic_inputs`), the transform's min_size/max_size set so that images are not resized, and the same
protocol: untimed warm-up iterations, then timed ones with CUDA synchronised before each timer read.

    train: forward under autocast when --amp (fp16, or bf16 with --amp=bf16; on CUDA or CPU), the summed loss read
           with .item() (as torchvision's reference train script and `trainer train` do), backward through a
           GradScaler (fp16 only), SGD step.
    infer: batch 1, box_score_thresh=0 so that a random model returns detections_per_img detections; the model
           call, end to end (host uint8 pixels to detections on the host) and paste_masks_in_image alone.

Prints one JSON object in the shape of `trainer bench --json`.
Usage: bench_torchvision.py train|infer [--size HxW] [--batch B] [--iters N] [--warmup K] [--device D] [--amp[=DTYPE]]
       [--threads T] [--seed S] [--num-classes C] [--narrow]
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.models.detection.roi_heads import paste_masks_in_image

INSTANCES = 4  # ground-truth instances per image, as SYNTHETIC_INSTANCES in crates/trainer/src/bench.rs


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        sys.exit(f"--size {text}: expected HxW, e.g. 800x1344")
    if h <= 0 or w <= 0:
        sys.exit(f"--size {text}: sides must be positive")
    return h, w


def device_name(device):
    """Our report's spelling (tch's Debug format): Cpu, Cuda(0)."""
    return "Cpu" if device.type == "cpu" else f"Cuda({device.index or 0})"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # restart VmHWM from the current resident set, as `trainer bench` does
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            print(f"warning: cannot reset VmHWM: {e}; the peak covers the whole process", file=sys.stderr)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss"
    return None, "peak_rss"


def synthetic_inputs(batch, h, w, num_classes, seed):
    """The recipe of `SyntheticInputs` in crates/trainer/src/bench.rs: pixels, box parameters and labels drawn in
    this order from torch's CPU generator; masks are the octagons inscribed in the boxes, rasterised here."""
    torch.manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8)
    params = torch.rand(batch, INSTANCES, 4)
    labels = torch.randint(0, num_classes, (batch, INSTANCES))
    checksum = float(pixels.sum(dtype=torch.float64))
    targets = []
    for b in range(batch):
        boxes, masks = [], []
        for r0, r1, r2, r3 in params[b].tolist():
            bw, bh = (0.1 + 0.4 * r2) * w, (0.1 + 0.4 * r3) * h
            x1, y1 = r0 * (w - bw), r1 * (h - bh)
            corners = [x1, y1, x1 + bw, y1 + bh]
            checksum += sum(corners)
            boxes.append(corners)
            cx, cy = x1 + bw / 2, y1 + bh / 2
            octagon = [
                (cx + bw / 2 * math.cos(i * math.pi / 4), cy + bh / 2 * math.sin(i * math.pi / 4)) for i in range(8)
            ]
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon(octagon, fill=1)
            masks.append(torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(h, w))
        # torchvision's labels count from 1 (0 is background).
        targets.append({"boxes": torch.tensor(boxes), "labels": labels[b] + 1, "masks": torch.stack(masks)})
    return pixels, targets, checksum


def time_iterations(step, warmup, iters, device):
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# Operators that make the host wait for a CUDA device (as SYNCHRONISING_OPS in crates/trainer/src/op_count.rs).
SYNCHRONISING_OPS = ["aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
                     "aten::_unique2"]


def count_ops(step):
    """aten operators one call of `step` dispatches, from torch.profiler (RecordFunction, as ours)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:15]
    return {
        "ops_per_iter": sum(counts.values()),
        "synchronising_ops_per_iter": sum(counts.get(op, 0) for op in SYNCHRONISING_OPS),
        "top_ops": [list(kv) for kv in top],
    }


# The narrowed heads of the host-overhead proxy; scripts/bench.sh --proxy sets the same on ours.
NARROW = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["train", "infer"])
    parser.add_argument("--size", default="800x1344")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", nargs="?", const="fp16", choices=["fp16", "bf16"], help="autocast dtype (default fp16)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=90, help="foreground classes (torchvision adds 1)")
    parser.add_argument(
        "--narrow",
        action="store_true",
        help="narrowed heads for the host-overhead proxy (scripts/bench.sh --proxy): 200/100 proposals per level/"
        "image before/after NMS, 64 RPN anchors and 32 RoIs sampled per image",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (100 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    batch = args.batch or (2 if args.mode == "train" else 1)
    if args.mode == "infer" and batch != 1:
        sys.exit("infer measures batch 1 (detectron2's protocol); drop --batch")
    h, w = parse_size(args.size)
    if cuda:
        torch.backends.cudnn.benchmark = False  # as ours: libtorch's default

    reset_peak(device)
    torch.manual_seed(args.seed)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        trainable_backbone_layers=5,
        num_classes=args.num_classes + 1,
        min_size=min(h, w),
        max_size=max(h, w),
        box_score_thresh=0.0,
        **(NARROW if args.narrow else {}),
    ).to(device)
    pixels, targets, checksum = synthetic_inputs(batch, h, w, args.num_classes, args.seed)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp is not None)  # noqa: E731
    report = {
        "mode": args.mode,
        "config": "torchvision maskrcnn_resnet50_fpn (random init, trainable_backbone_layers=5)",
        "backbone": "R-50 (torchvision, BN)",
        "batch": batch,
        "size": [h, w],
        "device": device_name(device),
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "iters": iters,
        "warmup": warmup,
    }

    if args.mode == "train":
        model.train()
        images = [p.to(device).float() / 255 for p in pixels]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        params = [p for p in model.parameters() if p.requires_grad]
        # The first warm-up LR of torchvision's reference recipe (0.02 x 0.001): a random model diverges at 0.02,
        # and the step's cost does not depend on the LR.
        optimizer = torch.optim.SGD(params, lr=0.02 * 0.001, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        last = {}

        def step():
            with autocast():
                losses = sum(model(images, targets).values())
            value = losses.item()
            if not math.isfinite(value):
                sys.exit(f"loss is {value}")
            last["loss"] = value
            optimizer.zero_grad()
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()

        times = time_iterations(step, warmup, iters, device)
        total = sum(times)
        report.update(
            seconds_per_iter=statistics.median(times),
            images_per_second=batch * len(times) / total,
        )
        details = {"mean_seconds_per_iter": total / len(times), "last_total_loss": last["loss"], **count_ops(step)}
    else:
        model.eval()
        image = pixels[0].to(device).float() / 255
        counts, last = [], {}

        def model_call():
            with torch.inference_mode(), autocast():
                out = model([image])[0]
            counts.append(out["boxes"].shape[0])
            last["boxes"] = out["boxes"].float()

        def end_to_end():
            with torch.inference_mode(), autocast():
                out = model([pixels[0].to(device).float() / 255])[0]
            {k: v.cpu() for k, v in out.items()}

        model_times = time_iterations(model_call, warmup, iters, device)
        end_to_end_times = time_iterations(end_to_end, warmup, iters, device)
        boxes = last["boxes"]
        roi_masks = torch.rand(boxes.shape[0], 1, 28, 28, device=device)

        def paste():
            with torch.inference_mode():
                paste_masks_in_image(roi_masks, boxes, (h, w), padding=1)

        paste_times = time_iterations(paste, warmup, iters, device)
        seconds = statistics.median(model_times)
        report.update(seconds_per_iter=seconds, images_per_second=1.0 / seconds)
        details = {
            "end_to_end_seconds_per_image": statistics.median(end_to_end_times),
            "paste_masks_seconds_per_image": statistics.median(paste_times),
            "detections_per_image": sum(counts) / len(counts),
        }
    peak, source = peak_memory(device)
    report.update(peak_memory_bytes=peak, peak_memory_source=source, **details, input_checksum=checksum)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
