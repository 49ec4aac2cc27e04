"""Sorted slicing's shape literals: every literal size of a sliced group's dim (the channel
analysis's `ChannelGroup.size_uses`, found with `channel_groups(gm, follow_sizes=True)`)
becomes a call of an `ActiveSize` module, so the graph reshapes the sliced tensors to the
active sub-model's sizes; `fold_sizes` turns them back into constants at the active point.

A literal is rewritten by where it sits (node, argument, element), never by its value: in a
model whose head count equals its head_dim both are 8, and only one of them is sliced."""
from __future__ import annotations

import collections

from torch import fx

from ..ir import META
from ..nn.sizes import ActiveSize
from ..nn.slicing import DimLayout, Segment, SubnetState

ROLE = "active_size"


def follow_sizes(gm: fx.GraphModule, groups, state: SubnetState, kind: str = "sorted_slicing") -> list[str]:
    """Rewrite every size use of the sliced `groups` (a `SlicePlan`, or its list of sliced
    `ChannelGroup`s) into an `ActiveSize` call; returns the rewritten node names."""
    sliced = getattr(groups, "sliced", groups)
    found: dict[tuple[str, int, int | None], tuple[int, list[Segment]]] = {}
    for g in sliced:
        for use in g.size_uses:
            entry = found.setdefault((use.node, use.arg, use.item), (use.size, []))
            if entry[0] != use.size:
                raise ValueError(f"{use.node}: argument {use.arg} read as sizes {entry[0]} and {use.size}")
            entry[1].append(Segment(g.id, use.offset, use.repeat))
    nodes = {n.name: n for n in gm.graph.nodes}
    rewritten = collections.Counter()
    for (name, arg, item), (size, segments) in found.items():
        node = nodes[name]
        old = node.args[arg] if item is None else node.args[arg][item]
        if old != size:
            raise ValueError(f"{name}: argument {arg}{'' if item is None else f'[{item}]'} is {old!r}, "
                             f"the analysis read the literal {size}")
        path = f"{META}.{name}_size{arg}" + ("" if item is None else f"_{item}")
        gm.add_submodule(path, ActiveSize(state, DimLayout(0, size, tuple(sorted(segments, key=lambda s: s.offset)))))
        with gm.graph.inserting_before(node):
            counted = gm.graph.call_module(path, ())
        counted.meta[META] = {"role": ROLE, "pass": kind, "source": name}
        if "nn_module_stack" in node.meta:  # depth and inspect read a node's module from it
            counted.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        if item is None:
            node.update_arg(arg, counted)
        else:
            value = node.args[arg]
            node.update_arg(arg, type(value)(counted if i == item else v for i, v in enumerate(value)))
        rewritten[name] += 1
    if rewritten:
        gm.recompile()
    return list(rewritten)


def fold_sizes(gm: fx.GraphModule) -> int:
    """Every `ActiveSize` call becomes its value at the active sub-model (a constant again);
    returns how many. The graph is not recompiled (the caller finishes its own rewrite)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(module := gm.get_submodule(node.target), ActiveSize):
            continue
        value = module()
        for user in list(node.users):
            user.replace_input_with(node, value)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        count += 1
    return count
