"""Shape propagation: torch's ShapeProp, run on fake tensors.

Under FakeTensorMode no kernel runs, so propagation costs the graph walk only, and the
model's real parameters and buffers (BN running statistics) are never touched."""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Fill `node.meta["tensor_meta"]` for every node."""
    propagate_shapes_and_flops(gm, example)
    return gm


@torch.no_grad()
def propagate_shapes_and_flops(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """Shapes into node meta, and the forward FLOPs FlopCounterMode counts, in one fake run."""
    from .cost import no_fused_attention
    with no_fused_attention(), FakeTensorMode(allow_non_fake_inputs=True) as mode, \
            FlopCounterMode(display=False) as counter:
        ShapeProp(gm).propagate(mode.from_tensor(example))
    return int(counter.get_total_flops())


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
