"""The graph analyses behind sorted slicing: which residual blocks can be skipped, and which
channel groups can be sliced with the layout of every tensor dim that indexes them."""
from __future__ import annotations

import collections
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.coupling import ChannelGroup, param_key, parameter_reads
from ..ir import chain_shape, fetch_attr, layer_table, weight_chains
from ..layers import kind_of
from ..nn.slicing import DimLayout, Segment, active_channels

# --- skippable residual blocks ------------------------------------------------------------

_ADDS = {operator.add, operator.iadd, torch.add}
# Parameter-free elementwise ops after the add belong to the block (y = relu(x + f(x)) in a
# post-activation ResNet): a dropped block then hands on x itself, an exact identity.
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU,
                       nn.SELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity)
_ACTIVATION_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu,
                         F.elu, F.mish, torch.sigmoid, torch.tanh, F.dropout}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


@dataclass
class Block:
    """A skippable residual block: `x` its input, `end` the node handing on its output,
    `nodes` everything computed in between (end included)."""

    name: str
    x: fx.Node
    end: fx.Node
    nodes: set[fx.Node] = field(default_factory=set)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_residual_add(n: fx.Node) -> bool:
    is_add = ((n.op == "call_function" and n.target in _ADDS)
              or (n.op == "call_method" and n.target in ("add", "add_")))
    return (is_add and len(n.args) == 2 and not n.kwargs and all(isinstance(a, fx.Node) for a in n.args)
            and n.args[0] is not n.args[1])


def _is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    if len(n.all_input_nodes) != 1:
        return False
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _ACTIVATION_MODULES)
    if n.op == "call_function":
        return n.target in _ACTIVATION_FUNCTIONS
    return n.op == "call_method" and n.target in _ACTIVATION_METHODS


def skippable_blocks(gm: fx.GraphModule) -> list[Block]:
    """The skippable residual blocks of `gm` (after ShapeProp), in graph order.

    A block is an add of x and f(x) (x an ancestor of the other operand), extended through
    parameter-free activations after it, whose output shape equals x's shape; f must read
    nothing computed from the model input but x, and nothing inside may be used outside
    the block. Overlapping candidates keep the one whose add comes first (the inner one)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    dynamic: set[fx.Node] = set()  # depends on a model input (not a parameter chain)
    for n in nodes:
        if n.op == "placeholder" or any(i in dynamic for i in n.all_input_nodes):
            dynamic.add(n)
    blocks: list[Block] = []
    taken: set[fx.Node] = set()
    for add in nodes:
        if not _is_residual_add(add):
            continue
        a, b = add.args
        x, other = (a, b) if pos[a] < pos[b] else (b, a)
        end = add
        while len(end.users) == 1:
            (user,) = end.users
            if not (_is_activation(gm, user) and _shape(user) == _shape(end)):
                break
            end = user
        if _shape(end) is None or _shape(end) != _shape(x):
            continue
        body = _between(x, end, pos)
        if other not in body or body & taken:
            continue
        inside = body | {x}
        if any(i not in inside and i in dynamic for n in body for i in n.all_input_nodes):
            continue  # f also reads another activation (a U-Net skip, a second input)
        if any(u not in body for n in body - {end} for u in n.users):
            continue  # an intermediate value escapes the block
        if any(n.op in ("placeholder", "output") for n in body):
            continue
        blocks.append(Block(_module_of(body) or f"block{len(blocks)}", x, end, body))
        taken |= body
    return blocks


def _module_of(body: set[fx.Node]) -> str | None:
    """The innermost module whose forward computed every node of `body` that records one."""
    stacks = [[path for path, _ in n.meta["nn_module_stack"].values()]
              for n in body if n.meta.get("nn_module_stack")]
    common = stacks[0] if stacks else []
    for stack in stacks[1:]:
        k = next((i for i, (a, b) in enumerate(zip(common, stack)) if a != b), min(len(common), len(stack)))
        common = common[:k]
    return common[-1] if common else None


def _between(x: fx.Node, end: fx.Node, pos: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on a path from x (excluded) to end (included)."""
    ancestors, stack = {end}, [end]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in ancestors and pos[i] > pos[x]:
                ancestors.add(i)
                stack.append(i)
    body, stack = set(), [x]
    while stack:
        for u in stack.pop().users:
            if u in ancestors and u not in body:
                body.add(u)
                stack.append(u)
    return body


# --- the slicing plan --------------------------------------------------------------------

def _sliceable_norm(m: nn.Module) -> bool:
    """A norm module whose kind has a sliced twin for it."""
    kind = kind_of(m)
    return kind is not None and kind.sliced is not None and kind.sliceable(m)


@dataclass
class SlicePlan:
    """Which groups are sliced and the layout of every tensor dim that indexes them."""

    sliced: list[ChannelGroup]
    kept: dict[int, str]                      # group id -> why it stays at full width
    chains: dict[str, list[DimLayout]]        # "layer.param" -> layouts of its sliced dims
    norms: dict[str, DimLayout]               # norm module path -> layout of its channel dim
    params: dict[str, list[DimLayout]] = field(default_factory=dict)  # read directly (get_attr): cut there
    follow: list[str] = field(default_factory=list)  # functional norm nodes whose normalized_shape follows x


def plan_slicing(gm: fx.GraphModule, groups: list[ChannelGroup], layers: set[str]) -> SlicePlan:
    """Slice every group that is not fixed and whose every use is a chain of a targeted
    layer, a norm called as a module (with a sliced twin), or a parameter the graph reads
    directly (a layer scale, a cls_token, a functional norm's weight), cut where it is read."""
    chains = weight_chains(gm)
    modules = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    norm_calls = {path for path, m in modules.items() if _sliceable_norm(m)}
    reads = parameter_reads(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    table = layer_table(gm)  # a targeted unit (attention's in_proj) targets its whole module
    layers = set(layers) | {table[p].module for p in layers if p in table}
    sliced, kept = [], {}
    for g in groups:
        if g.fixed:
            kept[g.id] = g.reason
            continue
        why = next((r for r in (_blocker(u, layers, chains, norm_calls, reads, modules) for u in g.uses) if r), "")
        why = why or next((r for r in (_norm_blocker(n, nodes, modules, norm_calls) for n in g.normalizers) if r), "")
        if why:
            kept[g.id] = why
            continue
        sliced.append(g)
    dims: dict[str, dict[int, list[Segment]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    normalized: dict[str, tuple[int, set[Segment]]] = {}  # norm module -> (size, segments) of what it normalizes
    plan = SlicePlan(sliced, kept, {}, {})
    for g in sliced:
        for u in g.uses:
            dims[param_key(u.layer, u.param)][u.dim].append(Segment(g.id, u.offset, u.repeat))
        for n in g.normalizers:
            node = nodes[n.node]
            if node.op == "call_module":  # a norm module, with or without affine parameters
                size = _shape(node.args[0])[n.dim]
                normalized.setdefault(n.layer, (size, set()))[1].add(Segment(g.id, n.offset, n.repeat))
            elif node.op == "call_function" and n.kind in ("layer_norm", "rms_norm") and n.node not in plan.follow:
                plan.follow.append(n.node)
    for path, (size, segments) in normalized.items():
        plan.norms[path] = DimLayout(0, size, tuple(sorted(segments, key=lambda s: s.offset)))
    for key, by_dim in dims.items():
        layer, _, param = key.rpartition(".")
        # the tensor a chain produces (template mixing stores no `weight`), or the parameter itself
        shape = chain_shape(gm, chains[key]) if key in chains else fetch_attr(gm, key).shape
        layouts = [DimLayout(d, shape[d], tuple(sorted(segs, key=lambda s: s.offset)))
                   for d, segs in sorted(by_dim.items())]
        if key in chains:
            plan.chains[key] = layouts
        elif layer in norm_calls:
            plan.norms[layer] = layouts[0]
        else:
            plan.params[key] = layouts
    return plan


def _blocker(u, layers: set[str], chains: dict, norm_calls: set[str], reads: dict[str, str],
             modules: dict[str, nn.Module]) -> str:
    """Why use `u` keeps its group at full width ("" when it can be cut)."""
    key = param_key(u.layer, u.param)
    owners = u.layer.split(".")  # the layer or a module holding it (attention's out_proj)
    if any(".".join(owners[:i]) in layers for i in range(len(owners), 0, -1)):
        return ""  # a targeted layer's: its tensors are (or, before the rewrite, become) chains
    if key in chains:
        return f"'{u.layer}' is not a targeted layer"
    if u.layer in norm_calls:
        return ""
    if u.layer in modules:
        return _module_blocker(u.layer, modules[u.layer])
    if key in reads:
        return reads[key]
    return f"{key} is not a targeted layer or a norm module"


def _norm_blocker(n, nodes: dict[str, fx.Node], modules: dict[str, nn.Module], norm_calls: set[str]) -> str:
    """Why normalizer `n` keeps its group at full width ("" when slicing keeps it exact: it
    then normalizes over the kept channels)."""
    node = nodes[n.node]
    if node.op == "call_module" and n.layer not in norm_calls:
        return _module_blocker(n.layer, modules[n.layer])
    return ""


def _module_blocker(path: str, module: nn.Module) -> str:
    kind = kind_of(module)
    what = f"'{path}' ({type(module).__name__})"
    if kind is None:
        return f"{what} is not a layer fxgrow knows"
    if kind.targetable:
        return f"{what} is not a targeted layer"
    if kind.sliced is None:
        return f"{kind.name} {what} has no sliced twin"
    return f"{kind.name} {what} cannot be sliced as it is configured"


def width_share(gm: fx.GraphModule, groups: list[ChannelGroup], plan: SlicePlan, fraction: float = 0.5,
                multiple_of: int = 1) -> tuple[float, dict[int, int]]:
    """The share of the model's parameters (effective weights: a chain counts as the tensor
    it produces) the sub-model at width `fraction` keeps, and per group left at full width
    the parameters it would have cut."""
    chains = weight_chains(gm)
    sizes = {key: tuple(chain_shape(gm, c)) for key, c in chains.items()}
    heads = {c.head.target for c in chains.values()}
    for name, p in gm.named_parameters():
        if not name.startswith("fxgrow.") and name not in sizes and name not in heads:
            sizes[name] = tuple(p.shape)
    sliced = {g.id for g in plan.sliced}
    cut: dict[tuple[str, int], int] = collections.Counter()
    lost: dict[int, int] = collections.Counter()
    for g in groups:
        if g.fixed and (not g.producers or g.reason in ("model input", "model output")):
            continue  # the input's and outputs' channels, token and spatial dims: never cut
        gone = g.size - active_channels(g.size, fraction, multiple_of)
        for u in g.uses:
            key = param_key(u.layer, u.param)
            if key in sizes:
                if g.id in sliced:
                    cut[(key, u.dim)] += gone * u.repeat
                else:
                    lost[g.id] += math.prod(sizes[key]) * gone * u.repeat // sizes[key][u.dim]
    total = kept = 0.0
    for key, shape in sizes.items():
        n = math.prod(shape)
        share = math.prod((size - cut.get((key, d), 0)) / size for d, size in enumerate(shape) if size)
        total, kept = total + n, kept + n * share
    return (kept / total if total else 1.0), dict(lost)
