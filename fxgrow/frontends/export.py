"""The export front-end: a model torch.fx cannot trace, captured with torch.export.

`export_model(model, args, kwargs)`:
1. exports a copy of the model in train mode (non-strict; every input dim `Dim.AUTO`, so batch
   and sequence length stay free where the model allows; a Hugging Face model's
   `config.use_cache` is switched off on the copy);
2. turns `ExportedProgram.module()` into a plain `fx.GraphModule`: positional inputs, the
   output's `logits` (a `ModelOutput` or dict) or its one tensor, one `get_attr` per
   parameter (a tied weight is read by its first name, as `named_parameters` gives it), every
   parameter and buffer of the model at its original path (tied aliases included), so its
   `state_dict` is the model's key for key;
3. makes it follow train()/eval() (`modes.make_mode_aware`), marks its layers
   (`aten_layers.mark_layers`), drops export's metadata asserts (they pin the device);
4. checks it against the model, bit for bit, in eval and train (`modes.verify_modes`).

Anything export cannot capture is refused with export's reason and the innermost line of
model code it stopped at.
"""
from __future__ import annotations

import copy
import inspect
import traceback
from typing import Any

import torch
from torch import fx, nn

from ..errors import TraceError
from ..trace import META_KEY
from .aten_layers import mark_layers
from .modes import make_mode_aware, verify_modes

_DROPPED = (torch.ops.aten._assert_tensor_metadata.default,)


def export_model(model: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """`model` as a plain GraphModule of aten ops with fxgrow's layer tags (see the module
    docstring). `args`/`kwargs`: example inputs (batch of 2 or more: a batch of 1 would be
    specialized). The user's model is not changed."""
    kwargs = dict(kwargs or {})
    captured = _copy_for_export(model)
    ep = _export(captured, args, kwargs, train=True)
    exported = ep.module(check_guards=False)
    graph = exported.graph
    pick = _pick_output(graph, type(model).__name__)
    graph._codegen = fx.graph.CodeGen()  # plain positional forward, no pytree flattening
    names = {id(p): n for n, p in reversed(list(captured.named_parameters(remove_duplicate=False)))}
    _one_read_per_parameter(exported, graph, names)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _DROPPED]:
        graph.erase_node(node)
    _devices_follow_input(graph, _device_of(args, kwargs))
    graph.eliminate_dead_code()
    graph._tracer_cls, graph._tracer_extras = None, {}  # pickling re-traces with them (copies read the
    gm = fx.GraphModule(exported, graph, class_name=type(model).__name__)  # graph's): export's cannot be rebuilt
    _attach_state(gm, captured)
    types = {path: type(m).__name__ for path, m in model.named_modules()}
    selects = make_mode_aware(gm, captured)
    layers = mark_layers(gm, types)
    gm.graph.lint()
    gm.recompile()
    gm.meta[META_KEY] = {
        "frontend": "export", "types": types, "leaf_modules": [], "mode_leaves": [], "mode_readers": {},
        "mode_selects": selects, "layers": layers, "weights": _weight_matrices(model),
        "version": getattr(type(model), "_version", 1),
    }
    verify_modes(gm, model, args, kwargs, pick,
                 lambda: _export(_copy_for_export(model), args, kwargs, train=False).module(check_guards=False))
    return gm


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else None


def _devices_follow_input(graph: fx.Graph, device: torch.device | None) -> None:
    """Export writes the device it ran on into the graph (`arange(..., device=cpu)`, rotary's
    `to(cpu)`): make each such argument the first input's device, read at run time, so the
    module runs wherever it is moved (as the model's own `x.device` did)."""
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if device is None or first is None:
        return
    users = [n for n in graph.nodes if n.op == "call_function"
             and any(isinstance(a, torch.device) and a == device for a in (*n.args, *n.kwargs.values()))]
    if not users:
        return
    with graph.inserting_after(next(n for n in reversed(graph.nodes) if n.op == "placeholder")):
        at = graph.call_function(getattr, (first, "device"))
    for node in users:
        node.args = tuple(at if isinstance(a, torch.device) and a == device else a for a in node.args)
        node.kwargs = {k: at if isinstance(a, torch.device) and a == device else a for k, a in node.kwargs.items()}


def _copy_for_export(model: nn.Module) -> nn.Module:
    """A deep copy (export shares parameters with what it captures), without a KV cache."""
    captured = copy.deepcopy(model)
    config = getattr(captured, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False  # a bool on the config: as a kwarg it would become a graph input
    return captured


def _export(model: nn.Module, args: tuple, kwargs: dict, train: bool) -> torch.export.ExportedProgram:
    model.train(train)
    auto = lambda t: {d: torch.export.Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None  # noqa: E731
    shapes = _dynamic_shapes(model, args, kwargs, auto)
    try:
        return torch.export.export(model, tuple(args), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # export raises many types; each means "not capturable as written"
        raise TraceError(export_failure(model, e)) from e


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, auto) -> Any:
    if not kwargs:
        return tuple(auto(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: auto(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(auto(v) for v in value)
        else:
            out[name] = auto(value)
    return out


def export_failure(model: nn.Module, e: BaseException) -> str:
    """Why torch.export could not capture `model`: the error's first line and the innermost
    frame outside torch and fxgrow (the model's own line)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and "/fxgrow/" not in f.filename]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    at = f"\n  at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"torch.export cannot capture {type(model).__name__}: {type(e).__name__}: {first}{at}"


def _pick_output(graph: fx.Graph, name: str):
    """Keep the output's `logits` leaf (a ModelOutput or dict) or its one tensor; returns the
    same choice as a function of the model's own output, for the checks."""
    out = next(n for n in graph.nodes if n.op == "output")
    spec = graph._codegen.pytree_info.out_spec
    leaves = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    keys = list(spec.context) if isinstance(spec.context, (list, tuple)) else []
    if "logits" in keys and len(leaves) == len(keys):
        out.args = (leaves[keys.index("logits")],)
        return lambda o: o["logits"] if isinstance(o, dict) else o.logits
    if len(leaves) == 1:
        out.args = (leaves[0],)
        return lambda o: torch.utils._pytree.tree_leaves(o)[0]
    raise TraceError(f"{name} returns {spec}: the export front-end takes a model returning one tensor, or an "
                     "output with `logits` (a Hugging Face ModelOutput or a dict)")


def _one_read_per_parameter(root: nn.Module, graph: fx.Graph, names: dict[int, str]) -> None:
    """Every get_attr of one tensor becomes one get_attr of its first name (tied weights: one
    chain), placed where the first of them was."""
    first: dict[int, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = _fetch(root, node.target)
        key = id(value)
        if key not in names:
            continue
        if key not in first:
            node.target = names[key]
            first[key] = node
        else:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _attach_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Every parameter and buffer of `model` at its own path in `gm` (the same tensors; a tied
    alias holds the same Parameter), buffers as persistent as they were."""
    for path, module in model.named_modules(remove_duplicate=False):
        owner = _ensure(gm, path)
        for name, p in module._parameters.items():
            if p is not None:
                owner._parameters[name] = p
        for name, b in module._buffers.items():
            if b is not None:
                owner._buffers[name] = b
                if name in module._non_persistent_buffers_set:
                    owner._non_persistent_buffers_set.add(name)
                else:
                    owner._non_persistent_buffers_set.discard(name)


def _ensure(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        if part not in module._modules:
            module._modules[part] = nn.Module()
        module = module._modules[part]
    return module


def _weight_matrices(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every parameter of two or more dims, once per tensor: what a pass may leave untouched."""
    out, seen = {}, set()
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen and p.dim() >= 2:
                seen.add(id(p))
                out[f"{path}.{name}" if path else name] = {"shape": list(p.shape), "owner": path,
                                                           "type": type(module).__name__}
    return out
