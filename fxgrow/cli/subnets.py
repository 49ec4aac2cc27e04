"""`fxgrow eval` and `fxgrow extract`: the sub-models of a sorted-sliced run.

Plain functions with typer signatures, listed in `COMMANDS`; the main app registers each
under its function name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import FxgrowError
from .options import TRUST_CODE_HELP, output_file

console = Console()


def _load(target: Path, model: Optional[str], trust_code: bool):
    """(spec, rewritten model) of a run folder (trained weights) or a spec file (fresh ones)."""
    from .. import api
    from ..specs.root import load_spec

    if target.is_dir() or target.suffix == ".pt":
        return api.restore(target, model, trust_code=trust_code, uses_data=True)
    spec = load_spec(target)
    return spec, api.compile_spec(spec, api.build_model(spec, model)).graph_module.eval()


def _device(name: str):
    from ..train.loop import device_for
    return device_for(name, "--device")


def _slicing(spec) -> Any:
    return next((p for p in spec.passes if p.kind == "sorted_slicing"), None)


def _data(spec, device):
    from ..train.data import load_data
    return load_data(spec.train.data).to(device)


def eval(  # noqa: A001  (the command's name)
    target: Path = typer.Argument(..., help="A run folder (its trained model) or a spec YAML (fresh weights)."),
    model: Optional[str] = typer.Argument(None, help="Default: the model the run or spec names."),
    grid: bool = typer.Option(False, "--grid", help="Evaluate every sub-model of the sorted_slicing grid."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Heatmap PNG of accuracy (width x depth); "
                                        "default with --grid on a run: RUN/grid.png (needs matplotlib)."),
    recalibrate: bool = typer.Option(True, help="Recalibrate BatchNorm per sub-model when the spec says bn: recalibrate."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Test accuracy of a model, or with --grid of every sub-model (params, FLOPs, share of the largest)."""
    from ..subnets import (calibration_inputs, data_evaluator, evaluate_grid, find_state, grid_dims,
                           grid_table_columns, grid_table_rows, has_batch_norm)

    output_file(plot, "--plot")
    dev = _device(device)
    spec, gm = _load(target, model, trust_code)
    gm = gm.to(dev)
    from ..train.objectives import build_objective

    data = _data(spec, dev)
    from ..train.preflight import check_model_fits
    objective = build_objective(spec.train.objective_name, data.num_classes)
    check_model_fits(gm, data.example(), data.num_classes, str(model or spec.model.entry),
                     f"train.data: {spec.train.data.name}", objective)
    evaluate = data_evaluator(data, batch_size, dev, objective)
    if not grid:
        metrics = evaluate(gm)
        ppl = f", perplexity {metrics['perplexity']:.2f}" if "perplexity" in metrics else ""
        console.print(f"test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}{ppl}")
        return
    slicing = _slicing(spec)
    if slicing is None or find_state(gm) is None:
        raise FxgrowError("--grid needs a spec with a sorted_slicing pass")
    calibration = None
    if recalibrate and slicing.bn == "recalibrate" and has_batch_norm(gm):
        calibration = calibration_inputs(data, slicing.recalibrate_batches, spec.train.batch_size, dev, spec.train.seed)
    rows = evaluate_grid(gm, evaluate, data.example(), calibration=calibration)
    table = Table(title=escape(f"sub-models of {target}") + (" (BN recalibrated)" if calibration else ""))
    for column in grid_table_columns(rows):
        table.add_column(column, justify="right")
    for row in grid_table_rows(rows):
        table.add_row(*row)
    console.print(table)
    if grid_dims(rows) != ["width"]:  # the heatmap is width x depth
        if plot is not None:
            raise FxgrowError(f"--plot draws width x depth; this grid has {', '.join(grid_dims(rows))} and depth")
    elif plot is None and target.is_dir():
        try:
            import matplotlib  # noqa: F401
            plot = target / "grid.png"
        except ImportError:
            console.print("(install matplotlib, the `plot` extra, for a heatmap PNG)")
    if plot is not None:
        write_heatmap(rows, plot)
        console.print(f"wrote {plot}", markup=False)


def write_heatmap(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy of each (width, depth) as a heatmap PNG (the `fxgrow plot` drawing)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise FxgrowError("--plot needs matplotlib: pip install 'fxgrow[plot]'") from None
    from ..plots import submodel_heatmap

    fig = Figure(layout="constrained")
    submodel_heatmap(rows, fig)
    fig.savefig(path, dpi=120)


def extract(
    run: Path = typer.Argument(..., help="Run folder (or its checkpoint.pt)."),
    model: Optional[str] = typer.Argument(None, help="Default: the model the run recorded."),
    width: Optional[float] = typer.Option(None, "--width", help="Width fraction of a grid point (default: the most)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Kept blocks of a grid point (default: the most)."),
    at: Optional[str] = typer.Option(None, "--at", help="A grid point by dimension, e.g. heads=0.5,ffn=0.25,depth=2 "
                                                        "(a missing one: its largest value)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: RUN/subnet_w<W>_d<D>.pt"),
    recalibrate: bool = typer.Option(True, help="Recalibrate BatchNorm on training batches when the spec says "
                                                "bn: recalibrate."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Write one sub-model as a standalone plain model (smaller tensors) and its state_dict;
    for a Hugging Face model also as its own class from a smaller config (save_pretrained
    into <output>_hf/), or say which config field cannot express it."""
    import torch

    from ..analysis import measure
    from ..subnets import calibration_inputs, find_state, has_batch_norm, point_dict, resolve_point, subnet
    from ..subnets import extract as extract_subnet, recalibrate as recalibrate_bn
    from ..train.checkpoint import save_file

    output_file(output, "--output")
    spec, gm = _load(run, model, trust_code)
    state = find_state(gm)
    if state is None:
        raise FxgrowError(f"{run}: the run has no sorted_slicing sub-models")
    coordinates = parse_point(at)
    if depth is not None or "depth" not in coordinates:
        coordinates["depth"] = depth
    point = resolve_point(state, width, **coordinates)
    named = point_dict(state, point)
    slicing = _slicing(spec)
    note = ""
    if recalibrate and slicing is not None and slicing.bn == "recalibrate" and has_batch_norm(gm):
        data = _data(spec, torch.device("cpu"))
        with subnet(gm, **named):
            used = recalibrate_bn(gm, calibration_inputs(data, slicing.recalibrate_batches, spec.train.batch_size,
                                                         torch.device("cpu"), spec.train.seed))
        note = f", BN recalibrated on {used} batches"
    small = extract_subnet(gm, at=point).eval()
    base = run if run.is_dir() else run.parent
    name = (f"w{point[0]:g}" if state.dims == ("width",)
            else "_".join(f"{d}{f:g}" for d, f in zip(state.dims, point)))
    target = output or base / f"subnet_{name}_d{point[-1]}.pt"
    save_file(small, target)
    state_path = target.with_name(f"{target.stem}_state_dict.pt")
    save_file(small.state_dict(), state_path)
    from .. import api
    cost = measure(small, api.example_input(spec))
    console.print(f"sub-model {state.describe(point)}: {cost.params:,} parameters, "
                  f"{cost.flops:,} FLOPs{note}\nwrote {target} and {state_path}", markup=False)
    _write_pretrained(spec, model, small, target.with_name(f"{target.stem}_hf"))


def _write_pretrained(spec, model: Optional[str], small, folder: Path) -> None:
    """The sub-model as the run's Hugging Face class, when the run trained one."""
    from .. import api
    from ..integrations.hf_extract import is_pretrained, write_pretrained

    original = api.build_model(spec, model)
    if not is_pretrained(original):
        return
    try:
        write_pretrained(original, small, api.example_input(spec), folder)
    except FxgrowError as err:
        console.print(f"no {type(original).__name__} written: {err}", markup=False)
        return
    console.print(f"wrote {folder}/ ({type(original).__name__}.from_pretrained loads it)", markup=False)


def parse_point(text: str | None) -> dict[str, Any]:
    """`--at heads=0.5,ffn=0.25,depth=2` -> {"heads": 0.5, "ffn": 0.25, "depth": 2}."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            out[name] = int(value) if name == "depth" else float(value)
        except ValueError:
            raise FxgrowError(f"--at {text}: '{part}' is not dimension=number (e.g. heads=0.5,depth=2)") from None
        if not sep or not name:
            raise FxgrowError(f"--at {text}: '{part}' is not dimension=number (e.g. heads=0.5,depth=2)")
    return out


COMMANDS = [eval, extract]
