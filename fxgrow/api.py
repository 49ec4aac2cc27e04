"""The Python API the CLI is a thin layer over.

    spec = fxgrow.load_spec("examples/compander.yaml")
    result = fxgrow.compile_spec(spec, model)          # rewritten GraphModule + callbacks
    report = fxgrow.run(spec, "examples/models/small_cnn.py", out_dir="runs/x")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .analysis.shapes import Inputs
from .errors import SpecError
from .fold import fold
from .loader import load_model
from .passes import PASS_REGISTRY, Pass, PassResult, Pipeline
from .specs.root import Spec
from .frontends import capture, frontend_of


def build_model(spec: Spec, model_ref: str | None = None) -> nn.Module:
    ref = model_ref or spec.model.entry
    if ref is None:
        raise SpecError([("model.entry", "no model given: pass MODEL or set model.entry")])
    torch.manual_seed(spec.train.seed)  # the same spec builds the same initial weights
    return load_model(ref, spec.model.kwargs)


def example_input(spec: Spec, batch: int | None = None) -> torch.Tensor | Inputs:
    """The spec's example input, drawn from a generator seeded by `train.seed`: standard
    normal floats, or integer ids uniform in [low, high). One tensor, or `Inputs` (positional
    and keyword tensors, drawn in that order) when the spec gives several. `batch` replaces
    the first dim of each."""
    generator = torch.Generator().manual_seed(spec.train.seed)

    def draw(ex) -> torch.Tensor:
        shape = list(ex.shape)
        if batch is not None:
            shape[0] = batch
        dtype = getattr(torch, ex.dtype)
        if ex.high is not None:
            return torch.randint(ex.low, ex.high, shape, generator=generator, dtype=dtype)
        return torch.randn(shape, generator=generator, dtype=dtype)

    args = tuple(draw(ex) for ex in spec.model.examples)
    kwargs = {name: draw(ex) for name, ex in spec.model.keyword_examples.items()}
    return args[0] if len(args) == 1 and not kwargs else Inputs(args, kwargs)


def passes_from_spec(spec: Spec) -> list[Pass]:
    return [PASS_REGISTRY[p.kind](p) for p in spec.passes]


def pipeline(spec: Spec) -> Pipeline:
    return Pipeline(passes_from_spec(spec))


def trace_model(spec: Spec, model: nn.Module) -> fx.GraphModule:
    """`model` as a GraphModule through the spec's `model.frontend` (export runs on the example
    input at batch 2 or more, so that the batch size stays free)."""
    example = None
    if spec.model.frontend != "fx":
        example = example_input(spec, batch=max(2, spec.model.example.shape[0]))
    return capture(model, spec.model.frontend, example, leaf_modules=spec.model.leaf_modules,
                   concrete_args=spec.model.concrete_args or None)


def compile_spec(spec: Spec, model: nn.Module | fx.GraphModule, example: Any = None) -> PassResult:
    """Trace `model` and apply the spec's passes (on a copy: `model` is not changed).
    `example` (a tensor, a tuple of them, a dict of keyword tensors or `Inputs`) replaces
    the spec's `model.example_input`."""
    gm = model if isinstance(model, fx.GraphModule) else trace_model(spec, model)
    return pipeline(spec)(gm, example_input=example_input(spec) if example is None else example,
                          seed=spec.train.seed)


def run(spec: Spec, model_ref: str | None = None, out_dir: str | Path | None = None,
        resume: str | Path | None = None, overrides: dict[str, Any] | None = None,
        overwrite: bool = False, example: Any = None) -> dict[str, Any]:
    """Rewrite, train, fold and save: what `fxgrow apply` does. A new run needs an empty
    (or new) `out_dir`; `overwrite` clears an earlier run there first. `example` replaces
    the spec's example input for the rewrite (see `compile_spec`). report.json's `coverage`
    says, per pass, which weight matrices it rewrote and why it left the others."""
    from .train import Trainer  # the loop is optional for pure graph work
    from .train.checkpoint import find_checkpoint
    from .train.loop import device_for
    from .train.run_folder import check_free, check_unlocked
    from .trust import sign

    device_for(spec.train.device)  # before any work: a device this machine does not have
    if resume is not None:
        check_unlocked(Path(resume) if Path(resume).is_dir() else Path(resume).parent)
    resume_path = find_checkpoint(Path(resume)) if resume is not None else None
    if out_dir is not None and (resume_path is None or resume_path.parent.resolve() != Path(out_dir).resolve()):
        check_free(Path(out_dir), overwrite)  # before any work: the Trainer checks again under its lock
    model = build_model(spec, model_ref)
    if model_ref is not None:  # the run folder then says which model it trained
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"entry": model_ref})})
    result = compile_spec(spec, model, example)
    coverage = result.coverage()

    def finish(trained: nn.Module, folder: Path, report: dict[str, Any]) -> None:
        report["coverage"] = coverage
        report["frontend"] = frontend_of(result.graph_module)  # what `auto` chose, too
        save_folded(trained, folder, report)

    trainer = Trainer(result.graph_module, spec.train, callbacks=result.callbacks,
                      out_dir=Path(out_dir) if out_dir else None,
                      spec_dump=spec_dump(spec), resume=resume, on_finish=finish,
                      signature=sign(spec),  # this user ran this code: later rebuilds may import it
                      overwrite=overwrite)
    return trainer.fit()


def spec_dump(spec: Spec) -> dict[str, Any]:
    """The spec as the user wrote it (set fields only): parsing it again gives the same
    spec, which a dump with every default would not (strict targets, epochs vs steps)."""
    return spec.model_dump(mode="json", exclude_unset=True)


def restore(run: str | Path, model_ref: str | None = None, trust_code: bool = False,
            uses_data: bool = False) -> tuple[Spec, fx.GraphModule]:
    """The rewritten model as a run's checkpoint left it (growth and all), on the CPU.

    The code the run names is imported only if `model_ref` replaces it, `trust_code` is
    set, or this user's fxgrow signed the run (see `fxgrow.trust`); `uses_data`: the
    caller will load the run's dataset, so its `python:` data function counts too."""
    from .specs.root import parse_spec
    from .train.checkpoint import (find_checkpoint, load_checkpoint, load_model_state, replay_structures,
                                   restore_callback)
    from .trust import check_run_code

    path = find_checkpoint(Path(run))
    state = load_checkpoint(path)
    spec = parse_spec(state["spec"], source=f"{path} (spec)")
    check_run_code(spec, state.get("signature"), path, model_given=model_ref is not None, uses_data=uses_data,
                   trust_code=trust_code)
    result = compile_spec(spec, build_model(spec, model_ref))
    model = replay_structures(result.graph_module, result.callbacks, state, path)  # growth, as the run had it
    for cb in result.callbacks:
        restore_callback(cb, state, None, path)
    load_model_state(model, state["model"], path, f"the model {model_ref or spec.model.entry} builds")
    return spec, model.eval()


def save_folded(model: nn.Module, out_dir: Path, report: dict[str, Any]) -> None:
    """Write the folded plain model (`folded.pt`: the module; `folded_state_dict.pt`)."""
    if not isinstance(model, fx.GraphModule):
        return
    from .train.checkpoint import save_file

    folded = fold(model).cpu().eval()
    save_file(folded, out_dir / "folded.pt")
    save_file(folded.state_dict(), out_dir / "folded_state_dict.pt")
    report.setdefault("artifacts", {}).update(folded="folded.pt", folded_state_dict="folded_state_dict.pt")
