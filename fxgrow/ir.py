"""The weight-chain IR.

`functionalize` turns a targeted `call_module` layer into a `call_function` whose weight and
bias operands are *chains*: `get_attr(param)` followed by producer `call_module` nodes.
The parameter stays on the original module (so its state_dict key is unchanged); producers
live under `gm.fxgrow.<layer path>.<param>_<role>`. Every node fxgrow adds carries
`node.meta["fxgrow"]`: {"role": "layer" | "param" | "producer", "source": ..., ...}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import FxgrowError
from .layers import argument, kind_of, kind_of_function, require_functional
from .nn.base import Producer

META = "fxgrow"


def meta(node: fx.Node) -> dict[str, Any]:
    return node.meta.get(META, {})


def is_layer(node: fx.Node) -> bool:
    return node.op == "call_function" and meta(node).get("role") == "layer"


def layer_types(gm: fx.GraphModule) -> dict[str, str]:
    """Targetable layers in graph order: {module path: type name}, plain or functionalized."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and _targetable(gm.get_submodule(node.target)):
            out.setdefault(node.target, type(gm.get_submodule(node.target)).__name__)
        elif is_layer(node):
            out.setdefault(meta(node)["source"], meta(node)["module_type"])
    return out


def _targetable(module: nn.Module) -> bool:
    kind = kind_of(module, exact=True)
    return kind is not None and kind.targetable


def functionalize(gm: fx.GraphModule, layers: list[str], recompile: bool = True) -> None:
    """Rewrite each `call_module` of `layers` into its functional form with chain operands.
    Already functional layers are left alone. Outputs are unchanged bit for bit. Without
    `recompile` the caller recompiles (a pipeline does once, at its end)."""
    wanted = set(layers)
    chains: dict[str, fx.Node] = {}  # "path.param" -> get_attr node, shared by repeat calls
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in wanted:
            continue
        module = gm.get_submodule(node.target)
        kind = require_functional(node.target, module)
        if len(node.args) != 1 or node.kwargs:
            raise FxgrowError(f"layer '{node.target}' is called with more than one input")
        options = kind.options(module)
        with graph.inserting_before(node):
            operands = []
            for pname in kind.params:
                if getattr(module, pname, None) is None:
                    operands.append(None)
                    continue
                key = f"{node.target}.{pname}"
                if key not in chains:
                    chains[key] = graph.get_attr(key)
                    chains[key].meta[META] = {"role": "param", "source": key, "layer": node.target,
                                              "param": pname}
                operands.append(chains[key])
            call = graph.call_function(kind.function, (node.args[0], *operands,
                                                       *(options[name] for name in kind.signature[len(kind.params):])))
        call.meta.update(node.meta)
        call.meta[META] = {"role": "layer", "source": node.target,
                           "module_type": type(module).__name__}
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    if recompile:
        gm.recompile()


@dataclass
class WeightChain:
    """`head` is the get_attr node; `producers` the call_module nodes after it, in order."""

    layer: str
    param: str
    head: fx.Node
    producers: list[fx.Node] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.param}"

    @property
    def tail(self) -> fx.Node:
        return self.producers[-1] if self.producers else self.head

    def modules(self, gm: fx.GraphModule) -> list[Producer]:
        return [gm.get_submodule(p.target) for p in self.producers]


def layer_operands(node: fx.Node) -> dict[str, fx.Node | None]:
    """{operand name: tail node} of a functional layer node (None for an absent bias)."""
    kind = kind_of_function(node.target)
    return {name: argument(node, kind.position(name), name) for name in kind.params}


def weight_chains(gm: fx.GraphModule) -> dict[str, WeightChain]:
    """Every chain in the graph, keyed "layer.param", in graph order of their layers."""
    chains: dict[str, WeightChain] = {}
    for node in gm.graph.nodes:
        if not is_layer(node):
            continue
        for pname, tail in layer_operands(node).items():
            if tail is None:
                continue
            key = f"{meta(node)['source']}.{pname}"
            if key in chains:
                continue
            producers = []
            cur = tail
            while meta(cur).get("role") == "producer":
                producers.append(cur)
                cur = cur.args[0]
            if cur.op != "get_attr":
                raise FxgrowError(f"weight chain of '{key}' does not start at a parameter")
            chains[key] = WeightChain(meta(node)["source"], pname, cur, producers[::-1])
    return chains


def insert_producer(gm: fx.GraphModule, chain: WeightChain, module: Producer,
                    pass_kind: str) -> fx.Node:
    """Insert `module` into `chain` after every producer of lower or equal rank and
    register it under `fxgrow.<layer path>.<param>_<role>`. Returns the new node."""
    prev = chain.head
    for p in chain.producers:
        if gm.get_submodule(p.target).rank <= module.rank:
            prev = p
    path = f"{META}.{chain.layer}.{chain.param}_{module.role}"  # mirrors the layer's own path
    if _has_submodule(gm, path):
        raise FxgrowError(f"'{chain.key}' already has a {module.role} producer")
    gm.add_submodule(path, module)
    users = list(prev.users)
    with gm.graph.inserting_after(prev):
        node = gm.graph.call_module(path, (prev,))
    for u in users:
        u.replace_input_with(prev, node)
    node.meta[META] = {"role": "producer", "pass": pass_kind, "kind": module.role,
                       "source": chain.key}
    chain.producers = [p for p in chain.producers] + [node]
    chain.producers.sort(key=lambda n: _order(gm, chain.head, n))
    return node


def _order(gm: fx.GraphModule, head: fx.Node, node: fx.Node) -> int:
    depth, cur = 0, node
    while cur is not head:
        cur, depth = cur.args[0], depth + 1
    return depth


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at `path` in place of the module there, in that module's training mode."""
    module.train(root.get_submodule(path).training)
    root.set_submodule(path, module)
    return module


def replace_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter or buffer `key` ("path.name"): a parameter stays
    a parameter (with its requires_grad), a buffer a buffer."""
    owner_path, _, name = key.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if owner._parameters.get(name) is not None:
        owner._parameters[name] = nn.Parameter(value, requires_grad=owner._parameters[name].requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        raise FxgrowError(f"'{key}' is neither a parameter nor a buffer")


def _has_submodule(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def fetch_attr(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def chain_shape(gm: fx.GraphModule, chain: WeightChain, upto: int | None = None) -> tuple[int, ...]:
    """The shape of the tensor a chain produces (or what reaches producer `upto`), from
    the producers' `output_shape`: no tensor math."""
    shape = tuple(fetch_attr(gm, chain.head.target).shape)
    for module in chain.modules(gm)[:upto]:
        shape = module.output_shape(shape)
    return shape


def producer_sites(gm: fx.GraphModule, cls: type[Producer]) -> list[tuple[WeightChain, Producer, list[Producer], torch.Tensor]]:
    """Every producer of class `cls` in `gm`'s chains, in graph order of their layers:
    (chain, producer, the producers before it, the chain's head tensor)."""
    sites = []
    for chain in weight_chains(gm).values():
        modules = chain.modules(gm)
        for i, module in enumerate(modules):
            if isinstance(module, cls):
                sites.append((chain, module, modules[:i], fetch_attr(gm, chain.head.target)))
    return sites


def run_producers(value: torch.Tensor, producers: list[Producer], folding: bool = False) -> torch.Tensor:
    """`value` through `producers` in order (with `folding`, each one's `fold`)."""
    for module in producers:
        value = module.fold(value) if folding else module(value)
    return value


def evaluate_chain(gm: fx.GraphModule, chain: WeightChain, folding: bool = False) -> torch.Tensor:
    """The tensor a chain produces now (e.g. the effective weight); with `folding`, the one
    each producer's `fold` bakes into a plain layer."""
    return run_producers(fetch_attr(gm, chain.head.target), chain.modules(gm), folding)
