"""Sorted slicing under the training loop: which sub-models each step runs, the same sequence
after a resume, a real digits run whose every sub-model keeps 90% of the largest's accuracy,
and BatchNorm recalibration on the trained model."""
from __future__ import annotations

import copy

import pytest
import torch

from fxgrow.passes import Pipeline
from fxgrow.passes.sorted_slicing import SortedSlicingCallback, SortedSlicingPass
from fxgrow.specs.train import TrainSpec
from fxgrow.subnets import find_state, preserved_norm_stats, recalibrate, subnet
from fxgrow.train import Callback, Trainer
from fxgrow.train.data import Batches

from .zoo import MLP, ResNetTiny

SYNTHETIC = {"name": "synthetic", "shape": [1, 8, 8], "num_classes": 10, "train_size": 64, "test_size": 32}


class Recorder(Callback):
    """Records the active sub-model at every micro-step, and that each step ends on the largest."""

    name = "recorder"

    def __init__(self):
        self.runs: dict[int, list[tuple[float, int]]] = {}
        self.after: list[tuple[float, int]] = []

    def on_micro_step(self, ctx, index):
        self.runs.setdefault(ctx.step, []).append(find_state(ctx.model).point)

    def after_step(self, ctx):
        self.after.append(find_state(ctx.model).point)


class Crash(Callback):
    name = "crash"

    def after_step(self, ctx):
        if ctx.step == 7:
            raise RuntimeError("crash")


def train_spec(**fields) -> TrainSpec:
    base = {"data": SYNTHETIC, "epochs": 1, "batch_size": 16, "progress": "none", "checkpoint": False,
            "optimizer": {"lr": 0.05}}
    return TrainSpec(**{**base, **fields})


def rewrite(model, x, **fields):
    result = Pipeline([SortedSlicingPass(**fields)])(model, example_input=x)
    return result.graph_module, result.callbacks


@pytest.mark.parametrize("mode,draws", [("stochastic", 3), ("sandwich", 4), ("summation", 1)])
def test_each_step_runs_the_planned_sub_models(tmp_path, mode, draws):
    gm, callbacks = rewrite(ResNetTiny(c=4, in_ch=1), torch.randn(2, 1, 8, 8), mode=mode, sub_models_per_batch=draws,
                            width={"fractions": [0.5, 1.0]}, depth={"blocks": [1, 3]})
    recorder = Recorder()
    Trainer(gm, train_spec(seed=3), [*callbacks, recorder], out_dir=tmp_path).fit()
    slicing: SortedSlicingCallback = callbacks[0]
    points = list(find_state(gm).points)
    assert sorted(recorder.runs) == [0, 1, 2, 3]
    for step, ran in recorder.runs.items():
        assert ran == slicing.plan(points, 3, step)[0]
        if mode == "stochastic":
            assert len(ran) == 3
        elif mode == "sandwich":
            assert ran[:2] == [(1.0, 3), (0.5, 1)] and len(ran) == 4
        else:
            top = ran[0]
            assert ran == sorted({p for p in points if p[0] <= top[0] and p[1] <= top[1]}, reverse=True)
    assert set(recorder.after) == {(1.0, 3)}
    assert any(len(set(ran)) > 1 for ran in recorder.runs.values())


class GradProbe(Callback):
    """Per step: the weights before it, each batch with the sub-models run on it, and the
    accumulated gradient of every parameter the step used."""

    name = "probe"

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_start(self, ctx):
        self.steps.append({"state": {k: v.clone() for k, v in ctx.model.state_dict().items()}, "batches": []})

    def on_micro_step(self, ctx, index):
        if index == 0:
            self.steps[-1]["batches"].append((ctx.batch, []))
        self.steps[-1]["batches"][-1][1].append(find_state(ctx.model).point)

    def after_backward(self, ctx):
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}


def reference_grads(gm, step, weight):
    """sum over batches and their sub-models of weight(batch count, sub-model count) x
    each sub-model's loss gradient, from the step's starting weights."""
    gm.load_state_dict(step["state"])
    gm.zero_grad(set_to_none=True)
    state = find_state(gm)
    for (x, y), points in step["batches"]:
        for point in points:
            state.activate(*point)
            loss = torch.nn.functional.cross_entropy(gm(x), y)
            (loss * weight(len(step["batches"]), len(points))).backward()
    state.activate(*state.largest)
    return {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fields, weight", [
    ({"mode": "summation"}, lambda k, n: 1.0),                                   # the paper's sum
    ({"mode": "summation", "loss_reduction": "mean"}, lambda k, n: 1.0 / n),
    ({"sub_models_per_batch": 3}, lambda k, n: 1.0 / n),                          # k sub-models, one batch
    ({"accumulate_batches": 2}, lambda k, n: 1.0 / k),                            # SortedNet's gacc = 2
    ({"mode": "summation", "accumulate_batches": 2}, lambda k, n: 1.0 / k),
])
def test_the_step_gradient_is_the_declared_combination(tmp_path, fields, weight):
    torch.manual_seed(0)
    gm, callbacks = rewrite(MLP(), torch.randn(2, 1, 8, 8), width={"fractions": [0.25, 0.5, 1.0]}, **fields)
    probe = GradProbe()
    trainer = Trainer(gm, train_spec(epochs=1, batch_size=8), [*callbacks, probe], out_dir=tmp_path)  # 8 batches
    trainer.fit()
    k = fields.get("accumulate_batches", 1)
    assert trainer.steps_per_epoch == 8 // k and len(probe.steps) == 8 // k
    assert all(len(step["batches"]) == k for step in probe.steps)
    if fields.get("mode") == "summation":  # some step ran a varying number of sub-models
        assert len({len(points) for step in probe.steps for _, points in step["batches"]}) > 1
    assert_step_gradients(gm, probe, weight)


def assert_step_gradients(gm, probe: GradProbe, weight) -> None:
    """Every step's accumulated gradient is `reference_grads` of its batches and sub-models."""
    check = copy.deepcopy(gm)
    for step in probe.steps:
        expected = reference_grads(check, step, weight)
        assert expected.keys() == step["grads"].keys()
        for name, grad in step["grads"].items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sampling_is_reproducible_across_resume(tmp_path):
    def run(out, extra=(), resume=None):
        torch.manual_seed(0)
        gm, callbacks = rewrite(MLP(), torch.randn(2, 1, 8, 8), width={"fractions": [0.25, 0.5, 0.75, 1.0]},
                                sub_models_per_batch=2)
        recorder = Recorder()
        spec = train_spec(epochs=3, checkpoint=True, checkpoint_every_steps=3)
        trainer = Trainer(gm, spec, [*callbacks, recorder, *extra], out_dir=out, resume=resume)
        trainer.fit()
        return recorder, trainer

    resumed_like_uninterrupted(run, tmp_path)


def resumed_like_uninterrupted(run, tmp_path) -> Recorder:
    """`run(out, extra callbacks, resume)` -> (Recorder, Trainer), checkpointing every 3
    steps: crashed after step 7 and resumed, it runs the same sub-models from step 6 on and
    ends with the same weights as a run never stopped. Returns the uninterrupted recorder."""
    reference, ref_trainer = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "b", [Crash()])
    resumed, trainer = run(tmp_path / "b", resume=tmp_path / "b")
    assert min(resumed.runs) == 6  # the checkpoint at step 6
    assert resumed.runs == {s: r for s, r in reference.runs.items() if s >= 6}
    for (k, a), (_, b) in zip(ref_trainer.model.state_dict().items(), trainer.model.state_dict().items()):
        assert torch.equal(a, b), k
    return reference


class CrashLate(Callback):
    name = "crash"

    def after_step(self, ctx):
        if ctx.step == 11:  # after the step-10 checkpoint, inside the last 4 (recalibration) steps
            raise RuntimeError("crash")


def test_resume_in_the_last_steps_recalibrates_on_the_same_batches(tmp_path):
    def run(out, extra=(), resume=None):
        torch.manual_seed(0)
        gm, callbacks = rewrite(ResNetTiny(c=4, in_ch=1), torch.randn(2, 1, 8, 8),
                                width={"fractions": [0.5, 1.0]}, recalibrate_batches=4)
        spec = train_spec(epochs=3, checkpoint=True, checkpoint_every_steps=10)
        trainer = Trainer(gm, spec, [*callbacks, *extra], out_dir=out, resume=resume)
        return trainer, trainer.fit()

    reference, ref_report = run(tmp_path / "a")
    assert reference.step == 12
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "b", [CrashLate()])
    resumed, report = run(tmp_path / "b", resume=tmp_path / "b")
    for (k, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k  # BN statistics included
    assert report["sorted_slicing"]["grid"] == ref_report["sorted_slicing"]["grid"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """4 widths x 2 depths of a residual CNN trained at once on digits (CPU, ~10 s)."""
    torch.manual_seed(0)
    gm, callbacks = rewrite(ResNetTiny(c=16, in_ch=1), torch.randn(2, 1, 8, 8),
                            width={"fractions": [0.25, 0.5, 0.75, 1.0]}, depth={"blocks": [1, 3]}, sub_models_per_batch=2)
    spec = TrainSpec(data="digits", epochs=12, batch_size=64, optimizer={"lr": 0.1}, progress="none",
                     checkpoint=False)
    trainer = Trainer(gm, spec, callbacks, out_dir=tmp_path_factory.mktemp("digits"))
    report = trainer.fit()
    return report, trainer


def test_digits_every_sub_model_keeps_90_percent_of_the_largest(digits_run):
    report, _ = digits_run
    section = report["sorted_slicing"]
    assert section["blocks"] == ["layer1.0", "layer1.1", "layer2.1"] and section["mode"] == "stochastic"
    assert "model input" in section["groups"]["full_width"].values() and len(section["groups"]["sliced"]) >= 5
    grid = section["grid"]
    assert [(r["width"], r["depth"]) for r in grid] == [(w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (1, 3)]
    largest = grid[-1]
    assert largest["accuracy"] > 0.9 and largest["share"] == 1.0
    for row in grid:
        assert row["accuracy"] >= 0.9 * largest["accuracy"], row
        assert row["share"] == pytest.approx(row["accuracy"] / largest["accuracy"])
    params = {(r["width"], r["depth"]): r["params"] for r in grid}
    flops = {(r["width"], r["depth"]): r["flops"] for r in grid}
    for w in (0.25, 0.5, 0.75, 1.0):
        assert params[(w, 1)] < params[(w, 3)] and flops[(w, 1)] < flops[(w, 3)]
    assert params[(0.25, 3)] < params[(0.5, 3)] < params[(0.75, 3)] < params[(1.0, 3)] == largest["params"]


def test_recalibration_changes_statistics_and_helps_narrow_sub_models(digits_run):
    _, trainer = digits_run
    model = trainer.model
    batches = Batches(trainer.data, "train", 64, trainer.device).epoch(0)
    calibration = [trainer.data.prepare(x) for x, _ in list(batches)[:10]]
    bn = model.get_submodule("layer1.0.bn1")
    with preserved_norm_stats(model), subnet(model, 0.25, 3):
        before_stats = bn.running_mean[:4].clone()
        before = trainer.evaluate(model)
        recalibrate(model, calibration)
        after = trainer.evaluate(model)
        assert not torch.allclose(bn.running_mean[:4], before_stats)
    assert after["accuracy"] > before["accuracy"] + 0.05, (before, after)
    assert after["loss"] < before["loss"]
