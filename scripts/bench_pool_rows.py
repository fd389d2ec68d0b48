#!/usr/bin/env python3
"""Peak memory and time of RoIAlign's reduction backward, two ways, on the same inputs and device.

`embedding_bag` is the reduction vovdet's RoIAlign runs (sum of weighted taps per output bin). Its own backward
(`embedding_bag_backward`) is what vovdet used before src/ops/pool_rows_shim.cpp; the transposed reduction (a
stable sort of the tap rows, then one more `embedding_bag` over the output gradient with the input rows as bags)
is what it uses now. This script runs both constructions in PyTorch with the same ATen operators, at the box
pooler's size for batch 2 at 800x1344 (1024 RoIs, 7x7 bins, 2x2 samples, 4 taps, 256 channels, the stacked
pyramid's rows), and prints one JSON line: per construction the peak bytes allocated during the backward above
what was allocated before it (CUDA allocator statistics; on the CPU, torch.profiler's memory of the backward's
operators), its median time in ms (the forward is run once beforehand), and the largest difference between the two gradients.

Usage: scripts/bench_pool_rows.py [--device cuda:0|cpu] [--repeats 5]
"""
import argparse
import json
import time

import torch


def inputs(device):
    generator = torch.Generator().manual_seed(0)
    rows = 2 * (200 * 336 + 100 * 168 + 50 * 84 + 25 * 42)
    bags, taps_per_bag, channels = 1024 * 49, 16, 256
    entries = bags * taps_per_bag
    features = torch.randn(rows, channels, generator=generator).to(device).requires_grad_()
    # Taps of one bin read neighbouring rows, as bilinear taps do.
    centre = torch.randint(0, rows - 64, (bags, 1), generator=generator)
    input_row = (centre + torch.randint(0, 64, (bags, taps_per_bag), generator=generator)).reshape(-1).to(device)
    weight = torch.rand(entries, generator=generator).to(device)
    offsets = torch.arange(0, entries + 1, taps_per_bag).to(device)
    gradient = torch.randn(bags, channels, generator=generator).to(device)
    return features, input_row, weight, offsets, gradient


def forward(features, input_row, weight, offsets):
    return torch.nn.functional.embedding_bag(input_row, features, offsets, mode="sum", per_sample_weights=weight,
                                             include_last_offset=True)


def embedding_bag_backward(features, output, gradient):
    features.grad = None
    output.backward(gradient, retain_graph=True)
    return features.grad


def transposed_backward(features, input_row, weight, offsets, gradient):
    entries = input_row.numel()
    bag_of_entry = torch.searchsorted(offsets[1:], torch.arange(entries, device=input_row.device), right=True)
    sorted_rows, order = input_row.sort(stable=True)
    row_offsets = torch.searchsorted(sorted_rows, torch.arange(features.shape[0] + 1, device=input_row.device))
    return torch.nn.functional.embedding_bag(bag_of_entry[order], gradient, row_offsets, mode="sum",
                                             per_sample_weights=weight[order], include_last_offset=True)


def measure(function, args, device, repeats):
    cuda = device.type == "cuda"
    function(*args)
    times = []
    peak = 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        if cuda:
            result = function(*args)
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
                result = function(*args)
            peak = max(peak, sum(max(e.self_cpu_memory_usage, 0) for e in p.key_averages()))
        times.append((time.perf_counter() - start) * 1e3)
    return result, {"peak_bytes": int(peak), "ms": sorted(times)[len(times) // 2]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = inputs(device)
    features, input_row, weight, offsets, gradient = data
    output = forward(features, input_row, weight, offsets)
    theirs, old = measure(embedding_bag_backward, (features, output, gradient), device, args.repeats)
    ours, new = measure(transposed_backward, data, device, args.repeats)
    print(json.dumps({
        "device": str(device),
        "entries": input_row.numel(),
        "channels": features.shape[1],
        "embedding_bag_backward": old,
        "transposed_embedding_bag": new,
        "peak_ratio": new["peak_bytes"] / max(old["peak_bytes"], 1),
        "max_abs_difference": (theirs - ours).abs().max().item(),
    }))


if __name__ == "__main__":
    main()
