"""What `fxgrow inspect` shows: nodes, weight chains, cost, channel groups, DOT."""
from __future__ import annotations

from typing import Any

from torch import fx

from .analysis.shapes import output_shape
from .ir import evaluate_chain, fetch_attr, meta, weight_chains


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
