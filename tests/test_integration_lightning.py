"""fxgrow's passes in a real Lightning Trainer (CPU, a few steps of tiny models on digits).

Same spec, seed, batches (fxgrow's order through a sampler) and optimizer as fxgrow's own
Trainer: the final weights, masks and statistics are bit-identical, for prune_regrow,
both compander modes (the pre-step work moved out of the optimizer's pre-hook, which
Lightning's closure would run before the backward), sorted slicing's sub-models
(FxgrowMicroSteps), growth in place; Lightning's own checkpoint and `fit(ckpt_path=)`
resume exactly, growth included. Lightning imports in ~10 s: this file only."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import fxgrow
from fxgrow.errors import FxgrowError
from fxgrow.integrations.lightning import FxgrowCallback, FxgrowMicroSteps
from fxgrow.subnets import data_evaluator
from fxgrow.train.optim import build_scheduler, lr_factor, optimizer_options
from tests.session_cases import EpochSampler, differences, digits, prepared_train, reference, spec_of, steps_per_epoch

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|GPU available|TPU available|"
                                        "`training_step` returned|checkpoint directory|Checkpoint directory|"
                                        "Found .* module\\(s\\) in eval mode).*",
                                        "ignore:.*isinstance\\(treespec, LeafSpec\\).*")


class Lit(L.LightningModule):
    """A user's LightningModule: holds session.module, builds the optimizer from the
    passes' groups (fxgrow's optimizer and schedule, for the comparison)."""

    def __init__(self, session: fxgrow.Session, optimizer_params=None):
        super().__init__()
        self.net = session.module
        self.session = session
        self.optimizer_params = optimizer_params

    def fxgrow_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def training_step(self, batch, batch_idx):
        return self.fxgrow_loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.fxgrow_loss(batch))

    def configure_optimizers(self):
        t = self.session.spec.train
        cls, options = optimizer_options(t.optimizer)
        optimizer = cls(self.optimizer_params or self.session.param_groups(), **options)
        factor = lr_factor(t.schedule, t.steps, steps_per_epoch(self.session.spec))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": build_scheduler(optimizer, factor, 0),
                                                         "interval": "step"}}


class LitMicroSteps(FxgrowMicroSteps, Lit):
    pass


class StopAt(L.Callback):
    """A crash right after step k's checkpoint; the run's length stays (never shorten max_steps:
    the passes' schedules are fractions of it)."""

    def __init__(self, k):
        self.k = k

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.k:
            trainer.should_stop = True


class ResumableLoader(torch.utils.data.DataLoader):
    """A stateful loader (Lightning saves a loader's state_dict in its checkpoints): after a
    resume in the middle of an epoch it skips the batches the run already took, as fxgrow's
    own loop does (Lightning restarts a plain DataLoader's epoch from its first batch)."""

    def __init__(self, *args, session: fxgrow.Session, **kwargs):
        super().__init__(*args, **kwargs)
        self.session, self._skip = session, 0

    def state_dict(self):
        return {"step": self.session.step}

    def load_state_dict(self, state):
        self._skip = state["step"] % len(self.batch_sampler)

    def __iter__(self):
        batches = super().__iter__()
        for _ in range(self._skip):
            next(batches._sampler_iter)  # skip indices without loading them
        self._skip = 0
        return batches


def loader(spec: fxgrow.Spec, session: fxgrow.Session | None = None) -> torch.utils.data.DataLoader:
    x, y = prepared_train()
    kind, extra = (ResumableLoader, {"session": session}) if session is not None else (torch.utils.data.DataLoader, {})
    return kind(torch.utils.data.TensorDataset(x, y), batch_size=spec.train.batch_size, drop_last=True,
                sampler=EpochSampler(len(y), spec.train.batch_size, spec.train.seed), **extra)


def run(name: str, steps: int | None = None, micro_steps: bool = False, callbacks=(), ckpt_path=None,
        optimizer_params=None, stateful=False, validate=False, **trainer_options) -> tuple[fxgrow.Session, FxgrowCallback]:
    ref, spec = spec_of(name, steps)
    session = fxgrow.Session(spec, ref, evaluate=data_evaluator(digits(), spec.train.batch_size, torch.device("cpu")))
    session.seed_rngs()
    module = (LitMicroSteps if micro_steps else Lit)(session, optimizer_params and optimizer_params(session))
    callback = FxgrowCallback(session, grad_clip=trainer_options.pop("grad_clip", None))
    options = dict(accelerator="cpu", devices=1, max_steps=spec.train.steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    trainer = L.Trainer(**{**options, **trainer_options}, callbacks=[callback, *callbacks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        val = None
        if validate:
            x, y = digits().test
            val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits().prepare(x), y), batch_size=128)
        trainer.fit(module, loader(spec, session if stateful else None), val, ckpt_path=ckpt_path)
    return session, callback


@pytest.mark.parametrize("name,micro_steps", [("prune_regrow", False), ("compander_sgd", False),
                                              ("compander_adamw_fix", False), ("sorted_slicing", True),
                                              ("mixing_grow", False)])
def test_lightning_equals_fxgrow_apply(name, micro_steps):
    ref_state, ref_report = reference(name)
    session, callback = run(name, micro_steps=micro_steps)
    assert differences(ref_state, session.model.state_dict()) == []
    report = callback.report
    if name == "prune_regrow":  # the same masks, reached through the same schedule
        for key in ("events", "moved", "actual_sparsity", "layers", "schedule"):
            assert report["prune_regrow"][key] == ref_report["prune_regrow"][key], key
    if name == "sorted_slicing":
        assert report["sorted_slicing"]["grid"] == ref_report["sorted_slicing"]["grid"]
    if name == "mixing_grow":
        assert session.generation == 1 and report["grow"]["growth_step"] == 4


def test_validation_mid_run_reaches_the_passes_and_changes_nothing():
    """Lightning's validation every 4 steps: the compander logs its weights at each (on_eval),
    the module runs in eval mode there (no step begins), and the weights stay fxgrow's."""
    session, _ = run("compander_sgd", validate=True, val_check_interval=4, check_val_every_n_epoch=None)
    assert differences(reference("compander_sgd")[0], session.model.state_dict()) == []
    assert [r["step"] for r in session.records if "compander" in r] == [0, 4, 8]


def test_the_compander_under_a_closure_needs_its_explicit_pre_step(monkeypatch):
    """Regression: in the optimizer's pre-hook, as before, Lightning's closure runs the
    compander's correction on the previous step's gradients: the run drifts."""
    from fxgrow.passes.compander_callback import CompanderCallback

    monkeypatch.setattr(CompanderCallback, "before_optimizer_step", lambda self, ctx: None)
    session, _ = run("compander_adamw_fix")
    assert differences(reference("compander_adamw_fix")[0], session.model.state_dict()) != []


def test_grad_clip_is_clipped_where_fxgrow_clips():
    """With the compander, FxgrowCallback(grad_clip=) equals fxgrow's train.grad_clip."""
    from fxgrow.specs.root import with_overrides

    ref, spec = spec_of("compander_sgd")
    clipped = with_overrides(spec, {"train.grad_clip": 0.05}, "test")
    result = fxgrow.compile_spec(clipped, fxgrow.build_model(clipped, ref))
    import tempfile

    from fxgrow.api import spec_dump
    from fxgrow.train import Trainer
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(result.graph_module, clipped.train, callbacks=result.callbacks, out_dir=out,
                          spec_dump=spec_dump(clipped), data=digits())
        trainer.fit()
    with pytest.raises(FxgrowError, match=r"instead of Trainer\(gradient_clip_val=0.05\) give "
                                          r"FxgrowCallback\(session, grad_clip=0.05\)"):
        run("compander_sgd", gradient_clip_val=0.05)
    session, _ = run("compander_sgd", grad_clip=0.05)
    assert differences(trainer.model.state_dict(), session.model.state_dict()) == []


@pytest.mark.parametrize("name,at,total,stateful", [("prune_regrow", 22, 30, False), ("mixing_grow", 22, 30, False),
                                                   ("prune_regrow", 6, 30, True), ("sorted_slicing", 6, 8, True),
                                                   pytest.param("all_passes", 6, 8, True, marks=pytest.mark.slow)])
def test_lightning_checkpoint_resume_equals_uninterrupted(tmp_path, name, at, total, stateful):
    """ModelCheckpoint at step `at` (22: the end of epoch 0; 6: mid-epoch, with a stateful
    loader), a crash, `fit(ckpt_path=)` with fresh objects: masks, schedule and (regrown)
    weights as if never stopped."""
    assert steps_per_epoch(spec_of(name)[1]) == 22
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1)
    micro_steps = name in ("sorted_slicing", "all_passes")
    run(name, total, micro_steps, callbacks=[checkpoints, StopAt(at)], enable_checkpointing=True, stateful=stateful)
    path = next(Path(tmp_path).glob(f"*step={at}.ckpt"))
    session, callback = run(name, total, micro_steps, ckpt_path=str(path), enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "again")], stateful=stateful)
    ref_state, ref_report = reference(name, total)
    assert session.resumed and differences(ref_state, session.model.state_dict()) == []
    if "prune_regrow" in ref_report:
        for key in ("events", "moved", "actual_sparsity", "layers", "schedule"):
            assert callback.report["prune_regrow"][key] == ref_report["prune_regrow"][key], key
    if "grow" in ref_report:
        assert session.generation == 1 and callback.report["grow"]["growth_step"] == 4


def test_what_lightning_cannot_do_is_refused():
    with pytest.raises(FxgrowError, match=r"runs 3 forward/backward passes per optimizer step \(sorted_slicing: "
                                          r"its sub-models\), and this driver runs one: Lightning's automatic "
                                          r"optimization runs one forward a step: mix FxgrowMicroSteps"):
        run("sorted_slicing", steps=2)
    with pytest.raises(FxgrowError, match="accumulate_grad_batches must be 1"):
        run("compander_sgd", steps=2, accumulate_grad_batches=2)
    with pytest.raises(FxgrowError, match=r"needs weight_decay=0.0 \(the spec's passes set it\)"):
        run("compander_sgd", steps=2, optimizer_params=lambda s: s.module.parameters())


def test_the_lightning_example_trains_prunes_and_resumes(tmp_path):
    from examples.integrations.lightning_granet import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = main(["--epochs", "2", "--out", str(tmp_path)])
        checkpoint = tmp_path / "epoch=0-step=22.ckpt"
        resumed = main(["--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume", str(checkpoint)])
    for run in (first, resumed):
        pruning = run["report"]["prune_regrow"]
        assert pruning["schedule"]["total_steps"] == 44 and pruning["actual_sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert pruning["events"] == first["report"]["prune_regrow"]["events"] >= 3
        assert run["metrics"]["accuracy"] > 0.5  # 44 steps on digits: learning happened
    assert resumed["session"].resumed and resumed["session"].step == 44
    assert (tmp_path / "folded_state_dict.pt").is_file()
