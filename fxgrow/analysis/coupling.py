"""Channel coupling: which channel indices of which parameters must move together.

Growth widens, filter pruning removes and width slicing keeps channels; each must act on
every parameter slice that indexes the same channels, or the network stops computing.

The analysis works on a `GraphModule` after `ShapeProp` and tracks *every* dim of every
tensor, so it never has to guess which dim holds channels: a conv reads dim 1, a linear the
last dim, a LayerNorm its trailing dims, and the ops in between say how their output dims
relate to their input dims. Each tensor dim that is one block of channels gets a node
("tensor", node name, dim) in a networkx graph; an edge says "same channel count and
order" (residual add, activation, norm, depthwise conv, matmul contraction). A dim that
holds several blocks side by side (the output of `cat`, or a flatten that repeats each
channel H*W times) is not a node but a layout: a list of segments (atom, size, repeat).
Every parameter slice is a node ("param", layer, param, dim, offset, repeat) tied to the
block it indexes. A connected component holding parameter slices is a `ChannelGroup`.

Anything the analysis cannot follow exactly marks the touched blocks fixed with a reason
(unknown op, a reshape that splits channels or hard-codes their count, ...): a fixed group
is never grown, pruned or sliced, which is always safe, where a wrong coupling would not be.

Two refinements keep groups free that would otherwise be fixed or wrongly treated:
- *Whole conv groups*: a grouped conv (G groups) maps input group g to output group g, so
  its input and output channels move in whole groups: one `ChannelGroup` whose "channel" is
  a unit of C/G consecutive channels on each side (`ChannelUse.repeat`); a GroupNorm with G
  groups asks the same of its channels. Units are the largest blocks every such op divides.
- *Normalizers*: ops that compute statistics across a group's channels (LayerNorm, RMSNorm,
  GroupNorm(1), a softmax or a hand-written mean over them, a matmul contracting them) are
  listed on the group (`ChannelGroup.normalizers`). Slicing keeps them (they then normalize
  over the kept channels); filter pruning must mask them or refuse.

Layers (ops with parameters) follow their kind's rule in `fxgrow.layers`; every other op
follows the rule registered for its function, method name or module class
(`register_coupling_rule`); an op with no rule is unknown.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from ..layers import LayerCall, argument, layer_call


@dataclass(frozen=True, order=True)
class ChannelUse:
    """One parameter slice a group's channels index: channel c of the group is the
    indices `offset + c * repeat + r` (r < repeat) of `layer.param` along `dim`."""

    layer: str  # module path of the layer owning the parameter, e.g. "layer1.0.conv1"
    param: str  # "weight" | "bias" | "running_mean" | "running_var" | ...
    dim: int  # the parameter dim that indexes these channels
    offset: int = 0  # first index of this group's block along `dim` (concat puts groups side by side)
    repeat: int = 1  # each channel spans `repeat` consecutive indices (flatten of C x H x W: H*W)

    def indices(self, channels) -> torch.Tensor:
        """The indices along `dim` that hold `channels` (channel numbers within the group)."""
        channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1, 1)
        return (self.offset + channels * self.repeat + torch.arange(self.repeat)).reshape(-1)


@dataclass(frozen=True, order=True)
class Normalizer:
    """An op computing statistics across a group's channels: channel c of the group is the
    indices `offset + c * repeat + r` of dim `dim` of the op's input `node`."""

    node: str  # the graph node
    kind: str  # "layer_norm" | "rms_norm" | "group_norm" (the layer kind) | "reduce" | "contract"
    layer: str  # its module path ("" for a hand-written op)
    op: str  # what it is, for messages
    dim: int
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True, order=True)
class SizeUse:
    """An integer literal in the graph that sizes a dim holding the group's channels (a
    `view(B, T, 64)`, an `unflatten(-1, (4, -1))`, a `split(x, 32)`): argument `arg` of
    `node` (element `item` of it when the argument is a list, else None) equals the dim's
    size, in which channel c of the group is positions `offset + c * repeat ...`. A slicing
    pass rewrites the literal to follow the active channels (`fxgrow.passes.sorted_slicing_sizes`)."""

    node: str
    arg: int
    item: int | None
    size: int  # the literal: the dim's full size
    offset: int = 0
    repeat: int = 1


@dataclass
class ChannelGroup:
    """Channels that must be grown, pruned or sliced together: channel c means the same
    thing in every use. Groups come in graph order; `fixed` ones must be left alone. A
    "channel" is a unit of `repeat` indices in each use: one channel, or a whole conv group."""

    id: int
    size: int  # number of channels (units) C
    uses: list[ChannelUse]  # every parameter slice that must move together
    producers: list[str]  # layers whose OUTPUT channels define this group
    fixed: bool  # True: never grow/slice/prune
    reason: str = ""  # why fixed
    normalizers: list[Normalizer] = field(default_factory=list)  # ops with statistics across the channels
    # Attention heads: a unit is a whole head (head_dim consecutive channels in q/k/v/o), or
    # under grouped-query attention one kv head and its `heads_per_unit` query heads. A use's
    # `repeat` is the unit's channel count in that parameter.
    heads: bool = False
    head_dim: int = 0
    heads_per_unit: int = 1
    size_uses: list[SizeUse] = field(default_factory=list)  # literals sizing its dims (follow_sizes only)


@dataclass(frozen=True)
class _Segment:
    atom: tuple  # ("tensor", node name, dim): one block of channels
    size: int
    repeat: int = 1


Layout = tuple[_Segment, ...]  # what one tensor dim holds, block after block


def _weight_chains(nodes: list[Node], layers: dict[Node, LayerCall]) -> set[Node]:
    """Nodes that only compute layer parameters (get_attr -> producers -> operand): the
    layer's own uses already stand for them, so the analysis skips them."""
    static: set[Node] = set()
    for n in nodes:
        inputs = n.all_input_nodes
        if n.op == "get_attr" or (
            n.op.startswith("call_")
            and all(i in static for i in inputs)
            and (inputs or (n.meta.get("fxgrow") or {}).get("role") == "producer")
        ):
            static.add(n)
    chain: set[Node] = set()
    for n in reversed(nodes):
        if n in static and n.users and all(
            u in chain or (u in layers and n in layers[u].operands.values()) for u in n.users
        ):
            chain.add(n)
    return chain


# ---------------------------------------------------------------------------------------
# What the other ops do with dims.

_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.maximum,
    torch.minimum, torch.where, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
}
# Elementwise in shape, but each output reads every entry along `dim`: normalizers.
_ALONG_DIM_FUNCTIONS = {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.normalize}
_ALONG_DIM_METHODS = {"softmax", "log_softmax"}
# Named so the analysis does not import torchvision: stochastic depth scales whole samples.
_POINTWISE_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth"}
# Modules (by class, base classes too) that scale whole samples: mode-aware tracing keeps
# them leaves (they read self.training).
_POINTWISE_MODULES_BY_NAME = {"torchvision.ops.stochastic_depth.StochasticDepth", "timm.layers.drop.DropPath"}
_POINTWISE_METHODS_ALL_ARGS = {
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "pow", "maximum", "minimum",
    "masked_fill", "where",
}
# Only `self` carries data: `x.to(y)`, `x.expand_as(y)` take just a dtype or shape from y.
_POINTWISE_METHODS_SELF = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt",
    "neg", "square", "erf", "clamp", "clamp_", "contiguous",
    "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "expand", "expand_as",
}
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)
# op -> how many trailing (spatial) dims it changes; the leading dims pass through.
_SPATIAL_FUNCTIONS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
}
_SPATIAL_MODULES = (
    (nn.MaxPool1d, 1), (nn.AvgPool1d, 1), (nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveMaxPool1d, 1),
    (nn.MaxPool2d, 2), (nn.AvgPool2d, 2), (nn.AdaptiveAvgPool2d, 2), (nn.AdaptiveMaxPool2d, 2),
    (nn.MaxPool3d, 3), (nn.AvgPool3d, 3), (nn.AdaptiveAvgPool3d, 3), (nn.AdaptiveMaxPool3d, 3),
)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "var", "std"}
_JOIN_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}


def _tensor_meta(node) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _holds_tensor(meta) -> bool:
    if isinstance(meta, TensorMetadata):  # a NamedTuple: test it before the containers
        return True
    if isinstance(meta, (list, tuple)):
        return any(_holds_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_tensor(m) for m in meta.values())
    return False


def _describe(node: Node, gm: GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _describe_in(node: Node, gm: GraphModule) -> str:
    """`node` and the module whose forward computed it: "Tensor.mean (mean_1) in 'blocks.0.norm'"."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"{_describe(node, gm)} ({node.name})" + (f" in '{path}'" if path else "")


def _qualified_name(target) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


def _dims(value, ndim: int) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [d % ndim for d in values]


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of `a` and `b` whose products match: in row-major order each run of
    `a` holds exactly the elements of its run of `b`."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        run_a, run_b = ([i] if i < len(a) else []), ([j] if j < len(b) else [])
        i, j = i + len(run_a), j + len(run_b)
        while (pa := math.prod(a[k] for k in run_a)) != (pb := math.prod(b[k] for k in run_b)):
            if pa < pb and i < len(a):
                run_a, i = run_a + [i], i + 1
            elif pb < pa and j < len(b):
                run_b, j = run_b + [j], j + 1
            else:
                break
        groups.append((run_a, run_b))
    return groups


# ---------------------------------------------------------------------------------------

class Coupling:
    """Builds the coupling graph in one walk over the nodes. The layer kinds' rules
    (`fxgrow.layers`) use its public part: `layouts[node]` (one layout per dim of a node's
    output), `shape(node)`, `output(node, {dim: [input layouts it equals]})`, `use(layout,
    (owner, param), dim, node)`, `produces(layout, path)` and `fix(layouts, reason)`."""

    def __init__(self, gm: GraphModule, follow_sizes: bool = False):
        self.gm = gm
        # True: a literal size of a channel dim is recorded as a `SizeUse` (the caller rewrites
        # it); False: it fixes the channels, for callers that cannot rewrite it.
        self.follow_sizes = follow_sizes
        # ops returning several tensors (aten's split): per output, per dim, the layout it
        # equals, or why it is a new block that stays fixed; `getitem` reads them
        self.pieces: dict[Node, list[tuple[Layout | str, ...]]] = {}
        self.graph = nx.Graph()
        self.layouts: dict[Node, tuple[Layout, ...]] = {}

    # --- graph primitives ---
    def _add(self, key: tuple, **attrs) -> None:
        if key not in self.graph:
            self.graph.add_node(key, order=self.graph.number_of_nodes(), **attrs)

    def _atom(self, node: Node, dim: int, size: int) -> Layout:
        key = ("tensor", node.name, dim)
        self._add(key, kind="tensor", node=node.name, dim=dim, size=size, reasons=[],
                  label=f"{node.name}[{dim}]")
        return (_Segment(key, size),)

    def _fix_atoms(self, atoms: Iterable[tuple], reason: str) -> None:
        for atom in atoms:
            reasons = self.graph.nodes[atom]["reasons"]
            if reason not in reasons:
                reasons.append(reason)

    def fix(self, layouts: Iterable[Layout], reason: str) -> None:
        self._fix_atoms((seg.atom for layout in layouts for seg in layout), reason)

    def _unify(self, a: Layout, b: Layout, node: Node) -> None:
        """Say that two layouts hold the same channels in the same order."""
        if a == b:
            return
        if [(s.size, s.repeat) for s in a] == [(s.size, s.repeat) for s in b]:
            for sa, sb in zip(a, b):
                self.graph.add_edge(sa.atom, sb.atom, op=node.name)
        elif not (self._whole_units(a, b, node) or self._whole_units(b, a, node)):
            self.fix((a, b), f"cannot align channel blocks at {node.name}")

    def _whole_units(self, fine: Layout, coarse: Layout, node: Node) -> bool:
        """`coarse` holds each of its channels `r` times where `fine` holds r distinct
        channels (grouped-query attention: a kv head repeated for its query heads): channel
        c of `coarse` is a unit of r channels of `fine`, so both move in whole units."""
        if len(fine) != 1 or len(coarse) != 1 or fine[0].repeat != 1:
            return False
        f, c = fine[0], coarse[0]
        if c.repeat <= 1 or f.size != c.size * c.repeat:
            return False
        self.whole_groups(fine, (_Segment(c.atom, c.size),), c.size, node,
                          f"{node.name} reads each of {c.size} channels {c.repeat} times")
        return True

    def use(self, layout: Layout, param: tuple[str, str] | None, dim: int, op: Node) -> None:
        """Tie the slices of parameter `param` = (owner path, name) along `dim` to the blocks
        of `layout`, block after block."""
        if param is None:
            return
        owner, name = param
        offset = 0
        for seg in layout:
            key = ("param", owner, name, dim, offset, seg.repeat)
            self._add(key, kind="param", use=ChannelUse(owner, name, dim, offset, seg.repeat),
                      label=f"{owner}.{name}[{dim}]@{offset}x{seg.repeat}")
            self.graph.add_edge(key, seg.atom, op=op.name)
            offset += seg.size * seg.repeat

    def output(self, node: Node, coupled: dict[int, list[Layout]], reason: str | None = None) -> tuple[Layout, ...]:
        """Give each dim of `node`'s output a layout: its own atom tied to the input layouts
        it equals, or the composite layout it passes on; dims not in `coupled` are new."""
        shape = _tensor_meta(node).shape
        out = []
        for d, size in enumerate(shape):
            sources = coupled.get(d, [])
            first = sources[0] if sources else None
            if first is not None and not (len(first) == 1 and first[0].repeat == 1):
                layout = first  # several blocks (or repeated channels): pass the layout on
            else:
                layout = self._atom(node, d, size)
            for source in sources:
                self._unify(layout, source, node)
            out.append(layout)
        self.layouts[node] = tuple(out)
        if reason:
            self.fix(out, reason)
        return self.layouts[node]

    def shape(self, node: Node) -> tuple[int, ...]:
        return tuple(_tensor_meta(node).shape)

    def normalizes(self, layout: Layout, node: Node, kind: str, dim: int, layer: str = "", op: str = "") -> None:
        """`node` computes statistics across the channels of `layout` (dim `dim` of its input)."""
        offset = 0
        for seg in layout:
            key = ("norm", node.name, dim, offset)
            self._add(key, kind="norm", norm=Normalizer(node.name, kind, layer, op or _describe_in(node, self.gm), dim,
                                                        offset, seg.repeat), label=f"{node.name}[{dim}]@{offset}")
            self.graph.add_edge(key, seg.atom, op=node.name)
            offset += seg.size * seg.repeat

    def whole_groups(self, a: Layout, b: Layout | None, groups: int, node: Node, what: str) -> None:
        """The channels of `a` (and of `b`, which `node` maps group to group) move in whole
        groups of `groups` equal parts: a grouped conv's input and output, a GroupNorm's."""
        layouts = [a] if b is None else [a, b]
        if any(len(lay) != 1 or lay[0].repeat != 1 for lay in layouts):
            self.fix(layouts, f"{what} over concatenated or flattened channels")
            return
        for lay in layouts:
            self.graph.nodes[lay[0].atom].setdefault("groups", []).append((groups, what))
        if b is not None:
            self.graph.add_edge(a[0].atom, b[0].atom, op=node.name, groups=groups)

    def read_as(self, param: Node, layout: Layout, node: Node) -> None:
        """The 1-d parameter that get_attr `param` reads (a norm's weight, read by `node`
        only) indexes the blocks of `layout`: its slices follow them block by block, as a
        layer's parameters do (`use`), instead of being one block of its own."""
        own = self.layouts[param][0]
        if len(self.layouts[param]) != 1 or len(param.users) != 1 or len(own) != 1:
            return self._unify(own, layout, node)
        atom = own[0].atom
        for key in [k for k in self.graph.neighbors(atom) if k[0] == "param"]:
            self.graph.remove_node(key)
        owner, _, name = param.target.rpartition(".")
        self.use(layout, (owner, name), 0, node)

    def refine(self, x: Node, dim: int, pieces: int, node: Node) -> list[Layout] | None:
        """Dim `dim` of `x` is cut by `node` into `pieces` equal blocks: when it is one plain
        block (repeat 1) that only parameter slices hold (a layer's output, whole along the
        parameters' dims), each piece becomes a block of its own and each slice one slice per
        piece, so the pieces' channels are followed apart. None where it is not so."""
        layout = self.layouts[x][dim]
        if len(layout) != 1 or layout[0].repeat != 1 or layout[0].size % pieces:
            return None
        atom = layout[0].atom
        data = self.graph.nodes[atom]
        near = list(self.graph.neighbors(atom))
        plain = {"kind", "node", "dim", "size", "reasons", "label", "order", "producer"}
        if not near or set(data) - plain or any(
                k[0] != "param" or self.graph.degree(k) != 1  # a slice another block holds too (tied)
                or (self.graph.nodes[k]["use"].offset, self.graph.nodes[k]["use"].repeat) != (0, 1) for k in near):
            return None
        size = layout[0].size // pieces
        blocks = []
        for i in range(pieces):
            key = ("tensor", f"{x.name}.{i}", dim)
            self._add(key, kind="tensor", node=x.name, dim=dim, size=size, reasons=list(data["reasons"]),
                      label=f"{x.name}[{dim}]@{i * size}")
            if "producer" in data:
                self.graph.nodes[key]["producer"] = data["producer"]
            blocks.append((_Segment(key, size),))
        composite = tuple(seg for block in blocks for seg in block)
        uses = [(self.graph.nodes[k]["use"], self.graph.edges[k, atom]["op"]) for k in near]
        self.graph.remove_nodes_from(near + [atom])
        ops = {n.name: n for n in self.gm.graph.nodes}
        for use, op in uses:
            self.use(composite, (use.layer, use.param), use.dim, ops[op])
        self.layouts[x] = tuple(composite if d == dim else lay for d, lay in enumerate(self.layouts[x]))
        return blocks

    def size_use(self, layout: Layout, node: Node, arg: int, item: int | None, size: int) -> None:
        """Literal `size` (argument `arg` of `node`, element `item`) sizes a dim of `layout`."""
        offset = 0
        for seg in layout:
            key = ("size", node.name, arg, item, offset)
            self._add(key, kind="size", size_use=SizeUse(node.name, arg, item, size, offset, seg.repeat),
                      label=f"{node.name}.args[{arg}]" + ("" if item is None else f"[{item}]") + f"@{offset}")
            self.graph.add_edge(key, seg.atom, op=node.name)
            offset += seg.size * seg.repeat

    def literal_size(self, layout: Layout, node: Node, arg: int | None, item: int | None, size) -> None:
        """A size argument that is a literal: followed (a `SizeUse`) or fixing the channels."""
        if not isinstance(size, int) or size <= 1:
            return
        if self.follow_sizes and arg is not None:
            self.size_use(layout, node, arg, item, size)
        else:
            self.fix([layout], f"{node.name} hard-codes a size of {size}")

    def attention_dim(self, layout: Layout) -> None:
        """`layout` is the head dim of an attention (its channels are heads)."""
        for seg in layout:
            self.graph.nodes[seg.atom]["attention"] = True

    def block(self, node: Node, name: str, size: int) -> Layout:
        """A new block of `size` channels that `node` computes besides its output's dims (a
        layer's inner channels, or a dim of a second output)."""
        key = ("tensor", f"{node.name}.{name}", 0)
        self._add(key, kind="tensor", node=node.name, dim=0, size=size, reasons=[], label=f"{node.name}.{name}")
        return (_Segment(key, size),)

    def heads_block(self, node: Node, name: str, channels: int, heads: int, what: str) -> tuple[Layout, Layout]:
        """A new block of `channels` channels that an attention inside `node` reads as `heads`
        heads of channels / heads (nn.MultiheadAttention's q|k|v), and the block of its heads:
        one group in units of a head, as a head split (`_split_blocks`) makes it."""
        layout, per_head = self.block(node, name, channels), self.block(node, f"{name}.heads", heads)
        self.attention_dim(per_head)
        self.graph.nodes[per_head[0].atom]["block"] = channels // heads
        self.whole_groups(layout, per_head, heads, node, what)
        return layout, per_head

    def produces(self, layout: Layout, path: str) -> None:
        """Layer `path`'s outputs define these channels (the group names it as a producer)."""
        self.graph.nodes[layout[0].atom]["producer"] = path

    def _inputs(self, node: Node) -> list[Node]:
        return [n for n in node.all_input_nodes if n in self.layouts]

    # --- rules ---
    def visit(self, node: Node, layer: LayerCall | None) -> None:
        if node.op == "placeholder":
            if _tensor_meta(node) is not None:
                self.output(node, {}, "model input")
        elif node.op == "output":
            for source in self._inputs(node):
                self.fix(self.layouts[source], "model output")
        elif node.op == "get_attr":
            self._get_attr(node)
        elif layer is not None:
            self._layer(node, layer)
        elif not _holds_tensor(node.meta.get("tensor_meta")):
            pass  # x.size(), x.dim(), asserts: no tensor, so no channels flow through
        else:
            rule = self._rule(node)
            single = _tensor_meta(node) is not None  # else several tensors: a rule that says it splits
            if rule is None or not (single or getattr(rule, "splits", False)) or rule(self, node) is False:
                self._unknown(node, f"unknown op {_describe(node, self.gm)}")

    def _rule(self, node: Node) -> Rule | None:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            # A module may declare itself channel-wise identity (e.g. sorted slicing's depth
            # gates): its output carries its inputs' channels unchanged.
            if getattr(module, "channel_pointwise", False):
                return Coupling._pointwise
            rule = next((rule for cls, rule in _MODULE_RULES if isinstance(module, cls)), None)
            if rule is None and any(_qualified_name(c) in _POINTWISE_MODULES_BY_NAME for c in type(module).__mro__):
                return Coupling._pointwise
            return rule
        if node.op == "call_method":
            return _METHOD_RULES.get(node.target)
        rule = _FUNCTION_RULES.get(node.target)
        if rule is None and _qualified_name(node.target) in _POINTWISE_BY_NAME:
            return Coupling._pointwise
        return rule

    def _unknown(self, node: Node, reason: str) -> None:
        for source in self._inputs(node):
            self.fix(self.layouts[source], reason)
        if _tensor_meta(node) is not None:
            self.output(node, {}, reason)

    def _get_attr(self, node: Node) -> None:
        if _tensor_meta(node) is None:
            return
        owner, _, name = node.target.rpartition(".")
        for d, layout in enumerate(self.output(node, {})):
            self.use(layout, (owner, name), d, node)

    def _layer(self, node: Node, call: LayerCall) -> None:
        if call.x not in self.layouts or not _holds_tensor(node.meta.get("tensor_meta")):
            return self._unknown(node, f"unknown op {_describe(node, self.gm)}")
        call.kind.couple(self, call)

    def _pointwise(self, node: Node, first_only: bool = False, inputs: list[Node] | None = None) -> bool | None:
        """Elementwise with broadcasting: output dims equal the right-aligned input dims of
        the same size (a size-1 input dim that broadcasts couples nothing). `inputs`: the
        tensor operands (default: every input node, or the first)."""
        shape = _tensor_meta(node).shape
        if inputs is None:
            inputs = node.all_input_nodes[: 1 if first_only else None]
        if not all(n in self.layouts for n in inputs):
            return False
        coupled: dict[int, list[Layout]] = {}
        for n in inputs:
            in_shape = _tensor_meta(n).shape
            for k, size in enumerate(in_shape):
                d = len(shape) - len(in_shape) + k
                if d >= 0 and size == shape[d]:
                    coupled.setdefault(d, []).append(self.layouts[n][k])
        self.output(node, coupled)

    def _prelu(self, node: Node) -> bool | None:
        xin = self.layouts.get(node.args[0])
        if xin is None:
            return False
        out = self.output(node, {d: [layout] for d, layout in enumerate(xin)})
        if self.gm.get_submodule(node.target).num_parameters > 1:  # one slope per channel
            self.use(out[1 if len(out) > 1 else 0], (node.target, "weight"), 0, node)

    def _spatial(self, node: Node, k: int) -> bool | None:
        xin = self.layouts.get(node.args[0])
        if xin is None:
            return False
        self.output(node, {d: [xin[d]] for d in range(len(xin) - k)})

    def _pad(self, node: Node) -> bool | None:
        xin, pad, padded = self.layouts.get(node.args[0]), argument(node, 1, "pad"), set()
        if xin is None or not isinstance(pad, (list, tuple)):
            return False
        for i in range(len(pad) // 2):
            if pad[2 * i] != 0 or pad[2 * i + 1] != 0:
                padded.add(len(xin) - 1 - i)
        reason = f"pad {node.name} changes the size of a dim"
        self.fix([xin[d] for d in padded], reason)
        out = self.output(node, {d: [xin[d]] for d in range(len(xin)) if d not in padded})
        self.fix([out[d] for d in padded], reason)

    def _sizes(self, node: Node, out: tuple[Layout, ...], sizes: list | None) -> None:
        """The sizes a reshape or expand was asked for, per output dim, each (value, argument
        position, element) or None: a size read from another tensor (`x.shape[1]`,
        `x.size(1)`) couples that tensor's dim; a literal is a size use (`literal_size`)."""
        if sizes is None or len(sizes) != len(out):
            return
        for d, entry in enumerate(sizes):
            if entry is None:
                continue
            size, arg, item = entry
            source = _size_source(size)
            if source is not None and source[0] in self.layouts and source[1] < len(self.layouts[source[0]]):
                self._unify(out[d], self.layouts[source[0]][source[1]], node)
            elif isinstance(size, Node):  # computed (C // heads): a cut would change it unfollowed
                reason = f"{node.name} computes a size ({size.name}) from sizes the analysis does not follow"
                self.fix([out[d]] + [self.layouts[t][i] for t, i in _size_reads(size) if t in self.layouts], reason)
            else:
                self.literal_size(out[d], node, arg, item, size)

    def _reshape(self, node: Node, sizes: list | None = None) -> bool | None:
        """`sizes`: the requested sizes as `_sizes` takes them (default: read from a torch
        call); None where the sizes are not graph arguments (flatten, nn.Unflatten)."""
        x = node.args[0]
        if x not in self.layouts:
            return False
        sizes = _requested_sizes(node) if sizes is None else sizes
        xin, a, b = self.layouts[x], _tensor_meta(x).shape, _tensor_meta(node).shape
        coupled, fixed_out, splits = {}, [], []
        for run_a, run_b in _reshape_groups(a, b):
            ins = [d for d in run_a if a[d] != 1]
            outs = [d for d in run_b if b[d] != 1]
            if not ins or not outs:
                continue
            if len(outs) == 1:
                # the first dim of the run carries the channels, each repeated over the rest;
                # channels of the inner dims land at a stride we do not follow
                inner = math.prod(a[d] for d in ins[1:])
                self.fix([xin[d] for d in ins[1:]], f"flattened into an inner position by {node.name}")
                coupled[outs[0]] = [tuple(_Segment(s.atom, s.size, s.repeat * inner) for s in xin[ins[0]])]
            else:
                inner = math.prod(b[d] for d in outs[1:])
                if len(ins) == 1 and all(s.repeat % inner == 0 for s in xin[ins[0]]):
                    # undoing a flatten: the repeated channels become the leading dim again
                    coupled[outs[0]] = [tuple(_Segment(s.atom, s.size, s.repeat // inner) for s in xin[ins[0]])]
                elif len(ins) == 1 and len(xin[ins[0]]) == 1 and xin[ins[0]][0].repeat == 1:
                    splits.append((ins[0], outs, inner))  # blocks of `inner` channels: heads
                else:
                    self.fix([xin[d] for d in ins], f"reshape {node.name} splits channels")
                    fixed_out += outs
        out = self.output(node, coupled)
        self.fix([out[d] for d in fixed_out], f"reshape {node.name} splits channels")
        for d, outs, inner in splits:
            self._split_blocks(node, xin[d], out, outs, inner, sizes is not None)
        self._sizes(node, out, sizes)

    def _split_blocks(self, node: Node, source: Layout, out: tuple[Layout, ...], outs: list[int], inner: int,
                      sized: bool) -> None:
        """A reshape splits C channels into (C / inner, inner, ...): the attention head split
        (H, head_dim). The outer dim's channels are whole blocks of `inner` source channels
        (one group, in units of `inner`); the channels within a block stay fixed."""
        outer = out[outs[0]]
        if not sized:  # sizes held by a module (nn.Unflatten): nothing to rewrite
            self.fix([source, outer], f"{_describe(node, self.gm)} splits channels into blocks by sizes it "
                                      "holds itself: a cut could not follow them")
            return
        self.whole_groups(source, outer, outer[0].size, node, f"{node.name} splits channels into blocks of {inner}")
        self.graph.nodes[outer[0].atom]["block"] = inner
        self.fix([out[d] for d in outs[1:]], f"{node.name} splits channels into blocks of {inner} (a head's "
                                             f"head_dim): the channels within a block are not cut")

    def _permute(self, node: Node) -> bool | None:
        xin = self.layouts.get(node.args[0])
        if xin is None:
            return False
        ndim = len(xin)
        perm = list(range(ndim))
        if node.target in ("permute", torch.permute):
            dims = node.args[1:] if node.op == "call_method" else [argument(node, 1, "dims")]
            perm = _dims(dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims), ndim)
        elif node.target in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
            d0, d1 = _dims([argument(node, 1, "dim0"), argument(node, 2, "dim1")], ndim)
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif ndim == 2:  # t()
            perm = [1, 0]
        self.output(node, {d: [xin[p]] for d, p in enumerate(perm)})

    def _reduce(self, node: Node) -> bool | None:
        xin = self.layouts.get(node.args[0])
        dim = argument(node, 1, "dim")
        if xin is None or not isinstance(dim, (int, list, tuple, type(None))):
            return False
        reduced = set(range(len(xin))) if dim is None else set(_dims(dim, len(xin)))
        for d in sorted(reduced):
            self.normalizes(xin[d], node, "reduce", d)
        if dim is None:
            self.output(node, {})  # a full reduction keeps no dim
            return None
        keepdim = len(_tensor_meta(node).shape) == len(xin)  # read from the shapes: var's arguments differ
        kept = [d for d in range(len(xin)) if keepdim or d not in reduced]
        self.output(node, {o: [xin[d]] for o, d in enumerate(kept) if d not in reduced})

    def _along_dim(self, node: Node) -> bool | None:
        """softmax / log_softmax / normalize: elementwise in shape, statistics along `dim`."""
        xin = self.layouts.get(node.args[0])
        if xin is None:
            return False
        if node.op == "call_module":
            dim = getattr(self.gm.get_submodule(node.target), "dim", None)
        else:
            default = 1 if node.target is F.normalize else None
            dim = argument(node, 2 if node.target is F.normalize else 1, "dim", default)
        if dim is None:  # softmax's legacy implicit dim
            dim = 0 if len(xin) in (0, 1, 3) else 1
        if not isinstance(dim, int):
            return False
        self.normalizes(xin[dim % len(xin)], node, "reduce", dim % len(xin))
        return self._pointwise(node, first_only=True)

    def _join(self, node: Node) -> bool | None:
        """`cat` puts the inputs' blocks side by side along `dim`; `stack` adds a new dim."""
        tensors = argument(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or not all(t in self.layouts for t in tensors):
            return False
        ndim = len(_tensor_meta(node).shape)
        dim = _dims(argument(node, 1, "dim", 0), ndim)[0]
        if node.target is torch.stack:
            self.output(node, {d: [self.layouts[t][d - (d > dim)] for t in tensors] for d in range(ndim) if d != dim})
            return None
        coupled = {d: [self.layouts[t][d] for t in tensors] for d in range(ndim) if d != dim}
        coupled[dim] = [tuple(seg for t in tensors for seg in self.layouts[t][dim])]
        self.output(node, coupled)

    def _matmul(self, node: Node) -> bool | None:
        operands = [n for n in node.args[:2] if isinstance(n, Node) and n in self.layouts]
        if len(operands) != 2 or min(len(self.layouts[n]) for n in operands) < 2:
            return False
        a, b = (self.layouts[n] for n in operands)
        self._unify(a[-1], b[-2], node)  # the contracted dim: same channels on both sides
        self.normalizes(a[-1], node, "contract", len(a) - 1)
        shape = _tensor_meta(node).shape
        ndim = len(shape)
        coupled = {ndim - 2: [a[-2]], ndim - 1: [b[-1]]}
        for n, layout in zip(operands, (a, b)):
            batch = _tensor_meta(n).shape[:-2]
            for k, size in enumerate(batch):
                d = ndim - 2 - len(batch) + k
                if size == shape[d]:
                    coupled.setdefault(d, []).append(layout[k])
                if d == ndim - 3:  # softmax(q @ k^T) @ v over [.., heads, tokens, head_dim]
                    self.attention_dim(layout[k])
        self.output(node, coupled)

    def _attention(self, node: Node) -> bool | None:
        """scaled_dot_product_attention(q [.., Hq, L, D], k [.., Hkv, S, D], v [.., Hkv, S, Dv],
        attn_mask broadcasting to [.., Hq, L, S]) -> [.., Hq, L, Dv]: q and k contract D; the
        output's heads and batch dims are q's, its last dim v's. Grouped-query attention
        (`enable_gqa`, Hq = r * Hkv): query head j reads kv head j // r, so a kv head and its
        r query heads move as one unit."""
        q, k, v = (argument(node, i, name) for i, name in enumerate(("query", "key", "value")))
        if not all(t in self.layouts for t in (q, k, v)):
            return False
        lq, lk, lv = (self.layouts[t] for t in (q, k, v))
        shape = self.shape(node)
        ndim = len(shape)
        if min(len(lq), len(lk), len(lv)) < 3 or len(lq) != ndim:
            return False
        self._unify(lq[-1], lk[-1], node)
        self.normalizes(lq[-1], node, "contract", len(lq) - 1)
        self._unify(lk[-2], lv[-2], node)
        coupled: dict[int, list[Layout]] = {ndim - 2: [lq[-2]], ndim - 1: [lv[-1]]}
        for t, layout in ((q, lq), (k, lk), (v, lv)):
            t_shape = self.shape(t)
            for j in range(len(t_shape) - 2):
                d = ndim - len(t_shape) + j
                if d >= 0 and t_shape[j] == shape[d]:
                    coupled.setdefault(d, []).append(layout[j])
        hq, hkv = shape[-3], self.shape(k)[-3]
        if hq != hkv:
            if not (argument(node, 7, "enable_gqa", False) and hkv > 0 and hq % hkv == 0):
                return False
            self._unify(lk[-3], lv[-3], node)
            self.whole_groups(lq[-3], lk[-3], hkv, node, f"{node.name}: grouped-query attention")
        mask = argument(node, 3, "attn_mask")
        if isinstance(mask, Node) and mask in self.layouts:
            scores = (*shape[:-1], self.shape(k)[-2])  # [.., Hq, L, S]: what the mask broadcasts to
            for j, size in enumerate(self.shape(mask)):
                d = ndim - len(self.shape(mask)) + j
                if d < 0 or size == 1 or size != scores[d]:
                    continue
                if d == ndim - 1:  # the keys
                    self._unify(self.layouts[mask][j], lk[-2], node)
                else:
                    coupled.setdefault(d, []).append(self.layouts[mask][j])
        out = self.output(node, coupled)
        for layout in (lq[-3], lk[-3], lv[-3], out[-3]):
            self.attention_dim(layout)

    def _getitem(self, node: Node) -> bool | None:
        x, index = node.args
        if x in self.pieces and isinstance(index, int):  # one output of a split
            piece = self.pieces[x][index]
            out = self.output(node, {d: [layout] for d, layout in enumerate(piece) if not isinstance(layout, str)})
            for d, layout in enumerate(piece):
                if isinstance(layout, str):
                    self.fix([out[d]], layout)
            return None
        if x not in self.layouts:  # an element of a tuple some unknown op returned
            self._unknown(node, f"unknown op {_describe(x, self.gm)}" if isinstance(x, Node) else "unknown op getitem")
            return None
        xin = self.layouts[x]
        index = index if isinstance(index, tuple) else (index,)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index):
            return False
        consumed = sum(isinstance(i, (int, slice)) for i in index)
        if Ellipsis not in index:
            index = index + (Ellipsis,)
        coupled, fixed_out, d_in, d_out = {}, [], 0, 0
        reason = f"indexing {node.name} selects channels"
        shape = _tensor_meta(node).shape
        for i in index:
            if i is Ellipsis:
                for _ in range(len(xin) - consumed):
                    coupled[d_out] = [xin[d_in]]
                    d_in, d_out = d_in + 1, d_out + 1
            elif i is None:
                d_out += 1
            elif isinstance(i, int):
                self.fix([xin[d_in]], reason)
                d_in += 1
            else:
                if i.step in (None, 1) and shape[d_out] == _tensor_meta(x).shape[d_in]:  # whole dim
                    coupled[d_out] = [xin[d_in]]
                else:
                    self.fix([xin[d_in]], reason)
                    fixed_out.append(d_out)
                d_in, d_out = d_in + 1, d_out + 1
        out = self.output(node, coupled)
        self.fix([out[d] for d in fixed_out], reason)

    # --- after the walk ---
    def check(self) -> None:
        """Mark fixed what the walk got inconsistent: blocks of different sizes holding the
        same channels, or parameter slices that overlap or leave gaps along a dim. Give every
        block its `unit` (channels that move as one: 1, or whole conv groups)."""
        same = nx.Graph()  # "same channels" edges only: a grouped conv's edge maps groups, not channels
        same.add_nodes_from(self.graph)
        same.add_edges_from((a, b) for a, b, data in self.graph.edges(data=True) if "groups" not in data)
        subs = [sorted((k for k in c if k[0] == "tensor"), key=lambda k: self.graph.nodes[k]["order"])
                for c in nx.connected_components(same)]
        subs = [atoms for atoms in subs if atoms]
        counts, sub_of = [], {}
        for i, atoms in enumerate(subs):
            sizes = sorted({self.graph.nodes[k]["size"] for k in atoms})
            if len(sizes) > 1:
                self._fix_atoms(atoms[:1], f"inconsistent channel counts {sizes}")
            parts = [g for k in atoms for g, _ in self.graph.nodes[k].get("groups", [])]
            counts.append(math.gcd(*sizes, *parts))
            sub_of.update((k, i) for k in atoms)
        links = [(sub_of[a], sub_of[b]) for a, b, data in self.graph.edges(data=True) if "groups" in data]
        changed = True
        while changed:  # a grouped conv's input and output hold the same number of units
            changed = False
            for a, b in links:
                n = math.gcd(counts[a], counts[b])
                if (counts[a], counts[b]) != (n, n):
                    counts[a] = counts[b] = n
                    changed = True
        for i, atoms in enumerate(subs):
            for k in atoms:
                self.graph.nodes[k]["unit"] = max(1, self.graph.nodes[k]["size"] // max(counts[i], 1))
        spans: dict[tuple[str, str, int], list[tuple[int, int, tuple]]] = {}
        for key, data in self.graph.nodes(data=True):
            if data["kind"] == "param":
                use, atom = data["use"], next(iter(self.graph.neighbors(key)))
                end = use.offset + self.graph.nodes[atom]["size"] * use.repeat
                spans.setdefault((use.layer, use.param, use.dim), []).append((use.offset, end, atom))
        for (layer, param, dim), found in spans.items():
            found.sort()
            length = self._param_length(layer, param, dim)
            covered = [0] + [end for _, end, _ in found]
            starts = [start for start, _, _ in found] + [length if length is not None else covered[-1]]
            if starts != covered:
                reason = f"parameter slices of {layer}.{param} along dim {dim} overlap or leave gaps"
                self._fix_atoms([atom for _, _, atom in found], reason)

    def _param_length(self, layer: str, param: str, dim: int) -> int | None:
        try:
            value = self.gm.get_submodule(layer) if layer else self.gm
            value = getattr(value, param)
        except AttributeError:
            return None
        return value.shape[dim] if isinstance(value, torch.Tensor) and value.dim() > dim else None


# --- which rule follows which op -------------------------------------------------------------

Rule = Callable[[Coupling, Node], "bool | None"]  # returns False when it cannot follow the node
_FUNCTION_RULES: dict[Callable, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
_MODULE_RULES: list[tuple[type, Rule]] = []  # newest first, matched with isinstance


def register_coupling_rule(target: Callable | str | type, rule: Rule) -> None:
    """Say how channels flow through an op that has no parameters: `target` is a function
    (call_function), a Tensor method name (call_method) or a module class (call_module).
    Layers with parameters are layer kinds instead (`fxgrow.layers.register_layer_kind`)."""
    if isinstance(target, str):
        _METHOD_RULES[target] = rule
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES.insert(0, (target, rule))
    else:
        _FUNCTION_RULES[target] = rule


def _spatial(k: int) -> Rule:
    return lambda c, node: c._spatial(node, k)


def _resample(c: Coupling, node: Node) -> bool | None:  # interpolate/upsample: every dim after the first two
    return c._spatial(node, len(_tensor_meta(node).shape) - 2)


def _pointwise_self(c: Coupling, node: Node) -> bool | None:
    if c._pointwise(node, first_only=True) is False:
        return False
    if node.op == "call_method" and node.target == "expand":

        c._sizes(node, c.layouts[node], _requested_sizes(node))
    return None


def _requested_sizes(node: Node) -> list | None:
    """The sizes a view/reshape/expand/unflatten call asks for, one entry per output dim:
    (value, argument position, element in it) or None (a dim it does not size); None for
    flatten and friends. A keyword argument has no position (None): it cannot be rewritten."""
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            return [(size, 1, i) for i, size in enumerate(node.args[1])]
        return [(size, 1 + i, None) for i, size in enumerate(node.args[1:])]
    if node.op == "call_function" and node.target is torch.reshape:
        sizes, arg = argument(node, 1, "shape"), (1 if len(node.args) > 1 else None)
        return [(size, arg, i) for i, size in enumerate(sizes)] if isinstance(sizes, (list, tuple)) else None
    if (node.op, node.target) in (("call_method", "unflatten"), ("call_function", torch.unflatten)):
        dim, sizes = argument(node, 1, "dim"), argument(node, 2, "sizes")
        arg = 2 if len(node.args) > 2 else None
        if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
            return None
        out = [None] * len(_tensor_meta(node).shape)
        start = dim % len(_tensor_meta(node.args[0]).shape)
        for i, size in enumerate(sizes):
            out[start + i] = (size, arg, i)
        return out
    return None


def _size_source(size) -> tuple[Node, int] | None:
    """(tensor, dim) when `size` is read from a tensor's shape: `x.shape[d]`, `x.size(d)`,
    `x.size()[d]`."""
    if not isinstance(size, Node) or size.op not in ("call_function", "call_method"):
        return None
    tensor, dim = None, None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2 and isinstance(size.args[1], int):
        tensor, dim = size.args
    elif size.op == "call_function" and size.target is torch.ops.aten.sym_size.int:  # exported graphs
        tensor, dim = size.args
    elif size.op == "call_function" and size.target is operator.getitem and isinstance(size.args[1], int):
        shape = size.args[0]
        if isinstance(shape, Node) and ((shape.op == "call_function" and shape.target is getattr
                                         and shape.args[1] == "shape")
                                        or (shape.op == "call_method" and shape.target == "size"
                                            and len(shape.args) == 1)):
            tensor, dim = shape.args[0], size.args[1]
    meta = _tensor_meta(tensor)
    return (tensor, dim % len(meta.shape)) if meta is not None and meta.shape else None


def _size_reads(size: Node) -> list[tuple[Node, int]]:
    """The (tensor, dim) sizes a computed size is made of (`x.size(2) // 4` reads x's dim 2)."""
    found, stack, seen = [], [size], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        source = _size_source(n)
        if source is not None:
            found.append(source)
        elif _tensor_meta(n) is None:  # arithmetic on sizes: read on; a tensor input ends the walk
            stack.extend(n.all_input_nodes)
    return found


for _targets, _rule_fn in (
    (_POINTWISE_FUNCTIONS | _POINTWISE_METHODS_ALL_ARGS | set(_POINTWISE_MODULES), Coupling._pointwise),
    (_POINTWISE_METHODS_SELF, _pointwise_self),
    ({nn.Flatten, nn.Unflatten} | _RESHAPE_FUNCTIONS | _RESHAPE_METHODS, Coupling._reshape),
    ({nn.PReLU}, Coupling._prelu),
    ({nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate}, _resample),
    ({F.pad}, Coupling._pad),
    ({"permute", "transpose", "swapaxes", "t", torch.permute, torch.transpose, torch.swapaxes, torch.t},
     Coupling._permute),
    (_REDUCE_FUNCTIONS | _REDUCE_METHODS, Coupling._reduce),
    (_ALONG_DIM_FUNCTIONS | _ALONG_DIM_METHODS | {nn.Softmax, nn.LogSoftmax}, Coupling._along_dim),
    (_JOIN_FUNCTIONS, Coupling._join),
    (_MATMUL_FUNCTIONS | {"matmul", "bmm", "mm"}, Coupling._matmul),
    ({F.scaled_dot_product_attention}, Coupling._attention),
    ({operator.getitem}, Coupling._getitem),
):
    for _target in _targets:
        register_coupling_rule(_target, _rule_fn)
for _fn, _k in _SPATIAL_FUNCTIONS.items():
    register_coupling_rule(_fn, _spatial(_k))
for _cls, _k in _SPATIAL_MODULES:
    register_coupling_rule(_cls, _spatial(_k))

_MAX_REASONS = 3

from ..frontends import aten_coupling  # noqa: E402,F401  (registers the rules of exported graphs' aten ops)


# Functional layers whose parameters may be cut or masked where they are read: norms without
# running statistics (a cut running mean would be a copy the in-place update never reaches).
READ_BY_NORMS = {"layer_norm", "rms_norm", "group_norm"}


def param_key(layer: str, param: str) -> str:
    """"owner.param", or "param" for a parameter of the model itself (a ViT's cls_token)."""
    return f"{layer}.{param}" if layer else param


def parameter_reads(gm: GraphModule) -> dict[str, str]:
    """Parameters and buffers the graph reads with get_attr outside weight chains (the model's
    own cls_token, a layer scale, a functional norm's weight), each with why it cannot be cut
    or masked where it is read, "" when it can: it feeds ops without parameters, or a norm
    without running statistics."""
    heads = {n for n in gm.graph.nodes if (n.meta.get("fxgrow") or {}).get("role") == "param"}
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node in heads:
            continue
        why = ""
        for user in node.users:
            call = layer_call(user, gm)
            if call is not None and node in call.operands.values() and call.kind.name not in READ_BY_NORMS:
                why = f"{node.target} is read by {call.kind.name} '{call.path}', which is not a targeted layer"
        found[node.target] = found.get(node.target) or why
    return found


def coupling_graph(gm: GraphModule, follow_sizes: bool = False) -> nx.Graph:
    """The raw coupling graph: ("tensor", node, dim) blocks of channels and ("param", layer,
    param, dim, offset, repeat) slices; edges mean "same channel count and order". Node data:
    kind, size, reasons (why fixed), producer, label; param nodes hold their `ChannelUse`.
    `follow_sizes`: literal sizes of channel dims are ("size", ...) nodes instead of fixing."""
    nodes = list(gm.graph.nodes)
    if not any(_tensor_meta(n) is not None for n in nodes):
        raise ValueError("coupling analysis needs shapes: run "
                         "torch.fx.passes.shape_prop.ShapeProp(gm).propagate(example) first")
    layers = {n: call for n in nodes if (call := layer_call(n, gm)) is not None}
    chains = _weight_chains(nodes, layers)
    builder = Coupling(gm, follow_sizes)
    for node in nodes:
        if node not in chains:
            builder.visit(node, layers.get(node))
    builder.check()
    return builder.graph


def channel_groups(gm: GraphModule, follow_sizes: bool = False) -> list[ChannelGroup]:
    """The channel groups of `gm` (after ShapeProp), in graph order. With `follow_sizes`, a
    literal that sizes a group's dim (`view(B, T, 4, 16)`) is one of its `size_uses` instead
    of fixing it: only for a caller that rewrites those literals (sorted slicing's
    `follow_sizes`); growth and filter pruning leave such groups fixed."""
    graph = coupling_graph(gm, follow_sizes)
    order = lambda k: graph.nodes[k]["order"]  # noqa: E731
    components = [sorted(c, key=order) for c in nx.connected_components(graph)]
    components = sorted((c for c in components if any(k[0] == "param" for k in c)), key=lambda c: order(c[0]))
    groups = []
    for component in components:
        atoms = [graph.nodes[k] for k in component if k[0] == "tensor"]
        producers = list(dict.fromkeys(a["producer"] for a in atoms if "producer" in a))
        reasons = list(dict.fromkeys(r for a in atoms for r in a["reasons"]))
        if not producers and not reasons:
            reasons = ["no producing layer"]  # a spatial or token dim, not channels
        if len(reasons) > _MAX_REASONS:
            reasons = reasons[:_MAX_REASONS] + [f"and {len(reasons) - _MAX_REASONS} more"]

        def unit(key: tuple) -> int:  # a use's unit: its block's (whole conv groups, or 1)
            return graph.nodes[next(iter(graph.neighbors(key)))]["unit"]
        attention = [a for a in atoms if a.get("attention")]
        blocks = [a["block"] for a in atoms if "block" in a]
        heads = bool(attention and blocks)  # split into blocks that an attention reads as heads
        groups.append(ChannelGroup(
            id=len(groups),
            size=atoms[0]["size"] // atoms[0]["unit"],
            uses=[replace(graph.nodes[k]["use"], repeat=graph.nodes[k]["use"].repeat * unit(k))
                  for k in component if k[0] == "param"],
            producers=producers,
            fixed=bool(reasons),
            reason="; ".join(reasons),
            normalizers=[replace(graph.nodes[k]["norm"], repeat=graph.nodes[k]["norm"].repeat * unit(k))
                         for k in component if k[0] == "norm"],
            heads=heads,
            head_dim=min(blocks) if heads else 0,
            heads_per_unit=max(a["unit"] for a in attention) if heads else 1,
            size_uses=[replace(graph.nodes[k]["size_use"], repeat=graph.nodes[k]["size_use"].repeat * unit(k))
                       for k in component if k[0] == "size"],
        ))
    return groups
