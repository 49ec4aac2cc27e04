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

from .ir import META, evaluate_chain, is_layer, layer_operands, meta, replace_submodule, weight_chains
from .layers import layer_call


@torch.no_grad()
def fold(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """Return a GraphModule whose layers are plain modules holding the chains' values."""
    if not inplace:
        gm = copy.deepcopy(gm)
    reverse_passes(gm)
    for node in list(gm.graph.nodes):  # modules a pass put in the activation path write their plain code
        if node.op == "call_module" and callable(getattr(gm.get_submodule(node.target), "fold_call", None)):
            gm.get_submodule(node.target).fold_call(gm, node)
    chains = weight_chains(gm)
    rebuilt: dict[str, nn.Module] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_layer(node):
            continue
        layer = meta(node)["source"]
        if layer not in rebuilt:
            call = layer_call(node, gm)
            tensors = {name: (evaluate_chain(gm, chains[f"{layer}.{name}"], folding=True).detach().clone()
                              if tail is not None else None)
                       for name, tail in layer_operands(node).items()}
            module = call.kind.rebuild(tensors, call.options)
            replace_submodule(gm, layer, module)
            rebuilt[layer] = module
        with graph.inserting_before(node):
            call = graph.call_module(layer, (node.args[0],))
        call.meta.update({k: v for k, v in node.meta.items() if k != META})
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    if hasattr(gm, META):
        delattr(gm, META)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


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

