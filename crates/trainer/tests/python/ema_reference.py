"""Oracle for tests/solver.rs: the EMA of weights as mmdetection's ExpMomentumEMA / d2go update it, in PyTorch.

Usage: ema_reference.py DIR. Reads DIR/weights.safetensors (`{step}/{name}`, step 0 = the initial weights) and
DIR/config.json ({decay, warmup, steps, averaged: [names], copied: [names]}); writes DIR/torch.safetensors with the
EMA after the last step. Update t (from 1): d = decay * (1 - exp(-t / warmup)) (d = decay when warmup = 0);
averaged: ema = ema * d + w * (1 - d); copied (buffers, frozen): ema = w.
"""
import json
import math
import sys

from safetensors.torch import load_file, save_file

directory = sys.argv[1]
config = json.load(open(f"{directory}/config.json"))
weights = load_file(f"{directory}/weights.safetensors")
names = config["averaged"] + config["copied"]
ema = {name: weights[f"0/{name}"].clone() for name in names}
for t in range(1, config["steps"] + 1):
    warmup = config["warmup"]
    decay = config["decay"] * (1 - math.exp(-t / warmup)) if warmup > 0 else config["decay"]
    for name in config["averaged"]:
        ema[name].mul_(decay).add_(weights[f"{t}/{name}"], alpha=1 - decay)
    for name in config["copied"]:
        ema[name].copy_(weights[f"{t}/{name}"])
save_file(ema, f"{directory}/torch.safetensors")
