"""Exact resume: a run killed with SIGKILL at a random step and resumed ends with
parameters bit-identical to an uninterrupted run; so does one that crashed in-process."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxgrow
from fxgrow.train import Callback, Trainer
from tests.test_train_loop import mlp, one_thread, spec  # noqa: F401  (fixture)

DRIVER = Path(__file__).with_name("train_driver.py")


def driver_env() -> dict[str, str]:
    root = str(Path(fxgrow.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the throughput (a wall-clock figure)."""
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    kill_after = random.randint(4, 36)  # of 40 steps; checkpoints every 3, so one exists
    cmd = lambda name: [sys.executable, str(DRIVER), "--out", str(tmp_path / name),  # noqa: E731
                        "--final", str(tmp_path / f"{name}.pt")]
    reference = subprocess.Popen(cmd("reference"), env=driver_env(), stdout=subprocess.DEVNULL)
    victim = subprocess.Popen(cmd("victim"), env=driver_env(), stdout=subprocess.PIPE, text=True)
    for line in victim.stdout:
        if line.strip() == f"step {kill_after}":
            victim.send_signal(signal.SIGKILL)
            break
    assert victim.wait() == -signal.SIGKILL, f"the run ended before step {kill_after}"
    assert not (tmp_path / "victim.pt").exists()
    subprocess.run(cmd("victim") + ["--resume"], env=driver_env(), stdout=subprocess.DEVNULL, check=True)
    assert reference.wait() == 0

    expected, got = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "victim.pt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"killed after step {kill_after}: {different} differ"
    assert metrics(tmp_path / "victim") == metrics(tmp_path / "reference")
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("victim", "reference")]
    assert reports[0]["announce"] == reports[1]["announce"] and reports[0]["accuracy"] == reports[1]["accuracy"]


class Crash(Callback):
    name = "crash"

    def after_step(self, ctx):
        if ctx.step == 7:
            raise RuntimeError("crash")


SMALL = {"name": "synthetic", "shape": [12], "num_classes": 3, "train_size": 16, "test_size": 6}


def crash_and_resume(s, tmp_path: Path, edit_checkpoint=None, build=mlp) -> tuple[Trainer, Trainer]:
    """An uninterrupted run (`a`) and the same run crashed at step 7 (`b`), then resumed from
    its checkpoint, which `edit_checkpoint(state)` may change first. `build()` makes the model."""
    torch.manual_seed(0)
    reference = Trainer(build(), s, out_dir=tmp_path / "a")
    reference.fit()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(build(), s, [Crash()], out_dir=tmp_path / "b").fit()
    if edit_checkpoint is not None:
        path = tmp_path / "b" / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        edit_checkpoint(state)
        del state["checksum"]  # an edited file without checksums: as written before they existed
        torch.save(state, path)
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    resumed = Trainer(build(), s, resume=tmp_path / "b")
    resumed.fit()
    return reference, resumed


def assert_same_parameters(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("optimizer", [{"name": "adamw", "lr": 0.01}, {"name": "sgd", "lr": 0.1, "nesterov": True}])
def test_resume_after_a_crash_is_bit_identical(tmp_path, optimizer):
    s = spec(epochs=5, checkpoint_every_steps=3, optimizer=optimizer, data=SMALL, schedule={"warmup_steps": 3})
    reference, resumed = crash_and_resume(s, tmp_path)
    assert_same_parameters(reference, resumed)
    for a, b in zip(reference.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_resume_on_another_world_size_warns(tmp_path):
    # a checkpoint of a 2-rank run resumed in one process: it goes on, and says it is not exact
    def two_ranks(state):
        assert len(state["rng"]) == 1  # one generator state per rank
        state["rng"] = state["rng"] * 2

    with pytest.warns(UserWarning, match="resuming on 1 rank.s. from a checkpoint of 2: .* not bit-identical"):
        crash_and_resume(spec(epochs=2, checkpoint_every_steps=2, data=SMALL), tmp_path, two_ranks)


def test_checkpoint_with_one_rng_state_from_before_per_rank_states_resumes(tmp_path):
    def earlier_format(state):  # rank 0's generators, not a list
        state["rng"] = state["rng"][0]

    reference, resumed = crash_and_resume(spec(epochs=2, checkpoint_every_steps=2, data=SMALL), tmp_path,
                                          earlier_format)
    assert_same_parameters(reference, resumed)
