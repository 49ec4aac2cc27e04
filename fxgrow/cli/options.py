"""What several commands share: option help texts and the checks their values get before
any work starts."""
from __future__ import annotations

from pathlib import Path

from ..errors import FxgrowError

TRUST_CODE_HELP = ("Import the model and data code the run's spec names although your fxgrow did not sign "
                   "the run (a run from elsewhere: read RUN/spec.yaml first).")


def output_file(path: Path | None, option: str) -> Path | None:
    """`path` if a file can be written there: its folder exists and it is not a folder."""
    if path is None:
        return None
    if path.is_dir():
        raise FxgrowError(f"{option} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise FxgrowError(f"{option} {path}: no such folder {path.parent}")
    return path


def write_text(path: Path, text: str) -> None:
    from ..train.checkpoint import atomic_write
    atomic_write(path, lambda f: f.write(text.encode()))
