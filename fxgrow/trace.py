"""Symbolic tracing with spec-controlled leaf modules, and errors a user can act on."""
from __future__ import annotations

import inspect
import traceback
from typing import Any, Iterable

import torch
from torch import fx, nn

from .errors import TraceError
from .layers import kind_of


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps chosen modules as leaves and remembers the module path being
    traced, so a failure can name it."""

    def __init__(self, leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.leaf = set(leaf_modules)  # type names ("MyBlock") or module paths ("layer1.0")
        self.stack: list[str] = []
        self.failed_at: list[str] | None = None  # the module stack when tracing broke

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module of a registered layer kind stays one call, as torch.nn's do.
        if qualname in self.leaf or type(m).__name__ in self.leaf or kind_of(m, exact=True) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module, leaf_modules: Iterable[str] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule. Raises TraceError naming the module path and the
    operation that could not be traced, and how to fix it."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # FX raises many types; all mean "not traceable as written"
        where = (tracer.failed_at or [""])[-1] or "<root>"
        frame = _user_frame(e)
        op = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        leaf_hint = where if where != "<root>" else type(model).__name__
        raise TraceError(
            f"cannot trace module '{where}' ({type(_get(model, where)).__name__}): {op}"
            + (f"\n  at {frame}" if frame else "")
            + "\n  fix: mark it a leaf so FX calls it as a black box, e.g. in the spec\n"
            f"    model: {{leaf_modules: [\"{leaf_hint}\"]}}\n"
            "  or pass `concrete_args` for inputs that drive Python control flow."
        ) from e
    if concrete_args:
        _default_to_concrete(model, graph, concrete_args)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


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
