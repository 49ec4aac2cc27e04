"""Template mixing (MixtureGrowth): a layer's weight is a linear mix of templates.

`TemplateBank` holds the templates one or more layers share; the weight chain starts at
`get_attr(<bank>.templates)` and `MixProducer` (rank 0) turns them into the weight.

Before growth a bank holds K templates of the weight's shape and the producer holds K
coefficients: `W = sum_k alpha[k] * T[k]`.

After growth by g the bank holds `sets` template sets of K (one per source network,
still of the small shape) and the weight is a grid of blocks, block (r, c) covering
output band r and input band c:

    B[r, c] = sum_k alpha[r, c, k] * T[set(r, c), k]

where set(r, c) depends on the row only (`set_axis="row"`: the vertical layout, or a
layer whose inputs did not grow) or on the column only (`"col"`: horizontal, or a layer
whose outputs did not grow, e.g. the classifier). The band-major grid is then permuted
along dims 0 and 1 (`perm_out`, `perm_in`) to the channel order of the grown graph, which
differs from band-major only where a dim holds several channel groups (concat) or
repeats each channel (flatten into a linear).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Producer


class TemplateBank(nn.Module):
    """`templates`: (sets * K, *weight_shape). Layers sharing a bank share this tensor."""

    def __init__(self, templates: torch.Tensor, sets: int = 1):
        super().__init__()
        if templates.shape[0] % sets:
            raise ValueError(f"{templates.shape[0]} templates do not split into {sets} sets")
        self.templates = nn.Parameter(templates)
        self.sets = sets

    @property
    def per_set(self) -> int:
        return self.templates.shape[0] // self.sets

    def extra_repr(self) -> str:
        return f"sets={self.sets}, K={self.per_set}, shape={tuple(self.templates.shape[1:])}"


class MixProducer(Producer):
    """Mixes a bank's templates into one weight (see the module docstring).

    `alpha`: (rows, cols, K). `bank` and `source` are names, for inspection only: the
    templates arrive as the chain's input, so no module is referenced twice."""

    rank = 0
    role = "mix"

    def __init__(self, alpha: torch.Tensor, block_shape: tuple[int, ...], *, bank: str = "",
                 source: str = "", sets: int = 1, set_axis: str = "row",
                 set_index: torch.Tensor | None = None, perm_out: torch.Tensor | None = None,
                 perm_in: torch.Tensor | None = None):
        super().__init__()
        if alpha.dim() == 1:
            alpha = alpha.view(1, 1, -1)
        if alpha.dim() != 3:
            raise ValueError(f"alpha must be (rows, cols, K), got shape {tuple(alpha.shape)}")
        if set_axis not in ("row", "col"):
            raise ValueError(f"set_axis must be 'row' or 'col', got {set_axis!r}")
        rows, cols, _ = alpha.shape
        if sets > 1 and set_index is None and sets != (rows if set_axis == "row" else cols):
            raise ValueError(f"{sets} template sets need a set_index for a {rows}x{cols} grid")
        if len(block_shape) < 2 and cols > 1:
            raise ValueError("a 1-d weight cannot have input bands")
        self.alpha = nn.Parameter(alpha)
        self.block_shape = tuple(int(s) for s in block_shape)
        self.bank, self.source = bank, source
        self.sets, self.set_axis = sets, set_axis
        self.register_buffer("set_index", set_index)
        self.register_buffer("perm_out", perm_out)
        self.register_buffer("perm_in", perm_in)

    @property
    def grid(self) -> tuple[int, int]:
        return self.alpha.shape[0], self.alpha.shape[1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        rows, cols = self.grid
        co, *rest = self.block_shape
        if not rest:
            return (rows * co,)
        return (rows * co, cols * rest[0], *rest[1:])

    def block_sets(self) -> list[list[int]]:
        """The template set each block (r, c) mixes."""
        rows, cols = self.grid
        band = rows if self.set_axis == "row" else cols
        index = (self.set_index.tolist() if self.set_index is not None
                 else [i % self.sets for i in range(band)])
        return [[index[r] if self.set_axis == "row" else index[c] for c in range(cols)]
                for r in range(rows)]

    def forward(self, templates: torch.Tensor) -> torch.Tensor:
        rows, cols, k = self.alpha.shape
        if self.sets == 1:
            # One template set: every block is a mix of the same K templates, one matmul.
            blocks = self.alpha.reshape(rows * cols, k) @ templates.reshape(k, -1)
            if rows == cols == 1 and self.perm_out is None:
                return blocks.view(self.block_shape)
            blocks = blocks.view(rows, cols, -1)
        else:
            t = templates.reshape(self.sets, k, -1)
            if self.set_index is not None:
                t = t.index_select(0, self.set_index)
            eq = "rck,rkx->rcx" if self.set_axis == "row" else "rck,ckx->rcx"
            blocks = torch.einsum(eq, self.alpha, t)
        co, *rest = self.block_shape
        if rest:
            ci, *kernel = rest
            w = blocks.view(rows, cols, co, ci, *kernel).transpose(1, 2)
            w = w.reshape(rows * co, cols * ci, *kernel)
        else:
            w = blocks.reshape(rows * co)
        if self.perm_out is not None:
            w = w.index_select(0, self.perm_out)
        if self.perm_in is not None:
            w = w.index_select(1, self.perm_in)
        return w

    def extra_repr(self) -> str:
        rows, cols, k = self.alpha.shape
        return (f"bank={self.bank!r}, K={k}, grid={rows}x{cols}, sets={self.sets}, "
                f"set_axis={self.set_axis}")
