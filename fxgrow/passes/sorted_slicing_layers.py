"""Depth by layers: the blocks of a transformer are the entries of its layer list
(`transformer.h`, `model.layers`, `bert.encoder.layer`, `blocks`), not its residual adds.

A layer list is a `ModuleList` / `Sequential` whose entries `<path>.0 ... <path>.<L-1>` are
all of one module type. A node belongs to entry i when its innermost module path (the
`nn_module_stack` both front-ends record, or a call_module's own target) lies inside
`<path>.<i>`. The stream `h_0 ... h_L` is what makes "the first k layers" one model: `h_i`
(i >= 1) is the one value entry i-1 hands on, read by entry i only (by the nodes after the
list for i = L); `h_0` is the one input of entry 0 that no later entry reads (masks, rotary
cos/sin and positions are read by every entry: side inputs, allowed). Depth k then hands
`h_k` to the nodes after the list - the final norm and head - exactly the model with the
first k layers, pre-LN and post-LN alike (a post-LN stream is its LayerNorm's output, so a
dropped layer takes its norms with it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx, nn

from ..errors import FxgrowError
from ..trace import META_KEY

_LIST_TYPES = ("ModuleList", "Sequential")
# Modules whose train-mode forward changes their state: a dropped layer still runs under the
# exit gate, so its running statistics would move.
_STATEFUL_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "BatchNormAct2d")


@dataclass
class LayerList:
    """The layer list `path` of `gm`: `entries` the entry paths, `streams` the nodes h_0..h_L."""

    path: str
    entries: list[str]
    streams: list[fx.Node] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)


def module_types(gm: fx.GraphModule) -> dict[str, str]:
    """{module path: class name} of the model `gm` was captured from (the front-ends record
    it: an exported graph's own submodules are bare containers), else of `gm` itself."""
    types = ((getattr(gm, "meta", None) or {}).get(META_KEY) or {}).get("types")
    return dict(types) if types else {path: type(m).__name__ for path, m in gm.named_modules()}


def layer_list_candidates(types: dict[str, str]) -> list[tuple[str, int, str]]:
    """(path, entry count, entry type) of every list of two or more entries of one type,
    longest first."""
    found = []
    for path, kind in types.items():
        if kind not in _LIST_TYPES:
            continue
        prefix = f"{path}." if path else ""
        n = 0
        while f"{prefix}{n}" in types:
            n += 1
        entry_types = {types[f"{prefix}{i}"] for i in range(n)}
        if n >= 2 and len(entry_types) == 1:
            found.append((path, n, entry_types.pop()))
    return sorted(found, key=lambda c: -c[1])


def entry_of(node: fx.Node, path: str) -> int | None:
    """Index of the entry of layer list `path` that computed `node`, else None."""
    paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return next((i for i in map(lambda p: entry_index(p, path), reversed(paths)) if i is not None), None)


def entry_index(module: str, path: str) -> int | None:
    """i when module path `module` lies inside entry `<path>.<i>` of layer list `path`."""
    m = re.fullmatch(re.escape(path) + r"\.(\d+)(\..*)?", module)
    return int(m.group(1)) if m else None


def find_layer_list(gm: fx.GraphModule, path: str | None = None) -> LayerList:
    """The layer list `path` (default: the longest list of one module type) with its stream,
    or an FxgrowError saying why the model has none that depth can cut."""
    types = module_types(gm)
    candidates = layer_list_candidates(types)
    if path is None:
        if not candidates:
            raise FxgrowError("no layer list (a ModuleList or Sequential of two or more modules of one type)")
        if len(candidates) > 1 and candidates[1][1] == candidates[0][1]:
            tied = [c[0] for c in candidates if c[1] == candidates[0][1]]
            raise FxgrowError(f"{len(tied)} layer lists of {candidates[0][1]} entries ({', '.join(tied)}): "
                              "name one in depth.layers")
        path = candidates[0][0]
    else:
        match = next((c for c in candidates if c[0] == path), None)
        if match is None:
            what = f"a {types[path]}" if path in types else "not a module of the model"
            lists = ", ".join(f"{p} ({n} x {t})" for p, n, t in candidates) or "none"
            raise FxgrowError(f"depth.layers '{path}' is {what}, not a list of two or more modules of one type "
                              f"(layer lists: {lists})")
    n = next(c[1] for c in candidates if c[0] == path)
    entries = [f"{path}.{i}" for i in range(n)]
    stateful = [p for p, t in types.items() if t in _STATEFUL_TYPES and any(p.startswith(e + ".") for e in entries)]
    if stateful:
        raise FxgrowError(f"layer list '{path}' holds {types[stateful[0]]} '{stateful[0]}': a dropped layer still "
                          "runs and would update its running statistics")
    return LayerList(path, entries, _stream(gm, path, n))


def _stream(gm: fx.GraphModule, path: str, n: int) -> list[fx.Node]:
    nodes = list(gm.graph.nodes)
    owner = {node: entry_of(node, path) for node in nodes}
    dynamic: set[fx.Node] = set()  # computed from a model input (weight chains are not)
    for node in nodes:
        if node.op == "placeholder" or any(i in dynamic for i in node.all_input_nodes):
            dynamic.add(node)
    reads: list[dict[fx.Node, None]] = [{} for _ in range(n)]  # entry -> values it reads from outside it
    for node in nodes:
        b = owner[node]
        if b is None:
            continue
        for i in node.all_input_nodes:
            if owner[i] != b and i in dynamic:
                reads[b][i] = None
    if not any(reads):
        raise FxgrowError(f"layer list '{path}': no graph node records it (is it called in forward?)")
    streams = []
    for b in range(n):
        if b == 0:
            cand = [i for i in reads[0] if owner[i] is None and not any(i in reads[j] for j in range(1, n))]
        else:
            cand = [i for i in reads[b] if owner[i] == b - 1]
            other = [i for i in reads[b] if owner[i] is not None and owner[i] != b - 1]
            if other:
                raise FxgrowError(f"layer list '{path}': {path}.{b} reads {other[0].name} of {path}.{owner[other[0]]}"
                                  f", not only what {path}.{b - 1} hands on")
        if b and not cand:
            names = ", ".join(i.name for i in reads[b]) or "nothing"
            raise FxgrowError(f"layer list '{path}': {path}.{b} reads {names} from outside the list and nothing "
                              f"{path}.{b - 1} hands on: the layers do not run one after the other")
        if len(cand) != 1:
            names = ", ".join(c.name for c in cand) or "none"
            raise FxgrowError(f"layer list '{path}': {path}.{b} has {len(cand)} stream inputs ({names}); "
                              "the first k layers are one model only when each layer reads one value of the one before")
        streams.append(cand[0])
    for b in range(n):  # what leaves entry b: h_{b+1}, and only there
        out = [node for node in nodes if owner[node] == b and any(owner[u] != b for u in node.users)]
        if len(out) != 1:
            names = ", ".join(o.name for o in out) or "nothing"
            raise FxgrowError(f"layer list '{path}': {path}.{b} hands on {len(out)} values ({names}), not one stream")
        readers = {owner[u] for u in out[0].users if owner[u] != b}
        expected = {b + 1} if b + 1 < n else {None}
        if readers != expected:
            where = ", ".join("the nodes after the list" if r is None else f"{path}.{r}" for r in readers)
            raise FxgrowError(f"layer list '{path}': {out[0].name} of {path}.{b} is read by {where}: skipping a "
                              "layer would change what they see")
        if b + 1 < n and out[0] is not streams[b + 1]:
            raise FxgrowError(f"layer list '{path}': {path}.{b + 1} reads {streams[b + 1].name}, not what "
                              f"{path}.{b} hands on")
        if b + 1 == n:
            streams.append(out[0])
    shapes = {_shape(h) for h in streams} - {None}
    if len(shapes) > 1:
        raise FxgrowError(f"layer list '{path}': the stream changes shape ({', '.join(map(str, sorted(shapes)))}): "
                          "a dropped layer cannot hand on its input")
    return streams


def _shape(node: fx.Node):
    tm = node.meta.get("tensor_meta") if "tensor_meta" in node.meta else node.meta.get("val")
    shape = getattr(tm, "shape", None)
    return tuple(int(s) if str(s).isdigit() else str(s) for s in shape) if shape is not None else None


def drop_layers(gm: fx.GraphModule, path: str, keep: int) -> None:
    """Erase the nodes of entries `keep`.. of layer list `path` (once nothing reads them)
    and every node only they read (their weight chains), then the entries' modules and
    parameters, so the graph and state_dict are those of the first `keep` layers."""
    graph = gm.graph
    fed: set[fx.Node] = set()  # inputs of erased nodes (erase_node forgets a node's args)
    erased: list[fx.Node] = []
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        index = entry_of(node, path)
        if (index is not None and index >= keep) or (node in fed and not _impure(node)):
            fed.update(node.all_input_nodes)
            erased.append(node)
            graph.erase_node(node)
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for node in erased:
        if node.op == "call_module" and node.target not in targets and str(node.target).startswith("fxgrow."):
            targets.add(node.target)
            gm.delete_submodule(node.target)
    container = gm.get_submodule(path)
    for key in [k for k in container._modules if k.isdigit() and int(k) >= keep]:
        del container._modules[key]


def _impure(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def group_dimension(group, path: str) -> str:
    """The SortedNet dimension of channel group `group` in a model with layer list `path`:
    hidden (used by more than one layer, or outside the layers too: the residual stream,
    which the embedding produces), heads (inside one layer, and the coupling analysis marks
    it attention heads), or ffn (every other group, inside one layer).

    The stream comes first: where an attention reads the stream itself as heads (no query
    projection), the group is heads too, but cutting it cuts the model's hidden size - the
    `hidden` dimension - and no `heads` fraction may do that."""
    entries = {entry_index(name, path) for name in [u.layer for u in group.uses] + list(group.producers)}
    if len(entries) > 1 or None in entries:
        return "hidden"
    return "heads" if group.heads else "ffn"
