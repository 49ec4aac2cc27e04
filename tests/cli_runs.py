"""Short real runs made through the CLI, for tests that damage or forge run folders."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fxgrow.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples/models/mlp.py")
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def apply_run(base: Path, spec_text: str, model: str = MLP) -> Path:
    """`fxgrow apply` of `spec_text` (written to base/spec.yaml) into base/run."""
    (base / "spec.yaml").write_text(spec_text)
    result = cli("apply", base / "spec.yaml", model, "--out", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run"
