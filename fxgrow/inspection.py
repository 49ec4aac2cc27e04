"""What `fxgrow inspect` shows: nodes, weight chains, cost, channel groups, DOT, and the
weights each pass left untouched with the reason (also in report.json)."""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from .analysis.shapes import output_shape
from .ir import evaluate_chain, fetch_attr, layer_table, meta, parameter_names, weight_chains
from .layers import functional_refusal, kind_of, kind_of_function
from .trace import META_KEY, module_type, weight_matrices


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def node_rows(gm: fx.GraphModule) -> list[dict[str, str]]:
    rows = []
    for node in gm.graph.nodes:
        m = meta(node)
        target = _fn_name(node.target) if node.op == "call_function" else str(node.target)
        shape = output_shape(node)
        rows.append({
            "name": node.name, "op": node.op, "target": target,
            "shape": "x".join(map(str, shape)) if shape else "",
            "fxgrow": f"{m.get('pass', '')}:{m.get('kind', m.get('role', ''))}".strip(":") if m else "",
        })
    return rows


def chain_rows(gm: fx.GraphModule) -> list[dict[str, str]]:
    """Per original weight: the producers now computing it, and the shapes in and out."""
    rows = []
    for key, chain in weight_chains(gm).items():
        steps = [f"{chain.head.target}"]
        for node, module in zip(chain.producers, chain.modules(gm)):
            extra = module.extra_repr()
            steps.append(f"{module.role}({extra})" if extra else module.role)
        stored = tuple(fetch_attr(gm, chain.head.target).shape)
        produced = tuple(evaluate_chain(gm, chain).shape)
        rows.append({"weight": key, "chain": " -> ".join(steps),
                     "stored": "x".join(map(str, stored)), "produced": "x".join(map(str, produced))})
    return rows


_COLORS = {"layer": "lightblue", "param": "khaki", "producer": "palegreen"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(gm: fx.GraphModule, name: str = "fxgrow") -> str:
    """Graphviz DOT of the graph; fxgrow nodes are coloured by role."""
    lines = [f"digraph {_quote(name)} {{", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for node in gm.graph.nodes:
        m = meta(node)
        target = _fn_name(node.target) if node.op == "call_function" else str(node.target)
        shape = output_shape(node)
        label = f"{node.name}\n{node.op}: {target}" + (f"\n{'x'.join(map(str, shape))}" if shape else "")
        style = f", style=filled, fillcolor={_COLORS[m['role']]}" if m.get("role") in _COLORS else ""
        lines.append(f"  {_quote(node.name)} [label={_quote(label)}{style}];")
        for src in node.all_input_nodes:
            lines.append(f"  {_quote(src.name)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- what each pass left untouched, and why -------------------------------------------------

def coverage(gm: fx.GraphModule, history: list) -> dict[str, dict[str, Any]]:
    """Per pass that puts producers into weight chains ("passes.i"): how many of the model's
    weight matrices it rewrites, their share of the weight-matrix parameters, and every one
    it leaves untouched with the reason (so nothing is skipped silently). `history` is a
    `PassResult.history`."""
    inventory = weight_inventory(gm)
    table = layer_table(gm)
    chains = weight_chains(gm)
    layers_of: dict[str, list] = {}
    for layer in table.values():
        layers_of.setdefault(layer.weight, []).append(layer)
    total = sum(math.prod(info["shape"]) for info in inventory.values())
    out = {}
    for applied in history:
        p = applied.pass_
        if p.rank is None:  # no producers: growth widens groups, it targets no layer
            continue
        chosen = {table[name].weight for name in applied.record.layers if name in table}
        touched = {key for key, chain in chains.items() if key in chosen
                   and any(meta(n).get("pass") == p.kind for n in chain.producers)}
        skipped = getattr(applied.record, "skipped", {}) or {}
        rows, covered = [], 0
        for key, info in inventory.items():
            if key in touched:
                covered += math.prod(info["shape"])
                continue
            rows.append({"weight": key, "layer": info["owner"], "type": info["type"],
                         "reason": _why_untouched(gm, key, info, p, layers_of, chosen, skipped, chains)})
        out[f"passes.{applied.index}"] = {
            "kind": p.kind, "weights": len(inventory), "rewritten": len(inventory) - len(rows),
            "weight_params": total, "rewritten_params": covered, "share": covered / total if total else 1.0,
            "untouched": rows}
    return out


def weight_inventory(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """The weight matrices of the model `gm` was traced from ({name: {shape, owner, type}}):
    those tracing listed, plus any parameter of two or more dims the graph hands to a layer
    function or a matrix product."""
    found = dict(((getattr(gm, "meta", None) or {}).get(META_KEY) or {}).get("weights") or {})
    if not found:  # traced elsewhere (fx.symbolic_trace): what the GraphModule holds
        found = weight_matrices(gm)
    for layer in layer_table(gm).values():  # functional layers: timm's Linear, F.linear(x, self.w)
        value = fetch_attr(gm, layer.weight) if layer.matrix and layer.weight not in found else None
        if value is not None:  # (None: template mixing took the parameter over)
            owner = layer.weight.rpartition(".")[0]
            found[layer.weight] = {"shape": list(value.shape), "owner": owner, "type": layer.module_type}
    names = parameter_names(gm)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in found:
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, nn.Parameter) or value.dim() < 2:
            continue
        key = names.get(id(value), node.target)
        if key not in found and any(_consumes_as_matrix(u) for u in node.users):
            owner = key.rpartition(".")[0]
            found[key] = {"shape": list(value.shape), "owner": owner, "type": module_type(gm, owner) if owner
                          else module_type(gm, "")}
    return found


_MATMULS = {operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm, "matmul", "mm", "bmm"}


def _consumes_as_matrix(node: fx.Node) -> bool:
    """A layer function fxgrow rewrites (F.linear, F.conv2d, ...) or a matrix product."""
    if node.op == "call_function" and (kind := kind_of_function(node.target)) is not None:
        return kind.targetable
    return node.target in _MATMULS


def _why_untouched(gm, key, info, p, layers_of, chosen, skipped, chains) -> str:
    layers = layers_of.get(key, [])
    if layers:
        if key in chosen:
            return skipped.get(key) or skipped.get(layers[0].path) or f"selected, but {p.kind} left its chain unchanged"
        layer = layers[0]
        return p.spec.targets.why_not(layer.path, layer.selectable) or "not selected"
    leaf = _leaf_holding(gm, key)
    if leaf is not None:
        return leaf
    gets = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == key]
    if gets:
        return _computed(gets[0])
    return "not used by the traced forward (in train mode)"


def _leaf_holding(gm: fx.GraphModule, key: str) -> str | None:
    """Why a parameter inside a module FX called whole is out of reach, or None."""
    try:
        tensor = fetch_attr(gm, key)
    except AttributeError:
        return None
    found = (getattr(gm, "meta", None) or {}).get(META_KEY) or {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not any(p is tensor for p in module.parameters()):
            continue
        kind, kind_exact = kind_of(module), kind_of(module, exact=True)
        if kind_exact is not None and kind_exact.targetable:
            return functional_refusal(module) or "a layer no pass selected"
        what = f"'{node.target}' ({module_type(gm, node.target)})"
        if kind is not None and kind.targetable:
            return (f"inside {what}, a subclass of {kind.type_name} kept whole: fxgrow rewrites the layer classes "
                    "of its table exactly (a subclass may compute something else); let FX trace it (drop it "
                    "from model.leaf_modules) to rewrite its weight")
        if node.target in found.get("mode_leaves", ()):
            why = "kept whole because it reads self.training"
        elif node.target in found.get("leaf_modules", ()) or type(module).__name__ in found.get("leaf_modules", ()):
            why = "model.leaf_modules"
        else:
            why = "a module FX does not trace into"
        return f"inside {what}, which the graph calls whole ({why})"
    return None


def _computed(get: fx.Node) -> str:
    """How a parameter that is not a layer's weight operand is used: computed into a layer's
    weight (ops that read no activation, e.g. weight standardization), or read by another op."""
    static = _static_nodes(get.graph)
    frontier, seen = [(get, [])], {get}
    while frontier:
        node, path = frontier.pop(0)
        for user in node.users:
            if user in seen or len(path) > 6 or (user.op == "call_method" and user.args[0] is not node):
                continue  # (x.reshape_as(w) takes only w's shape)
            seen.add(user)
            if _consumes_as_matrix(user) and path:
                return (f"computed weight: the parameter passes through {' -> '.join(path)} before "
                        f"{_op_name(user)}; rewriting it would not rewrite the weight the layer uses")
            if user in static:
                frontier.append((user, path + [_op_name(user)]))
    users = ", ".join(dict.fromkeys(_op_name(u) for u in get.users))
    return f"read by {users}, not by a layer function fxgrow rewrites"


def _static_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that read no model input: computations on parameters and constants."""
    static: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op.startswith("call_") and all(i in static for i in node.all_input_nodes)):
            static.add(node)
    return static


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def untouched_rows(report: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """`coverage` as table rows for `fxgrow inspect`."""
    rows = []
    for where, section in report.items():
        rows.append({"pass": f"{where} {section['kind']}", "weight": f"{section['rewritten']}/{section['weights']} "
                     f"matrices rewritten ({section['share']:.1%} of their parameters)", "reason": ""})
        rows += [{"pass": "", "weight": r["weight"], "reason": r["reason"]} for r in section["untouched"]]
    return rows
