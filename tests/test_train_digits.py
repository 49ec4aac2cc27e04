"""Learning happens: the example small CNN reaches >= 95% test accuracy on the real
digits data through the loop, and the run folder holds what a user needs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from fxgrow.specs.train import TrainSpec
from fxgrow.train import Trainer
from fxgrow.train.checkpoint import load_checkpoint
from tests.test_train_loop import one_thread  # noqa: F401  (fixture: small nets run best on one thread)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "models" / "small_cnn.py"


def load_example(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_cnn_learns_digits(tmp_path):
    torch.manual_seed(0)
    spec = TrainSpec(data="digits", epochs=4, batch_size=64, optimizer={"lr": 0.05},
                     schedule={"warmup_epochs": 1}, progress="plain")
    report = Trainer(load_example(EXAMPLE).build(), spec, out_dir=tmp_path).fit()
    assert report["accuracy"] >= 0.95
    assert json.loads((tmp_path / "report.json").read_text())["accuracy"] == report["accuracy"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == report["steps"] == 4 * (1437 // 64)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"test"' in line]
    assert [r["epoch"] for r in evals] == [0, 1, 2, 3] and evals[-1]["accuracy"] == report["accuracy"]
