"""Sorted slicing's depth by layers: what the exit gate costs. At depth k the sliced model still
runs the dropped layers' forward (unused: no backward reaches them); the extracted depth-k model
does not run them at all.

    python bench/bench_depth_layers.py --small --compile no   # CPU: tiny_lm, 8 layers, dim 128
    python bench/bench_depth_layers.py                        # CUDA: dim 512, eager + compiled

Step = forward + backward + SGD step on one fixed batch of token ids (next-token loss as
cross-entropy over the vocabulary). Pairs: sliced at full depth vs plain, and sliced at depth
k vs extracted at depth k for k = L/4, L/2. Under torch.compile the depth is a constant of
each compiled graph, so the dropped layers are dead code there.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "models"))
from bench.common import (allow_recompiles, bench_parser, bench_setup, dump, interleaved,  # noqa: E402
                          setting, suffix)
from bench.bench_slicing import step_fn  # noqa: E402
from fxgrow.passes import Pipeline  # noqa: E402
from fxgrow.passes.sorted_slicing import SortedSlicingPass  # noqa: E402
from fxgrow.subnets import extract  # noqa: E402
import tiny_lm  # noqa: E402



class TokenLoss(nn.Module):
    """tiny_lm with its logits as [batch, vocab, tokens], so CrossEntropyLoss takes them."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).transpose(1, 2)


def main() -> None:
    ap = bench_parser(__doc__, full_batch=32, small_batch=8, compile_default="auto")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    run = bench_setup(args)
    allow_recompiles()
    dim = 128 if args.small else 512
    vocab = 512
    build = lambda: TokenLoss(tiny_lm.build(vocab, args.tokens, dim, dim // 32, args.layers))  # noqa: E731
    x = torch.randint(0, vocab, (run.batch, args.tokens), device=run.device)
    y = torch.randint(0, vocab, (run.batch, args.tokens), device=run.device)
    plain = build()
    gm = Pipeline([SortedSlicingPass(depth={"blocks": "all"})])(plain, example_input=x[:2].cpu()).graph_module
    depths = sorted({args.layers // 4, args.layers // 2})
    variants = {"plain": (plain, None), f"sliced d{args.layers}": (gm, (1.0, args.layers))}
    for k in depths:
        variants[f"sliced d{k}"] = (gm, (1.0, k))
        variants[f"extracted d{k}"] = (extract(gm, 1.0, k), None)
    pairs = [("full", f"sliced d{args.layers}", "plain")] + [
        (f"depth {k}", f"sliced d{k}", f"extracted d{k}") for k in depths]
    timings = {}
    for compiled in run.compile_modes:
        steps = {name + suffix(compiled): step_fn(model, point, x, y, compiled) for name, (model, point) in variants.items()}
        found = interleaved(steps, run.device, args.rounds, run.steps, run.warmup)
        timings |= found
        print(f"\n{'compiled' if compiled else 'eager'}:")
        print("| pair | sliced ms | reference ms | ratio |\n|---|---|---|---|")
        for label, sliced, reference in pairs:
            a, b = found[sliced + suffix(compiled)], found[reference + suffix(compiled)]
            print(f"| {label} ({sliced} / {reference}) | {a.median_ms:.2f} | {b.median_ms:.2f} | "
                  f"{a.median_ms / b.median_ms:.3f} |")
    print(f"\ntiny_lm {args.layers} layers, dim {dim}, batch {run.batch} x {args.tokens} tokens, {setting(run.device)}")
    if args.json:
        dump(str(args.json), list(timings.values()), run.device, batch=run.batch, layers=args.layers, dim=dim)


if __name__ == "__main__":
    main()
