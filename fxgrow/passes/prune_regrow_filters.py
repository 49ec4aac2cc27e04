"""Filter granularity for prune/regrow: whole channels of the coupled channel groups.

A channel of a group is pruned everywhere it appears among the masked weights: the output
filters of its producers and the input slices of its consumers (a residual stream's
channel in every block it passes). Its remaining uses (biases, BN parameters) then no
longer reach the output, so `export_pruned` can remove the channel physically.

A group is prunable when the coupling analysis did not fix it, every conv/linear weight
in it is masked (targeted), and its other parameters are biases or per-channel norm
parameters (a LayerNorm or GroupNorm over the channels would see a removed channel).
Each group keeps at least one channel, so the network stays connected.

Scores: a channel's magnitude is the L1 norm of its output-side weights (dim-0 slices)
divided by their count, so one global threshold compares layers of different fan-in;
within one group this ranks like the plain L1 norm. Its regrowth score is the L2 norm
of the dense gradient over all its masked slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..analysis import channel_groups, propagate_shapes
from ..errors import FxgrowError, SpecError
from ..fold import fold
from ..ir import fetch_attr, replace_tensor
from ..layers import kind_of
from ..nn.mask import MaskProducer
from .prune_regrow_masks import MaskedWeight, drop_count, top_k_mask


@dataclass(frozen=True)
class ChannelSlice:
    """Where the channels of one group sit in one masked weight."""

    weight: MaskedWeight
    dim: int
    offset: int
    repeat: int


@dataclass
class FilterGroup:
    id: int
    size: int
    slices: list[ChannelSlice]

    def rows(self, tensor: torch.Tensor, s: ChannelSlice) -> torch.Tensor:
        """`tensor` (shaped like s.weight) as one row per channel of this group."""
        block = tensor.movedim(s.dim, 0).narrow(0, s.offset, self.size * s.repeat)
        return block.reshape(self.size, -1)

    def active(self) -> torch.Tensor:
        """Channel c is active when any of its masked elements is."""
        return torch.stack([self.rows(s.weight.mask, s).ne(0).any(1) for s in self.slices]).any(0)

    def magnitude(self) -> torch.Tensor:
        out = [self.rows(s.weight.value().abs().float(), s) for s in self.slices if s.dim == 0]
        out = out or [self.rows(s.weight.value().abs().float(), s) for s in self.slices]
        return torch.cat(out, 1).mean(1)

    def grad_norm(self) -> torch.Tensor:
        total = sum(self.rows(s.weight.mask_module.dense_grad.float(), s).square().sum(1) for s in self.slices)
        return total.sqrt()


# --- finding the groups -----------------------------------------------------------------------

ChannelUses = dict[str, list[tuple[int, int, int, int, int]]]  # mask key -> (group, size, dim, offset, repeat)


def prunable_channel_uses(gm: fx.GraphModule, example: torch.Tensor | None, where: str,
                          groups: list | None = None) -> ChannelUses:
    """Find the prunable channel groups of the filter-granular masks of `gm`: per mask,
    the (group, size, dim, offset, repeat) of every group it holds channels of (the
    record the pass hands its callback; fold --shrink finds them again). `groups`: the
    channel groups when they are known already (shapes propagated)."""
    if example is None and groups is None:
        raise SpecError([(f"{where}.granularity", "filter granularity needs an example input for the channel "
                          "analysis (model.example_input in a spec, example_input= in Python)")])
    masks = {m.source: m for m in gm.modules() if isinstance(m, MaskProducer) and m.granularity == "filter"}
    if groups is None:
        propagate_shapes(gm, example)
        groups = channel_groups(gm)
    uses: ChannelUses = {key: [] for key in masks}
    reasons: dict[str, list[str]] = {key.rpartition(".")[0]: [] for key in masks}
    for group in groups:
        why = _unprunable(gm, group, masks)
        for use in group.uses:
            if use.layer in reasons and why:
                reasons[use.layer].append(f"group of {group.size} channels: {why}")
        if why:
            continue
        for use in group.uses:
            key = f"{use.layer}.{use.param}"
            if key in masks:
                uses[key].append((group.id, group.size, use.dim, use.offset, use.repeat))
    orphans = [layer for layer in reasons if not uses[f"{layer}.weight"]]
    if orphans:
        detail = "; ".join(f"'{layer}' ({'; '.join(dict.fromkeys(reasons[layer])) or 'no channel group'})"
                           for layer in orphans)
        raise SpecError([(f"{where}.granularity", f"filter pruning needs a prunable channel group on every "
                          f"targeted layer; these have none: {detail}. Exclude them or use granularity: element")])
    return uses


def _unprunable(gm: fx.GraphModule, group, masks: dict[str, MaskProducer]) -> str:
    """Why channels of `group` cannot be removed, or "" when they can."""
    if group.fixed:
        return group.reason
    for use in group.uses:
        module = gm.get_submodule(use.layer)
        kind = kind_of(module)
        if kind is not None and kind.targetable:
            if use.param == "weight" and f"{use.layer}.weight" not in masks:
                return f"'{use.layer}' uses these channels but is not targeted"
        elif not (kind is not None and kind.channelwise):
            return f"'{use.layer}' ({type(module).__name__}) mixes channels"
    return ""


def filter_groups(weights: list[MaskedWeight], uses: ChannelUses) -> list[FilterGroup]:
    """The prunable groups over the masked weights of the current model."""
    groups: dict[int, FilterGroup] = {}
    for w in weights:
        for gid, size, dim, offset, repeat in uses.get(w.key, []):
            groups.setdefault(gid, FilterGroup(gid, size, [])).slices.append(ChannelSlice(w, dim, offset, repeat))
    return [groups[k] for k in sorted(groups)]


# --- editing channels -------------------------------------------------------------------------

@torch.no_grad()
def set_channels(groups: list[FilterGroup], active: dict[int, torch.Tensor], optimizer=None) -> int:
    """Give the groups in `active` these channel activities and rebuild every affected
    mask as the product of its channel activities along each dim. Returns how many
    weight elements changed (they are zeroed with their optimizer state)."""
    weights: dict[int, MaskedWeight] = {}
    for g in groups:
        for s in g.slices:
            weights[id(s.weight)] = s.weight
    current = {g.id: active.get(g.id, g.active()) for g in groups}
    changed = 0
    for w in weights.values():
        keep = torch.ones(w.mask.shape, dtype=torch.bool, device=w.mask.device)
        for g in groups:
            for s in g.slices:
                if s.weight is w:
                    along = torch.ones(w.mask.shape[s.dim], dtype=torch.bool, device=w.mask.device)
                    along[s.offset:s.offset + g.size * s.repeat] = current[g.id].repeat_interleave(s.repeat)
                    shape = [1] * w.mask.dim()
                    shape[s.dim] = -1
                    keep &= along.view(shape)
        changed += w.set_active(keep, optimizer)
    return changed


def keep_channels_total(groups: list[FilterGroup], sparsity: float) -> int:
    total = sum(g.size for g in groups)
    return max(len(groups), total - round(sparsity * total))


def keep_channels_group(group: FilterGroup, sparsity: float) -> int:
    return max(1, group.size - round(sparsity * group.size))


def prune_channels(groups: list[FilterGroup], sparsity: float, scope: str, optimizer=None) -> int:
    """Prune to `sparsity` of channels: one threshold over all groups (global, each group
    keeping its best channel) or every group to it (layer). Returns channels pruned."""
    active = {g.id: g.active() for g in groups}
    new: dict[int, torch.Tensor] = {}
    if scope == "global":
        keep = keep_channels_total(groups, sparsity)
        if sum(int(a.sum()) for a in active.values()) <= keep:
            return 0
        scores = []
        for g in groups:
            score = torch.where(active[g.id], g.magnitude(), torch.tensor(-1.0, device=active[g.id].device))
            score[int(score.argmax())] = math.inf       # the group's best channel stays
            scores.append(score)
        kept = top_k_mask(torch.cat(scores), keep)
        new = dict(zip((g.id for g in groups), kept.split([g.size for g in groups])))
    else:
        for g in groups:
            keep = keep_channels_group(g, sparsity)
            if int(active[g.id].sum()) > keep:
                score = torch.where(active[g.id], g.magnitude(), torch.tensor(-1.0, device=active[g.id].device))
                new[g.id] = top_k_mask(score, keep)
    before = sum(int(a.sum()) for a in active.values())
    set_channels(groups, new, optimizer)
    return before - sum(int(g.active().sum()) for g in groups)


def regrow_channels(groups: list[FilterGroup], fraction: float, use_gradient: bool,
                    generator: torch.Generator | None, optimizer=None) -> tuple[int, int]:
    """Per group: drop the ceil(fraction * active) weakest channels, grow as many inactive
    ones (just-dropped included) with the largest gradient norm, or at random."""
    new, dropped, moved = {}, 0, 0
    for g in groups:
        active = g.active()
        n = drop_count(fraction, int(active.sum()))
        if n == 0:
            continue
        magnitude = torch.where(active, g.magnitude(), torch.tensor(math.inf, device=active.device))
        after = active.clone()
        after[torch.topk(magnitude, n, largest=False, sorted=False).indices] = False
        score = g.grad_norm() if use_gradient else torch.rand(g.size, generator=generator, device=active.device)
        after[torch.topk(score.masked_fill(after, -math.inf), n, sorted=False).indices] = True
        new[g.id] = after
        dropped, moved = dropped + n, moved + int((after & ~active).sum())
    set_channels(groups, new, optimizer)
    return dropped, moved


# --- physically smaller export ---------------------------------------------------------------------

@torch.no_grad()
def export_pruned(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Fold, then remove the pruned channels of every filter-pruned group from every
    parameter and buffer that indexes them: a plain model with smaller tensors and the
    same outputs (up to float summation order)."""
    from .prune_regrow_masks import masked_weights

    if not any(isinstance(m, MaskProducer) and m.granularity == "filter" for m in gm.modules()):
        raise FxgrowError("export_pruned: this model has no filter-pruned channel groups "
                          "(granularity: filter)")
    propagate_shapes(gm, example)
    coupled = channel_groups(gm)
    groups = filter_groups(masked_weights(gm), prunable_channel_uses(gm, example, "export", coupled))
    plain = fold(gm)
    indices: dict[tuple[str, str, int], dict[int, tuple[torch.Tensor, int]]] = {}
    for g in groups:
        channels = g.active().nonzero().flatten().cpu()
        first = g.slices[0]
        layer, param = first.weight.key.rsplit(".", 1)
        match = next(c for c in coupled if any((u.layer, u.param, u.dim, u.offset) == (layer, param, first.dim, first.offset)
                                               for u in c.uses))
        for use in match.uses:
            end = use.offset + g.size * use.repeat
            indices.setdefault((use.layer, use.param, use.dim), {})[use.offset] = (use.indices(channels), end)
    for (layer, param, dim), parts in indices.items():
        key = f"{layer}.{param}" if layer else param
        tensor = fetch_attr(plain, key)
        keep = _merge(parts, tensor.shape[dim])
        replace_tensor(plain, key, tensor.index_select(dim, keep.to(tensor.device)))
    for module in plain.modules():
        _fix_sizes(module)
    plain.recompile()
    return plain


def _merge(parts: dict[int, tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """Indices kept along one dim: the groups' kept indices, and every index no group covers."""
    keep = torch.ones(length, dtype=torch.bool)
    for offset, (index, end) in parts.items():
        keep[offset:end] = False
        keep[index] = True
    return keep.nonzero().flatten()


def _fix_sizes(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) tensors."""
    kind = kind_of(module)
    if kind is not None:
        kind.resize(module, {name: tuple(t.shape) for name, t in module.named_parameters(recurse=False)}
                    | {name: tuple(t.shape) for name, t in module.named_buffers(recurse=False) if t.dim()})
