"""The order of fxgrow's training events, written once.

fxgrow's `Trainer` and `fxgrow.Session` (the driver for loops fxgrow does not own: a plain
loop, Lightning, the Hugging Face Trainer) send every event to the callbacks through
`Events`, which checks the order, and `optimizer_step` is one optimizer step in it:

    step_start -> zero grads -> [micro_step(i) -> forward -> steps.scale(loss).backward()] x n
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
    """The forward/backward passes of one optimizer step. Iterating runs every callback's
    `on_micro_step(i)` (e.g. activate the next sub-model) before yielding i; `scale(loss)`
    is what micro-step i back-propagates."""

    def __init__(self, events: "Events", ctx: TrainContext, n: int):
        self._events, self._ctx, self.n = events, ctx, n
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
        """The loss to back-propagate: gradients accumulate over the step's micro-steps,
        each loss divided by their number. (Kept as ctx.loss, detached.) Every driver scales
        here, so a scale a callback chooses per micro-step would reach all of them at once."""
        self._ctx.loss = loss.detach()
        return loss / self.n


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

    def train_start(self, ctx: TrainContext) -> None:
        self.expect("start", "setup")
        for cb in self.callbacks:
            cb.on_train_start(ctx)
        self.phase = "between"

    def step_start(self, ctx: TrainContext) -> MicroSteps:
        self.expect("step_start", "between")
        for cb in self.callbacks:
            cb.on_step_start(ctx)
        n = max([cb.micro_steps(ctx) for cb in self.callbacks], default=1)
        self.steps, self.phase = MicroSteps(self, ctx, n), "step"
        return self.steps

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
        if self.steps.begun != self.steps.n:
            raise EventOrderError(f"{self.caller}after_backward() after {self.steps.begun} of this step's "
                                  f"{self.steps.n} micro-steps: run every one (iterate the step's micro-steps)")
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
                   update: Callable[[], None]) -> None:
    """One optimizer step in fxgrow's order. `forward_backward(steps)` runs the current
    micro-step's forward and `steps.scale(loss).backward()`; `update()` clips, steps the
    optimizer and the schedule. `ctx.optimizer` is read after `step_start`, where growth
    may have replaced it."""
    steps = events.step_start(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    for _ in steps:
        forward_backward(steps)
    events.after_backward(ctx)
    update()
    events.after_step(ctx)
