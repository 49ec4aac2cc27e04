"""Training-time behaviour that passes hand to the loop.

The loop knows these events, never the passes. Event order for one optimizer step
(`train/events.py` writes it once, for fxgrow's Trainer and for `fxgrow.Session`):

    on_step_start -> [for each of the step's batches b (ctx.batch, ctx.batch_index = b):
                        [for i in range(micro_steps): on_micro_step(i) -> forward
                         -> (loss * loss_scale(i, n) / batches_per_step).backward()]]
    -> after_backward -> (clip) -> [before_optimizer_step] -> optimizer.step() -> after_step

An optimizer step takes `batches_per_step` consecutive batches (1 unless a callback asks
for gradient accumulation over batches; an epoch then has batches // k optimizer steps)
and runs `micro_steps` forward/backward passes on each (e.g. one per sub-model). Each
micro-step's loss is multiplied by `loss_scale` (default 1/n: the mean over the batch's
micro-steps) and divided by the number of batches (the k batches count as one k-times
larger batch), so gradients accumulate into the one step.

plus on_train_start / on_eval / on_epoch_end / on_train_end. Every hook receives the
loop's `ctx` (see `TrainContext` below for what it offers). `before_optimizer_step` comes
only from drivers whose optimizer.step() runs a closure (Lightning's automatic
optimization), where the optimizer's step pre-hooks fire before the closure's backward.

The model's lifecycle: when a callback swaps in a new model (`ctx.replace_model`, e.g.
growth), the loop rebuilds the optimizer and scheduler (a driver whose framework owns the
optimizer re-points it in place) and then calls every callback's
`on_model_replaced(ctx, old, new, change)`; no callback has to notice a swap itself.

A resumed run first lets every callback, in order, rebuild the structure its saved state
says the model had (`replay_structure(model, state) -> model`, pure: growth grows an
equal empty model again), then calls on_train_start (ctx.resumed is True) on that model,
then every callback's load_state_dict, then loads the model, optimizer, scheduler and RNG
states, and goes on with the step after the checkpoint's (`checkpoint.replay_structures`
calls every callback's hook; `fxgrow.api.restore` replays the structure the same way).
A driver whose framework loads the model's tensors before anything else (Lightning, HF)
replays the structure inside that load; the callbacks' load_state_dict still follows
on_train_start. Any driver that implements `TrainContext` and these calls (another
training loop, Lightning, HF Trainer) runs the passes' callbacks alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class ModelChange:
    """How a replaced model relates to the old one.

    `param_map` maps new parameter names to the old names whose optimizer state they
    keep (by default every parameter whose name and shape survive keeps its state);
    `fresh(key)` is, for the weight chain `key` ("layer.param"), a bool tensor of the new
    value's shape, True where no old model held the entry (growth's new blocks), or None
    when the chain did not change shape."""

    param_map: dict[str, str] = field(default_factory=dict)
    cause: str = "replaced"
    fresh: Callable[[str], torch.Tensor | None] = lambda key: None


class TrainContext(Protocol):
    """What the loop exposes to callbacks."""

    model: nn.Module            # the model being trained (never the DDP wrapper)
    optimizer: torch.optim.Optimizer
    step: int                   # optimizer steps done so far (0 before the first)
    epoch: int
    total_steps: int            # T: optimizer steps the whole run will take
    steps_per_epoch: int
    batch: tuple[torch.Tensor, torch.Tensor | None] | None  # the current (inputs, targets); a driver
    # whose framework shows it only the model's input gives (inputs, None): read batch[0]
    batch_index: int            # which of the step's batches `batch` is (0 in on_step_start, after_step: the last)
    batches_per_step: int       # batches each optimizer step takes (gradient accumulation); 1 by default
    loss: torch.Tensor | None   # the last micro-step's loss
    device: torch.device
    seed: int
    rank: int                   # this process's DDP rank (0 without DDP)
    world: int                  # number of DDP processes (1 without DDP)
    resumed: bool               # this run continues from a checkpoint
    out_dir: Path               # the run folder; only rank 0 writes there

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (with step/epoch filled in) to metrics.jsonl."""

    def replace_model(self, model: nn.Module, change: ModelChange | dict[str, str] | None = None) -> None:
        """Swap in a new model (growth): rebuild the optimizer and scheduler (optimizer
        state follows `change.param_map`; a bare dict is taken as that map), then call
        every callback's `on_model_replaced`."""

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test-split loss and accuracy of `model` (default: the current model)."""


class Callback:
    """Base class: every hook is a no-op. Subclasses override what they need.

    `name` keys the callback's state in checkpoints and its section in report.json
    (a pass uses its spec `kind`)."""

    name: str = "callback"

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_start(self, ctx: TrainContext) -> None: ...

    def batches_per_step(self) -> int:
        """How many consecutive batches one optimizer step takes (gradient accumulation
        over batches, e.g. SortedNet's gacc = k); a fact of the callback's spec, asked
        once before training. Two callbacks asking for different counts above 1 is an
        error."""
        return 1

    def micro_steps(self, ctx: TrainContext) -> int:
        """How many forward/backward passes the current batch (`ctx.batch_index`) takes.
        Gradients accumulate over them. The loop takes the largest answer among
        callbacks."""
        return 1

    def loss_scale(self, ctx: TrainContext, index: int, count: int) -> float | None:
        """The factor micro-step `index` of the `count` on this batch multiplies its loss
        by before backward (e.g. 1.0 for a sum of sub-model losses), or None for no
        opinion. With no opinion anywhere it is 1/count (the mean); two callbacks giving
        different factors is an error."""
        return None

    def on_micro_step(self, ctx: TrainContext, index: int) -> None:
        """Before micro-step `index` on the current batch (e.g. pick the active sub-model)."""

    def lr_factor(self, ctx: TrainContext, factor: Callable[[int], float]) -> Callable[[int], float]:
        """The learning-rate multiplier (of every group's base lr) for optimizer step t:
        return `factor` (the run's schedule) or a function wrapping it (growth restarts
        it). Asked once, when training starts and before the first scheduler is built;
        every rebuilt scheduler (resume, a replaced model) uses the result, so it must
        depend only on t and this callback's state."""
        return factor

    def after_backward(self, ctx: TrainContext) -> None:
        """Gradients are complete; the optimizer has not stepped yet."""

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        """Gradients are complete and clipped; optimizer.step() is next. Sent only by
        drivers whose optimizer.step() runs a closure (Lightning's automatic
        optimization): a callback doing pre-step work in an optimizer step pre-hook does
        it here instead, and not again in the hook."""

    def after_step(self, ctx: TrainContext) -> None: ...

    def on_eval(self, ctx: TrainContext, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, ctx: TrainContext) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...

    def on_model_replaced(self, ctx: TrainContext, old: nn.Module, new: nn.Module, change: ModelChange) -> None:
        """`new` replaced `old` as the trained model (ctx.model is `new`, ctx.optimizer is
        rebuilt for it): refresh what this callback found in the old one."""

    def replay_structure(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """Resume: `model` as this callback's checkpointed `state` says its structure was
        (growth returns it grown; its values load afterwards). Pure; default: `model`."""
        return model

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Optimizer options per parameter name, e.g. {"fxgrow.conv1.mix.alpha":
        {"weight_decay": 0.0}}. The loop groups parameters by these overrides."""
        return {}

    def report(self) -> dict[str, Any]:
        """This callback's section of report.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        """Restore this callback's state on resume (the model's structure is replayed
        before, by `replay_structure`; `fxgrow.train.checkpoint.replay_structures` calls
        every callback's)."""
