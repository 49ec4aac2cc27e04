"""Damaged run files: each gives one clear line naming the file and what is wrong (never a
traceback, never torch's advice to load with weights_only=False), bit flips are caught by
the checksum, and a torn last line of metrics.jsonl does not block a resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fxgrow.errors import FxgrowError
from fxgrow.train.checkpoint import load_checkpoint, save_checkpoint

from tests.cli_runs import MLP, apply_run, cli

SPEC = ("model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: compander\n"
        "train: {data: digits, steps: 4, batch_size: 32, progress: none, checkpoint_every_steps: 2}\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    apply_run(base, SPEC)
    return base


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    shutil.copy(trained / "spec.yaml", tmp_path / "spec.yaml")
    return tmp_path / "run"


def assert_one_clear_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "checkpoint.pt" in result.output, result.output
    for w in words:
        assert w in result.output, result.output
    assert "weights_only" not in result.output and "safe_globals" not in result.output


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "junk":
        path.write_bytes(b"hello world" * 10)
    elif how == "list":
        torch.save([1, 2, 3], path)
    elif how == "no_spec":
        state = torch.load(path, weights_only=True)
        del state["spec"]
        save_checkpoint(path, state)
    elif how == "pickled_code":
        state = torch.load(path, weights_only=True)
        state["callbacks"]["compander"] = Evil()
        torch.save(state, path)
    elif how == "other_model":
        state = torch.load(path, weights_only=True)
        from examples.models.mlp import build
        state["model"] = build(hidden=32).state_dict()
        save_checkpoint(path, state)  # a well-formed file: only the model does not fit
    elif how == "bit_flip":
        state = torch.load(path, weights_only=True)
        needle = state["model"]["1.weight"].numpy().tobytes()[:64]
        at = data.index(needle) + 17
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    else:
        raise AssertionError(how)


CASES = [
    ("empty", "empty"),
    ("truncated", "truncated"),
    ("junk", "not a checkpoint torch can read"),
    ("list", "holds a list"),
    ("no_spec", "no 'spec'"),
    ("pickled_code", "pickled print"),
    ("other_model", "does not fit"),
    ("bit_flip", "checksum"),
]


@pytest.mark.parametrize("how, words", CASES)
def test_fold_of_a_damaged_checkpoint_is_one_clear_error(run, how, words, capfd):
    damage(run / "checkpoint.pt", how)
    result = cli("fold", run, MLP, "-o", run / "again.pt")
    assert_one_clear_error(result, words)
    assert not (run / "again.pt").exists()
    assert "pickled code ran" not in capfd.readouterr().out + result.output


@pytest.mark.parametrize("how, words", CASES)
def test_resume_from_a_damaged_checkpoint_is_one_clear_error(run, how, words):
    damage(run / "checkpoint.pt", how)
    result = cli("apply", run.parent / "spec.yaml", MLP, "--resume", run)
    assert_one_clear_error(result, words)


def test_a_pickle_refusal_never_advises_the_unsafe_load(tmp_path):
    torch.save({"format": 1, "model": Evil()}, tmp_path / "checkpoint.pt")
    with pytest.raises(FxgrowError) as info:
        load_checkpoint(tmp_path / "checkpoint.pt")
    message = str(info.value)
    assert "pickled print" in message and "weights_only" not in message and "safe_globals" not in message
    from fxgrow.passes.grow_model import load_source  # fusing another run reads checkpoints too
    with pytest.raises(FxgrowError) as info:
        load_source(tmp_path, {})
    assert "fuse: " in str(info.value) and "weights_only" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # not even under --debug


def test_checksum_names_the_tensor_that_changed(run):
    damage(run / "checkpoint.pt", "bit_flip")
    with pytest.raises(FxgrowError, match=r"checkpoint.pt: .*checksum.*model tensor '1.weight'"):
        load_checkpoint(run / "checkpoint.pt")


def test_a_torn_metrics_line_is_dropped_with_a_warning(run):
    metrics = run / "metrics.jsonl"
    good = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(good) + '{"step": 4, "epoch": 0, "spl')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line %d .*dropped" % (len(good) + 1)):
        from fxgrow import api
        from fxgrow.specs.root import load_spec
        api.run(load_spec(run.parent / "spec.yaml"), MLP, resume=run)
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) >= len(good)
