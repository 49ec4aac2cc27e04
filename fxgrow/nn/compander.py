"""Weight compander (ALGORITHMS.md section 2): w = psi(v) = a * f(v / b), f in {atan, asinh, erf}.

The producer holds (a, b) and computes psi. The functions here are the math the pass and
its training callback share: psi, its derivative, its inverse (for the init, which starts
no weight where psi is flat), and a many-tensor form of psi and psi' for the per-step
corrections.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FxgrowError
from .base import Producer

FUNCTIONS = ("atan", "asinh", "erf")
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)

Scalar = float | torch.Tensor  # a and b: Python floats when fixed, 0-d parameters when learnable


def psi(v: torch.Tensor, a: Scalar, b: Scalar, function: str) -> torch.Tensor:
    x = v / b
    if function == "atan":
        return a * torch.atan(x)
    if function == "asinh":
        return a * torch.asinh(x)
    return a * torch.erf(x)


def psi_prime(v: torch.Tensor, a: Scalar, b: Scalar, function: str) -> torch.Tensor:
    """d psi / d v."""
    x = v / b
    if function == "atan":
        return (a / b) / (1 + x * x)
    if function == "asinh":
        return (a / b) * torch.rsqrt(1 + x * x)
    return (a / b) * _TWO_OVER_SQRT_PI * torch.exp(-x * x)


# No weight starts where psi is flat: psi'(v) >= MIN_SLOPE * psi'(0) at every initial v.
# Without this the inverse of a weight at or beyond psi's range is a v where psi' is ~1e-6:
# the weight can never move again (under SGD its steps in w scale with psi'(v)^2).
MIN_SLOPE = 0.1


def start_limit(function: str, min_slope: float = MIN_SLOPE) -> float:
    """The largest |w / a| a weight may start at: where psi'(v) / psi'(0) = min_slope.
    atan: 1 / (1 + u^2); erf: exp(-u^2); asinh: 1 / sqrt(1 + u^2), u = v / b."""
    if not 0 < min_slope < 1:
        raise ValueError(f"min_slope must lie in (0, 1), got {min_slope}")
    if function == "atan":
        return math.atan(math.sqrt(1 / min_slope - 1))
    if function == "erf":
        return math.erf(math.sqrt(math.log(1 / min_slope)))
    return math.asinh(math.sqrt(1 / min_slope ** 2 - 1))


def psi_inverse(w: torch.Tensor, a: float, b: float, function: str, overwrite: bool = False,
                min_slope: float = MIN_SLOPE, moved: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, int]:
    """v with psi(v) == w, in w's dtype, and how many entries of w lay beyond the start
    limit (`start_limit`) and were moved to it (to +-a * limit, keeping their sign).
    Computed in float64 on a copy; with `overwrite`, in w's own dtype in place of w (a
    fresh tensor the caller gives up: the weights of a large model are hundreds of MB, and
    each float64 pass over them costs). `moved`, when given and entries move, receives their
    flat `index` and `original` values (float64), read before anything is overwritten."""
    inplace = not (torch.is_grad_enabled() and w.requires_grad)
    x = w if overwrite and inplace else w.to(torch.float64, copy=True)
    x = x.div_(a) if inplace else x / a
    limit = start_limit(function, min_slope)
    clamped = 0
    lo, hi = torch.aminmax(x.detach()) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if float(hi) > limit or float(lo) < -limit:  # one pass; counting takes two more
        clamped = int(torch.count_nonzero(x.gt(limit))) + int(torch.count_nonzero(x.lt(-limit)))
        if moved is not None:
            index = (x.detach().abs() > limit).flatten().nonzero().flatten()
            moved["index"], moved["original"] = index, x.detach().flatten()[index].double() * a
        x = x.clamp_(-limit, limit) if inplace else x.clamp(-limit, limit)
    name = {"atan": "tan", "asinh": "sinh", "erf": "erfinv"}[function]
    x = getattr(x, f"{name}_")() if inplace else getattr(x, name)()
    x = x.mul_(b) if inplace else x * b
    return x.to(w.dtype), clamped


def inverse_needs_a(w: torch.Tensor, function: str, min_slope: float = MIN_SLOPE) -> float:
    """The smallest `a` for which no entry of w is moved by the inverse."""
    return float(w.abs().max()) / start_limit(function, min_slope)


def psi_and_prime_many(vs: list[torch.Tensor], a: Scalar, b: Scalar, function: str
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[psi(v)], [psi'(v)] for tensors sharing one (a, b), with torch._foreach ops: a few
    kernel launches for all of them rather than several per tensor."""
    x = torch._foreach_div(vs, b)
    sq = torch._foreach_mul(x, x)
    if function == "atan":
        f = torch._foreach_atan(x)
        torch._foreach_add_(sq, 1.0)
        df = torch._foreach_reciprocal(sq)
    elif function == "asinh":
        f = [torch.asinh(t) for t in x]  # torch has no _foreach_asinh
        torch._foreach_add_(sq, 1.0)
        df = torch._foreach_rsqrt(sq)
    else:
        f = torch._foreach_erf(x)
        torch._foreach_neg_(sq)
        df = torch._foreach_exp(sq)
        torch._foreach_mul_(df, _TWO_OVER_SQRT_PI)
    torch._foreach_mul_(f, a)
    torch._foreach_mul_(df, a / b)
    return f, df


class CompanderScale(nn.Module):
    """The (a, b) pair. Learnable: 0-d parameters, and one instance may be shared by every
    producer (`learnable: global`). Fixed: plain floats, so they cost no tensor operand
    and torch.compile folds them in as constants."""

    def __init__(self, a: float, b: float, learnable: bool):
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.a = nn.Parameter(torch.tensor(float(a)))
            self.b = nn.Parameter(torch.tensor(float(b)))
        else:
            self.a, self.b = float(a), float(b)

    def values(self) -> tuple[float, float]:
        if self.learnable:
            return self.a.item(), self.b.item()
        return self.a, self.b

    def extra_repr(self) -> str:
        a, b = self.values()
        return f"a={a:.4g}, b={b:.4g}, learnable={self.learnable}"


class CompandProducer(Producer):
    """w = psi(v): the weight chain's value v in, the effective weight out."""

    rank = 10
    role = "compand"
    keeps_zeros = True  # psi is odd: psi(0) = 0

    def __init__(self, scale: CompanderScale, function: str = "atan"):
        super().__init__()
        if function not in FUNCTIONS:
            raise ValueError(f"unknown compander function {function!r} (known: {', '.join(FUNCTIONS)})")
        self.scale = scale
        self.function = function

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return psi(v, self.scale.a, self.scale.b, self.function)

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        return psi_prime(v, self.scale.a, self.scale.b, self.function)

    def extra_repr(self) -> str:
        return f"function={self.function}"

    def grow(self, growth, path: str) -> nn.Module:
        """One (a, b) serves every block of a grown weight: the source nets must agree on it."""
        for name in self.state_dict():
            key = f"{path}.{name}"
            if any(not torch.equal(s[key], growth.sources[0][key]) for s in growth.sources[1:]):
                raise FxgrowError(f"cannot fuse: compander '{key}' differs between the source "
                                  "nets, and one value serves every block of the grown weight")
        return self
