"""Sorted slicing: a sub-model run through the sliced model vs the same sub-model extracted as a
standalone plain model, and the full-size sliced model vs the plain model (issue 7).

    python bench/bench_slicing.py            # CUDA: CIFAR ResNet-18, batch 256, bf16, eager + compiled
    python bench/bench_slicing.py --small    # CPU-sized: width 16, batch 16, for a smoke run

Step = forward + backward + SGD step on one fixed batch (bench.common's harness). The
sliced model gets its sub-model set before every step, as the training callback does.
Pairs (goal on a GPU):
- full:        sliced at width 1, full depth   vs plain              (<= 1.05x)
- half width:  sliced at width 0.5             vs extracted at 0.5   (<= 1.10x)
- half depth:  sliced at half the skippable blocks vs extracted      (<= 1.10x)
Rounds interleave the variants so machine noise hits all of them alike.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (allow_recompiles, bench_parser, bench_setup, dump, interleaved,  # noqa: E402
                          prepared, resnet_cifar, setting, suffix, train_step_fn)
from fxgrow.passes import Pipeline  # noqa: E402
from fxgrow.passes.sorted_slicing import SortedSlicingPass  # noqa: E402
from fxgrow.subnets import extract, find_state  # noqa: E402

PAIRS = (("full", "sliced full", "plain", 1.05), ("half width", "sliced w0.5", "extracted w0.5", 1.10),
         ("half depth", "sliced d/2", "extracted d/2", 1.10))


def grid_pass(model: torch.nn.Module, x: torch.Tensor) -> tuple[SortedSlicingPass, int, int]:
    """A sorted_slicing pass with widths (0.5, 1) and depths (half the skippable blocks, all of
    them) for `model`, and those two depths."""
    probe = SortedSlicingPass(depth={"blocks": "all"})
    blocks = len(Pipeline([probe])(model, example_input=x[:2].cpu()).records["passes.0"].blocks)
    half = blocks // 2
    return SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": sorted({half, blocks})}), blocks, half


def variants(build, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, tuple[float, int] | None]]:
    plain = build()
    p, blocks, half = grid_pass(plain, x)
    gm = Pipeline([p])(plain, example_input=x[:2].cpu()).graph_module
    return {
        "plain": (plain, None),
        "sliced full": (gm, (1.0, blocks)),
        "sliced w0.5": (gm, (0.5, blocks)),
        "extracted w0.5": (extract(gm, 0.5, blocks), None),
        "sliced d/2": (gm, (1.0, half)),
        "extracted d/2": (extract(gm, 1.0, half), None),
    }


def step_fn(model: torch.nn.Module, point, x: torch.Tensor, y: torch.Tensor, compile: bool):
    """A training step of `model`; a sliced model gets its sub-model `point` set before every
    step, as the training callback does."""
    model, x = prepared(model, x)
    state = find_state(model) if point is not None else None
    inner = train_step_fn(model, x, y, compile=compile)

    def step() -> None:
        if state is not None:
            state.activate(*point)
        inner()
    return step


def main() -> None:
    ap = bench_parser(__doc__, full_batch=256)
    ap.add_argument("--depth", type=int, default=18, choices=(18, 34))
    args = ap.parse_args()
    run = bench_setup(args)
    allow_recompiles()  # one compiled graph per sub-model
    x = torch.randn(run.batch, 3, 32, 32, device=run.device)
    y = torch.randint(0, 10, (run.batch,), device=run.device)

    timings = {}
    for compiled in run.compile_modes:
        steps_by_name = {name + suffix(compiled): step_fn(model, point, x, y, compiled)
                         for name, (model, point) in variants(lambda: resnet_cifar(run.width, args.depth), x).items()}
        found = interleaved(steps_by_name, run.device, args.rounds, run.steps, run.warmup)
        timings |= found
        print(f"\n{'compiled' if compiled else 'eager'}:")
        print("| pair | sliced ms | reference ms | ratio | goal |\n|---|---|---|---|---|")
        for label, sliced, reference, goal in PAIRS:
            a, b = found[sliced + suffix(compiled)], found[reference + suffix(compiled)]
            print(f"| {label} ({sliced} / {reference}) | {a.median_ms:.2f} | {b.median_ms:.2f} | "
                  f"{a.median_ms / b.median_ms:.3f} | <= {goal:.2f} |")
    print(f"\nCIFAR ResNet-{args.depth} width {run.width}, batch {run.batch}, {setting(run.device)}")
    if args.json:
        dump(str(args.json), list(timings.values()), run.device, batch=run.batch, width=run.width, depth=args.depth)


if __name__ == "__main__":
    main()
