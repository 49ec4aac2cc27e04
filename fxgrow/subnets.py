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

Point = tuple[float, int]


def find_state(model: nn.Module) -> SubnetState | None:
    """The slicing state of a model rewritten by sorted_slicing, else None."""
    return next((m for m in model.modules() if isinstance(m, SubnetState)), None)


def _require_state(model: nn.Module) -> SubnetState:
    state = find_state(model)
    if state is None:
        raise FxgrowError("the model has no sub-models: it was not rewritten by a sorted_slicing pass")
    return state


def resolve_point(state: SubnetState, width: float | None = None, depth: int | None = None) -> Point:
    """The grid point (width, depth); a missing coordinate takes its largest value among
    the grid points matching the other one. A point outside the grid is an error that lists
    the grid."""
    candidates = [p for p in state.points if (width is None or abs(p[0] - width) < 1e-9)
                  and (depth is None or p[1] == depth)]
    if not candidates:
        listed = ", ".join(f"(width {w:g}, depth {d})" for w, d in state.points)
        raise FxgrowError(f"(width {width if width is not None else 'any'}, depth "
                          f"{depth if depth is not None else 'any'}) is not a grid point; the grid holds: {listed}")
    return max(candidates)


@contextlib.contextmanager
def subnet(model: nn.Module, width: float | None = None, depth: int | None = None) -> Iterator[Point]:
    """Run the sub-model (width, depth) inside the block; the previous one after it."""
    state = _require_state(model)
    before = state.point
    point = resolve_point(state, width, depth)
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
                row: dict[str, Any] = {"width": point[0], "depth": point[1], **metrics}
                if example is not None:
                    row.update(measure(extract(model, *point).eval(), example).as_dict())
                rows.append(row)
    finally:
        state.activate(*before)
    largest = max(rows, key=lambda r: (r["width"], r["depth"]))
    for row in rows:
        if "accuracy" in row and largest.get("accuracy"):
            row["share"] = row["accuracy"] / largest["accuracy"]
    return rows


# --- extraction ----------------------------------------------------------------------------

def extract(gm: fx.GraphModule, width: float | None = None, depth: int | None = None) -> fx.GraphModule:
    """The sub-model (width, depth) as a standalone plain GraphModule: physically smaller
    tensors, dropped blocks removed from the graph, plain nn layers at the original paths
    (state_dict keys of the original model, minus the dropped blocks'). Its outputs equal
    the sliced model's with that sub-model active. `gm` is not changed."""
    state = _require_state(gm)
    point = resolve_point(state, width, depth)
    sub = copy.deepcopy(gm)
    _require_state(sub).activate(*point)
    return fold(sub, inplace=True)  # fold takes the slicing off at the active point first


def kept_units(model: nn.Module, width: float | None = None, depth: int | None = None) -> dict[str, dict]:
    """What the sub-model (width, depth) keeps, for an extract that rebuilds the model's own
    class (a Hugging Face config with fewer layers and smaller sizes): {"layers": {layer
    list path: kept entries}, "groups": {channel group id: kept channels}}."""
    state = _require_state(model)
    point = resolve_point(state, width, depth)
    exits = [m for m in model.modules() if isinstance(m, LayerExit)]
    return {"layers": {m.layers: point[1] for m in exits},
            "groups": state.active_sizes(state.fractions.index(point[0]))}


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


def grid_table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings for a table: width, kept blocks, accuracy, share, params, FLOPs."""
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    return [[f"{r['width']:g}", str(r["depth"]), fmt(r.get("accuracy"), ".4f"), fmt(r.get("share"), ".3f"),
             fmt(r.get("params"), ","), fmt(r.get("flops"), ",")] for r in rows]


__all__ = ["Point", "calibration_inputs", "data_evaluator", "evaluate_grid", "extract", "find_state",
           "grid_table_rows", "has_batch_norm", "kept_units", "preserved_norm_stats", "recalibrate",
           "resolve_point", "subnet"]
