"""The layer-kind table: what fxgrow knows about each kind of layer, one entry per kind.

A *layer* is a graph node computing a parameterized op: a `call_module` of a module class
in the table, or a `call_function` of the kind's functional form (`F.conv2d`, ...) whose
tensor operands are weight chains (what `ir.functionalize` writes) or `get_attr`s (a
functional layer the user wrote). `layer_call(node, gm)` reads either form into one
`LayerCall`: the kind, the layer's module path, its input, its parameters by role and its
other arguments by name (`call.options["groups"]`, never `node.args[6]`).

A `LayerKind` entry says, for its kind:
- `modules`, `function`, `signature`, `params`, `defaults`: the module classes, the functional
  form and its arguments after the input (`params` are the tensor operands among them);
- `options(module)`: the functional form's other arguments, read from a module;
- `targetable`: passes may target it: functionalization rewrites it as
  `function(input, *chains, *options)` and fold `rebuild(tensors, options)`s a plain module;
  `refuse(module)` says why one module cannot be written so;
- `couple(coupling, call)`: its channel-coupling rule (see `fxgrow.analysis.coupling`);
- `channel_options(call)`: options that equal a channel count (a depthwise conv's `groups`):
  slicing cuts them with the channels, growth widens them;
- `resize(module, shapes)`: its size attributes after growth or pruning changed its tensors;
- `fills`: growth's value for channels no source net provides (norm gamma 1, beta 0, ...);
- `channelwise`: each of its parameter entries touches one channel only (BatchNorm), so
  filter pruning may remove channels through it;
- `follows_input`: options that restate the input's trailing sizes (a layer norm's
  `normalized_shape`): when those channels are cut or grown, `follow_input` computes them
  from the input instead (`x.shape[-k:]`);
- `sliced(module, state, layout, per_width)`: its sliced twin for sorted slicing, for the
  modules `sliceable(module)` accepts;
- `inputs`: the module call's arguments after the first that the functional form takes too
  (attention's key, value and masks), at the end of `signature`; a `training` entry in the
  signature is the module's mode, which functionalization hands over as a mode node;
- `units`: what targets see of one module: {name: (weight role, bias role)}; most kinds are one
  unit named by the module path, attention is two (`<path>.in_proj`, `<path>.out_proj`);
- `fold_code(graph, call, get, shapes, holder)`: where `rebuild` returns None (no plain module
  holds the tensors: attention with a sub-model's heads), the call written as plain graph ops
  before its node, reading parameter role r as `get(r)` from `holder` (the plain module fold
  puts at the layer's path); returns the node of its value;
- `aten`: the kind's forms in a torch.export graph, {aten op: reader}: `reader(node)` returns
  an `AtenForm` (the node the layer's value replaces, the functional form's arguments) or None
  when the call is not this layer (the export front-end, `fxgrow.frontends.export`).

`register_layer_kind` adds an entry (later entries win over earlier ones for the same
module class or function), like Torch-Pruning's per-type pruners: adding a layer kind is
one entry plus its tests.
"""
from __future__ import annotations

import functools
import operator
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import attention_code, run, tensor_facts
from .errors import FxgrowError

if TYPE_CHECKING:  # the coupling builder; layers.py imports no analysis
    from .analysis.coupling import Coupling

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class LayerKind:
    name: str
    modules: tuple[type[nn.Module], ...]
    function: Callable | None
    signature: tuple[str, ...]                       # the functional form's arguments after the input
    params: tuple[str, ...]                          # the tensor operands among them
    couple: Callable[["Coupling", "LayerCall"], None]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Callable[[nn.Module], dict[str, Any]] = lambda module: {}
    targetable: bool = False
    refuse: Callable[[nn.Module], str | None] = lambda module: None
    rebuild: Callable[[dict[str, torch.Tensor | None], dict[str, Any]], nn.Module] | None = None
    channel_options: Callable[["LayerCall"], dict[str, tuple[str, int]]] = lambda call: {}
    resize: Callable[[nn.Module, Shapes], None] = lambda module, shapes: None
    fills: Mapping[str, float] = field(default_factory=dict)
    channelwise: bool = False
    sliced: Callable[..., nn.Module] | None = None
    sliceable: Callable[[nn.Module], bool] = lambda module: True
    follows_input: tuple[str, ...] = ()             # options restating the input's trailing sizes
    inputs: tuple[str, ...] = ()
    units: Mapping[str, tuple[str, str | None]] = field(default_factory=lambda: {"": ("weight", "bias")})
    aten: Mapping[Any, Callable[[fx.Node], "AtenForm | None"]] = field(default_factory=dict)
    fold_code: Callable[..., fx.Node] | None = None  # plain ops where `rebuild` holds no module

    def position(self, name: str) -> int:
        """Where argument `name` sits in a call of the functional form (the input is 0)."""
        return 1 + self.signature.index(name)

    @property
    def type_name(self) -> str:
        """The name targets select this kind by (`types: [Linear]`): its first module class's."""
        return self.modules[0].__name__ if self.modules else self.name


_KINDS: list[LayerKind] = []                     # newest first
_BY_FUNCTION: dict[Callable, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add `kind` to the table; it takes precedence over earlier entries."""
    _KINDS.insert(0, kind)
    if kind.function is not None:
        _BY_FUNCTION[kind.function] = kind
    return kind


def unregister_layer_kind(kind: LayerKind) -> None:
    """Take `kind` out of the table again (tests that add a toy kind)."""
    _KINDS.remove(kind)
    _BY_FUNCTION.clear()
    for k in reversed(_KINDS):
        if k.function is not None:
            _BY_FUNCTION[k.function] = k


def layer_kinds() -> tuple[LayerKind, ...]:
    return tuple(_KINDS)


def kind_of(module: nn.Module, exact: bool = False) -> LayerKind | None:
    """The kind of `module`: its class in an entry, or with `exact=False` a base class of it.
    Functionalization asks for the exact class (a subclass may compute something else)."""
    if not _TIMM_KINDS and "timm.layers" in sys.modules:
        _register_timm_kinds()
    for kind in _KINDS:
        if type(module) in kind.modules:
            return kind
    if exact:
        return None
    return next((k for k in _KINDS if isinstance(module, k.modules)), None)


def kind_of_function(fn: Callable) -> LayerKind | None:
    """The kind whose functional form is `fn`."""
    return _BY_FUNCTION.get(fn)


def kind_of_aten(op: Any) -> LayerKind | None:
    """The kind with a form for aten op `op` in an exported graph (newest entry first)."""
    return next((k for k in _KINDS if op in k.aten), None)


@dataclass(frozen=True)
class AtenForm:
    """A layer read from an exported (aten) graph: `replaces` is the node whose value the
    functional call `kind.function(*args)` computes (the aten call itself, or the last node
    of a pattern such as HF Conv1D's view -> addmm -> view); `args` follow the functional
    form (input first), the kind's parameters as the graph's nodes."""

    replaces: fx.Node
    args: tuple


@dataclass(frozen=True)
class LayerCall:
    """One layer node read through its kind."""

    kind: LayerKind
    node: fx.Node
    path: str                               # the layer's module path (names it as a producer)
    x: Any                                  # the activation input
    params: dict[str, tuple[str, str]]      # role -> (owner path, parameter name)
    operands: dict[str, fx.Node]            # role -> the node computing it (functional form)
    options: dict[str, Any]                 # the other arguments by name
    module: nn.Module | None = None         # the module (call_module form)

    @property
    def functional(self) -> bool:
        return self.node.op == "call_function"

    def set_option(self, name: str, value: Any) -> None:
        """Write argument `name` of a functional call where it stands (position or keyword)."""
        position = self.kind.position(name)
        if len(self.node.args) > position:
            self.node.update_arg(position, value)
        else:
            self.node.update_kwarg(name, value)


def split_key(key: str) -> tuple[str, str]:
    """"layer1.0.conv1.weight" -> ("layer1.0.conv1", "weight") (owner path, name)."""
    owner, _, name = key.rpartition(".")
    return owner, name


def _nested(module: nn.Module, role: str) -> Any:
    """`module`'s attribute at dotted `role` ("out_proj.weight"), or None."""
    for name in role.split("."):
        module = getattr(module, name, None)
    return module


def argument(node: fx.Node, position: int, name: str, default=None):
    """Argument `name` of a call: at `position`, or as a keyword, or `default`."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def layer_call(node: fx.Node, gm: nn.Module) -> LayerCall | None:
    """The layer `node` computes, or None. Both graph forms give the same `LayerCall`."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = kind_of(module)
        if kind is None:
            return None
        params = {r: split_key(f"{node.target}.{r}") for r in kind.params  # "out_proj.weight": its owner's
                  if _nested(module, r) is not None}
        inputs = {name: argument(node, 1 + i, name, kind.defaults.get(name)) for i, name in enumerate(kind.inputs)}
        return LayerCall(kind, node, node.target, argument(node, 0, "input"), params, {},
                         kind.options(module) | inputs, module)
    if node.op != "call_function":
        return None
    kind = _BY_FUNCTION.get(node.target)
    if kind is None:
        return None
    operands = {r: argument(node, kind.position(r), r) for r in kind.params}
    operands = {r: op for r, op in operands.items() if isinstance(op, fx.Node)}
    tag = node.meta.get("fxgrow") or {}
    if tag.get("role") == "layer":
        path = tag["source"]
        chains = tag.get("chains") or {}  # role -> the parameter it reads (tied ones share one)
        params = {r: split_key(chains.get(r) or f"{path}.{r}") for r in operands}
    elif operands and all(op.op == "get_attr" for op in operands.values()):
        # a functional layer the user wrote: its parameters are named by their attributes
        params = {r: tuple(op.target.rpartition(".")[::2]) for r, op in operands.items()}
        path = params["weight"][0] if "weight" in params else next(iter(params.values()))[0]
    else:
        return None
    options = {name: argument(node, kind.position(name), name, kind.defaults.get(name))
               for name in kind.signature if name not in kind.params}
    return LayerCall(kind, node, path, argument(node, 0, "input"), params, operands, options)


# --- the rules shared by several kinds -------------------------------------------------------

def _couple_conv(c: "Coupling", call: LayerCall) -> None:
    node, groups = call.node, call.options.get("groups", 1)
    xin = c.layouts[call.x]
    channels_in, channels_out = c.shape(call.x)[1], c.shape(node)[1]
    if not isinstance(groups, int):  # counted by a sub-model: the analysis runs before that
        out = c.output(node, {0: [xin[0]]}, f"conv {call.path} with computed groups")
    elif 1 < groups == channels_in == channels_out:  # depthwise: channel c -> c, a use, not a producer
        out = c.output(node, {0: [xin[0]], 1: [xin[1]]})
    else:
        out = c.output(node, {0: [xin[0]]})
        c.produces(out[1], call.path)
        if groups == 1:
            c.use(xin[1], call.params.get("weight"), 1, node)
        else:  # input group g feeds output group g only: both move in whole groups; weight dim 1
            # indexes channels within a group, which stay
            c.whole_groups(xin[1], out[1], groups, node, f"grouped conv {call.path} (groups={groups})")
    c.use(out[1], call.params.get("weight"), 0, node)
    c.use(out[1], call.params.get("bias"), 0, node)


def _couple_linear(c: "Coupling", call: LayerCall) -> None:
    node, xin = call.node, c.layouts[call.x]
    out = c.output(node, {d: [xin[d]] for d in range(len(xin) - 1)})
    c.use(xin[-1], call.params.get("weight"), 1, node)
    c.produces(out[-1], call.path)
    c.use(out[-1], call.params.get("weight"), 0, node)
    c.use(out[-1], call.params.get("bias"), 0, node)


def _couple_embedding(c: "Coupling", call: LayerCall) -> None:
    node, xin = call.node, c.layouts[call.x]
    out = c.output(node, {d: [xin[d]] for d in range(len(xin))})  # indices in, a new feature dim out
    c.produces(out[-1], call.path)
    c.use(out[-1], call.params.get("weight"), 1, node)


_NORM_ROLES = ("weight", "bias", "running_mean", "running_var")


def _couple_norm(c: "Coupling", call: LayerCall, param_dims: dict[int, int]) -> tuple:
    """Shape unchanged; the per-channel parameters index output dim d along their dim
    param_dims[d]."""
    node, xin = call.node, c.layouts[call.x]
    out = c.output(node, {d: [xin[d]] for d in range(len(xin))})
    for d, param_dim in param_dims.items():
        for role in _NORM_ROLES:
            c.use(out[d], call.params.get(role), param_dim, node)
    return out


def _couple_channel_norm(c: "Coupling", call: LayerCall) -> None:
    _couple_norm(c, call, {1 if len(c.layouts[call.x]) > 1 else 0: 0})


def _couple_group_norm(c: "Coupling", call: LayerCall) -> None:
    ndim, groups = len(c.layouts[call.x]), call.options.get("num_groups", 1)
    channel_dim = 1 if ndim > 1 else 0
    channels = c.shape(call.node)[channel_dim]
    out = _couple_norm(c, call, {channel_dim: 0})
    if not isinstance(groups, int):
        c.fix([out[channel_dim]], f"group norm {call.path} with computed groups")
    elif groups == 1:  # statistics over every channel (and position): a LayerNorm over C, H, W
        c.normalizes(c.layouts[call.x][channel_dim], call.node, "group_norm", channel_dim, call.path,
                     f"group_norm '{call.path}'")
    elif groups != channels:  # statistics per group of channels: they move in whole groups
        c.whole_groups(out[channel_dim], None, groups, call.node, f"group norm {call.path} (groups={groups})")


def normalized_dims(shape: Any) -> int:
    """How many trailing dims a layer norm's `normalized_shape` covers: an int, a tuple, or
    the input's own trailing sizes (`x.shape[-k:]`, what slicing and growth write)."""
    if isinstance(shape, int):
        return 1
    if isinstance(shape, (list, tuple, torch.Size)):
        return len(shape)
    if isinstance(shape, fx.Node) and shape.target is operator.getitem and isinstance(shape.args[1], slice):
        return -shape.args[1].start
    raise FxgrowError(f"cannot read normalized_shape {shape!r}")


def _couple_layer_norm(c: "Coupling", call: LayerCall) -> None:
    ndim, dims = len(c.layouts[call.x]), normalized_dims(call.options.get("normalized_shape", 1))
    xin = c.layouts[call.x]
    _couple_norm(c, call, {ndim - dims + i: i for i in range(dims)})
    for d in range(ndim - dims, ndim):
        c.normalizes(xin[d], call.node, call.kind.name, d, call.path, f"{call.kind.name} '{call.path}'")


def follow_input(call: LayerCall) -> bool:
    """Make the options of functional layer `call` that restate its input's trailing sizes
    read them from the input (`F.layer_norm(x, x.shape[-1:], ...)`), so the layer runs on a
    cut or grown input. Returns whether it changed the graph."""
    changed = False
    if not call.functional:
        return changed
    graph = call.node.graph
    for name in call.kind.follows_input:
        value = call.options.get(name)
        if isinstance(value, fx.Node):
            continue
        with graph.inserting_before(call.node):
            shape = graph.call_function(getattr, (call.x, "shape"))
            trailing = graph.call_function(operator.getitem, (shape, slice(-normalized_dims(value), None)))
        call.set_option(name, trailing)
        changed = True
    return changed


def _load(m: nn.Module, tensors: dict[str, torch.Tensor | None]) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(m, name).copy_(value)
    return m


def _rebuild_linear(t: dict[str, torch.Tensor | None], options: dict[str, Any]) -> nn.Module:
    w, b = t["weight"], t.get("bias")
    return _load(nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype), t)


def _rebuild_conv(cls: type[nn.Module]) -> Callable:
    def rebuild(t: dict[str, torch.Tensor | None], options: dict[str, Any]) -> nn.Module:
        w, b, groups = t["weight"], t.get("bias"), options["groups"]
        m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=options["stride"],
                padding=options["padding"], dilation=options["dilation"], groups=groups, bias=b is not None,
                device=w.device, dtype=w.dtype)
        return _load(m, t)
    return rebuild


def _conv_options(m: nn.Module) -> dict[str, Any]:
    return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}


def _conv_refuse(m: nn.Module) -> str | None:
    if m.padding_mode != "zeros":
        return (f"padding_mode={m.padding_mode!r} is not supported by functionalization; "
                "exclude this layer from the pass targets")
    return None


def _grouped(call: LayerCall) -> dict[str, tuple[str, int]]:
    """A grouped conv moves in whole groups: cut or widened to k of its G groups (k output
    channels of a depthwise one), it is a conv with k groups."""
    groups = call.options.get("groups", 1)
    return {"groups": ("weight", 0)} if isinstance(groups, int) and groups > 1 else {}


def _resize_conv(m: nn.Module, shapes: Shapes) -> None:
    w = shapes.get("weight")
    if w is None:
        return
    if m.groups > 1:  # whole groups came or went: each keeps its width
        m.groups = w[0] // (m.out_channels // m.groups)
    m.out_channels, m.in_channels = w[0], w[1] * m.groups


def _resize_linear(m: nn.Module, shapes: Shapes) -> None:
    if "weight" in shapes:
        m.out_features, m.in_features = shapes["weight"][0], shapes["weight"][1]


def _first(shapes: Shapes, *roles: str) -> tuple[int, ...] | None:
    return next((shapes[r] for r in roles if r in shapes), None)


def _resize_channel_norm(m: nn.Module, shapes: Shapes) -> None:
    ref = _first(shapes, "weight", "running_mean")
    if ref is not None:
        m.num_features = ref[0]


def _resize_group_norm(m: nn.Module, shapes: Shapes) -> None:
    ref = _first(shapes, "weight")
    if ref is not None:
        if m.num_groups > 1:  # whole groups came or went: each keeps its width
            m.num_groups = ref[0] // (m.num_channels // m.num_groups)
        m.num_channels = ref[0]


def _group_norm_groups(call: LayerCall) -> dict[str, tuple[str, int]]:
    """A GroupNorm moves in whole groups: cut or widened to k of them, it has k groups."""
    groups = call.options.get("num_groups", 1)
    return {"num_groups": ("weight", 0)} if isinstance(groups, int) and groups > 1 else {}


def _resize_layer_norm(m: nn.Module, shapes: Shapes) -> None:
    ref = _first(shapes, "weight")
    if ref is not None:
        m.normalized_shape = tuple(ref)


def _sliced_batch_norm(m, state, layout, per_width=False):
    from .nn.slicing import sliced_batch_norm
    return sliced_batch_norm(m, state, layout, per_width)


def _sliced_layer_norm(m, state, layout, per_width=False):
    from .nn.slicing import SlicedLayerNorm
    return SlicedLayerNorm(m, state, layout)


def _couple_conv_transpose(c: "Coupling", call: LayerCall) -> None:
    node, groups = call.node, call.options.get("groups", 1)
    xin = c.layouts[call.x]
    out = c.output(node, {0: [xin[0]]})
    c.produces(out[1], call.path)
    if groups == 1:  # weight (in, out, *k)
        c.use(xin[1], call.params.get("weight"), 0, node)
        c.use(out[1], call.params.get("weight"), 1, node)
    else:
        c.fix([xin[1], out[1]], f"grouped transposed conv {call.path} (groups={groups})")
    c.use(out[1], call.params.get("bias"), 0, node)


def _rebuild_conv_transpose(cls: type[nn.Module]) -> Callable:
    def rebuild(t: dict[str, torch.Tensor | None], options: dict[str, Any]) -> nn.Module:
        w, b, groups = t["weight"], t.get("bias"), options["groups"]
        m = cls(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=options["stride"],
                padding=options["padding"], output_padding=options["output_padding"], groups=groups,
                bias=b is not None, dilation=options["dilation"], device=w.device, dtype=w.dtype)
        return _load(m, t)
    return rebuild


def _conv_transpose_options(m: nn.Module) -> dict[str, Any]:
    return {"stride": m.stride, "padding": m.padding, "output_padding": m.output_padding,
            "groups": m.groups, "dilation": m.dilation}


def _resize_conv_transpose(m: nn.Module, shapes: Shapes) -> None:
    w = shapes.get("weight")
    if w is not None:
        m.in_channels, m.out_channels = w[0], w[1] * m.groups


def _embedding_options(m: nn.Module) -> dict[str, Any]:
    return {"padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
            "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse}


def _embedding_refuse(m: nn.Module) -> str | None:
    if m.max_norm is not None:
        return "max_norm renormalizes the stored weight in place on every lookup; exclude this layer"
    return None


def _rebuild_embedding(t: dict[str, torch.Tensor | None], options: dict[str, Any]) -> nn.Module:
    w = t["weight"]
    return _load(nn.Embedding(w.shape[0], w.shape[1], padding_idx=options["padding_idx"],
                              norm_type=options["norm_type"], scale_grad_by_freq=options["scale_grad_by_freq"],
                              sparse=options["sparse"], device=w.device, dtype=w.dtype), t)


def _resize_embedding(m: nn.Module, shapes: Shapes) -> None:
    if "weight" in shapes:
        m.num_embeddings, m.embedding_dim = shapes["weight"][0], shapes["weight"][1]


def multi_head_attention(query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, bias_k, bias_v,
                         embed_dim, num_heads, dropout, add_zero_attn, batch_first, training, key, value,
                         key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
                         is_causal=False):
    """`nn.MultiheadAttention.forward` with its parameters given as tensors (weight chains):
    torch's own forward runs on a stand-in for the module, so every path it takes (the fused
    inference kernel included) is the module's. Tensors a sorted-slicing sub-model cut (the
    first h heads of head_dim embed_dim / num_heads, a cut hidden size) run as
    `fxgrow.attention.attention_code`, which fold writes out op for op: the extracted
    sub-model then computes exactly what the sliced one does (torch's own forward would not
    promise that: its in-projection of a strided input picks its kernel by whether the
    weight requires grad, and a cut weight does not where the extracted parameter does)."""
    head_dim = embed_dim // num_heads
    if full_size(in_proj_weight, out_proj_weight, embed_dim):
        module = types.SimpleNamespace(
            in_proj_weight=in_proj_weight, in_proj_bias=in_proj_bias, bias_k=bias_k, bias_v=bias_v,
            out_proj=types.SimpleNamespace(weight=out_proj_weight, bias=out_proj_bias), embed_dim=embed_dim,
            num_heads=num_heads, dropout=dropout, add_zero_attn=add_zero_attn, batch_first=batch_first,
            training=training, _qkv_same_embed_dim=True, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None)
        module.merge_masks = functools.partial(nn.MultiheadAttention.merge_masks, module)
        return nn.MultiheadAttention.forward(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    return attention_code(run, tensor_facts(query, key, value, key_padding_mask, attn_mask), query, key, value,
                          in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, bias_k, bias_v,
                          key_padding_mask, attn_mask, heads=in_proj_weight.shape[0] // (3 * head_dim),
                          head_dim=head_dim, full_heads=num_heads,
                          drop=functools.partial(F.dropout, p=dropout, training=training) if dropout > 0 else None,
                          add_zero_attn=add_zero_attn, batch_first=batch_first, need_weights=need_weights,
                          average_attn_weights=average_attn_weights, is_causal=is_causal)


def full_size(in_proj_weight, out_proj_weight, embed_dim: int) -> bool:
    """Whether these are an nn.MultiheadAttention's own shapes, [3E, E] and [E, E] (not cut)."""
    return tuple(in_proj_weight.shape) == (3 * embed_dim, embed_dim) and \
        tuple(out_proj_weight.shape) == (embed_dim, embed_dim)


_MHA_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "bias_k", "bias_v")
_MHA_OPTIONS = ("embed_dim", "num_heads", "dropout", "add_zero_attn", "batch_first", "training")
_MHA_INPUTS = ("key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _mha_options(m: nn.Module) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "add_zero_attn": m.add_zero_attn, "batch_first": m.batch_first}


def _mha_refuse(m: nn.Module) -> str | None:
    if not m._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim or vdim other than embed_dim) are not supported"
    return None


def _rebuild_mha(t: dict[str, torch.Tensor | None], options: dict[str, Any]) -> nn.Module | None:
    """The plain module holding `t`; None for a sub-model's cut tensors, which fold writes as
    the plain ops the sliced model ran (`_fold_mha_code`)."""
    w = t["in_proj_weight"]
    if not full_size(w, t["out_proj.weight"], options["embed_dim"]):
        return None
    m = nn.MultiheadAttention(options["embed_dim"], options["num_heads"], dropout=options["dropout"],
                              bias=t.get("in_proj_bias") is not None, add_bias_kv=t.get("bias_k") is not None,
                              add_zero_attn=options["add_zero_attn"], batch_first=options["batch_first"],
                              device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for role, value in t.items():
            if value is not None:
                owner, _, name = role.rpartition(".")
                getattr(m.get_submodule(owner) if owner else m, name).copy_(value)
    return m


def _fold_mha_code(graph: fx.Graph, call: LayerCall, get: Callable[[str], fx.Node | None],
                   shapes: Shapes, holder: nn.Module) -> fx.Node:
    """Write `call` (before its node) as the plain ops of `fxgrow.attention.attention_code`,
    its parameters read by `get(role)`, its dropout an nn.Dropout put in `holder` (the
    module at its path); returns the node of its (output, weights) tuple."""
    from .attention import node_facts

    o, head_dim = call.options, call.options["embed_dim"] // call.options["num_heads"]
    drop = None
    if o["dropout"] > 0:
        holder.dropout = nn.Dropout(o["dropout"])
        drop = lambda w: graph.call_module(f"{call.path}.dropout", (w,))  # noqa: E731
    key, value = o.get("key"), o.get("value")
    kpm, mask = o.get("key_padding_mask"), o.get("attn_mask")
    roles = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "bias_k", "bias_v")
    with graph.inserting_before(call.node):
        out, weights = attention_code(
            lambda fn, *a, **k: graph.call_function(fn, a, k), node_facts(call.x, key, value, kpm, mask), call.x, key, value, *map(get, roles),
            kpm, mask, heads=shapes["in_proj_weight"][0] // (3 * head_dim), head_dim=head_dim,
            full_heads=o["num_heads"], drop=drop, add_zero_attn=o["add_zero_attn"],
            batch_first=o["batch_first"], need_weights=o["need_weights"],
            average_attn_weights=o["average_attn_weights"], is_causal=o["is_causal"])
        return graph.call_function(tuple, ((out, weights),))


def _couple_attention(c: "Coupling", call: LayerCall) -> None:
    """q|k|v channels are `num_heads` heads of head_dim, one block used three times by the
    in-projection's rows (q, k and v of head j are rows j*D.. of each third) and by the
    out-projection's columns; its input channels (the in-projection's columns: query's,
    key's and value's) and its output channels (the out-projection's rows) are blocks of
    their own. Only sorted slicing follows a cut of them (the functional form computes the
    heads from the cut tensors, fold writes what no nn.MultiheadAttention holds as plain
    ops); growth and filter pruning, which would rebuild the module, leave them whole."""
    node, o = call.node, call.options
    inputs = [call.x, o.get("key"), o.get("value")]
    if not c.follow_sizes or not all(x in c.layouts for x in inputs):
        reason = f"attention {call.path} (nn.MultiheadAttention: only sorted slicing cuts its heads)"
        for x in inputs:
            if x in c.layouts:
                c.fix(c.layouts[x], reason)
        return None
    embed, heads = o["embed_dim"], o["num_heads"]
    lq, lk, lv = (c.layouts[x] for x in inputs)
    w, b = call.params.get("in_proj_weight"), call.params.get("in_proj_bias")
    for lay in (lq, lk, lv):
        c.use(lay[-1], w, 1, node)
    qkv, per_head = c.heads_block(node, "qkv", embed, heads, f"attention {call.path}")
    c.produces(qkv, call.path)
    for role, dim, layout in (("in_proj_weight", 0, qkv * 3), ("in_proj_bias", 0, qkv * 3), ("bias_k", 2, qkv),
                              ("bias_v", 2, qkv), ("out_proj.weight", 1, qkv)):
        c.use(layout, call.params.get(role), dim, node)
    out = c.block(node, "out", embed)
    c.produces(out, call.path)
    c.use(out, call.params.get("out_proj.weight"), 0, node)
    c.use(out, call.params.get("out_proj.bias"), 0, node)
    metas = node.meta.get("tensor_meta")
    outputs = [tuple(lq[:-1]) + (out,)]
    if isinstance(metas, (list, tuple)) and len(metas) > 1 and metas[1] is not None:
        per_head = len(metas[1].shape) == len(lq) + 1  # [N, H, L, S] (average_attn_weights=False)
        outputs.append(tuple(c.block(node, f"weights{d}", size) if not (per_head and d == len(metas[1].shape) - 3)
                             else per_head for d, size in enumerate(metas[1].shape)))
    c.pieces[node] = outputs


def _resize_mha(m: nn.Module, shapes: Shapes) -> None:
    w = shapes.get("in_proj_weight")
    if w is not None and tuple(w) != (3 * m.embed_dim, m.embed_dim):
        raise FxgrowError(f"nn.MultiheadAttention (embed_dim {m.embed_dim}) cannot change width to {tuple(w)}: "
                          "only sorted slicing cuts its heads")


def _sliced_rms_norm(m, state, layout, per_width=False):
    from .nn.slicing import SlicedRMSNorm
    return SlicedRMSNorm(m, state, layout)


def _sliced_group_norm(m, state, layout, per_width=False):
    from .nn.slicing import SlicedGroupNorm
    return SlicedGroupNorm(m, state, layout)


def transposed_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`input @ weight + bias` with the weight stored [in, out]: transformers' `Conv1D` (GPT-2's
    projections), computed as its forward does (addmm on the flattened input)."""
    flat = input.reshape(-1, input.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else torch.mm(flat, weight)
    return out.view(*input.shape[:-1], weight.shape[1])


def _couple_transposed_linear(c: "Coupling", call: LayerCall) -> None:
    node, xin = call.node, c.layouts[call.x]
    out = c.output(node, {d: [xin[d]] for d in range(len(xin) - 1)})
    c.use(xin[-1], call.params.get("weight"), 0, node)  # weight [in, out]
    c.produces(out[-1], call.path)
    c.use(out[-1], call.params.get("weight"), 1, node)
    c.use(out[-1], call.params.get("bias"), 0, node)


# --- the kinds' forms in a torch.export graph (aten ops) -------------------------------------

_aten = torch.ops.aten


def aten_arguments(node: fx.Node) -> dict[str, Any]:
    """An aten call's arguments by schema name, defaults filled in."""
    bound = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[a.name] = node.args[i]
        elif a.name in node.kwargs:
            bound[a.name] = node.kwargs[a.name]
        else:
            bound[a.name] = a.default_value if a.has_default_value() else None
    return bound


def _aten_linear(node: fx.Node) -> AtenForm:
    a = aten_arguments(node)
    return AtenForm(node, (a["input"], a["weight"], a["bias"]))


def _aten_conv(node: fx.Node) -> AtenForm:
    a = aten_arguments(node)
    return AtenForm(node, (a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"]))


def _aten_embedding(node: fx.Node) -> AtenForm:
    a = aten_arguments(node)  # aten's padding_idx -1 is "none" (a module's negative index is normalized)
    padding = None if a["padding_idx"] == -1 else a["padding_idx"]
    return AtenForm(node, (a["indices"], a["weight"], padding, None, 2.0, a["scale_grad_by_freq"], a["sparse"]))


_VIEWS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)


def _sizes(node: Any) -> list[str] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else None


def _aten_conv1d_hf(node: fx.Node) -> AtenForm | None:
    """transformers' Conv1D: `view(addmm(bias, view(x, [-1, in]), W), x.shape[:-1] + [out])`."""
    a = aten_arguments(node)
    flat, weight = a["mat1"], a["mat2"]
    if a["beta"] != 1 or a["alpha"] != 1 or not isinstance(flat, fx.Node) or flat.target not in _VIEWS:
        return None
    x, w, users = flat.args[0], _sizes(weight), list(node.users)
    if len(users) != 1 or users[0].target not in _VIEWS or w is None or len(w) != 2:
        return None
    xs, fs, outs = _sizes(x), _sizes(flat), _sizes(users[0])
    if xs is None or fs is None or outs is None or len(fs) != 2 or fs[1] != w[0] or xs[-1] != w[0] \
            or outs != xs[:-1] + [w[1]]:
        return None
    return AtenForm(users[0], (x, weight, a["self"]))


_CONV_ATEN = {d: {getattr(_aten, f"conv{d}d").default: _aten_conv, getattr(_aten, f"conv{d}d").padding: _aten_conv}
              for d in (1, 2, 3)}


_NORM_FILLS = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
_CONV_SIGNATURE = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_SIGNATURE = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_CONV_TRANSPOSE_SIGNATURE = ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_TRANSPOSE_DEFAULTS = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_EMBEDDING_SIGNATURE = ("weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

_RMS_NORM = (LayerKind("rms_norm", (nn.RMSNorm,), F.rms_norm, ("normalized_shape", "weight", "eps"), ("weight",),
                       _couple_layer_norm, options=lambda m: {"normalized_shape": m.normalized_shape},
                       resize=_resize_layer_norm, fills=_NORM_FILLS, sliced=_sliced_rms_norm,
                       sliceable=lambda m: len(m.normalized_shape) == 1, follows_input=("normalized_shape",)),
             ) if hasattr(nn, "RMSNorm") else ()  # torch >= 2.4

for _kind in (
    LayerKind("embedding", (nn.Embedding,), F.embedding, _EMBEDDING_SIGNATURE, ("weight",), _couple_embedding,
              dict(zip(_EMBEDDING_SIGNATURE[1:], (None, None, 2.0, False, False))), _embedding_options,
              targetable=True, refuse=_embedding_refuse, rebuild=_rebuild_embedding, resize=_resize_embedding,
              aten={_aten.embedding.default: _aten_embedding}),
    LayerKind("multihead_attention", (nn.MultiheadAttention,), multi_head_attention,
              _MHA_PARAMS + _MHA_OPTIONS + _MHA_INPUTS, _MHA_PARAMS, _couple_attention,
              {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
               "is_causal": False}, _mha_options, targetable=True, refuse=_mha_refuse, rebuild=_rebuild_mha,
              resize=_resize_mha, fold_code=_fold_mha_code, inputs=_MHA_INPUTS,
              units={"in_proj": ("in_proj_weight", "in_proj_bias"), "out_proj": ("out_proj.weight", "out_proj.bias")}),
    *(LayerKind(f"conv_transpose{d}d", (cls,), fn, _CONV_TRANSPOSE_SIGNATURE, ("weight", "bias"),
                _couple_conv_transpose, _CONV_TRANSPOSE_DEFAULTS, _conv_transpose_options, targetable=True,
                refuse=_conv_refuse, rebuild=_rebuild_conv_transpose(cls), resize=_resize_conv_transpose,
                fills={"bias": 0.0})
      for d, cls, fn in ((3, nn.ConvTranspose3d, F.conv_transpose3d), (2, nn.ConvTranspose2d, F.conv_transpose2d),
                         (1, nn.ConvTranspose1d, F.conv_transpose1d))),
    *_RMS_NORM,
    LayerKind("layer_norm", (nn.LayerNorm,), F.layer_norm, ("normalized_shape", "weight", "bias", "eps"),
              ("weight", "bias"), _couple_layer_norm, options=lambda m: {"normalized_shape": m.normalized_shape},
              resize=_resize_layer_norm, fills=_NORM_FILLS, sliced=_sliced_layer_norm,
              sliceable=lambda m: type(m) is nn.LayerNorm and len(m.normalized_shape) == 1,  # the last dim only
              follows_input=("normalized_shape",)),
    LayerKind("group_norm", (nn.GroupNorm,), F.group_norm, ("num_groups", "weight", "bias", "eps"),
              ("weight", "bias"), _couple_group_norm, options=lambda m: {"num_groups": m.num_groups},
              channel_options=_group_norm_groups, resize=_resize_group_norm, fills=_NORM_FILLS,
              sliced=_sliced_group_norm),
    LayerKind("instance_norm", (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), F.instance_norm,
              _BN_SIGNATURE, _NORM_ROLES[2:] + _NORM_ROLES[:2], _couple_channel_norm,
              resize=_resize_channel_norm, fills=_NORM_FILLS, channelwise=True),
    LayerKind("batch_norm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), F.batch_norm,
              _BN_SIGNATURE, _NORM_ROLES[2:] + _NORM_ROLES[:2], _couple_channel_norm,
              resize=_resize_channel_norm, fills=_NORM_FILLS, channelwise=True, sliced=_sliced_batch_norm,
              # exactly these classes: a subclass (timm's BatchNormAct2d, a leaf since it reads
              # self.training) computes more than its sliced twin would
              sliceable=lambda m: type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
    *(LayerKind(f"conv{d}d", (cls,), fn, _CONV_SIGNATURE, ("weight", "bias"), _couple_conv, _CONV_DEFAULTS,
                _conv_options, targetable=True, refuse=_conv_refuse, rebuild=_rebuild_conv(cls),
                channel_options=_grouped, resize=_resize_conv, fills={"bias": 0.0}, aten=_CONV_ATEN[d])
      for d, cls, fn in ((3, nn.Conv3d, F.conv3d), (2, nn.Conv2d, F.conv2d), (1, nn.Conv1d, F.conv1d))),
    # a linear with its weight stored [in, out] (transformers' Conv1D): found in exported graphs,
    # it has no module here (fold writes its parameters back); targets name it `Conv1D`
    LayerKind("transposed_linear", (), transposed_linear, ("weight", "bias"), ("weight", "bias"),
              _couple_transposed_linear, targetable=True, fills={"bias": 0.0},
              aten={_aten.addmm.default: _aten_conv1d_hf}),
    LayerKind("linear", (nn.Linear,), F.linear, ("weight", "bias"), ("weight", "bias"), _couple_linear,
              targetable=True, rebuild=_rebuild_linear, resize=_resize_linear, fills={"bias": 0.0},
              aten={_aten.linear.default: _aten_linear}),
):
    register_layer_kind(_kind)


# --- timm's norms with a built-in activation, once timm is loaded (fxgrow never imports it) ---

_TIMM_KINDS: list[LayerKind] = []


def _sliced_batch_norm_act(m, state, layout, per_width=False):
    from .nn.slicing import SlicedBatchNormAct
    return SlicedBatchNormAct(m, state, layout, per_width)


def _register_timm_kinds() -> None:
    """timm's BatchNormAct2d is a BatchNorm2d whose forward goes on through its `drop` and `act`
    modules, and reads `self.training`: a leaf of its own kind, channel-wise like BatchNorm
    (its activation acts on each channel alone), sliced into a twin that keeps the activation."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is None:
        return
    classes = tuple(c for c in (getattr(norm_act, "BatchNormAct2d", None), getattr(norm_act, "SyncBatchNormAct", None))
                    if c is not None)
    _TIMM_KINDS.append(register_layer_kind(LayerKind(
        "batch_norm_act", classes, None, _BN_SIGNATURE, _NORM_ROLES[2:] + _NORM_ROLES[:2], _couple_channel_norm,
        resize=_resize_channel_norm, fills=_NORM_FILLS, channelwise=True, sliced=_sliced_batch_norm_act,
        sliceable=lambda m: isinstance(m, nn.BatchNorm2d))))


def fill_value(owner: nn.Module | None, param: str) -> float | None:
    """What growth puts in channels of `owner.param` no source net provides: the kind's fill,
    1 for any running variance, 0 for a root-level bias or mean; None: copy a source."""
    kind = kind_of(owner) if owner is not None else None
    if kind is not None and param in kind.fills:
        return kind.fills[param]
    if param == "running_var" or (owner is None and param in ("bias", "running_mean")):
        return _NORM_FILLS[param]
    return None


def functional_refusal(module: nn.Module) -> str:
    """Why `module` cannot be functionalized ("" when it can)."""
    kind = kind_of(module, exact=True)
    if kind is None or not kind.targetable:
        return f"{type(module).__name__} is not a targetable layer kind"
    return kind.refuse(module) or ""


def require_functional(path: str, module: nn.Module) -> LayerKind:
    why = functional_refusal(module)
    if why:
        raise FxgrowError(f"layer '{path}' ({type(module).__name__}) cannot be functionalized: {why}")
    return kind_of(module, exact=True)
