"""fxgrow's passes in a real Hugging Face Trainer (CPU, no network, a few steps of tiny models).

Same spec, seed, batches (fxgrow's order through the Trainer's sampler) and optimizer as
fxgrow's own Trainer: bit-identical final weights, masks and statistics with the bare
callback in a stock Trainer (prune_regrow, both compander modes, growth) and with
FxgrowTrainer (sorted slicing's sub-models); HF's own checkpoints (`save_steps`,
`train(resume_from_checkpoint=)`) resume exactly, mid-epoch and after growth.
transformers imports in ~5-10 s: this file only."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import fxgrow
from examples.integrations.hf_sorted import Digits  # {"x": image, "labels": class} items
from fxgrow.errors import FxgrowError
from fxgrow.integrations.hf import FxgrowTrainer, FxgrowTrainerCallback
from fxgrow.subnets import data_evaluator
from fxgrow.train.optim import build_scheduler, lr_factor, optimizer_options
from tests.session_cases import EpochSampler, differences, digits, prepared_train, reference, spec_of, steps_per_epoch

hf_logging.set_verbosity_error()


class FxgrowOrder:
    """What the comparison needs of the Trainer: fxgrow's loss (cross-entropy of float
    logits), batch order and learning-rate schedule."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["x"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        return EpochSampler(len(self.train_dataset), self.args.per_device_train_batch_size, self.args.seed)

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            t = self.session.spec.train
            factor = lr_factor(t.schedule, num_training_steps, steps_per_epoch(self.session.spec))
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, factor, 0)
        return self.lr_scheduler


class StockTrainer(FxgrowOrder, Trainer):
    pass


class OrderedFxgrowTrainer(FxgrowOrder, FxgrowTrainer):
    pass


class StopAt(TrainerCallback):
    """A crash right after step k's checkpoint (the run's length stays)."""

    def __init__(self, k):
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.k:
            control.should_training_stop = True


def make(name: str, out: Path, steps: int | None = None, stock: bool = True, stop: int | None = None,
         save: int | None = None, eval_dataset=None, **arguments) -> tuple[fxgrow.Session, Trainer]:
    ref, spec = spec_of(name, steps)
    t = spec.train
    session = fxgrow.Session(spec, ref, evaluate=data_evaluator(digits(), t.batch_size, torch.device("cpu")))
    session.seed_rngs()
    options = dict(output_dir=str(out), max_steps=t.steps, per_device_train_batch_size=t.batch_size,
                   max_grad_norm=0.0,  # HF clips at 1.0 by default; fxgrow only with train.grad_clip
                   dataloader_drop_last=True, report_to=[], use_cpu=True, seed=t.seed, logging_strategy="no",
                   remove_unused_columns=False, disable_tqdm=True, save_strategy="steps" if save else "no",
                   save_steps=save or 500)
    args = TrainingArguments(**{**options, **arguments})
    cls, kw = optimizer_options(t.optimizer)
    extra = [StopAt(stop)] if stop else []
    x, y = prepared_train()
    if stock:  # the bare callback; the optimizer from the passes' groups
        trainer = StockTrainer(model=session.module, args=args, train_dataset=Digits(x, y), eval_dataset=eval_dataset,
                               optimizers=(cls(session.param_groups(), **kw), None),
                               callbacks=[FxgrowTrainerCallback(session), *extra])
    else:
        trainer = OrderedFxgrowTrainer(session=session, args=args, train_dataset=Digits(x, y), eval_dataset=eval_dataset,
                                       optimizer_cls_and_kwargs=(cls, kw), callbacks=extra)
    trainer.session = session
    return session, trainer


def fxgrow_report(trainer: Trainer) -> dict:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FxgrowTrainerCallback)).report


def train(trainer: Trainer, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train(**kwargs)


@pytest.mark.parametrize("name,stock", [("prune_regrow", True), ("compander_sgd", True),
                                        ("compander_adamw_fix", True), ("mixing_grow", True),
                                        ("sorted_slicing", False)])
def test_hf_trainer_equals_fxgrow_apply(tmp_path, name, stock):
    ref_state, ref_report = reference(name)
    session, trainer = make(name, tmp_path, stock=stock)
    train(trainer)
    assert differences(ref_state, session.model.state_dict()) == []
    report = fxgrow_report(trainer)
    if name == "prune_regrow":
        for key in ("events", "moved", "actual_sparsity", "layers", "schedule"):
            assert report["prune_regrow"][key] == ref_report["prune_regrow"][key], key
    if name == "sorted_slicing":
        assert report["sorted_slicing"]["grid"] == ref_report["sorted_slicing"]["grid"]
    if name == "mixing_grow":  # the stock Trainer's optimizer, re-pointed in place
        assert session.generation == 1 and report["grow"]["growth_step"] == 4


@pytest.mark.parametrize("name,at,total,stock", [("prune_regrow", 6, 30, True), ("mixing_grow", 6, 30, False),
                                                 ("sorted_slicing", 5, 8, False)])
def test_hf_checkpoint_resume_equals_uninterrupted(tmp_path, name, at, total, stock):
    """save_steps at step `at` (mid-epoch; after growth for mixing_grow), a crash, then
    `train(resume_from_checkpoint=)` with a fresh session and Trainer: as if never stopped
    (FxgrowTrainer builds the optimizer after the checkpoint regrew the model)."""
    _, trainer = make(name, tmp_path, total, stock=stock, stop=at, save=at)
    train(trainer)
    checkpoint = tmp_path / f"checkpoint-{at}"
    assert (checkpoint / "model.safetensors").is_file()
    if name == "mixing_grow":  # an optimizer built before the checkpoint regrew the model: refused
        _, early = make(name, tmp_path, total, stock=True)
        with pytest.raises(FxgrowError, match="the optimizer does not train .* once the model is final"):
            train(early, resume_from_checkpoint=str(checkpoint))
    session, trainer = make(name, tmp_path, total, stock=stock)
    train(trainer, resume_from_checkpoint=str(checkpoint))
    ref_state, ref_report = reference(name, total)
    assert session.resumed and differences(ref_state, session.model.state_dict()) == []
    report = fxgrow_report(trainer)
    if "prune_regrow" in ref_report:
        for key in ("events", "moved", "actual_sparsity", "layers", "schedule"):
            assert report["prune_regrow"][key] == ref_report["prune_regrow"][key], key
    if "grow" in ref_report:
        assert session.generation == 1 and report["grow"]["growth_step"] == 4


def test_evaluation_mid_run_reaches_the_passes_and_changes_nothing(tmp_path):
    """HF's evaluation every 4 steps: the compander logs its weights at each (on_evaluate ->
    on_eval), the model runs in eval mode there (no step begins), the weights stay fxgrow's."""
    x, y = digits().test
    session, trainer = make("compander_sgd", tmp_path, eval_strategy="steps", eval_steps=4, label_names=["labels"],
                            eval_dataset=Digits(digits().prepare(x), y))
    train(trainer)
    assert differences(reference("compander_sgd")[0], session.model.state_dict()) == []
    assert [r["step"] for r in session.records if "compander" in r] == [0, 4, 8]


def test_what_the_hf_trainer_cannot_do_is_refused(tmp_path):
    with pytest.raises(FxgrowError, match=r"runs 3 forward/backward passes per optimizer step \(sorted_slicing: its "
                                          r"sub-models\), and this driver runs one: a TrainerCallback cannot run more "
                                          r"forwards in a step: train with fxgrow.integrations.hf.FxgrowTrainer"):
        train(make("sorted_slicing", tmp_path, steps=2)[1])
    with pytest.raises(FxgrowError, match="gradient_accumulation_steps must be 1"):
        make("compander_sgd", tmp_path, steps=2, gradient_accumulation_steps=2)
    with pytest.raises(FxgrowError, match=r"remove_unused_columns=False"):
        make("compander_sgd", tmp_path, steps=2, remove_unused_columns=True)
    # HF's default optimizer decays the compander's v, which the pass decays through psi(v)
    ref, spec = spec_of("compander_sgd", 2)
    session = fxgrow.Session(spec, ref)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                             remove_unused_columns=False, weight_decay=0.01, disable_tqdm=True)
    x, y = prepared_train()
    trainer = StockTrainer(model=session.module, args=args, train_dataset=Digits(x, y),
                           callbacks=[FxgrowTrainerCallback(session)])
    trainer.session = session
    with pytest.raises(FxgrowError, match=r"needs weight_decay=0.0 \(the spec's passes set it\), but its optimizer "
                                          r"group has weight_decay=0.01"):
        train(trainer)


def test_the_hf_example_trains_sub_models_extracts_and_resumes(tmp_path):
    from examples.integrations.hf_sorted import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = main(["--epochs", "1", "--save-steps", "11", "--out", str(tmp_path)])
        resumed = main(["--epochs", "1", "--out", str(tmp_path), "--resume", str(tmp_path / "checkpoint-11")])
    grid = first["report"]["sorted_slicing"]["grid"]
    assert [row["width"] for row in grid] == [0.125, 0.25, 0.5, 1.0]
    assert grid[-1]["accuracy"] > 0.5  # 22 steps on digits: learning happened
    assert resumed["session"].resumed and resumed["report"]["sorted_slicing"]["grid"] == grid
    assert differences(first["session"].model.state_dict(), resumed["session"].model.state_dict()) == []
    assert sum(p.numel() for p in first["subnet"].parameters()) == grid[0]["params"]
