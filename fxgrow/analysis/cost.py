"""Parameter and FLOP counts. FLOPs come from torch's FlopCounterMode, not a hand count."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    params: int          # trainable parameters the module holds
    flops: int           # forward FLOPs for the example input (FlopCounterMode's count)

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "flops": self.flops}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of one call on `example`, in eval mode so statistics are untouched."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure(model: nn.Module, example: torch.Tensor) -> Cost:
    return Cost(count_params(model), forward_flops(model, example))
