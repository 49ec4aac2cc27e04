"""The training loop every rewritten model goes through.

It knows events (see `callbacks.py`), never passes. One optimizer step is
`events.optimizer_step` (the order `fxgrow.Session` drives other loops in too):

    on_step_start -> zero grads -> [[on_micro_step(i) -> forward -> backward] x n] per batch
    (k batches a step, see `Callback.batches_per_step`) -> after_backward -> clip
    -> optimizer.step -> scheduler.step -> step += 1 -> after_step
    -> log / eval / on_epoch_end / checkpoint when due

The `Trainer` is itself the `TrainContext` callbacks receive.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..analysis.cost import forward_flops
from ..errors import FxgrowError
from ..specs.train import TrainSpec
from . import checkpoint as ckpt
from .callbacks import Callback, ModelChange
from .data import Batches, Data, load_data, step_generator
from .events import Events, MicroSteps, optimizer_step
from .meter import Meter
from .objectives import Classification, Objective, build_objective
from .optim import build_optimizer, build_scheduler, lr_factor, transfer_state
from .preflight import check_model_fits
from .progress import Progress
from .run_folder import RunFolder, metrics_up_to, unused_folder

# torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is first
# imported (DDP imports it, through torch._dynamo). Imported after init_process_group, it keeps the
# default group, and with it gloo's threads, alive past destroy_process_group, to be torn down at
# interpreter exit, where gloo can abort the process ("terminate called without an active
# exception"). Imported with this module, before fit() makes a group, it binds None.
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401

REPORT_KEYS = ("accuracy", "loss", "perplexity", "objective", "parameters", "flops", "flops_error", "wall_time_s",
               "steps", "epochs", "samples_per_s", "device", "world_size", "out_dir", "data", "coverage")
# Fields a resumed run may change: they do not change what is computed.
FREE_ON_RESUME = {"device", "compile", "progress", "log_every_steps", "checkpoint_every_steps"}
_NEVER = 2 ** 62  # "no bad step" when ranks agree on the first one


def device_for(name: str, where: str = "train.device") -> torch.device:
    """The device `name` (auto, cpu, cuda[:N], mps) means on this machine, or an error
    naming `where` when it is not one or not here."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise FxgrowError(f"{where}: expected auto, cpu, cuda, cuda:N or mps (got {name!r})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FxgrowError(f"{where}: {name}, but there is no CUDA device here (no GPU or driver, or a torch "
                              "built without CUDA); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FxgrowError(f"{where}: {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FxgrowError(f"{where}: mps, but there is no MPS device here; use cpu or auto")
    return device


def _changed(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    return [prefix + k for k in sorted(old.keys() | new.keys()) if k not in ignore and old.get(k) != new.get(k)]


class NonFiniteLoss(FxgrowError):
    """The loss became NaN or infinite; the run stopped."""


class NonFiniteState(FxgrowError):
    """A parameter, buffer or optimizer state became NaN or infinite (found when a
    checkpoint was due, or at the end); the run stopped without writing it."""


@torch.no_grad()
def test_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              prepare: Callable[[torch.Tensor], torch.Tensor], autocast: Callable[[], Any],
              device: torch.device, objective: Objective | None = None) -> torch.Tensor:
    """(summed loss, correct, counted) of `model` in eval mode over `batches` (the
    objective's sums; classification by default), kept on the device: one sync when the
    caller reads them, none per batch."""
    objective = objective or Classification()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast():
            output = model(prepare(x))
        sums += objective.eval_sums(output, y)
    model.train(was_training)
    return sums


class Trainer:
    """Train `model` as `spec` says, calling `callbacks` at every event.

    `out_dir` defaults to the resumed run's folder, else `runs/<name>-<timestamp>`
    (name from `spec_dump["name"]`). `resume` is a run folder or a checkpoint file.
    `data` replaces the spec's dataset (Python use). `on_finish(model, out_dir, report)`
    runs on rank 0 after training, before report.json is written (it may add to it).
    `signature` goes into every checkpoint (see `fxgrow.trust`). A new run needs an empty
    `out_dir` unless `overwrite` (see `run_folder.py`).
    """

    def __init__(self, model: nn.Module, spec: TrainSpec, callbacks: Sequence[Callback] = (),
                 out_dir: Path | str | None = None, spec_dump: dict[str, Any] | None = None,
                 resume: Path | str | None = None, data: Data | None = None,
                 on_finish: Callable[[nn.Module, Path, dict[str, Any]], None] | None = None,
                 signature: dict[str, str] | None = None, overwrite: bool = False):
        self.spec = spec
        self.signature, self.overwrite = signature, overwrite
        self.events = Events(callbacks)
        self.callbacks = self.events.callbacks
        reserved = next((cb.name for cb in self.callbacks if cb.name in REPORT_KEYS), None)
        if reserved is not None:
            raise FxgrowError(f"callback name {reserved!r} is reserved; names key checkpoint state and report sections")
        self.spec_dump = spec_dump if spec_dump is not None else {"train": spec.model_dump(mode="json")}
        self.resume_from = ckpt.find_checkpoint(Path(resume)) if resume is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.data = data
        self.objective: Objective | None = None  # from the spec and the data, at setup
        self.on_finish = on_finish
        self.model = model
        # TrainContext members
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.step = self.epoch = self.total_steps = self.steps_per_epoch = 0
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batch_index, self.batches_per_step = 0, 1
        self.loss: torch.Tensor | None = None
        self.seed = spec.seed
        self.resumed = False
        self.rank, self.world = 0, 1
        self.device = torch.device("cpu")
        self._metrics = self._progress = self._ddp = self._folder = None
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._last_checkpoint: int | None = None

    # --- TrainContext ------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self._metrics is not None:
            self._metrics.write(json.dumps({"step": self.step, "epoch": self.epoch, **record}) + "\n")

    def replace_model(self, model: nn.Module, change: ModelChange | dict[str, str] | None = None) -> None:
        change = change if isinstance(change, ModelChange) else ModelChange(param_map=dict(change or {}))
        old, old_params = self.model, dict(self.model.named_parameters())
        old_optimizer = self.optimizer
        self._install(model)
        self.optimizer = self._build_optimizer()
        transfer_state(old_optimizer, old_params, self.optimizer, dict(self.model.named_parameters()),
                       change.param_map)
        self.scheduler = build_scheduler(self.optimizer, self._lr_factor, self.step)
        self.events.model_replaced(self, old, self.model, change)

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = model if model is not None else self.model
        sums = test_sums(model, self._test.sequential(), self._prepare, self._autocast, self.device, self.objective)
        return self.objective.metrics(self._reduce(sums).tolist())

    # --- the run ---------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        own_group = self._setup_distributed()
        try:
            state = ckpt.load_checkpoint(self.resume_from) if self.resume_from else None
            self.resumed = state is not None
            self._setup(state)
            self._wall_before = state["wall_time_s"] if state else 0.0
            self._started = started
            self.events.train_start(self)
            if state is not None:
                self._restore(state)
            self._train()
            return self._finish()
        finally:
            self._close()
            self._leave_distributed(own_group)

    def _setup_distributed(self) -> bool:
        own = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            wants_cuda = self.spec.device.startswith("cuda") or (self.spec.device == "auto" and torch.cuda.is_available())
            dist.init_process_group("nccl" if wants_cuda else "gloo")
            own = True
        if dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        return own

    def _leave_distributed(self, own_group: bool) -> None:
        """Drop the DDP wrapper (it holds the process group), then destroy the group if this
        run made it: the group and its threads end here, while the interpreter is alive,
        not during interpreter exit (see the import of torch.distributed.nn.functional)."""
        if self._ddp is not None:
            self._ddp = None
            self._forward = self.model
        if own_group:
            dist.destroy_process_group()

    def _setup(self, state: dict[str, Any] | None) -> None:
        spec = self.spec
        if state is not None:
            changed = _changed(state["train_spec"], spec.model_dump(mode="json"), FREE_ON_RESUME, "train.")
            changed += _changed(state["spec"], self.spec_dump, {"train"})
            if changed:
                raise FxgrowError(f"resume: the spec differs from the checkpoint's in {', '.join(changed)}")
        self._claim_folder()
        self.device = self._pick_device()
        self._bf16 = spec.precision == "bf16" or (spec.precision == "auto" and self.device.type == "cuda")
        self._channels_last = spec.channels_last if spec.channels_last != "auto" else (
            self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in self.model.modules()))

        data = self.data if self.data is not None else load_data(spec.data)
        self.data = data.to(self.device)
        self.objective = build_objective(spec.objective_name, data.num_classes)
        self._train_batches = Batches(data, "train", spec.batch_size, self.device, self.rank, self.world, spec.seed)
        self._test = Batches(data, "test", spec.eval_batch_size or spec.batch_size, self.device, self.rank, self.world)
        self.batches_per_step = self.events.batches_per_step()
        self.steps_per_epoch = self._train_batches.steps_per_epoch // self.batches_per_step
        if self.steps_per_epoch == 0:
            raise FxgrowError(f"an optimizer step takes {self.batches_per_step} batches, but an epoch has only "
                              f"{self._train_batches.steps_per_epoch}")
        self.total_steps = spec.steps or spec.epochs * self.steps_per_epoch
        self._lr_factor = lr_factor(spec.schedule, self.total_steps, self.steps_per_epoch)
        for cb in self.callbacks:
            self._lr_factor = cb.lr_factor(self, self._lr_factor)

        if state is None:
            ckpt.seed_rngs(spec.seed + self.rank)
        else:  # the structure the checkpoint's model had (growth), before anything sees the model
            self.model = ckpt.replay_structures(self.model, self.callbacks, state, self.resume_from)
        self._install(self.model)
        model_name = (self.spec_dump.get("model") or {}).get("entry") or type(self.model).__name__
        check_model_fits(self.model, self.data.example(), self.data.num_classes, model_name,
                         f"train.data: {spec.data.name}", self.objective)
        # Tensors non-finite from the start (e.g. -inf attention masks) are meant to be.
        named = self._state_tensors()
        flags = ckpt.finite_flags([t for _, t in named]).tolist() if named else []
        self._non_finite_at_start = {name for (name, _), finite in zip(named, flags) if not finite}
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, self._lr_factor, 0)
        self._meter = Meter(self.device)
        self._interval_samples = self._samples = 0
        self._check_every_step = self.device.type == "cpu"  # a sync costs nothing there

        if self.rank == 0:
            ckpt.atomic_write(self.out_dir / "spec.yaml",
                              lambda f: f.write(yaml.safe_dump(self.spec_dump, sort_keys=False).encode()))
            metrics = self.out_dir / "metrics.jsonl"
            if state is not None and metrics.exists():  # drop what the interrupted run logged after its checkpoint
                kept = metrics_up_to(metrics, state["step"])
                ckpt.atomic_write(metrics, lambda f: f.write(kept.encode()))
            self._metrics = open(metrics, "a" if state is not None else "w", buffering=1)
            self._progress = Progress(spec.progress, self.total_steps, state["step"] if state else 0)

    def _claim_folder(self) -> None:
        """Pick the run folder (all ranks use rank 0's) and lock it for this run."""
        if self.out_dir is None:
            self.out_dir = self.resume_from.parent if self.resume_from else unused_folder(Path("runs") / (
                f"{self.spec_dump.get('name', 'run')}-{datetime.now():%Y%m%d-%H%M%S}"))
        if self.world > 1:  # one folder for all ranks: rank 0's
            shared = [str(self.out_dir)]
            dist.broadcast_object_list(shared, src=0)
            self.out_dir = Path(shared[0])
        if self.rank == 0:
            resuming_here = self.resume_from is not None and self.resume_from.parent.resolve() == self.out_dir.resolve()
            self._folder = RunFolder(self.out_dir, resume=resuming_here, overwrite=self.overwrite)

    def _pick_device(self) -> torch.device:
        device = device_for(self.spec.device)
        if device.type == "cuda" and device.index is None:
            device = device_for(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}", f"train.device {self.spec.device}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _install(self, model: nn.Module) -> None:
        """Make `model` the one trained: on the device, in its memory format, wrapped
        for DDP and compiled as the spec says (callbacks always see the bare module)."""
        model.to(self.device)
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        forward = model
        self._ddp = None
        if self.world > 1:
            forward = self._ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.spec.find_unused_parameters)
        if self.spec.compile:
            forward = torch.compile(forward)
        self.model, self._forward = model, forward

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.spec.optimizer, self.events.overrides(self.model))

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.epoch = self.step // self.steps_per_epoch
        for cb in self.callbacks:  # (the structure was replayed in _setup)
            ckpt.restore_callback(cb, state, self, self.resume_from)
        ckpt.load_model_state(self.model, state["model"], self.resume_from, "the model being trained")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{self.resume_from}: its optimizer or scheduler state does not fit this "
                                       f"run's ({type(e).__name__}: {e})") from e
        self._restore_rng(state)
        if self.rank == 0:  # the interval's sums over all ranks, as saved
            self._meter.carry = list(state["interval_sums"])
        self._last_checkpoint = self.step

    # --- training ------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16)

    def _prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.data.prepare(x, generator, (self.rank, self.world))
        if self._channels_last and x.dim() == 4 and x.is_floating_point():  # never on token ids
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _train(self) -> None:
        spe, k = self.steps_per_epoch, self.batches_per_step
        self._interval_start = train_started = time.perf_counter()
        while self.step < self.total_steps:
            self.epoch, start = divmod(self.step, spe)
            batches = self._train_batches.epoch(self.epoch, start * k)
            for _ in range(start, spe):  # the last batches % k of an epoch are left out
                self._train_step([next(batches) for _ in range(k)])
                end_of_epoch = self.step % spe == 0
                last = self.step == self.total_steps
                self._after_step_events(end_of_epoch, last)
                if last:
                    break
        self._train_time = time.perf_counter() - train_started

    def _train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        generator = step_generator(self.device, self.seed, self.step) if self.data.augment != "none" else None
        batches = [(self._prepare(x, generator), y) for x, y in batches]
        self.batch, self.batch_index = batches[0], 0
        optimizer_step(self, self.events, self._forward_backward, self._update, batches)

    def _forward_backward(self, steps: MicroSteps) -> None:
        inputs, targets = self.batch
        # DDP all-reduces gradients in the step's last backward only
        last = steps.batch == steps.batches - 1 and steps.index == len(steps) - 1
        with (self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()):
            with self._autocast():
                output = self._forward_checked(inputs)
            loss, sums = self.objective.train_terms(output, targets, self.spec.label_smoothing)
            steps.scale(loss).backward()
        self._meter.add(self.step + 1, sums)
        if steps.index == len(steps) - 1:
            self._interval_samples += len(targets) * self.world

    def _update(self) -> None:
        if self.spec.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self._check_every_step:
            self._check_finite()

    def _forward_checked(self, inputs: torch.Tensor) -> Any:
        try:
            return self._forward(inputs)
        except IndexError as e:  # an embedding lookup past its table: say which ids
            if inputs.is_floating_point():  # prepared token ids are int64
                raise
            raise FxgrowError(f"the model failed on token ids up to {int(inputs.max())} ({type(e).__name__}: {e}); "
                              f"the data's vocabulary has {self.data.num_classes} ids (train.data.vocab_size): is "
                              "the model's embedding smaller?") from e

    def _after_step_events(self, end_of_epoch: bool, last: bool) -> None:
        spec = self.spec
        if self.step % spec.log_every_steps == 0 or last:
            self._log_train()
        elif self._progress is not None:
            self._progress.advance(self.step)
        completed_epoch = self.step // self.steps_per_epoch
        if (last or (spec.eval_every_steps and self.step % spec.eval_every_steps == 0)
                or (end_of_epoch and spec.eval_every_epochs and completed_epoch % spec.eval_every_epochs == 0)):
            self._eval()
        if end_of_epoch:
            self.events.epoch_end(self)
        if spec.checkpoint and (last or (spec.checkpoint_every_steps and self.step % spec.checkpoint_every_steps == 0)
                                or (end_of_epoch and not spec.checkpoint_every_steps)):
            self._save_checkpoint()

    def _check_finite(self) -> None:
        bad = self._meter.first_bad_step()
        if self.world > 1:
            bad = int(self._reduce(torch.tensor(_NEVER if bad is None else bad, device=self.device),
                                   dist.ReduceOp.MIN))
            bad = None if bad == _NEVER else bad
        if bad is not None:
            raise NonFiniteLoss(f"non-finite loss at step {bad} (epoch {(bad - 1) // self.steps_per_epoch}); "
                                f"training stopped, {self._last_good()}")

    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.out_dir / ckpt.CHECKPOINT} (step {self._last_checkpoint})"
                if self._last_checkpoint is not None else "no checkpoint was written")

    def _state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(description, tensor) of every floating parameter, buffer and optimizer state."""
        tensors = [(f"model parameter {n!r}", t) for n, t in self.model.named_parameters()]
        tensors += [(f"model buffer {n!r}", t) for n, t in self.model.named_buffers()]
        if self.optimizer is not None:
            names = {p: n for n, p in self.model.named_parameters()}
            tensors += [(f"optimizer state {k!r} of {names.get(p, '?')!r}", v)
                        for p, state in self.optimizer.state.items() for k, v in state.items()
                        if isinstance(v, torch.Tensor)]
        return [(n, t) for n, t in tensors if t.is_floating_point() or t.is_complex()]

    def _check_state_finite(self) -> None:
        """Stop, writing nothing, when any state is NaN or inf that was not from the start.
        One flag per tensor and a single device sync: run when a checkpoint is due, never
        per step."""
        tensors = [(n, t) for n, t in self._state_tensors() if n not in self._non_finite_at_start]
        bad = None
        if tensors:
            finite = ckpt.finite_flags([t for _, t in tensors])
            if self.world > 1:
                finite = self._reduce(finite.to(torch.int32), dist.ReduceOp.MIN).bool()  # a bad tensor on any rank
            if not bool(finite.all()):
                index = int((~finite).nonzero()[0])
                bad = tensors[index][0] + ("" if not torch.isfinite(tensors[index][1]).all() else " (on another rank)")
        if bad is not None:
            raise NonFiniteState(f"non-finite state at step {self.step} (epoch {(self.step - 1) // self.steps_per_epoch}): "
                                 f"{bad} holds NaN or inf; training stopped without saving it, {self._last_good()}. "
                                 "A lower lr or a grad_clip may help")

    def _reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def _interval_sums(self) -> list[float]:
        """This interval's [loss x count, correct, count] over all ranks; starts the next."""
        self._check_finite()
        sums = self._meter.take()
        if self.world > 1:
            sums = self._reduce(torch.tensor(sums, dtype=torch.float64, device=self.device)).tolist()
        return sums

    def _log_train(self) -> None:
        metrics = self.objective.metrics(self._interval_sums())
        if self.spec.label_smoothing:  # the smoothed loss is no likelihood: no perplexity of it
            metrics.pop("perplexity", None)
        now = time.perf_counter()
        record = {"step": self.step, "epoch": self.epoch, "split": "train", **metrics,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "samples_per_s": self._interval_samples / max(now - self._interval_start, 1e-9)}
        self._samples += self._interval_samples
        self._interval_start, self._interval_samples = now, 0
        if self.rank == 0:
            self.log(record)
            self._progress.train(record)

    def _eval(self) -> None:
        self._check_finite()
        metrics = self.evaluate()
        self._last_eval = (self.step, metrics)
        record = {"step": self.step, "epoch": self.epoch, "split": "test", **metrics}
        if self.rank == 0:
            self.log(record)
            self._progress.eval(record)
        self.events.eval(self, metrics)

    def _save_checkpoint(self) -> None:
        # Fold the interval so far into one carried sum, here and in the resumed run alike,
        # so both log the same figures.
        carry = self._interval_sums()
        self._check_state_finite()
        self._meter.carry = carry if self.rank == 0 else [0.0, 0.0, 0.0]
        state = {
            "step": self.step,
            "spec": self.spec_dump,
            "train_spec": self.spec.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self._rng_states(),
            "callbacks": self.events.state_dicts(),
            "interval_sums": carry,
            "wall_time_s": self._wall_time(),
        }
        if self.signature:
            state["signature"] = self.signature
        if self.rank == 0:
            ckpt.save_checkpoint(self.out_dir / ckpt.CHECKPOINT, state)
        self._last_checkpoint = self.step

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's generators, in rank order: ranks are seeded apart (dropout draws
        differ), so rank 0's state alone would resume the others on the wrong stream."""
        mine = ckpt.rng_state()
        if self.world == 1:
            return [mine]
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, mine)
        return states

    def _restore_rng(self, state: dict[str, Any]) -> None:
        states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: rank 0's alone
        if len(states) != self.world and self.rank == 0:
            warnings.warn(f"resuming on {self.world} rank(s) from a checkpoint of {len(states)}: the run goes on, "
                          "but it is not bit-identical to an uninterrupted one (batches split differently)",
                          stacklevel=2)
        ckpt.set_rng_state(states[self.rank % len(states)])

    def _wall_time(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    # --- the end -------------------------------------------------------------------

    def _finish(self) -> dict[str, Any]:
        if self._last_eval is None or self._last_eval[0] != self.step:  # a resumed, already finished run
            self._eval()
        self.events.train_end(self)
        if self._last_checkpoint != self.step:  # a checkpoint at this step was checked already
            self._check_state_finite()  # nothing non-finite is folded and reported as done
        _, metrics = self._last_eval
        flops, flops_error = self._final_flops()
        wall = self._wall_time()
        report = {
            "accuracy": metrics["accuracy"],  # causal_lm: next-token accuracy
            "loss": metrics["loss"],
            **({"perplexity": metrics["perplexity"]} if "perplexity" in metrics else {}),
            "objective": self.objective.name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "flops": flops,
            **({"flops_error": flops_error} if flops_error else {}),
            "wall_time_s": wall,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "samples_per_s": self._samples / max(self._train_time, 1e-9),
            "device": str(self.device),
            "world_size": self.world,
            "out_dir": str(self.out_dir),
        }
        if self.data.info:
            report["data"] = self.data.info
        report.update(self.events.reports())
        if self.rank == 0:
            if self.on_finish is not None:
                self.on_finish(self.model, self.out_dir, report)
            ckpt.write_json(self.out_dir / "report.json", report)
        return report

    def _final_flops(self) -> tuple[int | None, str | None]:
        """The report's FLOPs; a model they cannot be counted on still gets its report and
        folded model (the reason goes into the report)."""
        try:
            return self.forward_flops(), None
        except FxgrowError as e:
            warnings.warn(f"forward FLOPs not counted: {e}", stacklevel=2)
            return None, str(e)

    @torch.no_grad()
    def forward_flops(self, model: nn.Module | None = None) -> int:
        """Forward FLOPs of one example (FlopCounterMode's count, on meta tensors: no kernel runs)."""
        return forward_flops(model if model is not None else self.model, self.data.example())

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._folder is not None:
            self._folder.release()
            self._folder = None
