"""Timing counterpart of the ignored `pooler_timing` test in crates/detector/tests/ops_units.rs: detectron2's
multi-level pooler (re-implemented on torchvision.ops.roi_align) on the same shapes, forward and backward."""

import math
import sys
import time

import torch
from torchvision.ops import box_area, roi_align

torch.manual_seed(0)
height, width = 800, 1088
features = [torch.randn(2, 256, height >> level, width >> level).requires_grad_(True) for level in range(2, 6)]
scales = [0.25, 0.125, 0.0625, 0.03125]
boxes = []
for _ in range(2):
    centres = torch.rand(512, 2) * torch.tensor([float(width), float(height)])
    sizes = (torch.rand(512, 2) * 4.0 + 2.5).exp()
    boxes.append(torch.cat([centres - sizes / 2, centres + sizes / 2], 1))


def pool(output_size, sampling_ratio):
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    sizes = torch.sqrt(torch.cat([box_area(b) for b in boxes]))
    levels = torch.floor(4 + torch.log2(sizes / 224 + sys.float_info.epsilon)).clamp(2, 5).to(torch.int64) - 2
    out = torch.zeros(len(rois), 256, output_size, output_size)
    for level, (feature, scale) in enumerate(zip(features, scales)):
        inds = torch.nonzero(levels == level).squeeze(1)
        out[inds] = roi_align(feature, rois[inds], output_size, scale, sampling_ratio, True)
    return out


for sampling_ratio, output in ((0, 7), (2, 7), (2, 14), (0, 14)):
    pool(output, sampling_ratio)
    forward = backward = 0.0
    for _ in range(3):
        start = time.time()
        pooled = pool(output, sampling_ratio)
        forward += time.time() - start
        start = time.time()
        pooled.sum().backward()
        backward += time.time() - start
    print(f"torchvision pooler {output}x{output} sampling {sampling_ratio}: forward {forward / 3 * 1e3:.1f} ms, "
          f"backward {backward / 3 * 1e3:.1f} ms ({torch.get_num_threads()} threads)")
