"""Sorted slicing (SortedNet): the modules that make one model run any of its nested sub-models.

- `SubnetState`: which sub-model runs now (width index, kept-block count). One instance is
  shared by every module below; it holds Python ints only, so eager code branches on them
  and torch.compile specializes (one graph per sub-model).
- `SliceProducer` (chain rank 30, last): cuts a weight or bias to the active channels of
  the coupled groups of each of its dims. A prefix is a `narrow` view, anything else an
  `index_select`: the sub-model runs physically smaller tensors, never masks.
- `SlicedBatchNorm` / `SlicedLayerNorm` / `SlicedRMSNorm` / `SlicedGroupNorm` /
  `SlicedBatchNormAct`: the norm layer at its original path (same state keys), normalizing
  the active channels with sliced affine parameters and statistics (a layer norm's mean and
  variance are then those of the kept channels); `per_width` keeps separate running
  statistics for each narrower width.
- `DepthGate`: brackets a skippable residual block y = x + f(x). Off, the block runs on an
  empty batch (no FLOPs, no autograd graph) and hands on x unchanged.
- `LayerExit`: depth by layers (transformers): hands the stream after the first k entries
  of the layer list to the final norm and head.
- `ConvGroups`: the `groups` of a sliced grouped conv (or GroupNorm): whole groups are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Producer


def active_channels(channels: int, fraction: float, multiple_of: int = 1) -> int:
    """ceil(fraction * channels) rounded up to a multiple of `multiple_of`, at most `channels`
    and at least one channel. The 1e-9 keeps 0.3 * 10 from rounding up to 4."""
    kept = math.ceil(fraction * channels - 1e-9)
    kept = -(-kept // multiple_of) * multiple_of
    return max(1, min(channels, kept))


@dataclass(frozen=True)
class Segment:
    """The channels of coupled group `group` inside one tensor dim: channel c occupies
    positions offset + c * repeat ... offset + c * repeat + repeat - 1."""

    group: int
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class DimLayout:
    """How the `size` positions of tensor dim `dim` map to channel groups. Positions no
    segment covers (e.g. the model input's channels after a concat) are always kept."""

    dim: int
    size: int
    segments: tuple[Segment, ...]

    def kept(self, active: Mapping[int, int], full: Mapping[int, int]) -> torch.Tensor:
        """Indices (ascending) of the positions kept when group g has active[g] of its
        full[g] channels."""
        keep = torch.ones(self.size, dtype=torch.bool)
        for s in self.segments:
            start = s.offset + active[s.group] * s.repeat
            stop = s.offset + full[s.group] * s.repeat
            keep[start:stop] = False
        return keep.nonzero().flatten()


class SubnetState(nn.Module):
    """The active sub-model of one model: a grid point (one fraction per dimension, depth).

    With one `width` dimension (`fractions` a list of floats) a point is (width, depth), as
    it always was. With several (`fractions` a mapping {dimension: fractions}, e.g. heads,
    ffn, hidden, sampled independently) a point is (f_1, ..., f_n, depth) in `dims` order,
    and `group_dims[g]` says which dimension group g belongs to. The distinct width parts of
    the grid points are the `widths` ("configurations", ascending, so the all-1.0 one is
    last); `width_index` picks one, and `sizes[g][i]` is group g's channel count in
    configuration i. `depth` counts the kept blocks (`num_blocks` when the model has no
    depth dimension). No tensors: this module adds nothing to the state_dict."""

    def __init__(self, fractions: Sequence[float] | Mapping[str, Sequence[float]], group_sizes: Mapping[int, int],
                 multiple_of: int | Mapping[str, int], num_blocks: int, points: Sequence[tuple[float, ...]],
                 group_dims: Mapping[int, str] | None = None):
        super().__init__()
        by_dim = dict(fractions) if isinstance(fractions, Mapping) else {"width": fractions}
        self.dims = tuple(by_dim)
        multiples = multiple_of if isinstance(multiple_of, Mapping) else {d: multiple_of for d in self.dims}
        self.points = tuple(tuple(float(f) for f in p[:-1]) + (int(p[-1]),) for p in points)
        if len(self.dims) == 1:  # every fraction, in order (a list grid may not pair each with a depth)
            self.widths = tuple((float(f),) for f in sorted(by_dim[self.dims[0]]))
        else:
            self.widths = tuple(sorted({p[:-1] for p in self.points}))
        self.full = dict(group_sizes)
        self.group_dims = {g: (group_dims or {}).get(g, self.dims[0]) for g in self.full}
        axis = {d: i for i, d in enumerate(self.dims)}
        self.sizes = {g: tuple(active_channels(c, w[axis[self.group_dims[g]]], multiples[self.group_dims[g]])
                               for w in self.widths) for g, c in self.full.items()}
        self.num_blocks = num_blocks
        self.width_index = len(self.widths) - 1
        self.depth = num_blocks

    @property
    def fractions(self) -> tuple[float, ...]:
        """The width fractions (one `width` dimension)."""
        return tuple(w[0] for w in self.widths)

    @property
    def num_widths(self) -> int:
        return len(self.widths)

    @property
    def point(self) -> tuple[float, ...]:
        return self.widths[self.width_index] + (self.depth,)

    @property
    def largest(self) -> tuple[float, ...]:
        return max(self.points)

    def active_sizes(self, width_index: int | None = None) -> dict[int, int]:
        i = self.width_index if width_index is None else width_index
        return {g: s[i] for g, s in self.sizes.items()}

    def activate(self, *point: float) -> None:
        """Make grid point (f_1, ..., f_n, depth) - (width, depth) with one dimension - the
        running sub-model."""
        point = tuple(point)
        if point not in self.points:
            raise ValueError(f"{point} is not a grid point")
        self.width_index = self.widths.index(tuple(float(f) for f in point[:-1]))
        self.depth = int(point[-1])

    def describe(self, point: Sequence[float]) -> str:
        """'width 0.5, depth 2' / 'heads 0.5, ffn 0.25, depth 2'."""
        return ", ".join(f"{d} {f:g}" for d, f in zip(self.dims, point)) + f", depth {point[-1]}"

    def extra_repr(self) -> str:
        return f"dims={self.dims}, widths={len(self.widths)}, blocks={self.num_blocks}, active={self.point}"


class _Sliced(nn.Module):
    """Per width index, how to cut dim 0.. of a tensor: a prefix length (a `narrow` view)
    or an index buffer (non-persistent: it follows `.to(device)`, stays out of checkpoints)."""

    def _build_cuts(self, state: SubnetState, layouts: Sequence[DimLayout]) -> None:
        self.state = state
        self.layouts = tuple(layouts)
        self.cuts: list[tuple[tuple[int, int, str | None], ...]] = []
        for i in range(state.num_widths):
            cuts = []
            for layout in self.layouts:
                kept = layout.kept(state.active_sizes(i), state.full)
                if len(kept) == layout.size:
                    continue
                if torch.equal(kept, torch.arange(len(kept))):
                    cuts.append((layout.dim, len(kept), None))
                else:
                    name = f"index_w{i}_d{layout.dim}"
                    self.register_buffer(name, kept, persistent=False)
                    cuts.append((layout.dim, len(kept), name))
            self.cuts.append(tuple(cuts))

    def _cut(self, t: torch.Tensor, width_index: int | None = None) -> torch.Tensor:
        for dim, length, index in self.cuts[self.state.width_index if width_index is None else width_index]:
            t = t.narrow(dim, 0, length) if index is None else t.index_select(dim, getattr(self, index))
        return t

    @torch.no_grad()
    def _copy_cut(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else self._cut(t).detach().clone()

    def _plain(self, plain: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
        """`plain` (a plain norm module) holding `tensors`, on their device, in this one's mode."""
        plain.to(next((t.device for t in tensors.values() if t is not None), None))
        with torch.no_grad():
            for name, value in tensors.items():
                if value is not None:
                    getattr(plain, name).copy_(value)
        plain.train(self.training)
        return plain


class SliceProducer(Producer, _Sliced):
    """Last producer of a weight chain: the tensor cut to the active channels."""

    rank = 30
    role = "slice"

    def __init__(self, state: SubnetState, layouts: Sequence[DimLayout]):
        super().__init__()
        self._build_cuts(state, layouts)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self._cut(w)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        for dim, length, _ in self.cuts[self.state.width_index]:
            out[dim] = length
        return tuple(out)

    def extra_repr(self) -> str:
        return ", ".join(f"dim {lay.dim}: groups {[s.group for s in lay.segments]}" for lay in self.layouts)


class ConvGroups(nn.Module):
    """The `groups` argument of a grouped conv (or GroupNorm) whose channels are sliced in
    whole groups: cut to k of its `groups` groups it is a conv with k groups (a depthwise
    conv cut to k channels has k). Called with no input; returns an int."""

    def __init__(self, state: SubnetState, layout: DimLayout, groups: int):
        super().__init__()
        self.state = state
        per = layout.size // groups  # channels per group
        self.by_width = tuple(len(layout.kept(state.active_sizes(i), state.full)) // per
                              for i in range(state.num_widths))

    def forward(self) -> int:
        return self.by_width[self.state.width_index]


class SlicedBatchNorm(nn.modules.batchnorm._BatchNorm, _Sliced):
    """BatchNorm{1,2,3}d over the active channels, at the original module's path with its
    parameter and buffer names. `per_width`: each narrower width keeps its own running
    statistics (`running_mean_w<i>`, ...); the full width keeps the original buffers."""

    per_width = False  # read by reset_running_stats while the base class initializes

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, state: SubnetState, layout: DimLayout,
                 per_width: bool = False):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=_device_of(bn), dtype=_dtype_of(bn))
        self.load_state_dict(bn.state_dict())
        self.train(bn.training)
        self._build_cuts(state, [layout])
        self.per_width = per_width and self.track_running_stats
        if self.per_width:
            for i in range(state.num_widths - 1):
                n = len(layout.kept(state.active_sizes(i), state.full))
                self.register_buffer(f"running_mean_w{i}", self.running_mean[:n].clone())
                self.register_buffer(f"running_var_w{i}", self.running_var[:n].clone())
                self.register_buffer(f"num_batches_tracked_w{i}", self.num_batches_tracked.clone())

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def statistics(self, width_index: int | None = None):
        """(running_mean, running_var, num_batches_tracked, shared) of a width: its own
        buffers under `per_width` (shared=False), else the full ones (shared=True: the
        caller cuts them to the active channels)."""
        i = self.state.width_index if width_index is None else width_index
        if self.per_width and i < self.state.num_widths - 1:
            return (getattr(self, f"running_mean_w{i}"), getattr(self, f"running_var_w{i}"),
                    getattr(self, f"num_batches_tracked_w{i}"), False)
        return self.running_mean, self.running_var, self.num_batches_tracked, True

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.per_width:
            for i in range(self.state.num_widths - 1):
                getattr(self, f"running_mean_w{i}").zero_()
                getattr(self, f"running_var_w{i}").fill_(1)
                getattr(self, f"num_batches_tracked_w{i}").zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm's forward on the cut tensors (same momentum / cumulative-average rule)."""
        self._check_input_dim(x)
        if x.shape[0] == 0:  # a skipped block: nothing to normalize, no statistics to update
            return x
        mean, var, tracked, shared = self.statistics()
        update = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if update:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        if shared and mean is not None:
            # A prefix cut is a view: batch_norm updates the shared buffers in place. An
            # index cut copies, so the updated statistics are written back below.
            mean, var = self._cut(mean), self._cut(var)
        if self.training and not self.track_running_stats:
            mean = var = None
        weight = self._cut(self.weight) if self.weight is not None else None
        bias = self._cut(self.bias) if self.bias is not None else None
        y = F.batch_norm(x, mean, var, weight, bias, self.training or mean is None, factor, self.eps)
        index = next((i for _, _, i in self.cuts[self.state.width_index] if i is not None), None)
        if update and shared and index is not None:
            with torch.no_grad():
                self.running_mean.index_copy_(0, getattr(self, index), mean)
                self.running_var.index_copy_(0, getattr(self, index), var)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", per_width=True" if self.per_width else "")

    def plain(self) -> nn.Module:
        """The plain BatchNorm{1,2,3}d of the active width (its statistics, cut)."""
        mean, var, tracked, shared = self.statistics()
        if shared and mean is not None:
            mean, var = self._copy_cut(mean), self._copy_cut(var)
        weight, bias = self._copy_cut(self.weight), self._copy_cut(self.bias)
        size = next(t.shape[0] for t in (weight, mean) if t is not None)
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn")
                    and c is not nn.modules.batchnorm._BatchNorm and issubclass(c, nn.modules.batchnorm._BatchNorm))
        return self._plain(base(size, self.eps, self.momentum, self.affine, self.track_running_stats),
                           {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var,
                            "num_batches_tracked": tracked})


class SlicedBatchNorm1d(SlicedBatchNorm, nn.BatchNorm1d):
    pass


class SlicedBatchNorm2d(SlicedBatchNorm, nn.BatchNorm2d):
    pass


class SlicedBatchNorm3d(SlicedBatchNorm, nn.BatchNorm3d):
    pass


def sliced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, state: SubnetState, layout: DimLayout,
                      per_width: bool = False) -> SlicedBatchNorm:
    """The sliced twin of `bn` (still an instance of its BatchNorm{1,2,3}d class)."""
    for base, sliced in ((nn.BatchNorm1d, SlicedBatchNorm1d), (nn.BatchNorm2d, SlicedBatchNorm2d),
                         (nn.BatchNorm3d, SlicedBatchNorm3d)):
        if isinstance(bn, base):
            return sliced(bn, state, layout, per_width)
    raise TypeError(f"cannot slice {type(bn).__name__}")


class SlicedLayerNorm(nn.LayerNorm, _Sliced):
    """LayerNorm over the active features of its last dim (elementwise affine cut alike)."""

    def __init__(self, ln: nn.LayerNorm, state: SubnetState, layout: DimLayout):
        if len(ln.normalized_shape) != 1:
            raise ValueError("only LayerNorm over the last dim can be sliced")
        super().__init__(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None,
                         device=_device_of(ln), dtype=_dtype_of(ln))
        self.load_state_dict(ln.state_dict())
        self.train(ln.training)
        self._build_cuts(state, [layout])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._cut(self.weight) if self.weight is not None else None
        bias = self._cut(self.bias) if self.bias is not None else None
        return F.layer_norm(x, x.shape[-1:], weight, bias, self.eps)

    def plain(self) -> nn.Module:
        """The plain LayerNorm of the active width."""
        weight, bias = self._copy_cut(self.weight), self._copy_cut(self.bias)
        size = (weight if weight is not None else self._cut(torch.empty(self.normalized_shape))).shape[0]
        return self._plain(nn.LayerNorm(size, self.eps, self.elementwise_affine, bias=self.bias is not None),
                           {"weight": weight, "bias": bias})


class SlicedRMSNorm(nn.RMSNorm, _Sliced):
    """RMSNorm over the active features of its last dim (the root mean square over them)."""

    def __init__(self, rms: nn.RMSNorm, state: SubnetState, layout: DimLayout):
        if len(rms.normalized_shape) != 1:
            raise ValueError("only RMSNorm over the last dim can be sliced")
        super().__init__(rms.normalized_shape, rms.eps, rms.elementwise_affine, device=_device_of(rms),
                         dtype=_dtype_of(rms))
        self.load_state_dict(rms.state_dict())
        self.train(rms.training)
        self._build_cuts(state, [layout])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._cut(self.weight) if self.weight is not None else None
        return F.rms_norm(x, x.shape[-1:], weight, self.eps)

    def plain(self) -> nn.Module:
        """The plain RMSNorm of the active width."""
        weight = self._copy_cut(self.weight)
        size = (weight if weight is not None else self._cut(torch.empty(self.normalized_shape))).shape[0]
        return self._plain(nn.RMSNorm(size, self.eps, self.elementwise_affine), {"weight": weight})


class SlicedGroupNorm(nn.GroupNorm, _Sliced):
    """GroupNorm over the active channels: one group (statistics over every kept channel), or
    the kept whole groups (each group's statistics unchanged)."""

    def __init__(self, gn: nn.GroupNorm, state: SubnetState, layout: DimLayout):
        super().__init__(gn.num_groups, gn.num_channels, gn.eps, gn.affine, device=_device_of(gn),
                         dtype=_dtype_of(gn))
        self.load_state_dict(gn.state_dict())
        self.train(gn.training)
        self._build_cuts(state, [layout])

    def _groups(self, channels: int) -> int:
        return 1 if self.num_groups == 1 else channels // (self.num_channels // self.num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._cut(self.weight) if self.weight is not None else None
        bias = self._cut(self.bias) if self.bias is not None else None
        return F.group_norm(x, self._groups(x.shape[1]), weight, bias, self.eps)

    def plain(self) -> nn.Module:
        """The plain GroupNorm of the active width."""
        weight, bias = self._copy_cut(self.weight), self._copy_cut(self.bias)
        size = (weight if weight is not None else self._cut(torch.empty(self.num_channels))).shape[0]
        return self._plain(nn.GroupNorm(self._groups(size), size, self.eps, self.affine),
                           {"weight": weight, "bias": bias})


class SlicedBatchNormAct(SlicedBatchNorm2d):
    """timm's BatchNormAct2d (a BatchNorm2d whose forward goes on through its `drop` and `act`
    modules) over the active channels; `plain()` is a BatchNormAct2d again."""

    def __init__(self, bn: nn.BatchNorm2d, state: SubnetState, layout: DimLayout, per_width: bool = False):
        super().__init__(bn, state, layout, per_width)
        self.drop, self.act = bn.drop, bn.act
        self._kind = type(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))

    def plain(self) -> nn.Module:
        bn = super().plain()
        out = self._kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, apply_act=False)
        out.load_state_dict(bn.state_dict())
        out.drop, out.act = self.drop, self.act
        return out.to(next(iter(bn.state_dict().values())).device).train(self.training)


SLICED_NORMS = (SlicedBatchNorm, SlicedLayerNorm, SlicedRMSNorm, SlicedGroupNorm)  # each has `plain()`


class DepthGate(nn.Module):
    """Gate of skippable block `index` (0-based, counted from the input). It is called twice:
    `gate(x)` where the block reads its input x, and `gate(x, out)` where the block hands on
    its output. While the block is kept both pass through; when it is dropped the block's
    ops see an empty batch (no FLOPs, no autograd graph) and the exit hands on x."""

    channel_pointwise = True  # the coupling analysis follows channels straight through

    def __init__(self, state: SubnetState, index: int, block: str):
        super().__init__()
        self.state = state
        self.index = index
        self.block = block

    @property
    def kept(self) -> bool:
        return self.index < self.state.depth

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return x if self.kept else x[:0]
        return out if self.kept else x

    def extra_repr(self) -> str:
        return f"index={self.index}, block={self.block!r}"


class LayerExit(nn.Module):
    """Exit of layer list `layers` (depth by layers): called with the stream h_0 .. h_L (the
    input of the first layer, then what each layer hands on), it hands h_depth to the
    nodes after the list (the final norm and head), so depth k is exactly the first k
    layers. The dropped layers still run in eager mode, unused (no gradient reaches them);
    torch.compile, which specializes on the depth, removes them as dead code."""

    channel_pointwise = True  # every stream value carries the same channels

    def __init__(self, state: SubnetState, layers: str, entries: Sequence[str]):
        super().__init__()
        self.state = state
        self.layers = layers
        self.entries = tuple(entries)

    def forward(self, *streams: torch.Tensor) -> torch.Tensor:
        return streams[self.state.depth]

    def extra_repr(self) -> str:
        return f"layers={self.layers!r}, entries={len(self.entries)}"


def _device_of(m: nn.Module) -> torch.device | None:
    t = next(iter(m.state_dict().values()), None)
    return t.device if t is not None else None


def _dtype_of(m: nn.Module) -> torch.dtype | None:
    p = next(iter(m.parameters()), None)
    return p.dtype if p is not None else None
