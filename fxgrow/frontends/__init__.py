"""Front-ends: how a user's model becomes fxgrow's GraphModule (`model.frontend`).

- `fx`: torch.fx symbolic tracing, mode-aware (`fxgrow.trace`); layers stay modules until a
  pass functionalizes them.
- `export`: torch.export (`fxgrow.frontends.export`), for models FX cannot trace (Hugging Face
  transformers); layers are the aten ops on parameters, already functional.
- `auto`: fx, and when FX cannot trace the model, export, with a warning saying why FX
  failed. A model neither can take is refused with both reasons.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

from torch import fx, nn

from ..errors import TraceError
from ..trace import META_KEY, trace

FRONTENDS = ("fx", "export", "auto")


class FrontendWarning(UserWarning):
    """`frontend: auto` fell back to torch.export."""


def capture(model: nn.Module, frontend: str, example: Any, leaf_modules: Iterable[str] = (),
            concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """`model` as a GraphModule through `frontend`. `example`: the inputs export runs on (a
    tensor, a tuple, or `Inputs`), batch of two or more."""
    if isinstance(model, fx.GraphModule):
        return model
    if frontend not in FRONTENDS:
        raise TraceError(f"model.frontend must be one of {', '.join(FRONTENDS)}, not {frontend!r}")
    if frontend == "fx":
        return trace(model, leaf_modules, concrete_args)
    if frontend == "export":
        return _export(model, example)
    try:
        return trace(model, leaf_modules, concrete_args)
    except TraceError as fx_error:
        why = str(fx_error).splitlines()[0]
        try:
            gm = _export(model, example)
        except TraceError as export_error:
            raise TraceError(f"neither front-end can take {type(model).__name__}:\n  torch.fx: {fx_error}\n"
                             f"  torch.export: {export_error}") from export_error
        warnings.warn(f"model.frontend auto: torch.fx cannot trace {type(model).__name__} ({why}); "
                      "captured with torch.export instead (set model.frontend: export to say so)",
                      FrontendWarning, stacklevel=2)
        return gm


def _export(model: nn.Module, example: Any) -> fx.GraphModule:
    from ..analysis.shapes import Inputs
    from .export import export_model

    if example is None:
        raise TraceError("the export front-end runs the model on an example input: give model.example_input")
    if isinstance(example, Inputs):
        return export_model(model, tuple(example.args), dict(example.kwargs))
    return export_model(model, example if isinstance(example, tuple) else (example,))


def frontend_of(gm: nn.Module) -> str:
    """Which front-end captured `gm` ("fx" for a traced or user-made GraphModule)."""
    return ((getattr(gm, "meta", None) or {}).get(META_KEY) or {}).get("frontend", "fx")


def require_channel_rules(gm: nn.Module, what: str) -> None:
    """Refuse `what` (a pass that grows or prunes channels) on an exported graph. Export bakes
    head counts and widths into view/reshape/expand sizes; the channel coupling follows aten
    ops (`aten_coupling`) and lists those literals, but only sorted slicing rewrites them
    (`passes/sorted_slicing_sizes.py`): growth or filter pruning would leave them at the old
    sizes."""
    if frontend_of(gm) == "export":
        raise TraceError(
            f"{what} does not run on a torch.export graph yet: export bakes head counts and widths into "
            "view/reshape/expand sizes, which only sorted_slicing rewrites. Use model.frontend: fx for a model "
            "torch.fx can trace; sorted_slicing and the weight-chain passes (compander, prune_regrow with "
            "unstructured masks, template_mixing) run on exported graphs")
