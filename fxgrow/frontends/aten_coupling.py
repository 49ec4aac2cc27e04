"""Channel coupling rules for the aten ops of an exported graph (`model.frontend: export`).

torch.export writes a model as aten calls: `aten.view(x, [B, T, -1, 64])` where fx had
`x.view(...)`, `aten.transpose.int`, `aten.expand`, `aten.split.Tensor` + getitem, ... Each
rule below reads the aten argument convention and hands over to the `Coupling` method that
follows the same computation for torch functions, so both front-ends give the same groups.
Layers (linear, embedding, conv, GPT-2's Conv1D) are already functional layer calls
(`aten_layers.mark_layers`); a `layer_norm` keeps its aten form and is followed here.

Ops that compute masks and positions from the token ids (arange, cumsum, index, comparisons)
carry no channels: their dims are tokens or batch, which never meet a layer's channels; they
get rules too, so that they fix nothing (an unknown op would fix every dim it touches).
Literal sizes (view/reshape/expand, layer_norm's normalized_shape) are size uses or fix
their channels, as in fx graphs; `split` into equal pieces of a packed projection's output
(GPT-2's q|k|v) makes each piece a block of its own, so its heads can be cut; other splits fix
the cut dim's channels.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from ..analysis.coupling import Coupling, _describe_in, _dims, _tensor_meta, register_coupling_rule

aten = torch.ops.aten


def _tensors(c: Coupling, node: Node) -> list[Node] | None:
    """The tensor operands of `node` (None when one has no layout: the rule cannot follow)."""
    found = [n for n in node.all_input_nodes if _tensor_meta(n) is not None]
    return found if all(n in c.layouts for n in found) else None


def _pointwise(c: Coupling, node: Node) -> bool | None:
    inputs = _tensors(c, node)
    return False if inputs is None else c._pointwise(node, inputs=inputs)


def _first_only(c: Coupling, node: Node) -> bool | None:  # to(x, device, dtype), dropout(x, p, train)
    return c._pointwise(node, first_only=True)


def _sizes(node: Node, arg: int = 1) -> list | None:
    sizes = node.args[arg] if len(node.args) > arg else None
    return [(s, arg, i) for i, s in enumerate(sizes)] if isinstance(sizes, (list, tuple)) else None


def _view(c: Coupling, node: Node) -> bool | None:
    sizes = _sizes(node)
    return False if sizes is None else c._reshape(node, sizes)


def _unsqueeze(c: Coupling, node: Node) -> bool | None:  # and squeeze: no sizes asked
    return c._reshape(node)


def _expand(c: Coupling, node: Node) -> bool | None:
    if c._pointwise(node, first_only=True) is False:
        return False
    c._sizes(node, c.layouts[node], _sizes(node))


def _permuted(c: Coupling, node: Node, perm: list[int]) -> None:
    xin = c.layouts[node.args[0]]
    c.output(node, {d: [xin[p]] for d, p in enumerate(perm)})


def _transpose(c: Coupling, node: Node) -> bool | None:
    xin = c.layouts.get(node.args[0])
    if xin is None:
        return False
    perm = list(range(len(xin)))
    if node.target is not aten.t.default:
        d0, d1 = _dims([node.args[1], node.args[2]], len(xin))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = perm[::-1]
    _permuted(c, node, perm)


def _permute(c: Coupling, node: Node) -> bool | None:
    xin = c.layouts.get(node.args[0])
    if xin is None:
        return False
    _permuted(c, node, _dims(list(node.args[1]), len(xin)))


def _slice(c: Coupling, node: Node) -> bool | None:
    """slice.Tensor(x, dim, start, end, step): the whole dim passes on; a part selects channels."""
    x = node.args[0]
    xin = c.layouts.get(x)
    if xin is None:
        return False
    dim = _dims(node.args[1] if len(node.args) > 1 else 0, len(xin))[0]
    whole = c.shape(node)[dim] == c.shape(x)[dim] and (node.args[4] if len(node.args) > 4 else 1) == 1
    out = c.output(node, {d: [xin[d]] for d in range(len(xin)) if whole or d != dim})
    if not whole:
        reason = f"slice {node.name} selects channels"
        c.fix([xin[dim], out[dim]], reason)


def _select(c: Coupling, node: Node) -> bool | None:
    """select.int(x, dim, index): one position of `dim`, which goes."""
    xin = c.layouts.get(node.args[0])
    if xin is None:
        return False
    dim = _dims(node.args[1], len(xin))[0]
    c.fix([xin[dim]], f"select {node.name} selects channels")
    c.output(node, {o: [xin[d]] for o, d in enumerate(d for d in range(len(xin)) if d != dim)})


def _split(c: Coupling, node: Node) -> bool | None:
    """split.Tensor(x, size, dim) / split_with_sizes(x, sizes, dim): every other dim passes on
    to each piece. Equal pieces of one plain block of channels that only parameter slices
    hold (a packed q|k|v projection's output) become blocks of their own (`Coupling.refine`),
    tied by the one literal `size` that sizes each of them; any other cut dim's channels are
    not followed into the pieces."""
    x = node.args[0]
    xin = c.layouts.get(x)
    if xin is None:
        return False
    dim = _dims(node.args[2] if len(node.args) > 2 else 0, len(xin))[0]
    pieces = node.meta.get("tensor_meta")
    size = node.args[1]
    if (node.target is aten.split.Tensor and len(pieces) > 1 and isinstance(size, int)
            and c.shape(x)[dim] == size * len(pieces) and len(x.users) == 1
            and (blocks := c.refine(x, dim, len(pieces), node)) is not None):
        for block in blocks:
            c.literal_size(block, node, 1, None, size)
        c.pieces[node] = [tuple(block if d == dim else xin[d] for d in range(len(xin))) for block in blocks]
        return None
    reason = (f"{_describe_in(node, c.gm)} cuts channels into pieces (a packed projection, such as GPT-2's "
              "q|k|v): the pieces are not cut")
    if len(pieces) > 1:
        c.fix([xin[dim]], reason)
    c.pieces[node] = [tuple(reason if d == dim and len(pieces) > 1 else xin[d] for d in range(len(xin)))
                      for _ in pieces]


_split.splits = True


def _reduce(c: Coupling, node: Node) -> bool | None:  # mean.dim(x, dims, keepdim), sum.dim_IntList, amax
    return c._reduce(node)


def _softmax(c: Coupling, node: Node) -> bool | None:  # _softmax(x, dim, half_to_float), softmax.int(x, dim)
    return c._along_dim(node)


def _along(c: Coupling, node: Node) -> bool | None:
    """cumsum(x, dim): each output reads the inputs before it along `dim` (a statistic)."""
    xin = c.layouts.get(node.args[0])
    if xin is None:
        return False
    dim = _dims(node.args[1], len(xin))[0]
    c.normalizes(xin[dim], node, "reduce", dim)
    return c._pointwise(node, first_only=True)


def _layer_norm(c: Coupling, node: Node) -> bool | None:
    """layer_norm(x, normalized_shape, weight, bias, eps) and rms_norm(x, normalized_shape,
    weight, eps): statistics over the trailing dims; the affine parameters (get_attr reads)
    index the last dims; normalized_shape restates their sizes: size uses."""
    x, shape = node.args[0], node.args[1]
    xin = c.layouts.get(x)
    if xin is None or not isinstance(shape, (list, tuple)):
        return False
    k = len(shape)
    out = c.output(node, {d: [layout] for d, layout in enumerate(xin)})
    for j in range(k):
        d = len(xin) - k + j
        c.normalizes(xin[d], node, "rms_norm" if node.target is _RMS_NORM else "layer_norm", d)
        c.literal_size(out[d], node, 1, j, shape[j])
    for position in (2, 3):
        p = node.args[position] if len(node.args) > position else None
        if isinstance(p, Node) and p in c.layouts and p.op == "get_attr" and len(c.layouts[p]) == 1:
            c.read_as(p, xin[-1], node)
        elif isinstance(p, Node) and p in c.layouts:
            for j, layout in enumerate(c.layouts[p]):
                c._unify(layout, xin[len(xin) - len(c.layouts[p]) + j], node)


def _index(c: Coupling, node: Node) -> bool | None:
    """index.Tensor(x, [i0, i1, ...]): gathers along the indexed leading dims (positions and
    masks); the dims after them pass on, the indexed ones select."""
    x, indices = node.args[0], node.args[1]
    xin = c.layouts.get(x)
    if xin is None or not isinstance(indices, (list, tuple)) or any(i is None for i in indices):
        return False
    k = len(indices)
    c.fix(xin[:k], f"index {node.name} selects channels")
    ndim = len(c.shape(node))
    c.output(node, {ndim - (len(xin) - d): [xin[d]] for d in range(k, len(xin))})


def _gather(c: Coupling, node: Node) -> bool | None:
    """gather(x, dim, index): positions of `dim` picked by `index` (BERT's token types); the
    other dims pass on where the index keeps their size."""
    x = node.args[0]
    xin = c.layouts.get(x)
    if xin is None:
        return False
    dim, shape = _dims(node.args[1], len(xin))[0], c.shape(node)
    reason = f"gather {node.name} selects channels"
    c.fix([xin[dim]], reason)
    out = c.output(node, {d: [xin[d]] for d in range(len(xin)) if d != dim and shape[d] == c.shape(x)[d]})
    c.fix([out[dim]], reason)


def _new(c: Coupling, node: Node) -> bool | None:
    """A tensor made from sizes (arange, ones, full, new_ones): new dims, coupled to nothing
    but the tensors its sizes are read from; a literal size is a size use (or fixes)."""
    out = c.output(node, {})
    if node.target in _MADE_FROM_SIZES:
        c._sizes(node, out, _sizes(node, _MADE_FROM_SIZES[node.target]))


def _diff(c: Coupling, node: Node) -> bool | None:
    """diff(x, n, dim, prepend, append): neighbouring positions along `dim` combine."""
    xin = c.layouts.get(node.args[0])
    if xin is None:
        return False
    dim = _dims(node.args[2] if len(node.args) > 2 else -1, len(xin))[0]
    c.fix([xin[dim]], f"diff {node.name} mixes neighbouring channels")
    out = c.output(node, {d: [xin[d]] for d in range(len(xin)) if d != dim})
    c.fix([out[dim]], f"diff {node.name} mixes neighbouring channels")


def _attention(c: Coupling, node: Node) -> bool | None:
    return c._attention(node)


def _cat(c: Coupling, node: Node) -> bool | None:
    return c._join(node)


def _overloads(*packets) -> list:
    return [getattr(p, name) for p in packets for name in p.overloads()]


_POINTWISE = _overloads(
    aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.rsqrt, aten.sqrt, aten.neg, aten.exp, aten.abs,
    aten.silu, aten.gelu, aten.tanh, aten.sigmoid, aten.relu, aten.cos, aten.sin, aten.erf, aten.reciprocal,
    aten.where, aten.masked_fill, aten.minimum, aten.maximum, aten.clamp, aten.eq, aten.ne, aten.le, aten.lt,
    aten.ge, aten.gt, aten.__and__, aten.__or__, aten.bitwise_and, aten.bitwise_or, aten.bitwise_not,
    aten.logical_not, aten.logical_and, aten.logical_or, aten.rsub, aten.square,
)
_FIRST_ONLY = _overloads(aten.to, aten._to_copy, aten.contiguous, aten.clone, aten.alias, aten.detach,
                         aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.type_as,
                         aten.lift_fresh_copy, aten.masked_fill_, aten.tril, aten.triu)
_RMS_NORM = getattr(aten, "rms_norm", None) and aten.rms_norm.default
_MADE_FROM_SIZES = {op: position for packet, position in ((aten.ones, 0), (aten.zeros, 0), (aten.full, 0),
                                                          (aten.empty, 0), (aten.new_ones, 1), (aten.new_zeros, 1),
                                                          (aten.new_full, 1), (aten.new_empty, 1))
                    for op in _overloads(packet)}
_NEW = _overloads(aten.arange, aten.ones, aten.zeros, aten.full, aten.new_ones, aten.new_zeros, aten.new_full,
                  aten.empty, aten.new_empty, aten.scalar_tensor, aten.ones_like, aten.zeros_like, aten.full_like)

for _targets, _rule in (
    (_POINTWISE, _pointwise),
    (_FIRST_ONLY, _first_only),
    (_NEW, _new),
    ([aten.view.default, aten.reshape.default, aten._unsafe_view.default], _view),
    (_overloads(aten.unsqueeze, aten.squeeze), _unsqueeze),
    ([aten.expand.default], _expand),
    ([aten.transpose.int, aten.t.default], _transpose),
    ([aten.permute.default], _permute),
    ([aten.slice.Tensor], _slice),
    ([aten.select.int], _select),
    ([aten.split.Tensor, aten.split_with_sizes.default], _split),
    ([aten.cat.default], _cat),
    (_overloads(aten.mean, aten.sum, aten.amax, aten.amin), _reduce),
    ([aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int], _softmax),
    ([aten.cumsum.default], _along),
    ([aten.layer_norm.default] + ([_RMS_NORM] if _RMS_NORM else []), _layer_norm),
    ([aten.index.Tensor], _index),
    ([aten.gather.default], _gather),
    ([aten.diff.default], _diff),
    ([aten.scaled_dot_product_attention.default], _attention),
):
    for _target in _targets:
        register_coupling_rule(_target, _rule)
