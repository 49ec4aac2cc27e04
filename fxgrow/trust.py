"""Which code a run folder may make fxgrow import.

A run's spec names code: `model.entry` (a file or `module:callable`, called with
`model.kwargs`) and `train.data: {python: module:function}`. Rebuilding a run (`fold`,
`eval`, `extract`, `inspect RUN`) would import it, and a run folder may come from anyone.
So fxgrow imports the code a run names only when

- the user names it: MODEL on the command line replaces `model.entry`;
- the user says so: `--trust-code` (Python: `trust_code=True`);
- or this user's fxgrow signed the run on this machine: every checkpoint carries an
  HMAC, under a key only this user can read (`$FXGROW_CONFIG_DIR`, default
  `~/.config/fxgrow`), of the code it names with file paths made absolute, so a signed
  run imports the files it was trained with and no file shipped beside it.

Anything else is refused before any import, naming each reference and how to allow it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UntrustedCodeError
from .loader import resolved_reference
from .specs.document import short_repr
from .specs.root import Spec

KEY_FILE = "run-signing-key"


@dataclass(frozen=True)
class CodeReference:
    field: str            # "model.entry" or "train.data"
    ref: str              # as recorded
    kwargs: dict[str, Any]

    @property
    def resolved(self) -> str:
        return resolved_reference(self.ref) if self.field == "model.entry" else self.ref

    def describe(self) -> str:
        where = f" ({self.resolved})" if self.resolved != self.ref else ""
        called = f" called with {short_repr(self.kwargs, 160)}" if self.kwargs else ""
        return f"{self.field} {self.ref!r}{where}{called}"


def code_references(spec: Spec) -> list[CodeReference]:
    refs = []
    if spec.model.entry is not None:
        refs.append(CodeReference("model.entry", spec.model.entry, dict(spec.model.kwargs)))
    if spec.train.data.name == "python":
        refs.append(CodeReference("train.data", spec.train.data.entry, dict(spec.train.data.kwargs)))
    return refs


def config_dir() -> Path:
    if os.environ.get("FXGROW_CONFIG_DIR"):
        return Path(os.environ["FXGROW_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fxgrow"


def key_path() -> Path:
    return config_dir() / KEY_FILE


def _key(create: bool) -> tuple[bytes | None, str | None]:
    """(this user's signing key, None), or (None, why there is none to trust)."""
    path = key_path()
    if not path.is_file():
        if not create:
            return None, f"its signature is from another user or machine (no signing key at {path})"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
        try:
            os.link(tmp, path)  # atomic, and a key another process made first wins
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            os.replace(tmp, path)
        tmp.unlink(missing_ok=True)
    st = path.stat()
    if st.st_mode & 0o077 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return None, f"your signing key {path} is readable by other users or not yours (chmod 600 it)"
    return path.read_bytes().strip(), None


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"fxgrow key id" + key).hexdigest()[:8]


def _payload(refs: list[CodeReference]) -> bytes:
    return json.dumps([[r.field, r.resolved, r.kwargs] for r in refs], sort_keys=True, default=repr).encode()


def sign(spec: Spec) -> dict[str, str]:
    """The signature a run's checkpoints carry: this user's HMAC of the code `spec` names."""
    key, _ = _key(create=True)
    if key is None:
        return {}
    return {"key": _key_id(key), "hmac": hmac.new(key, _payload(code_references(spec)), "sha256").hexdigest()}


def _unsigned_reason(refs: list[CodeReference], signature: Any) -> str | None:
    """None when `signature` is this user's for exactly `refs`, else why not."""
    if not isinstance(signature, dict) or not signature.get("hmac"):
        return "it carries no signature"
    key, why = _key(create=False)
    if key is None:
        return why
    if signature.get("key") != _key_id(key):
        return "its signature is from another user or machine"
    expected = hmac.new(key, _payload(refs), "sha256").hexdigest()
    if not hmac.compare_digest(expected, str(signature.get("hmac"))):
        return "its signature does not match the code it names (edited, or a file path resolves elsewhere from here)"
    return None


def check_run_code(spec: Spec, signature: Any, source: Path, *, model_given: bool, uses_data: bool,
                   trust_code: bool = False) -> None:
    """Refuse to import the code a run folder names unless the user named it, trusts it,
    or signed the run (see the module docstring). `model_given`: MODEL replaces
    model.entry; `uses_data`: the command loads the run's dataset."""
    refs = code_references(spec)
    needed = [r for r in refs if (r.field == "model.entry" and not model_given)
              or (r.field == "train.data" and uses_data)]
    if not needed or trust_code:
        return
    why = _unsigned_reason(refs, signature)
    if why is None:
        return
    model_hint = " or name the model yourself (MODEL after the run)" if any(
        r.field == "model.entry" for r in needed) else ""
    lines = "\n  ".join(r.describe() for r in needed)
    raise UntrustedCodeError(
        f"{source}: rebuilding this run would import code it names:\n  {lines}\n"
        f"fxgrow imports a run folder's code only when you name it or your fxgrow signed the run on this "
        f"machine, and {why}. Read the run's spec.yaml; to run that code, pass --trust-code "
        f"(Python: trust_code=True){model_hint}.")
