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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..errors import FxgrowError
from ..nn.base import Producer


@dataclass(frozen=True)
class Inputs:
    """Example inputs of one call: positional `args` and keyword `kwargs` (wherever fxgrow
    takes an example input, a single tensor, a tuple of tensors or a dict of keyword tensors
    work too: see `as_inputs`)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def map(self, fn) -> "Inputs":
        """The same inputs with `fn` applied to every tensor."""
        f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(tuple(f(a) for a in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def describe(self) -> str:
        shapes = [_shape_of(a) for a in self.args] + [f"{k}={_shape_of(v)}" for k, v in self.kwargs.items()]
        return f"of shape {shapes[0]}" if len(shapes) == 1 and not self.kwargs else f"of shapes {', '.join(shapes)}"


def _shape_of(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else repr(value)


def as_inputs(example) -> Inputs:
    """An example input as `Inputs`: a tensor is the only positional input, a tuple or list
    the positional inputs, a dict the keyword inputs."""
    if isinstance(example, Inputs):
        return example
    if isinstance(example, dict):
        return Inputs((), dict(example))
    if isinstance(example, (tuple, list)):
        return Inputs(tuple(example))
    return Inputs((example,))


def bind_placeholders(gm: fx.GraphModule, inputs: Inputs) -> tuple:
    """`inputs` as positional arguments of `gm`'s graph (keywords by placeholder name;
    placeholders not given keep their defaults)."""
    values = list(inputs.args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(values) > len(placeholders) and not any(n.target.startswith("*") for n in placeholders):
        raise FxgrowError(f"the model takes {len(placeholders)} input(s), the example gives {len(values)} "
                          "(model.example_input)")
    for node in placeholders[len(values):]:
        name = node.target.lstrip("*")
        if name in inputs.kwargs:
            values.append(inputs.kwargs[name])
        elif node.args:
            values.append(node.args[0])
        elif not node.target.startswith("*"):
            raise FxgrowError(f"the model's input {name!r} has no example (model.example_kwargs)")
    unknown = set(inputs.kwargs) - {n.target.lstrip("*") for n in gm.graph.nodes if n.op == "placeholder"}
    if unknown:
        raise FxgrowError(f"the model takes no input named {', '.join(sorted(unknown))} (model.example_kwargs)")
    return tuple(values)


class _ProducersByShape:
    """Interpreter mixin for shape-only runs: a weight-chain producer hands on an empty
    tensor of its `output_shape` instead of computing (pure tensor math on weights, whose
    elementwise meta kernels cost more than the rest of the model)."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, Producer) and isinstance(args[0], torch.Tensor):
            return args[0].new_empty(module.output_shape(tuple(args[0].shape)))
        return super().call_module(target, args, kwargs)


class _NormsByShape(TorchFunctionMode):
    """Shape-only runs: a batch or instance norm hands on its input's shape. Their meta
    kernels are python decompositions of ten elementwise ops each (the bulk of a ResNet's
    meta run), so the channel count is checked by one broadcast with a per-channel tensor
    instead."""

    _NORMS = {F.batch_norm: (1, 2, 3, 4), F.instance_norm: (1, 2, 3, 4)}  # positions of per-channel tensors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._NORMS:
            x = args[0]
            per_channel = next((args[i] for i in self._NORMS[func] if i < len(args) and args[i] is not None), None)
            per_channel = next((v for k, v in kwargs.items() if k in ("running_mean", "weight") and v is not None),
                               per_channel)
            if per_channel is None or x.dim() < 2:
                return x.clone()
            return x * per_channel.reshape([1, -1] + [1] * (x.dim() - 2))
        return func(*args, **kwargs)


class _ShapeProp(_ProducersByShape, ShapeProp):
    pass


class _Run(_ProducersByShape, fx.Interpreter):
    pass


class _Interpret(nn.Module):
    """Runs a GraphModule's graph node by node (no generated code needed: the graph may have
    changed since its last recompile): with `shapes` through ShapeProp, with `by_shape`
    producers answering by shape only, else exactly (FLOPs count the producers)."""

    def __init__(self, gm: fx.GraphModule, shapes: bool, by_shape: bool = True):
        super().__init__()
        self.gm, self.shapes, self.by_shape = gm, shapes, by_shape
        runner = {(True, True): _ShapeProp, (True, False): ShapeProp,
                  (False, True): _Run, (False, False): fx.Interpreter}[shapes, by_shape]
        self._runner = runner(gm)  # made once: it indexes every submodule

    def forward(self, *args, **kwargs):
        with _NormsByShape() if self.by_shape else contextlib.nullcontext():
            return self._runner.run(*bind_placeholders(self.gm, Inputs(args, kwargs)))


def run_abstract(module: nn.Module, example, count_flops: bool = True,
                 raw_errors: bool = False) -> int:
    """Call `module(example)` on meta tensors, falling back to fake tensors; returns the
    forward FLOPs counted (0 without `count_flops`: FlopCounterMode decomposes ops, which
    costs more than the run itself). A failure is an FxgrowError about the example input,
    or with `raw_errors` the error itself."""
    with abstract_runs(module, count_flops) as run:
        return run(example, raw_errors)


@contextlib.contextmanager
def abstract_runs(module: nn.Module, count_flops: bool = False):
    """For several abstract calls of one module (sub-models): the meta state and eval mode
    are set up once; yields `run(example, raw_errors=False) -> FLOPs` (see `run_abstract`)."""
    from .cost import no_fused_attention
    # One meta tensor per distinct tensor; functional_call re-ties shared ones.
    state_names = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    state = {k: torch.empty_like(v, device="meta") for k, v in state_names}
    modes = {m: m.training for m in module.modules()}
    attention = _has_attention(module)
    module.eval()  # batch statistics of a batch-1 example over 1x1 maps are undefined
    counting = (lambda: FlopCounterMode(display=False)) if count_flops else contextlib.nullcontext

    def run(example, raw_errors: bool = False) -> int:
        inputs = as_inputs(example)
        try:
            if attention:
                raise NotImplementedError("meta tensors pick another attention kernel than the CPU")
            with counting() as counter:
                meta = inputs.map(lambda t: t.to("meta"))
                torch.func.functional_call(module, state, meta.args, meta.kwargs)
        except FxgrowError:
            raise
        except Exception:  # meta kernels do not cover every op: fake tensors do
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode, counting() as counter:
                    fake = inputs.map(mode.from_tensor)
                    # fake state, detached: FlopCounterMode's module tracker hooks every module
                    # input that requires grad, and a leaf parameter handed to a module (a
                    # weight chain's producer) has no grad_fn under no_grad: it asserts
                    tensors = {k: mode.from_tensor(v.detach()) for k, v in state_names}
                    torch.func.functional_call(module, tensors, fake.args, fake.kwargs)
            except FxgrowError:
                raise
            except Exception as e:
                if raw_errors:
                    raise
                root, where = e, ""
                while root.__cause__ is not None:
                    where = where or _shape_prop_node(str(root), getattr(module, "gm", None))
                    root = root.__cause__
                first = (str(root).strip().splitlines() or [type(root).__name__])[0]
                raise FxgrowError(
                    f"the example input {inputs.describe()} does not fit the model{where}: {first}\n"
                    "  set model.example_input in the spec (or --input-shape) to the model's input shape"
                ) from e
        return int(counter.get_total_flops()) if count_flops else 0

    # ShapeProp prints a traceback before re-raising: keep it off the terminal.
    with torch.no_grad(), no_fused_attention(), _restore_modes(modes), contextlib.redirect_stderr(io.StringIO()):
        yield run


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


def propagate_shapes(gm: fx.GraphModule, example) -> fx.GraphModule:
    """Fill `node.meta["tensor_meta"]` for every node."""
    run_abstract(_Interpret(gm, shapes=True), example, count_flops=False)
    return gm


def propagate_shapes_and_flops(gm: fx.GraphModule, example) -> int:
    """Shapes into node meta, and the forward FLOPs FlopCounterMode counts, in one run."""
    return run_abstract(_Interpret(gm, shapes=True, by_shape=False), example)


@contextlib.contextmanager
def graph_checks(gm: fx.GraphModule):
    """Yields `check(example)`: run `gm`'s graph as it is now on meta (or fake) tensors,
    raising what the run raises. A cheap "does it run" for a rewritten graph that may not be
    recompiled yet, set up once for several settings of it (sub-models)."""
    with abstract_runs(_Interpret(gm, shapes=False)) as run:
        yield lambda example: run(example, raw_errors=True)


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
