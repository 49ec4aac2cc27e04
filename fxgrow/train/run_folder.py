"""The run folder's life: what a resumed run keeps of metrics.jsonl."""
from __future__ import annotations

import json
import warnings
from pathlib import Path


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
