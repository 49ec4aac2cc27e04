"""Rewrite passes, one technique per module. Importing this package registers them all."""
import importlib
import pkgutil

from .base import PASS_REGISTRY, Applied, Match, Pass, PassContext, PassResult, Pipeline, Record, compose, register_pass

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PASS_REGISTRY", "Applied", "Match", "Pass", "PassContext", "PassResult", "Pipeline", "Record",
           "compose", "register_pass"]
