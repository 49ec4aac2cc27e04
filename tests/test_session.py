"""fxgrow.Session: the passes in a plain PyTorch loop.

The same spec, seed, batches and optimizer as `fxgrow apply` (fxgrow's Trainer) give
bit-identical final weights, masks and statistics for every pass, growth included: the
loop and the session send the callbacks one event order (`fxgrow.train.events`).
Resuming from `session.module.state_dict()` (a grown model regrows while it loads) equals
the uninterrupted run. Calls out of order, and optimizers that ignore what the passes
ask, are refused naming what to do."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxgrow
from fxgrow.errors import FxgrowError
from fxgrow.subnets import data_evaluator
from fxgrow.train.checkpoint import CheckpointError
from fxgrow.train.data import Batches
from fxgrow.train.events import EventOrderError
from tests.session_cases import CASES, MODELS, TRAIN, differences, digits, reference, spec_of

CPU = torch.device("cpu")


def make_session(name: str, steps: int | None = None) -> tuple[fxgrow.Session, Batches]:
    ref, spec = spec_of(name, steps)
    t = spec.train
    batches = Batches(digits(), "train", t.batch_size, CPU, seed=t.seed)
    session = fxgrow.Session(spec, ref, total_steps=t.steps, steps_per_epoch=batches.steps_per_epoch,
                             evaluate=data_evaluator(digits(), t.batch_size, CPU))
    return session, batches


def train(session: fxgrow.Session, batches: Batches, until: int | None = None, one_call: bool = False) -> None:
    """The README's plain loop: fxgrow's batches, cross-entropy, the session's optimizer."""
    net, prepare, spe = session.module, digits().prepare, batches.steps_per_epoch
    until = until or session.total_steps
    while session.step < until:
        epoch, start = divmod(session.step, spe)
        for x, y in batches.epoch(epoch, start):
            x = prepare(x)
            if one_call:
                session.train_step(x, lambda module: F.cross_entropy(module(x).float(), y))
            else:
                steps = session.step_start(x, y)
                session.optimizer.zero_grad(set_to_none=True)
                for _ in steps:
                    steps.scale(F.cross_entropy(net(x).float(), y)).backward()
                session.after_backward()
                session.optimizer.step()
                session.scheduler.step()
                session.after_step()
            if session.step == until:
                break


def fresh(name: str, steps: int | None = None) -> tuple[fxgrow.Session, Batches]:
    session, batches = make_session(name, steps)
    session.make_optimizer()  # the spec's optimizer and schedule
    session.make_scheduler()
    session.seed_rngs()
    return session, batches


@pytest.mark.parametrize("name", list(CASES))
def test_plain_loop_equals_fxgrow_apply(name):
    ref_state, ref_report = reference(name)
    session, batches = fresh(name)
    session.start()
    train(session, batches)
    report = session.train_end()
    assert differences(ref_state, session.model.state_dict()) == []
    assert session.generation == ("grow" in ref_report)
    if "prune_regrow" in ref_report:
        for key in ("events", "moved", "actual_sparsity", "layers", "schedule"):
            assert report["prune_regrow"][key] == ref_report["prune_regrow"][key], key
    if "sorted_slicing" in ref_report:
        assert report["sorted_slicing"]["grid"] == ref_report["sorted_slicing"]["grid"]
    if "grow" in ref_report:
        assert report["grow"]["growth_step"] == ref_report["grow"]["growth_step"] == (22 if "lr" in name else 4)


@pytest.mark.parametrize("name", ["sorted_slicing", "mixing_grow"])
def test_train_step_is_the_trainers_step(name):
    """`session.train_step` runs the Trainer's own `optimizer_step`."""
    session, batches = fresh(name)
    session.start()
    train(session, batches, one_call=True)
    assert differences(reference(name)[0], session.model.state_dict()) == []


@pytest.mark.parametrize("name,at", [("prune_regrow", 3), ("mixing_grow", 6), ("all_passes", 6)])
def test_resume_from_the_module_state_equals_uninterrupted(name, at):
    """A checkpoint is session.module's state_dict plus the optimizer's and scheduler's;
    a fresh session loads it (growth regrows the model first) and goes on exactly."""
    session, batches = fresh(name)
    session.start()
    train(session, batches, until=at)
    saved = {"model": session.module.state_dict(), "optimizer": session.optimizer.state_dict(),
             "scheduler": session.scheduler.state_dict(), "rng": torch.get_rng_state()}
    del session

    session, batches = fresh(name)
    session.module.load_state_dict(saved["model"])   # regrows (grown runs), rebuilds the optimizer
    session.optimizer.load_state_dict(saved["optimizer"])
    session.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    assert session.step == at and session.resumed
    assert session.generation == (name != "prune_regrow")
    session.start()
    train(session, batches)
    session.train_end()
    assert differences(reference(name)[0], session.model.state_dict()) == []


def test_bound_optimizer_is_repointed_in_place_on_growth():
    """An optimizer the loop owns (bind) stays the same object through growth, and the
    run equals fxgrow's (which rebuilds its optimizer)."""
    from fxgrow.train.optim import build_scheduler, lr_factor, optimizer_options

    session, batches = make_session("mixing_grow")
    t = session.spec.train
    cls, options = optimizer_options(t.optimizer)
    optimizer = cls(session.param_groups(), **options)
    scheduler = build_scheduler(optimizer, lr_factor(t.schedule, t.steps, batches.steps_per_epoch), 0)
    session.bind(optimizer, scheduler)
    session.seed_rngs()
    session.start()
    train(session, batches)
    assert session.optimizer is optimizer and session.scheduler is scheduler and session.generation == 1
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in session.model.parameters()}
    assert differences(reference("mixing_grow")[0], session.model.state_dict()) == []


def test_calls_out_of_order_are_refused():
    session, batches = fresh("sorted_slicing")
    x, y = next(batches.epoch(0))
    x = digits().prepare(x)
    with pytest.raises(EventOrderError, match=r"session.step_start\(\) out of order: the run has not started; "
                                              r"what comes next is start\(\)"):
        session.step_start(x)
    session.start()
    with pytest.raises(EventOrderError, match="training forward outside a step"):
        session.module(x)
    steps = session.step_start(x)
    assert len(steps) == 3
    next(iter(steps))
    with pytest.raises(EventOrderError, match=r"after_backward\(\) after 1 of this step's 3 micro-steps"):
        session.after_backward()
    for _ in steps:
        pass
    with pytest.raises(EventOrderError, match=r"after_step\(\) out of order: a step is open"):
        session.after_step()
    session.after_backward()
    with pytest.raises(EventOrderError, match=r"step_start\(\) out of order: the step's gradients are complete"):
        session.step_start(x)
    session.after_step()
    assert session.step == 1
    with pytest.raises(EventOrderError, match=r"load_state_dict\(\) after start\(\)"):
        session.load_state_dict(session.state_dict())


def test_a_step_may_begin_at_the_modules_forward():
    """step_start() without inputs: the module's next training forward begins the step with
    its first input (for frameworks that never show a callback the batch)."""
    session, batches = fresh("sorted_slicing")
    session.start()
    x, y = next(batches.epoch(0))
    x = digits().prepare(x)
    steps = session.step_start()
    with pytest.raises(EventOrderError, match="no training forward of session.module since step_start"):
        len(steps)
    seen = []
    for i in steps:
        loss = F.cross_entropy(session.module(x), y)
        seen.append((i, len(steps)))
        steps.scale(loss).backward()
    assert seen == [(0, 3), (1, 3), (2, 3)] and session.batch[0] is x
    one = fresh("sorted_slicing")[0]
    one.start()
    one.step_start(one_pass="use the other driver")
    with pytest.raises(FxgrowError, match=r"runs 3 forward/backward passes per optimizer step \(sorted_slicing"
                                          r": its sub-models\), and this driver runs one: use the other driver"):
        one.module(x)


def test_optimizers_that_ignore_the_passes_are_refused():
    session, _ = make_session("compander_sgd")
    plain = torch.optim.SGD(session.model.parameters(), lr=0.1, weight_decay=5e-4)
    with pytest.raises(FxgrowError, match=r"needs weight_decay=0.0 \(the spec's passes set it\), but its optimizer "
                                          r"group has weight_decay=0.0005: build the optimizer from "
                                          r"session.param_groups\(\)"):
        session.bind(plain)
    partial = torch.optim.SGD(list(session.model.parameters())[1:], lr=0.1)
    with pytest.raises(FxgrowError, match="the optimizer does not train"):
        session.bind(partial)
    with pytest.raises(FxgrowError, match=r"session.start\(\): no optimizer"):
        session.start()
    no_length = fxgrow.Session(spec_of("compander_sgd")[1], spec_of("compander_sgd")[0])
    no_length.make_optimizer()
    with pytest.raises(FxgrowError, match=r"needs the run's length: Session\(total_steps=...\)"):
        no_length.start()


def test_a_resume_keeps_the_run_and_the_spec():
    session, _ = make_session("prune_regrow")
    state = session.state_dict()
    longer = fxgrow.Session(spec_of("prune_regrow", 20)[1], spec_of("prune_regrow")[0], total_steps=20)
    with pytest.raises(CheckpointError, match="its run takes 10 steps, this one 20"):
        longer.load_state_dict(state)
    other = fxgrow.Session(spec_of("compander_sgd")[1], spec_of("compander_sgd")[0], total_steps=10)
    with pytest.raises(CheckpointError, match="differs from this session's in passes.0"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="session.module's extra state.*unreadable"):
        session.module.set_extra_state(torch.zeros(5, dtype=torch.uint8))


def test_without_an_evaluator_the_grid_has_no_metrics_and_says_so():
    ref, spec = spec_of("sorted_slicing")
    session = fxgrow.Session(spec, ref, total_steps=2)
    session.make_optimizer()
    session.start()
    x, y = next(Batches(digits(), "train", 64, CPU).epoch(0))
    for _ in range(2):
        session.train_step(digits().prepare(x), lambda m: F.cross_entropy(m(digits().prepare(x)), y))
    with pytest.warns(UserWarning, match="no evaluate="):
        report = session.train_end()
    assert report["session"]["evaluate"].startswith("not given")
    assert all("accuracy" not in row and "params" in row for row in report["sorted_slicing"]["grid"])


def test_the_plain_loop_example_prunes_and_learns(tmp_path):
    from examples.integrations.plain_loop import main

    run = main(["--epochs", "2", "--out", str(tmp_path)])
    assert run["report"]["prune_regrow"]["events"] >= 1 and run["metrics"]["accuracy"] > 0.5  # 44 steps: learning happened
    assert (tmp_path / "folded_state_dict.pt").is_file()


def test_fxgrow_never_imports_the_frameworks():
    """Lightning and transformers take seconds to import: only fxgrow.integrations.<name> does."""
    import subprocess
    import sys

    code = ("import sys, fxgrow, fxgrow.session, fxgrow.integrations, fxgrow.cli.main; "
            "print([m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_only_fxgrows_loop_can_do_is_refused_not_dropped():
    """Gradient accumulation over batches (SortedNet's gacc) and growth's learning-rate
    restart under a scheduler the session does not own are refused at start()."""
    from fxgrow.train.optim import build_scheduler, lr_factor, optimizer_options

    session, _ = make_session("grow_lr_restart")
    t = session.spec.train
    cls, options = optimizer_options(t.optimizer)
    optimizer = cls(session.param_groups(), **options)
    session.bind(optimizer, build_scheduler(optimizer, lr_factor(t.schedule, t.steps, 22), 0))
    with pytest.raises(FxgrowError, match="grow sets the learning rate during the run"):
        session.start()

    model, passes, steps, optimizer = CASES["sorted_slicing"]
    passes = passes.replace("sub_models_per_batch: 3}", "sub_models_per_batch: 3, accumulate_batches: 2}")
    spec = fxgrow.parse_spec_text(passes + TRAIN.format(steps=steps, optimizer=optimizer), source="gacc")
    session = fxgrow.Session(spec, str(MODELS / model), total_steps=8, steps_per_epoch=22)
    session.make_optimizer()
    with pytest.raises(FxgrowError, match="sorted_slicing asks for 2 batches per optimizer step"):
        session.start()
