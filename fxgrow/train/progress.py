"""What a run shows while it trains: a rich progress bar on a terminal, plain lines
when output goes to a file or runs under CI, or nothing."""
from __future__ import annotations

import os
import sys
from typing import Any


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "bar" if sys.stdout.isatty() and not os.environ.get("CI") else "plain"


def _fmt(record: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("accuracy", "acc {:.4f}"), ("perplexity", "ppl {:.2f}"),
                     ("lr", "lr {:.3g}"), ("samples_per_s", "{:.0f} samples/s")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return "  ".join(parts)


class Progress:
    def __init__(self, mode: str, total_steps: int, start_step: int):
        self.mode = resolve_mode(mode)
        self.total = total_steps
        self._bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")
            self._bar.start()

    def train(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], stats=_fmt(record))
        elif self.mode == "plain":
            print(f"step {record['step']}/{self.total}  epoch {record['epoch']}  {_fmt(record)}", flush=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def eval(self, record: dict[str, Any]) -> None:
        self.say(f"eval  step {record['step']}  epoch {record['epoch']}  {_fmt(record)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
