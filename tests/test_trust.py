"""A run folder from elsewhere never makes fxgrow run code the user did not name.

The checkpoints below pass `weights_only` and their checksums (an attacker computes those
too): only the code they name is foreign. fold, eval, extract and inspect must refuse it,
naming the reference and how to allow it, and the code must not have run."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fxgrow import api
from fxgrow.errors import FxgrowError
from fxgrow.train.checkpoint import save_checkpoint

from tests.cli_runs import MLP, apply_run, cli

SPEC = ("model: {example_input: [1, 1, 8, 8]}\npasses:\n  - kind: sorted_slicing\n    width: {fractions: [0.5, 1.0]}\n"
        "train: {data: digits, steps: 2, batch_size: 32, progress: none}\n")


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    return apply_run(tmp_path_factory.mktemp("genuine"), SPEC)


def forge(genuine: Path, tmp_path: Path, model: dict | None = None, data: dict | None = None,
          signature: str = "none", ship: dict[str, str] | None = None) -> Path:
    """A copy of the genuine run whose checkpoint names other code: unsigned, with a made-up
    signature, or with the genuine run's signature (valid for the genuine code only);
    `ship` adds files to the folder."""
    run = tmp_path / "downloaded"
    shutil.copytree(genuine, run)
    for name, text in (ship or {}).items():
        (run / name).write_text(text)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    if model is not None:
        state["spec"]["model"].update(model)
    if data is not None:
        state["spec"]["train"]["data"] = data
    if signature == "none":
        state.pop("signature", None)
    elif signature == "made_up":
        state["signature"] = {"key": "0123abcd", "hmac": "00" * 32}
    save_checkpoint(run / "checkpoint.pt", state)
    return run


def touch(marker: Path) -> dict:
    return {"entry": "os:system", "kwargs": {"command": f"touch {marker}"}}


EVIL_PY = "from pathlib import Path\nPath({marker!r}).touch()\nfrom torch import nn\ndef build():\n    return nn.Linear(64, 10)\n"


def references(tmp_path: Path, marker: Path) -> dict[str, dict]:
    return {"os:system": touch(marker),
            "subprocess:run": {"entry": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
            "evil.py": {"entry": str(tmp_path / "downloaded" / "evil.py"), "kwargs": {}}}  # shipped in the run


@pytest.mark.parametrize("signature", ["none", "made_up", "genuine"])
@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "evil.py"])
@pytest.mark.parametrize("command", [("fold",), ("eval",), ("extract", "--width", "0.5"), ("inspect",)],
                         ids=["fold", "eval", "extract", "inspect"])
def test_foreign_model_code_is_refused_by_every_command(genuine, tmp_path, name, signature, command):
    marker = tmp_path / "code_ran"
    run = forge(genuine, tmp_path, model=references(tmp_path, marker)[name], signature=signature,
                ship={"evil.py": EVIL_PY.format(marker=str(marker))})
    result = cli(command[0], run, *command[1:])
    assert result.exit_code == 2, result.output
    assert not marker.exists(), "the run's code ran"
    assert name in result.output and "--trust-code" in result.output and "model.entry" in result.output
    assert "Traceback" not in result.output


def test_foreign_data_code_is_refused_even_with_model_given(genuine, tmp_path):
    marker = tmp_path / "code_ran"
    run = forge(genuine, tmp_path, data={"name": "python", **touch(marker)})
    result = cli("eval", run, MLP)  # the model is named; the run's data function is not
    assert result.exit_code == 2 and not marker.exists(), result.output
    assert "train.data" in result.output and "os:system" in result.output and "--trust-code" in result.output
    assert cli("fold", run, MLP, "-o", tmp_path / "f.pt").exit_code == 0  # fold never loads data


def test_the_users_own_runs_need_no_flag(genuine, tmp_path):
    result = cli("fold", genuine, "-o", tmp_path / "f.pt")
    assert result.exit_code == 0, result.output
    assert cli("inspect", genuine).exit_code == 0


def test_a_named_model_or_trust_code_allows_an_unsigned_run(genuine, tmp_path):
    run = forge(genuine, tmp_path)  # the genuine code, signature stripped (e.g. a colleague's run)
    refused = cli("fold", run, "-o", tmp_path / "a.pt")
    assert refused.exit_code == 2 and "carries no signature" in refused.output and MLP in refused.output
    assert cli("fold", run, MLP, "-o", tmp_path / "b.pt").exit_code == 0
    result = cli("fold", run, "--trust-code", "-o", tmp_path / "c.pt")
    assert result.exit_code == 0, result.output
    with pytest.raises(FxgrowError, match="carries no signature"):
        api.restore(run)
    api.restore(run, trust_code=True)


def test_another_users_key_does_not_count(genuine, tmp_path, monkeypatch):
    monkeypatch.setenv("FXGROW_CONFIG_DIR", str(tmp_path / "someone_else"))
    result = cli("fold", genuine, "-o", tmp_path / "f.pt")
    assert result.exit_code == 2 and "another user or machine" in result.output, result.output


def test_a_signed_relative_reference_does_not_follow_the_folder(genuine, tmp_path, monkeypatch):
    """Signed for ./model.py in one folder, the same run does not import another
    folder's model.py (a run shipped back with a file beside it)."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copy(MLP, home / "model.py")
    (home / "spec.yaml").write_text(SPEC)
    monkeypatch.chdir(home)
    assert cli("apply", "spec.yaml", "model.py", "--out", "run").exit_code == 0
    assert cli("fold", "run", "-o", tmp_path / "ok.pt").exit_code == 0
    marker = tmp_path / "code_ran"
    shutil.copytree(home / "run", elsewhere / "run")
    (elsewhere / "model.py").write_text(EVIL_PY.format(marker=str(marker)))
    monkeypatch.chdir(elsewhere)
    result = cli("fold", "run", "-o", tmp_path / "bad.pt")
    assert result.exit_code == 2 and not marker.exists(), result.output
    assert "does not match" in result.output


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="permissions: POSIX, not root")
def test_a_key_others_can_read_is_not_trusted(genuine, tmp_path):
    from fxgrow.trust import key_path
    key = key_path()
    mode = key.stat().st_mode
    try:
        key.chmod(0o644)
        result = cli("fold", genuine, "-o", tmp_path / "f.pt")
        assert result.exit_code == 2 and "readable by other users" in result.output
    finally:
        key.chmod(mode)
