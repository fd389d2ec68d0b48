"""Oracle for tests/events.rs: reads a TensorBoard log folder with tensorboard's EventAccumulator and prints JSON:
{"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height, [r, g, b, ...]], ...]}}."""
import io
import json
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

accumulator = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
accumulator.Reload()
tags = accumulator.Tags()
out = {"scalars": {}, "images": {}}
for tag in tags["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in accumulator.Scalars(tag)]
for tag in tags["images"]:
    images = []
    for e in accumulator.Images(tag):
        pixels = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert pixels.shape == (e.height, e.width, 3), (pixels.shape, e.height, e.width)
        images.append([e.step, e.width, e.height, pixels.reshape(-1).tolist()])
    out["images"][tag] = images
print(json.dumps(out))
