"""Network growth (ALGORITHMS.md section 1.2): the `grow` spec, pass and callback.

Growth is an event, not a rewrite at spec time: the pass checks the model and hands the
loop a `GrowCallback`, which at `at` (an epoch, a step, or a fraction of the FLOPs budget)
builds the grown GraphModule with `grow_model.grow_model` (fusing other runs' checkpoints
when `fuse` lists them) and swaps it in through `ctx.replace_model` (the loop then tells
every callback, `on_model_replaced`). On resume, `replay_structure` grows the fresh model
again before the checkpoint's model state loads.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import yaml
from pydantic import Field, field_validator, model_validator
from torch import fx, nn

from ..analysis import forward_flops
from ..analysis.ends import named_layers
from ..frontends import require_channel_rules
from ..errors import FxgrowError
from ..ir import layer_types, meta, weight_chains
from ..nn.mixing import mix_producers
from ..specs.base import At, PassSpec, StrictModel, Time, check_layer_patterns, resolve_time, time_type
from ..train.callbacks import Callback, ModelChange, TrainContext
from ..train.data import stable_seed
from .base import Match, Pass, PassContext, Record, register_pass
from .grow_model import Grown, check_growable, check_growth_runs, grow_model, load_source, surviving_params

MIXING = "template_mixing"  # growth widens template-mixed layers (MixtureGrowth)


class GrowAt(At):
    """When to grow: a time as every pass gives it (exactly one of step, epoch, fraction),
    or `flops_fraction`."""

    flops_fraction: float | None = Field(
        None, gt=0, lt=1, description="once this run has spent this fraction of the FLOPs of "
                                      "training the grown model for the whole run")


def _flops_fraction(at) -> float | None:
    return at.flops_fraction if isinstance(at, GrowAt) else None


class LrRestartSpec(StrictModel):
    """MixtureGrowth's learning-rate restart at growth (`--lr_growing`; timm's CosineLRScheduler
    stepped once per epoch from the growth epoch): epoch j after growth trains at
    warmup_start + j (base - warmup_start) / warmup_epochs during the warm-up, then, with
    T = (epochs after growth) // cycles, i = j // T and t = j - i T, at
    min + (base * cycle_decay^i - min) (1 + cos(pi t / T)) / 2 while i < cycles, min after.
    The warm-up overlaps the first cycle, as timm's warmup_prefix: False. Defaults are the
    authors' (lr_growing 1e-4 in their CIFAR runs has to be given: `base`)."""

    base: float = Field(gt=0, description="the lr right after growth (the authors' lr_growing)")
    min: float = Field(3e-5, ge=0)
    cycles: int = Field(4, ge=1)
    cycle_decay: float = Field(0.5, gt=0)
    warmup_epochs: int = Field(1, ge=0)
    warmup_start: float = Field(1e-5, ge=0)

    def lr(self, epoch: int, epochs_after: int) -> float:
        """The learning rate of epoch `epoch` after growth, of `epochs_after`."""
        period = epochs_after // self.cycles
        if self.warmup_epochs and epoch < self.warmup_epochs:
            return self.warmup_start + epoch * (self.base - self.warmup_start) / self.warmup_epochs
        i, t = divmod(epoch, period)
        if i >= self.cycles:
            return self.min
        top = self.base * self.cycle_decay ** i
        return self.min + 0.5 * (top - self.min) * (1 + math.cos(math.pi * t / period))


class GrowSpec(PassSpec):
    kind: Literal["grow"] = "grow"
    factor: int = Field(2, ge=2, description="g: every growing channel group becomes g times wider")
    at: time_type(GrowAt) = Field(description=(
        "when to grow: an int counts optimizer steps, a float in [0, 1] is a fraction of training, "
        "or {step|epoch|fraction|flops_fraction: ...}"))
    again: list[Time] = Field(default_factory=list, description=(
        "later growths, each by `factor` again, from this run's model alone (fxgrow's own design: the "
        "authors' code grows once)"))
    fuse: list[str] = Field(default_factory=list, description=(
        "run folders or checkpoint.pt files of other trained small runs of the same spec; "
        "source net 0 is this run's model, the fused ones follow on the diagonal"))
    layout: Literal["vertical", "horizontal"] = "vertical"
    new_coefficients: Literal["orthogonal", "random", "copy"] = "orthogonal"
    orthogonal_scope: Literal["layer", "bank"] = Field(
        "layer", description="orthogonal new alphas: against the alphas of the same layer over the same template "
                             "set (the authors' scope), or of every layer sharing the bank")
    noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to every new alpha")
    lr: LrRestartSpec | None = Field(None, description="restart the learning rate at growth (lr_growing); "
                                                       "default: the run's schedule goes on")
    freeze_coefficients: list[str] = Field(default_factory=list, description=(
        "layers whose alphas stop training at growth (the authors' --freeze_first_last_growing: "
        "[first, last]); module paths or re: patterns too"))

    @field_validator("freeze_coefficients")
    @classmethod
    def _valid_names(cls, value: list[str]) -> list[str]:
        check_layer_patterns(value, ("first", "last"))
        return value

    @field_validator("fuse", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None or value == "none" else value

    @model_validator(mode="before")
    @classmethod
    def _no_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "targets" in data:
            raise ValueError("grow has no targets: it widens every coupled channel group")
        return data

    @model_validator(mode="after")
    def _one_restart(self) -> "GrowSpec":
        if self.again and (_flops_fraction(self.at) is not None or self.lr is not None):
            raise ValueError("growing again takes times in steps, epochs or fractions, and no lr restart "
                             "(at.flops_fraction and lr describe one growth)")
        return self

    @model_validator(mode="after")
    def _sources_fit(self) -> "GrowSpec":
        if len(self.fuse) + 1 > self.factor:
            raise ValueError(f"{len(self.fuse)} fused runs plus this one are more source nets "
                             f"than factor={self.factor} diagonal blocks")
        return self

    def check_train(self, train) -> list[tuple[str, str]]:
        epochs = getattr(train, "epochs", None)
        if isinstance(self.at, GrowAt) and self.at.epoch is not None and getattr(train, "steps", None) is None \
                and epochs is not None \
                and self.at.epoch >= epochs:
            return [("at.epoch", f"growth at epoch {self.at.epoch} never happens: training has "
                                 f"{epochs} epochs (0..{epochs - 1})")]
        return []


# --------------------------------------------------------------------------------------
# The event.

class GrowCallback(Callback):
    """`carried`: the pipeline's reversible passes (taken off and put back around growth);
    `tables`: the `describe` of the passes whose producers growth widens (the template
    banks), for the report."""

    name = "grow"

    def __init__(self, spec: GrowSpec, carried: Sequence[Pass] = (),
                 tables: Sequence[Callable[[nn.Module], list[dict[str, Any]]]] = ()):
        self.spec = spec
        self.carried, self.tables = list(carried), list(tables)
        self.growth_step: int | None = None  # the first growth
        self.steps: list[int] = []           # every growth (the first, then `again`)
        self.done = 0                        # growths done
        self.input_shape: list[int] | None = None
        self.input_dtype = "float32"
        self.info: dict[str, Any] = {}

    # --- when ---
    def on_train_start(self, ctx: TrainContext) -> None:
        at, total = self.spec.at, ctx.total_steps
        if _flops_fraction(at) is None:
            self.growth_step = resolve_time(at, total, ctx.steps_per_epoch)
        if self.growth_step is not None and self.growth_step >= total:
            raise FxgrowError(f"grow.at: growth at step {self.growth_step} never happens: training "
                              f"takes {total} steps")
        self.steps = ([self.growth_step] if self.growth_step is not None else []) + \
            [resolve_time(t, total, ctx.steps_per_epoch) for t in self.spec.again]
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])) or (self.steps and self.steps[-1] >= total):
            raise FxgrowError(f"grow.again: the growths fall at steps {self.steps}; they must come one after "
                              f"another, before the end of training ({total} steps)")
        if self.spec.lr is not None and self.growth_step is not None:
            self._restart_period(ctx, self.growth_step)  # fails now, not at growth
        if self.spec.fuse and not getattr(ctx, "resumed", False):
            reference = ctx.model.state_dict()
            for i, path in enumerate(self.spec.fuse):
                load_source(path, reference, f"grow.fuse.{i}")
                _warn_same_seed(path, ctx.seed, i)

    # --- the learning rate after growth ---
    def lr_factor(self, ctx: TrainContext, factor: Callable[[int], float]) -> Callable[[int], float]:
        """With `lr`, steps from the growth step on follow the restart (per epoch since
        growth), as a multiple of the optimizer's base lr; before it, the run's schedule."""
        restart = self.spec.lr
        if restart is None:
            return factor

        def after_growth(t: int) -> float:
            start = self.growth_step
            if start is None or t < start:
                return factor(t)
            epochs_after = self._restart_period(ctx, start) * restart.cycles
            return restart.lr((t - start) // ctx.steps_per_epoch, epochs_after) / ctx.optimizer.defaults["lr"]

        return after_growth

    def _restart_period(self, ctx: TrainContext, start: int) -> int:
        epochs_after = (ctx.total_steps - start) // ctx.steps_per_epoch
        period = epochs_after // self.spec.lr.cycles
        if period < 1:
            raise FxgrowError(f"grow.lr: {epochs_after} epochs after growth cannot hold {self.spec.lr.cycles} "
                              "cosine cycles; lower grow.lr.cycles")
        return period

    @property
    def grown(self) -> bool:
        return self.done > 0

    def on_step_start(self, ctx: TrainContext) -> None:
        if self.steps and self.done >= len(self.steps):
            return
        if self.input_shape is None:
            x = ctx.batch[0]
            self.input_shape, self.input_dtype = list(x.shape[1:]), str(x.dtype).removeprefix("torch.")
        if self.growth_step is None:
            self.growth_step = self._flops_step(ctx)
            self.steps = [self.growth_step]
        if ctx.step >= self.steps[self.done]:
            self._grow(ctx)

    def _flops_step(self, ctx: TrainContext) -> int:
        """The first step at which this run has spent `flops_fraction` of the FLOPs of
        training the grown model for all `total_steps` (same samples per step)."""
        x = ctx.batch[0]
        small = forward_flops(ctx.model, x)
        big = forward_flops(self._build(ctx.model, ctx.seed, self.input_shape, self.input_dtype).model, x)
        step = math.ceil(_flops_fraction(self.spec.at) * big * ctx.total_steps / small)
        if step >= ctx.total_steps:
            raise FxgrowError(
                f"grow.at.flops_fraction={_flops_fraction(self.spec.at)} is never reached: training the "
                f"small model for the whole run spends {small / big:.3f} of the grown model's budget")
        return step

    # --- how ---
    def _build(self, model: fx.GraphModule, seed: int, input_shape: list[int], input_dtype: str,
               growth_step: int | None = None, structure_only: bool = True, index: int = 0) -> Grown:
        """The grown model (growth `index`: 0 fuses `fuse`, later ones grow this run's model
        alone). `structure_only` (resume, FLOPs): every source is `model` itself, no files are
        read; the values do not matter (a checkpoint's load next, or none)."""
        n = 1 + len(self.spec.fuse) if index == 0 else 1
        own = model.state_dict()
        if structure_only or index > 0:
            sources = [own] * n
        else:
            sources = [own] + [load_source(p, own, f"grow.fuse.{i}") for i, p in enumerate(self.spec.fuse)]
        step = self.growth_step if growth_step is None else growth_step
        generator = torch.Generator().manual_seed(stable_seed(int(seed), int(step or 0), self.name))
        device = next(iter(own.values())).device
        example = torch.zeros((2, *input_shape), dtype=getattr(torch, input_dtype), device=device)
        grown = grow_model(model, sources, self.spec.factor, example, layout=self.spec.layout,
                           new_coefficients=self.spec.new_coefficients, noise=self.spec.noise,
                           generator=generator, carried=self.carried, orthogonal_scope=self.spec.orthogonal_scope)
        if self.spec.freeze_coefficients:  # the authors' --freeze_first_last_growing
            producers = mix_producers(grown.model)
            layers = [p.source.rsplit(".", 1)[0] for p in producers.values()]
            try:
                frozen = set(named_layers(grown.model, self.spec.freeze_coefficients, layers))
            except ValueError as e:
                raise FxgrowError(f"grow.freeze_coefficients: {e}") from None
            for p in producers.values():
                if p.source.rsplit(".", 1)[0] in frozen:
                    p.alpha.requires_grad_(False)
        return grown

    def _grow(self, ctx: TrainContext) -> None:
        old, index = ctx.model, self.done
        grown = self._build(old, ctx.seed, self.input_shape, self.input_dtype, self.steps[index],
                            structure_only=False, index=index)
        new, info = grown
        if index == 0:
            _warn_identical(grown.growth.sources, self.spec.fuse)
        params = surviving_params(old, new)
        ctx.replace_model(new, ModelChange(params, cause=self.name, fresh=grown.fresh))
        self.done += 1
        record = {"step": ctx.step, "epoch": ctx.epoch, **info, "kept_optimizer_state": sorted(params),
                  "frozen_coefficients": sorted(p.source for p in mix_producers(new).values()
                                                if not p.alpha.requires_grad),
                  "fused": list(self.spec.fuse) if index == 0 else [],
                  "blocks": [row for table in self.tables for row in table(new)]}
        if index == 0:
            self.info = record
        else:
            self.info.setdefault("again", []).append(record)
        ctx.log({"split": "grow", "factor": info["factor"], "sources": info["sources"],
                 "params_before": info["params_before"], "params_after": info["params_after"],
                 "widths": [[w["before"], w["after"]] for w in info["widths"]]})

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        return {"grown": self.grown, "done": self.done, "growth_step": self.growth_step, "steps": self.steps,
                "input_shape": self.input_shape, "input_dtype": self.input_dtype, "info": self.info}

    def replay_structure(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """The grown structure, when the checkpoint was written after growth (once per growth done)."""
        done = state.get("done", int(bool(state.get("grown")))) if state else 0
        steps = state.get("steps") or [state.get("growth_step")] if state else []
        for index in range(done):
            model = self._build(model, 0, state["input_shape"], state["input_dtype"], steps[index],
                                index=index).model
        return model

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        if not state:
            return
        self.growth_step, self.input_shape = state["growth_step"], state["input_shape"]
        self.input_dtype, self.info = state["input_dtype"], state["info"]
        self.done = state.get("done", int(bool(state.get("grown"))))
        self.steps = state.get("steps") or ([self.growth_step] if self.growth_step is not None else [])

    def report(self) -> dict[str, Any]:
        at = self.spec.at
        return {"at": at.model_dump(exclude_none=True) if isinstance(at, GrowAt) else at, "growth_step": self.growth_step,
                "growth_steps": self.steps, "grown": self.grown, "growths": self.done, **self.info}


def _warn_same_seed(run: str, seed: int, index: int) -> None:
    """A fused run trained with this run's seed (read from its spec.yaml) is, on the same data,
    the same network: fusing it adds nothing. The authors train net 2 from its own random
    init in the same process, so their two nets always differ."""
    path = Path(run)
    spec_file = (path if path.is_dir() else path.parent) / "spec.yaml"
    try:
        their = (yaml.safe_load(spec_file.read_text()) or {}).get("train", {}).get("seed", 0)
    except (OSError, yaml.YAMLError, AttributeError):
        return
    if their == seed:
        warnings.warn(f"grow.fuse.{index}: {run} was trained with this run's seed ({seed}); on the same data "
                      "it is the same network as this run's, and fusing it adds nothing: train net 2 with "
                      "another seed", stacklevel=3)


def _warn_identical(sources: list[dict[str, torch.Tensor]], fuse: list[str]) -> None:
    """Two source nets equal tensor for tensor (e.g. the same spec, seed and data)."""
    for i in range(1, len(sources)):
        for j in range(i):
            if sources[i].keys() == sources[j].keys() and all(torch.equal(sources[i][k], sources[j][k])
                                                               for k in sources[i]):
                other = "this run's model" if j == 0 else f"fused run {fuse[j - 1]}"
                warnings.warn(f"grow: fused run {fuse[i - 1]} is identical to {other} at growth (same seed and "
                              "data?): the grown net's diagonal blocks are copies of one net", stacklevel=3)


@register_pass
class GrowPass(Pass):
    kind = "grow"
    spec_cls = GrowSpec
    preserves_computation = True  # the rewrite changes nothing; growth happens in training
    rank = None
    functionalizes = False

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        require_channel_rules(gm, "grow")
        if not any(p.kind == MIXING for p in ctx.applied):
            raise FxgrowError(f"grow needs a {MIXING} pass before it in `passes`")
        if ctx.example_input is not None:  # what would fail at the growth step fails here (and in --dry-run)
            check_growth_runs(gm, ctx.example_input, self.spec.factor)

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> list[Match]:
        """The template-mixed layers (their channel groups are known only with shapes)."""
        types = layer_types(gm)
        chains = weight_chains(gm).values()
        return [Match(c.layer, types.get(c.layer, "?")) for c in chains
                if any(meta(n).get("pass") == MIXING for n in c.producers)]

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> Record:
        check_growable(gm, [p.kind for p in ctx.applied if p.reversible])
        # The fused runs' training counts toward this run's FLOPs (template mixing's accounting).
        return Record(tuple(m.layer for m in matches), builds_on=tuple(self.spec.fuse))

    def check(self, gm: fx.GraphModule, record: Record, ctx: PassContext) -> None:
        """A trial growth of the rewritten model (its own weights as every source): a model
        growth cannot widen fails at rewrite time and in a dry run, not at the growth step."""
        if ctx.example_input is None:
            return
        carried = [a.pass_ for a in ctx.history if a.pass_.reversible]
        sources = [gm.state_dict()] * (1 + len(self.spec.fuse))
        grow_model(gm, sources, self.spec.factor, ctx.example_input, layout=self.spec.layout,
                   new_coefficients=self.spec.new_coefficients, carried=carried)

    def callbacks(self, gm: fx.GraphModule, record: Record, ctx: PassContext) -> list[Callback]:
        carried = [a.pass_ for a in ctx.history if a.pass_.reversible]
        check_growable(gm, [p.kind for p in carried])  # passes after grow may have added producers it cannot carry
        tables = [a.pass_.describe for a in ctx.history if a.pass_.kind == MIXING]
        return [GrowCallback(self.spec, carried, tables)]
