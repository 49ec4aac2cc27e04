"""Shape propagation: torch's ShapeProp, run without touching the model's state."""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Fill `node.meta["tensor_meta"]` for every node. BN running statistics are saved and
    restored (ShapeProp runs the model) and the train/eval mode is kept."""
    buffers = {k: v.clone() for k, v in gm.named_buffers()}
    try:
        ShapeProp(gm).propagate(example)
    finally:
        for k, v in gm.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])
    return gm


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
