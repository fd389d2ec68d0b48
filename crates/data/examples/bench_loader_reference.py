"""Python reference for examples/bench_loader.rs: PIL decode + torchvision transforms (shorter side random in
640..800 step 32, max 1333, bilinear; horizontal flip p=0.5; to tensor; normalise) + batching (pad to 32), in a
torch DataLoader with the same number of workers and batch size.

.venv/bin/python crates/data/examples/bench_loader_reference.py --workers N [--batches B] [--batch-size S]
"""
import argparse
import json
import os
import random
import time

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SIZES = list(range(640, 801, 32))
MAX_SIZE = 1333
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def shortest_edge(h, w, short, max_size):
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        s = max_size / max(new_h, new_w)
        new_h, new_w = new_h * s, new_w * s
    return int(new_h + 0.5), int(new_w + 0.5)


class CocoImages(Dataset):
    def __init__(self, root, length):
        ann = json.load(open(os.path.join(root, "annotations/instances_train2017.json")))
        self.records = [(os.path.join(root, "train2017", r["file_name"]), r["height"], r["width"]) for r in ann["images"]]
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = random.Random(i)
        path, h, w = self.records[i % len(self.records)]
        image = Image.open(path).convert("RGB")
        image = F.resize(image, list(shortest_edge(h, w, rng.choice(SIZES), MAX_SIZE)), F.InterpolationMode.BILINEAR)
        if rng.random() < 0.5:
            image = F.hflip(image)
        tensor = F.pil_to_tensor(image).float()
        return F.normalize(tensor, MEAN, STD)


def collate(images):
    h = (max(t.shape[1] for t in images) + 31) // 32 * 32
    w = (max(t.shape[2] for t in images) + 31) // 32 * 32
    batch = torch.zeros(len(images), 3, h, w)
    for b, t in zip(batch, images):
        b[:, : t.shape[1], : t.shape[2]].copy_(t)
    return batch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "../../../tests/data/coco-mini"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warmup = args.workers * 2
    dataset = CocoImages(args.root, (args.batches + warmup) * args.batch_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                        prefetch_factor=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    images = 0
    for batch in it:
        images += batch.shape[0]
    seconds = time.perf_counter() - start
    print(f"python workers={args.workers} images={images} seconds={seconds:.2f} images_per_s={images / seconds:.1f}")


if __name__ == "__main__":
    main()
