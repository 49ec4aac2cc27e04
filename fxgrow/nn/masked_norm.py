"""Filter pruning's norms: a layer norm, RMSNorm or one-group GroupNorm whose statistics
cover only the channels filter pruning keeps.

A layer norm over a filter-pruned group would count the pruned channels (their activations
are biases and garbage, never zero) in its mean and variance, so the masked model would not
compute what the model with those channels removed computes. `MaskedNorm` takes the norm's
place in the graph (`MaskedNorm(x, weight, bias)`, the operands the norm read) and holds a
0/1 `keep` buffer over the channels of its normalized dim, which filter pruning's events
write (`set_kept`). With every channel kept it is the plain norm, bit for bit; otherwise
the mean and variance run over the kept channels: at a kept channel its output is what the
norm over the kept channels alone computes (shrunk == masked), at a pruned one it is never
read (every consumer's weight is masked there).

Fold writes plain graph code in its place (`fold_call`): the plain norm when nothing is
pruned, else a small plain `GraphModule` holding `keep` as a non-persistent buffer (the
folded state_dict keeps the original keys); `fold --shrink` writes the plain norm over the
channels that remain (`fold_call(..., masked=False)`).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

KINDS = ("layer_norm", "rms_norm", "group_norm")


def masked_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                kind: str, dims: Sequence[int], channel_dim: int, eps: float | None) -> torch.Tensor:
    """The norm of `kind` over `dims` of `x`, its statistics over the channels (along
    `channel_dim`) where `keep` is 1 only."""
    view = affine_view(dims, channel_dim)
    m = keep.view(view).type_as(x)
    count = m.sum()
    for d in dims:
        if d != channel_dim:
            count = count * x.shape[d]
    if kind == "rms_norm":
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x * torch.rsqrt((x * x * m).sum(dims, keepdim=True) / count + eps)
    else:
        mean = (x * m).sum(dims, keepdim=True) / count
        centered = x - mean
        y = centered * torch.rsqrt((centered * centered * m).sum(dims, keepdim=True) / count + eps)
    affine = view if kind == "group_norm" else None  # a group norm's affine is per channel
    if weight is not None:
        y = y * (weight.view(affine) if affine else weight)
    if bias is not None:
        y = y + (bias.view(affine) if affine else bias)
    return y


def affine_view(dims: Sequence[int], channel_dim: int) -> list[int]:
    """The shape that lays a per-channel vector along `channel_dim` over the normalized
    `dims` (negative indices), broadcasting over the rest."""
    view = [1] * len(dims)
    view[list(dims).index(channel_dim)] = -1
    return view


class MaskedNorm(nn.Module):
    """`kind` over the input's `dims` (negative), its channels along `channel_dim` kept per
    `keep`. `segments`: (channel group, group size, offset, repeat) of the filter groups whose
    channels `keep` holds, block after block. `layer`: the norm's module path."""

    def __init__(self, kind: str, dims: Sequence[int], channel_dim: int, channels: int, eps: float | None,
                 segments: Sequence[tuple[int, int, int, int]], layer: str = ""):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"no masked form of {kind}")
        self.kind, self.dims, self.channel_dim, self.eps = kind, tuple(dims), channel_dim, eps
        self.segments, self.layer = [tuple(s) for s in segments], layer
        self.register_buffer("keep", torch.ones(channels))
        self.full = True  # every channel kept: the plain norm (a Python flag: no device sync per call)

    @torch.no_grad()
    def set_kept(self, offset: int, kept: torch.Tensor) -> None:
        """Channels `offset ...` of the normalized dim are kept where `kept` is True."""
        self.keep[offset:offset + len(kept)] = kept.to(self.keep)
        self.full = bool(self.keep.all())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.full = bool(self.keep.all())

    def plain(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "group_norm":
            return F.group_norm(x, 1, weight, bias, self.eps)
        shape = x.shape[len(x.shape) - len(self.dims):]
        if self.kind == "rms_norm":
            return F.rms_norm(x, shape, weight, self.eps)
        return F.layer_norm(x, shape, weight, bias, self.eps)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.full:
            return self.plain(x, weight, bias)
        return masked_norm(x, self.keep, weight, bias, self.kind, self.dims, self.channel_dim, self.eps)

    def fold_call(self, gm: fx.GraphModule, node: fx.Node, masked: bool = True) -> None:
        """Put plain graph code in place of `node` (a call of this module): the plain norm when
        every channel is kept or `masked` is off (the pruned channels are gone), else the
        masked statistics written out in plain ops, `keep` a non-persistent buffer of the
        norm's owner (so the folded state_dict has the original keys)."""
        graph = gm.graph
        x, weight, bias = (list(node.args) + [None, None])[:3]
        fn = lambda f, *args, **kw: graph.call_function(f, args, kw)  # noqa: E731
        with graph.inserting_before(node):
            shape = fn(getattr, x, "shape")
            if (self.full or not masked) and self.kind == "group_norm":
                y = fn(F.group_norm, x, 1, weight, bias, self.eps)
            elif self.full or not masked:
                trailing = fn(operator.getitem, shape, slice(-len(self.dims), None))
                y = (fn(F.rms_norm, x, trailing, weight, self.eps) if self.kind == "rms_norm"
                     else fn(F.layer_norm, x, trailing, weight, bias, self.eps))
            else:
                y = self._masked_code(gm, fn, x, shape, weight, bias)
        y.meta.update({k: v for k, v in node.meta.items() if k != "fxgrow"})
        node.replace_all_uses_with(y)
        graph.erase_node(node)

    def _masked_code(self, gm: fx.GraphModule, fn, x, shape, weight, bias) -> fx.Node:
        """`masked_norm` as graph nodes, op for op."""
        owner = gm.get_submodule(self.layer) if self.layer else gm
        name = next(f"kept_channels{k or ''}" for k in range(1000) if not hasattr(owner, f"kept_channels{k or ''}"))
        view = affine_view(self.dims, self.channel_dim)
        owner.register_buffer(name, self.keep.detach().clone().view(view), persistent=False)
        kept = gm.graph.get_attr(f"{self.layer}.{name}" if self.layer else name)
        m = gm.graph.call_method("type_as", (kept, x))
        count = gm.graph.call_method("sum", (m,))
        for d in self.dims:
            if d != self.channel_dim:
                count = fn(operator.mul, count, fn(operator.getitem, shape, d))
        total = lambda t: gm.graph.call_method("sum", (t, self.dims), {"keepdim": True})  # noqa: E731
        if self.kind == "rms_norm":
            eps = torch.finfo(self.keep.dtype).eps if self.eps is None else self.eps
            y = fn(operator.mul, x, fn(torch.rsqrt, fn(operator.add, fn(operator.truediv, total(
                fn(operator.mul, fn(operator.mul, x, x), m)), count), eps)))
        else:
            mean = fn(operator.truediv, total(fn(operator.mul, x, m)), count)
            centered = fn(operator.sub, x, mean)
            var = fn(operator.truediv, total(fn(operator.mul, fn(operator.mul, centered, centered), m)), count)
            y = fn(operator.mul, centered, fn(torch.rsqrt, fn(operator.add, var, self.eps)))
        for operand, op in ((weight, operator.mul), (bias, operator.add)):
            if operand is not None:
                if self.kind == "group_norm":
                    operand = gm.graph.call_method("view", (operand, view))
                y = fn(op, y, operand)
        return y

    def extra_repr(self) -> str:
        kept = int(self.keep.sum())
        return f"{self.kind}, dims={self.dims}, kept {kept}/{self.keep.numel()} channels"
