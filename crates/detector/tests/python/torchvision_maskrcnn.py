"""Oracle for the whole-model parity test: torchvision's maskrcnn_resnet50_fpn (v1) with seeded random weights.

Usage: torchvision_maskrcnn.py OUT_DIR NUM_CLASSES IMAGE...

Writes OUT_DIR/weights.safetensors (the state dict), OUT_DIR/inputs.safetensors (each image as decoded by PIL,
float [3, H, W] in [0, 1]) and OUT_DIR/outputs.safetensors (boxes, labels, scores and masks > 0.5 per image).
The random weights are made well-conditioned: every FrozenBatchNorm gets the statistics of its input on the
first image (so activations stay normalised through the random ResNet), and the heads' output layers get larger
standard deviations so that scores and objectness are spread out rather than tied.
"""

import sys
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops.misc import FrozenBatchNorm2d


def main():
    out_dir, num_classes, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    images = [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        for p in paths
    ]

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)

        def calibrate(module, inputs):
            x = inputs[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)))

        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        model.eval()
        model.backbone.body(model.transform([images[0]])[0].tensors)
        for h in hooks:
            h.remove()
        # Output layers scaled to their input's RMS: objectness and class logits spread over a few units (no
        # saturated or tied scores), small box deltas, mask logits of order one.
        rms = {}

        def record(name):
            def hook(module, inputs):
                rms[name] = inputs[0].pow(2).mean().sqrt().item()

            return hook

        layers = {
            "rpn_cls": (model.rpn.head.cls_logits, 2.0),
            "rpn_box": (model.rpn.head.bbox_pred, 0.1),
            "cls": (model.roi_heads.box_predictor.cls_score, 1.5),
            "box": (model.roi_heads.box_predictor.bbox_pred, 1.0),
            "mask": (model.roi_heads.mask_predictor.mask_fcn_logits, 2.0),
        }
        hooks = [layer.register_forward_pre_hook(record(name)) for name, (layer, _) in layers.items()]
        model([images[0]])
        for h in hooks:
            h.remove()
        for name, (layer, target_std) in layers.items():
            fan_in = layer.weight[0].numel()
            torch.nn.init.normal_(layer.weight, std=target_std / (rms[name] * fan_in**0.5))
            torch.nn.init.normal_(layer.bias, std=0.1 * target_std)

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, f"{out_dir}/weights.safetensors")
        save_file({f"image{i}": img for i, img in enumerate(images)}, f"{out_dir}/inputs.safetensors")
        start = time.perf_counter()
        results = model(images)
        print(f"torchvision inference: {time.perf_counter() - start:.2f} s for {len(images)} images (2 threads)")
        outputs = {}
        for i, r in enumerate(results):
            outputs[f"boxes{i}"] = r["boxes"].contiguous()
            outputs[f"labels{i}"] = r["labels"].contiguous()
            outputs[f"scores{i}"] = r["scores"].contiguous()
            outputs[f"masks{i}"] = (r["masks"][:, 0] > 0.5).to(torch.uint8).contiguous()
        save_file(outputs, f"{out_dir}/outputs.safetensors")
        print("detections per image:", [len(r["boxes"]) for r in results])


if __name__ == "__main__":
    main()
