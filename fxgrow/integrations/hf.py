"""fxgrow's passes in the Hugging Face `Trainer` (`pip install 'fxgrow[hf]'`).

    session = fxgrow.Session(spec, model)
    trainer = FxgrowTrainer(session=session, args=TrainingArguments(..., remove_unused_columns=False),
                            train_dataset=dataset, compute_loss_func=loss)
    trainer.train()                              # or train(resume_from_checkpoint=...)
    report = trainer.fxgrow_callback.report

`FxgrowTrainer` is a `Trainer` whose model is `session.module`, whose optimizer is built
from the passes' parameter groups (`session.param_groups()`, with the class and options
`TrainingArguments` name) when the Trainer asks for it (after a checkpoint's weights, and
so a regrown model, loaded), and whose training_step runs every micro-step of the step on
its batch (sorted slicing's sub-models). It adds `FxgrowTrainerCallback`, which maps the
Trainer's events onto the session:

    on_train_begin          bind(the unwrapped optimizer, the scheduler); total_steps =
                            state.max_steps; start()
    on_step_begin           step_start(): the model's next training forward begins the
                            step with its first input (no TrainerCallback event shows the batch)
    on_pre_optimizer_step   after_backward() (HF has clipped; the compander's work runs in
                            the optimizer's step hooks, as in fxgrow's own loop)
    on_step_end             after_step();  on_evaluate: on_eval(metrics);  on_train_end:
                            train_end() -> callback.report

The callback alone, in a stock `Trainer` (optimizers=(built from session.param_groups(),
scheduler)), runs specs with one forward a step (prune_regrow, the compander, template
mixing, growth); several sub-models a step need `FxgrowTrainer`. Refused: gradient
accumulation (HF feeds other batches to each forward), `remove_unused_columns=True` (it
would drop every column session.module takes), DataParallel over several GPUs, growth
across processes, `load_best_model_at_end` (it would rewind fxgrow's state after the run).

Checkpoints: HF's own (`save_steps`, `train(resume_from_checkpoint=)`). fxgrow's state is in
the model's state_dict (`model.safetensors`; session.module's extra state), which HF
loads before anything else, so a grown run regrows first. HF loads it non-strictly: the
callback checks at on_train_begin that fxgrow's step is the Trainer's.

To evaluate during training give `TrainingArguments(label_names=["labels"])` (HF finds no
label argument in session.module's signature, and would then skip your compute_loss).
HF's defaults differ from fxgrow's loop: `max_grad_norm=1.0` (fxgrow clips only with
`train.grad_clip`), a linear schedule, the last partial batch kept, its own sampler order.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FxgrowError
from ..session import Session, changes_structure

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fxgrow.integrations.hf needs transformers and accelerate: pip install 'fxgrow[hf]'") from e

ONE_PASS = ("a TrainerCallback cannot run more forwards in a step: train with "
            "fxgrow.integrations.hf.FxgrowTrainer(session=...)")


class FxgrowTrainerCallback(TrainerCallback):
    """Drives `session` from a Hugging Face Trainer. `FxgrowTrainer` adds one itself (with
    `runs_micro_steps=True`: its training_step runs them); in a stock Trainer add
    `FxgrowTrainerCallback(session)` to `callbacks`."""

    def __init__(self, session: Session, runs_micro_steps: bool = False):
        self.session, self.runs_micro_steps = session, runs_micro_steps
        self.report: dict[str, Any] | None = None

    def _check(self, args: Any, model: Any) -> None:
        s = self.session
        if model is not None and not any(m is s.module for m in model.modules()):
            raise FxgrowError("fxgrow under the HF Trainer: Trainer(model=...) must be session.module (or hold it), "
                              "not the model given to the Session")
        if args.gradient_accumulation_steps != 1:
            raise FxgrowError("fxgrow under the HF Trainer: gradient_accumulation_steps must be 1: fxgrow counts "
                              "optimizer steps, and HF's accumulation feeds other batches to each forward "
                              "(several sub-models of one batch a step: FxgrowTrainer)")
        if args.remove_unused_columns:
            raise FxgrowError("fxgrow under the HF Trainer: set TrainingArguments(remove_unused_columns=False): "
                              "session.module takes any inputs, so HF would drop every column of the dataset")
        if args.n_gpu > 1:
            raise FxgrowError(f"fxgrow under the HF Trainer: {args.n_gpu} GPUs in one process (DataParallel) run "
                              "the passes once per replica: use one GPU per process (torchrun)")
        if args.load_best_model_at_end:
            raise FxgrowError("fxgrow under the HF Trainer: load_best_model_at_end would load an older checkpoint, "
                              "fxgrow's state with it, after the run: leave it off and load that checkpoint's "
                              "model.safetensors into a new Session's module yourself")
        replacing = [cb.name for cb in s.callbacks if changes_structure(cb)]
        if replacing and args.world_size > 1:
            raise FxgrowError(f"fxgrow under the HF Trainer: {replacing[0]} replaces the model mid-run, which the "
                              "DistributedDataParallel wrapper cannot follow: train it in one process or with "
                              "`fxgrow apply` under torchrun")

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check(args, model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        s = self.session
        self._check(args, model)
        s.bind(optimizer, lr_scheduler)
        if s.total_steps is not None and s.total_steps != state.max_steps:
            raise FxgrowError(f"fxgrow under the HF Trainer: Session(total_steps={s.total_steps}) but this Trainer "
                              f"runs {state.max_steps} optimizer steps; give one (TrainingArguments max_steps / "
                              "num_train_epochs)")
        s.total_steps = state.max_steps
        if s.steps_per_epoch is None:
            s.steps_per_epoch = len(train_dataloader) if hasattr(train_dataloader, "__len__") else s.total_steps
        if state.global_step != s.step:
            raise FxgrowError(f"fxgrow under the HF Trainer: the run is at step {state.global_step} and fxgrow's "
                              f"state at step {s.step}: the checkpoint's model.safetensors holds no fxgrow state "
                              "(was the Trainer's model session.module when it was saved?)")
        s.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self.session.step_start(one_pass=None if self.runs_micro_steps else ONE_PASS)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.after_backward()

    def on_step_end(self, args, state, control, **kwargs):
        self.session.after_step()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.session.events.phase == "between" and metrics:
            self.session.on_eval({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def on_train_end(self, args, state, control, **kwargs):
        self.report = self.session.train_end()


class FxgrowTrainer(Trainer):
    """A `Trainer` for `session` (its model is `session.module` unless you give one that
    holds it). Override `compute_loss` or give `compute_loss_func` as for any Trainer: the
    model returns what the traced model returns (e.g. logits)."""

    def __init__(self, *args: Any, session: Session, **kwargs: Any):
        self.session = session
        self.fxgrow_callback = FxgrowTrainerCallback(session, runs_micro_steps=True)
        kwargs["callbacks"] = [self.fxgrow_callback, *(kwargs.get("callbacks") or [])]
        if not args and kwargs.get("model") is None:
            kwargs["model"] = session.module
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer `TrainingArguments` (or `optimizer_cls_and_kwargs`) names, on the
        passes' groups; weight_decay defaults to args.weight_decay for every parameter the
        passes leave alone (fxgrow decays biases and norms too, unlike HF's default)."""
        if self.optimizer is None:
            cls, options = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                            else self.get_optimizer_cls_and_kwargs(self.args, model or self.model))
            if "params" in options or "model" in options:
                raise FxgrowError(f"fxgrow under the HF Trainer: {getattr(cls, '__name__', cls)} builds its own "
                                  "parameter groups; give an optimizer that takes session.param_groups()")
            self.optimizer = cls(self.session.param_groups(), **{"weight_decay": self.args.weight_decay, **options})
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Every micro-step of the step on `inputs`: forward, the scaled loss, backward."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        steps = self.session.steps
        if steps is None:
            raise FxgrowError("FxgrowTrainer: no fxgrow step is open (is its FxgrowTrainerCallback still in "
                              "the Trainer's callbacks?)")
        total = None
        for _ in steps:
            with self.compute_loss_context_manager():  # a copy: compute_loss may pop the labels
                loss = steps.scale(self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch))
            self.accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total
