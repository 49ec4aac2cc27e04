"""fxgrow's passes in a training loop fxgrow does not own: your own loop, or a framework's
(`fxgrow.integrations.lightning`, `fxgrow.integrations.hf`).

    session = fxgrow.Session("examples/granet_digits.yaml", model, total_steps=T, steps_per_epoch=S)
    net = session.module                 # train this; growth replaces what is inside it
    session.make_optimizer()             # the spec's optimizer, on the passes' parameter groups
    session.make_scheduler()             # the spec's schedule
    session.start()
    for x, y in loader:
        steps = session.step_start(x)    # masks, growth, the step's sub-models
        session.optimizer.zero_grad(set_to_none=True)   # re-read: growth may rebuild it
        for _ in steps:                  # one forward/backward per sub-model
            steps.scale(F.cross_entropy(net(x), y)).backward()
        session.after_backward()
        session.optimizer.step()
        session.scheduler.step()
        session.after_step()
    report = session.train_end()
    plain = session.fold()

The session is the `TrainContext` the passes' callbacks receive, and it sends them the
events in the order `fxgrow.train.events` writes for fxgrow's own Trainer too (a call out
of order is an error naming the call that was due). `train_step` runs a whole optimizer
step through the Trainer's own `optimizer_step`.

Two ways to hold the optimizer:
- `make_optimizer` / `make_scheduler`: the session builds them, and rebuilds both when
  growth replaces the model, as fxgrow's Trainer does (re-read `session.optimizer`).
- `bind(optimizer, scheduler)`: yours (a framework's). It must honour the options the
  passes set (build it from `session.param_groups()`); growth re-points it in place (same
  object, same groups, the grown parameters, their state moved), so the framework's
  references and its scheduler stay valid.

State: `session.state_dict()` is fxgrow's part of a checkpoint (the step, the run's length,
every callback's state). `session.module`'s own state_dict carries it as extra state,
loaded before the model's tensors: loading a checkpoint of a grown model into a fresh
session grows it first. Load before `start()`, then load the optimizer's state.
"""
from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import fx, nn

from .api import build_model, compile_spec
from .errors import FxgrowError
from .fold import fold as fold_model
from .specs.root import Spec, load_spec, parse_spec
from .train import checkpoint as ckpt
from .train.callbacks import Callback, ModelChange
from .train.events import EventOrderError, Events, MicroSteps, optimizer_step
from .train.optim import build_scheduler, lr_factor, optimizer_options, param_groups, transfer_state

FORMAT = 1
STATE_WHERE = "the fxgrow session state (session.module's extra state)"


class SessionModule(nn.Module):
    """The module a loop trains (`session.module`): the rewritten GraphModule is its child
    `gm`, which growth replaces, so the loop's and a framework's references stay valid.

    A training-mode forward tells the session (a step the caller started without inputs
    begins here, with this forward's first input). Its state_dict carries the session's
    state as extra state (a uint8 tensor, so safetensors can hold it), which torch loads
    before the children's tensors: a grown structure is rebuilt in time on any resume path."""

    def __init__(self, gm: fx.GraphModule, session: "Session"):
        super().__init__()
        self.gm = gm
        object.__setattr__(self, "_session", session)  # not a submodule, not in the state_dict

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            self._session._training_forward(args[0] if args else next(iter(kwargs.values()), None))
        return self.gm(*args, **kwargs)

    def get_extra_state(self) -> torch.Tensor:
        buffer = io.BytesIO()
        torch.save(self._session.state_dict(), buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        try:
            decoded = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=True)
        except Exception as e:  # torch raises zip, EOF and unpickling errors alike
            raise ckpt.CheckpointError(f"{STATE_WHERE}: unreadable ({type(e).__name__}: {e})") from None
        self._session.load_state_dict(decoded)


class _PendingStep:
    """A step that the module's next training forward begins, with that forward's first
    input: for drivers that never see the batch before the forward (the HF Trainer's
    callbacks) or do not know which part of it is the model's input."""

    def __init__(self, session: "Session", one_pass: str | None):
        self.session, self.one_pass = session, one_pass
        self.steps: MicroSteps | None = None

    def begin(self, inputs: Any) -> None:
        session = self.session
        session.batch = (inputs, None)
        self.steps = session._begin(self.one_pass)
        session.events.micro_step(session, 0)

    def _begun(self) -> MicroSteps:
        if self.steps is None:
            raise EventOrderError("session: no training forward of session.module since step_start(): the step "
                                  "begins at that forward")
        return self.steps

    def __len__(self) -> int:
        return len(self._begun())

    @property
    def index(self) -> int:
        return self._begun().index

    def __iter__(self) -> Iterator[int]:
        if self.steps is None:
            yield 0  # the body's forward begins the step and its micro-step 0
            self._begun()
        yield from self.steps

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self._begun().scale(loss)


class Session:
    """A spec's passes applied to `model`, and their training-time behaviour for any loop.

    `spec`: a `Spec`, a YAML file, or a mapping. `model`: an `nn.Module`, a model reference
    (`file.py`, `package.module:callable`; built seeded as `fxgrow apply` builds it), or None
    for the spec's `model.entry`. `total_steps` is the whole run's optimizer steps (the
    passes' schedules are fractions of it; an integration takes it from the framework);
    `steps_per_epoch` defaults to it. `evaluate(model) -> {"loss", "accuracy", ...}` serves
    passes that evaluate (sorted_slicing's sub-model grid; without it their metrics are
    left out and the report says so); `log(record)` receives what the passes log (also
    kept in `records`). `callbacks` are your own `fxgrow.train.Callback`s, after the spec's.
    """

    def __init__(self, spec: Spec | str | Path | dict, model: nn.Module | str | None = None, *,
                 total_steps: int | None = None, steps_per_epoch: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, callbacks: Sequence[Callback] = ()):
        self.spec = spec if isinstance(spec, Spec) else (
            parse_spec(spec, "Session spec") if isinstance(spec, dict) else load_spec(spec))
        if model is None or isinstance(model, str):
            model = build_model(self.spec, model)
        self.result = compile_spec(self.spec, model)
        self.events = Events([*self.result.callbacks, *callbacks], caller="session.")
        self.callbacks = self.events.callbacks
        gm = self.result.graph_module
        if device is not None:
            gm.to(device)
        self.module = SessionModule(gm, self)
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.seed = self.spec.train.seed if seed is None else int(seed)
        # TrainContext members (model, device: properties below)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.step = self.epoch = 0
        self.batch: tuple[Any, Any] | None = None
        self.batch_index, self.batches_per_step = 0, 1  # a step takes one batch: your loop accumulates
        self.loss: torch.Tensor | None = None
        self.rank, self.world = 0, 1
        self.resumed = False
        self.out_dir: Path | None = None  # the session writes no files
        self.records: list[dict[str, Any]] = []
        self.generation = 0  # +1 whenever a pass replaced the model (growth)
        self._evaluate, self._log = evaluate, log
        self._build: tuple[type, dict[str, Any]] | None = None  # set when the session built the optimizer
        self._factor: Callable[[int], float] | None = None     # ... and the schedule
        self._pending: _PendingStep | None = None
        self._restored: dict[str, Any] | None = None  # callback states to load at start()
        self._notes: dict[str, str] = {}

    # --- TrainContext -----------------------------------------------------------------

    @property
    def model(self) -> fx.GraphModule:
        """The rewritten model now trained (growth replaces it; `module` stays)."""
        return self.module.gm

    @property
    def device(self) -> torch.device:
        first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def log(self, record: dict[str, Any]) -> None:
        record = {"step": self.step, "epoch": self.epoch, **record}
        self.records.append(record)
        if self._log is not None:
            self._log(record)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        if self._evaluate is None:
            if "evaluate" not in self._notes:
                warnings.warn("a pass asked for test metrics (sorted_slicing's sub-model grid) and the session has "
                              "no evaluate=: they are left out of its report", stacklevel=2)
            self._notes["evaluate"] = "not given: the metrics passes asked for are left out"
            return {}
        return self._evaluate(model if model is not None else self.model)

    def replace_model(self, model: nn.Module, change: ModelChange | dict[str, str] | None = None) -> None:
        change = change if isinstance(change, ModelChange) else ModelChange(param_map=dict(change or {}))
        old = self.model
        old_params, old_overrides = dict(old.named_parameters()), self.events.overrides(old)
        self._install(model)
        if self._build is not None:  # the session's optimizer: rebuilt, as fxgrow's Trainer does
            old_optimizer = self.optimizer
            self.optimizer = self._new_optimizer()
            transfer_state(old_optimizer, old_params, self.optimizer, dict(model.named_parameters()), change.param_map)
            if self._factor is not None:
                self.scheduler = build_scheduler(self.optimizer, self._factor, self.step)
        elif self.optimizer is not None:  # yours: the same object, re-pointed
            repoint(self.optimizer, old_params, old_overrides, model, self.events.overrides(model), change.param_map)
        self.events.model_replaced(self, old, model, change)

    def _install(self, model: nn.Module) -> None:
        model.to(self.device)
        model.train(self.module.training)
        self.module.gm = model
        self.generation += 1

    # --- the optimizer ----------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters grouped by the options the passes set (no weight decay
        on mixing coefficients or on v under the compander's effective decay...), in
        `named_parameters` order: what fxgrow's Trainer builds its optimizer from. Give
        them to your optimizer with your defaults: `SGD(session.param_groups(), lr=...)`."""
        return param_groups(self.model, self.events.overrides(self.model))

    def make_optimizer(self, cls: type[torch.optim.Optimizer] | None = None, **defaults: Any) -> torch.optim.Optimizer:
        """Build the optimizer (default: the spec's `train.optimizer`) on `param_groups()`;
        growth rebuilds it the same way."""
        self.events.expect("make_optimizer", "setup")
        if cls is None:
            if defaults:
                raise TypeError("make_optimizer: options without an optimizer class")
            cls, defaults = optimizer_options(self.spec.train.optimizer)
        self._build, self._factor, self.scheduler = (cls, dict(defaults)), None, None
        self.optimizer = self._new_optimizer()
        return self.optimizer

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cls, defaults = self._build
        return cls(self.param_groups(), **defaults)

    def make_scheduler(self, factor: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR on the session's optimizer: step t's learning rate is the base rate
        times `factor(t)` (default: the spec's `train.schedule` over `total_steps`)."""
        self.events.expect("make_scheduler", "setup")
        if self._build is None:
            raise FxgrowError("session.make_scheduler() schedules the optimizer make_optimizer() built; for your "
                              "own optimizer and scheduler use session.bind(optimizer, scheduler)")
        if factor is None:
            self._require_length("make_scheduler()")
            factor = lr_factor(self.spec.train.schedule, self.total_steps, self.steps_per_epoch or self.total_steps)
        for cb in self.callbacks:  # e.g. growth's learning-rate restart
            factor = cb.lr_factor(self, factor)
        self._factor = factor
        self.scheduler = build_scheduler(self.optimizer, factor, self.step)
        return self.scheduler

    def bind(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """Train with your (a framework's) optimizer and scheduler. A framework's wrapper
        (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer) is unwrapped:
        the passes hook the torch optimizer. Refused unless it trains every parameter of
        the model with the options the passes set."""
        self.events.expect("bind", "setup")
        optimizer = unwrap_optimizer(optimizer)
        check_groups(optimizer, dict(self.model.named_parameters()), self.events.overrides(self.model))
        self.optimizer, self.scheduler = optimizer, scheduler
        self._build = self._factor = None

    # --- the run ------------------------------------------------------------------------------

    def _require_length(self, what: str) -> None:
        if not isinstance(self.total_steps, int) or isinstance(self.total_steps, bool) or self.total_steps < 1:
            raise FxgrowError(f"{what} needs the run's length: Session(total_steps=...) (the optimizer steps of the "
                              f"whole run; the passes' schedules are fractions of it), got {self.total_steps!r}")

    def start(self) -> None:
        """on_train_start of every callback (then, when resuming, their checkpointed state)."""
        self._require_length("session.start()")
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.total_steps
        if self.optimizer is None:
            raise FxgrowError("session.start(): no optimizer: session.make_optimizer() or session.bind(optimizer) first")
        if self._restored is not None and self._restored["total_steps"] != self.total_steps:
            raise ckpt.CheckpointError(
                f"{STATE_WHERE}: its run takes {self._restored['total_steps']} steps, this one {self.total_steps}: "
                "the passes' schedules are fractions of the whole run, so a resumed run keeps its length")
        self._refuse_loop_options()
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        replacing = [cb.name for cb in self.callbacks if changes_structure(cb)]
        if self.world > 1 and replacing:
            raise FxgrowError(f"{replacing[0]} replaces the model mid-run, which a DistributedDataParallel wrapper "
                              "it does not own cannot follow (it would keep reducing the old parameters): train "
                              "it with `fxgrow apply` under torchrun, or in one process")
        self.epoch = self.step // self.steps_per_epoch
        self.events.train_start(self)
        if self._restored is not None:
            state, self._restored = self._restored, None
            for cb in self.callbacks:
                ckpt.restore_callback(cb, state, self, STATE_WHERE)

    def _refuse_loop_options(self) -> None:
        """What a pass asks of fxgrow's loop that this session cannot do in yours: refused,
        never dropped."""
        k = self.events.batches_per_step()
        if k != 1:
            name = next(cb.name for cb in self.callbacks if cb.batches_per_step() == k)
            raise FxgrowError(f"{name} asks for {k} batches per optimizer step (gradient accumulation over batches), "
                              "which a session's step of one batch cannot do: set it to 1 and accumulate in your "
                              "loop, or train with `fxgrow apply`")
        if self._factor is None:  # the learning rate is not the session's to set
            probe = lambda t: 1.0  # noqa: E731
            changing = [cb.name for cb in self.callbacks if cb.lr_factor(self, probe) is not probe]
            if changing:
                raise FxgrowError(f"{changing[0]} sets the learning rate during the run (e.g. growth's `lr` restart), "
                                  "which only a scheduler the session builds follows: session.make_optimizer() and "
                                  "session.make_scheduler(), or drop that option")

    def step_start(self, inputs: Any = None, targets: Any = None, *, one_pass: str | None = None
                   ) -> MicroSteps | _PendingStep:
        """Start an optimizer step on `inputs` (the model's input; `targets` optional) and
        return its micro-steps: iterate them, one forward and `steps.scale(loss).backward()`
        each. Without `inputs`, the step begins at the next training forward of `module`,
        with its first input. `one_pass`: this driver runs one forward a step; a spec
        asking for more is refused with this advice."""
        self.events.expect("step_start", "between")
        if self._pending is not None:
            raise EventOrderError("session.step_start() out of order: a step is pending (no after_step() yet)")
        if inputs is None:
            self._pending = _PendingStep(self, one_pass)
            return self._pending
        self.batch = (inputs, targets)
        return self._begin(one_pass)

    def _begin(self, one_pass: str | None) -> MicroSteps:
        self.epoch = self.step // self.steps_per_epoch
        steps = self.events.step_start(self)
        if one_pass is not None and len(steps) > 1:
            asking = [cb.name for cb in self.callbacks if cb.micro_steps(self) > 1]
            raise FxgrowError(f"this spec runs {len(steps)} forward/backward passes per optimizer step "
                              f"({', '.join(asking)}: its sub-models), and this driver runs one: {one_pass}")
        return steps

    @property
    def steps(self) -> MicroSteps | _PendingStep | None:
        """The open (or pending) step's micro-steps."""
        return self._pending if self._pending is not None else self.events.steps

    def _training_forward(self, inputs: Any) -> None:
        if self.events.phase in ("setup", "ended"):
            return  # outside the run (a summary, a test): nothing to do
        if self._pending is not None and self._pending.steps is None:
            self._pending.begin(inputs)
        elif self.events.phase != "step":
            raise EventOrderError("session.module ran a training forward outside a step: call "
                                  "session.step_start(inputs) before it (or step_start() to begin the step at it)")

    def after_backward(self) -> None:
        """The step's micro-steps are done: gradients are complete (clip after this)."""
        if self._pending is not None:
            self._pending._begun()
        self.events.after_backward(self)

    def before_optimizer_step(self) -> None:
        """Only where optimizer.step() runs a closure (Lightning's automatic optimization):
        call it after clipping, just before the update (see `Callback.before_optimizer_step`)."""
        self.events.before_optimizer_step(self)

    def after_step(self) -> None:
        """The optimizer stepped (and the scheduler): count the step, run the passes'
        events (pruning, regrowth...), and on_epoch_end after the last step of an epoch."""
        self.events.after_step(self)
        self._pending = None
        if self.step % self.steps_per_epoch == 0:
            self.events.epoch_end(self)

    def train_step(self, inputs: Any, loss: Callable[[nn.Module], torch.Tensor], grad_clip: float | None = None
                   ) -> None:
        """One whole optimizer step, through the function fxgrow's Trainer steps with:
        `loss(session.module)` is one forward's loss on this step's batch (called once per
        micro-step); clipping by `grad_clip` (global norm), then the optimizer and the
        scheduler step."""
        self.events.expect("train_step", "between")

        def forward_backward(steps: MicroSteps) -> None:
            steps.scale(loss(self.module)).backward()

        def update() -> None:
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()

        self.batch = (inputs, None)
        self.epoch = self.step // self.steps_per_epoch
        optimizer_step(self, self.events, forward_backward, update)
        if self.step % self.steps_per_epoch == 0:
            self.events.epoch_end(self)

    def on_eval(self, metrics: dict[str, float]) -> None:
        """Tell the passes about an evaluation (optional; the compander logs its weights)."""
        self.events.eval(self, metrics)

    def train_end(self) -> dict[str, Any]:
        """on_train_end of every callback (sorted_slicing evaluates its grid); the report."""
        self.events.train_end(self)
        return self.report()

    def report(self) -> dict[str, Any]:
        """One section per pass (as in report.json) and the session's own."""
        return {"session": {"steps": self.step, "total_steps": self.total_steps, "resumed": self.resumed,
                            "model_replacements": self.generation, **self._notes}, **self.events.reports()}

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """fxgrow's part of a checkpoint (tensors and plain data)."""
        return {"format": FORMAT, "step": self.step, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.seed, "passes": self._passes(),
                "callbacks": self.events.state_dicts()}

    def _passes(self) -> list[dict[str, Any]]:
        return [p.model_dump(mode="json") for p in self.spec.passes]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the model's structure as the state says (growth regrows it; the
        session's optimizer is rebuilt for it), the step; the callbacks' states load at
        `start()`, after their on_train_start, as in fxgrow's Trainer. Then load the
        model's tensors (`module.load_state_dict` does all of this) and the optimizer's."""
        if self.events.phase != "setup":
            raise EventOrderError("session.load_state_dict() after start(): a resumed run loads its state first "
                                  "(the structure it describes must be in place before the passes look at the model)")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ckpt.CheckpointError(f"{STATE_WHERE}: not a session state of format {FORMAT}")
        if state.get("passes") != self._passes():
            saved = state.get("passes") or []
            index = next((i for i, (a, b) in enumerate(itertools.zip_longest(saved, self._passes())) if a != b), 0)
            raise ckpt.CheckpointError(f"{STATE_WHERE}: the checkpoint's spec differs from this session's in "
                                       f"passes.{index}: a run resumes with the spec it was trained with")
        if self.total_steps is not None and state["total_steps"] != self.total_steps:
            raise ckpt.CheckpointError(f"{STATE_WHERE}: its run takes {state['total_steps']} steps, this one "
                                       f"{self.total_steps}: a resumed run keeps its length")
        model = ckpt.replay_structures(self.model, self.callbacks, state, STATE_WHERE)
        if model is not self.model:
            old_params, old_overrides = dict(self.model.named_parameters()), self.events.overrides(self.model)
            self._install(model)
            if self._build is not None:
                self.optimizer = self._new_optimizer()  # its state loads next
            elif self.optimizer is not None:
                repoint(self.optimizer, old_params, old_overrides, model, self.events.overrides(model), {})
        self.step, self.resumed, self._restored = int(state["step"]), True, state
        if self._factor is not None:
            self.scheduler = build_scheduler(self.optimizer, self._factor, self.step)

    def seed_rngs(self) -> None:
        """Seed torch's, Python's and numpy's generators as fxgrow's Trainer does at the
        start of a run (seed + rank): with the same batches and optimizer, a plain loop
        then reproduces `fxgrow apply` exactly."""
        ckpt.seed_rngs(self.seed + self.rank)

    # --- the end -------------------------------------------------------------------------

    def fold(self) -> fx.GraphModule:
        """The trained model as plain layers (`fxgrow.fold`); the session's is unchanged."""
        return fold_model(self.model)

    def extract(self, width: float | None = None, depth: int | None = None, *, at: tuple | None = None,
                **dims: float) -> fx.GraphModule:
        """A sorted-slicing sub-model as a standalone plain model (`fxgrow.subnets.extract`):
        (width, depth), or dimensions by name (`heads=0.5, ffn=0.25, depth=2`), or the grid
        point `at`."""
        from .subnets import extract

        return extract(self.model, width, depth, at=at, **dims)


# --- helpers the integrations share ------------------------------------------------------------

def changes_structure(callback: Callback) -> bool:
    """Whether `callback` may replace the model mid-run: one that does says how to rebuild
    the structure on resume (`replay_structure`)."""
    return type(callback).replay_structure is not Callback.replay_structure


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate keeps it in
    `.optimizer`, Lightning in `._optimizer`). Step hooks must go on it: accelerate's
    wrapper never runs Optimizer.__init__, so hooks registered on it never fire."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return unwrap_optimizer(inner)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FxgrowError(f"bind: {type(optimizer).__name__} is not a torch.optim.Optimizer")
    return optimizer


def check_groups(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter],
                 overrides: dict[str, dict[str, Any]]) -> None:
    """Right or refused: the optimizer trains every trainable parameter of the model, each
    in a group holding the options the passes set for it."""
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        group = where.get(id(p))
        if group is None:
            raise FxgrowError(f"the optimizer does not train {name!r} of the rewritten model: build it from "
                              "session.param_groups() once the model is final (a resumed run regrows it while "
                              "its state loads)")
        for key, value in overrides.get(name, {}).items():
            if group.get(key) != value:
                raise FxgrowError(f"{name!r} needs {key}={value!r} (the spec's passes set it), but its optimizer "
                                  f"group has {key}={group.get(key)!r}: build the optimizer from "
                                  "session.param_groups()")


def _options_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def repoint(optimizer: torch.optim.Optimizer, old_params: dict[str, nn.Parameter],
            old_overrides: dict[str, dict[str, Any]], model: nn.Module, overrides: dict[str, dict[str, Any]],
            param_map: dict[str, str]) -> None:
    """Make `optimizer` train `model` (which replaced the model of `old_params`) in place:
    the same object and groups (a scheduler keeps one base rate per group, and torch 2.14's
    LambdaLR refuses a group added later), each new parameter in the group of the old one
    it continues (`param_map`, else the same name) or else of an old parameter with its
    options; state moves as fxgrow's Trainer moves it (`transfer_state`). Parameters of
    other models in the optimizer stay as they are."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    by_options: dict[tuple, int] = {}
    for name, p in old_params.items():
        if id(p) in group_of:
            by_options.setdefault(_options_key(old_overrides.get(name, {})), group_of[id(p)])
    placed: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for name, p in named.items():
        q = old_params.get(param_map.get(name, name))
        index = group_of.get(id(q)) if q is not None else None
        if index is None:
            index = by_options.get(_options_key(overrides.get(name, {})))
        if index is None:
            raise FxgrowError(f"the model was replaced and {name!r} fits no group of the optimizer (none holds a "
                              "parameter with its options): build the optimizer from session.param_groups()")
        placed[index].append(p)
    old_ids = {id(p) for p in old_params.values()}
    old_state = {p: optimizer.state.pop(p) for p in old_params.values() if p in optimizer.state}
    for group, new in zip(optimizer.param_groups, placed):
        group["params"] = [p for p in group["params"] if id(p) not in old_ids] + new
    transfer_state(SimpleNamespace(state=old_state), old_params, optimizer, named, param_map)
    check_groups(optimizer, named, overrides)
