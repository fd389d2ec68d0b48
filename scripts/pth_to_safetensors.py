#!/usr/bin/env python3
"""Converts a PyTorch checkpoint (.pth/.pt state_dict, or a dict holding one under "model" or "state_dict", as
detectron2 and vovnet-detectron2 write them) to safetensors, keeping the names. Run it with the project's .venv:

    .venv/bin/python scripts/pth_to_safetensors.py vovnet57_ese_detectron2.pth vovnet57.safetensors
"""
import sys

import torch
from safetensors.torch import save_file


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: pth_to_safetensors.py IN.pth OUT.safetensors")
    source, target = sys.argv[1], sys.argv[2]
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    tensors = {}
    for name, value in checkpoint.items():
        if hasattr(value, "detach"):
            tensors[name] = value.detach().contiguous()
        elif hasattr(value, "dtype") and hasattr(value, "shape"):  # numpy arrays in detectron2 .pkl-style dicts
            tensors[name] = torch.from_numpy(value).contiguous()
    save_file(tensors, target)
    print(f"wrote {len(tensors)} tensors to {target}")


if __name__ == "__main__":
    main()
