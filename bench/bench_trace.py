"""Trace + functionalize + analyses on torchvision resnet50 (issue 2 goal: < 1 s on the dev CPU).

    python bench/bench_trace.py [--repeats 5]

Prints the median of each stage over the repeats (the first, cold run is reported apart).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from fxgrow.analysis.cost import count_params
from fxgrow.analysis.shapes import propagate_shapes_and_flops
from fxgrow.ir import functionalize, layer_types
from fxgrow.trace import trace

try:
    from fxgrow.analysis.coupling import channel_groups
except ImportError:  # the coupling analysis is optional for this measurement
    channel_groups = None


def once(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    times = {}
    t = time.perf_counter()
    gm = trace(model)
    times["trace"] = time.perf_counter() - t
    t = time.perf_counter()
    functionalize(gm, list(layer_types(gm)))
    times["functionalize"] = time.perf_counter() - t
    t = time.perf_counter()
    propagate_shapes_and_flops(gm, x)  # ShapeProp + FlopCounterMode in one fake-tensor run
    count_params(gm)
    times["shapes+flops+params"] = time.perf_counter() - t
    if channel_groups is not None:
        t = time.perf_counter()
        channel_groups(gm)
        times["channel_groups"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, args.size, args.size)
    cold = once(model, x)
    runs = [once(model, x) for _ in range(args.repeats)]
    print(f"resnet50, input 1x3x{args.size}x{args.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'stage':<16}{'cold s':>10}{'median s':>10}")
    for k in cold:
        print(f"{k:<16}{cold[k]:>10.3f}{statistics.median(r[k] for r in runs):>10.3f}")


if __name__ == "__main__":
    main()
