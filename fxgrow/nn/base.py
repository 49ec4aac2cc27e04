"""The base class of every producer: a module inserted into a weight chain."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Producer(nn.Module):
    """Maps the tensor coming down a weight chain to the tensor going on.

    `rank` fixes where producers of each kind sit in a chain (lower is nearer the
    parameter): mixing 0 < compander 10 < mask 20 < slicing 30. A producer holds only
    its own state; `forward` is pure tensor math so torch.compile can fuse the chain.
    """

    rank: ClassVar[int] = 50
    role: ClassVar[str] = "producer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
