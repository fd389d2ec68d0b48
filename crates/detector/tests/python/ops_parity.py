"""Reference outputs for the detection-ops parity test (crates/detector/tests/ops_parity.rs).

Usage: python ops_parity.py OUT_DIR
Writes one .npy file per tensor and OUT_DIR/manifest.json, a list of cases
{"name", "op", "params", "inputs": {name: file}, "expected": {name: file}}. Everything is seeded.
"""

import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_area, box_iou, nms, roi_align

OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
CASES = []


def save(case_name, key, tensor):
    file = f"{case_name}.{key}.npy"
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    np.save(os.path.join(OUT, file), np.ascontiguousarray(array))
    return file


def add_case(name, op, params, inputs, expected):
    CASES.append(
        {
            "name": name,
            "op": op,
            "params": params,
            "inputs": {k: save(name, "in_" + k, v) for k, v in inputs.items()},
            "expected": {k: save(name, "out_" + k, v) for k, v in expected.items()},
        }
    )


def random_boxes(generator, count, extent=100.0, max_size=40.0, dtype=torch.float32):
    xy = torch.rand(count, 2, generator=generator, dtype=torch.float64) * extent
    wh = torch.rand(count, 2, generator=generator, dtype=torch.float64) * max_size
    return torch.cat([xy, xy + wh], 1).to(dtype)


g = torch.Generator().manual_seed(20261128)

# ---- box_iou / box_area: random boxes plus degenerate ones (zero width, zero area, identical, disjoint).
a = random_boxes(g, 37)
b = random_boxes(g, 23)
a[0] = torch.tensor([10.0, 10.0, 10.0, 20.0])  # zero width
a[1] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # a point
b[0] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # the same point: 0/0 in torchvision
b[1] = a[2].clone()  # identical box: IoU 1
b[2] = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0])  # disjoint from everything
iou = box_iou(a, b)
add_case("box_iou_random", "box_iou", {}, {"a": a, "b": b}, {"iou": iou, "area_a": box_area(a)})
add_case("box_iou_empty", "box_iou", {}, {"a": torch.zeros(0, 4), "b": b}, {"iou": torch.zeros(0, 23), "area_a": torch.zeros(0)})

# ---- nms: random, heavy ties, duplicates, float64, empty, several thresholds.
for threshold in (0.3, 0.5, 0.7):
    boxes = random_boxes(g, 500)
    scores = torch.rand(500, generator=g)
    add_case(f"nms_random_{threshold}", "nms", {"iou_threshold": threshold}, {"boxes": boxes, "scores": scores},
             {"keep": nms(boxes, scores, threshold)})
boxes = random_boxes(g, 300, extent=50.0)
scores = torch.randint(0, 4, (300,), generator=g).float() / 4  # only four distinct scores: ties everywhere
boxes[10:20] = boxes[9]  # exact duplicates with tied scores
scores[10:20] = scores[9]
add_case("nms_ties", "nms", {"iou_threshold": 0.5}, {"boxes": boxes, "scores": scores},
         {"keep": nms(boxes, scores, 0.5)})
boxes = random_boxes(g, 200, dtype=torch.float64)
scores = torch.rand(200, generator=g, dtype=torch.float64)
add_case("nms_float64", "nms", {"iou_threshold": 0.6}, {"boxes": boxes, "scores": scores},
         {"keep": nms(boxes, scores, 0.6)})
degenerate = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
add_case("nms_degenerate", "nms", {"iou_threshold": 0.5},
         {"boxes": degenerate, "scores": torch.tensor([0.9, 0.8, 0.7, 0.6])},
         {"keep": nms(degenerate, torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.5)})
add_case("nms_empty", "nms", {"iou_threshold": 0.5}, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)},
         {"keep": nms(torch.zeros(0, 4), torch.zeros(0), 0.5)})

# ---- batched_nms: the coordinate-offset path (<= 4000 numbers) and the per-class path (> 4000).
for count in (400, 1500):
    boxes = random_boxes(g, count)
    scores = torch.rand(count, generator=g)
    scores[:50] = 0.5  # ties across and within classes
    groups = torch.randint(0, 7, (count,), generator=g)
    add_case(f"batched_nms_{count}", "batched_nms", {"iou_threshold": 0.5},
             {"boxes": boxes, "scores": scores, "groups": groups},
             {"keep": batched_nms(boxes, scores, groups, 0.5)})
add_case("batched_nms_empty", "batched_nms", {"iou_threshold": 0.5},
         {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "groups": torch.zeros(0, dtype=torch.int64)},
         {"keep": torch.zeros(0, dtype=torch.int64)})


# ---- roi_align: forward and input gradient of sum(output * weight).
def roi_case(name, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    features = features.clone().requires_grad_(True)
    out = roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    weight = torch.randn(out.shape, generator=g, dtype=features.dtype)
    (out * weight).sum().backward()
    add_case(name, "roi_align",
             {"output_size": list(output_size), "spatial_scale": spatial_scale, "sampling_ratio": sampling_ratio,
              "aligned": aligned},
             {"features": features.detach(), "rois": rois, "weight": weight},
             {"output": out, "grad": features.grad})


def mixed_rois(count, height, width, scale, dtype):
    """RoIs in image pixels for a map of height x width at `scale`: inside, partly outside, fully outside,
    sub-pixel, zero-size and reversed boxes, spread over two images."""
    img_h, img_w = height / scale, width / scale
    inside = random_boxes(g, count, extent=min(img_h, img_w) * 0.6, max_size=min(img_h, img_w) * 0.4, dtype=torch.float64)
    partly = random_boxes(g, count // 2, extent=img_w * 1.4, max_size=img_w * 0.6, dtype=torch.float64) - img_w * 0.2
    fully = torch.tensor([[img_w + 3 / scale, 2.0, img_w + 9 / scale, 8.0], [-20 / scale, -20 / scale, -5 / scale, -2 / scale],
                          [2.0, img_h + 4 / scale, 9.0, img_h + 30 / scale]], dtype=torch.float64)
    sub = torch.rand(count // 2, 2, generator=g, dtype=torch.float64) * min(img_h, img_w) * 0.9
    sub_pixel = torch.cat([sub, sub + torch.rand(count // 2, 2, generator=g, dtype=torch.float64) * 0.6 / scale], 1)
    special = torch.tensor([[4.0, 4.0, 4.0, 4.0], [6.0, 3.0, 2.0, 9.0], [1.0, 1.0, 1.0 + 1 / scale, 1.0 + 1 / scale]],
                           dtype=torch.float64)
    boxes = torch.cat([inside, partly, fully, sub_pixel, special])
    batch = torch.randint(0, 2, (len(boxes), 1), generator=g).double()
    return torch.cat([batch, boxes], 1).to(dtype)


for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
    features = torch.randn(2, 3, 13, 17, generator=g, dtype=dtype)
    for aligned in (False, True):
        for sampling_ratio in (2, 0):
            for output_size, scale in (((7, 7), 0.5), ((3, 5), 0.25)):
                rois = mixed_rois(12, 13, 17, scale, dtype)
                roi_case(f"roi_align_{tag}_a{int(aligned)}_s{sampling_ratio}_{output_size[0]}x{output_size[1]}",
                         features, rois, output_size, scale, sampling_ratio, aligned)
features = torch.randn(2, 4, 9, 11, generator=g)
roi_case("roi_align_empty", features, torch.zeros(0, 5), (7, 7), 1.0, 2, True)
features = torch.randn(3, 2, 1, 1, generator=g)  # 1x1 maps: degenerate normalisation
roi_case("roi_align_1x1_map", features, mixed_rois(4, 1, 1, 1.0, torch.float32), (2, 2), 1.0, 2, False)



# ---- multi-level pooling: detectron2's ROIPooler (re-implemented from detectron2/modeling/poolers.py) and
# torchvision's MultiScaleRoIAlign, forward and gradients of every level.
def detectron2_pooler(features, box_lists, output_size, scales, sampling_ratio, aligned, canonical_size=224.0,
                      canonical_level=4):
    min_level, max_level = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(box_lists)])
    sizes = torch.sqrt(torch.cat([box_area(b) for b in box_lists]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + sys.float_info.epsilon))
    levels = torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level
    output = torch.zeros(len(rois), features[0].shape[1], *output_size, dtype=features[0].dtype)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        inds = torch.nonzero(levels == level).squeeze(1)
        output[inds] = roi_align(feature, rois[inds], output_size, scale, sampling_ratio, aligned)
    return output


def pooler_boxes(count, img_h, img_w):
    sizes = 8.0 * torch.exp(torch.rand(count, 1, generator=g, dtype=torch.float64) * math.log(80.0))
    aspect = torch.exp((torch.rand(count, 1, generator=g, dtype=torch.float64) - 0.5) * 2.0)
    wh = torch.cat([sizes * aspect, sizes / aspect], 1)
    xy = torch.rand(count, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h]) - wh / 3
    boxes = torch.cat([xy, xy + wh], 1)
    # Exact canonical sizes (level boundaries): 56, 112, 224, 448 pixel squares.
    exact = torch.tensor([[0.0, 0.0, 56.0, 56.0], [10.0, 5.0, 122.0, 117.0], [0.0, 0.0, 224.0, 224.0],
                          [3.0, 3.0, 451.0, 451.0]], dtype=torch.float64)
    return torch.cat([boxes, exact]).float()


scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
img_h, img_w = 128, 160
for mapping, aligned, sampling_ratio, output_size in (("detectron2", True, 0, (7, 7)), ("detectron2", False, 2, (14, 14)),
                                                      ("torchvision", False, 2, (7, 7))):
    features = [torch.randn(2, 3, img_h // 2 ** (l + 2), img_w // 2 ** (l + 2), generator=g).requires_grad_(True)
                for l in range(4)]
    box_lists = [pooler_boxes(40, img_h, img_w), pooler_boxes(25, img_h, img_w)]
    if mapping == "detectron2":
        out = detectron2_pooler(features, box_lists, output_size, scales, sampling_ratio, aligned)
    else:
        pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, sampling_ratio)
        out = pooler(OrderedDict(zip(["p2", "p3", "p4", "p5"], features)), box_lists, [(img_h, img_w)] * 2)
    weight = torch.randn(out.shape, generator=g)
    (out * weight).sum().backward()
    inputs = {f"features_{l}": f.detach() for l, f in enumerate(features)}
    inputs.update({f"boxes_{i}": b for i, b in enumerate(box_lists)})
    inputs["weight"] = weight
    expected = {"output": out}
    expected.update({f"grad_{l}": f.grad for l, f in enumerate(features)})
    add_case(f"pooler_{mapping}_a{int(aligned)}_s{sampling_ratio}", "pooler",
             {"output_size": list(output_size), "scales": scales, "sampling_ratio": sampling_ratio, "aligned": aligned,
              "mapping": mapping, "levels": 4, "images": 2},
             inputs, expected)
# Single level and images without boxes.
features = torch.randn(2, 3, 16, 20, generator=g).requires_grad_(True)
box_lists = [torch.zeros(0, 4), pooler_boxes(6, 64, 80)]
out = detectron2_pooler([features], box_lists, (5, 5), [1 / 4], 2, True)
weight = torch.randn(out.shape, generator=g)
(out * weight).sum().backward()
add_case("pooler_single_level", "pooler",
         {"output_size": [5, 5], "scales": [1 / 4], "sampling_ratio": 2, "aligned": True, "mapping": "detectron2",
          "levels": 1, "images": 2},
         {"features_0": features.detach(), "boxes_0": box_lists[0], "boxes_1": box_lists[1], "weight": weight},
         {"output": out, "grad_0": features.grad})


# ---- masks: polygons cropped to RoIs (detectron2 rasterize_polygons_within_box + pycocotools), bitmask
# crop-and-resize (detectron2 BitMasks.crop_and_resize) and pasting (detectron2 paste_masks_in_image, CPU path).
import pycocotools.mask as mask_util  # noqa: E402


def random_polygon(cx, cy, radius, points):
    angles = np.sort(torch.rand(points, generator=g, dtype=torch.float64).numpy() * 2 * np.pi)
    radii = radius * (0.4 + 0.6 * torch.rand(points, generator=g, dtype=torch.float64).numpy())
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).reshape(-1)


def detectron2_rasterize(polygons, box, mask_size):
    w, h = box[2] - box[0], box[3] - box[1]
    polygons = [p.copy() for p in polygons]
    for p in polygons:
        p[0::2] = p[0::2] - box[0]
        p[1::2] = p[1::2] - box[1]
    ratio_h = mask_size / max(h, 0.1)
    ratio_w = mask_size / max(w, 0.1)
    for p in polygons:
        p[0::2] *= ratio_w
        p[1::2] *= ratio_h
    if len(polygons) == 0:
        return np.zeros((mask_size, mask_size), dtype=np.float32)
    rle = mask_util.merge(mask_util.frPyObjects([list(p) for p in polygons], mask_size, mask_size))
    return mask_util.decode(rle).astype(np.float32)


instances, rois, expected_masks = [], [], []
for index in range(40):
    cx, cy, radius = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([200.0, 150.0, 60.0])).tolist()
    polygons = [random_polygon(cx, cy, radius + 2, 5 + index % 9) for _ in range(1 + index % 3)]
    if index == 0:
        polygons = []
    x0, y0 = cx - radius * 1.2 + 20 * (torch.rand(2, generator=g, dtype=torch.float64) - 0.5).numpy()
    side_w, side_h = (radius * 2 * (0.3 + torch.rand(2, generator=g, dtype=torch.float64))).tolist()
    box = np.array([x0, y0, x0 + side_w, y0 + side_h], dtype=np.float64)
    if index == 1:
        box = np.array([cx, cy, cx + 0.05, cy + 0.05])  # sub-0.1 px RoI
    if index == 2:
        box = np.array([cx + 3 * radius + 10, cy, cx + 3 * radius + 40, cy + 30])  # RoI away from the object
    instances.append([p.tolist() for p in polygons])
    rois.append(box)
    expected_masks.append(detectron2_rasterize(polygons, box, 28))
add_case("polygon_roi_masks", "polygon_masks", {"polygons": instances, "size": 28},
         {"rois": torch.tensor(np.stack(rois))}, {"masks": torch.tensor(np.stack(expected_masks))})

full_polygons = [inst if inst else [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]] for inst in instances[:12]]
full = torch.tensor(np.stack([mask_util.decode(mask_util.merge(mask_util.frPyObjects(inst, 180, 230)))
                              for inst in full_polygons])).float()
bit_rois = torch.tensor(np.stack(rois[:12])).float()
bit_rois[1] = torch.tensor([-20.0, -10.0, 300.0, 200.0])  # beyond the image
batch = torch.arange(12, dtype=torch.float32)[:, None]
cropped = roi_align(full[:, None], torch.cat([batch, bit_rois], 1), (28, 28), 1.0, 0, aligned=True).squeeze(1) >= 0.5
# The full-image masks double as the oracle of polygons_to_bitmask (non-square, 180x230).
add_case("bitmask_roi_masks", "bitmask_masks", {"size": 28, "polygons": full_polygons, "height": 180, "width": 230},
         {"masks": full, "rois": bit_rois},
         {"masks": cropped.float()})


def detectron2_paste(masks, boxes, img_h, img_w, threshold=0.5):
    out = torch.zeros(len(masks), img_h, img_w, dtype=torch.bool)
    for i in range(len(masks)):
        box = boxes[i : i + 1]
        x0_int, y0_int = torch.clamp(box.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
        x1_int = torch.clamp(box[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
        y1_int = torch.clamp(box[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
        if y1_int <= y0_int or x1_int <= x0_int:  # box beyond the image: detectron2 would fail, we paste nothing
            continue
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        sampled = torch.nn.functional.grid_sample(masks[i : i + 1, None], grid, align_corners=False)
        out[i, y0_int:y1_int, x0_int:x1_int] = sampled[0, 0] >= threshold
    return out


paste_masks_in = torch.sigmoid(torch.randn(15, 28, 28, generator=g) * 3)
paste_boxes = random_boxes(g, 15, extent=150.0, max_size=120.0)
paste_boxes[0] = torch.tensor([-30.0, -20.0, 40.0, 50.0])  # partly outside
paste_boxes[1] = torch.tensor([10.3, 12.7, 10.9, 13.1])  # sub-pixel
paste_boxes[2] = torch.tensor([5.5, 3.25, 170.0, 118.0])  # large: clipped to the image on the right
add_case("paste_masks", "paste_masks", {"height": 120, "width": 160, "threshold": 0.5},
         {"masks": paste_masks_in, "boxes": paste_boxes},
         {"masks": detectron2_paste(paste_masks_in, paste_boxes, 120, 160)})

# torchvision's own paste (its Mask R-CNN post-processing), on boxes clipped to the image as torchvision does.
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste  # noqa: E402

tv_boxes = torchvision.ops.clip_boxes_to_image(paste_boxes, (120, 160))
tv_pasted = torchvision_paste(paste_masks_in[:, None], tv_boxes, (120, 160))[:, 0]
add_case("paste_masks_torchvision", "paste_masks_torchvision", {"height": 120, "width": 160},
         {"masks": paste_masks_in, "boxes": tv_boxes}, {"masks": tv_pasted})

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump({"torchvision": torchvision.__version__, "cases": CASES}, f)
