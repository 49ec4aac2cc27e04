"""One exported graph that follows `.train()` / `.eval()` as the original model does.

The model is exported in train mode, where every mode-dependent op shows its train-time
arguments (an eval export drops sdpa's `dropout_p` altogether). Each such argument then
becomes a `ModeSelect` node (fxgrow's mode constant, as the fx front-end uses): dropout's
`train` flag, sdpa's `dropout_p`, batch norm's `training` flag and its `num_batches_tracked`
increment give their train value while the module trains and their eval value otherwise.
The graph is mode-free; `gm.train()` / `gm.eval()` switch it. `verify_modes` then checks, in
eval and in train under the same seed, that the graph computes exactly what the model does;
a model with other mode-dependent code (an `if self.training:` branch) is refused, naming
the first module whose eval export differs.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import TraceError
from ..layers import argument
from ..trace import ModeSelect
from .aten_layers import stack_path

aten = torch.ops.aten
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default)


def _select(gm: fx.GraphModule, node: fx.Node, index: int, train: Any, evaluating: Any) -> fx.Node:
    """A `ModeSelect` node before `node` (at `mode_select.<index>`, as the fx front-end names them)."""
    name = f"mode_select.{index}"
    gm.add_submodule(name, ModeSelect(train, evaluating))
    with gm.graph.inserting_before(node):
        select = gm.graph.call_module(name, ())
    select.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    return select


def _set(node: fx.Node, position: int, name: str, value: Any) -> None:
    if len(node.args) > position:
        node.update_arg(position, value)
    else:
        node.update_kwarg(name, value)


def make_mode_aware(gm: fx.GraphModule, model: nn.Module) -> int:
    """Rewrite the train-mode export `gm` of `model` in place; returns the number of
    mode-dependent arguments made mode-aware."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS and argument(node, 2, "train") is True:
            _set(node, 2, "train", _select(gm, node, count, True, False))
        elif node.target is aten.scaled_dot_product_attention.default and (argument(node, 4, "dropout_p") or 0.0) > 0:
            _set(node, 4, "dropout_p", _select(gm, node, count, argument(node, 4, "dropout_p"), 0.0))
        elif node.target is aten.batch_norm.default and argument(node, 5, "training") is True:
            path = stack_path(node)
            module = _module(model, path)
            if module is not None and getattr(module, "momentum", 0.1) is None:
                raise TraceError(f"module '{path}' ({type(module).__name__}) has momentum=None (a cumulative "
                                 "average, its factor computed in Python from num_batches_tracked): torch.export "
                                 "bakes the factor of one step into the graph; set a momentum")
            _set(node, 5, "training", _select(gm, node, count, True, False))
        elif node.target is aten.add_.Tensor and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "get_attr" and node.args[0].target.endswith("num_batches_tracked"):
            node.update_arg(1, _select(gm, node, count, node.args[1], 0))
        else:
            continue
        count += 1
    return count


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def verify_modes(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict,
                 output: Callable[[Any], Any], eval_graph: Callable[[], fx.GraphModule]) -> None:
    """Require `gm(*args, **kwargs)` to equal `output(model(...))` in eval and in train (same
    seed), up to float32 rounding (`_equal`). State the runs change (batch-norm statistics) is put back."""
    reference = copy.deepcopy(model)
    saved = {k: v.clone() for k, v in gm.state_dict(keep_vars=True).items()}
    try:
        for training in (False, True):
            gm.train(training)
            reference.train(training)
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(0)
                ours = gm(*args, **kwargs)
                torch.manual_seed(0)
                theirs = output(reference(*args, **kwargs))
            if not _equal(ours, theirs):
                raise TraceError(_difference(gm, eval_graph, training, ours, theirs))
    finally:
        with torch.no_grad():
            for k, v in gm.state_dict(keep_vars=True).items():
                v.copy_(saved[k])
        gm.train()


TOLERANCE = 1e-5  # of the output's largest magnitude: rounding, where a wrong mode is O(1)


def _equal(a: Any, b: Any) -> bool:
    """Equal up to float32 rounding: a train-mode export reorders some kernels' layouts
    (GPT-2's attention under dropout: 6e-8 from eager, measured), a dropped or extra dropout
    changes outputs by their own size."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y:
                return False
        elif x.shape != y.shape or x.dtype != y.dtype:
            return False
        elif x.is_floating_point() and x.numel():
            if not (x - y).abs().max().item() <= TOLERANCE * max(1.0, y.abs().max().item()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


_IGNORED = {aten.contiguous.default, aten.alias.default, aten._assert_tensor_metadata.default, aten.clone.default,
            *_DROPOUTS}


def _difference(gm: fx.GraphModule, eval_graph: Callable[[], fx.GraphModule], training: bool, ours, theirs) -> str:
    mode = "train()" if training else "eval()"
    diff = max(((x - y).abs().max().item() for x, y in zip(torch.utils._pytree.tree_leaves(ours),
                                                              torch.utils._pytree.tree_leaves(theirs))
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape), default=None)
    where = ""
    if not training:  # name the first op an eval export computes differently
        try:
            other = eval_graph()
        except Exception:  # noqa: BLE001  (the message below stands without it)
            other = None
        if other is not None:
            ops = lambda g: [n for n in g.graph.nodes if n.op == "call_function" and n.target not in _IGNORED]  # noqa: E731
            for a, b in zip(ops(gm), ops(other)):
                if a.target != b.target:
                    trace = (b.meta.get("stack_trace") or "").strip().splitlines()
                    where = (f"; the first difference is in module '{stack_path(b) or '<root>'}' "
                             f"({b.target} in eval, {a.target} in train)" + (f" at {trace[-2].strip()}" if len(trace) > 1 else ""))
                    break
    return (f"the exported model does not behave like the original in {mode} (max abs diff {diff}){where}: "
            "fxgrow makes dropout, attention dropout and batch norm follow train()/eval(), but other code that "
            "reads self.training (a stochastic-depth branch, say) is frozen in the train-mode export; build the "
            "model without that branch, or use model.frontend: fx with the module as a leaf")
