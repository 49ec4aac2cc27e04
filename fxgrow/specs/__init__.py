"""Validated specs. `load_spec(path)` reads YAML into a frozen `Spec`.

The root spec is imported lazily: it builds its pass union from the pass registry, and
the passes themselves import `specs.base`.
"""
from .base import PassSpec, StrictModel, Targets
from .train import TrainSpec

_ROOT = ("ModelRef", "Spec", "load_spec", "parse_spec", "parse_spec_text", "spec_json_schema",
         "spec_error")


def __getattr__(name: str):
    if name in _ROOT:
        from . import root
        return getattr(root, name)
    raise AttributeError(name)


__all__ = ["PassSpec", "StrictModel", "Targets", "TrainSpec", *_ROOT]
