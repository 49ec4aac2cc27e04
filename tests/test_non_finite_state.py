"""The non-finite guard looks at the state, not only the loss: a checkpoint is written only
when every parameter, buffer and optimizer state is finite, a run whose state goes
non-finite stops naming the step, the first bad tensor and the last finite checkpoint, and
nothing non-finite is folded and reported as done."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxgrow.specs.train import TrainSpec
from fxgrow.train import Callback, NonFiniteState, Trainer
from fxgrow.train.checkpoint import load_checkpoint
from tests.cli_runs import ROOT, cli
from tests.test_train_loop import SYNTH, one_thread  # noqa: F401  (fixture)


def spec(**kw) -> TrainSpec:
    base = dict(data=SYNTH, epochs=4, batch_size=4, log_every_steps=100, progress="none", checkpoint_every_steps=2,
                optimizer={"name": "sgd", "lr": 0.1})
    return TrainSpec(**{**base, **kw})


def bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


class Poison(Callback):
    """Makes one tensor infinite after step `at`: the loss stays finite (BN trains on
    batch statistics; momentum is not the loss), so only a look at the state finds it."""

    name = "poison"

    def __init__(self, at: int, what: str):
        self.at, self.what = at, what

    def after_step(self, ctx):
        if ctx.step == self.at:
            if self.what == "buffer":
                ctx.model[1].running_var.fill_(float("inf"))
            else:
                ctx.optimizer.state[ctx.model[0].weight]["momentum_buffer"].fill_(float("nan"))


@pytest.mark.parametrize("what, at, named", [("buffer", 5, "model buffer '1.running_var'"),
                                             ("optimizer", 6, "optimizer state 'momentum_buffer' of '0.weight'")])
def test_a_checkpoint_is_never_written_with_non_finite_state(tmp_path, what, at, named):
    with pytest.raises(NonFiniteState, match=rf"step 6 \(epoch 2\): {named}.*checkpoint.pt \(step 4\)"):
        Trainer(bn_mlp(), spec(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}),
                [Poison(at, what)], out_dir=tmp_path).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())
    assert not (tmp_path / "report.json").exists()


def test_without_checkpoints_the_end_of_training_checks(tmp_path):
    folded = []
    with pytest.raises(NonFiniteState, match="step 8 .*running_var.*no checkpoint was written"):
        Trainer(bn_mlp(), spec(checkpoint=False), [Poison(7, "buffer")], out_dir=tmp_path,
                on_finish=lambda *a: folded.append(a)).fit()
    assert not folded and not (tmp_path / "report.json").exists()


class Masked(nn.Module):
    """A -inf attention-style mask buffer: non-finite from the start, and meant to be."""

    def __init__(self):
        super().__init__()
        self.net = bn_mlp()
        self.register_buffer("mask", torch.tensor([0.0, 0.0, float("-inf")]))

    def forward(self, x):
        return self.net(x) + self.mask.clamp_min(-1e4)


def test_tensors_non_finite_from_the_start_are_not_refused(tmp_path):
    report = Trainer(Masked(), spec(), out_dir=tmp_path).fit()
    assert report["steps"] == 8 and torch.isinf(load_checkpoint(tmp_path / "checkpoint.pt")["model"]["mask"]).any()


def test_a_diverged_run_exits_non_zero_and_folds_nothing(tmp_path):
    """lr 100 on a BN CNN: the loss stays finite for dozens of steps while running_var
    overflows; this used to exit 0 ("done") with inf in folded.pt."""
    (tmp_path / "spec.yaml").write_text(
        "model: {example_input: [1, 1, 8, 8]}\n"
        "train: {data: digits, epochs: 2, batch_size: 64, progress: none, checkpoint_every_steps: 3,\n"
        "        optimizer: {name: sgd, lr: 100.0, momentum: 0.0}}\n")
    out = tmp_path / "run"
    result = cli("apply", tmp_path / "spec.yaml", ROOT / "examples/models/small_cnn.py", "--out", out)
    assert result.exit_code == 1, result.output
    assert "non-finite" in result.output and "step" in result.output and "Traceback" not in result.output
    assert not (out / "folded.pt").exists() and not (out / "report.json").exists()
    if (out / "checkpoint.pt").exists():
        state = load_checkpoint(out / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert f"(step {state['step']})" in result.output


def test_finite_flags_are_exact_when_a_sum_overflows():
    from fxgrow.train.checkpoint import finite_flags
    huge = torch.full((4,), 3e38)  # finite, but its sum is inf
    nan, inf = torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")])
    assert finite_flags([huge, torch.ones(3)]).tolist() == [True, True]
    assert finite_flags([huge, nan, inf, torch.zeros(0)]).tolist() == [True, False, False, True]
