"""Training loss and accuracy of the current logging interval, without a device
synchronization per step.

Each micro-step writes its loss and correct count into preallocated device buffers (two
small kernels); they are read back at sync points (logging, evaluation, checkpoints),
where a non-finite loss is also found and attributed to its exact step.
"""
from __future__ import annotations

import math

import torch


class Meter:
    def __init__(self, device: torch.device, capacity: int = 64):
        self.losses = torch.zeros(capacity, device=device)
        self.correct = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.steps: list[int] = []   # the step (as logged: steps done after it) of each entry
        self.counts: list[int] = []  # examples behind each entry
        self.carry = [0.0, 0.0, 0.0]  # sums folded in at a checkpoint: loss x count, correct, count
        self._checked = 0

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        i = len(self.steps)
        if i == len(self.losses):
            self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
            self.correct = torch.cat([self.correct, torch.zeros_like(self.correct)])
        self.losses[i] = loss
        self.correct[i] = (logits.argmax(-1) == targets).sum()
        self.steps.append(step)
        self.counts.append(len(targets))

    def first_bad_step(self) -> int | None:
        """The first step since the last look whose loss is NaN or infinite."""
        new = self.losses[self._checked:len(self.steps)].tolist()
        for offset, value in enumerate(new):
            if not math.isfinite(value):
                return self.steps[self._checked + offset]
        self._checked = len(self.steps)
        return None

    def take(self) -> list[float]:
        """[sum of loss x count, correct, count] over the interval; starts a new one."""
        n = len(self.steps)
        losses, correct = self.losses[:n].tolist(), self.correct[:n].tolist()
        sums = [self.carry[0] + sum(l * c for l, c in zip(losses, self.counts)),
                self.carry[1] + sum(correct), self.carry[2] + sum(self.counts)]
        self.steps, self.counts, self.carry, self._checked = [], [], [0.0, 0.0, 0.0], 0
        return sums
