"""Shape propagation and FLOP counting without running a kernel.

torch's ShapeProp and FlopCounterMode run with every parameter and buffer swapped for a
meta tensor (`torch.func.functional_call`): shapes and FLOPs come out, no arithmetic is
done, and the model's real state (BN running statistics) is never touched. Graphs that
hold plain tensor constants fall back to FakeTensorMode, which is slower but general."""
from __future__ import annotations

import contextlib
import io
import itertools
import re
from typing import Callable

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..errors import FxgrowError


class _Propagate(nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x: torch.Tensor):
        return ShapeProp(self.gm).propagate(x)


def run_abstract(module: nn.Module, example: torch.Tensor, fn: Callable | None = None) -> int:
    """Call `module(example)` (or `fn(example)` with `module`'s state swapped) on meta
    tensors, falling back to fake tensors; returns the forward FLOPs counted."""
    from .cost import no_fused_attention
    # One meta tensor per distinct tensor; functional_call re-ties shared ones.
    state = {k: torch.empty_like(v, device="meta") for k, v in itertools.chain(
        module.named_parameters(), module.named_buffers())}
    modes = {m: m.training for m in module.modules()}
    module.eval()  # batch statistics of a batch-1 example over 1x1 maps are undefined
    # ShapeProp prints a traceback before re-raising: keep it off the terminal.
    with torch.no_grad(), no_fused_attention(), _restore_modes(modes), contextlib.redirect_stderr(io.StringIO()):
        try:
            if _has_attention(module):
                raise NotImplementedError("meta tensors pick another attention kernel than the CPU")
            with FlopCounterMode(display=False) as counter:
                torch.func.functional_call(module, state, (example.to("meta"),))
        except (RuntimeError, NotImplementedError, TypeError):
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode, \
                        FlopCounterMode(display=False) as counter:
                    module(mode.from_tensor(example))
            except Exception as e:
                root, where = e, ""
                while root.__cause__ is not None:
                    where = where or _shape_prop_node(str(root), getattr(module, "gm", None))
                    root = root.__cause__
                first = (str(root).strip().splitlines() or [type(root).__name__])[0]
                raise FxgrowError(
                    f"the example input of shape {list(example.shape)} does not fit the model{where}: {first}\n"
                    "  set model.example_input in the spec (or --input-shape) to the model's input shape"
                ) from e
    return int(counter.get_total_flops())


def _shape_prop_node(message: str, gm: fx.GraphModule | None) -> str:
    """" in layer 'x'" (or node) from ShapeProp's "ShapeProp error for: node=%x : ..." wrapper;
    a functionalized layer is named by the module it came from."""
    found = re.match(r"ShapeProp error for: node=%(\S+) : .*?= (\w+)\[target=([^\]]+)\]", message)
    if found is None:
        return ""
    name, op, target = found.groups()
    node = next((n for n in gm.graph.nodes if n.name == name), None) if gm is not None else None
    source = (node.meta.get("fxgrow") or {}).get("source") if node is not None else None
    if op == "call_module" or source:
        return f" in layer {source or target!r}"
    return f" at node {name!r} ({target})"


@contextlib.contextmanager
def _restore_modes(modes: dict[nn.Module, bool]):
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _has_attention(module: nn.Module) -> bool:
    """Attention's FLOPs depend on the kernel torch picks for the device, so count them on
    fake tensors of the real device rather than on meta tensors."""
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            return True
        if isinstance(m, fx.GraphModule) and any(
                n.target is torch.nn.functional.scaled_dot_product_attention for n in m.graph.nodes):
            return True
    return False


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Fill `node.meta["tensor_meta"]` for every node."""
    propagate_shapes_and_flops(gm, example)
    return gm


def propagate_shapes_and_flops(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """Shapes into node meta, and the forward FLOPs FlopCounterMode counts, in one run."""
    return run_abstract(_Propagate(gm), example)


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
