"""Oracle for tests/coco_eval.rs: writes seeded random detections for a COCO ground truth and pycocotools' results.

Usage: coco_reference.py GT.json OUTDIR SEED. Writes OUTDIR/dt_bbox.json and OUTDIR/dt_segm.json (COCO results:
jittered copies of every ground-truth object including crowd regions, wrong classes, scores rounded to one decimal
so many tie, and on some images 130 extra detections of one class, more than maxDets=100) and OUTDIR/expected.json
({"bbox"|"segm": {"stats": [12], "lines": [the 12 lines summarize() prints]}, "mask_sample": a random 13x17
mask, row-major, with its pycocotools RLE counts}).
"""
import contextlib
import io
import json
import sys

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

gt_path, out_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.RandomState(seed)
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(gt_path)
category_ids = sorted(gt.getCatIds())


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def box_mask(h, w, box):
    mask = np.zeros((h, w), dtype=np.uint8)
    x0, y0 = int(max(0, box[0])), int(max(0, box[1]))
    x1, y1 = int(min(w, box[0] + box[2] + 1)), int(min(h, box[1] + box[3] + 1))
    mask[y0:y1, x0:x1] = 1
    return mask


def jitter(box, scale, w, h):
    x, y, bw, bh = box
    x = float(np.clip(x + rng.randn() * scale * bw, 0, w - 2))
    y = float(np.clip(y + rng.randn() * scale * bh, 0, h - 2))
    bw = float(np.clip(bw * np.exp(rng.randn() * scale), 1, w - x))
    bh = float(np.clip(bh * np.exp(rng.randn() * scale), 1, h - y))
    return [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]


detections = []
for index, image_id in enumerate(sorted(gt.getImgIds())):
    info = gt.loadImgs(image_id)[0]
    h, w = info["height"], info["width"]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
    for ann in anns:
        for _ in range(rng.randint(0, 3)):
            category = ann["category_id"] if rng.rand() < 0.85 else int(rng.choice(category_ids))
            box = jitter(ann["bbox"], 0.08, w, h)
            if rng.rand() < 0.5:
                shifted = np.roll(gt.annToMask(ann), (rng.randint(-3, 4), rng.randint(-3, 4)), axis=(0, 1))
            else:
                shifted = box_mask(h, w, box)
            detections.append({"image_id": image_id, "category_id": category, "bbox": box,
                               "score": round(float(rng.rand()), 1), "segmentation": rle_of(shifted)})
    if index % 7 == 0 and anns:
        category = anns[0]["category_id"]
        for _ in range(130):
            box = jitter(anns[0]["bbox"], 0.5, w, h)
            detections.append({"image_id": image_id, "category_id": category, "bbox": box,
                               "score": round(float(rng.rand()), 1), "segmentation": rle_of(box_mask(h, w, box))})

bbox_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]
json.dump(bbox_only, open(f"{out_dir}/dt_bbox.json", "w"))
json.dump(detections, open(f"{out_dir}/dt_segm.json", "w"))

expected = {}
for iou_type in ["bbox", "segm"]:
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(f"{out_dir}/dt_{iou_type}.json")
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluator.summarize()
    expected[iou_type] = {"stats": [float(v) for v in evaluator.stats], "lines": printed.getvalue().splitlines(),
                          "detections": len(detections)}
sample = (rng.rand(13, 17) < 0.4).astype(np.uint8)
expected["mask_sample"] = {"height": 13, "width": 17, "mask": sample.reshape(-1).tolist(), "counts": rle_of(sample)["counts"]}
json.dump(expected, open(f"{out_dir}/expected.json", "w"))
