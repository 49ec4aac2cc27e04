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
    from ..subnets import (calibration_inputs, data_evaluator, evaluate_grid, find_state, grid_table_rows,
                           has_batch_norm)

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
    for column in ("width", "blocks", "accuracy", "share", "params", "FLOPs"):
        table.add_column(column, justify="right")
    for row in grid_table_rows(rows):
        table.add_row(*row)
    console.print(table)
    if plot is None and target.is_dir():
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
    width: float = typer.Option(..., "--width", help="Width fraction of a grid point."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Kept blocks of a grid point (default: the most)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: RUN/subnet_w<W>_d<D>.pt"),
    recalibrate: bool = typer.Option(True, help="Recalibrate BatchNorm on training batches when the spec says "
                                                "bn: recalibrate."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Write one sub-model as a standalone plain model (smaller tensors) and its state_dict."""
    import torch

    from ..analysis import measure
    from ..subnets import calibration_inputs, find_state, has_batch_norm, resolve_point, subnet
    from ..subnets import extract as extract_subnet, recalibrate as recalibrate_bn
    from ..train.checkpoint import save_file

    output_file(output, "--output")
    spec, gm = _load(run, model, trust_code)
    state = find_state(gm)
    if state is None:
        raise FxgrowError(f"{run}: the run has no sorted_slicing sub-models")
    point = resolve_point(state, width, depth)
    slicing = _slicing(spec)
    note = ""
    if recalibrate and slicing is not None and slicing.bn == "recalibrate" and has_batch_norm(gm):
        data = _data(spec, torch.device("cpu"))
        with subnet(gm, *point):
            used = recalibrate_bn(gm, calibration_inputs(data, slicing.recalibrate_batches, spec.train.batch_size,
                                                         torch.device("cpu"), spec.train.seed))
        note = f", BN recalibrated on {used} batches"
    small = extract_subnet(gm, *point).eval()
    base = run if run.is_dir() else run.parent
    target = output or base / f"subnet_w{point[0]:g}_d{point[1]}.pt"
    save_file(small, target)
    state_path = target.with_name(f"{target.stem}_state_dict.pt")
    save_file(small.state_dict(), state_path)
    from .. import api
    cost = measure(small, api.example_input(spec))
    console.print(f"sub-model width {point[0]:g}, depth {point[1]}: {cost.params:,} parameters, "
                  f"{cost.flops:,} FLOPs{note}\nwrote {target} and {state_path}", markup=False)


COMMANDS = [eval, extract]
