"""The compiler's own speed (issue 12): trace + the four passes stacked (template mixing,
compander, masks, width + depth slicing) with every analysis they run, on torchvision's
resnet50 at 1x3x224x224. Goal: <= 0.5 s warm, <= 0.75 s cold.

    python bench/bench_compile.py [--processes 5] [--repeats 5] [--size 224] [--profile]

Each of `--processes` fresh processes builds the model (not timed), then times the first
call after the imports (`cold`) and `--repeats` calls after it (`warm`: their median). The
figures are the medians over the processes (and the minima: on a shared machine one
process's call can take several times another's, and the least disturbed run is the
minimum). `--profile` prints cProfile's top entries of one warm
call (in this process). `total cpu` is the CPU time of all the process's threads: less
moved by other jobs on the machine than the wall-clock figures, which the goals are about.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from fxgrow.passes import Pipeline
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.prune_regrow import PruneRegrowPass
from fxgrow.passes.sorted_slicing import SortedSlicingPass
from fxgrow.passes.template_mixing import TemplateMixingPass
from fxgrow.trace import trace

BLOCKS = 12  # resnet50's skippable bottlenecks (the 4 that change shape are kept)


def pipeline() -> Pipeline:
    return Pipeline([
        TemplateMixingPass(),
        CompanderPass(),
        PruneRegrowPass(),  # GraNet defaults: all-ones masks at the rewrite
        SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": [BLOCKS // 2, BLOCKS]}),
    ])


def once(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    cpu, start = time.process_time(), time.perf_counter()
    gm = trace(model)
    traced = time.perf_counter()
    pipeline()(gm, example_input=x)
    done = time.perf_counter()
    return {"trace": traced - start, "passes": done - traced, "total": done - start,
            "total cpu": time.process_time() - cpu}


def measure(size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Cold and warm stage times in this process."""
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, size, size)
    cold = once(model, x)
    runs = [once(model, x) for _ in range(repeats)]
    return {"cold": cold, "warm": {k: statistics.median(r[k] for r in runs) for k in cold},
            "warm_min": {k: min(r[k] for r in runs) for k in cold}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, args.repeats)))
        return
    results = []
    for _ in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--size", str(args.size),
                              "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"resnet50, input 1x3x{args.size}x{args.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.processes} processes x (1 cold + {args.repeats} warm)")
    print(f"{'stage':<10}{'cold s':>10}{'warm s':>10}{'cold min':>10}{'warm min':>10}   cold per process")
    for k in results[0]["cold"]:
        colds = [r["cold"][k] for r in results]
        print(f"{k:<10}{statistics.median(colds):>10.3f}{statistics.median(r['warm'][k] for r in results):>10.3f}"
              f"{min(colds):>10.3f}{min(r['warm_min'][k] for r in results):>10.3f}"
              f"   {' '.join(f'{c:.2f}' for c in colds)}")
    if args.profile:
        model = torchvision.models.resnet50().eval()
        x = torch.randn(1, 3, args.size, args.size)
        once(model, x)
        profiler = cProfile.Profile()
        profiler.enable()
        once(model, x)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
