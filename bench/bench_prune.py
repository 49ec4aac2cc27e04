"""Mask producers vs a plain model, and the cost of one prune/regrow event (issue 5).

    python bench/bench_prune.py            # CUDA: resnet50, CIFAR-100 size, batch 128, eager + compiled
    python bench/bench_prune.py --small    # CPU-sized: a tiny resnet at 16x16, batch 32, eager only

Step = forward + backward + SGD step on one fixed batch (bench/common.py). Variants:
plain (the user's model), functional (traced and functionalized, no producer), mask (the
prune_regrow pass, 90% ERK sparsity), parametrize (torch.nn.utils.parametrize with the
same masks, the usual way to mask weights). Goal: mask <= 1.05x plain, eager.

Event cost: a step that ends in a gradient regrowth event (dense-gradient capture plus
prune + regrow + invariant check) minus an ordinary masked step, amortized over `every`
ordinary steps. Goal: <= 1% of training time at every=1000.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Timing, device_name, dump, measure, table, time_steps  # noqa: E402
from fxgrow.ir import functionalize, layer_types  # noqa: E402
from fxgrow.passes.prune_regrow import PruneRegrowPass  # noqa: E402
from fxgrow.passes.prune_regrow_masks import masked_weights  # noqa: E402
from fxgrow.trace import trace  # noqa: E402
from tests.zoo import ResNetTiny  # noqa: E402


class MaskParametrization(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def with_parametrize(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    for key, mask in masks.items():
        layer = model.get_submodule(key.rpartition(".")[0])
        parametrize.register_parametrization(layer, "weight", MaskParametrization(mask.clone()))
    return model


def prepared(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """As bench.common.measure runs it: on the device, channels_last on CUDA."""
    model = model.to(x.device).train()
    if x.device.type == "cuda" and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def event_cost(gm: nn.Module, callback, x: torch.Tensor, y: torch.Tensor, every: int, compile: bool,
               repeats: int) -> dict[str, float]:
    """Median ms of an ordinary masked step and of a step ending in a regrowth event."""
    gm, x = prepared(gm, x)
    forward = torch.compile(gm) if compile else gm
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    total = 100 * every
    ctx = SimpleNamespace(model=gm, optimizer=opt, step=0, seed=0, total_steps=total, log=lambda r: None)
    callback.on_train_start(ctx)
    event_time = next(t for t in callback.schedule.events() if callback.schedule.is_regrow_event(t))
    use_amp = x.device.type == "cuda"

    event_only: list[float] = []

    def step(t: int) -> None:
        ctx.step = t - 1
        callback.on_step_start(ctx)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        ctx.step = t
        if callback.schedule.is_event(t):  # the mask edit alone, timed apart
            _sync(x.device)
            start = time.perf_counter()
            callback.after_step(ctx)
            _sync(x.device)
            event_only.append((time.perf_counter() - start) * 1e3)
        else:
            callback.after_step(ctx)

    ordinary = time_steps(lambda: step(event_time - 1), x.device, steps=repeats, warmup=5)
    event = time_steps(lambda: step(event_time), x.device, steps=repeats, warmup=2)
    base, ev, edit = statistics.median(ordinary), statistics.median(event), statistics.median(event_only[2:])
    return {"ordinary_ms": base, "event_step_ms": ev, "event_extra_ms": ev - base, "mask_edit_ms": edit,
            "every": every, "amortized_fraction": (ev - base) / (every * base),
            "amortized_fraction_edit_only": edit / (every * base)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized model and batch")
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                    help="also time torch.compile'd variants (auto: on CUDA)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--out", default=None, help="write the timings as JSON here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    compile = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    if args.small:
        build, shape, classes, name = lambda: ResNetTiny(c=16), (32, 3, 16, 16), 10, "resnet_tiny(c=16)"
    else:
        build, shape, classes, name = (lambda: torchvision.models.resnet50(num_classes=100),
                                       (128, 3, 32, 32), 100, "resnet50")
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)

    plain = build()
    functional = trace(build())
    functionalize(functional, list(layer_types(functional)))
    spec = dict(final_sparsity=args.sparsity, initial_sparsity=args.sparsity, preset="rigl",
                schedule={"every": args.every})
    result = PruneRegrowPass(**spec)(build())
    masked = result.graph_module
    masks = {w.key: w.mask for w in masked_weights(masked)}
    param = with_parametrize(build(), masks)

    timings: list[Timing] = []
    variants = [("plain", plain), ("functional", functional), ("mask", masked), ("parametrize", param)]
    for label, model in variants:
        timings.append(measure(label, model, x, y, steps=args.steps))
    if compile:
        for label, model in variants[:3]:
            timings.append(measure(f"{label}+compile", model, x, y, compile=True, steps=args.steps))

    print(f"{name}, batch {shape}, {device_name(device)}, torch {torch.__version__}, sparsity {args.sparsity}")
    print(table(timings, "plain"))
    if compile:
        base = {t.name: t.median_ms for t in timings}
        print(f"compiled mask / compiled plain: {base['mask+compile'] / base['plain+compile']:.3f}")

    events = {}
    for label, comp in [("eager", False)] + ([("compiled", True)] if compile else []):
        fresh = PruneRegrowPass(**spec)(build())
        events[label] = event_cost(fresh.graph_module, fresh.callbacks[0], x, y, args.every, comp,
                                   repeats=max(5, args.steps // 3))
        e = events[label]
        print(f"regrowth event ({label}): ordinary step {e['ordinary_ms']:.2f} ms, event step "
              f"{e['event_step_ms']:.2f} ms (mask edit alone {e['mask_edit_ms']:.2f} ms); extra "
              f"{e['event_extra_ms']:.2f} ms = {100 * e['amortized_fraction']:.3f}% of training at "
              f"every={args.every} (edit alone {100 * e['amortized_fraction_edit_only']:.3f}%)")
    if args.out:
        dump(args.out, timings, device, model=name, batch=list(shape), sparsity=args.sparsity, events=events)


if __name__ == "__main__":
    main()
