"""examples/all_passes.yaml at a small size, end to end on CPU: template mixing, compander,
prune/regrow and sorted slicing on one residual CNN that grows mid-run; then the folded
full model and an extracted sub-model, through the CLI, checked against the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fxgrow import api
from fxgrow.cli.main import app
from fxgrow.ir import META
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import data_evaluator, find_state, subnet
from fxgrow.train.data import load_data
from fxgrow.train.checkpoint import load_checkpoint
from tests.test_grow_train import Stop, trainer
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "resnet_cifar.py"
WIDTH, STEPS, GROW_AT, CHECKPOINT = 4, 20, 8, 10


def small_spec():
    """The example with few steps, width 4 and a 2 x 2 grid; everything else as written."""
    d = yaml.safe_load((ROOT / "examples" / "all_passes.yaml").read_text())
    d["model"] = {**d["model"], "entry": str(MODEL), "kwargs": {"width": WIDTH, "in_channels": 1}}
    prune, slicing, grow = (next(p for p in d["passes"] if p["kind"] == k)
                            for k in ("prune_regrow", "sorted_slicing", "grow"))
    prune["schedule"] = {"start": 0, "end": 16, "every": 4}
    slicing["width"]["fractions"] = [0.5, 1.0]
    slicing["recalibrate_batches"] = 2
    grow["at"] = {"step": GROW_AT}
    train = {k: v for k, v in d["train"].items() if k != "epochs"}
    d["train"] = {**train, "steps": STEPS, "progress": "none", "checkpoint_every_steps": CHECKPOINT}
    return parse_spec(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("all_passes")
    report = api.run(small_spec(), out_dir=out)
    return out, report


def test_the_report_has_every_section(run):
    out, report = run
    for section in ("template_mixing", "compander", "prune_regrow", "sorted_slicing", "grow"):
        assert report.get(section), section
    assert report["grow"]["grown"] and report["grow"]["step"] == GROW_AT
    assert report["prune_regrow"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert len(report["sorted_slicing"]["grid"]) == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (relayout,) = [r for r in metrics if "prune_regrow/relayout_target_sparsity" in r]
    assert relayout["step"] == GROW_AT
    assert relayout["prune_regrow/actual_sparsity"] == pytest.approx(relayout["prune_regrow/relayout_target_sparsity"],
                                                                     abs=1e-4)


def test_the_grown_model_is_g_times_wider(run):
    out, report = run
    _, gm = api.restore(out)
    widths = {w["group"]: w for w in report["grow"]["widths"]}
    assert all(w["after"] == 2 * w["before"] for w in widths.values())
    assert gm.get_submodule("conv1").out_channels == 2 * WIDTH
    assert gm.get_submodule("fc").in_features == 2 * 8 * WIDTH
    state = find_state(gm)
    assert sorted(state.full.values()) == sorted(w["after"] for w in widths.values())


def test_the_folded_model_is_the_trained_model_as_plain_modules(run):
    out, _ = run
    spec, gm = api.restore(out)
    x = torch.randn(8, 1, 8, 8)
    folded = torch.load(out / "folded.pt", weights_only=False).eval()
    assert not any(name.startswith(META) for name, _ in folded.named_modules())
    torch.testing.assert_close(folded(x), gm(x), rtol=1e-5, atol=1e-5)
    plain = api.load_model(str(MODEL), {"width": 2 * WIDTH, "in_channels": 1}).eval()  # the grown shapes
    plain.load_state_dict(torch.load(out / "folded_state_dict.pt"))
    torch.testing.assert_close(plain(x), gm(x), rtol=1e-5, atol=1e-5)
    result = CliRunner().invoke(app, ["fold", str(out), "-o", str(out / "refolded.pt")])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(torch.load(out / "refolded.pt", weights_only=False).eval()(x), gm(x),
                               rtol=1e-5, atol=1e-5)


def test_the_extracted_sub_model_matches_the_sliced_one_and_the_grid(run):
    out, report = run
    width, depth = 0.5, 3
    result = CliRunner().invoke(app, ["extract", str(out), "--width", str(width), "--depth", str(depth)])
    assert result.exit_code == 0, result.output
    small = torch.load(out / f"subnet_w{width:g}_d{depth}.pt", weights_only=False).eval()
    spec, gm = api.restore(out)
    x = torch.randn(8, 1, 8, 8)
    with subnet(gm, width, depth):
        torch.testing.assert_close(small(x), gm(x), rtol=1e-5, atol=1e-5)
    data = load_data(spec.train.data)
    accuracy = data_evaluator(data, spec.train.batch_size, torch.device("cpu"))(small)["accuracy"]
    (row,) = [r for r in report["sorted_slicing"]["grid"] if (r["width"], r["depth"]) == (width, depth)]
    assert accuracy == pytest.approx(row["accuracy"], abs=1e-9)
    assert sum(p.numel() for p in small.parameters()) == row["params"]


def test_resume_after_growth_continues_exactly(run, tmp_path):
    """Cut after the step-10 checkpoint (growth was at step 8), resume: the same final
    weights, masks, statistics, accuracy and sub-model grid as the uninterrupted run."""
    out, report = run
    spec = small_spec()
    with pytest.raises(KeyboardInterrupt):
        trainer(spec, tmp_path, extra=[Stop(CHECKPOINT + 1)]).fit()
    resumed = trainer(spec, tmp_path, resume=tmp_path)
    again = resumed.fit()
    expected, got = load_checkpoint(out / "checkpoint.pt")["model"], resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert again["accuracy"] == report["accuracy"]
    assert again["sorted_slicing"]["grid"] == report["sorted_slicing"]["grid"]
    assert again["prune_regrow"]["moved"] == report["prune_regrow"]["moved"]
