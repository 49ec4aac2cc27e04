"""Weight compander pass (ALGORITHMS.md section 2): every targeted weight becomes
w = psi(v) with v initialised to psi^-1(w), so outputs are unchanged right after it.

Stacked after template mixing, v is not a parameter but the mixed weight: the inverse
init then re-solves the bank's templates so that the mix yields psi^-1(W) (template
mix producer's `solve_for`), and the function is still preserved. Masks and slicing come after
the compander and see psi(v) as their input. Training-time behaviour (weight decay on
the effective weight, the Adam correction, metrics, report) is in `compander_callback`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import fx

from ..errors import FxgrowError
from ..ir import WeightChain, evaluate_chain, fetch_attr, insert_producer, weight_chains
from ..nn.base import can_solve
from ..nn.compander import MIN_SLOPE, CompanderScale, CompandProducer, inverse_needs_a, psi_inverse, start_limit
from ..specs.base import PassSpec
from ..train.callbacks import Callback
from .base import Match, Pass, PassContext, Record, register_pass
from .compander_callback import CompanderCallback

FIXED_INIT = (0.7, 0.8)      # the most frequent best pair of the paper's grid search
LEARNABLE_INIT = (0.5, 1.0)  # the paper's "fine" version starts here
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")


class CompanderSpec(PassSpec):
    kind: Literal["compander"] = "compander"
    function: Literal["atan", "asinh", "erf"] = "atan"
    a: float | None = Field(None, gt=0, description="default 0.7, or 0.5 when learnable")
    b: float | None = Field(None, gt=0, description="default 0.8, or 1.0 when learnable")
    learnable: Literal["none", "layer", "global"] = "none"
    weight_decay: Literal["effective", "raw"] | None = Field(
        None, description="effective: decay psi(v) (default for fixed a, b); raw: decay v "
                          "(default, and the only choice, for learnable a, b)")
    adaptive_fix: bool = Field(False, description="Adam/AdamW: moments from dL/dw, step times psi'(v)")
    min_slope: float = Field(
        MIN_SLOPE, gt=0, lt=1, description="no weight starts where psi'(v) < min_slope * psi'(0): a weight "
                                           "beyond that edge (or psi's range) starts at the edge, with its sign")
    max_clamped_fraction: float = Field(
        0.01, ge=0, le=1, description="fail when the inverse init moves more than this share of a layer")

    @field_validator("weight_decay")
    @classmethod
    def _decay_matches_learnable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == "effective" and info.data.get("learnable", "none") != "none":
            raise ValueError("'effective' needs fixed a and b; with learnable a, b decay "
                             "applies to v only ('raw')")
        return value

    @property
    def initial_ab(self) -> tuple[float, float]:
        da, db = LEARNABLE_INIT if self.learnable != "none" else FIXED_INIT
        return (self.a if self.a is not None else da, self.b if self.b is not None else db)

    @property
    def decay_mode(self) -> str:
        return self.weight_decay or ("raw" if self.learnable != "none" else "effective")

    def check_train(self, train) -> list[tuple[str, str]]:
        """(Adam/AdamW without adaptive_fix is allowed, with a warning when training starts.)"""
        if self.adaptive_fix and train.optimizer.name not in ADAPTIVE_OPTIMIZERS:
            return [("adaptive_fix", f"applies to Adam/AdamW only (train.optimizer.name is "
                                     f"{train.optimizer.name!r})")]
        return []


@dataclass
class CompanderRecord(Record):
    clamped: dict[str, int] = field(default_factory=dict)  # per weight: entries the inverse init moved to the edge
    # per weight with moved entries: their flat "index", "start" value (+-edge) and "shift" (max |w - start|)
    starts: dict[str, dict[str, Any]] = field(default_factory=dict)


@register_pass
class CompanderPass(Pass):
    kind = "compander"
    spec_cls = CompanderSpec
    preserves_computation = True
    rank = CompandProducer.rank

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> "CompanderRecord":
        spec: CompanderSpec = self.spec
        a, b = spec.initial_ab
        all_chains = weight_chains(gm)
        chains = [all_chains[f"{m.layer}.weight"] for m in matches]
        record = CompanderRecord(tuple(m.layer for m in matches))
        for chain in chains:
            if chain.producers:
                self._check_upstream(gm, chain)
        # Chains computed from one head (a template bank; a parameter tied into two layers)
        # are initialised together, each from the values before any is written, one head at
        # a time (its targets then free their memory for the next). A generated weight is a
        # fresh tensor: its inverse overwrites it.
        by_head: dict[int, list[WeightChain]] = {}  # by tensor: tied parameters have two names
        for chain in chains:
            by_head.setdefault(id(fetch_attr(gm, chain.head.target)), []).append(chain)
        out_of_range: list[str] = []  # every layer, in one error (a dry run shows them all)
        with torch.no_grad():
            for members in by_head.values():
                targets = {c.key: self._inverse(c.key, evaluate_chain(gm, c), record, bool(c.producers),
                                                out_of_range) for c in members}
                if out_of_range:
                    continue
                if members[0].producers:
                    _solve_upstream(gm, members, targets)
                else:
                    for chain in members:
                        fetch_attr(gm, chain.head.target).copy_(targets[chain.key])
        if out_of_range:
            raise FxgrowError(f"weights beyond the start edge of {a} * {spec.function}(v / b) "
                              f"(more than {spec.max_clamped_fraction:.0%} of a layer; raise `a` or exclude the "
                              "layer):\n  " + "\n  ".join(out_of_range))
        shared = CompanderScale(a, b, learnable=True) if spec.learnable == "global" else None
        for chain in chains:
            scale = shared if shared is not None else CompanderScale(a, b, spec.learnable == "layer")
            insert_producer(gm, chain, CompandProducer(scale, spec.function), self.kind)
        return record

    def callbacks(self, gm: fx.GraphModule, record: "CompanderRecord", ctx: PassContext) -> list[Callback]:
        return [CompanderCallback(self.spec, dict(record.clamped), dict(record.starts))]

    def _inverse(self, key: str, w: torch.Tensor, record: CompanderRecord, overwrite: bool = False,
                 out_of_range: list[str] | None = None) -> torch.Tensor:
        """v = psi^-1(w). A weight beyond the start edge (where psi' falls below min_slope of
        its peak, or beyond psi's range) starts at the edge: a start where psi' ~ 0 would
        freeze it for good. How many moved and how far is recorded; too many is an error."""
        spec = self.spec
        a, b = spec.initial_ab
        edge = a * start_limit(spec.function, spec.min_slope)
        moved: dict[str, torch.Tensor] = {}  # which ones, read before an in-place inverse overwrites w
        v, clamped = psi_inverse(w, a, b, spec.function, overwrite, spec.min_slope, moved)
        record.clamped[key] = clamped
        if clamped > spec.max_clamped_fraction * w.numel():
            message = (f"{clamped} of {w.numel()} weights of '{key}' lie beyond |w| = {edge:.4g}, where "
                       f"{a} * {spec.function}(v / b) has less than min_slope = {spec.min_slope} of its "
                       f"slope at 0: raise `a` to at least "
                       f"{inverse_needs_a(w, spec.function, spec.min_slope):.4g} or exclude the layer")
            if out_of_range is None:
                raise FxgrowError(message)
            out_of_range.append(message)
            return v
        if clamped:
            original = moved["original"]
            start = original.sign() * edge
            shift = float((original - start).abs().max())
            record.starts[key] = {"index": moved["index"].cpu(), "start": start.cpu(), "shift": shift}
            warnings.warn(f"compander: {clamped} of {w.numel()} weights of '{key}' start at |w| = {edge:.4g} "
                          f"(moved by up to {shift:.3g}): beyond it psi' < {spec.min_slope} of its peak and they "
                          "would barely train; outputs change slightly", stacklevel=3)
        return v

    def _check_upstream(self, gm: fx.GraphModule, chain: WeightChain) -> None:
        modules = chain.modules(gm)
        if len(modules) != 1 or not can_solve(modules[0]):
            names = ", ".join(f"{type(m).__name__} ({p.target})" for m, p in zip(modules, chain.producers))
            raise FxgrowError(f"'{chain.key}' already has producers {names}: the compander must come "
                              "right after the parameter or a producer that can be solved for its "
                              "output (a template mix)")
        if self.spec.adaptive_fix:
            raise FxgrowError(f"adaptive_fix needs v to be a parameter, but '{chain.key}' is generated "
                              "by template mixing; drop adaptive_fix or the mixing of this layer")


def _solve_upstream(gm: fx.GraphModule, chains: list[WeightChain], targets: dict[str, torch.Tensor]) -> None:
    """Make the producer before each compander (a template mix) output v = psi^-1(W)."""
    by_class: dict[type, dict[str, torch.Tensor]] = {}
    for chain in chains:  # (no compander is inserted yet: the first producer is the upstream one)
        if chain.key in targets:
            by_class.setdefault(type(chain.modules(gm)[0]), {})[chain.key] = targets[chain.key]
    residual = {k: r for cls, part in by_class.items() for k, r in cls.solve_for(gm, part).items()}
    for key, r in residual.items():
        if r <= 1e-5:  # within tolerance whatever the scale: no pass over the values
            continue
        lo, hi = torch.aminmax(targets[key])
        if r > 1e-5 * max(1.0, -float(lo), float(hi)):
            raise FxgrowError(f"cannot initialise v = psi^-1(W) for '{key}' through its template bank "
                              f"(residual {r:.3g}): the producer before it cannot be solved exactly "
                              "(a template bank's alphas without full row rank)")
