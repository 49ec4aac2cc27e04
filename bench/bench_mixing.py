"""Template mixing producers vs a plain model vs torch.nn.utils.parametrize (issue 6).

    python bench/bench_mixing.py            # CUDA: CIFAR ResNet-18, batch 512, bf16, eager + compiled
    python bench/bench_mixing.py --small    # CPU-sized: width 16, batch 16, for a smoke run

Step = forward + backward + SGD step on one fixed batch (bench/common.py). Variants:
- plain: the user's model;
- mixing: the template_mixing pass (K=2, share: pairs) on every conv and linear weight;
- parametrize: the same mix, same shared banks, as torch.nn.utils.parametrize
  parametrizations (the usual way);
- grown: a mixed net of half the width grown x2 (fused from two sources), against a plain
  net of the full width: the cost of assembling g x g blocks every step.
Goal (H100): mixing <= 1.10x plain eager and <= 1.05x compiled (parametrize was measured at
1.60x). Rounds interleave the variants so machine noise hits all of them.
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
from fxgrow.passes.grow_model import grow_model  # noqa: E402
from fxgrow.passes.template_mixing import TemplateMixingPass, mix_producers  # noqa: E402


class Mix(nn.Module):
    """W = sum_k alpha[k] * T[k] as a parametrization; T may be shared by several."""

    def __init__(self, templates: nn.Parameter, alpha: torch.Tensor):
        super().__init__()
        self.templates, self.alpha = templates, nn.Parameter(alpha)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        k = self.alpha.numel()
        return (self.alpha.view(1, k) @ self.templates.view(k, -1)).view(self.templates.shape[1:])


def with_parametrize(model: nn.Module, mixed: torch.fx.GraphModule) -> nn.Module:
    """The mixed model's banks and alphas, as parametrizations of the plain model."""
    banks: dict[str, nn.Parameter] = {}
    for producer in mix_producers(mixed).values():
        templates = mixed.get_submodule(producer.bank).templates
        shared = banks.setdefault(producer.bank, nn.Parameter(templates.detach().clone()))
        layer = model.get_submodule(producer.source.rpartition(".")[0])
        parametrize.register_parametrization(layer, "weight", Mix(shared, producer.alpha.detach().view(-1).clone()),
                                             unsafe=True)
    return model


def grown(build_half, x: torch.Tensor) -> torch.fx.GraphModule:
    nets = [TemplateMixingPass()(build_half(), x[:2], seed=s).graph_module for s in range(2)]
    model, _ = grow_model(nets[0], [n.state_dict() for n in nets], 2, x[:2].cpu())
    return model


def variants(build, x: torch.Tensor, width: int) -> dict[str, nn.Module]:
    mixed = TemplateMixingPass()(build(width), x[:2].cpu()).graph_module
    return {"plain": build(width), "mixing": mixed, "parametrize": with_parametrize(build(width), mixed),
            "grown": grown(lambda: build(width // 2), x.cpu())}


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    run = bench_setup(args)
    x = torch.randn(run.batch, 3, 32, 32, device=run.device)
    y = torch.randint(0, 10, (run.batch,), device=run.device)
    models = variants(resnet_cifar, x, run.width)

    timings = time_modes(run, args.rounds, lambda compiled: {
        name + suffix(compiled): train_step_fn(*prepared(model, x), y, compile=compiled)
        for name, model in models.items()})
    print(f"\nCIFAR ResNet-18 width {run.width} (grown: {run.width // 2} x2), batch {run.batch}, {setting(run.device)}")
    if args.json:
        dump(str(args.json), list(timings.values()), run.device, batch=run.batch, width=run.width)


if __name__ == "__main__":
    main()
