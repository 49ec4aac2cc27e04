"""Momentum regrowth's score: an exponential moving average of the dense gradient.

fxgrow's masks are in the graph (w * mask), so dL/dw and with it every optimizer state is
zero at inactive positions: the optimizer's momentum cannot rank where to grow (in GraNet's
code, which masks the SGD buffer after every step, momentum growth with SGD regrows exactly
the weights it dropped). The callback keeps its own average of the dense gradient instead,
as RigL's SparseMomentumOptimizer does: m <- beta m + (1 - beta) g at every step, and
optionally u <- beta2 u + (1 - beta2) g^2 for Adam's normalized score m / (sqrt(u) + eps).
Not zero-cost: the dense gradient is captured at every step.
"""
from __future__ import annotations

from typing import Any

import torch

EPS = 1e-8  # GraNet's get_momentum_for_weight adds it to sqrt(exp_avg_sq)


class MomentumScores:
    """Per masked weight ("layer.param"), the averages of its dense gradient."""

    def __init__(self, beta: float, normalized: bool = False, beta2: float = 0.999):
        self.beta, self.normalized, self.beta2 = beta, normalized, beta2
        self.m: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}

    def update(self, key: str, grad: torch.Tensor) -> None:
        """One step's dense gradient of `key` (a weight that did not run keeps its averages)."""
        m = self.m.get(key)
        if m is None or m.shape != grad.shape:  # first step, or growth changed the shape
            m = self.m[key] = torch.zeros_like(grad)
            self.u[key] = torch.zeros_like(grad)
        m.mul_(self.beta).add_(grad, alpha=1 - self.beta)
        if self.normalized:
            self.u[key].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)

    def score(self, key: str) -> torch.Tensor | None:
        """|m| or |m| / (sqrt(u) + eps); None before the first update."""
        m = self.m.get(key)
        if m is None:
            return None
        return m.abs() / (self.u[key].sqrt() + EPS) if self.normalized else m.abs()

    def forget(self, keep: dict[str, tuple[int, ...]]) -> None:
        """Keep only the averages of weights still of these shapes (after growth)."""
        for key in list(self.m):
            if tuple(self.m[key].shape) != keep.get(key):
                del self.m[key], self.u[key]

    def state_dict(self) -> dict[str, Any]:
        return {"m": {k: v.cpu() for k, v in self.m.items()},
                "u": {k: v.cpu() for k, v in self.u.items()} if self.normalized else {}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.m = {k: v.to(device) for k, v in state.get("m", {}).items()}
        self.u = {k: v.to(device) for k, v in state.get("u", {}).items()}
        for k, m in self.m.items():
            self.u.setdefault(k, torch.zeros_like(m))
