"""Fold: evaluate every weight chain once and rebuild plain modules.

The result has no fxgrow node and no producer overhead, and its module paths are the
original ones, so when shapes are unchanged its state_dict loads (strict) into the
user's original model class. Passes that changed more than weight chains (sorted
slicing) are reversed first, at their current setting (`Pass.reverse`); modules a pass put
in the activation path (filter pruning's masked norms) write plain graph code in their
place (`fold_call(gm, node)`).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .frontends import frontend_of
from .ir import META, evaluate_chain, is_layer, layer_chain_keys, meta, replace_submodule, weight_chains
from .layers import layer_call


@torch.no_grad()
def fold(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """Return a GraphModule whose layers are plain modules (or, for layers the user wrote as
    function calls, plain parameters) holding the chains' values. Each chain is evaluated
    once into one parameter that every layer reading it holds: tied weights stay tied."""
    if not inplace:
        gm = copy.deepcopy(gm)
    reverse_passes(gm)
    for node in list(gm.graph.nodes):  # modules a pass put in the activation path write their plain code
        if node.op == "call_module" and callable(getattr(gm.get_submodule(node.target), "fold_call", None)):
            gm.get_submodule(node.target).fold_call(gm, node)
    graph = gm.graph
    chains = weight_chains(gm)
    values = {key: evaluate_chain(gm, chain, folding=True).detach().clone() for key, chain in chains.items()}
    params = {}
    for key, chain in chains.items():  # the value goes into the parameter the chain belongs to
        params[key] = _set_parameter(gm, key, values[key])
        plain = chain.head
        if plain.target != key:  # a template bank's head: read the parameter itself
            with graph.inserting_before(chain.head):
                plain = graph.get_attr(key)
        if chain.tail is not plain:
            chain.tail.replace_all_uses_with(plain)
    rebuilt: dict[str, nn.Module] = {}
    coded: set[str] = set()  # layers no plain module holds: written as their kind's plain ops
    for node in list(graph.nodes):
        if not is_layer(node):
            continue
        keys = layer_chain_keys(node)
        if meta(node).get("functional"):  # its operands read the parameters now
            del node.meta[META]
            continue
        layer, call = meta(node)["source"], layer_call(node, gm)
        if layer not in rebuilt:
            module = call.kind.rebuild({role: values[key] if key else None for role, key in keys.items()},
                                       call.options)
            if module is None:  # no plain module holds these tensors: a holder of them, and plain ops
                module = nn.Module()
                coded.add(layer)
            for role, key in keys.items():
                if key:
                    owner, _, name = role.rpartition(".")
                    if owner and not hasattr(module, owner):
                        module.add_module(owner, nn.Module())
                    setattr(module.get_submodule(owner) if owner else module, name, params[key])
            replace_submodule(gm, layer, module)
            rebuilt[layer] = module
        if layer in coded:
            _write_code(gm, node, call, layer, keys, values, rebuilt[layer])
            continue
        inputs = {name: call.options[name] for name in call.kind.inputs
                  if call.options[name] is not call.kind.defaults.get(name, object())
                  and call.options[name] != call.kind.defaults.get(name, object())}
        with graph.inserting_before(node):
            plain = graph.call_module(layer, (call.x,), inputs)
        plain.meta.update({k: v for k, v in node.meta.items() if k != META})
        node.replace_all_uses_with(plain)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in graph.nodes:
        node.meta.pop(META, None)
    if hasattr(gm, META):
        delattr(gm, META)
    if frontend_of(gm) != "export":  # an exported graph's modules are containers of the user's state,
        gm.delete_all_unused_submodules()  # read or not (a tied alias), so its state_dict stays the model's
    graph.lint()
    gm.recompile()
    return gm


def _write_code(gm: fx.GraphModule, node: fx.Node, call, layer: str, keys: dict, values: dict,
                holder: nn.Module) -> None:
    """Layer `node` as its kind's plain ops (`LayerKind.fold_code`), reading the parameters
    that `holder`, at the layer's path, holds under their roles' names."""
    graph = gm.graph
    if call.kind.fold_code is None:
        raise ValueError(f"fold: no plain module holds layer '{layer}' ({call.kind.name}) and its kind "
                         "writes no plain code")

    def get(role: str) -> fx.Node | None:
        if not keys.get(role):
            return None
        with graph.inserting_before(node):
            return graph.get_attr(f"{layer}.{role}")
    shapes = {role: tuple(values[key].shape) for role, key in keys.items() if key}
    value = call.kind.fold_code(graph, call, get, shapes, holder)
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _set_parameter(gm: nn.Module, key: str, value: torch.Tensor) -> nn.Parameter:
    """Make `value` the parameter `key` (a template-mixed weight has none left: it gets one),
    and of every other name holding the same tensor (a tied alias the graph does not read,
    such as an exported GPT-2's `lm_head.weight`), so the state_dict stays tied."""
    owner_path, _, name = key.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = owner._parameters.get(name)
    param = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    owner._parameters[name] = param
    for module in gm.modules() if old is not None else ():
        for n, p in module._parameters.items():
            if p is old:
                module._parameters[n] = param
    return param


def reverse_passes(gm: fx.GraphModule, full: bool = False) -> list[str]:
    """Call the `reverse` of every reversible pass that rewrote `gm`, in the reverse of the
    order they apply in (their producers' ranks), at their current setting (with `full`,
    their largest). Returns their kinds."""
    from .passes import PASS_REGISTRY

    done = []
    for cls in sorted((c for c in PASS_REGISTRY.values() if c.reversible), key=lambda c: -(c.rank or 0)):
        if cls.applied_to(gm):
            cls.reverse(gm, full=full)
            done.append(cls.kind)
    return done

