"""Mask producers vs a plain model, and the cost of one prune/regrow event (issue 5).

    python bench/bench_prune.py            # CUDA: CIFAR ResNet-18, batch 512, bf16, eager + compiled
    python bench/bench_prune.py --small    # CPU-sized: width 16, batch 16, eager, for a smoke run

Step = forward + backward + SGD step on one fixed batch (bench/common.py), the same model
and batch as bench_compander.py. Variants: plain (the user's model), functional (traced
and functionalized, no producer), mask (the prune_regrow pass at 90% ERK sparsity),
parametrize (torch.nn.utils.parametrize with the same masks, the usual way to mask
weights). Rounds interleave the variants so machine noise hits all of them.
Goal (H100): mask <= 1.05x plain eager (parametrize was measured at 1.13x).

Event cost: a step that ends in a gradient regrowth event (dense-gradient capture plus
prune + regrow + invariant check) minus an ordinary masked step, amortized over `every`
ordinary steps; the mask edit is also timed on its own. Goal: <= 1% of training time at
every=1000.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (bench_parser, bench_setup, dump, prepared, resnet_cifar, setting, suffix,  # noqa: E402
                          sync, time_modes, time_steps, train_step_fn)
from fxgrow.ir import functionalize, layer_types  # noqa: E402
from fxgrow.passes.prune_regrow import PruneRegrowPass  # noqa: E402
from fxgrow.passes.prune_regrow_masks import masked_weights  # noqa: E402
from fxgrow.trace import trace  # noqa: E402


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
            sync(x.device)
            start = time.perf_counter()
            callback.after_step(ctx)
            sync(x.device)
            event_only.append((time.perf_counter() - start) * 1e3)
        else:
            callback.after_step(ctx)

    ordinary = time_steps(lambda: step(event_time - 1), x.device, steps=repeats, warmup=5)
    event = time_steps(lambda: step(event_time), x.device, steps=repeats, warmup=2)
    base, ev, edit = statistics.median(ordinary), statistics.median(event), statistics.median(event_only[2:])
    return {"ordinary_ms": base, "event_step_ms": ev, "event_extra_ms": ev - base, "mask_edit_ms": edit,
            "every": every, "amortized_fraction": (ev - base) / (every * base),
            "amortized_fraction_edit_only": edit / (every * base)}


def masks_spec(sparsity: float, every: int = 1000) -> dict:
    """Fixed sparsity from the first step (RigL): the steady-state cost of the masks."""
    return dict(final_sparsity=sparsity, initial_sparsity=sparsity, preset="rigl", schedule={"every": every})


def variants(build, spec: dict) -> dict[str, nn.Module]:
    functional = trace(build())
    functionalize(functional, list(layer_types(functional)))
    masked = PruneRegrowPass(**spec)(build()).graph_module
    return {"plain": build(), "functional": functional, "mask": masked,
            "parametrize": with_parametrize(build(), {w.key: w.mask for w in masked_weights(masked)})}


def main() -> None:
    ap = bench_parser(__doc__, compile_default="auto")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    run = bench_setup(args)
    build = lambda: resnet_cifar(run.width)  # noqa: E731
    x = torch.randn(run.batch, 3, 32, 32, device=run.device)
    y = torch.randint(0, 10, (run.batch,), device=run.device)
    spec = masks_spec(args.sparsity, args.every)
    models = variants(build, spec)

    timings = time_modes(run, args.rounds, lambda compiled: {  # parametrize is not compiled (as measured before)
        name + suffix(compiled): train_step_fn(*prepared(model, x), y, compile=compiled)
        for name, model in models.items() if not compiled or name != "parametrize"})

    events = {}
    for compiled in run.compile_modes:
        label = "compiled" if compiled else "eager"
        fresh = PruneRegrowPass(**spec)(build())
        events[label] = e = event_cost(fresh.graph_module, fresh.callbacks[0], x, y, args.every, compiled,
                                       repeats=max(5, run.steps))
        print(f"regrowth event ({label}): ordinary step {e['ordinary_ms']:.2f} ms, event step "
              f"{e['event_step_ms']:.2f} ms (mask edit alone {e['mask_edit_ms']:.2f} ms); extra "
              f"{e['event_extra_ms']:.2f} ms = {100 * e['amortized_fraction']:.3f}% of training at "
              f"every={args.every} (edit alone {100 * e['amortized_fraction_edit_only']:.3f}%)")
    print(f"\nCIFAR ResNet-18 width {run.width}, batch {run.batch}, sparsity {args.sparsity}, {setting(run.device)}")
    if args.json:
        dump(str(args.json), list(timings.values()), run.device, batch=run.batch, width=run.width,
             sparsity=args.sparsity, events=events)


if __name__ == "__main__":
    main()
