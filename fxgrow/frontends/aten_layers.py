"""Layers in an exported (aten) graph, found through the layer-kind table's `aten` forms.

A layer is an aten call a kind reads (`aten.linear`, `aten.convNd`, `aten.embedding`, GPT-2's
Conv1D pattern `view -> addmm -> view`) whose weight operand is a parameter. It becomes the
kind's functional form (`F.linear(x, w, b)`, ...) tagged as fxgrow tags a functionalized
layer, named by the module that called it (the innermost `nn_module_stack` entry): a tied
GPT-2 head is the layer `lm_head` reading the one chain of `transformer.wte.weight`. A call
whose weight is computed (not a parameter) stays as it is, and inspect reports the weight
untouched with that reason.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..ir import META
from ..layers import kind_of_aten, split_key


def stack_path(node: fx.Node) -> str:
    """The module path a node of an exported graph was computed in ("" at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _parameter(gm: fx.GraphModule, operand: Any) -> str | None:
    """The parameter key a get_attr operand reads (None: not a parameter)."""
    if not isinstance(operand, fx.Node) or operand.op != "get_attr":
        return None
    owner, name = split_key(operand.target)
    module = gm.get_submodule(owner) if owner else gm
    return operand.target if isinstance(module._parameters.get(name), nn.Parameter) else None


def mark_layers(gm: fx.GraphModule, types: dict[str, str]) -> list[str]:
    """Rewrite every aten layer call of `gm` into its kind's functional form with fxgrow's
    layer tag; `types` gives the user's module class names by path. Returns the layer paths."""
    graph, taken, found = gm.graph, {}, []
    for node in list(graph.nodes):
        if node.op != "call_function" or (kind := kind_of_aten(node.target)) is None:
            continue
        form = kind.aten[node.target](node)
        if form is None:
            continue
        operands = {role: form.args[kind.position(role)] for role in kind.params}
        chains = {role: _parameter(gm, op) for role, op in operands.items()}
        if chains.get("weight") is None or any(op is not None and chains[r] is None for r, op in operands.items()):
            continue  # a computed weight or bias: not a layer fxgrow can rewrite
        path = stack_path(form.replaces) or split_key(chains["weight"])[0]
        if taken.setdefault(path, chains["weight"]) != chains["weight"]:  # one module, two weights
            path = chains["weight"]
            taken[path] = chains["weight"]
        with graph.inserting_before(form.replaces):
            call = graph.call_function(kind.function, form.args)
        call.meta.update({k: v for k, v in form.replaces.meta.items() if k != META})
        weight = gm.get_parameter(chains["weight"])
        call.meta[META] = {"role": "layer", "source": path, "module_type": types.get(path, "?"), "functional": True,
                           "chains": chains, "units": {path: (chains["weight"], chains.get("bias"))},
                           "matrix": weight.dim() >= 2}
        for role, op in operands.items():
            if op is not None and META not in op.meta:
                owner, name = split_key(op.target)
                op.meta[META] = {"role": "param", "source": op.target, "layer": owner, "param": name}
        form.replaces.replace_all_uses_with(call)
        graph.erase_node(form.replaces)
        found.append(path)
    graph.eliminate_dead_code()  # the rest of a pattern (Conv1D's addmm and input view)
    return found
