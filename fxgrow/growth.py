"""What growth hands every module that widens itself (ALGORITHMS.md section 1.2).

Channel order: a growing group of C channels becomes g*C channels, band b (source net b's
channels) first: band-major. Where a tensor dim holds several groups (concat), each group
is band-major within its own block; a fixed group keeps its channels (band 0).

`Growth` is the whole-model plan: the factor, the source nets' state dicts, the options
of the grow spec, a generator, and per weight chain a `WeightGrowth`: where each index of
the grown tensor comes from. Producers and template banks read it in their `grow`
(see `fxgrow.nn.base`); the growth driver (`fxgrow.passes.grow_model`) knows no class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .analysis.coupling import ChannelGroup, ChannelUse
from .errors import FxgrowError


class Channels:
    """Every parameter slice the channel groups index, by (layer, param) and dim."""

    def __init__(self, groups: list[ChannelGroup]):
        self.slices: dict[tuple[str, str], dict[int, list[tuple[ChannelUse, ChannelGroup]]]] = {}
        for grp in groups:
            for use in grp.uses:
                self.slices.setdefault((use.layer, use.param), {}).setdefault(use.dim, []).append((use, grp))

    def entries(self, layer: str, param: str, dim: int) -> list[tuple[ChannelUse, ChannelGroup]]:
        return self.slices.get((layer, param), {}).get(dim, [])

    def grows(self, layer: str, param: str, dim: int) -> bool:
        return any(not grp.fixed for _, grp in self.entries(layer, param, dim))

    def positions(self, layer: str, param: str, dim: int, g: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each index of the grown dim: the band (source) it comes from and its index
        in the old dim. A growing block of C channels (each repeated `repeat` times)
        becomes g*C channels, band-major; a fixed block stays as it is (band 0)."""
        where = f"'{layer}.{param}' dim {dim}"
        bands, olds, covered = [], [], 0
        for use, group in sorted(self.entries(layer, param, dim), key=lambda e: e[0].offset):
            span = group.size * use.repeat
            if use.offset != covered:
                raise FxgrowError(f"{where}: channel groups leave a gap or overlap at index {covered}")
            copies = 1 if group.fixed else g
            bands.append(torch.arange(copies).repeat_interleave(span))
            olds.append(use.offset + torch.arange(span).repeat(copies))
            covered += span
        if covered != length:
            raise FxgrowError(f"{where}: channel groups cover {covered} of {length} indices")
        return torch.cat(bands), torch.cat(olds)


@dataclass
class WeightGrowth:
    """How the value of one chain (`layer.param`) widens."""

    growth: "Growth"
    layer: str
    param: str

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.param}"

    def grows(self, dim: int) -> bool:
        return self.growth.channels.grows(self.layer, self.param, dim)

    def fixed_reasons(self, dim: int) -> list[str]:
        return [grp.reason for _, grp in self.growth.channels.entries(self.layer, self.param, dim) if grp.fixed]

    def positions(self, dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(band, old index) of every index of dim `dim` (of old length `length`) once grown."""
        if not self.grows(dim):
            return torch.zeros(length, dtype=torch.long), torch.arange(length)
        return self.growth.channels.positions(self.layer, self.param, dim, self.growth.factor, length)

    def _blocks(self, shape: tuple[int, ...]):
        """The grown shape, and per source net i the (grown, old) index tensors of its block:
        the indices of band i along every growing dim (the diagonal block, or the band
        along the one growing dim), all indices along the others."""
        growing = [d for d in range(len(shape)) if self.grows(d)]
        if not growing:
            return tuple(shape), []
        last = max(growing) + 1
        per_dim = [self.positions(d, shape[d]) for d in range(last)]
        grown = tuple(len(band) for band, _ in per_dim) + tuple(shape[last:])
        blocks = []
        for i in range(min(self.growth.sources_count, self.growth.factor)):
            new_idx, old_idx = [], []
            for d, (band, old) in enumerate(per_dim):
                sel = (band == i).nonzero().flatten() if d in growing else torch.arange(len(band))
                view = [-1 if j == d else 1 for j in range(last)]
                new_idx.append(sel.view(view))
                old_idx.append(old[sel].view(view))
            blocks.append((tuple(new_idx), tuple(old_idx)))
        return grown, blocks

    def place(self, values: list[torch.Tensor], fill: float) -> torch.Tensor:
        """The grown tensor: source net i's `values[i]` in its block, `fill` elsewhere."""
        grown, blocks = self._blocks(tuple(values[0].shape))
        out = torch.full(grown, fill, dtype=values[0].dtype, device=values[0].device)
        for (new_idx, old_idx), value in zip(blocks, values):
            out[tuple(i.to(out.device) for i in new_idx)] = value.to(out)[tuple(i.to(out.device) for i in old_idx)]
        return out

    def fresh(self, shape: tuple[int, ...]) -> torch.Tensor:
        """True at the indices of the grown tensor (old shape `shape`) no source net provides."""
        grown, blocks = self._blocks(tuple(shape))
        out = torch.ones(grown, dtype=torch.bool)
        for new_idx, _ in blocks:
            out[new_idx] = False
        return out


@dataclass
class Growth:
    """The whole-model plan a growing module reads."""

    model: nn.Module                      # the copy being grown (slicing taken off)
    channels: Channels
    sources: list[dict[str, torch.Tensor]]  # source net i's state dict (same structure as `model`)
    factor: int                           # g
    options: Mapping[str, Any]            # the grow spec's layout, new_coefficients, noise
    generator: torch.Generator
    chain_of: dict[str, tuple[str, str]] = field(default_factory=dict)  # producer path -> (layer, param)
    _shared: dict[Any, Any] = field(default_factory=dict)

    @property
    def sources_count(self) -> int:
        return len(self.sources)

    def weight(self, path: str) -> WeightGrowth:
        """The growth of the chain producer `path` sits in."""
        layer, param = self.chain_of[path]
        return WeightGrowth(self, layer, param)

    def weight_of(self, key: str) -> WeightGrowth:
        layer, _, param = key.rpartition(".")
        return WeightGrowth(self, layer, param)

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """One object per growth under `key`, made on first use (state several modules of
        one class share, e.g. the alphas handed out so far)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]
