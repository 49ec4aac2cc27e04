"""Checkpoint files: written atomically, read with `weights_only=True`, checked on load.

Everything in a checkpoint is a tensor or a plain container of numbers and strings,
so loading one never runs pickled code. Each file carries checksums of what was written
(one per model tensor, one per other section), verified on load: a file changed on disk
or in transfer is refused, naming what changed, instead of loading garbage. Every way a
file can fail to load is one CheckpointError naming the file."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import FxgrowError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# What every checkpoint fxgrow writes holds, and the type of each entry.
SECTIONS: dict[str, type | tuple[type, ...]] = {
    "step": int, "spec": dict, "train_spec": dict, "model": dict, "optimizer": dict, "scheduler": dict,
    "rng": (list, dict), "callbacks": dict, "interval_sums": list, "wall_time_s": (int, float)}


class CheckpointError(FxgrowError):
    """A checkpoint file is missing, unreadable, damaged or not an fxgrow checkpoint."""


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary sibling, fsync, then rename over `path`: a reader
    (or a run killed mid-write) sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. no such folder, disk full: the old file, if any, is untouched
        tmp.unlink(missing_ok=True)
        raise FxgrowError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_file(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically (a kill leaves the old file or the new one)."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != "checksum"}}
    state["checksum"] = checksums(state)
    atomic_write(path, lambda f: torch.save(state, f))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def find_checkpoint(resume: Path) -> Path:
    path = resume / CHECKPOINT if resume.is_dir() else resume
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a run folder or its {CHECKPOINT})")
    return path


def load_checkpoint(path: Path, require: Iterable[str] = SECTIONS) -> dict[str, Any]:
    """The state in `path`, verified against its checksums, with the `require`d sections
    present and of the right type."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises loading with weights_only=False: never pass that on.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise CheckpointError(f"{path}: holds {what}, which no fxgrow checkpoint contains; fxgrow loads "
                              "checkpoints as tensors and plain data only, so it never runs pickled code") from None
    except Exception as e:  # torch raises zip, EOF, key and runtime errors alike
        raise CheckpointError(f"{path}: {_unreadable(path, e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not an fxgrow checkpoint (a mapping)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    if "checksum" in state:  # files from before checksums load unverified
        _verify(path, state)
    for key in require:
        if key not in state:
            raise CheckpointError(f"{path}: has no {key!r} entry: not a complete fxgrow checkpoint")
        if not isinstance(state[key], SECTIONS.get(key, object)):
            raise CheckpointError(f"{path}: its {key!r} entry is a {type(state[key]).__name__}, not what fxgrow writes")
    bad = next((k for k, v in state.get("model", {}).items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: model entry {bad!r} is not a tensor")
    return state


def _unreadable(path: Path, e: Exception) -> str:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "the file is empty"
    if isinstance(e, EOFError) or "central directory" in str(e):
        return f"the file ends early ({size:,} bytes): truncated, or damaged in transfer"
    first = (str(e).strip().splitlines() or [""])[0][:120]
    return f"not a checkpoint torch can read ({type(e).__name__}{': ' + first if first else ''})"


# --- checksums --------------------------------------------------------------------------

def checksums(state: dict[str, Any]) -> dict[str, str]:
    """{"model/<name>": digest} per model tensor, {"<section>": digest} per other entry."""
    sums = {}
    for key, value in state.items():
        if key == "checksum":
            continue
        if key == "model" and isinstance(value, dict):
            sums.update({f"model/{name}": _digest(t) for name, t in value.items()})
        else:
            sums[key] = _digest(value)
    return sums


def _verify(path: Path, state: dict[str, Any]) -> None:
    written = state.pop("checksum")
    try:
        now = checksums(state) if isinstance(written, dict) else {}
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    changed = [k for k in sorted(written.keys() | now.keys()) if written.get(k) != now.get(k)] \
        if isinstance(written, dict) else ["checksum"]
    if changed:
        first = changed[0]
        what = f"model tensor {first[6:]!r}" if first.startswith("model/") else f"its {first!r} entry"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise CheckpointError(f"{path}: checksum mismatch in {what}{more}: the file changed after fxgrow wrote it "
                              "(damaged on disk or in transfer, or edited); fxgrow will not train on it or fold it")


_MAX_VALUES = 10_000_000  # far above any real state; a self-referencing pickle would never end


def _digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > _MAX_VALUES:
            raise ValueError(f"holds more than {_MAX_VALUES:,} values (a self-referencing structure?)")
        if isinstance(v, torch.Tensor):
            h.update(f"T{v.dtype}{tuple(v.shape)}".encode())
            h.update(_tensor_bytes(v))
        elif isinstance(v, dict):  # OrderedDict state_dicts load back as OrderedDict; either is a mapping
            h.update(b"{%d" % len(v))
            for k, item in reversed(list(v.items())):
                stack.extend((item, k))
        elif isinstance(v, (list, tuple)):
            h.update(b"[%d" % len(v) if isinstance(v, list) else b"(%d" % len(v))
            stack.extend(reversed(v))
        elif isinstance(v, int) and not isinstance(v, bool):
            h.update(f"int:{v:x};".encode())  # hex: decimal str() refuses ints over 4300 digits
        else:
            h.update(f"{type(v).__name__}:{v!r};".encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    t = t.resolve_conj().resolve_neg().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


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


def seed_rngs(seed: int) -> None:
    """Seed torch's, Python's and numpy's global generators, as a new run starts."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One bool per tensor: all its values finite. A NaN or inf anywhere makes the sum
    non-finite, so finite sums settle it in one read of each tensor (one device sync);
    only when some sum is not finite (which finite values can also do, by overflowing)
    does an exact pass follow."""
    quick = torch.stack([torch.isfinite(t.sum()) for t in tensors])
    if bool(quick.all()):
        return quick
    return torch.stack([torch.isfinite(t).all() for t in tensors])


def load_model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path, built: str) -> None:
    """`model.load_state_dict(saved)`, or a CheckpointError saying what does not fit
    (`built` says which model it is, e.g. "the model examples/mlp.py builds")."""
    mine = model.state_dict()
    shapes = [k for k in mine if k in saved and tuple(mine[k].shape) != tuple(saved[k].shape)]
    missing = [k for k in mine if k not in saved]
    unknown = [k for k in saved if k not in mine]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"tensor {k!r} has shape {list(saved[k].shape)} there and {list(mine[k].shape)} in the model"
                        + (f" ({len(shapes) - 1} more differ)" if len(shapes) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} of the model's tensors are missing (first {missing[0]!r})")
    if unknown:
        problems.append(f"{len(unknown)} tensors are not the model's (first {unknown[0]!r})")
    if problems:
        raise CheckpointError(f"{path}: its model state does not fit {built}: " + "; ".join(problems))
    model.load_state_dict(saved)


def replay_structures(model, callbacks, state: dict[str, Any], path: Path):
    """`model` with every callback's structure changes replayed from the checkpoint's states
    (`Callback.replay_structure`, in callback order: growth grows it): what a resumed run and
    `api.restore` load the model state into. A failure that is not already a clear
    FxgrowError names the file and the callback."""
    for callback in callbacks:
        try:
            model = callback.replay_structure(model, state["callbacks"].get(callback.name, {}))
        except FxgrowError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the structure {callback.name!r} recorded cannot be rebuilt "
                                  f"({type(e).__name__}: {e})") from e
    return model


def restore_callback(callback, state: dict[str, Any], ctx, path: Path) -> None:
    """`callback.load_state_dict` with the checkpoint's state for it; a failure that is not
    already a clear FxgrowError names the file and the callback."""
    try:
        callback.load_state_dict(state["callbacks"].get(callback.name, {}), ctx)
    except FxgrowError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the state of {callback.name!r} cannot be restored "
                              f"({type(e).__name__}: {e})") from e
