"""The run folder's life: who may write it, what a new run may replace, what a killed
one leaves behind.

- A run folder is written by one process at a time: rank 0 holds an exclusive lock on
  `.fxgrow.lock` (`fcntl.flock`, released by the kernel when the process dies, so a killed
  run never leaves a stale lock) for as long as it trains.
- A new run starts only in an empty folder; `--resume` continues the run there and
  `--overwrite` clears it first, and clears only what looks like a run folder.
- Files are written atomically through `.<name>.<pid>.tmp` siblings; those a killed
  process left are removed when a run starts there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path

from ..errors import FxgrowError

LOCK = ".fxgrow.lock"
_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # checkpoint.atomic_write's temporary files


class RunFolderError(FxgrowError):
    """The run folder is in use, or holds another run."""

    exit_code = 2


def is_run_folder(path: Path) -> bool:
    return (path / LOCK).is_file() or ((path / "spec.yaml").is_file() and any(
        (path / name).is_file() for name in ("checkpoint.pt", "metrics.jsonl", "report.json")))


def check_free(path: Path, overwrite: bool) -> None:
    """Refuse a folder a new run may not start in: one holding anything, unless
    `overwrite` (then it must be a run folder: --overwrite never clears other folders)."""
    if not path.is_dir():
        if path.exists():
            raise RunFolderError(f"{path} is a file, not a folder for a run")
        return
    check_unlocked(path)
    _check_contents(path, overwrite)


def check_unlocked(path: Path) -> None:
    """Refuse a folder another fxgrow process is training in."""
    holder = _holder(path) if path.is_dir() else None
    if holder is not None:
        raise _in_use(path, holder)


def _check_contents(path: Path, overwrite: bool) -> None:
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK and not _TMP.match(p.name))
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        what = "a run" if is_run_folder(path) else "files"
        raise RunFolderError(f"{path} already holds {what} ({shown}): continue it with --resume {path}, "
                             "replace it with --overwrite, or choose another --out")
    if not is_run_folder(path):
        raise RunFolderError(f"{path} is not an fxgrow run folder (no spec.yaml with a checkpoint, metrics or "
                             "report): --overwrite clears run folders only; choose another --out")


class RunFolder:
    """This process's claim on a run folder: locked, checked, cleared, tidied."""

    def __init__(self, path: Path, resume: bool, overwrite: bool):
        self.path = path
        if not resume:
            check_free(path, overwrite)  # before touching anything
        path.mkdir(parents=True, exist_ok=True)
        self._fd = _lock(path)
        try:
            if not resume:
                _check_contents(path, overwrite)  # again, now that no other process can write here
                if overwrite:
                    for p in path.iterdir():
                        if p.name != LOCK:
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            remove_stale_temporaries(path)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _lock(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process per folder is then up to the user
        return None
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        raise _in_use(path, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _holder(path: Path) -> str | None:
    """Who holds `path`'s lock now (None: nobody), without taking it."""
    try:
        import fcntl
        fd = os.open(path / LOCK, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return os.read(fd, 200).decode(errors="replace").strip()
    finally:
        os.close(fd)  # and with it a shared lock taken


def _in_use(path: Path, holder: str) -> RunFolderError:
    return RunFolderError(f"{path} is in use by another fxgrow process ({holder or 'unknown'}); wait for it to "
                          "end, or choose another --out")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete `.<name>.<pid>.tmp` files whose writer is gone (or is this process, which is
    not writing now); another live process may still be writing its own."""
    removed = []
    for p in path.iterdir():
        m = _TMP.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge
    return True


def unused_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`... the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def metrics_up_to(path: Path, step: int) -> str:
    """metrics.jsonl's records up to `step` (what the interrupted run logged after its
    checkpoint goes). A line that is not a JSON record (torn by a kill mid-write) is
    dropped with a warning."""
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"] if isinstance(record, dict) else None
        except (ValueError, KeyError):
            record_step = None
        if not isinstance(record_step, int):
            warnings.warn(f"{path}: line {number} is not a complete metrics record (torn by a kill?); dropped",
                          stacklevel=2)
            continue
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return "".join(kept)
