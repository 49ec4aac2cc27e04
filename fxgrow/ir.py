"""The weight-chain IR.

A *layer* is a module of a targetable kind (`fxgrow.layers`), or a call of a layer function
(`F.linear`, `F.conv2d`, `F.embedding`, ...) whose weight operand is a parameter: a subclass
FX traced through (timm's `Linear`) or the user's own functional code. `layer_table` lists
them by what targets name (`Layer`).

`functionalize` turns a targeted `call_module` layer into a `call_function` whose weight and
bias operands are *chains*: `get_attr(param)` followed by producer `call_module` nodes (a
functional layer keeps its call; its operands become chains). A chain belongs to a
parameter, not a layer: a parameter two layers read (tied weights, one module called twice)
has one chain both read. The parameter stays on its module (so its state_dict key is
unchanged); producers live under `gm.fxgrow.<owner path>.<param>_<role>`. Every node fxgrow
adds carries `node.meta["fxgrow"]`: {"role": "layer" | "param" | "producer" | "mode",
"source": ..., ...}; a layer node's `chains` says which parameter each operand is.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import FxgrowError
from .layers import (LayerKind, argument, functional_refusal, kind_of, kind_of_function, require_functional,
                     split_key)
from .nn.base import Producer
from .specs.base import Selectable
from .trace import module_type

META = "fxgrow"


def meta(node: fx.Node) -> dict[str, Any]:
    return node.meta.get(META, {})


def is_layer(node: fx.Node) -> bool:
    return node.op == "call_function" and meta(node).get("role") == "layer"


@dataclass(frozen=True)
class Layer:
    """One layer as targets see it: a module of a targetable kind (attention: one of its two
    projections, `<path>.in_proj` and `<path>.out_proj`), or a call of a layer function whose
    weight is a parameter, named by the weight's owner (plus the weight's name when it is not
    `weight`)."""

    path: str
    kind: LayerKind
    module: str              # the module path its graph node stands for (`source` in node meta)
    module_type: str         # the class name of the user's module
    weight: str              # the parameter its weight is (first name: tied layers share it)
    bias: str | None
    matrix: bool             # the weight has two or more dims: a default target
    refusal: str = ""        # why it cannot be functionalized ("" when it can)

    @property
    def names(self) -> tuple[str, ...]:
        """The type names targets select it by: its kind's and its own class's."""
        return tuple(dict.fromkeys((self.kind.type_name, self.module_type)))

    @property
    def selectable(self) -> Selectable:
        return Selectable(self.names, self.module, self.matrix, self.refusal)


def layer_table(gm: fx.GraphModule) -> dict[str, Layer]:
    """Every targetable layer in graph order, plain or functionalized: {path: Layer}."""
    names = parameter_names(gm)
    out: dict[str, Layer] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = kind_of(module, exact=True)
            if kind is None or not kind.targetable:
                continue
            refusal = functional_refusal(module)
            for unit, (w_role, b_role) in kind.units.items():
                weight = get_param(module, w_role)
                if weight is None:
                    continue
                bias = get_param(module, b_role) if b_role else None
                path = f"{node.target}.{unit}" if unit else node.target
                out.setdefault(path, Layer(path, kind, node.target, module_type(gm, node.target),
                                           names.get(id(weight), f"{node.target}.{w_role}"),
                                           names.get(id(bias)) if bias is not None else None,
                                           weight.dim() >= 2, refusal))
        elif is_layer(node):
            tag, kind = meta(node), kind_of_function(node.target)
            units = tag.get("units") or {tag["source"]: (f"{tag['source']}.weight", None)}
            for path, (weight, bias) in units.items():
                out.setdefault(path, Layer(path, kind, tag["source"], tag.get("module_type", "?"), weight, bias,
                                           tag.get("matrix", True)))
        elif node.op == "call_function" and (found := _functional_layer(gm, node, names)) is not None:
            out.setdefault(found.path, found)
    return out


def _functional_layer(gm: fx.GraphModule, node: fx.Node, names: dict[int, str]) -> Layer | None:
    """The layer a plain `call_function` node computes, when its weight is a parameter."""
    kind = kind_of_function(node.target)
    if kind is None or not kind.targetable or "weight" not in kind.params or is_layer(node):
        return None
    tensors, targets = {}, {}
    for role in kind.params:
        operand = argument(node, kind.position(role), role)
        if operand is None:
            continue
        if not isinstance(operand, fx.Node) or operand.op != "get_attr":
            return None  # a computed weight (`inspection.untouched` says so)
        value = fetch_attr(gm, operand.target)
        if not isinstance(value, nn.Parameter):
            return None
        tensors[role], targets[role] = value, names.get(id(value), operand.target)
    if "weight" not in tensors:
        return None
    owner, name = split_key(targets["weight"])
    path = owner if name == "weight" and owner else targets["weight"]
    return Layer(path, kind, path, module_type(gm, owner), targets["weight"], targets.get("bias"),
                 tensors["weight"].dim() >= 2)


def layer_types(gm: fx.GraphModule) -> dict[str, str]:
    """Targetable layers in graph order: {path: the type name of their kind}."""
    return {path: layer.kind.type_name for path, layer in layer_table(gm).items()}


def parameter_names(gm: nn.Module) -> dict[int, str]:
    """{id(parameter): its first name}: one name per tensor, however many modules hold it."""
    return {id(p): name for name, p in reversed(list(gm.named_parameters(remove_duplicate=False)))}


def get_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` for a dotted name ("out_proj.weight"), or None."""
    owner, _, attr = name.rpartition(".")
    try:
        return getattr(module.get_submodule(owner) if owner else module, attr, None)
    except AttributeError:
        return None


def functionalize(gm: fx.GraphModule, layers: list[str], recompile: bool = True) -> None:
    """Rewrite the nodes of `layers` (paths from `layer_table`) into their functional form
    with chain operands. Every parameter they read gets one chain head, shared by every layer
    and op that reads it: a parameter tied into a layer not asked for functionalizes that layer
    too (or is refused), so no reader keeps the raw weight. Already functional layers are left
    alone. Outputs are unchanged bit for bit. Without `recompile` the caller recompiles (a
    pipeline does once, at its end)."""
    table = layer_table(gm)
    wanted = {table[p].module if p in table else p for p in layers}
    names = parameter_names(gm)
    todo = [n for n in gm.graph.nodes if _layer_module(gm, n, table, names) in wanted]
    todo += _tied_users(gm, todo, table, names)
    heads = _heads(gm, todo, names)
    for node in todo:
        if node.op == "call_module":
            _functionalize_module(gm, node, heads, names)
        else:
            _tag_functional(gm, node, heads, names)
    if recompile:
        gm.recompile()


def _layer_module(gm: fx.GraphModule, node: fx.Node, table: dict[str, Layer], names: dict[int, str]) -> str | None:
    """The module path a not yet functional layer node stands for (None: not one)."""
    if node.op == "call_module":
        return node.target if any(layer.module == node.target for layer in table.values()) else None
    if node.op == "call_function" and not is_layer(node) and kind_of_function(node.target) is not None:
        found = _functional_layer(gm, node, names)
        return found.module if found is not None else None
    return None


def _tensors_of(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """The parameters a not yet functional layer node reads."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = kind_of(module, exact=True)
        return [t for r in kind.params if (t := get_param(module, r)) is not None]
    kind = kind_of_function(node.target)
    return [fetch_attr(gm, op.target) for r in kind.params
            if isinstance(op := argument(node, kind.position(r), r), fx.Node) and op.op == "get_attr"]


def _tied_users(gm: fx.GraphModule, todo: list[fx.Node], table: dict[str, Layer],
                names: dict[int, str]) -> list[fx.Node]:
    """Module calls outside `todo` that read a parameter a `todo` node reads (tied weights):
    layers to functionalize with them; any other module reading one is refused."""
    ids = {id(t) for n in todo for t in _tensors_of(gm, n)}
    extra: list[fx.Node] = []
    changed = True
    while changed:
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_module" or node in todo or node in extra:
                continue
            module = gm.get_submodule(node.target)
            held = [(n, p) for n, p in module.named_parameters() if id(p) in ids]
            if not held:
                continue
            if _layer_module(gm, node, table, names) is None or functional_refusal(module):
                raise FxgrowError(
                    f"'{names.get(id(held[0][1]))}' is the weight of a layer being rewritten, and "
                    f"'{node.target}' ({module_type(gm, node.target)}) reads it too as '{node.target}.{held[0][0]}' "
                    f"but cannot be rewritten ({functional_refusal(module) or 'it is not a layer fxgrow knows'}): "
                    "it would keep the raw weight; exclude the layer, or untie the weights")
            extra.append(node)
            ids |= {id(t) for t in _tensors_of(gm, node)}
            changed = True
    return extra


def _heads(gm: fx.GraphModule, todo: list[fx.Node], names: dict[int, str]) -> dict[int, fx.Node]:
    """{id(parameter): its chain head} for every parameter `todo` reads: one get_attr node,
    before its first reader, that every other get_attr of the tensor is merged into."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers: dict[int, list[fx.Node]] = {}
    for node in todo:
        for t in _tensors_of(gm, node):
            readers.setdefault(id(t), []).append(node)
    gets: dict[int, list[fx.Node]] = {k: [] for k in readers}
    for node in graph.nodes:
        if node.op == "get_attr" and id(value := fetch_attr(gm, node.target)) in gets:
            gets[id(value)].append(node)
    heads = {}
    for key, users in readers.items():
        tagged = [g for g in gets[key] if meta(g).get("role") == "param"]
        head = tagged[0] if tagged else None
        if head is None:
            first = min(users + gets[key], key=order.__getitem__)
            with graph.inserting_before(first):
                head = graph.get_attr(names.get(key) or gets[key][0].target)
            owner, name = split_key(head.target)
            head.meta[META] = {"role": "param", "source": head.target, "layer": owner, "param": name}
        for g in gets[key]:
            if g is not head:
                g.replace_all_uses_with(head)
                graph.erase_node(g)
        heads[key] = head
    return heads


def _functionalize_module(gm: fx.GraphModule, node: fx.Node, heads: dict[int, fx.Node],
                          names: dict[int, str]) -> None:
    module = gm.get_submodule(node.target)
    kind = require_functional(node.target, module)
    bound = _bind(node, module, kind)
    options = kind.options(module)
    graph = gm.graph
    chains: dict[str, str | None] = {}
    args = []
    with graph.inserting_before(node):
        for name in kind.signature:
            if name in kind.params:
                tensor = get_param(module, name)
                chains[name] = names.get(id(tensor)) if tensor is not None else None
                args.append(heads[id(tensor)] if tensor is not None else None)
            elif name == "training" and name not in options:
                args.append(_mode_node(gm, node.target))
            elif name in kind.inputs:
                args.append(bound.get(name, kind.defaults.get(name)))
            else:
                args.append(options[name])
        call = graph.call_function(kind.function, (bound["input"], *args))
    units = {(f"{node.target}.{unit}" if unit else node.target): (chains[w], chains.get(b) if b else None)
             for unit, (w, b) in kind.units.items() if chains.get(w) is not None}
    call.meta.update(node.meta)
    call.meta[META] = {"role": "layer", "source": node.target, "module_type": module_type(gm, node.target),
                       "functional": False, "chains": chains, "units": units,
                       "matrix": all(get_param(module, w).dim() >= 2 for w, _ in kind.units.values()
                                     if get_param(module, w) is not None)}
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def _bind(node: fx.Node, module: nn.Module, kind: LayerKind) -> dict[str, Any]:
    """The call's arguments by name ("input" for the first); only the kind's `inputs` may
    follow it."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    first = parameters[0] if parameters else "input"
    bound = dict(zip(parameters, node.args)) | dict(node.kwargs)
    extra = [k for k in bound if k != first and k not in kind.inputs]
    if first not in bound or extra:
        raise FxgrowError(f"layer '{node.target}' ({type(module).__name__}) is called with "
                          f"{', '.join(extra) or 'no input'}, which its functional form does not take")
    bound["input"] = bound.pop(first)
    return bound


def _mode_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """A node giving the model's mode (True while training) to a layer whose module read
    `self.training` (attention's dropout)."""
    from .trace import ModeSelect

    target = f"{META}.{path}.mode"
    if not _has_submodule(gm, target):
        gm.add_submodule(target, ModeSelect(True, False))
    node = gm.graph.call_module(target, ())
    node.meta[META] = {"role": "mode", "source": path}
    return node


def _tag_functional(gm: fx.GraphModule, node: fx.Node, heads: dict[int, fx.Node], names: dict[int, str]) -> None:
    layer = _functional_layer(gm, node, names)
    kind = layer.kind
    chains: dict[str, str | None] = {}
    for role in kind.params:
        position = kind.position(role)
        operand = argument(node, position, role)
        if not isinstance(operand, fx.Node):
            chains[role] = None
            continue
        head = heads[id(fetch_attr(gm, operand.target))]
        chains[role] = head.target
        if len(node.args) > position:
            node.update_arg(position, head)
        else:
            node.update_kwarg(role, head)
    node.meta[META] = {"role": "layer", "source": layer.path, "module_type": layer.module_type,
                       "functional": True, "chains": chains,
                       "units": {layer.path: (chains["weight"], chains.get("bias"))}, "matrix": layer.matrix}


class Chains(dict):
    """{parameter key: WeightChain}, one entry per chain; lookups also take every name a layer
    reads it by ("lm_head.weight" for a weight tied to "wte.weight", "attn.in_proj.weight")."""

    def __init__(self):
        super().__init__()
        self.aliases: dict[str, str] = {}

    def _key(self, key: str) -> str:
        return key if dict.__contains__(self, key) else self.aliases.get(key, key)

    def __getitem__(self, key: str) -> "WeightChain":
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, self._key(key))

    def get(self, key: str, default=None):
        return dict.get(self, self._key(key), default)


@dataclass
class WeightChain:
    """`head` is the get_attr node; `producers` the call_module nodes after it, in order."""

    layer: str
    param: str
    head: fx.Node
    producers: list[fx.Node] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.param}" if self.layer else self.param

    @property
    def tail(self) -> fx.Node:
        return self.producers[-1] if self.producers else self.head

    def modules(self, gm: fx.GraphModule) -> list[Producer]:
        return [gm.get_submodule(p.target) for p in self.producers]




def layer_operands(node: fx.Node) -> dict[str, fx.Node | None]:
    """{operand name: tail node} of a functional layer node (None for an absent bias)."""
    kind = kind_of_function(node.target)
    return {name: argument(node, kind.position(name), name) for name in kind.params}


def layer_chain_keys(node: fx.Node) -> dict[str, str | None]:
    """{operand name: the parameter its chain belongs to} of a functionalized layer node."""
    tag = meta(node)
    if "chains" in tag:
        return tag["chains"]
    return {name: f"{tag['source']}.{name}" if tail is not None else None  # tagged by hand (tests)
            for name, tail in layer_operands(node).items()}


def weight_chains(gm: fx.GraphModule) -> Chains:
    """Every chain in the graph, keyed by its parameter, in graph order of their layers."""
    chains = Chains()
    for node in gm.graph.nodes:
        if not is_layer(node):
            continue
        tag, tails = meta(node), layer_operands(node)
        for pname, key in layer_chain_keys(node).items():
            tail = tails.get(pname)
            if tail is None or key is None:
                continue
            if f"{tag['source']}.{pname}" != key:
                chains.aliases[f"{tag['source']}.{pname}"] = key
            if key in chains:
                continue
            producers = []
            cur = tail
            while meta(cur).get("role") == "producer":
                producers.append(cur)
                cur = cur.args[0]
            if cur.op != "get_attr":
                raise FxgrowError(f"weight chain of '{key}' does not start at a parameter")
            owner, name = split_key(key)
            chains[key] = WeightChain(owner, name, cur, producers[::-1])
        for unit, (weight, bias) in (tag.get("units") or {}).items():
            for role, key in (("weight", weight), ("bias", bias)):
                if key is not None and f"{unit}.{role}" != key:
                    chains.aliases[f"{unit}.{role}"] = key
    return chains


def insert_producer(gm: fx.GraphModule, chain: WeightChain, module: Producer,
                    pass_kind: str) -> fx.Node:
    """Insert `module` into `chain` after every producer of lower or equal rank and
    register it under `fxgrow.<layer path>.<param>_<role>`. Returns the new node."""
    prev = chain.head
    for p in chain.producers:
        if gm.get_submodule(p.target).rank <= module.rank:
            prev = p
    path = f"{META}.{chain.key}_{module.role}"  # mirrors the parameter's own path
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
