"""Oracle for tests/coco_eval_segm_only.rs: a segm results file without `bbox` (issue 15, item 11).

Usage: coco_segm_only.py GT.json OUTDIR SEED. Writes OUTDIR/dt.json: for every ground-truth object a detection
whose mask is the object's mask shifted by a few pixels (sometimes grown into a rectangle), with a random score and
no `bbox` key, plus a few false positives; then OUTDIR/expected.json: {"segm": [12 stats], "bbox": [12 stats],
"derived": [[bbox, area] that pycocotools' loadRes derived for each detection, in file order]}.
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


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


detections = []
for ann in gt.loadAnns(sorted(gt.getAnnIds())):
    mask = gt.annToMask(ann)
    dy, dx = rng.randint(-3, 4, size=2)
    mask = np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    if rng.rand() < 0.3:
        ys, xs = np.nonzero(mask)
        if len(ys):
            mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    if mask.sum() == 0:
        continue
    detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                       "segmentation": rle_of(mask), "score": round(float(rng.rand()), 3)})
for image_id in sorted(gt.getImgIds())[:3]:
    info = gt.loadImgs(image_id)[0]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    y, x = rng.randint(0, info["height"] - 8), rng.randint(0, info["width"] - 8)
    mask[y:y + 6, x:x + 7] = 1
    detections.append({"image_id": image_id, "category_id": int(sorted(gt.getCatIds())[0]),
                       "segmentation": rle_of(mask), "score": 0.05})
with open(f"{out_dir}/dt.json", "w") as f:
    json.dump(detections, f)

expected = {}
with contextlib.redirect_stdout(io.StringIO()):
    dt = gt.loadRes(f"{out_dir}/dt.json")
    for iou_type in ["segm", "bbox"]:
        evaluator = COCOeval(gt, gt.loadRes(f"{out_dir}/dt.json"), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        expected[iou_type] = [float(v) for v in evaluator.stats]
expected["derived"] = [[[float(v) for v in a["bbox"]], float(a["area"])] for a in dt.loadAnns(sorted(dt.getAnnIds()))]
with open(f"{out_dir}/expected.json", "w") as f:
    json.dump(expected, f)
