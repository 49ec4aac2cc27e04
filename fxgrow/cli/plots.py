"""`fxgrow plot RUN`: PNG figures of a run folder (needs the `plot` extra, matplotlib).

A plain function with a typer signature; the main app registers everything in COMMANDS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)
MISSING_MATPLOTLIB = "`fxgrow plot` needs matplotlib: pip install 'fxgrow[plot]'"

WHAT = {
    "curves": "loss and accuracy, train and test (growth marked)",
    "flops": "cumulative training FLOPs; test accuracy against them",
    "sparsity": "prune/regrow target schedule, global and per-layer sparsity",
    "percentiles": "weight percentiles of the first and last companded layer",
    "submodels": "sub-model accuracy, width x depth",
}


def plot(
    run: Path = typer.Argument(..., help="Run folder (with metrics.jsonl; report.json once finished)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG files (default: RUN/plots)."),
) -> None:
    """Draw a run's figures as PNG files.

    Loss/accuracy curves always; training FLOPs, the sparsity schedule, weight percentiles
    and the sub-model heatmap when the run logged them."""
    from ..plots import plot_run

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # Printed here, not raised: the app's error handler reads messages as rich markup,
        # which would swallow "[plot]".
        err.print(f"error: {MISSING_MATPLOTLIB}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    written = plot_run(run, out_dir)
    if not written:
        console.print(f"{run}: no records to plot yet", markup=False)
        return
    folder = next(iter(written.values())).parent
    console.print(f"wrote {len(written)} figure{'s' if len(written) > 1 else ''} to [bold]{escape(str(folder))}[/]:")
    for name, path in written.items():
        console.print(f"  {path.name:<16} {WHAT.get(name, name)}", highlight=False)


COMMANDS = [plot]
