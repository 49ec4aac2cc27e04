"""The CLI on the examples, and every bad-input case: one clear message, non-zero exit."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fxgrow.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples/models/mlp.py")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


COMPANDER = "model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: compander\n"


def test_schema_is_json_with_pass_kinds():
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "compander" in json.dumps(schema)


def test_inspect_shows_chains_cost_and_groups(tmp_path):
    result = run("inspect", MLP, write(tmp_path, COMPANDER))
    assert result.exit_code == 0, result.output
    assert "weight chains" in result.output and "compand" in result.output
    assert "forward FLOPs" in result.output


def test_inspect_plain_torchvision_reference():
    result = run("inspect", "torchvision.models:resnet18", "--input-shape", "1,3,32,32")
    assert result.exit_code == 0, result.output
    assert "11,689,512" in result.output  # resnet18's parameter count


def test_inspect_dry_run_lists_matches(tmp_path):
    result = run("inspect", MLP, write(tmp_path, COMPANDER), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "passes.0" in result.output and "Linear" in result.output
    assert "weight chains" not in result.output


def test_inspect_dot(tmp_path):
    out = tmp_path / "g.dot"
    result = run("inspect", MLP, write(tmp_path, COMPANDER), "--format", "dot", "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith('digraph "fxgrow"') and "palegreen" in text  # producers are coloured


UNTRACEABLE = """
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x

def build():
    return nn.Sequential(nn.Flatten(), Gate(), nn.Linear(64, 10))
"""


@pytest.mark.parametrize("case, spec_text, model, words", [
    ("malformed yaml", "passes: [kind: compander", MLP, "malformed YAML: line 1"),
    ("unknown kind", "passes:\n  - kind: prune_everything\n", MLP, "passes.0.kind: unknown pass kind"),
    ("unknown field", COMPANDER + "    colour: red\n", MLP, "passes.0.colour"),
    ("wrong type", COMPANDER + "    a: abc\n", MLP, "passes.0.a"),
    ("out of range", COMPANDER + "    b: -1\n", MLP, "passes.0.b: Input should be greater than 0"),
    ("targets match nothing", COMPANDER + "    targets: {types: [Conv2d]}\n", MLP,
     "passes.0.targets.types.0: no layer of type 'Conv2d'"),
    ("model missing", COMPANDER, "nope/model.py", "no such file"),
    ("model without build", COMPANDER, "EMPTY", "defines no 'build' or 'model'"),
    ("untraceable", COMPANDER, "UNTRACEABLE", "cannot trace module '1' (Gate)"),
    ("bad module reference", COMPANDER, "torchvision.models:nosuch", "defines no 'nosuch'"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, spec_text, model, words):
    if model == "EMPTY":
        model = write(tmp_path, "x = 1\n", "empty.py")
    elif model == "UNTRACEABLE":
        model = write(tmp_path, UNTRACEABLE, "gated.py")
    result = run("inspect", model, write(tmp_path, spec_text))
    assert result.exit_code == 2, result.output
    assert words in result.output, result.output
    assert "Traceback" not in result.output


def test_missing_spec_file(tmp_path):
    result = run("inspect", MLP, tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "spec file not found" in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "inspect", MLP, write(tmp_path, COMPANDER + "    b: -1\n"))
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "SpecError"


def test_apply_then_fold_reproduces_the_runs_folded_model(tmp_path):
    import torch
    spec = write(tmp_path, COMPANDER + "train: {data: digits, steps: 6, batch_size: 32, progress: none}\n")
    out = tmp_path / "run"
    result = run("apply", spec, MLP, "--out", out, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "seed: 3" in (out / "spec.yaml").read_text()
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and report["artifacts"]["folded"] == "folded.pt"
    first = torch.load(out / "folded.pt", weights_only=False)
    result = run("fold", out, "-o", tmp_path / "again.pt")  # the model reference comes from the run
    assert result.exit_code == 0, result.output
    again = torch.load(tmp_path / "again.pt", weights_only=False)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(first(x), again(x))
    assert not hasattr(again, "fxgrow")
    from examples.models.mlp import build
    build().load_state_dict(torch.load(tmp_path / "again_state_dict.pt"), strict=True)
    result = run("fold", out, "--shrink", "-o", tmp_path / "none.pt")  # nothing was filter-pruned
    assert result.exit_code == 1 and "no filter-pruned channel groups" in result.output
    result = run("inspect", out)  # a run folder shows the trained, rewritten model
    assert result.exit_code == 0, result.output
    assert "compand" in result.output


def test_fold_of_a_missing_run_is_a_clear_error(tmp_path):
    result = run("fold", tmp_path / "nothing")
    assert result.exit_code == 1 and "no checkpoint" in result.output


def test_svg_renders_with_graphviz_or_says_how_to_install_it(tmp_path, monkeypatch):
    import shutil
    target = tmp_path / "g.svg"
    result = run("inspect", MLP, write(tmp_path, COMPANDER), "--format", "svg", "-o", target)
    if shutil.which("dot"):
        assert result.exit_code == 0 and target.read_text().lstrip().startswith("<")
    else:
        assert result.exit_code == 1 and "apt-get install graphviz" in result.output


def test_error_messages_keep_their_brackets(tmp_path):
    result = run("inspect", MLP, write(tmp_path, "passes:\n  - kind: compander\n    targets: {names: ['[x]']}\n"))
    assert result.exit_code == 2 and "'[x]' matches no targetable layer" in result.output


def test_an_example_input_that_does_not_fit_is_one_clear_error():
    result = run("inspect", str(ROOT / "examples/models/small_cnn.py"), "--input-shape", "1,3,8,8")
    assert result.exit_code == 1, result.output
    assert "example input of shape [1, 3, 8, 8] does not fit" in result.output
    assert "Traceback" not in result.output


def test_fold_shrink_removes_filter_pruned_channels(tmp_path):
    import torch
    spec = write(tmp_path, "model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: prune_regrow\n"
                           "    granularity: filter\n    final_sparsity: 0.5\n    targets: {types: [Linear]}\n"
                           "    schedule: {start: 0, end: 4, every: 2}\n"
                           "train: {data: digits, steps: 6, batch_size: 32, progress: none}\n")
    out = tmp_path / "run"
    assert run("apply", spec, MLP, "--out", out).exit_code == 0
    result = run("fold", out, "--shrink", "-o", tmp_path / "small.pt")
    assert result.exit_code == 0, result.output
    full = torch.load(out / "folded.pt", weights_only=False)
    small = torch.load(tmp_path / "small.pt", weights_only=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(full)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(small(x), full(x), rtol=1e-5, atol=1e-5)
