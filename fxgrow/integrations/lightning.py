"""fxgrow's passes in a Lightning `Trainer` (`pip install 'fxgrow[lightning]'`).

    session = fxgrow.Session(spec, model)
    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = session.module                # growth replaces what is inside it
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)
        def configure_optimizers(self):           # the passes' groups (no decay on v, ...)
            return torch.optim.SGD(session.param_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    L.Trainer(max_steps=T, callbacks=[FxgrowCallback(session)]).fit(Net(), loader)

How Lightning's hooks map onto the session's calls:

    on_train_start            bind(trainer's optimizer and scheduler); total_steps from the
                              Trainer (estimated_stepping_batches); start()
    on_train_batch_start      step_start(): the module's next training forward begins the
                              step, with its first input
    on_before_optimizer_step  (automatic optimization) after_backward(), clip (grad_clip),
                              before_optimizer_step()
    on_train_batch_end        after_step(), once the optimizer stepped
    on_validation_end         on_eval(metrics);  on_train_end: train_end() -> self.report

Automatic optimization runs one forward a step. A spec with several sub-models a step
(sorted_slicing) needs `FxgrowMicroSteps` (manual optimization: its training_step runs them
on the step's batch). Lightning's own gradient accumulation feeds *other* batches to each
forward, so it is refused (`accumulate_grad_batches` must be 1).

Under automatic optimization Lightning calls `optimizer.step(closure)`, and torch runs step
pre-hooks before the closure's backward: the compander's pre-step work therefore runs in
`before_optimizer_step` from on_before_optimizer_step. Lightning clips after that hook, so
with such work the Trainer's `gradient_clip_val` is refused: give `FxgrowCallback(grad_clip=)`,
which clips there, before it, as fxgrow's own loop does (`clip_grad_norm_` of the model's
parameters). 16-bit precision's loss scaler may skip a step after that work ran: refused
with it too.

Checkpoints: Lightning's own (`ModelCheckpoint`, `fit(ckpt_path=...)`). fxgrow's state rides in
the module's state_dict (session.module's extra state), which Lightning loads before
`configure_optimizers`: a grown run regrows first, and the optimizer is built for the grown
model. A checkpoint in the middle of an epoch resumes exactly only with a stateful loader
(Lightning restarts a plain DataLoader's epoch from its first batch).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import FxgrowError
from ..session import Session, changes_structure
from ..train.callbacks import Callback

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fxgrow.integrations.lightning needs Lightning: pip install 'fxgrow[lightning]'") from e

ONE_PASS = ("Lightning's automatic optimization runs one forward a step: mix FxgrowMicroSteps into your "
            "LightningModule (manual optimization; define fxgrow_loss(batch))")


def _pre_step_work(session: Session) -> list[str]:
    return [cb.name for cb in session.callbacks if type(cb).before_optimizer_step is not Callback.before_optimizer_step]


class FxgrowCallback(pl.Callback):
    """Drives `session` from a Lightning Trainer. `grad_clip`: clip the gradients' global
    norm where fxgrow's loop does (needed instead of `gradient_clip_val` when a pass works
    before the optimizer step, e.g. the compander)."""

    def __init__(self, session: Session, grad_clip: float | None = None):
        self.session, self.grad_clip = session, grad_clip
        self.report: dict[str, Any] | None = None
        self.automatic = True
        self._global_step: int | None = None

    @property
    def state_key(self) -> str:
        return "fxgrow"

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        s = self.session
        if not any(m is s.module for m in pl_module.modules()):
            raise FxgrowError("fxgrow under Lightning: the LightningModule must hold session.module (e.g. "
                              "self.net = session.module), not the model given to the Session")
        self.automatic = pl_module.automatic_optimization
        if trainer.accumulate_grad_batches != 1:
            raise FxgrowError("fxgrow under Lightning: accumulate_grad_batches must be 1: fxgrow counts optimizer steps, "
                              "and Lightning's accumulation feeds other batches to each forward (several sub-models "
                              "of one batch a step: FxgrowMicroSteps)")
        if self.grad_clip is not None and self.automatic and trainer.gradient_clip_val:
            raise FxgrowError("fxgrow under Lightning: both FxgrowCallback(grad_clip=) and the Trainer's "
                              "gradient_clip_val clip: give one")
        work = _pre_step_work(s)
        if self.automatic and work and trainer.gradient_clip_val:
            raise FxgrowError(f"fxgrow under Lightning: {work[0]} works on the gradients just before the optimizer "
                              "step, and Lightning clips after that point: instead of Trainer(gradient_clip_val="
                              f"{trainer.gradient_clip_val}) give FxgrowCallback(session, grad_clip="
                              f"{trainer.gradient_clip_val}), which clips before it as fxgrow's loop does")
        if self.automatic and work and str(trainer.precision).startswith("16"):
            raise FxgrowError(f"fxgrow under Lightning: {work[0]} works before the optimizer step, which 16-bit "
                              f"precision's loss scaler may then skip: use bf16 or 32-bit precision "
                              f"(got {trainer.precision})")
        replacing = [cb.name for cb in s.callbacks if changes_structure(cb)]
        if replacing and trainer.world_size > 1:
            raise FxgrowError(f"fxgrow under Lightning: {replacing[0]} replaces the model mid-run, and Lightning's "
                              "DistributedDataParallel wrapper cannot follow: train it in one process or with "
                              "`fxgrow apply` under torchrun")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        s = self.session
        if len(trainer.optimizers) != 1:
            raise FxgrowError(f"fxgrow under Lightning: configure_optimizers returned {len(trainer.optimizers)} "
                              "optimizers; the passes need the one that trains session.module")
        configs = trainer.lr_scheduler_configs
        s.bind(trainer.optimizers[0], configs[0].scheduler if configs else None)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise FxgrowError("fxgrow under Lightning: the run's length is unknown (an iterable loader with no "
                              "length and no max_steps): set Trainer(max_steps=...)")
        if s.total_steps is not None and s.total_steps != int(total):
            raise FxgrowError(f"fxgrow under Lightning: Session(total_steps={s.total_steps}) but this Trainer runs "
                              f"{int(total)} optimizer steps; give one (the Trainer's max_steps / max_epochs)")
        s.total_steps = int(total)
        if s.steps_per_epoch is None:
            batches = trainer.num_training_batches
            s.steps_per_epoch = int(batches) if math.isfinite(batches) else s.total_steps
        if trainer.global_step != s.step:
            raise FxgrowError(f"fxgrow under Lightning: the run is at step {trainer.global_step} and fxgrow's state "
                              f"at step {s.step}: the checkpoint holds no fxgrow state (was session.module inside "
                              "the LightningModule when it was saved?)")
        s.start()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._global_step = trainer.global_step
        self.session.step_start(one_pass=ONE_PASS if self.automatic else None)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic:  # FxgrowMicroSteps (or your training_step) made these calls
            return
        s = self.session
        s.after_backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.grad_clip)
        s.before_optimizer_step()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._global_step + 1:
            raise FxgrowError(f"fxgrow under Lightning: batch {batch_idx} took {trainer.global_step - self._global_step} "
                              "optimizer steps; fxgrow's passes count one a batch")
        self.session.after_step()

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking and self.session.events.phase == "between":
            self.session.on_eval({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.report = self.session.train_end()


def fxgrow_callback(trainer: "pl.Trainer") -> FxgrowCallback:
    found = [cb for cb in trainer.callbacks if isinstance(cb, FxgrowCallback)]
    if len(found) != 1:
        raise FxgrowError(f"fxgrow under Lightning: the Trainer has {len(found)} FxgrowCallback(s); give it "
                          "Trainer(callbacks=[FxgrowCallback(session)])")
    return found[0]


class FxgrowMicroSteps:
    """Mix into a LightningModule (before `L.LightningModule`) for specs with several
    sub-models per optimizer step (sorted_slicing): manual optimization whose training_step
    runs every micro-step on the batch, in fxgrow's order (each loss scaled, backward;
    after_backward; clip by the callback's grad_clip; optimizer and scheduler step).
    Define `fxgrow_loss(batch)`: the loss of one forward of session.module on `batch`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not callable(getattr(self, "fxgrow_loss", None)):
            raise FxgrowError(f"{type(self).__name__}: FxgrowMicroSteps needs fxgrow_loss(batch), the loss of one "
                              "forward of session.module on batch")
        callback = fxgrow_callback(self.trainer)
        session = callback.session
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        steps = session.steps
        total = None
        for _ in steps:
            loss = steps.scale(self.fxgrow_loss(batch))
            self.manual_backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        session.after_backward()
        if callback.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(session.model.parameters(), callback.grad_clip)
        optimizer.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
        return total
