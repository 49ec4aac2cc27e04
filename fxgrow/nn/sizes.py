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
    `DimLayout`), at the active sub-model: its full size less `repeat` positions for every
    channel of a segment's group the sub-model drops."""

    def __init__(self, state: SubnetState, layout: DimLayout):
        super().__init__()
        self.state = state
        self.size = layout.size
        self.segments = tuple((s.group, s.repeat) for s in layout.segments)

    def forward(self) -> int:
        active = self.state.active_sizes()  # the one read of the running sub-model
        return self.size - sum((self.state.full[g] - active[g]) * repeat for g, repeat in self.segments)

    def extra_repr(self) -> str:
        return f"size={self.size}, segments={self.segments}"
