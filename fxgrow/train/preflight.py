"""Before the first step: does the model take the data's batches and return logits?

One real forward of two examples, in eval mode, without gradients and with the random
generators untouched (a resumed run stays bit-identical). A model that fails is refused
naming the model, the input shape and the layer it failed in; one that returns anything
but the logits its objective needs ((batch, classes), or
(batch, tokens, vocab) for causal_lm), or fewer classes than the data has, is refused too. This
replaces a traceback from deep inside the first step (`mat1 and mat2 shapes cannot be
multiplied`, `Expected input batch_size (1) to match target batch_size (32)`)."""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from ..errors import FxgrowError
from ..ir import META
from .objectives import Classification, Objective, logits_of


class ModelDataMismatch(FxgrowError):
    """The model does not accept the data's batches, or does not return logits for them."""


def check_model_fits(model: nn.Module, example: torch.Tensor, num_classes: int, model_name: str,
                     data_name: str, objective: Objective | None = None) -> None:
    x = torch.cat([example[:1], example[:1]])
    shape = list(x.shape)
    modes = {m: m.training for m in model.modules()}
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            out, failed = _run_tracking(model, x)
    finally:
        for m, training in modes.items():
            m.training = training
    where = f"the model {model_name}"
    if failed is not None:
        layer, error = failed
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if isinstance(error, IndexError) and not x.is_floating_point():  # an embedding lookup past its table
            raise ModelDataMismatch(f"{where} failed on token ids up to {int(x.max())} in {layer} "
                                    f"({type(error).__name__}: {first}); the data's vocabulary has {num_classes} "
                                    "ids (train.data.vocab_size): is the model's embedding smaller?") from error
        raise ModelDataMismatch(f"{where} does not accept the data: a batch of shape {shape} ({data_name}) fails "
                                f"in {layer}: {first}") from error
    objective = objective or Classification(num_classes)  # (its num_classes is the data's)
    try:
        logits = logits_of(out)
    except FxgrowError:
        raise ModelDataMismatch(f"{where} returns a {type(out).__name__}; the training loop needs a tensor of "
                                f"{objective.output_form} logits (or an output with .logits)") from None
    problem = objective.output_problem(logits, shape)
    if problem:
        raise ModelDataMismatch(f"{where} returns shape {list(logits.shape)} for a batch of shape {shape} "
                                f"({data_name}); {problem}")
    problem = objective.width_problem(logits.shape[-1], data_name)
    if problem:
        raise ModelDataMismatch(f"{where} {problem}")


def _run_tracking(model: nn.Module, x: torch.Tensor):
    """(output, None), or (None, (where it failed, the exception))."""
    if isinstance(model, fx.GraphModule):
        interpreter = _Tracking(model)
        try:
            return interpreter.run(x), None
        except Exception as e:  # noqa: BLE001 (any failure is reported with its layer)
            return None, (interpreter.where(), e)
    active: list[str] = []  # the modules whose forward is running, outermost first

    def enter(name):
        def hook(module, args):
            active.append(name)
        return hook

    def leave(module, args, output):  # returns None: the output stays what it was
        active.pop()

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        return model(x), None
    except Exception as e:  # noqa: BLE001
        if active:
            return None, (f"layer {active[-1]!r} ({type(model.get_submodule(active[-1])).__name__})", e)
        return None, (f"{type(model).__name__}.forward", e)
    finally:
        for h in hooks:
            h.remove()


class _Tracking(fx.Interpreter):
    """Runs a GraphModule node by node, remembering the node running."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.node = n
        return super().run_node(n)

    def where(self) -> str:
        n = self.node
        if n is None:
            return "the model"
        info = n.meta.get(META) or {}
        if info.get("role") == "layer" or n.op == "call_module":
            path = info.get("source", n.target)
            with contextlib.suppress(AttributeError):
                return f"layer {path!r} ({type(self.module.get_submodule(path)).__name__})"
            return f"layer {path!r}"
        target = getattr(n.target, "__name__", str(n.target))
        return f"node {n.name!r} ({target})"
