"""Mask edits for prune/regrow: find the masks of a model, prune by magnitude (global or
per layer), regrow by gradient or at random, zero what changed (weight and optimizer state).

Works on whatever model the loop holds now (`masked_weights(ctx.model)`), never on
references kept from rewrite time: growth and resume replace the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..ir import producer_sites, run_producers
from ..nn.mask import MaskProducer


@dataclass
class MaskedWeight:
    """One masked weight: its mask, the parameter at the head of its chain and the
    producers between them."""

    key: str                    # "layer.param"
    mask_module: MaskProducer
    param: nn.Parameter
    before: list[nn.Module]     # producers between the parameter and the mask

    @property
    def mask(self) -> torch.Tensor:
        return self.mask_module.mask

    @property
    def active(self) -> torch.Tensor:
        return self.mask != 0

    @property
    def numel(self) -> int:
        return self.mask.numel()

    def nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))

    @property
    def zeroable(self) -> bool:
        """A zero parameter entry gives a zero weight: every producer before the mask keeps
        zeros (a compander: psi is odd). Template mixing mixes whole tensors: no entry of a
        template belongs to one weight, so pruned/regrown positions cannot be zeroed there."""
        return all(m.keeps_zeros for m in self.before) and self.param.shape == self.mask.shape

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The weight as it reaches the mask (what magnitude pruning ranks)."""
        return run_producers(self.param, self.before).detach()

    @torch.no_grad()
    def set_active(self, active: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> int:
        """Write the new mask in place. Every position that changed (pruned, or grown from
        inactive) gets weight zero and optimizer state zero. Returns how many changed."""
        changed = active != self.active
        n = int(changed.sum())
        if n and self.zeroable:
            self.param.masked_fill_(changed, 0)
            if optimizer is not None:
                for state in optimizer.state.get(self.param, {}).values():
                    if torch.is_tensor(state) and state.shape == self.param.shape:
                        state.masked_fill_(changed, 0)
        self.mask.copy_(active)
        self.mask_module.fired |= active
        return n

    @property
    def fired(self) -> torch.Tensor:
        return self.mask_module.fired


def masked_weights(gm: nn.Module) -> list[MaskedWeight]:
    """Every masked weight of `gm`, in graph order."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"prune_regrow needs the rewritten GraphModule, got {type(gm).__name__}")
    return [MaskedWeight(chain.key, mask, head, before) for chain, mask, before, head in producer_sites(gm, MaskProducer)]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the `k` largest entries of the 1-d `scores`, False elsewhere."""
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[torch.topk(scores, k, sorted=False).indices] = True
    return kept


def _ranked(w: MaskedWeight) -> torch.Tensor:
    """|value| at active positions, -1 at inactive ones (never kept before an active one)."""
    return torch.where(w.active, w.value().abs().float(), torch.tensor(-1.0, device=w.mask.device))


@torch.no_grad()
def prune_global(weights: list[MaskedWeight], keep: int, optimizer=None) -> int:
    """Keep the `keep` largest-magnitude active weights over all layers; returns how many
    were pruned. Nothing happens when at most `keep` are active."""
    if sum(w.nnz() for w in weights) <= keep:
        return 0
    kept = top_k_mask(torch.cat([_ranked(w).flatten() for w in weights]), keep)
    pruned, offset = 0, 0
    for w in weights:
        pruned += w.set_active(kept[offset:offset + w.numel].view(w.mask.shape).to(w.mask.device), optimizer)
        offset += w.numel
    return pruned


@torch.no_grad()
def prune_layer(w: MaskedWeight, keep: int, optimizer=None) -> int:
    """Keep the `keep` largest-magnitude active weights of one layer."""
    if w.nnz() <= keep:
        return 0
    return w.set_active(top_k_mask(_ranked(w).flatten(), keep).view(w.mask.shape), optimizer)


def drop_count(fraction: float, nnz: int, rounding: str = "ceil") -> int:
    """ceil(fraction * nnz) (GraNet) or floor (RigL), immune to float noise such as
    0.005 * 1000 = 5.000000000000001."""
    return (math.ceil if rounding == "ceil" else math.floor)(round(fraction * nnz, 9))


@torch.no_grad()
def regrow(w: MaskedWeight, fraction: float, grad: torch.Tensor | None,
           generator: torch.Generator | None = None, optimizer=None, rounding: str = "ceil") -> tuple[int, int]:
    """Drop the ceil (or floor) of fraction * nnz smallest-magnitude active weights, then
    activate as many inactive positions (just-dropped ones included) with the largest |grad|
    (any score: the gradient, a momentum), or at random with `grad=None`. Positions grown from inactive start at zero with zero optimizer
    state; a weight dropped and regrown keeps its value. Returns (dropped, moved): `moved`
    counts the positions that really changed hands."""
    active = w.active.flatten()
    n = drop_count(fraction, int(active.sum()), rounding)
    if n == 0:
        return 0, 0
    magnitude = torch.where(active, w.value().abs().float().flatten(),
                            torch.tensor(math.inf, device=active.device))
    after = active.clone()
    after[torch.topk(magnitude, n, largest=False, sorted=False).indices] = False
    if grad is not None:
        score = grad.abs().float().flatten()
    else:
        score = torch.rand(w.numel, generator=generator, device=active.device)
    score = score.masked_fill(after, -math.inf)
    after[torch.topk(score, n, sorted=False).indices] = True
    moved = int((after & ~active).sum())
    w.set_active(after.view(w.mask.shape), optimizer)
    return n, moved
