"""Sizes that follow the active sub-model: a shape literal the graph hard-coded (a
`view(B, T, 4, 16)`'s head count, an exported `expand`'s kv heads) made to read the running
width, so the sliced tensors reshape as the smaller model's would.

`ActiveSize` is called with no input and returns a Python int (like `ConvGroups` does for a
grouped conv's `groups`): eager code uses it as it used the literal, torch.compile
specializes on it (one graph per sub-model)."""
from __future__ import annotations

from torch import nn

from .slicing import DimLayout, SubnetState


class ActiveSize(nn.Module):
    """The size of a tensor dim laid out as `layout` (positions of coupled channel groups,
    `DimLayout`) at the active sub-model: the positions `layout.kept` keeps, counted once
    per width configuration here, so a forward only indexes (as `ConvGroups` does)."""

    def __init__(self, state: SubnetState, layout: DimLayout):
        super().__init__()
        self.state = state
        self.size = layout.size
        self.by_width = tuple(len(layout.kept(state.active_sizes(i), state.full)) for i in range(state.num_widths))

    def forward(self) -> int:
        return self.by_width[self.state.width_index]

    def extra_repr(self) -> str:
        return f"size={self.size}, by_width={self.by_width}"
