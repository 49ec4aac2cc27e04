"""Filter granularity for prune/regrow: whole channels of the coupled channel groups.

A channel of a group is pruned everywhere it appears among the masked weights: the output
filters of its producers and the input slices of its consumers (a residual stream's
channel in every block it passes). Its remaining uses (biases, BN parameters) then no
longer reach the output, so `export_pruned` can remove the channel physically.

A group is prunable when the coupling analysis did not fix it, every conv/linear weight
in it is masked (targeted), and its other parameters touch one channel each: biases, norm
parameters, parameters the graph reads directly (a layer scale, a ViT's cls_token and
pos_embed). A norm whose statistics run across the group's channels (LayerNorm, RMSNorm,
GroupNorm(1), functional or not) becomes a `MaskedNorm` that leaves the pruned channels out
of them; any other op computing across the channels (a hand-written mean, a softmax, a
matmul) makes the group unprunable, naming it. A grouped conv's channels are whole conv
groups. Each group keeps at least one channel, so the network stays connected.

Scores: a channel's magnitude is the L1 norm of its output-side weights (dim-0 slices)
divided by their count, so one global threshold compares layers of different fan-in;
within one group this ranks like the plain L1 norm. Its regrowth score is the L2 norm
of the dense gradient over all its masked slices.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..analysis import channel_groups, propagate_shapes
from ..analysis.coupling import READ_BY_NORMS, param_key, parameter_reads, register_coupling_rule
from ..errors import FxgrowError, SpecError
from ..fold import fold
from ..ir import META, fetch_attr, replace_tensor
from ..layers import kind_of, layer_call, normalized_dims
from ..nn.mask import MaskProducer
from ..nn.masked_norm import MaskedNorm
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
    norms: list[tuple[MaskedNorm, int, int]] = field(default_factory=list)  # (norm, offset, repeat)

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
    reads = parameter_reads(gm)
    for group in groups:
        why = _unprunable(gm, group, masks, reads)
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


_MASKABLE = set(READ_BY_NORMS) | {"masked_norm"}  # normalizers MaskedNorm covers (or already is)


def _unprunable(gm: fx.GraphModule, group, masks: dict[str, MaskProducer], reads: dict[str, str]) -> str:
    """Why channels of `group` cannot be removed, or "" when they can."""
    if group.fixed:
        return group.reason
    for use in group.uses:
        module = _owner(gm, use.layer)
        kind = kind_of(module) if use.layer and module is not None else None
        key = param_key(use.layer, use.param)
        if kind is not None and kind.targetable:
            if use.param == "weight" and key not in masks:
                return f"'{use.layer}' uses these channels but is not targeted"
        elif kind is not None and (kind.channelwise or kind.name in READ_BY_NORMS):
            continue  # per-channel statistics or affine parameters (a norm's statistics: below)
        elif key in reads:
            if reads[key]:
                return reads[key]
        else:
            return f"'{use.layer}' ({type(module).__name__}) mixes channels"
    for n in group.normalizers:
        if n.kind not in _MASKABLE:
            return f"{n.op} computes across these channels"
    return ""


def _owner(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


# --- norms over pruned channels ---------------------------------------------------------------

def mask_normalizers(gm: fx.GraphModule, groups: list, uses: ChannelUses) -> int:
    """Put a `MaskedNorm` in place of every norm whose statistics run across the channels of
    a prunable group (`uses`, from `prunable_channel_uses`). Returns how many."""
    prunable = {gid for entries in uses.values() for gid, *_ in entries}
    by_node: dict[str, list] = {}
    for group in groups:
        if group.id in prunable:
            for n in group.normalizers:
                if n.kind in READ_BY_NORMS:
                    by_node.setdefault(n.node, []).append((group, n))
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, found in by_node.items():
        node = nodes[name]
        call = layer_call(node, gm)
        x_meta = node.args[0].meta.get("tensor_meta")
        ndim, dims = len(x_meta.shape), {n.dim for _, n in found}
        if len(dims) != 1:
            raise FxgrowError(f"{found[0][1].op} normalizes pruned channels along {len(dims)} dims")
        dim = dims.pop()
        if call.kind.name == "group_norm":
            normalized = tuple(range(1 - ndim, 0))
        else:
            normalized = tuple(range(-normalized_dims(call.options.get("normalized_shape")), 0))
        eps = call.module.eps if call.module is not None else call.options.get("eps")
        if eps is None and call.kind.name != "rms_norm":
            eps = 1e-5  # F.layer_norm's and F.group_norm's default
        segments = [(g.id, g.size, n.offset, n.repeat) for g, n in found]
        norm = MaskedNorm(call.kind.name, normalized, dim - ndim, x_meta.shape[dim], eps, segments, call.path)
        path = f"{META}.{call.path}.norm_mask" if call.path else f"{META}.{name}_norm_mask"
        gm.add_submodule(path, norm.to(node.args[0].meta.get("tensor_meta").dtype))
        with gm.graph.inserting_before(node):
            operands = [_operand(gm, call, role) for role in ("weight", "bias")]
            masked = gm.graph.call_module(path, (call.x, *operands))
        masked.meta.update(node.meta)
        masked.meta[META] = {"role": "norm_mask", "pass": "prune_regrow", "source": call.path}
        node.replace_all_uses_with(masked)
        gm.graph.erase_node(node)
    gm.graph.lint()
    return len(by_node)


def _operand(gm: fx.GraphModule, call, role: str) -> fx.Node | None:
    """The tensor a norm reads as `role`: its operand node, or a read of the module's own."""
    if call.functional:
        return call.operands.get(role)
    if role not in call.params:
        return None
    return gm.graph.get_attr(param_key(*call.params[role]))


def masked_norms(model: nn.Module) -> list[MaskedNorm]:
    return [m for m in model.modules() if isinstance(m, MaskedNorm)]


def _couple_masked_norm(c, node: fx.Node) -> bool | None:
    """A MaskedNorm keeps its input's channels, reads its weight and bias along the normalized
    dims (the channel dim alone for a group norm) and normalizes across the channels."""
    norm, xin = c.gm.get_submodule(node.target), c.layouts.get(node.args[0])
    if xin is None:
        return False
    ndim = len(xin)
    out = c.output(node, {d: [xin[d]] for d in range(ndim)})
    along = [norm.channel_dim] if norm.kind == "group_norm" else list(norm.dims)
    for operand in node.args[1:]:
        if isinstance(operand, fx.Node) and operand in c.layouts:
            for layout, d in zip(c.layouts[operand], along):
                c._unify(layout, out[d % ndim], node)
    c.normalizes(xin[norm.channel_dim % ndim], node, "masked_norm", norm.channel_dim % ndim, norm.layer,
                 f"masked {norm.kind} '{norm.layer}'")
    return None


register_coupling_rule(MaskedNorm, _couple_masked_norm)


def filter_groups(weights: list[MaskedWeight], uses: ChannelUses,
                  norms: list[MaskedNorm] = ()) -> list[FilterGroup]:
    """The prunable groups over the masked weights (and masked norms) of the current model."""
    groups: dict[int, FilterGroup] = {}
    for w in weights:
        for gid, size, dim, offset, repeat in uses.get(w.key, []):
            groups.setdefault(gid, FilterGroup(gid, size, [])).slices.append(ChannelSlice(w, dim, offset, repeat))
    for norm in norms:
        for gid, _, offset, repeat in norm.segments:
            if gid in groups:
                groups[gid].norms.append((norm, offset, repeat))
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
    for g in groups:  # the norms over these channels leave the pruned ones out of their statistics
        for norm, offset, repeat in g.norms:
            norm.set_kept(offset, current[g.id].repeat_interleave(repeat))
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
    work = copy.deepcopy(gm)
    for node in list(work.graph.nodes):  # the pruned channels go: each norm is plain over what remains
        if node.op == "call_module" and isinstance(work.get_submodule(node.target), MaskedNorm):
            work.get_submodule(node.target).fold_call(work, node, masked=False)
    plain = fold(work, inplace=True)
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
    before: dict[str, tuple[int, ...]] = {}
    for (layer, param, dim), parts in indices.items():
        key = param_key(layer, param)
        tensor = fetch_attr(plain, key)
        before.setdefault(key, tuple(tensor.shape))
        keep = _merge(parts, tensor.shape[dim])
        replace_tensor(plain, key, tensor.index_select(dim, keep.to(tensor.device)))
    for module in plain.modules():
        _fix_sizes(module)
    _fix_counted_options(plain, before)
    plain.recompile()
    return plain


def _fix_counted_options(gm: fx.GraphModule, before: dict[str, tuple[int, ...]]) -> None:
    """Options of functional layers that count channels (a traced-through GroupNorm's
    num_groups) follow their tensors: whole groups went, each keeps its width."""
    for node in gm.graph.nodes:
        call = layer_call(node, gm) if node.op == "call_function" else None
        for option, (role, dim) in (call.kind.channel_options(call) if call is not None else {}).items():
            key = param_key(*call.params[role]) if role in call.params else None
            if key in before:
                per = before[key][dim] // call.options[option]
                call.set_option(option, fetch_attr(gm, key).shape[dim] // per)


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
