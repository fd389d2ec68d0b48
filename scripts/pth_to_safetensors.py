#!/usr/bin/env python3
"""Converts a PyTorch checkpoint to safetensors, keeping the names. Run it with the project's .venv:

    .venv/bin/python scripts/pth_to_safetensors.py vovnet57_ese_detectron2.pth vovnet57.safetensors
    .venv/bin/python scripts/pth_to_safetensors.py model_final_f10217.pkl r50.safetensors

Accepts a bare state dict, or a dict holding one under "model" or "state_dict" (detectron2 keeps the weights
under "model" in both its .pth and its .pkl files), with torch tensors or numpy arrays as values.

Loading never runs code from the file: a .pth is read with torch.load(weights_only=True), a .pkl (detectron2's
pickled dict of numpy arrays) with an unpickler that only builds numpy arrays, dicts, lists, numbers and strings.
A file that needs anything else is refused; `--trust` loads it with full pickle instead (torch.load with
weights_only=False), which executes whatever the file contains: use it only for files from a source you trust.
"""
import argparse
import collections
import pickle
import sys

import numpy as np
import torch
from safetensors.torch import save_file

# The globals a pickled dict of numpy arrays refers to (numpy 1.x and 2.x module names); nothing here can run
# code beyond building arrays, dtypes and dicts.
NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle that refers to a global outside the allow-list."""


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists, numbers and strings; any other global is refused before it is touched."""

    def find_class(self, module, name):
        if (module, name) in NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name} is not a numpy array, dict, list, number or string")


def load_pkl(path):
    with open(path, "rb") as f:
        # detectron2's model zoo .pkl files were written by Python 2: its byte strings are latin-1.
        return ArraysOnlyUnpickler(f, encoding="latin1").load()


def numpy_safe_globals():
    """The numpy globals above as objects, for torch.load(weights_only=True) (detectron2 .pth files may hold
    numpy arrays)."""
    found = []
    for module, name in NUMPY_GLOBALS:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    # numpy 2 rebuilds each dtype as an instance of its own class (numpy.dtypes.Float32DType, ...).
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    numeric += [np.float16, np.float32, np.float64]
    return found + [type(np.dtype(t)) for t in numeric]


def load_checkpoint(path, trust):
    """The unpickled file: safely, or with full pickle under --trust (after a warning)."""
    is_pkl = path.endswith(".pkl")
    try:
        if is_pkl:
            return load_pkl(path)
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        sys.exit(f"error: cannot read {path}: {error.strerror or error}")
    except (pickle.UnpicklingError, RuntimeError) as error:
        # torch's message wraps the reason in advice about weights_only: keep the line that names the reason.
        advice = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reasons = [line for line in lines if not line.startswith(advice)] or lines or ["unknown"]
        reason = reasons[0].removeprefix("WeightsUnpickler error:").strip()
        if not trust:
            sys.exit(
                f"error: {path} holds more than tensors, numpy arrays and plain containers ({reason}); loading it "
                "could run code from the file. If you trust its source, rerun with --trust."
            )
    print(
        f"warning: --trust: loading {path} with full pickle, which runs any code the file contains",
        file=sys.stderr,
    )
    if is_pkl:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="IN", help=".pth/.pt (torch.save) or .pkl (detectron2) checkpoint")
    parser.add_argument("target", metavar="OUT", help="safetensors file to write")
    parser.add_argument("--trust", action="store_true", help="allow full pickle for files that need it (runs code)")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.source, args.trust)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, (dict, collections.OrderedDict)):
        sys.exit(f"error: {args.source} holds a {type(checkpoint).__name__}, not a dict of weights")
    tensors = {}
    for name, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous()
        elif isinstance(value, np.ndarray) and value.dtype != object:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
    save_file(tensors, args.target)
    print(f"wrote {len(tensors)} tensors to {args.target}")


if __name__ == "__main__":
    main()
