"""`inspect --dry-run` runs every check the rewrite runs (the whole pipeline on a copy, then
the passes' checks of what comes later, such as a trial growth): exit 0 means `apply` does not
fail at rewrite time, and one error lists every layer a check refuses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fxgrow.cli.main import app
from fxgrow.errors import FxgrowError
from fxgrow.passes import Pipeline
from fxgrow.passes.grow import GrowPass
from fxgrow.passes.template_mixing import TemplateMixingPass

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples/models/mlp.py")
TRAIN = "train: {data: digits, steps: 2, batch_size: 32, progress: none}\n"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})  # tables unwrapped


def test_every_layer_out_of_the_companders_range_is_in_one_error_and_apply_fails_the_same(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: compander\n    a: 0.02\n" + TRAIN)
    dry = cli("inspect", MLP, spec, "--dry-run")
    assert dry.exit_code == 1
    listed = [line for line in dry.output.splitlines() if "lie beyond |w| =" in line]
    assert [line.split("'")[1] for line in listed] == ["1.weight", "3.weight", "5.weight"], dry.output
    applied = cli("apply", spec, MLP, "--out", tmp_path / "run")
    assert applied.exit_code == 1 and all(line.strip() in applied.output for line in listed)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # it failed at rewrite time


def test_a_passing_dry_run_lists_matches_and_what_each_pass_leaves(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: compander\n"
                    "    targets: {exclude: ['5']}\n" + TRAIN)
    dry = cli("inspect", MLP, spec, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "2/3 matrices rewritten" in dry.output and "excluded by targets.exclude '5'" in dry.output
    assert cli("apply", spec, MLP, "--out", tmp_path / "run").exit_code == 0


def test_a_dry_run_tries_the_growth_it_will_do_and_leaves_the_model_alone():
    x = torch.randn(2, 1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # no hidden channels to widen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FxgrowError, match="no channel group can grow"):
        Pipeline([TemplateMixingPass(), GrowPass(at=0.5)]).dry_run(model, example_input=x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    growable = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    matches = Pipeline([TemplateMixingPass(), GrowPass(at=0.5)]).dry_run(growable, example_input=x)
    assert [m.layer for m in matches["passes.0"]] == ["1", "3"]
