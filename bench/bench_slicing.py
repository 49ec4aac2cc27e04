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

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Timing, device_name, dump, time_steps, train_step_fn  # noqa: E402
from fxgrow.loader import load_model  # noqa: E402
from fxgrow.passes import Pipeline  # noqa: E402
from fxgrow.passes.sorted_slicing import SortedSlicingPass  # noqa: E402
from fxgrow.subnets import extract, find_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("full", "sliced full", "plain", 1.05), ("half width", "sliced w0.5", "extracted w0.5", 1.10),
         ("half depth", "sliced d/2", "extracted d/2", 1.10))


def variants(build, x: torch.Tensor) -> dict[str, tuple[torch.nn.Module, tuple[float, int] | None]]:
    plain = build()
    probe = SortedSlicingPass(depth={"blocks": "all"})
    Pipeline([probe])(plain, example_input=x[:2].cpu())
    blocks = len(probe.blocks)
    half = blocks // 2
    p = SortedSlicingPass(width={"fractions": [0.5, 1.0]}, depth={"blocks": sorted({half, blocks})})
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
    model = model.to(x.device).train()
    if x.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    state = find_state(model) if point is not None else None
    inner = train_step_fn(torch.compile(model) if compile else model, x, y)

    def step() -> None:
        if state is not None:
            state.activate(*point)
        inner()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="width 16, batch 16, few steps: for a CPU")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--depth", type=int, default=18, choices=(18, 34))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared CPU stalls with more)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    batch = args.batch or (16 if args.small else 256)
    width = args.width or (16 if args.small else 64)
    steps = args.steps or (5 if args.small else 50)
    warmup = args.warmup or (2 if args.small else 15)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per sub-model
    torch.manual_seed(0)
    build = lambda: load_model(str(ROOT / "examples/models/resnet_cifar.py"),  # noqa: E731
                               {"width": width, "depth": args.depth})
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    timings: list[Timing] = []
    for compile in ([False] if args.no_compile else [False, True]):
        suffix = " (compiled)" if compile else ""
        steps_by_name = {name + suffix: step_fn(model, point, x, y, compile)
                         for name, (model, point) in variants(build, x).items()}
        samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
        for _ in range(args.rounds):
            for name, step in steps_by_name.items():
                samples[name] += time_steps(step, device, steps, warmup)
        found = {}
        for name, s in samples.items():
            qs = statistics.quantiles(s, n=10)
            found[name] = Timing(name, statistics.median(s), qs[0], qs[-1], len(s))
        timings += found.values()
        print(f"\n{'compiled' if compile else 'eager'}:")
        print("| pair | sliced ms | reference ms | ratio | goal |\n|---|---|---|---|---|")
        for label, sliced, reference, goal in PAIRS:
            a, b = found[sliced + suffix], found[reference + suffix]
            print(f"| {label} ({sliced} / {reference}) | {a.median_ms:.2f} | {b.median_ms:.2f} | "
                  f"{a.median_ms / b.median_ms:.3f} | <= {goal:.2f} |")
    print(f"\nCIFAR ResNet-{args.depth} width {width}, batch {batch}, {device_name(device)}, torch {torch.__version__}"
          f"{', bf16 autocast, channels_last' if device.type == 'cuda' else ''}")
    if args.json:
        dump(str(args.json), timings, device, batch=batch, width=width, depth=args.depth)


if __name__ == "__main__":
    main()
