"""Training loss and accuracy of the current logging interval, without a device
synchronization per step.

Each micro-step writes the objective's sums (summed loss, correct, counted) into a
preallocated device buffer (one small copy); they are read back at sync points
(logging, evaluation, checkpoints), where a non-finite loss is also found and
attributed to its exact step.
"""
from __future__ import annotations

import math

import torch


class Meter:
    def __init__(self, device: torch.device, capacity: int = 64):
        self.sums = torch.zeros(capacity, 3, dtype=torch.float64, device=device)
        self.steps: list[int] = []   # the step (as logged: steps done after it) of each entry
        self.carry = [0.0, 0.0, 0.0]  # sums folded in at a checkpoint: loss x count, correct, count
        self._checked = 0

    def add(self, step: int, sums: torch.Tensor) -> None:
        """One micro-step's [summed loss, correct, counted] (see `objectives.py`)."""
        i = len(self.steps)
        if i == len(self.sums):
            self.sums = torch.cat([self.sums, torch.zeros_like(self.sums)])
        self.sums[i] = sums
        self.steps.append(step)

    def first_bad_step(self) -> int | None:
        """The first step since the last look whose loss is NaN or infinite."""
        new = self.sums[self._checked:len(self.steps), 0].tolist()
        for offset, value in enumerate(new):
            if not math.isfinite(value):
                return self.steps[self._checked + offset]
        self._checked = len(self.steps)
        return None

    def take(self) -> list[float]:
        """[sum of loss x count, correct, count] over the interval; starts a new one."""
        rows = self.sums[:len(self.steps)].tolist()
        sums = [self.carry[j] + sum(row[j] for row in rows) for j in range(3)]
        self.steps, self.carry, self._checked = [], [0.0, 0.0, 0.0], 0
        return sums
