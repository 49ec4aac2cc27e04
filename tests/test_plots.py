"""`fxgrow plot RUN`: each figure is a valid PNG written exactly when the run holds its data.

Two real runs on digits (a few steps) prove the figures read what the passes log; hand-written
run folders in the passes' record formats cover each section alone and the edge cases."""
import builtins
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fxgrow import api
from fxgrow.cli.main import app
from fxgrow.errors import FxgrowError
from fxgrow.plots import accuracy_at_flops, load_run, plot_run, prune_schedule
from fxgrow.specs.root import parse_spec

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SMALL_CNN = str(ROOT / "examples/models/small_cnn.py")
PNG = b"\x89PNG\r\n\x1a\n"
Q = [100, 93, 84, 69, 50, 31, 16, 7, 0]


def assert_pngs(written: dict[str, Path], expected: set[str]) -> None:
    assert set(written) == expected
    for name, path in written.items():
        assert path.name == f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1000, path
    assert {p.name for p in next(iter(written.values())).parent.iterdir()} == {f"{n}.png" for n in expected}


# --- run folders written by hand, in the formats the loop and the passes log ----------------

def train(step, loss, acc):
    return {"step": step, "epoch": 0, "split": "train", "loss": loss, "accuracy": acc, "lr": 0.05,
            "samples_per_s": 1000.0}


def evaluation(step, loss, acc):
    return {"step": step, "epoch": 0, "split": "test", "loss": loss, "accuracy": acc}


def prune(step, target, layers):
    total = sum(layers.values()) / len(layers)
    return {"step": step, "epoch": 0, "prune_regrow/target_sparsity": target, "prune_regrow/actual_sparsity": total,
            "prune_regrow/weight_sparsity": total, "prune_regrow/layers": layers,
            "prune_regrow/regrow_fraction": 0.4, "prune_regrow/pruned": 10, "prune_regrow/dropped": 4,
            "prune_regrow/moved": 3}


def compander(step, spread):
    pct = [spread * (q - 50) / 50 for q in Q]
    return {"step": step, "epoch": 0, "compander": {"percentiles": {
        "q": Q, "0.weight": {"w": pct, "v": [1.2 * p for p in pct]},
        "fc.weight": {"w": [p / 2 for p in pct], "v": [p / 1.8 for p in pct]}}}}


def grow(step):
    return {"step": step, "epoch": 1, "split": "grow", "factor": 2, "sources": 1, "params_before": 100,
            "params_after": 400, "widths": [[8, 16]]}


def flops(step, total, **summary):
    return {"step": step, "epoch": 1, "split": "flops", "train_flops": total, "forward_flops_per_sample": 10.0,
            **summary}


CURVES = [train(5, 2.2, 0.2), train(10, 1.9, 0.4), evaluation(10, 1.8, 0.45), train(15, 1.5, 0.6),
          evaluation(20, 1.2, 0.7)]
GRID = [{"width": w, "depth": d, "loss": 1.0, "accuracy": 0.5 + w / 4 + d / 10, "params": 10, "flops": 20,
         "share": (0.5 + w / 4 + d / 10) / 0.95} for w in (0.25, 0.5, 1.0) for d in (1, 2)]

CASES = {
    "curves only": (CURVES, None, {"curves"}),
    "prune_regrow": (CURVES + [prune(4, 0.3, {"a.weight": 0.2, "b.weight": 0.4}),
                               prune(8, 0.6, {"a.weight": 0.5, "b.weight": 0.7})], None, {"curves", "sparsity"}),
    "prune_regrow, filter granularity": (
        CURVES + [{**prune(4, 0.5, {"a.weight": 0.45}), "prune_regrow/channels": {"0": 0.5}}], None,
        {"curves", "sparsity"}),
    "compander": (CURVES + [compander(0, 0.3), compander(10, 0.4), compander(20, 0.5)], None,
                  {"curves", "percentiles"}),
    "growth and FLOPs": (CURVES + [flops(10, 1e6), grow(10), flops(20, 5e6), flops(20, 5e6, flops_norm=0.6)],
                         None, {"curves", "flops"}),
    "sorted_slicing grid": (CURVES, {"sorted_slicing": {"mode": "sandwich", "bn": "recalibrate", "grid": GRID}},
                            {"curves", "submodels"}),
    "list grid (blank cells)": (CURVES, {"sorted_slicing": {"mode": "stochastic", "bn": "recalibrate",
                                                            "grid": GRID[::3]}}, {"curves", "submodels"}),
    "empty grid": (CURVES, {"sorted_slicing": {"mode": "sandwich", "bn": "none", "grid": []}}, {"curves"}),
    "everything": (CURVES + [prune(4, 0.3, {"a.weight": 0.3}), compander(0, 0.3), grow(10), flops(20, 5e6)],
                   {"accuracy": 0.7, "sorted_slicing": {"mode": "sandwich", "bn": "none", "grid": GRID}},
                   {"curves", "flops", "sparsity", "percentiles", "submodels"}),
}


def write_run(folder: Path, records: list[dict], report: dict | None = None, spec: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    if spec is not None:
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_figure_written_exactly_when_its_data_is_present(tmp_path, case):
    records, report, expected = CASES[case]
    run = write_run(tmp_path / "run", records, report)
    assert_pngs(plot_run(run), expected)


def test_no_records_no_figures(tmp_path):
    assert plot_run(write_run(tmp_path / "run", [])) == {}


def test_flops_one_record_per_step_and_accuracy_only_where_both_logged(tmp_path):
    run = load_run(write_run(tmp_path / "run", CURVES + [flops(10, 1e6), flops(15, 3e6), flops(20, 5e6),
                                                          flops(20, 5e6, flops_norm=0.6)]))
    assert [r["step"] for r in run.flops] == [10, 15, 20]
    assert run.flops[-1]["flops_norm"] == 0.6  # the train-end record wins over the epoch-end one
    assert accuracy_at_flops(run) == [(1e6, 0.45), (5e6, 0.7)]


def test_growth_point_from_report_when_metrics_lack_it(tmp_path):
    report = {"grow": {"grown": True, "step": 12, "factor": 3, "growth_step": 12}}
    assert load_run(write_run(tmp_path / "a", CURVES, report)).growth_steps == [(12, 3)]
    assert load_run(write_run(tmp_path / "b", CURVES + [grow(10)], report)).growth_steps == [(10, 2)]
    assert load_run(write_run(tmp_path / "c", CURVES, {"grow": {"grown": False, "step": None}})).growth_steps == []


def test_partial_last_line_is_a_run_still_writing_a_bad_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", CURVES)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "epoch": 0, "spl')
    assert [r["step"] for r in load_run(run).train] == [5, 10, 15]
    (run / "metrics.jsonl").write_text(json.dumps(CURVES[0]) + "\n{oops\n" + json.dumps(CURVES[1]) + "\n")
    with pytest.raises(FxgrowError, match=r"metrics.jsonl:2"):
        load_run(run)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FxgrowError, match="no metrics.jsonl"):
        plot_run(tmp_path)


# --- real runs on digits ------------------------------------------------------------------

def _run(folder: Path, passes: list[dict]) -> Path:
    spec = parse_spec({
        "version": 1, "name": folder.name, "model": {"example_input": [1, 1, 8, 8], "kwargs": {"width": 4}},
        "passes": passes,
        "train": {"data": "digits", "batch_size": 32, "steps": 12, "eval_every_steps": 4, "log_every_steps": 2,
                  "progress": "none", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                     "weight_decay": 5e-4}}})
    api.run(spec, SMALL_CNN, out_dir=folder)
    return folder


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory) -> Path:
    """Template mixing, compander on the mixed weights, growth x2 at step 6."""
    return _run(tmp_path_factory.mktemp("plots") / "grown", [
        {"kind": "template_mixing", "templates": 2, "share": "pairs", "template_init": "preserve"},
        {"kind": "compander"},
        {"kind": "grow", "factor": 2, "at": {"step": 6}}])


@pytest.fixture(scope="module")
def sparse_sliced_run(tmp_path_factory) -> Path:
    """GraNet masks under sorted slicing (two widths)."""
    return _run(tmp_path_factory.mktemp("plots") / "sparse_sliced", [
        {"kind": "prune_regrow", "preset": "granet", "final_sparsity": 0.8,
         "schedule": {"start": 0, "end": 8, "every": 2}},
        {"kind": "sorted_slicing", "width": {"fractions": [0.5, 1.0]}}])


def test_real_grown_run(grown_run, tmp_path):
    assert_pngs(plot_run(grown_run, tmp_path / "figs"), {"curves", "flops", "percentiles"})
    run, report = load_run(grown_run), json.loads((grown_run / "report.json").read_text())
    assert run.growth_steps == [(report["grow"]["step"], 2)] and report["grow"]["step"] == 6
    assert [r["step"] for r in run.compander] == [0, 4, 8, 12]
    assert accuracy_at_flops(run) == [(report["template_mixing"]["train_flops"], report["accuracy"])]


def test_real_sparse_sliced_run(sparse_sliced_run, tmp_path):
    assert_pngs(plot_run(sparse_sliced_run, tmp_path / "figs"), {"curves", "sparsity", "submodels"})


def test_schedule_from_the_run_spec_is_the_one_the_events_applied(sparse_sliced_run):
    run = load_run(sparse_sliced_run)
    steps, targets = prune_schedule(run)
    assert steps == list(range(13)) and targets[0] == 0.0 and targets[8] == pytest.approx(0.8)
    assert [r["step"] for r in run.prune] == [2, 4, 6, 8, 10]  # regrowth continues after the end
    for event in run.prune:
        assert targets[event["step"]] == event["target_sparsity"]
    (sparse_sliced_run / "spec.yaml").rename(sparse_sliced_run / "spec.yaml.bak")
    try:  # without the spec the events' own targets are all there is
        assert prune_schedule(load_run(sparse_sliced_run)) is None
    finally:
        (sparse_sliced_run / "spec.yaml.bak").rename(sparse_sliced_run / "spec.yaml")


# --- the command --------------------------------------------------------------------------

runner = CliRunner()


def test_cli_lists_the_files_it_wrote(tmp_path):
    run = write_run(tmp_path / "run", *CASES["everything"][:2])
    result = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    for name in CASES["everything"][2]:
        assert f"{name}.png" in result.output
        assert (tmp_path / "figs" / f"{name}.png").read_bytes()[:8] == PNG
    default = runner.invoke(app, ["plot", str(run)])
    assert default.exit_code == 0 and (run / "plots" / "curves.png").is_file()


def test_cli_not_a_run(tmp_path):
    result = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no metrics.jsonl" in result.output


def test_cli_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = write_run(tmp_path / "run", CURVES)
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 1
    assert "pip install 'fxgrow[plot]'" in result.output
    assert not (run / "plots").exists()


def test_heatmap_of_grid_rows_alone(tmp_path):
    # what `fxgrow eval --grid --plot` draws from evaluate_grid's rows
    from fxgrow.plots import write_submodel_heatmap
    path = write_submodel_heatmap([{k: v for k, v in r.items() if k != "share"} for r in GRID], tmp_path / "g.png")
    assert path.read_bytes()[:8] == PNG
