"""Oracle for tests/transforms.rs: applies the same geometric transforms to COCO annotations with numpy/PIL and
rasterises them with pycocotools. Input: a JSON of cases; output: a JSON {key: compressed RLE string}."""
import json
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def transform_polygon(poly, case):
    (oh, ow), (rh, rw) = case["original"], case["resized"]
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    xy[:, 0] *= rw / ow
    xy[:, 1] *= rh / oh
    if case["crop"] is not None:
        xy[:, 0] -= case["crop"][0]
        xy[:, 1] -= case["crop"][1]
    if case["flip"]:
        xy[:, 0] = case["output"][1] - xy[:, 0]
    return xy.reshape(-1).tolist()


def transform_bitmap(rle, case):
    (rh, rw), (out_h, out_w) = case["resized"], case["output"]
    bitmap = mask_utils.decode(rle)
    # detectron2 resizes bitmasks with PIL's NEAREST filter.
    resized = np.asarray(Image.fromarray(bitmap).resize((rw, rh), Image.NEAREST))
    if case["crop"] is not None:
        x0, y0 = case["crop"][0], case["crop"][1]
        resized = resized[y0 : y0 + out_h, x0 : x0 + out_w]
    if case["flip"]:
        resized = resized[:, ::-1]
    return np.asfortranarray(resized.astype(np.uint8))


def main():
    cases = json.load(open(sys.argv[1]))
    annotations = {a["id"]: a for a in json.load(open(cases["annotation_file"]))["annotations"]}
    out = {}
    for case in cases["cases"]:
        ann = annotations[case["annotation_id"]]
        seg = ann["segmentation"]
        out_h, out_w = case["output"]
        if isinstance(seg, list):
            polys = [transform_polygon(p, case) for p in seg]
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, out_h, out_w))
        else:
            if isinstance(seg["counts"], list):
                seg = mask_utils.frPyObjects(seg, *seg["size"])
            rle = mask_utils.encode(transform_bitmap(seg, case))
        out[case["key"]] = rle["counts"].decode("ascii")
    json.dump(out, open(sys.argv[2], "w"))


main()
