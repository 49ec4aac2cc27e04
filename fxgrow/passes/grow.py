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
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from torch import fx, nn

from ..analysis import forward_flops
from ..errors import FxgrowError
from ..ir import layer_types, meta, weight_chains
from ..specs.base import At, PassSpec, resolve_time, time_type
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


class GrowSpec(PassSpec):
    kind: Literal["grow"] = "grow"
    factor: int = Field(2, ge=2, description="g: every growing channel group becomes g times wider")
    at: time_type(GrowAt) = Field(description=(
        "when to grow: an int counts optimizer steps, a float in [0, 1] is a fraction of training, "
        "or {step|epoch|fraction|flops_fraction: ...}"))
    fuse: list[str] = Field(default_factory=list, description=(
        "run folders or checkpoint.pt files of other trained small runs of the same spec; "
        "source net 0 is this run's model, the fused ones follow on the diagonal"))
    layout: Literal["vertical", "horizontal"] = "vertical"
    new_coefficients: Literal["orthogonal", "random", "copy"] = "orthogonal"
    noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to every new alpha")

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
        self.growth_step: int | None = None
        self.grown = False
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
        if self.spec.fuse and not getattr(ctx, "resumed", False):
            reference = ctx.model.state_dict()
            for i, path in enumerate(self.spec.fuse):
                load_source(path, reference, f"grow.fuse.{i}")

    def on_step_start(self, ctx: TrainContext) -> None:
        if self.grown:
            return
        if self.input_shape is None:
            x = ctx.batch[0]
            self.input_shape, self.input_dtype = list(x.shape[1:]), str(x.dtype).removeprefix("torch.")
        if self.growth_step is None:
            self.growth_step = self._flops_step(ctx)
        if ctx.step >= self.growth_step:
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
               growth_step: int | None = None, structure_only: bool = True) -> Grown:
        """The grown model. `structure_only` (resume, FLOPs): every source is `model` itself,
        no files are read; the values do not matter (a checkpoint's load next, or none)."""
        n = 1 + len(self.spec.fuse)
        own = model.state_dict()
        if structure_only:
            sources = [own] * n
        else:
            sources = [own] + [load_source(p, own, f"grow.fuse.{i}") for i, p in enumerate(self.spec.fuse)]
        step = self.growth_step if growth_step is None else growth_step
        generator = torch.Generator().manual_seed(stable_seed(int(seed), int(step or 0), self.name))
        device = next(iter(own.values())).device
        example = torch.zeros((2, *input_shape), dtype=getattr(torch, input_dtype), device=device)
        return grow_model(model, sources, self.spec.factor, example, layout=self.spec.layout,
                          new_coefficients=self.spec.new_coefficients, noise=self.spec.noise,
                          generator=generator, carried=self.carried)

    def _grow(self, ctx: TrainContext) -> None:
        old = ctx.model
        grown = self._build(old, ctx.seed, self.input_shape, self.input_dtype, structure_only=False)
        new, info = grown
        params = surviving_params(old, new)
        ctx.replace_model(new, ModelChange(params, cause=self.name, fresh=grown.fresh))
        self.grown = True
        self.info = {"step": ctx.step, "epoch": ctx.epoch, **info, "kept_optimizer_state": sorted(params),
                     "fused": list(self.spec.fuse), "blocks": [row for table in self.tables for row in table(new)]}
        ctx.log({"split": "grow", "factor": info["factor"], "sources": info["sources"],
                 "params_before": info["params_before"], "params_after": info["params_after"],
                 "widths": [[w["before"], w["after"]] for w in info["widths"]]})

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        return {"grown": self.grown, "growth_step": self.growth_step, "input_shape": self.input_shape,
                "input_dtype": self.input_dtype, "info": self.info}

    def replay_structure(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """The grown structure, when the checkpoint was written after growth."""
        if not state or not state["grown"]:
            return model
        return self._build(model, 0, state["input_shape"], state["input_dtype"], state["growth_step"]).model

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        if not state:
            return
        self.growth_step, self.input_shape = state["growth_step"], state["input_shape"]
        self.input_dtype, self.info = state["input_dtype"], state["info"]
        self.grown = state["grown"]

    def report(self) -> dict[str, Any]:
        at = self.spec.at
        return {"at": at.model_dump(exclude_none=True) if isinstance(at, GrowAt) else at, "growth_step": self.growth_step,
                "grown": self.grown, **self.info}


@register_pass
class GrowPass(Pass):
    kind = "grow"
    spec_cls = GrowSpec
    preserves_computation = True  # the rewrite changes nothing; growth happens in training
    rank = None
    functionalizes = False

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
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
