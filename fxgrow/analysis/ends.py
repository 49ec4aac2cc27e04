"""The layers at the ends of a traced model: the ones that read the model's input and the
ones that write its output, each through no other layer (the paper rules that treat the
first layer and the classifier apart: GraNet_uniform's classifier density, MixtureGrowth's
frozen first and last coefficients). Found in the graph, never by module name."""
from __future__ import annotations

from torch import fx

from ..ir import is_layer, meta
from ..layers import kind_of
from ..specs.base import _pattern_matches


def _layer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module path of the weight layer `node` calls (plain or functionalized), else None."""
    if is_layer(node):
        return meta(node)["source"]
    if node.op == "call_module":
        kind = kind_of(gm.get_submodule(node.target), exact=True)
        if kind is not None and kind.targetable:
            return node.target
    return None


def _reached(gm: fx.GraphModule, start: list[fx.Node], forward: bool) -> list[str]:
    """Layers met first when walking from `start` along users (forward) or inputs; a walk
    stops at each layer it meets. In graph order, without repeats."""
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        layer = _layer(gm, node) if node not in start else None
        if layer is not None:
            found.add(layer)
            continue
        stack.extend(node.users if forward else node.all_input_nodes)
    order = {}
    for node in gm.graph.nodes:
        layer = _layer(gm, node)
        if layer in found:
            order.setdefault(layer, len(order))
    return sorted(found, key=order.__getitem__)


def input_layers(gm: fx.GraphModule) -> list[str]:
    """Layers that read a model input through no other layer (the first conv of a CNN)."""
    return _reached(gm, [n for n in gm.graph.nodes if n.op == "placeholder"], forward=True)


def output_layers(gm: fx.GraphModule) -> list[str]:
    """Layers whose result reaches the model's output through no other layer (the classifier)."""
    return _reached(gm, [n for n in gm.graph.nodes if n.op == "output"], forward=False)


def named_layers(gm: fx.GraphModule, names: list[str], layers: list[str]) -> list[str]:
    """The `layers` a spec list names: `first` (input_layers), `last` (output_layers), module
    paths or `re:` patterns. A name that selects none of `layers` is a ValueError."""
    ends = {"first": set(input_layers(gm)), "last": set(output_layers(gm))} if names else {}

    def picks(name: str, layer: str) -> bool:
        return layer in ends[name] if name in ends else _pattern_matches(name, layer)

    for name in names:
        if not any(picks(name, layer) for layer in layers):
            raise ValueError(f"{name!r} names none of the layers ({', '.join(layers) or 'none'})")
    return [layer for layer in layers if any(picks(name, layer) for name in names)]
