"""Weight compander: w = psi(v) = a * f(v / b) with f in {atan, asinh, erf}."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Producer

FUNCTIONS = ("atan", "asinh", "erf")


def psi(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, function: str) -> torch.Tensor:
    x = v / b
    if function == "atan":
        return a * torch.atan(x)
    if function == "asinh":
        return a * torch.asinh(x)
    return a * torch.erf(x)


def psi_prime(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, function: str) -> torch.Tensor:
    """d psi / d v."""
    x = v / b
    if function == "atan":
        return (a / b) / (1 + x * x)
    if function == "asinh":
        return (a / b) / torch.sqrt(1 + x * x)
    return (a / b) * (2 / math.sqrt(math.pi)) * torch.exp(-x * x)


# Inputs of the inverse are clamped to where it is finite.
INVERSE_LIMIT = {"atan": math.pi / 2 - 1e-3, "asinh": math.inf, "erf": 1 - 1e-6}


def psi_inverse(w: torch.Tensor, a: float, b: float, function: str) -> tuple[torch.Tensor, int]:
    """v with psi(v) == w, and how many entries had to be clamped to get a finite v."""
    x = w / a
    limit = INVERSE_LIMIT[function]
    clamped = int((x.abs() > limit).sum()) if math.isfinite(limit) else 0
    if math.isfinite(limit):
        x = x.clamp(-limit, limit)
    if function == "atan":
        return b * torch.tan(x), clamped
    if function == "asinh":
        return b * torch.sinh(x), clamped
    return b * torch.erfinv(x), clamped


class CompanderScale(nn.Module):
    """The (a, b) pair: buffers when fixed, parameters when learnable. One instance may be
    shared by every producer (`learnable: global`)."""

    def __init__(self, a: float, b: float, learnable: bool):
        super().__init__()
        a_t, b_t = torch.tensor(float(a)), torch.tensor(float(b))
        if learnable:
            self.a, self.b = nn.Parameter(a_t), nn.Parameter(b_t)
        else:
            self.register_buffer("a", a_t)
            self.register_buffer("b", b_t)


class CompandProducer(Producer):
    rank = 10
    role = "compand"

    def __init__(self, scale: CompanderScale, function: str = "atan"):
        super().__init__()
        if function not in FUNCTIONS:
            raise ValueError(f"unknown compander function {function!r}")
        self.scale = scale
        self.function = function

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return psi(v, self.scale.a, self.scale.b, self.function)

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        return psi_prime(v, self.scale.a, self.scale.b, self.function)

    def extra_repr(self) -> str:
        return f"function={self.function}"
