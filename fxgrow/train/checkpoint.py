"""Checkpoint files: written atomically, read with `weights_only=True`.

Everything in a checkpoint is a tensor or a plain container of numbers and strings,
so loading one never runs pickled code."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FxgrowError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary sibling, fsync, then rename over `path`: a reader
    (or a run killed mid-write) sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def find_checkpoint(resume: Path) -> Path:
    path = resume / CHECKPOINT if resume.is_dir() else resume
    if not path.is_file():
        raise FxgrowError(f"no checkpoint at {path} (expected a run folder or its {CHECKPOINT})")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise FxgrowError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return state


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
