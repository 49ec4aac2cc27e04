"""Parameter and FLOP counts. FLOPs come from torch's FlopCounterMode, not a hand count."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Cost:
    params: int          # trainable parameters the module holds
    flops: int           # forward FLOPs for the example input (FlopCounterMode's count)

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "flops": self.flops}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, example) -> int:
    """Forward FLOPs of one call on `example` (a tensor, or several inputs: see
    `shapes.as_inputs`), FlopCounterMode's count in eval mode on meta tensors: no kernel runs
    and the model's buffers are not touched. A model it cannot run is an FxgrowError."""
    from .shapes import run_abstract
    return run_abstract(model, example)


@contextlib.contextmanager
def no_fused_attention():
    """nn.MultiheadAttention/TransformerEncoderLayer's eval fast path is one fused op that
    FlopCounterMode cannot see into on fake tensors; count the composite path instead."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def measure(model: nn.Module, example) -> Cost:
    return Cost(count_params(model), forward_flops(model, example))
