"""Mask nodes: gradual pruning with zero-cost regrowth (ALGORITHMS.md section 3).

GraNet, and GMP, RigL and SET as configurations of it. The pass puts a `MaskProducer`
into the chain of every targeted weight (all-ones, or the initial sparse layout when
`initial_sparsity > 0`); the callback edits the masks in place at scheduled events.

Step convention: an event at time `t` happens once `t` optimizer steps are done (in
`after_step` of step index t-1), using that step's minibatch gradient. So `t` runs over
1..T and the last pruning event may land on `t = T`, after the final update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import fx

from ..analysis.ends import output_layers
from ..analysis.erk import layout_counts
from ..frontends import require_channel_rules
from ..errors import FxgrowError, SpecError
from ..ir import chain_shape, fetch_attr, insert_producer, weight_chains
from ..nn.mask import MaskProducer
from ..specs.base import At, PassSpec, StrictModel, Time, resolve_time
from ..train.callbacks import Callback, ModelChange, TrainContext
from ..train.data import stable_seed
from .base import Match, Pass, PassContext, Record, register_pass
from .prune_regrow_filters import (ChannelUses, filter_groups, keep_channels_group, keep_channels_total,
                                   mask_normalizers, masked_norms, prune_channels, prunable_channel_uses,
                                   regrow_channels)
from .prune_regrow_counts import classifier_counts, keep_per_layer, keep_total
from .prune_regrow_masks import MaskedWeight, masked_weights, prune_global, prune_layer, regrow, top_k_mask
from .prune_regrow_scores import MomentumScores

SAME_AS_FINAL = object()  # preset value: initial_sparsity equals final_sparsity

# What each preset fixes. Setting one of these fields to another value is an error; every
# other field keeps its ordinary default (or the preset's, PRESET_DEFAULTS) and may be set freely.
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    # Dense-to-sparse GraNet: cubic pruning from dense, gradient regrowth every event.
    "granet": {"initial_sparsity": 0.0, "regrow": "gradient"},
    # GraNet_uniform: every layer to the same sparsity, the classifier kept at density 0.2
    # once the sparsity reaches 0.8 (classifier_density, see PRESET_DEFAULTS).
    "granet_uniform": {"initial_sparsity": 0.0, "regrow": "gradient", "scope": "layer"},
    # Sparse-to-sparse GraNet: start from an ERK layout at 50%.
    "granet_sparse": {"initial_sparsity": 0.5, "init_distribution": "erk", "regrow": "gradient"},
    # Gradual magnitude pruning (Zhu & Gupta): the same schedule, no regrowth.
    "gmp": {"initial_sparsity": 0.0, "regrow": "none"},
    # RigL: constant sparsity on an ERK layout, gradient regrowth with drop fraction 0.3
    # cosine-decayed to 0 over the update window (not over training), floor(r * nnz) per
    # layer, mask updates stopped at 3/4 of training.
    "rigl": {"initial_sparsity": SAME_AS_FINAL, "init_distribution": "erk", "regrow": "gradient",
             "regrow_fraction": {"initial": 0.3, "final": 0.0, "over": "updates", "rounding": "floor"},
             "regrow_until": "schedule_end", "schedule": {"start": 0.0, "end": 0.75}},
    # SET: constant sparsity on an ERK layout, random regrowth of a fixed 30%.
    "set": {"initial_sparsity": SAME_AS_FINAL, "init_distribution": "erk", "regrow": "random",
            "regrow_fraction": {"initial": 0.3, "final": 0.3}},
}

# A preset's defaults that the user may change.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The paper ends pruning at the first learning-rate decay: half of training in its CIFAR
    # step schedule; its ImageNet runs end at 30 of 100 epochs (schedule: {end: 0.3}).
    "granet_sparse": {"schedule": {"start": 0.0, "end": 0.5}},
    "granet_uniform": {"classifier_density": {"from_sparsity": 0.8, "density": 0.2}},
}

class PruneScheduleSpec(StrictModel):
    """When pruning happens: from `start` to `end` (times: an int counts optimizer steps, a
    float in [0, 1] is a fraction of training, or {step|epoch|fraction: ...}), an event
    every `every` steps."""

    start: Time = 0.0
    end: Time = 0.7
    every: int = Field(1000, ge=1)
    shape: Literal["cubic", "linear"] = "cubic"

    @model_validator(mode="after")
    def _ordered(self) -> "PruneScheduleSpec":
        if type(self.start) is type(self.end) and not isinstance(self.start, At) and self.start >= self.end:
            raise ValueError(f"start must be < end (got start={self.start}, end={self.end})")
        return self


class RegrowFractionSpec(StrictModel):
    """r_t = final + (initial - final) * (1 + cos(pi min(t, H) / H)) / 2: the fraction of each
    layer's active weights dropped and regrown at an event. H is T (`over: training`,
    GraNet's cosine over all steps) or the last step a regrowth may happen (`over:
    updates`, RigL's cosine over its update window, which reaches `final` there)."""

    initial: float = Field(0.5, ge=0, le=1)
    final: float = Field(0.005, ge=0, le=1)
    decay: Literal["cosine"] = "cosine"
    over: Literal["training", "updates"] = "training"
    rounding: Literal["ceil", "floor"] = Field(
        "ceil", description="weights dropped per layer: ceil(r * nnz) (GraNet) or floor(r * nnz) (RigL)")


class ClassifierDensitySpec(StrictModel):
    """GraNet_uniform's rule: once the target sparsity reaches `from_sparsity`, the
    classifier (the one masked layer feeding the model output) keeps `density` of its
    weights and every other layer the same density, so the overall count stays exact."""

    from_sparsity: float = Field(0.8, ge=0, le=1)
    density: float = Field(0.2, gt=0, le=1)


class MomentumSpec(StrictModel):
    """regrow: momentum grows where |m| is largest, m an exponential moving average of the
    dense gradient kept by the callback (m <- beta m + (1 - beta) g every step; RigL's
    SparseMomentumOptimizer, decay 0.9). `normalized` scores m / (sqrt(u) + 1e-8), u the
    same average of g^2 (GraNet's score under Adam)."""

    beta: float = Field(0.9, ge=0, lt=1)
    normalized: bool = False
    beta2: float = Field(0.999, ge=0, lt=1)


class PruneRegrowSpec(PassSpec):
    kind: Literal["prune_regrow"] = "prune_regrow"
    preset: Literal["granet", "granet_uniform", "granet_sparse", "gmp", "rigl", "set"] | None = None
    final_sparsity: float = Field(0.9, ge=0, lt=1)
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    schedule: PruneScheduleSpec = Field(default_factory=PruneScheduleSpec)
    scope: Literal["global", "layer"] = "global"
    regrow: Literal["gradient", "momentum", "random", "none"] = "gradient"
    regrow_fraction: RegrowFractionSpec = Field(default_factory=RegrowFractionSpec)
    regrow_until: Literal["end", "schedule_end"] = "end"
    momentum: MomentumSpec = Field(default_factory=MomentumSpec)
    init_distribution: Literal["erk", "er", "uniform"] = "erk"
    erk_power_scale: float = Field(1.0, ge=0, description="ERK's exponent: 1 is ERK, 0 uniform (RigL's)")
    classifier_density: ClassifierDensitySpec | None = None
    granularity: Literal["element", "filter"] = "element"

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """Fill the preset's fields the user left out; conflicts are caught per field below."""
        if not isinstance(data, dict) or not isinstance(data.get("preset"), str) \
                or data["preset"] not in PRESET_FIELDS:
            return data
        data = dict(data)
        preset = {**PRESET_DEFAULTS.get(data["preset"], {}), **PRESET_FIELDS[data["preset"]]}
        for name, value in preset.items():
            if value is SAME_AS_FINAL:  # the default final_sparsity when the user gave none
                value = data.get("final_sparsity", cls.model_fields["final_sparsity"].default)
            if isinstance(value, dict):
                given = data.get(name)
                data[name] = {**value, **given} if isinstance(given, dict) else (given if given is not None else value)
            elif name not in data and value is not None:
                data[name] = value
        return data

    @field_validator("initial_sparsity", "schedule", "scope", "regrow", "regrow_fraction", "regrow_until",
                     "init_distribution")
    @classmethod
    def _agrees_with_preset(cls, value: Any, info: ValidationInfo) -> Any:
        preset = info.data.get("preset")
        fixed = PRESET_FIELDS.get(preset, {}).get(info.field_name)
        if fixed is SAME_AS_FINAL:
            fixed = info.data.get("final_sparsity")
            if fixed is not None and value != fixed:
                raise ValueError(f"preset {preset!r} keeps sparsity constant: initial_sparsity "
                                 f"must equal final_sparsity ({fixed})")
        elif isinstance(fixed, dict):
            for key, want in fixed.items():
                if getattr(value, key) != want:
                    raise ValueError(f"preset {preset!r} sets {info.field_name}.{key} to {want!r} "
                                     f"(got {getattr(value, key)!r}); drop the preset to change it")
        elif fixed is not None and value != fixed:
            raise ValueError(f"preset {preset!r} sets {info.field_name} to {fixed!r}; "
                             "drop the preset to change it")
        if info.field_name == "initial_sparsity":
            final = info.data.get("final_sparsity")
            if final is not None and value > final:
                raise ValueError(f"initial_sparsity must be <= final_sparsity ({final})")
        return value

    @field_validator("classifier_density")
    @classmethod
    def _uniform_from_dense(cls, value: ClassifierDensitySpec | None, info: ValidationInfo):
        if value is not None and (info.data.get("scope") != "layer" or info.data.get("initial_sparsity", 0) > 0):
            raise ValueError("classifier_density is GraNet_uniform's rule: it needs scope: layer and a dense "
                             "start (initial_sparsity: 0)")
        return value

    @field_validator("granularity")
    @classmethod
    def _filters_start_dense(cls, value: str, info: ValidationInfo) -> str:
        if value == "filter" and info.data.get("initial_sparsity", 0) > 0:
            raise ValueError("filter granularity prunes from a dense start: initial_sparsity must be 0 "
                             "(an initial channel layout is not defined)")
        fraction = info.data.get("regrow_fraction")
        if value == "filter" and (info.data.get("regrow") == "momentum" or info.data.get("classifier_density")
                                  or (fraction is not None and fraction.rounding == "floor")):
            raise ValueError("filter granularity regrows ceil(r * active channels) by gradient or at random, with "
                             "one sparsity for every channel group (no regrow: momentum, rounding: floor or "
                             "classifier_density)")
        return value

    def check_train(self, train) -> list[tuple[str, str]]:
        steps = getattr(train, "steps", None)
        if steps is None:
            return []  # T depends on the dataset size: checked when training starts
        try:
            resolve_schedule(self, steps)
        except FxgrowError as e:
            return [("schedule", str(e))]
        return []


# --- the resolved schedule ------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The spec's schedule resolved against the run's T optimizer steps (pure)."""

    initial_sparsity: float
    final_sparsity: float
    start: int
    end: int
    every: int
    shape: str
    total_steps: int
    regrow: str
    regrow_initial: float
    regrow_final: float
    regrow_until: int     # last time a regrowth may happen
    regrow_horizon: int | None = None  # H of the fraction's cosine; None: total_steps
    regrow_rounding: str = "ceil"      # of the per-layer drop count

    def sparsity_at(self, t: int) -> float:
        """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (tf - t0))**p, p = 3 (cubic) or 1."""
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        if t <= self.start:
            return s_i
        if t >= self.end:
            return s_f
        remaining = 1 - (t - self.start) / (self.end - self.start)
        power = 3 if self.shape == "cubic" else 1
        return s_f + (s_i - s_f) * remaining ** power

    def is_prune_event(self, t: int) -> bool:
        """t0 + k*every inside (t0, tf), and tf itself: the last event lands on s_f.
        None when the sparsity is constant (RigL, SET)."""
        return (self.final_sparsity > self.initial_sparsity and self.start < t <= self.end
                and ((t - self.start) % self.every == 0 or t == self.end))

    def is_regrow_event(self, t: int) -> bool:
        """Right after every pruning event and every `every` steps after, until
        `regrow_until`; never after the last optimizer step (nothing would train it)."""
        if self.regrow == "none" or t >= self.total_steps or t > self.regrow_until:
            return False
        return self.is_prune_event(t) or (t > self.start and (t - self.start) % self.every == 0)

    def is_event(self, t: int) -> bool:
        return self.is_prune_event(t) or self.is_regrow_event(t)

    def events(self) -> list[int]:
        return [t for t in range(self.start + 1, self.total_steps + 1) if self.is_event(t)]

    def regrow_fraction(self, t: int) -> float:
        """final + (initial - final) * (1 + cos(pi min(t, H) / H)) / 2."""
        horizon = self.regrow_horizon or self.total_steps
        cos = (1 + math.cos(math.pi * min(t, horizon) / horizon)) / 2
        return self.regrow_final + (self.regrow_initial - self.regrow_final) * cos


def resolve_schedule(spec: PruneRegrowSpec, total_steps: int, steps_per_epoch: int | None = None) -> Schedule:
    """Turn times into step counts for a run of `total_steps`, or raise FxgrowError."""
    sched = spec.schedule
    start, end = (resolve_time(t, total_steps, steps_per_epoch) for t in (sched.start, sched.end))
    if end > total_steps:
        raise FxgrowError(f"schedule.end ({end} steps) is past the end of training ({total_steps} steps)")
    if start >= end:
        raise FxgrowError(f"schedule.start ({start} steps) must come before schedule.end ({end} steps) "
                          f"in a run of {total_steps} steps")
    if spec.final_sparsity > spec.initial_sparsity and sched.every > end - start:
        raise FxgrowError(f"schedule.every ({sched.every} steps) is longer than the pruning window "
                          f"({start}..{end} steps): pruning would happen in one shot; lower it")
    until = total_steps if spec.regrow_until == "end" else end
    fraction = spec.regrow_fraction
    schedule = Schedule(spec.initial_sparsity, spec.final_sparsity, start, end, sched.every, sched.shape,
                        total_steps, spec.regrow, fraction.initial, fraction.final, until,
                        until if fraction.over == "updates" else total_steps, fraction.rounding)
    if not schedule.events():
        raise FxgrowError(f"no mask update happens in this run ({total_steps} steps, schedule.every = "
                          f"{sched.every}): lower schedule.every")
    return schedule


# --- the pass ---------------------------------------------------------------------------

@dataclass
class PruneRegrowRecord(Record):
    channel_uses: ChannelUses = field(default_factory=dict)  # filter granularity: the prunable groups per mask
    classifier: str | None = None  # classifier_density: the masked weight feeding the model output


@register_pass
class PruneRegrowPass(Pass):
    """Preserves computation with the default `initial_sparsity: 0` (all-ones masks); with
    `initial_sparsity > 0` the rewrite applies the initial sparse layout, on purpose."""

    kind = "prune_regrow"
    spec_cls = PruneRegrowSpec
    preserves_computation = True
    rank = MaskProducer.rank

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if any(isinstance(m, MaskProducer) for m in gm.modules()) or any(p.kind == self.kind for p in ctx.applied):
            raise FxgrowError("the model already has mask producers: use one prune_regrow pass "
                              "(list every layer in its targets)")
        if self.spec.granularity == "filter":
            require_channel_rules(gm, "prune_regrow with granularity: filter")
        if self.spec.granularity == "filter" and ctx.example_input is None:
            raise SpecError([(f"{ctx.where}.granularity", "filter granularity needs an example input for the "
                              "channel analysis (model.example_input in a spec, example_input= in Python)")])

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> "PruneRegrowRecord":
        spec: PruneRegrowSpec = self.spec
        chains = weight_chains(gm)
        for m in matches:
            chain = chains[f"{m.layer}.weight"]
            head = fetch_attr(gm, chain.head.target)
            before = sum(module.rank <= MaskProducer.rank for module in chain.modules(gm))  # chains are rank-ordered
            insert_producer(gm, chain, MaskProducer(chain_shape(gm, chain, before), head.dtype, head.device,
                                                    chain.key, spec.granularity), self.kind)
        record = PruneRegrowRecord(tuple(m.layer for m in matches))
        if spec.granularity == "filter":
            groups = ctx.analyzed(gm).channel_groups()
            record.channel_uses = prunable_channel_uses(gm, ctx.example_input, ctx.where, groups)
            if mask_normalizers(gm, groups, record.channel_uses):
                ctx.analyzed(gm).invalidate()  # norms replaced: the graph changed beyond weight chains
        if spec.classifier_density is not None:
            record.classifier = find_classifier(gm, [m.layer for m in matches], ctx.where)
            weights = masked_weights(gm)
            shapes = [w.mask.shape for w in weights]
            index = [w.key for w in weights].index(record.classifier)
            classifier_counts(shapes, max(spec.final_sparsity, spec.classifier_density.from_sparsity), index,
                              spec.classifier_density.density)  # refuses an infeasible final sparsity now
        if spec.initial_sparsity > 0:
            apply_initial_layout(masked_weights(gm), spec.initial_sparsity, spec.init_distribution, ctx.seed,
                                 spec.erk_power_scale)
        return record

    def callbacks(self, gm: fx.GraphModule, record: "PruneRegrowRecord", ctx: PassContext) -> list[Callback]:
        return [PruneRegrowCallback(self.spec, record.channel_uses, record.classifier)]


def find_classifier(gm: fx.GraphModule, layers: list[str], where: str) -> str:
    """The one masked layer feeding the model output, as "layer.weight"; else a SpecError."""
    ends = output_layers(gm)
    if len(ends) != 1 or ends[0] not in layers:
        found = ", ".join(ends) or "none"
        raise SpecError([(f"{where}.classifier_density", "needs exactly one masked layer feeding the model output "
                          f"(the classifier); the layers feeding it: {found}"
                          + ("" if len(ends) != 1 else " (not among the targets)"))])
    if len(layers) < 2:
        raise SpecError([(f"{where}.classifier_density", "needs layers other than the classifier to prune")])
    return f"{ends[0]}.weight"


@torch.no_grad()
def apply_initial_layout(weights: list[MaskedWeight], sparsity: float, distribution: str,
                         seed: int, power: float = 1.0) -> None:
    """Random positions, exact per-layer counts from `layout_counts`; masked weights zeroed.
    The exploration record (`fired`) starts at this layout."""
    counts = layout_counts([w.mask.shape for w in weights], sparsity, distribution, power)
    g = torch.Generator().manual_seed(seed)
    for w, keep in zip(weights, counts):
        active = torch.zeros(w.mask.numel(), dtype=torch.bool)
        active[torch.randperm(w.mask.numel(), generator=g)[:keep]] = True
        w.set_active(active.view(w.mask.shape).to(w.mask.device), optimizer=None)
        w.fired.copy_(w.active)


# --- training-time behaviour ----------------------------------------------------------------

class PruneRegrowCallback(Callback):
    """Runs the schedule: at each event prune to s_t, then regrow; checks the result.

    The dense gradient is captured only for steps that end in a gradient regrowth: the
    masks' `capture` flag is raised in `on_step_start` of such a step and lowered after the
    event, so an ordinary step costs one integer test here. `regrow: momentum` captures it
    at every step until the last regrowth, for its moving average (`MomentumScores`)."""

    name = "prune_regrow"

    def __init__(self, spec: PruneRegrowSpec, channel_uses: ChannelUses | None = None, classifier: str | None = None):
        self.spec = spec
        self.channel_uses = dict(channel_uses or {})  # filter granularity: from the pass's record
        self.classifier = classifier                  # classifier_density: "layer.weight"
        self.momentum = (MomentumScores(spec.momentum.beta, spec.momentum.normalized, spec.momentum.beta2)
                         if spec.regrow == "momentum" else None)
        self.schedule: Schedule | None = None
        self.events = 0
        self.moved = 0
        self.last: dict[str, Any] | None = None   # the latest measurement (report.json)
        self._time: int | None = None              # the event time this step ends at
        self._capturing = False

    # -- hooks
    def on_train_start(self, ctx: TrainContext) -> None:
        # (only a time in epochs needs steps_per_epoch; a driver with no epochs may omit it)
        self.schedule = resolve_schedule(self.spec, ctx.total_steps, getattr(ctx, "steps_per_epoch", None))

    def on_model_replaced(self, ctx: TrainContext, old, new, change: ModelChange) -> None:
        """Growth: lay out the new mask blocks before the next forward; a step that captures
        the dense gradient captures it on the new masks."""
        weights = masked_weights(new)
        fresh = {w.key: change.fresh(w.key) for w in weights}
        if any(f is not None for f in fresh.values()):
            self.relayout(ctx, weights, fresh)
        if self.momentum is not None:  # a grown weight's average starts again
            self.momentum.forget({w.key: tuple(w.mask.shape) for w in weights})
        if self._capturing:
            self._set_capture(new, True)

    def on_step_start(self, ctx: TrainContext) -> None:
        self._time = t = ctx.step + 1
        s = self.schedule
        if self.spec.regrow == "gradient":
            want = s.is_regrow_event(t)
        else:  # momentum: every step that feeds a later regrowth
            want = self.spec.regrow == "momentum" and t <= min(s.regrow_until, s.total_steps - 1)
        if want or self._capturing:
            self._set_capture(ctx.model, want)

    def after_step(self, ctx: TrainContext) -> None:
        t = self._time if self._time is not None else ctx.step
        self._time = None
        if self.momentum is not None and self._capturing:
            self._update_momentum(masked_weights(ctx.model))
        if self.schedule.is_event(t):
            self.last = self.event(ctx, t)
            self.events += 1
            self.moved += self.last["moved"]
            ctx.log({f"{self.name}/{k}": v for k, v in self.last.items()})
        if self._capturing:
            self._set_capture(ctx.model, False)

    def on_train_end(self, ctx: TrainContext) -> None:
        weights = masked_weights(ctx.model)
        filters = (filter_groups(weights, self.channel_uses, masked_norms(ctx.model))
                   if self.spec.granularity == "filter" else None)
        self.last = {**(self.last or {}), **self.measure(weights, filters),
                     "exploration": {w.key: int(w.fired.sum()) / w.numel for w in weights}}

    # -- one event
    def event(self, ctx: TrainContext, t: int) -> dict[str, Any]:
        s, spec, opt = self.schedule, self.spec, ctx.optimizer
        weights = masked_weights(ctx.model)
        filters = (filter_groups(weights, self.channel_uses, masked_norms(ctx.model))
                   if spec.granularity == "filter" else None)
        sparsity = s.sparsity_at(t)
        pruned = dropped = moved = 0
        if s.is_prune_event(t):
            if filters is not None:
                pruned = prune_channels(filters, sparsity, spec.scope, opt)
            elif spec.scope == "global":
                pruned = prune_global(weights, keep_total([w.numel for w in weights], sparsity), opt)
            else:
                pruned = sum(prune_layer(w, keep, opt) for w, keep in zip(weights, self.keep_per_layer(weights, sparsity)))
        fraction = None
        if s.is_regrow_event(t):
            fraction = s.regrow_fraction(t)
            gradient = spec.regrow == "gradient"
            generator = None
            if gradient:
                self._reduce_dense_grads(weights, filters)
            elif spec.regrow == "random":  # the same draws on every DDP rank and on resume
                generator = torch.Generator(weights[0].mask.device).manual_seed(stable_seed(ctx.seed, t, self.name))
            if filters is not None:
                dropped, moved = regrow_channels(filters, fraction, gradient, generator, opt)
            else:
                for w in weights:
                    score = (w.mask_module.dense_grad if gradient else
                             self.momentum.score(w.key) if self.momentum is not None else None)
                    if spec.regrow != "random" and score is None:
                        continue  # in a residual block no sub-model of this step ran: its mask stays
                    d, m = regrow(w, fraction, score, generator, opt, s.regrow_rounding)
                    dropped, moved = dropped + d, moved + m
        self.check(weights, filters, sparsity, t)
        return {"target_sparsity": sparsity, **self.measure(weights, filters),
                "regrow_fraction": fraction, "pruned": pruned, "dropped": dropped, "moved": moved}

    @torch.no_grad()
    def relayout(self, ctx: TrainContext, weights: list[MaskedWeight],
                 fresh: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        """Growth left new mask blocks dense (True in `fresh`): bring every mask to the
        sparsity in force (the last pruning event's sparsity) with the counts the scope
        prescribes for the grown shapes. Active positions outside new blocks stay first
        (the source masks are kept whenever the counts allow), then new-block positions by
        magnitude of the grown weight; masked-out source positions come last."""
        s, t = self.schedule, ctx.step
        last = max((e for e in range(s.start + 1, t + 1) if s.is_prune_event(e)), default=None)
        sparsity = s.sparsity_at(last) if last is not None else s.initial_sparsity
        values = [w.value().abs().float() for w in weights]
        top = 1 + max(float(v.max()) for v in values)
        scores = []
        for w, v in zip(weights, values):
            new = fresh.get(w.key)
            new = torch.zeros_like(w.active) if new is None else new.to(w.active.device)
            scores.append(torch.where(new, v, torch.where(w.active, v + top, torch.full_like(v, -1.0))))
        keeps = ([keep_total([w.numel for w in weights], sparsity)] if self.spec.scope == "global"
                 else self.keep_per_layer(weights, sparsity))
        parts = [torch.cat([sc.flatten() for sc in scores])] if self.spec.scope == "global" else \
            [sc.flatten() for sc in scores]
        kept, offset = torch.cat([top_k_mask(part, keep) for part, keep in zip(parts, keeps)]), 0
        for w in weights:
            w.set_active(kept[offset:offset + w.numel].view(w.mask.shape), ctx.optimizer)
            offset += w.numel
        self.check(weights, None, sparsity, t)
        record = {"relayout_target_sparsity": sparsity, **self.measure(weights)}
        self.last = {**(self.last or {}), "target_sparsity": sparsity, **self.measure(weights)}
        ctx.log({f"{self.name}/{k}": v for k, v in record.items()})
        return record

    def keep_per_layer(self, weights: list[MaskedWeight], sparsity: float) -> list[int]:
        """Layer scope (`prune_regrow_counts.keep_per_layer`): each layer its initial share of
        the target, or GraNet_uniform's classifier rule."""
        spec, keys = self.spec, [w.key for w in weights]
        rule = spec.classifier_density
        return keep_per_layer([w.mask.shape for w in weights], sparsity, spec.initial_sparsity,
                              spec.init_distribution, spec.erk_power_scale,
                              keys.index(self.classifier) if self.classifier in keys else None,
                              (rule.from_sparsity, rule.density) if rule is not None else None)

    def check(self, weights: list[MaskedWeight], filters, sparsity: float, t: int) -> None:
        """The invariant: the kept counts (weights, or channels) are what the target says."""
        if filters is not None:
            have = {f"channel group {g.id}": int(g.active().sum()) for g in filters}
            want = ({f"channel group {g.id}": keep_channels_group(g, sparsity) for g in filters}
                    if self.spec.scope == "layer" else {"all channel groups": keep_channels_total(filters, sparsity)})
            unit = "channels"
        else:
            have = {w.key: w.nnz() for w in weights}
            want = (dict(zip(have, self.keep_per_layer(weights, sparsity))) if self.spec.scope == "layer"
                    else {"all targeted weights": keep_total([w.numel for w in weights], sparsity)})
            unit = "weights"
        if len(want) == 1 and len(have) > 1:
            have = {next(iter(want)): sum(have.values())}
        for where, n in want.items():
            if have[where] != n:
                raise FxgrowError(f"prune_regrow: after the event at step {t}, {where} has {have[where]} active "
                                  f"{unit} where the target sparsity {sparsity:.6f} keeps {n}")

    @staticmethod
    def measure(weights: list[MaskedWeight], filters=None) -> dict[str, Any]:
        counts = {w.key: (w.nnz(), w.numel) for w in weights}
        nnz, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        fired = sum(int(w.fired.sum()) for w in weights)
        out = {"actual_sparsity": 1 - nnz / total, "weight_sparsity": 1 - nnz / total,
               "exploration_rate": fired / total,
               "layers": {key: 1 - n / size for key, (n, size) in counts.items()}}
        if filters is not None:  # the sparsity counts channels
            active = {g.id: int(g.active().sum()) for g in filters}
            out["actual_sparsity"] = 1 - sum(active.values()) / sum(g.size for g in filters)
            out["channels"] = {str(g.id): 1 - active[g.id] / g.size for g in filters}
        return out

    def _reduce_dense_grads(self, weights: list[MaskedWeight], filters) -> None:
        """A weight may have no dense gradient: sorted slicing's depth sub-models skip whole
        blocks (the same ones on every rank: the plan is seeded by step). Element regrowth
        leaves such a weight's mask as it is; filter regrowth scores whole channel groups
        and needs every gradient."""
        missing = [w.key for w in weights if w.mask_module.dense_grad is None]
        if missing and (filters is not None or len(missing) == len(weights)):
            raise FxgrowError(f"prune_regrow: no dense gradient was captured for '{missing[0]}' "
                              "(was it used in this step's forward?)")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must grow the same positions: regrow from the mean gradient.
            for w in weights:
                if w.mask_module.dense_grad is None:
                    continue
                torch.distributed.all_reduce(w.mask_module.dense_grad)
                w.mask_module.dense_grad.div_(torch.distributed.get_world_size())

    def _update_momentum(self, weights: list[MaskedWeight]) -> None:
        """This step's dense gradients into the moving averages (under DDP their mean over
        ranks first, so every rank keeps the same averages)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for w in weights:
            grad = w.mask_module.dense_grad
            if grad is None:
                continue
            if distributed:
                torch.distributed.all_reduce(grad)
                grad.div_(torch.distributed.get_world_size())
            self.momentum.update(w.key, grad)

    def _set_capture(self, model: torch.nn.Module, on: bool) -> None:
        for module in model.modules():
            if isinstance(module, MaskProducer):
                module.capture, module.dense_grad = on, None
        self._capturing = on

    # -- report and resume
    def report(self) -> dict[str, Any]:
        last = self.last or {}
        measured = {k: last.get(k) for k in ("actual_sparsity", "weight_sparsity", "layers", "channels")
                    if k in last or k == "actual_sparsity"}
        exploration = last.get("exploration", {})
        return {"final_sparsity": self.spec.final_sparsity, "granularity": self.spec.granularity, **measured,
                "exploration_rate": last.get("exploration_rate"), "exploration": exploration,
                "classifier": self.classifier, "regrow": self.spec.regrow,
                "events": self.events, "moved": self.moved,
                "schedule": None if self.schedule is None else
                {"start": self.schedule.start, "end": self.schedule.end, "every": self.schedule.every,
                 "total_steps": self.schedule.total_steps}}

    def state_dict(self) -> dict[str, Any]:
        state = {"events": self.events, "moved": self.moved, "last": self.last}
        if self.momentum is not None:
            state["momentum"] = self.momentum.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        self.events, self.moved, self.last = state["events"], state["moved"], state["last"]
        if self.momentum is not None:
            self.momentum.load_state_dict(state.get("momentum", {}), getattr(ctx, "device", None))
