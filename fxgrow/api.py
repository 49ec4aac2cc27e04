"""The Python API the CLI is a thin layer over.

    spec = fxgrow.load_spec("examples/compander.yaml")
    result = fxgrow.compile_spec(spec, model)          # rewritten GraphModule + callbacks
    report = fxgrow.run(spec, "examples/models/small_cnn.py", out_dir="runs/x")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import SpecError
from .fold import fold
from .loader import load_model
from .passes import PASS_REGISTRY, Pass, PassResult, Pipeline
from .specs.root import Spec
from .trace import trace


def build_model(spec: Spec, model_ref: str | None = None) -> nn.Module:
    ref = model_ref or spec.model.entry
    if ref is None:
        raise SpecError([("model.entry", "no model given: pass MODEL or set model.entry")])
    return load_model(ref, spec.model.kwargs)


def example_input(spec: Spec, batch: int | None = None) -> torch.Tensor:
    shape = list(spec.model.example_input)
    if batch is not None:
        shape[0] = batch
    return torch.randn(shape, generator=torch.Generator().manual_seed(spec.train.seed))


def passes_from_spec(spec: Spec) -> list[Pass]:
    return [PASS_REGISTRY[p.kind](p) for p in spec.passes]


def pipeline(spec: Spec) -> Pipeline:
    return Pipeline(passes_from_spec(spec))


def trace_model(spec: Spec, model: nn.Module) -> fx.GraphModule:
    return trace(model, leaf_modules=spec.model.leaf_modules)


def compile_spec(spec: Spec, model: nn.Module | fx.GraphModule) -> PassResult:
    """Trace `model` and apply the spec's passes (on a copy: `model` is not changed)."""
    gm = model if isinstance(model, fx.GraphModule) else trace_model(spec, model)
    return pipeline(spec)(gm, example_input=example_input(spec), seed=spec.train.seed)


def run(spec: Spec, model_ref: str | None = None, out_dir: str | Path | None = None,
        resume: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rewrite, train, fold and save: what `fxgrow apply` does."""
    from .train import Trainer  # the loop is optional for pure graph work

    model = build_model(spec, model_ref)
    result = compile_spec(spec, model)
    trainer = Trainer(result.graph_module, spec.train, callbacks=result.callbacks,
                      out_dir=Path(out_dir) if out_dir else default_out_dir(spec),
                      spec_dump=spec.model_dump(mode="json"), resume=resume)
    report = trainer.fit()
    save_folded(trainer.model, trainer.out_dir, report)
    (trainer.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def default_out_dir(spec: Spec) -> Path:
    import time
    return Path("runs") / f"{spec.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_folded(model: nn.Module, out_dir: Path, report: dict[str, Any]) -> Path:
    """Write the folded plain model (`folded.pt`: the module; `folded_state_dict.pt`)."""
    if not isinstance(model, fx.GraphModule):
        return out_dir
    folded = fold(model).cpu().eval()
    torch.save(folded, out_dir / "folded.pt")
    torch.save(folded.state_dict(), out_dir / "folded_state_dict.pt")
    report.setdefault("artifacts", {}).update(folded="folded.pt", folded_state_dict="folded_state_dict.pt")
    return out_dir / "folded.pt"
