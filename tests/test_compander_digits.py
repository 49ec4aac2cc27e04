"""The compander through the real loop on digits: it trains as well as the plain model
(same seed, same budget), writes its metrics and report, and folds to the same model."""
from __future__ import annotations

import json

import pytest
import torch

from fxgrow.fold import fold
from fxgrow.passes import compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.specs.train import TrainSpec
from fxgrow.train import Trainer
from tests.test_train_digits import EXAMPLE, load_example
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def train(tmp_path, name, passes=(), **spec):
    torch.manual_seed(0)
    model = load_example(EXAMPLE).build()
    callbacks = []
    if passes:
        result = compose(*passes)(model)
        model, callbacks = result.graph_module, result.callbacks
    spec = TrainSpec(**{"data": "digits", "epochs": 4, "batch_size": 64, "optimizer": {"lr": 0.05},
                        "schedule": {"warmup_epochs": 1}, "progress": "none", **spec})
    trainer = Trainer(model, spec, callbacks, out_dir=tmp_path / name)
    return trainer, trainer.fit()


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_compander_trains_within_one_point_of_plain_and_folds(tmp_path):
    _, plain = train(tmp_path, "plain")
    trainer, comp = train(tmp_path, "compander", [CompanderPass()])
    print(f"digits accuracy: plain {plain['accuracy']:.4f}, compander {comp['accuracy']:.4f}")
    assert comp["accuracy"] >= plain["accuracy"] - 0.01

    section = json.loads((tmp_path / "compander" / "report.json").read_text())["compander"]
    assert section["function"] == "atan" and (section["a"], section["b"]) == (0.7, 0.8)
    assert section["clamped"] == {"0.weight": 0, "3.weight": 0, "7.weight": 0, "12.weight": 0}
    logged = [r["compander"] for r in records(tmp_path / "compander") if "compander" in r]
    assert len(logged) == 1 + 4  # the initial distribution, then every epoch's eval
    assert all(set(r["percentiles"]) == {"q", "0.weight", "12.weight"} for r in logged)

    folded = fold(trainer.model).eval()
    assert trainer.evaluate(folded)["accuracy"] == comp["accuracy"]


def test_learnable_scales_with_adamw_and_the_adam_correction(tmp_path):
    _, report = train(tmp_path, "learnable", [CompanderPass(learnable="layer", adaptive_fix=True)],
                      optimizer={"name": "adamw", "lr": 0.003})
    print(f"digits accuracy, learnable a, b with AdamW and the Adam correction: {report['accuracy']:.4f}")
    assert report["accuracy"] >= 0.9
    a = report["compander"]["a"]
    assert list(a) == ["0.weight", "3.weight", "7.weight", "12.weight"]
    assert all(value != 0.5 for value in a.values())
    evals = [r["compander"] for r in records(tmp_path / "learnable") if "compander" in r][1:]
    assert len(evals) == 4 and evals[-1]["a"] == a and evals[0]["a"] != a
