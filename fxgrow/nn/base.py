"""The producer protocol: a module inserted into a weight chain.

A producer maps the tensor coming down its chain to the tensor going on, and answers for
itself everything a pass or growth would otherwise have to know about its class:

- `rank` (class): its place in a chain, lower nearer the parameter (mixing 0 < compander
  10 < mask 20 < slicing 30); `role` (class): its name in module paths and reports;
- `keeps_zeros` (class): an entry that comes in zero goes out zero, at the same position
  (elementwise with f(0) = 0), so zeroing a parameter entry zeroes that weight entry;
- `output_shape(shape)`: the shape it hands on for an input of `shape` (no tensor math);
- `fold(value)`: the tensor fold bakes into the plain layer (by default its forward);
- `grow(growth, path) -> nn.Module`: itself widened for the grown network (`growth` is a
  `fxgrow.growth.Growth`; `path` its module path, which keys its tensors in the source
  nets' state dicts); `growth_refusal()` says why it cannot, before anything is built;
- `solve_for(gm, {chain key: value})` (class): change what the producers of this class
  compute from so that they output these values (template mixing re-solves its bank);
  returns the max abs residual per key. A pass stacked after one re-initialises its input
  through it (the compander's v = psi^-1(W)); `can_solve(producer)` says whether a class can.

A producer holds only its own state; `forward` is pure tensor math so torch.compile can
fuse the chain. Other modules may take part in growth by having the same `grow` method
(template banks do).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..errors import FxgrowError

if TYPE_CHECKING:
    from ..growth import Growth


class Producer(nn.Module):
    rank: ClassVar[int] = 50
    role: ClassVar[str] = "producer"
    keeps_zeros: ClassVar[bool] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def fold(self, value: torch.Tensor) -> torch.Tensor:
        return self(value)

    @classmethod
    def solve_for(cls, gm: nn.Module, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        raise FxgrowError(f"{cls.__name__} cannot be solved for a given output")

    def growth_refusal(self) -> str:
        """Why this producer cannot follow growth ("" when it can)."""
        if type(self).grow is Producer.grow:
            return f"its weight chain has a {self.role} producer ({type(self).__name__}) that does not say how it grows"
        return ""

    def grow(self, growth: "Growth", path: str) -> nn.Module:
        raise FxgrowError(self.growth_refusal())


def can_solve(producer: Producer) -> bool:
    return type(producer).solve_for.__func__ is not Producer.solve_for.__func__
