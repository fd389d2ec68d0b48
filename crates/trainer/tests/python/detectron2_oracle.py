"""detectron2 (v0.5's source, unpacked by scripts/setup into .venv/oracles) as the oracle of the Mask R-CNN
training step, the solver trajectory and inference.

The model is detectron2's own `GeneralizedRCNN` built from a config equivalent to ours; for VoVNet the bottom-up
network is the independent PyTorch VoVNet of crates/backbone/tests/python/reference.py (the authors' parameter
names), registered as a detectron2 FPN backbone. Weights start from detectron2's seeded initialisation with every
norm layer's affine parameters (and FrozenBN statistics) randomised, so that each of them matters.

Usage (DIR holds the inputs written by the Rust test and receives the outputs):
  detectron2_oracle.py step DIR SPEC.json        -> weights.safetensors, losses.json, grads.safetensors
  detectron2_oracle.py trajectory DIR SPEC.json  -> weights.safetensors, losses.json (one entry per step),
                                                    final.safetensors
  detectron2_oracle.py infer DIR SPEC.json       -> weights.safetensors (unless SPEC names weights to load),
                                                    outputs.safetensors
SPEC.json: {"backbone": "V-19" | "V-39" | "R-50", "norm": "GN" | "FrozenBN", "num_classes": K,
            "rpn_batch": N, "roi_batch": N, "every_anchor_a_proposal": bool, "head_width": N (FPN and heads), "stride_in_1x1": bool, "min_size_test": S, "max_size_test": S,
            "solver": {"base_lr", "momentum", "weight_decay", "warmup_iters", "warmup_factor", "steps", "gamma",
                       "max_iter"}, "load_weights": "path with detectron2 names" (optional)}
Inputs: DIR/inputs.safetensors with image{i} ([3, H, W] float RGB, 0..255), and for training boxes{i} ([K, 4]
xyxy) and labels{i} ([K] int64); DIR/polygons.json: per image, per instance, a list of flat polygons.
"""
import json
import sys
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")  # deform conv only; Mask R-CNN never calls it
import PIL.Image  # noqa: E402

PIL.Image.LINEAR = PIL.Image.BILINEAR  # removed in Pillow 10; detectron2 v0.5 names it at import
sys.path.insert(0, str(REPO / ".venv/oracles/detectron2-0.5"))
sys.path.insert(0, str(REPO / "crates/backbone/tests/python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone import FPN, Backbone  # noqa: E402
from detectron2.modeling.backbone.fpn import LastLevelMaxPool  # noqa: E402
from detectron2.solver import build_lr_scheduler, build_optimizer  # noqa: E402
from detectron2.structures import Boxes, Instances, PolygonMasks  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import reference  # noqa: E402

VOVNET = {}


class ReferenceVoVNet(Backbone):
    """reference.VoVNet as a detectron2 backbone: its modules at the top level, so that the state-dict names are
    the authors' (`stem.stem_1/conv.weight`, `stage2.OSA2_1...`)."""

    def __init__(self, name, norm, groups):
        super().__init__()
        net = reference.VoVNet(name, True, norm, groups)
        for child_name, child in net.named_children():
            self.add_module(child_name, child)
        self.stage_names = net.stage_names
        concat = reference.SPECS[name][2]
        self._out_feature_channels = {s: c for s, c in zip(self.stage_names, concat)}
        self._out_feature_strides = {s: 4 * 2**i for i, s in enumerate(self.stage_names)}
        self._out_features = list(self.stage_names)

    def forward(self, x):
        y = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            y = getattr(self, name)(y)
            outputs[name] = y
        return outputs

    def output_shape(self):
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_reference_vovnet_fpn_backbone(cfg, input_shape):
    bottom_up = ReferenceVoVNet(VOVNET["name"], "GN", 32)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def config(spec):
    """detectron2's config equivalent to ours: Base-RCNN-FPN with the from-scratch GN heads (or torchvision-free
    pretrained layout with FrozenBN and a 2fc box head)."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = spec.get("rpn_batch", 256)
    if spec.get("every_anchor_a_proposal"):
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1_000_000
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1_000_000
        cfg.MODEL.RPN.NMS_THRESH = 1.0
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = spec["num_classes"]
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = spec.get("roi_batch", 512)
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    width = spec.get("head_width")
    if width:
        cfg.MODEL.FPN.OUT_CHANNELS = width
        cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = width
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = width
        cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = width
    frozen = spec["norm"] == "FrozenBN"
    head_norm = "" if frozen else "GN"
    cfg.MODEL.FPN.NORM = head_norm
    cfg.MODEL.ROI_BOX_HEAD.NORM = head_norm
    cfg.MODEL.ROI_MASK_HEAD.NORM = head_norm
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 0 if frozen else 4
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2 if frozen else 1
    cfg.MODEL.BACKBONE.FREEZE_AT = 2 if frozen else 0
    if spec["backbone"].startswith("V-"):
        VOVNET["name"] = spec["backbone"]
        cfg.MODEL.BACKBONE.NAME = "build_reference_vovnet_fpn_backbone"
        cfg.MODEL.FPN.IN_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.DEPTH = int(spec["backbone"][2:])
        cfg.MODEL.RESNETS.NORM = spec["norm"]
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = spec.get("stride_in_1x1", False)
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.INPUT.MIN_SIZE_TEST = spec.get("min_size_test", 800)
    cfg.INPUT.MAX_SIZE_TEST = spec.get("max_size_test", 1333)
    solver = spec.get("solver", {})
    cfg.SOLVER.BASE_LR = solver.get("base_lr", 0.02)
    cfg.SOLVER.MOMENTUM = solver.get("momentum", 0.9)
    cfg.SOLVER.WEIGHT_DECAY = solver.get("weight_decay", 1e-4)
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    # Current detectron2's default (v0.5 copied WEIGHT_DECAY here, which also decayed the biases of norm layers);
    # None lets biases follow their layer, as our `solver.weight_decay_bias` does when absent.
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None
    cfg.SOLVER.WARMUP_ITERS = solver.get("warmup_iters", 1000)
    cfg.SOLVER.WARMUP_FACTOR = solver.get("warmup_factor", 0.001)
    cfg.SOLVER.STEPS = tuple(solver.get("steps", [60000, 80000]))
    cfg.SOLVER.GAMMA = solver.get("gamma", 0.1)
    cfg.SOLVER.MAX_ITER = solver.get("max_iter", 90000)
    return cfg


def randomise_norms(model):
    """Random affine parameters in every norm layer (and random statistics in FrozenBN), seeded."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, FrozenBatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        # Random statistics make a 16-block residual stack explode (saturated scores, a handful of detections);
        # damping each block's last norm keeps the features in range, as zero-initialised residual norms do.
        for name, module in model.named_modules():
            if isinstance(module, FrozenBatchNorm2d) and name.endswith("conv3.norm"):
                module.weight.mul_(0.3)


def build(spec, directory):
    torch.manual_seed(spec.get("seed", 0))
    cfg = config(spec)
    model = build_model(cfg)
    if "load_weights" in spec:
        state = load_file(spec["load_weights"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"load_weights: missing {missing}, unexpected {unexpected}")
    else:
        randomise_norms(model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "weights.safetensors"))
    return cfg, model


def inputs(directory, with_targets):
    tensors = load_file(str(directory / "inputs.safetensors"))
    polygons = json.loads((directory / "polygons.json").read_text()) if with_targets else None
    batch = []
    i = 0
    while f"image{i}" in tensors:
        rgb = tensors[f"image{i}"]
        h, w = rgb.shape[1:]
        item = {"image": rgb.flip(0), "height": h, "width": w}  # detectron2's models take BGR
        if with_targets:
            instances = Instances((h, w))
            instances.gt_boxes = Boxes(tensors[f"boxes{i}"])
            instances.gt_classes = tensors[f"labels{i}"]
            instances.gt_masks = PolygonMasks(
                [[np.asarray(p, dtype=np.float64) for p in parts] for parts in polygons[i]]
            )
            item["instances"] = instances
        batch.append(item)
        i += 1
    return batch


def named_grads(model):
    return {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}


def main():
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    mode, directory, spec_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 2))
    cfg, model = build(spec, directory)
    if mode == "step":
        model.train()
        with EventStorage(0):  # the losses log statistics into it
            losses = model(inputs(directory, True))
        sum(losses.values()).backward()
        (directory / "losses.json").write_text(json.dumps({k: v.item() for k, v in losses.items()}))
        save_file(named_grads(model), str(directory / "grads.safetensors"))
    elif mode == "trajectory":
        model.train()
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        batch = inputs(directory, True)
        history = []
        for iteration in range(cfg.SOLVER.MAX_ITER):
            with EventStorage(iteration):
                losses = model(batch)
            history.append({k: v.item() for k, v in losses.items()})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            scheduler.step()
        (directory / "losses.json").write_text(json.dumps(history))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "final.safetensors"))
    elif mode == "infer":
        model.eval()
        with torch.no_grad():
            results = model(inputs(directory, False))
        out = {}
        for i, result in enumerate(results):
            instances = result["instances"]
            out[f"boxes{i}"] = instances.pred_boxes.tensor.contiguous()
            out[f"scores{i}"] = instances.scores.contiguous()
            out[f"labels{i}"] = instances.pred_classes.contiguous()
            out[f"masks{i}"] = instances.pred_masks.to(torch.uint8).contiguous()
        save_file(out, str(directory / "outputs.safetensors"))
        print(" ".join(f"image {i}: {len(r['instances'])} detections" for i, r in enumerate(results)))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
