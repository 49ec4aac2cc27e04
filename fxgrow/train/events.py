"""The order of fxgrow's training events, written once.

fxgrow's `Trainer` and `fxgrow.Session` (the driver for loops fxgrow does not own: a plain
loop, Lightning, the Hugging Face Trainer) send every event to the callbacks through
`Events`, which checks the order, and `optimizer_step` is one optimizer step in it:

    step_start -> zero grads -> [for each of the step's batches (next_batch before the 2nd, ...):
                                 [micro_step(i) -> forward -> steps.scale(loss).backward()] x n]
    -> after_backward -> (clip) -> optimizer.step -> scheduler.step -> after_step (step += 1)

A driver whose `optimizer.step()` runs a closure (Lightning's automatic optimization) calls
`before_optimizer_step` after clipping, just before the update: there the optimizer's step
pre-hooks fire before the closure's backward, too early for work that needs the gradients.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import FxgrowError
from .callbacks import Callback, ModelChange, TrainContext
from .optim import merge_overrides

# What has happened, and which call comes next, in each phase of a run.
_STATE = {"setup": ("the run has not started", "start()"),
          "between": ("no step is open", "step_start()"),
          "step": ("a step is open", "its micro-steps, then after_backward()"),
          "backward": ("the step's gradients are complete", "the optimizer step, then after_step()"),
          "ended": ("the run has ended", "nothing")}


class EventOrderError(FxgrowError):
    """A driver called an event out of fxgrow's order."""


class MicroSteps:
    """The forward/backward passes on one batch of an optimizer step (batch `batch` of the
    step's `batches`). Iterating runs every callback's `on_micro_step(i)` (e.g. activate the
    next sub-model) before yielding i; `scale(loss)` is what micro-step i back-propagates."""

    def __init__(self, events: "Events", ctx: TrainContext, n: int, batch: int = 0, batches: int = 1):
        self._events, self._ctx, self.n = events, ctx, n
        self.batch, self.batches = batch, batches
        self.begun = 0  # micro-steps whose on_micro_step has run

    def __len__(self) -> int:
        return self.n

    @property
    def index(self) -> int:
        """The current micro-step (-1 before the first)."""
        return self.begun - 1

    def __iter__(self) -> Iterator[int]:
        while self.begun < self.n:
            self._events.micro_step(self._ctx, self.begun)
            yield self.index

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: gradients accumulate over the step's micro-steps and
        batches. Each loss is multiplied by the callbacks' `loss_scale` (default 1/n, the mean
        over the batch's micro-steps) and divided by the step's batches (k batches count as
        one k-times larger batch). Kept as ctx.loss, detached. Every driver scales here."""
        self._ctx.loss = loss.detach()
        factor = self._events.loss_scale(self._ctx, self.index, self.n)
        if factor is None:
            return loss / (self.n * self.batches)
        return loss * (factor / self.batches)


class Events:
    """Every training event, sent to `callbacks` in order; a call out of order is an
    EventOrderError naming the call that was due (`caller` prefixes the names, e.g.
    "session.")."""

    def __init__(self, callbacks: Sequence[Callback], caller: str = ""):
        self.callbacks = list(callbacks)
        names = [cb.name for cb in self.callbacks]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise FxgrowError(f"callback name {twice!r} is used twice; names key checkpoint state and report sections")
        self.caller = caller
        self.phase = "setup"
        self.steps: MicroSteps | None = None  # the open step's

    def expect(self, event: str, *phases: str) -> None:
        """Refuse `event` unless the run is in one of `phases`."""
        if self.phase not in phases:
            state, due = _STATE[self.phase]
            raise EventOrderError(f"{self.caller}{event}() out of order: {state}; what comes next is {due}")

    def overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Every callback's optimizer options per parameter of `model`, merged."""
        return merge_overrides(model, ((cb.name, cb.param_group_overrides(model)) for cb in self.callbacks))

    def batches_per_step(self) -> int:
        """How many batches one optimizer step takes, as the callbacks ask
        (`Callback.batches_per_step`); callbacks asking for different counts are an error."""
        asked = {cb.name: int(cb.batches_per_step()) for cb in self.callbacks}
        above = {name: k for name, k in asked.items() if k != 1}
        if any(k < 1 for k in above.values()) or len(set(above.values())) > 1:
            raise FxgrowError(f"callbacks ask for different batches per optimizer step: {above}")
        return next(iter(above.values()), 1)

    def train_start(self, ctx: TrainContext) -> None:
        self.expect("start", "setup")
        for cb in self.callbacks:
            cb.on_train_start(ctx)
        self.phase = "between"

    def step_start(self, ctx: TrainContext) -> MicroSteps:
        """The step's first batch is ctx.batch (ctx.batch_index 0)."""
        self.expect("step_start", "between")
        for cb in self.callbacks:
            cb.on_step_start(ctx)
        self.steps, self.phase = self._micro_steps(ctx, 0, ctx.batches_per_step), "step"
        return self.steps

    def next_batch(self, ctx: TrainContext) -> MicroSteps:
        """The micro-steps on the step's next batch (the driver has set ctx.batch and
        ctx.batch_index to it), once every micro-step on the previous one has run."""
        self.expect("next_batch", "step")
        steps = self.steps
        if steps.begun != steps.n or steps.batch + 1 >= steps.batches:
            raise EventOrderError(f"{self.caller}next_batch() out of order: batch {steps.batch} of this step's "
                                  f"{steps.batches} has run {steps.begun} of its {steps.n} micro-steps")
        self.steps = self._micro_steps(ctx, steps.batch + 1, steps.batches)
        return self.steps

    def _micro_steps(self, ctx: TrainContext, batch: int, batches: int) -> MicroSteps:
        n = max([cb.micro_steps(ctx) for cb in self.callbacks], default=1)
        return MicroSteps(self, ctx, n, batch, batches)

    def loss_scale(self, ctx: TrainContext, index: int, count: int) -> float | None:
        """The callbacks' factor for micro-step `index`'s loss (`Callback.loss_scale`); None:
        none has an opinion (the mean). Two different factors are an error."""
        asked = {cb.name: s for cb in self.callbacks if (s := cb.loss_scale(ctx, index, count)) is not None}
        if len(set(asked.values())) > 1:
            raise FxgrowError(f"callbacks scale micro-step {index}'s loss differently: {asked}")
        return float(next(iter(asked.values()))) if asked else None

    def micro_step(self, ctx: TrainContext, index: int) -> None:
        self.expect("micro_step", "step")
        if index != self.steps.begun or index >= self.steps.n:
            raise EventOrderError(f"{self.caller}micro-step {index} out of order: {self.steps.begun} of this step's "
                                  f"{self.steps.n} have begun")
        for cb in self.callbacks:
            cb.on_micro_step(ctx, index)
        self.steps.begun += 1

    def after_backward(self, ctx: TrainContext) -> None:
        self.expect("after_backward", "step")
        steps = self.steps
        if steps.begun != steps.n or steps.batch != steps.batches - 1:
            which = (f"{steps.begun} of this step's {steps.n} micro-steps" if steps.batches == 1 else
                     f"{steps.begun} of the {steps.n} micro-steps on batch {steps.batch} of this step's {steps.batches}")
            raise EventOrderError(f"{self.caller}after_backward() after {which}: run every one (iterate the step's "
                                  "micro-steps)")
        for cb in self.callbacks:
            cb.after_backward(ctx)
        self.phase = "backward"

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        self.expect("before_optimizer_step", "backward")
        for cb in self.callbacks:
            cb.before_optimizer_step(ctx)

    def after_step(self, ctx: TrainContext) -> None:
        """The optimizer stepped: count the step, then tell the callbacks."""
        self.expect("after_step", "backward")
        ctx.step += 1
        self.steps, self.phase = None, "between"
        for cb in self.callbacks:
            cb.after_step(ctx)

    def epoch_end(self, ctx: TrainContext) -> None:
        self.expect("epoch_end", "between")
        for cb in self.callbacks:
            cb.on_epoch_end(ctx)

    def eval(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        self.expect("on_eval", "between")
        for cb in self.callbacks:
            cb.on_eval(ctx, metrics)

    def train_end(self, ctx: TrainContext) -> None:
        self.expect("train_end", "between")
        for cb in self.callbacks:
            cb.on_train_end(ctx)
        self.phase = "ended"

    def model_replaced(self, ctx: TrainContext, old: nn.Module, new: nn.Module, change: ModelChange) -> None:
        for cb in self.callbacks:
            cb.on_model_replaced(ctx, old, new, change)

    def state_dicts(self) -> dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def reports(self) -> dict[str, Any]:
        return {cb.name: cb.report() for cb in self.callbacks}


def optimizer_step(ctx: TrainContext, events: Events, forward_backward: Callable[[MicroSteps], None],
                   update: Callable[[], None], batches: Sequence[Any] = ()) -> None:
    """One optimizer step in fxgrow's order. `forward_backward(steps)` runs the current
    micro-step's forward on ctx.batch and `steps.scale(loss).backward()`; `update()` clips,
    steps the optimizer and the schedule. `batches`: the step's batches when it takes more
    than one (ctx.batches_per_step), each ctx.batch in turn; otherwise ctx.batch is the one.
    `ctx.optimizer` is read after `step_start`, where growth may have replaced it."""
    steps = events.step_start(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    for b in range(max(len(batches), 1)):
        if b:
            ctx.batch, ctx.batch_index = batches[b], b
            steps = events.next_batch(ctx)
        for _ in steps:
            forward_backward(steps)
    events.after_backward(ctx)
    update()
    events.after_step(ctx)
