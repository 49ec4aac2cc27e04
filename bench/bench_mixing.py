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

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Timing, device_name, dump, table, time_steps, train_step_fn  # noqa: E402
from fxgrow.loader import load_model  # noqa: E402
from fxgrow.passes.grow_model import grow_model  # noqa: E402
from fxgrow.passes.template_mixing import TemplateMixingPass, mix_producers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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

    def build(w: int = width) -> nn.Module:
        return load_model(str(ROOT / "examples/models/resnet_cifar.py"), {"width": w})

    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    mixed = TemplateMixingPass()(build(), x[:2].cpu()).graph_module
    models = {"plain": build(), "mixing": mixed, "parametrize": with_parametrize(build(), mixed),
              "grown": grown(lambda: build(width // 2), x.cpu())}

    timings: list[Timing] = []
    for compile in ([False] if args.no_compile else [False, True]):
        suffix = " (compiled)" if compile else ""
        steps_by_name = {}
        for name, model in models.items():
            model = model.to(device).train()
            inputs = x
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
                inputs = x.contiguous(memory_format=torch.channels_last)
            steps_by_name[name + suffix] = train_step_fn(torch.compile(model) if compile else model, inputs, y)
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
    print(f"\nCIFAR ResNet-18 width {width} (grown: {width // 2} x2), batch {batch}, {device_name(device)}, "
          f"torch {torch.__version__}{', bf16 autocast, channels_last' if device.type == 'cuda' else ''}")
    if args.json:
        dump(str(args.json), timings, device, batch=batch, width=width)


if __name__ == "__main__":
    main()
