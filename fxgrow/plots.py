"""Figures of a training run folder (`fxgrow plot RUN`), drawn from what the run wrote:

    metrics.jsonl  train/test records (loss, accuracy), `prune_regrow/*` event records,
                   `compander` weight percentiles, `grow` events, cumulative `flops`
    report.json    the `sorted_slicing` grid, the prune schedule's step counts
    spec.yaml      the prune_regrow pass (its target schedule between events)

    figures = plot_run("runs/granet")            # {"curves": Path(...), "sparsity": ...}

Each figure is drawn exactly when its data is there; a run that is still training (no
report.json yet) gets what its metrics hold so far. matplotlib (the `plot` extra) is
imported only to draw, through its object API: no pyplot state, no backend switch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import FxgrowError

PRUNE_PREFIX = "prune_regrow/"
# Symmetric percentile pairs drawn as bands (TensorBoard's distribution plot, the
# compander paper's Fig. 3), outermost first.
BANDS = ((100, 0), (93, 7), (84, 16), (69, 31))


@dataclass
class Run:
    """A run folder's records, split by kind; every series is ordered by step."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)
    prune: list[dict[str, Any]] = field(default_factory=list)      # prefix stripped
    compander: list[dict[str, Any]] = field(default_factory=list)  # {"step", **snapshot}
    growth: list[dict[str, Any]] = field(default_factory=list)
    flops: list[dict[str, Any]] = field(default_factory=list)      # one per step (the last logged)
    report: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None

    @property
    def growth_steps(self) -> list[tuple[int, Any]]:
        """(step, factor) of every growth event."""
        events = [(r["step"], r.get("factor")) for r in self.growth]
        grow = (self.report or {}).get("grow") or {}
        if not events and grow.get("grown") and grow.get("step") is not None:
            events = [(grow["step"], grow.get("factor"))]
        return events

    @property
    def grid(self) -> list[dict[str, Any]]:
        section = (self.report or {}).get("sorted_slicing") or {}
        return [r for r in section.get("grid") or [] if r.get("accuracy") is not None]


def run_folder(path: str | Path) -> Path:
    """The run folder of RUN (a folder, or a file inside one such as checkpoint.pt)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "metrics.jsonl").is_file():
        raise FxgrowError(f"{path}: no metrics.jsonl there; give a run folder (`fxgrow apply ... --out RUN`)")
    return folder


def load_run(path: str | Path) -> Run:
    folder = run_folder(path)
    run = Run(folder)
    flops: dict[int, dict[str, Any]] = {}
    for record in _read_jsonl(folder / "metrics.jsonl"):
        split = record.get("split")
        if split == "train":
            run.train.append(record)
        elif split == "test":
            run.test.append(record)
        elif split == "grow":
            run.growth.append(record)
        elif split == "flops":
            flops[record["step"]] = record  # epoch end and train end may log the same step
        elif "compander" in record:
            run.compander.append({"step": record["step"], **record["compander"]})
        elif any(k.startswith(PRUNE_PREFIX) for k in record):
            run.prune.append({"step": record["step"], **{k[len(PRUNE_PREFIX):]: v for k, v in record.items()
                                                         if k.startswith(PRUNE_PREFIX)}})
    run.flops = [flops[s] for s in sorted(flops)]
    for series in (run.train, run.test, run.prune, run.compander, run.growth):
        series.sort(key=lambda r: r["step"])
    if (folder / "report.json").is_file():
        try:
            run.report = json.loads((folder / "report.json").read_text(errors="replace"))
        except json.JSONDecodeError as e:
            raise FxgrowError(f"{folder / 'report.json'}: not valid JSON ({e})") from None
    if (folder / "spec.yaml").is_file():
        from .specs.document import load_yaml
        spec = load_yaml((folder / "spec.yaml").read_bytes(), str(folder / "spec.yaml"))
        run.spec = spec if isinstance(spec, dict) else None
    return run


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # a run still writing: its last line may be partial
                break
            raise FxgrowError(f"{path}:{number}: not a JSON record") from None
    return records


# --- what is drawn --------------------------------------------------------------------------

def prune_schedule(run: Run) -> tuple[list[int], list[float]] | None:
    """The prune_regrow target s_t at every step 0..T, resolved by the pass's own code from
    the run's spec and step count; None when either is missing (a run still training)."""
    passes = (run.spec or {}).get("passes") or []
    spec = next((p for p in passes if isinstance(p, dict) and p.get("kind") == "prune_regrow"), None)
    section = (run.report or {}).get("prune_regrow") or {}
    total = (section.get("schedule") or {}).get("total_steps") or (run.report or {}).get("steps")
    if spec is None or not total:
        return None
    from pydantic import ValidationError

    from .passes.prune_regrow import PruneRegrowSpec, resolve_schedule
    try:
        schedule = resolve_schedule(PruneRegrowSpec.model_validate(spec), int(total))
    except (ValidationError, FxgrowError):
        return None
    steps = list(range(int(total) + 1))
    return steps, [schedule.sparsity_at(t) for t in steps]


def figures_for(run: Run) -> dict[str, Callable[[Run, Any], None]]:
    """The figures this run has data for: name -> draw(run, figure)."""
    available = {}
    if run.train or run.test:
        available["curves"] = draw_curves
    if run.flops:
        available["flops"] = draw_flops
    if run.prune:
        available["sparsity"] = draw_sparsity
    if any(r.get("percentiles") for r in run.compander):
        available["percentiles"] = draw_percentiles
    if run.grid and "width" in run.grid[0]:  # a width x depth heatmap (a heads/ffn/hidden grid has no width)
        available["submodels"] = draw_submodels
    return available


def plot_run(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write `<name>.png` under `out_dir` (default RUN/plots) for every figure the run has
    data for; returns name -> file, in drawing order."""
    _figure_class()  # fail before reading anything
    run = load_run(path)
    out = Path(out_dir) if out_dir is not None else run.path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in figures_for(run).items():
        written[name] = save_figure(lambda fig: draw(run, fig), out / f"{name}.png")
    return written


def write_submodel_heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """The sub-model heatmap of grid rows (`evaluate_grid`'s, or report.json's) as a PNG."""
    return save_figure(lambda fig: submodel_heatmap(rows, fig), path)


def save_figure(draw: Callable[[Any], None], path: str | Path) -> Path:
    """Draw on a fresh matplotlib Figure (sized for two panels; `draw` may resize it) and
    write it as PNG."""
    fig = _figure_class()(figsize=(11, 4.2), layout="constrained")
    draw(fig)
    fig.savefig(path, dpi=120)
    return Path(path)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise FxgrowError("plotting needs matplotlib: pip install 'fxgrow[plot]'") from None
    return Figure


def _mark_growth(ax, run: Run) -> None:
    for i, (step, factor) in enumerate(run.growth_steps):
        ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.2,
                   label=(f"growth x{factor}" if factor else "growth") if i == 0 else None)


def _xy(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in kept], [r[key] for r in kept]


def draw_curves(run: Run, fig) -> None:
    """Loss and accuracy, train and test, over optimizer steps; growth marked."""
    for ax, key in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for records, label, style in ((run.train, "train", "-"), (run.test, "test", "o-")):
            steps, values = _xy(records, key)
            if steps:
                ax.plot(steps, values, style, markersize=3, label=label)
        _mark_growth(ax, run)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    final = (run.report or {}).get("accuracy")
    fig.suptitle(f"{run.path.name}" + (f": test accuracy {final:.4f}" if isinstance(final, float) else ""))


def accuracy_at_flops(run: Run) -> list[tuple[float, float]]:
    """(cumulative training FLOPs, test accuracy) at each step that logged both: no
    interpolation, since growth changes the FLOPs rate inside an interval."""
    at = {r["step"]: r["train_flops"] for r in run.flops if isinstance(r.get("train_flops"), (int, float))}
    return [(at[r["step"]], r["accuracy"]) for r in run.test if r["step"] in at and "accuracy" in r]


def draw_flops(run: Run, fig) -> None:
    """Cumulative training FLOPs over steps, and test accuracy against them (at the steps
    where both were logged)."""
    left, right = fig.subplots(1, 2)
    steps, flops = _xy(run.flops, "train_flops")
    left.plot(steps, flops, "o-", markersize=3, label="this run")
    _mark_growth(left, run)
    left.set_xlabel("optimizer step")
    left.set_ylabel("cumulative training FLOPs")
    left.grid(alpha=0.3)
    left.legend()
    matched = accuracy_at_flops(run)
    if matched:
        right.plot(*zip(*matched), "o-", markersize=3, color="tab:orange")
    right.set_xlabel("cumulative training FLOPs (this run)")
    right.set_ylabel("test accuracy")
    right.grid(alpha=0.3)
    if not matched:
        right.text(0.5, 0.5, "no test record at a step with a FLOPs record", ha="center", va="center",
                   transform=right.transAxes)
    summary = (run.report or {}).get("template_mixing") or {}
    fused = sum(f or 0.0 for f in summary.get("fused_train_flops") or [])
    title = "training FLOPs"
    if fused:
        title += f" (fused runs add {fused:.3g})"
    if isinstance(summary.get("flops_norm"), (int, float)):
        title += f", FLOPs norm {summary['flops_norm']:.3f}"
    fig.suptitle(title)


def draw_sparsity(run: Run, fig) -> None:
    """Global: the target schedule, the target each event applied and the measured
    sparsity; per layer: each weight's measured sparsity at every event."""
    glob, layers = fig.subplots(1, 2, sharey=True)
    schedule = prune_schedule(run)
    if schedule is not None:
        glob.plot(*schedule, "--", color="gray", linewidth=1, label="schedule $s_t$")
    steps, targets = _xy(run.prune, "target_sparsity")
    glob.plot(steps, targets, "x", color="black", label="target at event")
    steps, actual = _xy(run.prune, "actual_sparsity")
    channels = any("channels" in r for r in run.prune)
    glob.plot(steps, actual, "o-", markersize=3, label="measured" + (" (channels)" if channels else ""))
    if channels:
        glob.plot(*_xy(run.prune, "weight_sparsity"), ".-", markersize=3, label="measured (weights)")
    keys = list(dict.fromkeys(k for r in run.prune for k in r.get("layers") or {}))
    colors = _colors(len(keys))
    for key, color in zip(keys, colors):
        kept = [r for r in run.prune if key in (r.get("layers") or {})]
        layers.plot([r["step"] for r in kept], [r["layers"][key] for r in kept], ".-", markersize=2,
                    linewidth=1, color=color, label=key)
    if schedule is not None:
        layers.plot(*schedule, "--", color="gray", linewidth=1)
    for ax, title in ((glob, "global"), (layers, f"per layer ({len(keys)} weights)")):
        _mark_growth(ax, run)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    glob.set_ylabel("sparsity")
    glob.set_ylim(-0.02, 1.02)
    glob.legend(loc="lower right")
    if 0 < len(keys) <= 24:
        layers.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    section = (run.report or {}).get("prune_regrow") or {}
    final = section.get("actual_sparsity")
    fig.suptitle("prune/regrow sparsity" + (f": final {final:.4f}" if isinstance(final, float) else ""))


def _colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def draw_percentiles(run: Run, fig) -> None:
    """The weight distribution of the first and last companded layer over training: the
    percentile bands max/min, 93/7, 84/16, 69/31 and the median, of w = psi(v) and of v."""
    records = [r for r in run.compander if r.get("percentiles")]
    layers = list(dict.fromkeys(k for r in records for k in r["percentiles"] if k != "q"))
    kinds = [k for k in ("w", "v") if any(k in r["percentiles"].get(layer, {}) for r in records for layer in layers)]
    fig.set_size_inches(5.5 * len(kinds), 3.2 * len(layers))
    axes = fig.subplots(len(layers), len(kinds), squeeze=False)
    for i, layer in enumerate(layers):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            kept = [r for r in records if kind in r["percentiles"].get(layer, {})]
            steps = [r["step"] for r in kept]
            series = {q: [r["percentiles"][layer][kind][r["percentiles"]["q"].index(q)] for r in kept]
                      for q in kept[0]["percentiles"]["q"] if all(q in r["percentiles"]["q"] for r in kept)}
            for band, (hi, lo) in enumerate(BANDS):
                if hi in series and lo in series:
                    ax.fill_between(steps, series[lo], series[hi], color="tab:blue", alpha=0.15 + 0.1 * band,
                                    linewidth=0, label=f"{lo}-{hi}")
            if 50 in series:
                ax.plot(steps, series[50], color="tab:blue", linewidth=1.2, label="median")
            _mark_growth(ax, run)
            ax.set_title(f"{layer}: {'w = psi(v)' if kind == 'w' else 'v'}", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("weight percentiles over training (first and last companded layer)")


def draw_submodels(run: Run, fig) -> None:
    """Test accuracy of every (width, depth) sub-model; cells also give its share of the
    largest's accuracy. Grid points a `list` grid leaves out stay blank."""
    submodel_heatmap(run.grid, fig)
    section = (run.report or {}).get("sorted_slicing") or {}
    fig.suptitle(f"sub-model accuracy ({section.get('mode', 'sorted slicing')}, bn {section.get('bn', '-')})")


def submodel_heatmap(rows: list[dict[str, Any]], fig) -> None:
    """Heatmap of rows {"width", "depth", "accuracy", "share"?} (report.json's grid) on `fig`."""
    widths = sorted({r["width"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    acc = [[math.nan] * len(widths) for _ in depths]
    share = [[None] * len(widths) for _ in depths]
    for r in rows:
        i, j = depths.index(r["depth"]), widths.index(r["width"])
        acc[i][j], share[i][j] = r["accuracy"], r.get("share")
    fig.set_size_inches(1.3 * len(widths) + 2.5, 0.9 * len(depths) + 1.8)
    ax = fig.subplots()
    image = ax.imshow(acc, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(widths)), [f"{w:g}" for w in widths])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("width fraction")
    ax.set_ylabel("kept blocks")
    low, high = image.get_clim()
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            if math.isnan(value):
                continue
            bright = high > low and (value - low) / (high - low) > 0.5  # viridis is light at the top
            text = f"{value:.3f}" + (f"\n{share[i][j]:.0%}" if isinstance(share[i][j], (int, float)) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    fig.colorbar(image, ax=ax, label="test accuracy")
