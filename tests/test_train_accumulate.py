"""The loop's accumulation hooks (train/callbacks.py): k batches per optimizer step, a
per-micro-step loss scale, and a callback's learning-rate schedule."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxgrow.errors import FxgrowError
from fxgrow.train import Callback, Trainer
from fxgrow.train.optim import lr_factor
from tests.test_train_loop import Grow, LrTrace, ScalePerMicroStep, Scaled, mlp, one_thread, spec  # noqa: F401


class Accumulate(Callback):
    """Asks for k batches a step; records, per step, the batches it saw, the parameters
    before the step and the gradient the step used."""

    name = "accumulate"

    def __init__(self, k: int, micro: int = 1):
        self.k, self.micro = k, micro
        self.steps: list[dict] = []

    def batches_per_step(self) -> int:
        return self.k

    def micro_steps(self, ctx):
        return self.micro

    def on_step_start(self, ctx):
        assert ctx.batch_index == 0 and ctx.batches_per_step == self.k
        self.steps.append({"state": {n: p.detach().clone() for n, p in ctx.model.state_dict().items()},
                           "batches": []})

    def on_micro_step(self, ctx, index):
        if index == 0:
            self.steps[-1]["batches"].append(ctx.batch)

    def after_backward(self, ctx):
        self.steps[-1]["grad"] = ctx.model[0].weight.grad.clone()


def test_k_batches_per_step_average_their_gradients(tmp_path):
    cb = Accumulate(2)
    trainer = Trainer(mlp(), spec(epochs=2, batch_size=2), [cb], out_dir=tmp_path)  # 8 examples: 4 batches an epoch
    report = trainer.fit()
    assert trainer.steps_per_epoch == 2 and report["steps"] == 4 and len(cb.steps) == 4
    assert trainer._samples == 16  # every example of both epochs counted, not one batch a step
    seen = torch.cat([y for step in cb.steps[:2] for _, y in step["batches"]])
    assert len(seen) == 8  # an epoch's steps took all its batches
    for step in cb.steps:
        assert len(step["batches"]) == 2
        ref = mlp()
        ref.load_state_dict(step["state"])
        for x, y in step["batches"]:
            (nn.functional.cross_entropy(ref(x), y) / 2).backward()
        torch.testing.assert_close(step["grad"], ref[0].weight.grad)


def test_an_epoch_keeps_whole_steps_only(tmp_path):
    cb = Accumulate(3)
    trainer = Trainer(mlp(), spec(epochs=1, batch_size=2), [cb], out_dir=tmp_path)  # 4 batches: one step of 3
    trainer.fit()
    assert trainer.steps_per_epoch == 1 and len(cb.steps) == 1
    with pytest.raises(FxgrowError, match="only 4"):
        Trainer(mlp(), spec(batch_size=2), [Accumulate(5)], out_dir=tmp_path / "b").fit()


def test_callbacks_asking_for_different_batch_counts_are_refused(tmp_path):
    other = Accumulate(3)
    other.name = "other"
    with pytest.raises(FxgrowError, match="different batches per optimizer step"):
        Trainer(mlp(), spec(batch_size=2), [Accumulate(2), other], out_dir=tmp_path).fit()


class Summed(ScalePerMicroStep):
    def loss_scale(self, ctx, index, count):
        return 1.0


def test_loss_scale_one_sums_the_micro_steps(tmp_path):
    """Same seed, same first batch and weights: the sum is n times the default mean (the
    mean itself is checked against autograd in test_train_loop)."""
    summed, mean = Summed(3), ScalePerMicroStep(3)
    for cb, out in ((summed, "sum"), (mean, "mean")):
        torch.manual_seed(0)
        Trainer(Scaled(), spec(epochs=1), [cb], out_dir=tmp_path / out).fit()
    assert torch.equal(summed.batches[0][0][0], mean.batches[0][0][0])
    torch.testing.assert_close(summed.grads[0], 3 * mean.grads[0])


def test_conflicting_loss_scales_are_refused(tmp_path):
    a, b = Summed(2), ScalePerMicroStep(2)
    b.name, b.loss_scale = "half", lambda ctx, index, count: 0.5
    with pytest.raises(FxgrowError, match="differently"):
        Trainer(Scaled(), spec(epochs=1), [a, b], out_dir=tmp_path).fit()


class Restart(Callback):
    """From step 2 the lr is a tenth of the schedule's."""

    name = "restart"

    def lr_factor(self, ctx, factor):
        return lambda t: factor(t) * (0.1 if t >= 2 else 1.0)


def test_a_callbacks_lr_factor_holds_across_a_replaced_model(tmp_path):
    trace = LrTrace()
    s = spec(epochs=3, schedule={"name": "cosine"})
    # Grow replaces the model after step 2, which rebuilds the optimizer and the scheduler
    Trainer(mlp(), s, [Restart(), Grow({}), trace], out_dir=tmp_path).fit()
    base = lr_factor(s.schedule, 6, 2)
    assert [lrs[0] for lrs in trace.lrs] == pytest.approx([0.1 * base(t) * (0.1 if t >= 2 else 1) for t in range(6)])


def test_a_step_of_k_batches_runs_each_batchs_micro_steps_in_order():
    """Events: the next batch only after every micro-step of the current one, after_backward
    only after the last batch; each micro-step's loss is divided by the step's batches."""
    from types import SimpleNamespace

    from fxgrow.train.events import EventOrderError, Events

    events, ctx = Events([]), SimpleNamespace(batches_per_step=2, loss=None)
    events.train_start(ctx)
    steps = events.step_start(ctx)
    with pytest.raises(EventOrderError, match="next_batch"):
        events.next_batch(ctx)  # batch 0's micro-step has not run
    for _ in steps:
        assert float(steps.scale(torch.tensor(6.0))) == 3.0  # one micro-step, two batches
    with pytest.raises(EventOrderError, match="batch 0 of this step's 2"):
        events.after_backward(ctx)
    for _ in events.next_batch(ctx):
        pass
    with pytest.raises(EventOrderError, match="next_batch"):
        events.next_batch(ctx)  # there is no third batch
    events.after_backward(ctx)
