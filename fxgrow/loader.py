"""Resolve MODEL references: `path/to/file.py[:callable]` or `package.module:callable`.

A .py file without a callable name must define `build()` (called) or `model` (an
nn.Module instance or a zero-argument callable)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError

DEFAULT_NAMES = ("build", "model")


def _split(ref: str) -> tuple[str, str | None]:
    head, sep, name = ref.rpartition(":")
    if not sep or "/" in name or name.endswith(".py"):
        return ref, None
    return head, name or None


def _import_file(path: Path) -> Any:
    name = f"fxgrow_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"MODEL {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelLoadError(f"MODEL {path}: importing it failed: {type(e).__name__}: {e}") from e
    return module


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or Path(where).suffix == ".py"


def resolved_reference(ref: str) -> str:
    """`ref` with a file path made absolute (from the current directory): the code it
    names here, whatever folder a run that recorded it is read from."""
    where, name = _split(ref)
    if not _is_file(where):
        return ref
    return str(Path(where).resolve()) + (f":{name}" if name else "")


def load_model(ref: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model `ref` names, calling it with `kwargs`."""
    kwargs = kwargs or {}
    where, name = _split(ref)
    if _is_file(where):
        path = Path(where)
        if not path.is_file():
            raise ModelLoadError(f"MODEL {path}: no such file")
        module = _import_file(path)
        source = str(path)
    else:
        if name is None:
            raise ModelLoadError(f"MODEL {ref!r}: expected a .py file or 'package.module:callable'")
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelLoadError(f"MODEL {ref}: cannot import {where!r}: {e}") from e
        source = where
    names = (name,) if name else DEFAULT_NAMES
    for n in names:
        if hasattr(module, n):
            obj = getattr(module, n)
            break
    else:
        raise ModelLoadError(f"MODEL {source}: defines no {' or '.join(repr(n) for n in names)}"
                             + ("" if name else " (give `file.py:callable` to pick another name)"))
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModelLoadError(f"MODEL {source}:{n} is a {type(obj).__name__}, not a model or callable")
        try:
            obj = obj(**kwargs)
        except Exception as e:
            raise ModelLoadError(f"MODEL {source}:{n}(**{kwargs}) raised {type(e).__name__}: {e}") from e
    elif kwargs:
        raise ModelLoadError(f"MODEL {source}:{n} is a model instance; model.kwargs cannot apply")
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"MODEL {source}:{n} returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj
