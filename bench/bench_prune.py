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

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Timing, device_name, dump, table, time_steps, train_step_fn  # noqa: E402
from fxgrow.ir import functionalize, layer_types  # noqa: E402
from fxgrow.loader import load_model  # noqa: E402
from fxgrow.passes.prune_regrow import PruneRegrowPass  # noqa: E402
from fxgrow.passes.prune_regrow_masks import masked_weights  # noqa: E402
from fxgrow.trace import trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="width 16, batch 16, few steps: for a CPU")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                    help="also time torch.compile'd variants (auto: on CUDA)")
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared CPU stalls with more)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    compile = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    batch = args.batch or (16 if args.small else 512)
    width = args.width or (16 if args.small else 64)
    steps = args.steps or (5 if args.small else 50)
    warmup = args.warmup or (2 if args.small else 15)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    build = lambda: load_model(str(ROOT / "examples/models/resnet_cifar.py"), {"width": width})  # noqa: E731
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    spec = dict(final_sparsity=args.sparsity, initial_sparsity=args.sparsity, preset="rigl",
                schedule={"every": args.every})
    functional = trace(build())
    functionalize(functional, list(layer_types(functional)))
    masked = PruneRegrowPass(**spec)(build()).graph_module
    models = {"plain": build(), "functional": functional, "mask": masked,
              "parametrize": with_parametrize(build(), {w.key: w.mask for w in masked_weights(masked)})}

    timings: list[Timing] = []
    for comp in [False] + ([True] if compile else []):
        suffix = " (compiled)" if comp else ""
        chosen = {k: m for k, m in models.items() if not comp or k != "parametrize"}
        step_by_name = {}
        for name, model in chosen.items():
            model, xin = prepared(model, x)
            step_by_name[name + suffix] = train_step_fn(torch.compile(model) if comp else model, xin, y)
        samples: dict[str, list[float]] = {name: [] for name in step_by_name}
        for _ in range(args.rounds):
            for name, step in step_by_name.items():
                samples[name] += time_steps(step, device, steps, warmup)
        for name, found in samples.items():
            qs = statistics.quantiles(found, n=10)
            timings.append(Timing(name, statistics.median(found), qs[0], qs[-1], len(found)))
        print(f"\n{'compiled' if comp else 'eager'}:")
        print(table([t for t in timings if t.name.endswith(suffix) and (comp or "(" not in t.name)],
                    "plain" + suffix))

    events = {}
    for label, comp in [("eager", False)] + ([("compiled", True)] if compile else []):
        fresh = PruneRegrowPass(**spec)(build())
        events[label] = e = event_cost(fresh.graph_module, fresh.callbacks[0], x, y, args.every, comp,
                                       repeats=max(5, steps))
        print(f"regrowth event ({label}): ordinary step {e['ordinary_ms']:.2f} ms, event step "
              f"{e['event_step_ms']:.2f} ms (mask edit alone {e['mask_edit_ms']:.2f} ms); extra "
              f"{e['event_extra_ms']:.2f} ms = {100 * e['amortized_fraction']:.3f}% of training at "
              f"every={args.every} (edit alone {100 * e['amortized_fraction_edit_only']:.3f}%)")
    print(f"\nCIFAR ResNet-18 width {width}, batch {batch}, sparsity {args.sparsity}, {device_name(device)}, "
          f"torch {torch.__version__}{', bf16 autocast, channels_last' if device.type == 'cuda' else ''}")
    if args.json:
        dump(str(args.json), timings, device, batch=batch, width=width, sparsity=args.sparsity, events=events)


if __name__ == "__main__":
    main()
