"""experiments/run.py: every arm of every study is a valid spec at both sizes; a study runs
end to end through the runner at a tiny size and writes its table."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from fxgrow.api import spec_dump
from fxgrow.specs.root import parse_spec

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_run", ROOT / "experiments" / "run.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


@pytest.mark.parametrize("study", runner.STUDIES)
def test_every_arm_is_a_valid_spec_at_every_size(study, tmp_path):
    sizes = runner.load_study(study)["sizes"]
    assert {"cpu", "gpu"} <= set(sizes)
    for size in sizes:
        runner.run_study(study, size, [0], tmp_path, dry_run=True)  # raises SpecError on a bad arm


def test_unknown_size_names_the_study_and_its_sizes(tmp_path):
    with pytest.raises(SystemExit, match=r"study 'sorted' has no size 'huge' \(sizes: cpu, "):
        runner.run_study("sorted", "huge", [0], tmp_path, dry_run=True)


def test_pass_overlays_are_keyed_by_kind():
    spec = {"passes": [{"kind": "template_mixing"}, {"kind": "grow", "at": {"epoch": 8}, "factor": 2}],
            "train": {"epochs": 16, "data": "digits"}}
    merged = runner.deep_merge(spec, {"passes": {"grow": {"at": {"epoch": 15}}}, "train": {"epochs": 30}})
    assert merged["passes"] == [{"kind": "template_mixing"}, {"kind": "grow", "at": {"epoch": 15}, "factor": 2}]
    assert merged["train"] == {"epochs": 30, "data": "digits"}
    assert spec["passes"][1]["at"] == {"epoch": 8}  # the input is not changed


def _read(out: Path, study: str) -> dict:
    record = json.loads((out / f"{study}_cpu.json").read_text())
    assert (out / f"{study}_cpu.md").read_text().count("\n|") == len(record["rows"]) + 2  # header, rule, rows
    return record


@pytest.mark.slow
def test_growth_study_runs_through_the_runner(tmp_path):
    # 5 epochs, growth after 4 (lr restart over 1), the equal-FLOPs targets a few steps:
    # every arm, the fused ones reading the helper run's folder
    tiny = {"train": {"epochs": 5, "checkpoint": True}, "passes": {"grow": {"at": {"epoch": 4}}}}
    arms = [a["name"] for a in runner.load_study("growth")["arms"] if a["name"] not in ("target_045", "target_070")]
    runner.run_study("growth", "cpu", [0], tmp_path, overrides=tiny, arms=arms)
    record = _read(tmp_path, "growth")
    assert [row["arm"] for row in record["rows"]] == [
        "small", "target_scratch", "grow_fused", "grow_fused_random", "grow_fused_lr_authors", "grow_alone"]
    for row in record["rows"]:
        assert set(record["columns"]) <= set(row) and len(row["accuracy"]) == 1
    norms = {row["arm"]: float(row["flops_norm"]) for row in record["rows"]}
    every = {row["arm"]: float(row["flops_norm_all"]) for row in record["rows"]}
    assert norms["target_scratch"] == pytest.approx(1.0)
    # the paper's count: net 2 and the grown net; net 1, given, is not counted
    assert norms["grow_alone"] < norms["grow_fused"] < 1.0
    assert norms["grow_fused"] == pytest.approx(norms["grow_fused_random"])
    # net 1 (counted in flops_norm_all only) trains the 4 epochs before growth, net 2 all 5 here
    net1, net2 = every["grow_alone"] - norms["grow_alone"], norms["grow_fused"] - norms["grow_alone"]
    assert net1 == pytest.approx(0.8 * net2, rel=0.02), (norms, every)
    assert every["grow_fused"] > norms["grow_fused"] and every["small"] == norms["small"]
    # the equal-FLOPs targets train for steps, not epochs
    runner.run_study("growth", "cpu", [0], tmp_path / "steps", overrides={"train": {"epochs": None, "steps": 4}},
                     arms=["target_045", "target_070"])


@pytest.mark.slow
def test_sorted_study_table_has_one_row_per_grid_point(tmp_path):
    runner.run_study("sorted", "cpu", [0], tmp_path, overrides={"train": {"epochs": 1}})
    record = _read(tmp_path, "sorted")
    assert [(r["width"], r["depth"]) for r in record["rows"]] == [
        (w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (3, 5)]
    alone = {r["alone arm"] for r in record["rows"] if r["alone arm"]}
    assert alone == {"alone_w1.0_d5", "alone_w0.5_d5", "alone_w0.25_d5", "alone_w0.5_d3"}
    for row in record["rows"]:  # the models trained alone are exactly the sub-models' shapes
        if row["alone arm"]:
            assert row["alone params"] == row["params"], row


def test_recorded_command_names_every_option_that_shaped_the_table():
    line = runner.command_line("pruning", "cpu", [0, 1], Path("runs/x"), reuse=True, arms=["dense", "rigl_90"],
                               overrides={"train": {"epochs": 2}})
    assert line == ("python experiments/run.py pruning --size cpu --seeds 0 1 --out runs/x "
                    "--arms dense rigl_90 --set '{train: {epochs: 2}}' --reuse")
    assert runner.command_line("sorted", "gpu", [0], Path("o")) == "python experiments/run.py sorted --size gpu --seeds 0 --out o"


@pytest.mark.parametrize("study, size, arm, path, expected", [
    ("growth", "cpu_fmnist", "target_045", "train.steps", 353),  # `set` says 149 for every size
    ("growth", "cpu_fmnist", "target_045", "model.kwargs.width", 0.5),  # the study's size says 0.25
    ("growth", "cpu_fmnist", "grow_alone", "train.epochs", 12),  # the study's size says 10
    ("growth", "cpu_fmnist", "net2", "train.epochs", 10),
    ("growth", "cpu", "net2", "train.epochs", 15),
    ("sorted", "gpu", "alone_w0.5_d5", "model.kwargs.width", 32),  # `set` says 8
    ("sorted", "cpu", "alone_w0.5_d5", "model.kwargs.width", 8),
    ("pruning", "gpu", "granet_d2s_98", "passes.0.final_sparsity", 0.98),
])
def test_the_arms_size_overlay_wins_over_its_set(study, size, arm, path, expected):
    record = runner.load_study(study)
    spec = runner.arm_spec(record, next(a for a in record["arms"] if a["name"] == arm), size, 0, {})
    value = spec
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    assert value == expected


def test_reuse_skips_a_run_whose_input_run_is_newer(tmp_path):
    study = runner.load_study("growth")
    runs = {"net2": str(tmp_path / "net2")}
    fused = next(a for a in study["arms"] if a["name"] == "grow_fused")
    raw = runner.arm_spec(study, fused, "cpu", 0, runs)
    assert runner.strings(raw) & set(runs.values()) == {runs["net2"]}  # how run_study finds the inputs
    spec = parse_spec(raw)
    run_dir, net2 = tmp_path / "fused", tmp_path / "net2"
    for folder in (run_dir, net2):
        folder.mkdir()
        (folder / "report.json").write_text('{"accuracy": 0.5}')
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec_dump(spec)))
    os.utime(net2 / "report.json", (1000, 1000))
    assert runner.finished_run(run_dir, spec, [net2]) == {"accuracy": 0.5}
    os.utime(net2 / "report.json")  # net2 trained again after the fused run: fuse again
    assert runner.finished_run(run_dir, spec, [net2]) is None
    assert runner.finished_run(run_dir, spec) == {"accuracy": 0.5}


def test_sorted_lm_study_runs_on_other_text(tmp_path):
    """The transformer SortedNet study through the runner on text written here (CI has no
    python3.11-doc), 3 steps a run: one row per (depth, FFN) shape, every sorted sub-model
    with the parameter count of the same shape trained alone (depth = the first k layers,
    width = the FFN alone)."""
    from tests.test_text import write_docs

    write_docs(tmp_path / "t", count=12, words=200)
    data = {"files": str(tmp_path / "t" / "*.txt"), "tokenizer": "byte", "max_tokens": None,
            "max_test_tokens": 1024, "test_fraction": 0.2}
    runner.run_study("sorted_lm", "cpu", [0], tmp_path / "out",
                     overrides={"train": {"steps": 3, "batch_size": 2, "data": data}})
    record = _read(tmp_path / "out", "sorted_lm")
    rows = {(r["depth"], r["ffn"], r["heads"]): r for r in record["rows"]}
    assert sorted(rows) == sorted((d, f, h) for d in (2, 3, 4) for f, h in ((0.5, 1.0), (1.0, 0.5), (1.0, 1.0)))
    for (depth, ffn, heads), row in rows.items():
        assert row["alone arm"] == (f"alone_d{depth}_h{heads}" if heads < 1 else f"alone_d{depth}_f{ffn}")
        arms = [a for a, sliced in (("sorted_3x2", ffn), ("sorted_3x2_all", ffn), ("sorted_heads_3x2", heads),
                                    ("sorted_heads_3x2_all", heads)) if sliced < 1 or (ffn == 1 and heads == 1)]
        if ffn < 1:
            assert row["perplexity sorted_heads_3x2"] == row["perplexity sorted_heads_3x2_all"] == []  # heads only
        if heads < 1:
            assert row["perplexity sorted_3x2"] == row["perplexity sorted_3x2_all"] == []
        for arm in arms:
            assert len(row["perplexity alone"]) == len(row[f"perplexity {arm}"]) == 1
            assert row[f"params ({arm})"] == row["params (alone)"], row
            assert float(row[f"{arm} / alone"]) == pytest.approx(
                row[f"perplexity {arm}"][0] / row["perplexity alone"][0], abs=1e-3)


def test_sorted_lm_table_compares_only_equal_shapes():
    study = {"study": "sorted_lm"}
    arms = [{"name": "a", "shape": {"depth": 2, "ffn": 0.5}}, {"name": "s", "sorted": True, "blocks_per_layer": 2}]
    grid = [{"depth": 4, "width": 0.5, "perplexity": 60.0, "params": 100}]
    results = {"a": [{"perplexity": 40.0, "parameters": 120}], "s": [{"sorted_slicing": {"grid": grid}}]}
    (row,) = runner.sorted_lm_rows(study, arms, results)["rows"]
    assert (row["depth"], row["ffn"], row["heads"]) == (2, 0.5, 1.0)  # 4 residual branches = 2 layers
    assert row["s / alone"] == "not the same shape (100 vs 120 params)"
    grid[0]["params"] = 120
    assert runner.sorted_lm_rows(study, arms, results)["rows"][0]["s / alone"] == "1.500"


def test_the_heads_alone_model_is_the_heads_sliced_sub_model():
    """sorted_lm's alone arm for heads 0.5 (tiny_lm with 2 heads of head_dim 16, hidden 64) is
    the shape the heads-sliced 4-head model extracts to: its state_dict loads strictly and
    computes the sliced sub-model's logits."""
    import torch

    from examples.models.tiny_lm import build
    from fxgrow.passes import Pipeline
    from fxgrow.passes.sorted_slicing import SortedSlicingPass
    from fxgrow.subnets import extract, subnet

    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 16))
    gm = Pipeline([SortedSlicingPass(heads={"fractions": [0.5, 1.0]}, depth={"blocks": [1, 2], "by": "layers"})])(
        build(vocab_size=64, block_size=16, dim=32, heads=4, layers=2), x).graph_module.eval()
    with subnet(gm, heads=0.5, depth=1):
        want = gm(x)
    alone = build(vocab_size=64, block_size=16, dim=32, heads=2, layers=1, head_dim=8).eval()
    alone.load_state_dict(extract(gm, heads=0.5, depth=1).state_dict(), strict=True)
    assert torch.equal(alone(x), want)
    with pytest.raises(ValueError, match="give head_dim"):
        build(dim=30, heads=4)
