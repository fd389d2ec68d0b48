"""Oracle for tests/solver.rs: runs torch.optim.SGD (+ clip_grad_norm_) on the tensors the Rust test wrote.

Usage: sgd_reference.py DIR. Reads DIR/init.safetensors (parameters), DIR/grads.safetensors (`{step}/{name}`),
DIR/config.json ({momentum, nesterov, lrs, weight_decay: {name: wd}, clip_max_norm}); writes DIR/torch.safetensors
with the final parameters and `momentum_buffer.{name}` tensors.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

directory = sys.argv[1]
config = json.load(open(f"{directory}/config.json"))
init = load_file(f"{directory}/init.safetensors")
grads = load_file(f"{directory}/grads.safetensors")
names = sorted(config["weight_decay"])
params = {name: init[name].clone().requires_grad_(True) for name in names}
groups = [{"params": [params[name]], "weight_decay": config["weight_decay"][name]} for name in names]
optimizer = torch.optim.SGD(groups, lr=config["lrs"][0], momentum=config["momentum"], nesterov=config["nesterov"])
for step, lr in enumerate(config["lrs"]):
    for name in names:
        params[name].grad = grads[f"{step}/{name}"].clone()
    if config["clip_max_norm"] is not None:
        torch.nn.utils.clip_grad_norm_([params[name] for name in names], config["clip_max_norm"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
out = {name: params[name].detach() for name in names}
for name in names:
    out[f"momentum_buffer.{name}"] = optimizer.state[params[name]]["momentum_buffer"]
save_file(out, f"{directory}/torch.safetensors")
