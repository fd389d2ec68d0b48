"""Fixtures for tests/pth_to_safetensors.rs: checkpoints as detectron2 and torch write them, and two that run code.

Usage: pth_fixtures.py OUTDIR. Writes OUTDIR/plain.pth (torch.save of {"model": state dict, "iteration": 7}),
OUTDIR/numpy.pth (torch.save of {"model": {name: numpy array}}), OUTDIR/d2.pkl (detectron2's model zoo layout:
{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}, pickle protocol 2), and
OUTDIR/evil.pth, OUTDIR/evil.pkl: the same with an object whose unpickling creates the folder OUTDIR/pwned-<ext>.
"""
import os
import pickle
import sys

import numpy as np
import torch

out = sys.argv[1]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


weights = {"backbone.w": np.arange(6, dtype=np.float32).reshape(2, 3), "head.b": np.array([1.5, -2.0])}
torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "iteration": 7}, f"{out}/plain.pth")
torch.save({"model": weights}, f"{out}/numpy.pth")
with open(f"{out}/d2.pkl", "wb") as f:
    pickle.dump({"model": weights, "__author__": "test", "matching_heuristics": True}, f, protocol=2)
torch.save({"model": weights, "extra": Payload(f"{out}/pwned-pth")}, f"{out}/evil.pth")
with open(f"{out}/evil.pkl", "wb") as f:
    pickle.dump({"model": weights, "extra": Payload(f"{out}/pwned-pkl")}, f, protocol=2)
