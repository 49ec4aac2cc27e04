"""Mask producer: w -> w * mask, the mask a buffer the prune/regrow callback edits in place."""
from __future__ import annotations

import torch

from ..errors import FxgrowError
from .base import Producer


class MaskProducer(Producer):
    """Multiplies the chain's value by a 0/1 mask of the same shape.

    The mask has the weight's dtype (one same-dtype multiply, forward and backward) and is
    a buffer, so checkpoints hold it and `fold` bakes exact zeros into the weight. `fired`
    marks every position that has been active since the initial layout (In-Time
    Over-Parameterization's exploration rate); it does not take part in the forward.

    Regrowth needs dL/dw at masked positions too (the *dense* gradient), which the
    parameter's gradient no longer has. With `capture` set, forward hooks the output
    tensor and sums its gradient into `dense_grad`. The flag is off on ordinary steps, so
    they pay nothing; under torch.compile the two settings compile to two cached graphs.
    """

    rank = 20
    role = "mask"
    keeps_zeros = True

    def __init__(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, source: str = "", granularity: str = "element"):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=dtype, device=device))
        # Every position active at some point since training started (ITOP's exploration rate).
        self.register_buffer("fired", torch.ones(shape, dtype=torch.bool, device=device))
        self.source = source          # "layer.param" this mask belongs to (for reports)
        # "filter": the mask removes whole channels of coupled groups (see prune_regrow_filters)
        self.granularity = granularity
        self.capture = False
        self.dense_grad: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w * self.mask
        if self.capture and out.requires_grad:
            out.register_hook(self._store_grad)
        return out

    def _store_grad(self, grad: torch.Tensor) -> None:
        # A layer called twice, or several micro-steps, sum like the parameter's gradient.
        grad = grad.detach().float()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    @property
    def active(self) -> torch.Tensor:
        """Boolean view of the mask."""
        return self.mask != 0

    def nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))

    def growth_refusal(self) -> str:
        if self.granularity == "filter":
            return ("prune_regrow with granularity: filter prunes channel groups, and growth changes them "
                    "(use granularity: element)")
        return ""

    def grow(self, growth, path: str) -> "MaskProducer":
        """Source block i keeps source net i's mask; new blocks start dense (the prune_regrow
        callback lays them out at the sparsity in force)."""
        if self.growth_refusal():
            raise FxgrowError(f"grow cannot widen '{self.source}': {self.growth_refusal()}")
        weight = growth.weight(path)
        if not any(weight.grows(d) for d in range(self.mask.dim())):
            return self
        grown = weight.place([s[f"{path}.mask"] for s in growth.sources], fill=1.0)
        new = MaskProducer(grown.shape, grown.dtype, grown.device, self.source, self.granularity)
        new.mask.copy_(grown)
        # a new block has fired where its relayout activates it (set_active records that)
        fired = [s.get(f"{path}.fired", s[f"{path}.mask"] != 0) for s in growth.sources]
        new.fired.copy_(weight.place([f.to(grown.dtype) for f in fired], fill=0.0) != 0)
        return new

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, density={self.nnz() / self.mask.numel():.4f}"
