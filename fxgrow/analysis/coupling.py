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

    def __init__(self, gm: GraphModule):
        self.gm = gm
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
        else:
            self.fix((a, b), f"cannot align channel blocks at {node.name}")

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
            if rule is None or _tensor_meta(node) is None or rule(self, node) is False:
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
        if call.x not in self.layouts or _tensor_meta(node) is None:
            return self._unknown(node, f"unknown op {_describe(node, self.gm)}")
        call.kind.couple(self, call)

    def _pointwise(self, node: Node, first_only: bool = False) -> bool | None:
        """Elementwise with broadcasting: output dims equal the right-aligned input dims of
        the same size (a size-1 input dim that broadcasts couples nothing)."""
        shape = _tensor_meta(node).shape
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
        """The sizes a reshape or expand was asked for, per output dim: a size read from another
        tensor (`x.shape[1]`, `x.size(1)`) couples that tensor's dim; a literal channel count
        cannot follow a resized group, so its channels are fixed."""
        if sizes is None or len(sizes) != len(out):
            return
        for d, size in enumerate(sizes):
            source = _size_source(size)
            if source is not None and source[0] in self.layouts and source[1] < len(self.layouts[source[0]]):
                self._unify(out[d], self.layouts[source[0]][source[1]], node)
            elif isinstance(size, int) and size > 1:
                self.fix([out[d]], f"{node.name} hard-codes a size of {size}")

    def _reshape(self, node: Node) -> bool | None:
        x = node.args[0]
        if x not in self.layouts:
            return False
        xin, a, b = self.layouts[x], _tensor_meta(x).shape, _tensor_meta(node).shape
        coupled, fixed_out = {}, []
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
                else:
                    self.fix([xin[d] for d in ins], f"reshape {node.name} splits channels")
                    fixed_out += outs
        out = self.output(node, coupled)
        self.fix([out[d] for d in fixed_out], f"reshape {node.name} splits channels")
        self._sizes(node, out, _requested_sizes(node))

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
        self.output(node, coupled)

    def _getitem(self, node: Node) -> bool | None:
        x, index = node.args
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
    """The sizes a view/reshape/expand call asks for (None for flatten and friends)."""
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        sizes = list(node.args[1:])
    elif node.op == "call_function" and node.target is torch.reshape:
        sizes = argument(node, 1, "shape")
    else:
        return None
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    return list(sizes) if isinstance(sizes, (list, tuple)) else None


def _size_source(size) -> tuple[Node, int] | None:
    """(tensor, dim) when `size` is read from a tensor's shape: `x.shape[d]`, `x.size(d)`,
    `x.size()[d]`."""
    if not isinstance(size, Node) or size.op not in ("call_function", "call_method"):
        return None
    tensor, dim = None, None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2 and isinstance(size.args[1], int):
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
    ({operator.getitem}, Coupling._getitem),
):
    for _target in _targets:
        register_coupling_rule(_target, _rule_fn)
for _fn, _k in _SPATIAL_FUNCTIONS.items():
    register_coupling_rule(_fn, _spatial(_k))
for _cls, _k in _SPATIAL_MODULES:
    register_coupling_rule(_cls, _spatial(_k))

_MAX_REASONS = 3


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


def coupling_graph(gm: GraphModule) -> nx.Graph:
    """The raw coupling graph: ("tensor", node, dim) blocks of channels and ("param", layer,
    param, dim, offset, repeat) slices; edges mean "same channel count and order". Node data:
    kind, size, reasons (why fixed), producer, label; param nodes hold their `ChannelUse`."""
    nodes = list(gm.graph.nodes)
    if not any(_tensor_meta(n) is not None for n in nodes):
        raise ValueError("coupling analysis needs shapes: run "
                         "torch.fx.passes.shape_prop.ShapeProp(gm).propagate(example) first")
    layers = {n: call for n in nodes if (call := layer_call(n, gm)) is not None}
    chains = _weight_chains(nodes, layers)
    builder = Coupling(gm)
    for node in nodes:
        if node not in chains:
            builder.visit(node, layers.get(node))
    builder.check()
    return builder.graph


def channel_groups(gm: GraphModule) -> list[ChannelGroup]:
    """The channel groups of `gm` (after ShapeProp), in graph order."""
    graph = coupling_graph(gm)
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
        ))
    return groups
