"""The training loop in one process: event order, micro-steps, parameter groups,
schedules, clipping, model replacement, the non-finite guard, the output folder."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from fxgrow.errors import FxgrowError
from fxgrow.specs.train import ScheduleSpec, TrainSpec
from fxgrow.train import Callback, NonFiniteLoss, Trainer
from fxgrow.train.checkpoint import load_checkpoint
from fxgrow.train.optim import lr_factor

SYNTH = {"name": "synthetic", "shape": [12], "num_classes": 3, "train_size": 8, "test_size": 6}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronization (and stalls
    badly on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec(**kw) -> TrainSpec:
    base = dict(data=SYNTH, epochs=2, batch_size=4, log_every_steps=100, progress="none",
                optimizer={"name": "sgd", "lr": 0.1})
    return TrainSpec(**{**base, **kw})


def mlp(hidden: int = 6) -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, hidden), nn.Tanh(), nn.Linear(hidden, 3))


class Recorder(Callback):
    name = "recorder"

    def __init__(self, log: list, micro: int = 1):
        self.events, self.micro = log, micro

    def _rec(self, event, ctx, *extra):
        self.events.append((event, ctx.step, ctx.epoch, *extra))

    def on_train_start(self, ctx): self._rec("train_start", ctx)
    def on_step_start(self, ctx): self._rec("step_start", ctx)
    def micro_steps(self, ctx): return self.micro
    def on_micro_step(self, ctx, index): self._rec("micro", ctx, index)
    def after_backward(self, ctx): self._rec("after_backward", ctx)
    def after_step(self, ctx): self._rec("after_step", ctx)
    def on_eval(self, ctx, metrics): self._rec("eval", ctx)
    def on_epoch_end(self, ctx): self._rec("epoch_end", ctx)
    def on_train_end(self, ctx): self._rec("train_end", ctx)


class Logged(nn.Module):
    """Wraps a model and records each forward into the event list."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x):
        if self.training:
            self.log.append(("forward",))
        return self.inner(x)


def test_event_order(tmp_path):
    log = []
    Trainer(Logged(mlp(), log), spec(), [Recorder(log, micro=2)], out_dir=tmp_path).fit()

    def step(s, e):
        return [("step_start", s, e), ("micro", s, e, 0), ("forward",), ("micro", s, e, 1), ("forward",),
                ("after_backward", s, e), ("after_step", s + 1, e)]

    assert log == [("train_start", 0, 0), *step(0, 0), *step(1, 0), ("eval", 2, 0), ("epoch_end", 2, 0),
                   *step(2, 1), *step(3, 1), ("eval", 4, 1), ("epoch_end", 4, 1), ("train_end", 4, 1)]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(12, 3), 1.0

    def forward(self, x):
        return self.lin(x) * self.scale


class ScalePerMicroStep(Callback):
    """Micro-step i runs the model with its output scaled by i+1 (a different
    sub-model per micro-step); records the accumulated gradient."""

    name = "scale"

    def __init__(self, n):
        self.n, self.grads, self.batches = n, [], []

    def micro_steps(self, ctx): return self.n
    def on_micro_step(self, ctx, index): ctx.model.scale = index + 1.0

    def after_backward(self, ctx):
        self.grads.append(ctx.model.lin.weight.grad.clone())
        self.batches.append((ctx.batch, {k: v.clone() for k, v in ctx.model.state_dict().items()}))


def test_micro_steps_accumulate_mean_of_losses(tmp_path):
    cb = ScalePerMicroStep(3)
    Trainer(Scaled(), spec(epochs=1), [cb], out_dir=tmp_path).fit()
    for grad, ((x, y), state) in zip(cb.grads, cb.batches):
        ref = Scaled()
        ref.load_state_dict(state)
        for i in range(3):
            ref.scale = i + 1.0
            (nn.functional.cross_entropy(ref(x), y) / 3).backward()
        torch.testing.assert_close(grad, ref.lin.weight.grad)


class Overrides(Callback):
    def __init__(self, name, overrides):
        self.name, self.overrides = name, overrides

    def param_group_overrides(self, model):
        return self.overrides


class LrTrace(Callback):
    name = "lrs"

    def __init__(self):
        self.lrs = []

    def on_step_start(self, ctx):
        self.lrs.append([g["lr"] for g in ctx.optimizer.param_groups])


def test_param_groups_and_schedule(tmp_path):
    trace = LrTrace()
    s = spec(epochs=3, schedule={"name": "cosine", "warmup_steps": 2})
    trainer = Trainer(mlp(), s, [Overrides("a", {"0.bias": {"weight_decay": 0.0}}),
                                 Overrides("b", {"2.weight": {"lr": 0.5}, "0.bias": {"weight_decay": 0.0}}), trace],
                      out_dir=tmp_path)
    trainer.fit()
    groups = {tuple(id(p) for p in g["params"]): g for g in trainer.optimizer.param_groups}
    by_name = {n: next(g for ids, g in groups.items() if id(p) in ids) for n, p in trainer.model.named_parameters()}
    assert by_name["0.bias"]["weight_decay"] == 0.0 and by_name["0.weight"]["weight_decay"] == 5e-4
    assert by_name["2.weight"]["initial_lr"] == 0.5 and by_name["2.bias"]["initial_lr"] == 0.1
    factor = lr_factor(s.schedule, 6, 2)
    order = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    for t, lrs in enumerate(trace.lrs):
        assert lrs == pytest.approx([base * factor(t) for base in order])


def test_conflicting_or_unknown_overrides_are_errors(tmp_path):
    with pytest.raises(ValueError, match="callbacks 'a' and 'b' set weight_decay of '0.bias'"):
        Trainer(mlp(), spec(), [Overrides("a", {"0.bias": {"weight_decay": 0.0}}),
                                Overrides("b", {"0.bias": {"weight_decay": 0.1}})], out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="'nope', not a parameter"):
        Trainer(mlp(), spec(), [Overrides("a", {"nope": {"lr": 1.0}})], out_dir=tmp_path).fit()


@pytest.mark.parametrize("schedule, total, spe, expected", [
    ({"name": "cosine", "warmup_steps": 2}, 10, 5, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.5, 10: 0.0}),
    ({"name": "cosine", "min_factor": 0.2}, 4, 2, {0: 1.0, 2: 0.6, 4: 0.2}),
    ({"name": "multistep", "milestones": [1, 2.5], "gamma": 0.5}, 20, 4, {0: 1, 3: 1, 4: 0.5, 9: 0.5, 10: 0.25}),
    ({"name": "constant", "warmup_epochs": 1}, 10, 3, {0: 0.25, 2: 0.75, 3: 1.0, 9: 1.0}),
])
def test_lr_factor_values(schedule, total, spe, expected):
    factor = lr_factor(ScheduleSpec(**schedule), total, spe)
    for t, value in expected.items():
        assert factor(t) == pytest.approx(value, abs=1e-12)


class ClipProbe(Callback):
    name = "clip"

    def __init__(self):
        self.pairs = []

    def after_backward(self, ctx):
        self.before = [(p.detach().clone(), p.grad.clone()) for p in ctx.model.parameters()]

    def after_step(self, ctx):
        self.pairs.append([(after.detach() - before, grad)
                           for (before, grad), after in zip(self.before, ctx.model.parameters())])


def test_grad_clipping_bounds_the_update(tmp_path):
    probe = ClipProbe()
    s = spec(epochs=1, grad_clip=1e-3, schedule={"name": "constant"},
             optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0})
    Trainer(mlp(), s, [probe], out_dir=tmp_path).fit()
    for pairs in probe.pairs:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in pairs]))
        assert norm > 1e-3
        for delta, grad in pairs:
            torch.testing.assert_close(delta, -grad * (1e-3 / norm), rtol=1e-4, atol=1e-7)


class Grow(Callback):
    """At step 2, replace Linear(12,6)-Tanh-Linear(6,3) by one with an extra hidden
    layer; the old head's optimizer state moves to the new head by param_map."""

    name = "grow"

    def __init__(self, param_map):
        self.param_map, self.seen = param_map, {}

    def after_step(self, ctx):
        if ctx.step != 2:
            return
        old = dict(ctx.model.named_parameters())
        self.seen["old_state"] = {n: ctx.optimizer.state[p]["momentum_buffer"].clone() for n, p in old.items()}
        new = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
        new[0].load_state_dict(ctx.model[0].state_dict())
        ctx.replace_model(new, self.param_map)
        self.seen["new_state"] = {n: ctx.optimizer.state[p]["momentum_buffer"].clone() if p in ctx.optimizer.state
                                  else None for n, p in ctx.model.named_parameters()}
        self.seen["lr"] = ctx.optimizer.param_groups[0]["lr"]
        self.seen["model"] = new


def test_replace_model_keeps_state_of_surviving_parameters(tmp_path):
    grow = Grow({"4.weight": "2.weight", "4.bias": "2.bias"})
    s = spec(epochs=2)
    trainer = Trainer(mlp(), s, [grow], out_dir=tmp_path)
    trainer.fit()
    old, new = grow.seen["old_state"], grow.seen["new_state"]
    for name in ("0.weight", "0.bias"):  # same name and shape: kept
        assert torch.equal(new[name], old[name])
    assert torch.equal(new["4.weight"], old["2.weight"]) and torch.equal(new["4.bias"], old["2.bias"])  # mapped
    assert new["2.weight"] is None and new["2.bias"] is None  # new shape (6, 6): fresh
    assert grow.seen["lr"] == pytest.approx(0.1 * lr_factor(s.schedule, 4, 2)(2))
    assert trainer.model is grow.seen["model"]
    assert all(trainer.optimizer.state[p]["momentum_buffer"] is not None for p in trainer.model.parameters())


def test_replace_model_rejects_a_mapping_between_shapes(tmp_path):
    with pytest.raises(ValueError, match="needs equal shapes"):
        Trainer(mlp(), spec(), [Grow({"2.weight": "2.weight"})], out_dir=tmp_path).fit()


class Poison(Callback):
    name = "poison"

    def __init__(self, at, deferred):
        self.at, self.deferred = at, deferred

    def on_train_start(self, ctx):
        if self.deferred:  # check only at sync points, as on a GPU
            ctx._check_every_step = False

    def on_step_start(self, ctx):
        if ctx.step == self.at:
            with torch.no_grad():
                ctx.model[0].weight.fill_(float("nan"))


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_loss_stops_naming_the_step(tmp_path, deferred):
    s = spec(epochs=4, checkpoint_every_steps=2)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 6 \(epoch 2\).*checkpoint.pt \(step 4\)"):
        Trainer(mlp(), s, [Poison(5, deferred)], out_dir=tmp_path).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "report.json").exists()


class Counter(Callback):
    name = "counter"

    def __init__(self):
        self.count, self.loaded = 0, None

    def after_step(self, ctx): self.count += 1
    def state_dict(self): return {"count": self.count, "tensor": torch.full((2,), float(self.count))}
    def report(self): return {"count": self.count}

    def load_state_dict(self, state, ctx=None):
        saved = load_checkpoint(ctx.out_dir / "checkpoint.pt")["model"]
        self.loaded = (state, all(torch.equal(v, saved[k]) for k, v in ctx.model.state_dict().items()))
        self.count = state["count"]


def test_output_folder_report_and_callback_state_round_trip(tmp_path):
    dump = {"name": "t", "train": spec().model_dump(mode="json")}
    first = Trainer(mlp(), spec(), [Counter()], out_dir=tmp_path, spec_dump=dump)
    report = first.fit()
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["parameters"] == 12 * 6 + 6 + 6 * 3 + 3
    assert report["flops"] == 2 * (12 * 6 + 6 * 3)  # two matmuls of one example
    assert report["steps"] == 4 and 0 <= report["accuracy"] <= 1 and report["counter"] == {"count": 4}
    assert yaml.safe_load((tmp_path / "spec.yaml").read_text()) == dump
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(2, "test"), (4, "train"), (4, "test")]
    assert set(records[1]) >= {"step", "epoch", "split", "loss", "accuracy", "lr"}

    resumed = Counter()
    again = Trainer(mlp(), spec(), [resumed], resume=tmp_path, spec_dump=dump)
    report2 = again.fit()
    state, model_already_loaded = resumed.loaded
    assert state["count"] == 4 and torch.equal(state["tensor"], torch.full((2,), 4.0))
    assert not model_already_loaded  # callbacks load before the model state
    assert again.out_dir == tmp_path and report2["accuracy"] == report["accuracy"]
    assert report2["counter"] == {"count": 4}


def test_resume_with_a_different_spec_is_refused(tmp_path):
    dump = lambda s, passes: {"passes": passes, "train": s.model_dump(mode="json")}  # noqa: E731
    Trainer(mlp(), spec(), out_dir=tmp_path, spec_dump=dump(spec(), [])).fit()
    with pytest.raises(FxgrowError, match="differs from the checkpoint's in train.batch_size$"):
        Trainer(mlp(), spec(batch_size=2), resume=tmp_path / "checkpoint.pt", spec_dump=dump(spec(), [])).fit()
    with pytest.raises(FxgrowError, match="differs from the checkpoint's in passes$"):
        Trainer(mlp(), spec(), resume=tmp_path, spec_dump=dump(spec(), [{"kind": "compander"}])).fit()
    # what does not change the computation may change
    Trainer(mlp(), spec(progress="plain", log_every_steps=7), resume=tmp_path, spec_dump=dump(spec(), [])).fit()


def test_default_out_dir_and_log_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Logs(Callback):
        name = "logs"

        def after_step(self, ctx):
            ctx.log({"event": "custom", "value": ctx.step * 2})

    trainer = Trainer(mlp(), spec(epochs=1), [Logs()], spec_dump={"name": "exp"})
    trainer.fit()
    assert trainer.out_dir.parent.name == "runs" and trainer.out_dir.name.startswith("exp-")
    custom = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()
              if "event" in line]
    assert custom == [{"step": 1, "epoch": 0, "event": "custom", "value": 2},
                      {"step": 2, "epoch": 0, "event": "custom", "value": 4}]


def test_duplicate_or_reserved_callback_names():
    with pytest.raises(FxgrowError, match="used twice"):
        Trainer(mlp(), spec(), [Counter(), Counter()])
    with pytest.raises(FxgrowError, match="reserved"):
        Trainer(mlp(), spec(), [Overrides("accuracy", {})])


@pytest.mark.parametrize("options", [
    dict(optimizer={"name": "adamw", "lr": 3e-3}, schedule={"name": "multistep", "milestones": [10]}),
    dict(precision="bf16", label_smoothing=0.1, eval_every_steps=5, eval_every_epochs=None),
    dict(optimizer={"name": "sgd", "lr": 0.05, "nesterov": True}, steps=13, schedule={"warmup_epochs": 0.5}),
])
def test_options_train_to_better_than_chance(tmp_path, options):
    data = {**SYNTH, "train_size": 96, "test_size": 96, "noise": 0.5}
    s = TrainSpec(**{**dict(data=data, batch_size=8, progress="none"), **options})
    report = Trainer(mlp(16), s, out_dir=tmp_path).fit()
    assert report["accuracy"] > 0.8 and math.isfinite(report["loss"])
    assert report["steps"] == (s.steps or s.epochs * 12)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FxgrowError, match="no checkpoint at"):
        Trainer(mlp(), spec(), resume=tmp_path)


@pytest.mark.parametrize("mode", ["plain", "none", "bar"])
def test_progress_modes(tmp_path, capsys, mode):
    Trainer(mlp(), spec(progress=mode, log_every_steps=2), out_dir=tmp_path).fit()
    out = capsys.readouterr().out
    if mode == "plain":
        assert out.splitlines()[:2] == [line for line in out.splitlines() if line.startswith(("step 2/4", "eval  step 2"))]
        assert "step 4/4  epoch 1  loss" in out and "eval  step 4  epoch 1" in out
    elif mode == "none":
        assert out == ""
    else:  # rich writes to the captured (non-terminal) stdout: the eval lines still show
        assert "eval  step 4" in out


def test_evaluate_another_model(tmp_path):
    class Evaluates(Callback):
        name = "ev"

        def on_train_end(self, ctx):
            always_zero = nn.Linear(12, 3)
            nn.init.zeros_(always_zero.weight)
            with torch.no_grad():
                always_zero.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
            self.result = ctx.evaluate(always_zero)

    cb = Evaluates()
    trainer = Trainer(mlp(), spec(), [cb], out_dir=tmp_path)
    trainer.fit()
    targets = trainer.data.test[1]
    assert cb.result["accuracy"] == pytest.approx((targets == 0).float().mean().item())
    expected_loss = nn.functional.cross_entropy(torch.tensor([5.0, 0, 0]).expand(len(targets), 3), targets)
    assert cb.result["loss"] == pytest.approx(expected_loss.item(), rel=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    reports = []
    for compile in (False, True):
        torch.manual_seed(0)
        reports.append(Trainer(mlp(), spec(compile=compile), out_dir=tmp_path / str(compile)).fit())
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-4)


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset: the loop streams it."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 12, generator=g) * 0.5 + nn.functional.one_hot(self.y, 12).float() * 2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def streamed_splits():
    return {"train": ListDataset(48, 0), "test": ListDataset(24, 1), "num_classes": 3}


def test_streamed_python_dataset_trains(tmp_path):
    s = spec(data={"name": "python", "entry": "tests.test_train_loop:streamed_splits", "workers": 0},
             epochs=6, batch_size=8)
    trainer = Trainer(mlp(), s, out_dir=tmp_path)
    report = trainer.fit()
    assert isinstance(trainer.data.train, torch.utils.data.Dataset) and trainer.data.num_classes == 3
    assert report["steps"] == 36 and report["accuracy"] > 0.9


def test_conv_net_with_channels_last_and_augmentation(tmp_path):
    data = {"name": "synthetic", "shape": [3, 8, 8], "num_classes": 3, "train_size": 64, "test_size": 32,
            "noise": 0.5, "augment": "crop_flip", "crop_padding": 1}
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 3))

    class Layout(Callback):
        name = "layout"

        def on_step_start(self, ctx):
            self.inputs_channels_last = ctx.batch[0].is_contiguous(memory_format=torch.channels_last)

    layout = Layout()
    report = Trainer(model, TrainSpec(data=data, epochs=4, batch_size=8, channels_last=True, progress="none"),
                     [layout], out_dir=tmp_path).fit()
    assert layout.inputs_channels_last and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert report["accuracy"] > 0.6
