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

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (bench_parser, bench_setup, dump, prepared, resnet_cifar, setting, suffix,  # noqa: E402
                          time_modes, train_step_fn)
from fxgrow.nn.compander import psi, psi_inverse  # noqa: E402
from fxgrow.passes.compander import CompanderPass  # noqa: E402

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


WEIGHT_DECAY = 5e-4


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    run = bench_setup(args)
    x = torch.randn(run.batch, 3, 32, 32, device=run.device)
    y = torch.randint(0, 10, (run.batch,), device=run.device)

    def make_steps(compiled: bool) -> dict:
        steps_by_name = {}
        for name, (model, callbacks) in variants(lambda: resnet_cifar(run.width)).items():
            model, xin = prepared(model, x)
            steps_by_name[name + suffix(compiled)] = train_step_fn(
                model, xin, y, callbacks=callbacks, compile=compiled, weight_decay=WEIGHT_DECAY)
        return steps_by_name

    timings = time_modes(run, args.rounds, make_steps)
    print(f"\nCIFAR ResNet-18 width {run.width}, batch {run.batch}, {setting(run.device)}")
    if args.json:
        dump(str(args.json), list(timings.values()), run.device, batch=run.batch, width=run.width)


if __name__ == "__main__":
    main()
