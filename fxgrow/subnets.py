"""Sub-models of a sorted-sliced model: pick one, recalibrate its BatchNorm statistics,
evaluate the whole grid, extract one as a standalone plain model.

    gm = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})])(model, x).graph_module
    with subnet(gm, 0.5, None):
        y = gm(x)                       # the half-width sub-model
    small = extract(gm, 0.5)            # a plain GraphModule with half-size tensors; small(x) == y
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .analysis import measure
from .errors import FxgrowError
from .fold import fold
from .nn.slicing import LayerExit, SubnetState

Point = tuple  # (width, depth); with several dimensions (f_1, ..., f_n, depth) in `state.dims` order


def find_state(model: nn.Module) -> SubnetState | None:
    """The slicing state of a model rewritten by sorted_slicing, else None."""
    return next((m for m in model.modules() if isinstance(m, SubnetState)), None)


def _require_state(model: nn.Module) -> SubnetState:
    state = find_state(model)
    if state is None:
        raise FxgrowError("the model has no sub-models: it was not rewritten by a sorted_slicing pass")
    return state


def resolve_point(state: SubnetState, width: float | None = None, depth: int | None = None, **at: float) -> Point:
    """The grid point with these coordinates: `width` (a grid of one width dimension) or
    `at` ({dimension: fraction}, e.g. heads=0.5, ffn=0.25), and `depth`; a missing
    coordinate takes its largest value among the grid points matching the others. A point
    outside the grid is an error that lists the grid."""
    if width is not None:
        at = {"width": width, **at}
    unknown = [d for d in at if d not in state.dims]
    if unknown:
        raise FxgrowError(f"the grid has no dimension {unknown[0]!r}; its dimensions: {', '.join(state.dims)}, depth")
    wanted = {state.dims.index(d): f for d, f in at.items() if f is not None}
    candidates = [p for p in state.points if all(abs(p[i] - f) < 1e-9 for i, f in wanted.items())
                  and (depth is None or p[-1] == depth)]
    if not candidates:
        asked = ", ".join(f"{d} {at[d]:g}" if at.get(d) is not None else f"{d} any" for d in state.dims)
        listed = ", ".join(f"({state.describe(p)})" for p in state.points)
        raise FxgrowError(f"({asked}, depth {depth if depth is not None else 'any'}) is not a grid point; "
                          f"the grid holds: {listed}")
    return max(candidates)


@contextlib.contextmanager
def subnet(model: nn.Module, width: float | None = None, depth: int | None = None, **at: float) -> Iterator[Point]:
    """Run the sub-model (width, depth) - or (heads=..., ffn=..., depth) - inside the block;
    the previous one after it."""
    state = _require_state(model)
    before = state.point
    point = resolve_point(state, width, depth, **at)
    state.activate(*point)
    try:
        yield point
    finally:
        state.activate(*before)


# --- BatchNorm statistics ------------------------------------------------------------------

def has_batch_norm(model: nn.Module) -> bool:
    return bool(_norms(model))


def _norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def preserved_norm_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer (all widths' statistics) on leaving the block."""
    saved = [(b, b.detach().clone()) for m in _norms(model) for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the active sub-model's BatchNorm statistics: reset them, then average
    (momentum None: a cumulative mean) over `batches` of model inputs in train mode.
    Every BatchNorm buffer is reset, so wrap this in `preserved_norm_stats` to keep the
    other sub-models' statistics. Returns how many batches were used."""
    norms = _norms(model)
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    count = 0
    try:
        for x in batches:
            model(x)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return count


# --- the grid ------------------------------------------------------------------------------

def evaluate_grid(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], example: torch.Tensor | None,
                  calibration: list[torch.Tensor] | None = None, points: list[Point] | None = None) -> list[dict[str, Any]]:
    """Evaluate every grid point (or `points`): `evaluate(model)` -> {"accuracy", ...} with
    that sub-model active, after recalibrating its BatchNorm statistics on `calibration`
    when given (the model's own statistics are restored afterwards). Params and FLOPs are
    those of the extracted standalone sub-model on `example`. `share` is the accuracy over
    the largest sub-model's."""
    state = _require_state(model)
    before = state.point
    rows = []
    stats = preserved_norm_stats(model) if calibration else contextlib.nullcontext()
    try:
        with stats:
            for point in points or list(state.points):
                state.activate(*point)
                if calibration:
                    recalibrate(model, calibration)
                metrics = evaluate(model)
                row: dict[str, Any] = {**point_dict(state, point), **metrics}
                if example is not None:
                    row.update(measure(extract(model, at=point).eval(), example).as_dict())
                rows.append(row)
    finally:
        state.activate(*before)
    largest = max(rows, key=lambda r: tuple(r[d] for d in (*state.dims, "depth")))
    for row in rows:
        if "accuracy" in row and largest.get("accuracy"):
            row["share"] = row["accuracy"] / largest["accuracy"]
    return rows


# --- extraction ----------------------------------------------------------------------------

def point_dict(state: SubnetState, point: Point) -> dict[str, Any]:
    """{dimension: fraction, ..., "depth": kept blocks} of a grid point (report rows)."""
    return {**dict(zip(state.dims, point[:-1])), "depth": point[-1]}


def extract(gm: fx.GraphModule, width: float | None = None, depth: int | None = None, *,
            at: Point | None = None, **dims: float) -> fx.GraphModule:
    """The sub-model (width, depth) - or (heads=..., ffn=..., depth), or the grid point `at`
    - as a standalone plain GraphModule: physically smaller tensors, dropped blocks removed
    from the graph, plain nn layers at the original paths (state_dict keys of the original
    model, minus the dropped blocks'). Its outputs equal the sliced model's with that
    sub-model active. `gm` is not changed. (`kept_units` says what the point keeps, for an
    extract that rebuilds the model's own class.)"""
    state = _require_state(gm)
    point = tuple(at) if at is not None else resolve_point(state, width, depth, **dims)
    sub = copy.deepcopy(gm)
    _require_state(sub).activate(*point)
    return fold(sub, inplace=True)  # fold takes the slicing off at the active point first


def kept_units(model: nn.Module, width: float | None = None, depth: int | None = None, **at: float
               ) -> dict[str, dict]:
    """What the sub-model (width, depth) - or (heads=..., ffn=..., depth) - keeps, for an
    extract that rebuilds the model's own class (a Hugging Face config with fewer layers and
    smaller sizes): {"layers": {layer list path: kept entries}, "groups": {channel group id:
    kept channels}, "dims": {channel group id: its dimension}}."""
    state = _require_state(model)
    point = resolve_point(state, width, depth, **at)
    exits = [m for m in model.modules() if isinstance(m, LayerExit)]
    return {"layers": {m.layers: point[-1] for m in exits},
            "groups": state.active_sizes(state.widths.index(tuple(point[:-1]))), "dims": dict(state.group_dims)}


# --- on a spec's data (the CLI's `eval` and `extract`) ---------------------------------------

def data_evaluator(data, batch_size: int, device: torch.device, objective=None
                   ) -> Callable[[nn.Module], dict[str, float]]:
    """`evaluate(model)` -> test-split metrics of `data` (a `fxgrow.train.data.Data`) under
    `objective` (a `fxgrow.train.objectives.Objective`; default classification): loss and
    accuracy, and perplexity for causal_lm."""
    import contextlib

    from .train.data import Batches
    from .train.loop import test_sums
    from .train.objectives import Classification

    objective = objective or Classification()

    def evaluate(model: nn.Module) -> dict[str, float]:
        batches = Batches(data, "test", batch_size, device).sequential()
        return objective.metrics(test_sums(model, batches, data.prepare, contextlib.nullcontext, device,
                                           objective).tolist())
    return evaluate


def calibration_inputs(data, count: int, batch_size: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The first `count` training batches of epoch 0 (model inputs, no augmentation)."""
    from .train.data import Batches

    batches = Batches(data, "train", min(batch_size, len(data.train[1]) if isinstance(data.train, tuple)
                                         else len(data.train)), device, seed=seed)
    out = []
    for x, _ in batches.epoch(0):
        if len(out) == count:
            break
        out.append(data.prepare(x))
    return out


def grid_dims(rows: list[dict[str, Any]]) -> list[str]:
    """The width dimensions of evaluate_grid's rows: ["width"], or some of hidden, heads, ffn."""
    return [d for d in ("width", "hidden", "heads", "ffn") if rows and d in rows[0]]


def grid_table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of `grid_table_rows`: perplexity only for a language model's grid."""
    ppl = ["perplexity"] if any("perplexity" in r for r in rows) else []
    return [*grid_dims(rows), "blocks", "accuracy", *ppl, "share", "params", "FLOPs"]


def grid_table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings for a table: each width dimension, kept blocks, accuracy (and
    perplexity), share, params, FLOPs."""
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    ppl = any("perplexity" in r for r in rows)
    return [[*(f"{r[d]:g}" for d in grid_dims(rows)), str(r["depth"]), fmt(r.get("accuracy"), ".4f"),
             *([fmt(r.get("perplexity"), ".2f")] if ppl else []),
             fmt(r.get("share"), ".3f"), fmt(r.get("params"), ","), fmt(r.get("flops"), ",")] for r in rows]


__all__ = ["Point", "calibration_inputs", "data_evaluator", "evaluate_grid", "extract", "find_state",
           "grid_dims", "grid_table_columns", "grid_table_rows", "has_batch_norm", "kept_units", "point_dict", "preserved_norm_stats", "recalibrate",
           "resolve_point", "subnet"]
