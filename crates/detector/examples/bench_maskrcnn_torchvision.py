"""torchvision side of bench_maskrcnn.rs: maskrcnn_resnet50_fpn (v1, random weights) on the same inputs.

Usage: bench_maskrcnn_torchvision.py INPUTS.safetensors THREADS ITERS. Prints one JSON object. The model's own
transform is bypassed (the inputs are already normalised and a multiple of 32), as on our side.
"""

import json
import sys
import time

import torch
import torchvision
from safetensors.torch import load_file
from torchvision.models.detection.image_list import ImageList


def main():
    inputs, threads, iters = load_file(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    images = inputs["images"]
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    target = {"boxes": inputs["boxes"], "labels": inputs["labels"], "masks": inputs["masks"]}

    def run(batch, train):
        image_list = ImageList(batch, sizes[: batch.shape[0]])
        features = model.backbone(batch)
        targets = [dict(target) for _ in range(batch.shape[0])] if train else None
        proposals, rpn_losses = model.rpn(image_list, features, targets)
        detections, roi_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
        if train:
            sum(list(rpn_losses.values()) + list(roi_losses.values())).backward()
        else:
            model.transform.postprocess(detections, image_list.image_sizes, sizes[: batch.shape[0]])

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters

    model.train()
    train = timed(lambda: run(images, True))
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: run(images[:1], False))
    print(json.dumps({"train_step_s": round(train, 3), "inference_s_per_image": round(infer, 3)}))


if __name__ == "__main__":
    main()
