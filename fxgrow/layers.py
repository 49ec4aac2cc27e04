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
- `sliced(module, state, layout, per_width)`: its sliced twin for sorted slicing, for the
  modules `sliceable(module)` accepts.

`register_layer_kind` adds an entry (later entries win over earlier ones for the same
module class or function), like Torch-Pruning's per-type pruners: adding a layer kind is
one entry plus its tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

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

    def position(self, name: str) -> int:
        """Where argument `name` sits in a call of the functional form (the input is 0)."""
        return 1 + self.signature.index(name)


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
    for kind in _KINDS:
        if type(module) in kind.modules:
            return kind
    if exact:
        return None
    return next((k for k in _KINDS if isinstance(module, k.modules)), None)


def kind_of_function(fn: Callable) -> LayerKind | None:
    """The kind whose functional form is `fn`."""
    return _BY_FUNCTION.get(fn)


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
        params = {r: (node.target, r) for r in kind.params if getattr(module, r, None) is not None}
        return LayerCall(kind, node, node.target, argument(node, 0, "input"), params, {}, kind.options(module), module)
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
        params = {r: (path, r) for r in operands}
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
    if 1 < groups == channels_in == channels_out:  # depthwise: channel c -> c, a use, not a producer
        out = c.output(node, {0: [xin[0]], 1: [xin[1]]})
    else:
        out = c.output(node, {0: [xin[0]]})
        c.produces(out[1], call.path)
        if groups == 1:
            c.use(xin[1], call.params.get("weight"), 1, node)
        else:  # input channel c meets weight column c % (C / groups): not a slice
            reason = f"grouped conv {call.path} (groups={groups})"
            c.fix([xin[1], out[1]], reason)
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
    channels = c.shape(call.node)[1 if ndim > 1 else 0]
    out = _couple_norm(c, call, {1 if ndim > 1 else 0: 0})
    if groups not in (1, channels):
        c.fix([out[1]], f"group norm {call.path} ({groups} groups of channels)")


def _couple_layer_norm(c: "Coupling", call: LayerCall) -> None:
    ndim, shape = len(c.layouts[call.x]), call.options.get("normalized_shape", 1)
    dims = 1 if isinstance(shape, int) else len(shape)
    _couple_norm(c, call, {ndim - dims + i: i for i in range(dims)})


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


def _depthwise(call: LayerCall) -> dict[str, tuple[str, int]]:
    """A depthwise conv cut or widened to k channels is a conv with k groups."""
    groups = call.options.get("groups", 1)
    return {"groups": ("weight", 0)} if isinstance(groups, int) and groups > 1 else {}


def _resize_conv(m: nn.Module, shapes: Shapes) -> None:
    w = shapes.get("weight")
    if w is None:
        return
    if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise
        m.groups = w[0]
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
        if m.num_groups == m.num_channels:
            m.num_groups = ref[0]
        m.num_channels = ref[0]


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


_NORM_FILLS = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
_CONV_SIGNATURE = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_SIGNATURE = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

for _kind in (
    LayerKind("embedding", (nn.Embedding,), F.embedding, ("weight", "padding_idx"), ("weight",), _couple_embedding),
    LayerKind("layer_norm", (nn.LayerNorm,), F.layer_norm, ("normalized_shape", "weight", "bias", "eps"),
              ("weight", "bias"), _couple_layer_norm, options=lambda m: {"normalized_shape": m.normalized_shape},
              resize=_resize_layer_norm, fills=_NORM_FILLS, sliced=_sliced_layer_norm,
              sliceable=lambda m: len(m.normalized_shape) == 1),  # over the last dim only
    LayerKind("group_norm", (nn.GroupNorm,), F.group_norm, ("num_groups", "weight", "bias", "eps"),
              ("weight", "bias"), _couple_group_norm, options=lambda m: {"num_groups": m.num_groups},
              resize=_resize_group_norm, fills=_NORM_FILLS),
    LayerKind("instance_norm", (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), F.instance_norm,
              _BN_SIGNATURE, _NORM_ROLES[2:] + _NORM_ROLES[:2], _couple_channel_norm,
              resize=_resize_channel_norm, fills=_NORM_FILLS, channelwise=True),
    LayerKind("batch_norm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), F.batch_norm,
              _BN_SIGNATURE, _NORM_ROLES[2:] + _NORM_ROLES[:2], _couple_channel_norm,
              resize=_resize_channel_norm, fills=_NORM_FILLS, channelwise=True, sliced=_sliced_batch_norm,
              sliceable=lambda m: isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))),
    *(LayerKind(f"conv{d}d", (cls,), fn, _CONV_SIGNATURE, ("weight", "bias"), _couple_conv, _CONV_DEFAULTS,
                _conv_options, targetable=True, refuse=_conv_refuse, rebuild=_rebuild_conv(cls),
                channel_options=_depthwise, resize=_resize_conv, fills={"bias": 0.0})
      for d, cls, fn in ((3, nn.Conv3d, F.conv3d), (2, nn.Conv2d, F.conv2d), (1, nn.Conv1d, F.conv1d))),
    LayerKind("linear", (nn.Linear,), F.linear, ("weight", "bias"), ("weight", "bias"), _couple_linear,
              targetable=True, rebuild=_rebuild_linear, resize=_resize_linear, fills={"bias": 0.0}),
):
    register_layer_kind(_kind)


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
