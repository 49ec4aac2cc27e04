"""Run folders are never overwritten or mixed silently: a non-empty one needs --resume or
--overwrite (which clears it first, and only clears run folders), a lock keeps a second
process out, and temporary files left by killed writes are cleaned up."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_runs import MLP, ROOT, apply_run, cli

SPEC = ("model: {example_input: [1, 1, 8, 8]}\n"
        "train: {data: digits, steps: 2, batch_size: 32, progress: none}\n")


@pytest.fixture
def run(tmp_path) -> Path:
    return apply_run(tmp_path, SPEC)


def test_an_existing_run_is_not_overwritten(run):
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    result = cli("apply", run.parent / "spec.yaml", MLP, "--out", run)
    assert result.exit_code == 2, result.output
    assert "already holds" in result.output and "--resume" in result.output and "--overwrite" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_overwrite_clears_the_old_run_first(run):
    (run / "subnet_w0.5_d1.pt").write_bytes(b"stale")
    (run / "plots").mkdir()
    result = cli("apply", run.parent / "spec.yaml", MLP, "--out", run, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (run / "subnet_w0.5_d1.pt").exists() and not (run / "plots").exists()
    assert (run / "checkpoint.pt").is_file() and (run / "report.json").is_file()


def test_overwrite_clears_only_run_folders(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = cli("apply", tmp_path / "spec.yaml", MLP, "--out", mine, "--overwrite")
    assert result.exit_code == 2 and "not an fxgrow run folder" in result.output, result.output
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_second_process_is_kept_out(tmp_path):
    """Two applies into one folder at once: the second is refused while the first trains,
    and the first finishes untouched."""
    (tmp_path / "spec.yaml").write_text(SPEC.replace("steps: 2", "steps: 400"))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "fxgrow.cli.main", "apply", str(tmp_path / "spec.yaml"), MLP,
                              "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first run has its folder
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for extra in ([], ["--overwrite"], ["--resume", str(out)]):
            second = cli("apply", tmp_path / "spec.yaml", MLP, "--out", out, *extra)
            assert second.exit_code == 2, second.output
            assert "in use by another fxgrow process" in second.output and f"pid {first.pid}" in second.output
        assert first.wait(timeout=300) == 0, first.stdout.read().decode()
    finally:
        first.kill()
        first.wait()
    assert (out / "report.json").is_file()


def test_stale_temporary_files_are_removed(run):
    dead = run / ".checkpoint.pt.4194999.tmp"  # above the largest pid Linux hands out
    dead.write_bytes(b"torn")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = run / f".folded.pt.{sleeper.pid}.tmp"  # another process may be writing it
        alive.write_bytes(b"in progress")
        result = cli("apply", run.parent / "spec.yaml", MLP, "--resume", run)
        assert result.exit_code == 0, result.output
        assert not dead.exists() and alive.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_default_run_folders_of_the_same_second_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text("name: same\n" + SPEC)
    from fxgrow.train import loop

    class Frozen(loop.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(loop, "datetime", Frozen)
    assert cli("apply", "spec.yaml", MLP).exit_code == 0
    assert cli("apply", "spec.yaml", MLP).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["same-20260101-120000", "same-20260101-120000-2"]
