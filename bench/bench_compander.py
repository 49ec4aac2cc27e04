"""Compander producers vs a plain model vs torch.nn.utils.parametrize doing the same math (issue 4).

    python bench/bench_compander.py            # CUDA: CIFAR ResNet-18, batch 512, bf16, eager + compiled
    python bench/bench_compander.py --small    # CPU-sized: width 16, batch 16, for a smoke run

Step = forward + backward + SGD step (momentum 0.9, weight decay 5e-4) on one fixed batch,
with the callbacks' after_backward/after_step around the step as the loop runs them.
Variants, every conv and linear weight reparameterized as w = 0.7 * atan(v / 0.8):
- plain: the user's model;
- compander: the pass with its default effective weight decay (a foreach correction of
  v's gradient each step);
- compander-raw: the pass with `weight_decay: raw` (no per-step work: the chain alone);
- parametrize: torch.nn.utils.parametrize with the same psi (raw decay), the usual way.
Goal (H100): compander <= 1.05x plain eager and <= 1.02x compiled (parametrize was
measured at 1.50x and 1.07x). Rounds interleave the variants so machine noise hits all.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Timing, device_name, dump, table, time_steps  # noqa: E402
from fxgrow.loader import load_model  # noqa: E402
from fxgrow.nn.compander import psi, psi_inverse  # noqa: E402
from fxgrow.passes.compander import CompanderPass  # noqa: E402
from fxgrow.specs.train import SGDSpec  # noqa: E402
from fxgrow.train.optim import build_optimizer, merge_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
A, B = 0.7, 0.8


class Compand(nn.Module):
    """The same psi as a parametrization; right_inverse gives the same inverse init."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return psi(v, A, B, "atan")

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return psi_inverse(w, A, B, "atan")[0]


def with_parametrize(model: nn.Module) -> nn.Module:
    for m in list(model.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", Compand())
    return model


def variants(build) -> dict[str, tuple[nn.Module, list]]:
    out = {"plain": (build(), [])}
    for name, fields in (("compander", {}), ("compander-raw", {"weight_decay": "raw"})):
        result = CompanderPass(**fields)(build())
        out[name] = (result.graph_module, result.callbacks)
    out["parametrize"] = (with_parametrize(build()), [])
    return out


def step_fn(model: nn.Module, callbacks: list, x: torch.Tensor, y: torch.Tensor, compile: bool):
    model = model.to(x.device).train()
    if x.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    overrides = merge_overrides(model, ((cb.name, cb.param_group_overrides(model)) for cb in callbacks))
    optimizer = build_optimizer(model, SGDSpec(lr=0.01, momentum=0.9, weight_decay=5e-4), overrides)
    ctx = SimpleNamespace(model=model, optimizer=optimizer, step=0, log=lambda record: None)
    runnable = torch.compile(model) if compile else model
    use_amp = x.device.type == "cuda"
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(runnable(x), y)
        loss.backward()
        for cb in callbacks:
            cb.after_backward(ctx)
        optimizer.step()
        ctx.step += 1
        for cb in callbacks:
            cb.after_step(ctx)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="width 16, batch 16, few steps: for a CPU")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared CPU stalls with more)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
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

    timings: list[Timing] = []
    for compile in ([False] if args.no_compile else [False, True]):
        suffix = " (compiled)" if compile else ""
        steps_by_name = {name + suffix: step_fn(model, cbs, x, y, compile)
                         for name, (model, cbs) in variants(build).items()}
        samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
        for _ in range(args.rounds):
            for name, step in steps_by_name.items():
                samples[name] += time_steps(step, device, steps, warmup)
        for name, s in samples.items():
            qs = statistics.quantiles(s, n=10)
            timings.append(Timing(name, statistics.median(s), qs[0], qs[-1], len(s)))
        print(f"\n{'compiled' if compile else 'eager'}:")
        print(table([t for t in timings if t.name.endswith(suffix) and (compile or "(" not in t.name)],
                    "plain" + suffix))
    print(f"\nCIFAR ResNet-18 width {width}, batch {batch}, {device_name(device)}, torch {torch.__version__}"
          f"{', bf16 autocast, channels_last' if device.type == 'cuda' else ''}")
    if args.json:
        dump(str(args.json), timings, device, batch=batch, width=width)


if __name__ == "__main__":
    main()
