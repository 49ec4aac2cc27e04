"""`fxgrow eval --grid` and `fxgrow extract` on a real (short) sorted-slicing run, and the
example specs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fxgrow import api
from fxgrow.cli.main import app
from fxgrow.specs.root import load_spec, parse_spec
from fxgrow.subnets import find_state, subnet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sorted_run")
    spec = parse_spec({
        "name": "sorted_cli",
        "model": {"entry": str(ROOT / "tests/zoo.py:ResNetTiny"), "kwargs": {"c": 8, "in_ch": 1},
                  "example_input": [2, 1, 8, 8]},
        "passes": [{"kind": "sorted_slicing", "width": {"fractions": [0.5, 1.0]}, "depth": {"blocks": [1, 3]},
                    "recalibrate_batches": 3}],
        "train": {"data": "digits", "steps": 6, "batch_size": 64, "progress": "none"},
    })
    api.run(spec, out_dir=out)
    return out


def test_eval_grid_prints_every_sub_model_and_a_heatmap(run):
    result = CliRunner().invoke(app, ["eval", str(run), "--grid", "--plot", str(run / "heat.png")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    assert [c[:2] for c in cells] == [["0.5", "1"], ["0.5", "3"], ["1", "1"], ["1", "3"]]
    assert cells[-1][3] == "1.000" and all(0 <= float(c[2]) <= 1 for c in cells)
    if (run / "heat.png").exists():  # with the plot extra
        assert (run / "heat.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run / "report.json").read_text())
    assert [(r["width"], r["depth"]) for r in report["sorted_slicing"]["grid"]] == [(0.5, 1), (0.5, 3), (1.0, 1), (1.0, 3)]


def test_extract_writes_a_smaller_plain_model_equal_to_the_sub_model(run):
    result = CliRunner().invoke(app, ["extract", str(run), "--width", "0.5", "--depth", "1", "--no-recalibrate"])
    assert result.exit_code == 0, result.output
    small = torch.load(run / "subnet_w0.5_d1.pt", weights_only=False)
    state = torch.load(run / "subnet_w0.5_d1_state_dict.pt")
    assert not any("fxgrow" in k for k in state) and state["conv1.weight"].shape == (4, 1, 3, 3)
    assert not any(k.startswith("layer1.1.") for k in state)
    _, gm = api.restore(run)
    x = torch.randn(5, 1, 8, 8)
    with subnet(gm, 0.5, 1):
        assert (small(x) - gm(x)).abs().max() <= 1e-5
    assert find_state(gm).point == (1.0, 3)


def test_extract_of_a_point_outside_the_grid_says_which_exist(run):
    result = CliRunner().invoke(app, ["extract", str(run), "--width", "0.75"])
    assert result.exit_code == 1
    assert "not a grid point; the grid holds: (width 0.5, depth 1), (width 0.5, depth 3)" in " ".join(result.output.split())


def test_fold_of_a_sliced_run_is_the_plain_largest_model(run):
    folded = torch.load(run / "folded.pt", weights_only=False)
    _, gm = api.restore(run)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(folded(x), gm(x), atol=1e-5, rtol=0)
    assert not any("fxgrow" in k for k in folded.state_dict())


@pytest.mark.parametrize("name,model,points", [("sorted_resnet_digits", "examples/models/resnet_cifar.py", 8),
                                               ("sorted_mlp_digits", "examples/models/mlp.py", 4)])
def test_example_specs_rewrite_their_models(name, model, points):
    spec = load_spec(ROOT / "examples" / f"{name}.yaml")
    result = api.compile_spec(spec, api.build_model(spec, str(ROOT / model)))
    assert len(find_state(result.graph_module).points) == points
