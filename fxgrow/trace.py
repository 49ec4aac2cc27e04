"""Symbolic tracing with spec-controlled leaf modules, and errors a user can act on.

A model's `forward` may read `self.training`; FX evaluates that read once, so a graph traced
in one mode would keep that mode's branch forever (timm's BatchNormAct2d would normalise with
batch statistics in `eval()`). `trace` is therefore *mode-aware*:

1. while tracing it logs which modules read `self.training` (and where);
2. readers that hold no weight matrix (BatchNormAct2d, StochasticDepth, DropPath) become leaf
   modules: their mode then follows `.train()` / `.eval()` at run time, as in the original;
3. if readers are left (modules with weight matrices, or the root: `F.dropout(x, p,
   training=self.training)`), the model is traced again in the other mode; graphs that differ
   only in constant arguments get a `ModeSelect` node per differing constant (its train value
   while training, else its eval value); any other difference is refused, naming the module
   and the line that reads `self.training`.

Tracing leaves the model as it found it: modes, buffers (a traced-through BatchNorm subclass
increments `num_batches_tracked` eagerly) and the tensor constants FX sets on the root.
"""
from __future__ import annotations

import inspect
import math
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from .errors import TraceError
from .layers import kind_of

META_KEY = "fxgrow.trace"  # gm.meta entry: what tracing found (module types, mode handling)


class ModeSelect(nn.Module):
    """A constant of the traced graph that differs between modes: `train_value` while the
    module is training, else `eval_value`. It has no state, so state_dicts are unchanged."""

    def __init__(self, train_value: Any, eval_value: Any):
        super().__init__()
        self.train_value, self.eval_value = train_value, eval_value

    def forward(self) -> Any:
        return self.train_value if self.training else self.eval_value

    def extra_repr(self) -> str:
        return f"train={self.train_value!r}, eval={self.eval_value!r}"


# torch.nn modules FX does not trace into, with a forward it can trace that computes the same
# (their composite path): {class: forward(module, *args, **kwargs)}; NotImplemented keeps the
# module whole for that call.
TRACEABLE_FORWARDS: dict[type, Callable[..., Any]] = {}


def register_traceable_forward(cls: type, forward: Callable[..., Any],
                               covers: Callable[..., bool] | None = None,
                               root: Callable[..., Any] | None = None) -> None:
    """Trace `cls` modules through `forward(module, *args, **kwargs)` instead of keeping them
    whole (their layers then become targetable). `covers(module, *args, **kwargs)` says
    whether a call is one `forward` computes (others keep the module whole); `root` is the
    forward for a model that is itself a `cls` (its signature is the graph's inputs)."""
    forward.covers, forward.root = covers, root
    TRACEABLE_FORWARDS[cls] = forward


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps chosen modules as leaves and remembers the module path being
    traced, so a failure can name it."""

    def __init__(self, leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.leaf = set(leaf_modules)  # type names ("MyBlock") or module paths ("layer1.0")
        self.stack: list[str] = []
        self.failed_at: list[str] | None = None  # the module stack when tracing broke
        self.whole: set[int] = set()  # modules with a traceable forward kept whole for this call

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module of a registered layer kind stays one call, as torch.nn's do.
        if qualname in self.leaf or type(m).__name__ in self.leaf or kind_of(m, exact=True) is not None:
            return True
        if _real_type(m) in TRACEABLE_FORWARDS:
            return id(m) in self.whole
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            traceable = TRACEABLE_FORWARDS.get(_real_type(m))
            if traceable is not None and not self.is_leaf_module(m, self.stack[-1]):
                if _covers(traceable, m, args, kwargs):
                    return super().call_module(m, lambda *a, **k: traceable(m, *a, **k), args, kwargs)
                self.whole.add(id(m))
                try:
                    return super().call_module(m, forward, args, kwargs)
                finally:
                    self.whole.discard(id(m))
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _real_type(m: nn.Module) -> type:
    """The module's class (not the subclass `_TrainingReads` swaps in while tracing)."""
    cls = type(m)
    return cls.__mro__[1] if cls.__dict__.get("_fxgrow_probe") else cls


def _covers(forward: Callable[..., Any], m: nn.Module, args, kwargs) -> bool:
    return forward.covers is None or forward.covers(m, *args, **kwargs)


def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                           is_causal=False):
    """nn.TransformerEncoderLayer.forward's composite path (its fused eval kernel computes
    the same up to rounding), for calls without masks."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, None, None, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """nn.TransformerEncoder.forward for calls without masks (no nested tensors then)."""
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=None, is_causal=is_causal is True, src_key_padding_mask=None)
    return m.norm(out) if m.norm is not None else out


def _without_masks(m, src, *args, **kwargs) -> bool:
    return all(a is None for a in args[:2]) and all(kwargs.get(k) is None for k in
                                                    ("src_mask", "mask", "src_key_padding_mask"))


def _encoder_layer_root(self, src):  # a model that is one encoder layer: no mask input
    return _encoder_layer_forward(self, src)


def _encoder_root(self, src):
    return _encoder_forward(self, src)


register_traceable_forward(nn.TransformerEncoderLayer, _encoder_layer_forward, _without_masks, _encoder_layer_root)
register_traceable_forward(nn.TransformerEncoder, _encoder_forward, _without_masks, _encoder_root)


def trace(model: nn.Module, leaf_modules: Iterable[str] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule that behaves like it in train() and in eval() (see the
    module docstring). Raises TraceError naming the module path and the operation that could
    not be traced, or the module whose train and eval graphs differ, and how to fix it."""
    if isinstance(model, fx.GraphModule):
        return model
    leaves = set(leaf_modules)
    with _model_kept(model):
        gm, readers = _trace_once(model, leaves, concrete_args, training=True)
        mode_leaves = sorted(p for p in readers if p and not _holds_weights(model.get_submodule(p)))
        if mode_leaves:
            leaves |= set(mode_leaves)
            gm, readers = _trace_once(model, leaves, concrete_args, training=True)
        selects = 0
        if readers:  # modules with weight matrices (or the root) read self.training
            other, _ = _trace_once(model, leaves, concrete_args, training=False)
            selects = _merge_modes(gm, other, readers, model)
    _keep_versions(model, gm)
    gm.meta[META_KEY] = {
        "types": {path: type(m).__name__ for path, m in model.named_modules()},
        "leaf_modules": sorted(leaves),
        "mode_leaves": mode_leaves,      # weightless modules that read self.training
        "mode_readers": dict(readers),   # traced-through readers: path -> where it reads
        "mode_selects": selects,
        "weights": weight_matrices(model),
        "version": getattr(type(model), "_version", 1),
    }
    return gm


# Module classes whose parameters of two or more dims are weight matrices (subclasses too).
MATRIX_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag,
                  nn.MultiheadAttention, nn.modules.rnn.RNNBase)


def weight_matrices(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The model's weight matrices: {parameter name: {shape, owner path, owner type}}, one
    entry per tensor: the weights (`weight`, `in_proj_weight`, `weight_ih_l0`, ...) of two or
    more dims of a layer module (torch.nn's or a registered layer kind's, subclasses included;
    not a scaled conv's `gain`)."""
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        kind = kind_of(module)
        matrix_module = isinstance(module, MATRIX_MODULES) or (kind is not None and kind.targetable)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if matrix_module and p.dim() >= 2 and "weight" in name:
                out[f"{path}.{name}" if path else name] = {"shape": list(p.shape), "owner": path,
                                                           "type": type(module).__name__}
    return out


def module_type(gm: nn.Module, path: str) -> str:
    """The class name of the user's module at `path` (a GraphModule keeps only stubs of the
    modules it traced through)."""
    types = (getattr(gm, "meta", None) or {}).get(META_KEY, {}).get("types", {})
    if path in types:
        return types[path]
    try:
        return type(gm.get_submodule(path)).__name__
    except AttributeError:
        return "?"


def _trace_once(model: nn.Module, leaves: set[str], concrete_args, training: bool
                ) -> tuple[fx.GraphModule, dict[str, str]]:
    """One trace with every module in `training` mode; also returns the traced-through
    modules that read `self.training`: {path ("" for the root): "file:line"}."""
    model.train(training)
    tracer = _Tracer(leaves)
    attributes = set(model.__dict__)  # FX sets its tensor constants on the root
    try:
        try:
            with _TrainingReads(model, tracer) as reads:
                graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:  # FX raises many types; all mean "not traceable as written"
            where = (tracer.failed_at or [""])[-1] or "<root>"
            frame = _user_frame(e)
            op = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            export = "capture the model with torch.export instead: model: {frontend: export} (or auto)"
            fix = (f"{export},\n  or pass `concrete_args` for inputs that drive Python control flow."  # a leaf
                   if where == "<root>" else  # root cannot help: FX traces the root's forward anyway
                   "mark it a leaf so FX calls it as a black box, e.g. in the spec\n"
                   f"    model: {{leaf_modules: [\"{where}\"]}}\n"
                   f"  or pass `concrete_args` for inputs that drive Python control flow,\n  or {export}.")
            raise TraceError(
                f"cannot trace module '{where}' ({type(_get(model, where)).__name__}): {op}"
                + (f"\n  at {frame}" if frame else "") + "\n  fix: " + fix
            ) from e
        if concrete_args:
            _default_to_concrete(model, graph, concrete_args)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    finally:
        for name in set(model.__dict__) - attributes:  # the user's model as it was
            del model.__dict__[name]
    for name in tracer.tensor_attrs.values():  # trace-time constants are not the model's state
        if name in gm._buffers:
            gm._non_persistent_buffers_set.add(name)
    return gm, reads.found


class _TrainingReads:
    """Logs reads of `self.training` by the modules FX traces through: each one's class is
    swapped, for the duration, for a subclass whose `training` is a logging property."""

    _subclasses: dict[type, type] = {}

    def __init__(self, model: nn.Module, tracer: _Tracer):
        self.model, self.tracer = model, tracer
        self.found: dict[str, str] = {}
        self.swapped: list[tuple[nn.Module, type]] = []

    def __enter__(self) -> "_TrainingReads":
        skip: list[str] = []  # leaves and what is inside them never run while tracing
        for path, m in self.model.named_modules():
            if any(path.startswith(s + ".") for s in skip):
                continue
            if path and self.tracer.is_leaf_module(m, path):
                skip.append(path)
                continue
            base = type(m)
            sub = self._subclass(base)
            if sub is None:
                continue
            try:
                m.__class__ = sub
            except TypeError:  # a class that forbids it (slots): its reads go unseen
                continue
            m.__dict__["_fxgrow_path"] = path
            m.__dict__["_fxgrow_reads"] = self.found
            self.swapped.append((m, base))
        return self

    def __exit__(self, *exc) -> None:
        for m, cls in self.swapped:
            m.__class__ = cls
            m.__dict__.pop("_fxgrow_path", None)
            m.__dict__.pop("_fxgrow_reads", None)

    @classmethod
    def _subclass(cls, base: type) -> type | None:
        if isinstance(base.__dict__.get("training"), property) or base.__dict__.get("_fxgrow_probe"):
            return None
        if base not in cls._subclasses:
            def get(self):
                value = self.__dict__["training"]
                reads = self.__dict__.get("_fxgrow_reads")
                if reads is not None:
                    frame = sys._getframe(1)
                    file = frame.f_code.co_filename.replace("\\", "/")
                    if "/torch/fx/" not in file and not file.endswith("torch/nn/modules/module.py"):
                        reads.setdefault(self.__dict__["_fxgrow_path"], _where(file, frame.f_lineno))
                return value

            def set(self, value):
                self.__dict__["training"] = value

            attributes = {"training": property(get, set), "_fxgrow_probe": True,
                          "__module__": base.__module__, "__qualname__": base.__qualname__}
            traceable = TRACEABLE_FORWARDS.get(base)
            if traceable is not None and traceable.root is not None:  # (FX traces the root's class forward)
                attributes["forward"] = traceable.root
            cls._subclasses[base] = type(base.__name__, (base,), attributes)
        return cls._subclasses[base]


def _where(file: str, line: int) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            file = file.split(marker)[-1]
    return f"{file}:{line}"


def _holds_weights(module: nn.Module) -> bool:
    """Whether `module` holds a weight matrix (a parameter of two or more dims)."""
    return any(p.dim() >= 2 for p in module.parameters())


@contextmanager
def _model_kept(model: nn.Module):
    """Restore every module's mode and every buffer the trace changed in place."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b._version, b.detach().clone()) for b in _unique(model.buffers())]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, version, value in buffers:
                if b._version != version:
                    b.copy_(value)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def _keep_versions(model: nn.Module, gm: fx.GraphModule) -> None:
    """State-dict versions as the user's modules have them (MNASNet's loader reads its own
    version): a GraphModule's stub modules would say 1. The root's rides in `gm.meta`, which
    copies of the GraphModule keep (its own attributes they do not)."""
    for path, sub in gm.named_modules():
        try:
            original = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        version = getattr(type(original), "_version", 1)
        if path and getattr(sub, "_version", 1) != version:
            sub._version = version
    gm._register_state_dict_hook(_root_version)


def _root_version(module: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    version = (getattr(module, "meta", None) or {}).get(META_KEY, {}).get("version")
    if version is not None:
        local_metadata["version"] = version


# --- train and eval graphs in one -------------------------------------------------------------

def _merge_modes(gm: fx.GraphModule, other: fx.GraphModule, readers: dict[str, str], model: nn.Module) -> int:
    """Make `gm` (traced in train mode) compute what `other` (eval mode) computes while not
    training: every constant argument that differs becomes a `ModeSelect` node. Returns their
    number; raises TraceError when the graphs differ in anything but constants."""
    ours, theirs = list(gm.graph.nodes), list(other.graph.nodes)
    mapping: dict[fx.Node, fx.Node] = {}
    for a, b in zip(ours, theirs):
        if _signature(a) != _signature(b):
            raise _mode_error(a, b, readers, model, "runs other operations")
        if a.op == "get_attr" and not _same_tensor(fetch(gm, a.target), fetch(other, b.target)):
            raise _mode_error(a, b, readers, model, "computes another constant tensor")
        mapping[b] = a
    if len(ours) != len(theirs):
        extra = ours[len(theirs)] if len(ours) > len(theirs) else theirs[len(ours)]
        raise _mode_error(extra, extra, readers, model, "runs other operations")
    selects: list[tuple[fx.Node, Any, Any]] = []

    def merged(x: Any, y: Any, node: fx.Node) -> Any:
        if isinstance(x, fx.Node):
            if mapping.get(y) is not x:
                raise _mode_error(node, node, readers, model, "wires its operations differently")
            return x
        if isinstance(x, (list, tuple)) and type(x) is type(y) and len(x) == len(y):
            values = [merged(i, j, node) for i, j in zip(x, y)]
            return type(x)(*values) if hasattr(x, "_fields") else type(x)(values)
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            return {k: merged(x[k], y[k], node) for k in x}
        if isinstance(x, slice) and isinstance(y, slice):
            return slice(merged(x.start, y.start, node), merged(x.stop, y.stop, node), merged(x.step, y.step, node))
        if _same_value(x, y):
            return x
        if isinstance(x, (torch.Tensor, fx.Node)) or isinstance(y, (torch.Tensor, fx.Node)):
            raise _mode_error(node, node, readers, model, "passes other tensors")
        name = f"mode_select.{len(selects)}"
        gm.add_submodule(name, ModeSelect(x, y))
        with gm.graph.inserting_before(node):
            select = gm.graph.call_module(name, ())
        select.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        selects.append((select, x, y))
        return select

    for a, b in zip(ours, theirs):
        if a.op in ("placeholder", "get_attr"):
            continue
        a.args = merged(a.args, b.args, a)
        a.kwargs = merged(a.kwargs, b.kwargs, a)
    gm.graph.lint()
    gm.recompile()
    return len(selects)


def fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _same_tensor(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    return a is b


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # an object without a plain equality
        return a is b


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return "_tensor_constant" if target.startswith("_tensor_constant") else target
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _signature(node: fx.Node) -> tuple:
    def shape(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return "%"
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(shape(x) for x in a))
        if isinstance(a, dict):
            return tuple((k, shape(v)) for k, v in a.items())
        if isinstance(a, slice):
            return ("slice", shape(a.start), shape(a.stop), shape(a.step))
        return "%" if isinstance(a, torch.Tensor) else "c"
    return node.op, _target_name(node.target), shape(node.args), shape(node.kwargs)


def _owner(node: fx.Node) -> list[str]:
    """The module paths a node was traced in, outermost first."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _mode_error(ours: fx.Node, theirs: fx.Node, readers: dict[str, str], model: nn.Module, what: str) -> TraceError:
    stack = _owner(ours) or _owner(theirs)
    where = stack[-1] if stack else ""
    reader = next((p for p in reversed([""] + stack) if p in readers), next(iter(readers), ""))
    shown = lambda p: f"'{p}' ({type(_get(model, p or '<root>')).__name__})" if p else \
        f"the root ({type(model).__name__})"  # noqa: E731
    fix = ("build the model without the train-only branch, or keep the module opaque with "
           f"model.leaf_modules: [\"{reader}\"] (its weights are then not rewritten)") if reader else \
        "build the model without the train-only branch (its forward reads self.training)"
    at = f" in {shown(where)}" if where != reader else ""
    return TraceError(
        f"cannot trace {shown(reader)} for both train() and eval(): it reads self.training at "
        f"{readers.get(reader, '?')}, and in eval mode the model {what}{at} (node '{ours.name}'); "
        f"a traced graph would keep one mode's branch in both.\n  fix: {fix}")


def _default_to_concrete(model: nn.Module, graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """FX keeps a specialized argument as a placeholder with its original default and asserts
    it equals the traced value: make that value the default, so `gm(x)` runs as traced."""
    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name in concrete_args:
            node.args = (concrete_args[name],)


def _get(model: nn.Module, path: str) -> nn.Module:
    return model if path == "<root>" else model.get_submodule(path)


def _user_frame(e: BaseException) -> str:
    """The innermost frame outside torch: the line of user code that broke tracing."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "fxgrow/trace.py" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"
