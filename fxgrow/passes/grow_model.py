"""Building the grown network (ALGORITHMS.md section 1.2); `grow.py` decides when.

`grow_model` widens every non-fixed channel group of `fxgrow.analysis.coupling` by g. It
knows no producer class: every module that has a `grow(growth, path)` method (every
producer, template banks) widens itself from the `fxgrow.growth.Growth` plan (a mixed
weight becomes a grid of blocks, `fxgrow.nn.mixing`; a mask keeps its source blocks,
`fxgrow.nn.mask`), and the tensors no module owns as a producer's are widened here by
the layer-kind table: per-channel tensors (biases, norm parameters and statistics) are
concatenated across sources, channels no source provides get the kind's fill; a bias
whose outputs stay while its inputs grew is the sum of the sources' biases, so the
classifier's logits are the sum of the source nets' logits.

Passes that changed more than weight chains (sorted slicing) are taken off first, at
their largest setting, and put back on the grown graph with the same spec: width
fractions stay fractions of the now g-times-wider groups, so width 1/g of the grown net is
source net 0's channels.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from ..analysis import channel_groups, propagate_shapes
from ..analysis.coupling import param_key
from ..errors import FxgrowError
from ..fold import fold, reverse_passes
from ..growth import Channels, Growth
from ..ir import (chain_shape, fetch_attr, is_layer, layer_types, meta, replace_submodule, replace_tensor,
                  weight_chains)
from ..layers import fill_value, follow_input, kind_of, layer_call
from .base import Pass, Pipeline


# --- checks and sources -------------------------------------------------------------------

def check_growable(gm: nn.Module, carried: Sequence[str] = ()) -> None:
    """Refuse models growth cannot widen faithfully, with the reason. Producers of the
    passes in `carried` (kinds) are taken off and put back around growth: they need not grow."""
    if not isinstance(gm, fx.GraphModule) or not any(
            meta(n).get("pass") == "template_mixing" for n in gm.graph.nodes):
        raise FxgrowError("grow needs template-mixed layers: put a template_mixing pass before it")
    for key, chain in weight_chains(gm).items():
        for node in chain.producers:
            producer = gm.get_submodule(node.target)
            why = "" if meta(node).get("pass") in carried else producer.growth_refusal()
            if why:
                raise FxgrowError(f"grow cannot widen '{key}': {why}")


@torch.no_grad()
def check_growth_runs(gm: fx.GraphModule, example: torch.Tensor, factor: int) -> None:
    """Refuse, before training, a model whose grown copy would not run: every free channel
    group of the folded model widened `factor` times (tensors repeated, counted options and
    norm shapes following), shapes propagated. What fails here would otherwise fail at the
    growth step, after training started. With template mixing applied, every layer whose
    channels grow must be mixed."""
    plain = fold(gm)
    out_before, groups, growing = _growing_groups(plain, example)
    channels = Channels(groups)
    if any(meta(n).get("pass") == "template_mixing" for n in gm.graph.nodes):
        mixed = {c.layer for c in weight_chains(gm).values()
                 if any(meta(p).get("pass") == "template_mixing" for p in c.producers)}
        for layer in layer_types(plain):
            if layer not in mixed and any(channels.grows(layer, "weight", d) for d in range(4)):
                raise FxgrowError(f"grow needs every layer whose channels grow to be template-mixed: "
                                  f"'{layer}' is not (add it to the template_mixing targets)")
    _follow_inputs(plain, growing)
    for (layer, param), dims in channels.slices.items():
        key = param_key(layer, param)
        value = fetch_attr(plain, key)
        if sum(channels.grows(layer, param, d) for d in dims) > 1 and layer not in layer_types(plain):
            raise FxgrowError(f"'{key}' would grow along {len(dims)} dims; only weights of template-mixed "
                              "layers can")
        for d in dims:
            if channels.grows(layer, param, d):
                value = value.index_select(d, channels.positions(layer, param, d, factor, value.shape[d])[1])
        replace_tensor(plain, key, value)
    _resize_layers(plain, Growth(plain, channels, [], factor, {}, torch.Generator()))
    plain.recompile()
    try:
        propagate_shapes(plain, example)
    except FxgrowError as e:
        raise FxgrowError(f"the model cannot grow: its grown copy would not run "
                          f"({str(e).splitlines()[0]})") from None
    if _output_shapes(plain) != out_before:
        raise FxgrowError(f"growth would change the output shape: {out_before} -> {_output_shapes(plain)}")


def _growing_groups(gm: fx.GraphModule, example: torch.Tensor) -> tuple[list, list, list]:
    """(output shapes, channel groups, the groups that grow) of `gm`; none growing is an error."""
    propagate_shapes(gm, example)
    groups = channel_groups(gm)
    growing = [grp for grp in groups if not grp.fixed]
    if not growing:
        reasons = "; ".join(f"{grp.size} channels of {', '.join(grp.producers) or 'the input'}: {grp.reason}"
                            for grp in groups)
        raise FxgrowError(f"no channel group can grow ({reasons})")
    return _output_shapes(gm), groups, growing


def load_source(path: str | Path, reference: dict[str, torch.Tensor], where: str = "fuse") -> dict[str, torch.Tensor]:
    """The model state of another run (a run folder or a checkpoint file), checked tensor
    by tensor against `reference` (this run's ungrown state); the error names the first
    tensor that differs."""
    from ..train.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint

    file = Path(path) / CHECKPOINT if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FxgrowError(f"{where}: no checkpoint at {file} (train the run to fuse first)")
    try:
        state = load_checkpoint(file, require=("model",))
    except CheckpointError as e:
        raise FxgrowError(f"{where}: cannot read {e}") from None
    model = state.get("model")
    if not isinstance(model, dict):
        raise FxgrowError(f"{where}: {path} holds no model state")
    for key, ref in reference.items():
        if key not in model:
            raise FxgrowError(f"{where}: {path} does not match this run: tensor '{key}' is missing "
                              "(fuse runs of the same model and template_mixing spec)")
        if tuple(model[key].shape) != tuple(ref.shape):
            raise FxgrowError(f"{where}: {path} does not match this run: tensor '{key}' has shape "
                              f"{tuple(model[key].shape)}, this run's has {tuple(ref.shape)}")
    extra = [k for k in model if k not in reference]
    if extra:
        raise FxgrowError(f"{where}: {path} does not match this run: it has tensor '{extra[0]}', "
                          "this run does not (was it grown already?)")
    return model


def surviving_params(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """{name: name} of parameters that growth left unchanged (same name, shape, value):
    the ones whose optimizer state carries over."""
    before = dict(old.named_parameters())
    return {name: name for name, p in new.named_parameters()
            if name in before and before[name].shape == p.shape and torch.equal(before[name], p)}


# --- the whole model ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Grown:
    """What `grow_model` returns: the grown model, a summary for the report, and `fresh(key)`
    (see `ModelChange.fresh`). Unpacks as `model, info`."""

    model: fx.GraphModule
    info: dict[str, Any]
    growth: Growth
    shapes: dict[str, tuple[int, ...]]  # every chain's value before growth

    def fresh(self, key: str) -> torch.Tensor | None:
        """True where the grown value of chain `key` holds entries no source net provides."""
        if key not in self.shapes:
            return None
        weight = self.growth.weight_of(key)
        if not any(weight.grows(d) for d in range(len(self.shapes[key]))):
            return None
        return weight.fresh(self.shapes[key])

    def __iter__(self):
        return iter((self.model, self.info))


@torch.no_grad()
def grow_model(gm: fx.GraphModule, sources: list[dict[str, torch.Tensor]], factor: int,
               example: torch.Tensor, *, layout: str = "vertical",
               new_coefficients: str = "orthogonal", noise: float = 0.0,
               generator: torch.Generator | None = None, carried: Sequence[Pass] = (),
               orthogonal_scope: str = "layer") -> Grown:
    """The grown copy of `gm` and a summary. `sources[i]` is the state_dict of source net i
    (same structure as `gm`; `sources[0]` is normally `gm.state_dict()`). `example` is an
    input batch (of at least one sample) for the shapes. `carried`: the reversible passes
    that rewrote `gm` (in their order), reversed before growth and applied again after."""
    g, n = factor, len(sources)
    if not 1 <= n <= g:
        raise FxgrowError(f"{n} source nets for factor {g}: need 1..{g}")
    kinds = [p.kind for p in carried]
    check_growable(gm, kinds)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(iter(sources[0].values())).device
    sources = [{k: v.to(device) for k, v in s.items()} for s in sources]
    new = copy.deepcopy(gm)
    uncarried = [k for k in reverse_passes(new, full=True) if k not in kinds]
    if uncarried:
        raise FxgrowError(f"grow: the model was rewritten by {', '.join(uncarried)}, which growth must take off "
                          "and put back; hand the pass to growth (grow_model(..., carried=[the pass]))")
    out_before, groups, growing = _growing_groups(new, example)
    chains = weight_chains(new)
    shapes = {key: chain_shape(new, chain) for key, chain in chains.items()}
    growth = Growth(new, Channels(groups), sources, g,
                    {"layout": layout, "new_coefficients": new_coefficients, "noise": noise,
                     "orthogonal_scope": orthogonal_scope}, generator,
                    {node.target: (chain.layer, chain.param) for chain in chains.values() for node in chain.producers})
    # Every module that says how it grows, computed before any is installed (they read the ungrown model).
    grown = {path: module.grow(growth, path) for path, module in new.named_modules()
             if path and callable(getattr(module, "grow", None))}
    for path, module in grown.items():
        if module is not new.get_submodule(path):
            replace_submodule(new, path, module)
    generated = {key for key, chain in chains.items() if chain.head.target != key}  # heads of their own
    _follow_inputs(new, growing)
    _widen_tensors(new, growth, generated)
    _sum_biases(new, growth)
    _resize_layers(new, growth)
    new.recompile()
    try:
        propagate_shapes(new, example)
    except FxgrowError as e:
        raise FxgrowError(f"the grown model does not run ({str(e).splitlines()[0]}); a shape hard-coded "
                          "in the model (e.g. x.view(-1, 256)) cannot grow") from None
    if _output_shapes(new) != out_before:
        raise FxgrowError(f"growth changed the output shape: {out_before} -> {_output_shapes(new)}")
    if carried:
        Pipeline(list(carried))(new, example_input=example, inplace=True)
    info = {
        "factor": g, "sources": n, "layout": layout, "new_coefficients": new_coefficients,
        "orthogonal_scope": orthogonal_scope,
        "widths": [{"group": grp.id, "before": grp.size, "after": grp.size * g,
                    "producers": grp.producers} for grp in growing],
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in new.parameters()),
    }
    return Grown(new, info, growth, shapes)


def _widen_tensors(gm: fx.GraphModule, growth: Growth, generated: set[str]) -> None:
    """Every tensor a growing channel group indexes, other than the generated weights (their
    producers widened them): band b from source b, or for bands without a source the
    layer kind's fill (norm gamma 1, beta 0, mean 0, var 1; bias 0), or a copy of source
    b mod n for anything else."""
    sources, g, n, channels = growth.sources, growth.factor, growth.sources_count, growth.channels
    weight_layers = set(layer_types(gm))
    read_by = _functional_kinds(gm)
    for (layer, param), dims in channels.slices.items():
        key = f"{layer}.{param}" if layer else param
        growing = [d for d in dims if channels.grows(layer, param, d)]
        if key in generated or not growing:
            continue
        if layer in weight_layers and param == "weight":
            raise FxgrowError(f"grow needs every layer whose channels grow to be template-mixed: "
                              f"'{layer}' is not (add it to the template_mixing targets)")
        if len(growing) > 1:
            raise FxgrowError(f"'{key}' would grow along {len(growing)} dims; only weights of "
                              "template-mixed layers can")
        _check_plain(gm, key)
        dim, old = growing[0], sources[0][key]
        band, index = channels.positions(layer, param, dim, g, old.shape[dim])
        fill = fill_value(_owner(gm, layer), param) if key not in read_by else read_by[key].fills.get(param)
        default = None if fill is None else torch.full_like(old, fill)
        stacked = torch.stack([sources[b][key] if b < n else default if default is not None
                               else sources[b % n][key] for b in range(g)])
        value = stacked.movedim(dim + 1, 1)[band.to(old.device), index.to(old.device)].movedim(0, dim)
        replace_tensor(gm, key, value.contiguous())


def _sum_biases(gm: fx.GraphModule, growth: Growth) -> None:
    """A layer whose inputs grew and outputs did not (the classifier) holds the source nets'
    blocks side by side, so its output is the sum of theirs: so is its bias."""
    if growth.sources_count == 1:
        return
    for layer in layer_types(gm):
        key = f"{layer}.bias"
        weight = growth.weight_of(f"{layer}.weight")
        if key in growth.sources[0] and weight.grows(1) and not weight.grows(0):
            _check_plain(gm, key)
            replace_tensor(gm, key, torch.stack([s[key] for s in growth.sources]).sum(0))


def _resize_layers(gm: fx.GraphModule, growth: Growth) -> None:
    """Options that count channels (a depthwise conv's groups) grow with them; module
    attributes that describe widths follow the tensors."""
    for node in gm.graph.nodes:
        call = layer_call(node, gm) if node.op == "call_function" else None
        for option, (role, dim) in (call.kind.channel_options(call) if call else {}).items():
            if role in call.params and growth.channels.grows(*call.params[role], dim):
                call.set_option(option, call.options[option] * growth.factor)
    chains = weight_chains(gm)
    for path, module in gm.named_modules():
        kind = kind_of(module)
        if kind is None:
            continue
        shapes = {name: tuple(t.shape) for name, t in module.named_parameters(recurse=False)}
        shapes |= {name: tuple(t.shape) for name, t in module.named_buffers(recurse=False) if t.dim()}
        for role in kind.params:  # a generated weight's shape is its chain's
            if f"{path}.{role}" in chains:
                shapes[role] = chain_shape(gm, chains[f"{path}.{role}"])
        kind.resize(module, shapes)


def _follow_inputs(gm: fx.GraphModule, growing: list) -> None:
    """A functional layer norm over growing channels reads its normalized_shape from its
    input (a literal one was frozen at trace time). It then normalizes over the grown width:
    statistics over the new channels too, so growth through it does not keep the function."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in dict.fromkeys(n.node for grp in growing for n in grp.normalizers):
        call = layer_call(nodes[name], gm) if name in nodes else None
        if call is not None and call.functional:
            follow_input(call)


def _functional_kinds(gm: fx.GraphModule) -> dict[str, Any]:
    """{parameter key: layer kind} of the parameters functional layers read with get_attr
    (a traced-through LayerNorm's weight): their fills are the kind's."""
    out = {}
    for node in gm.graph.nodes:
        call = layer_call(node, gm) if node.op == "call_function" and not is_layer(node) else None
        if call is not None:
            for role, owner_param in call.params.items():
                out[param_key(*owner_param)] = call.kind
    return out


# --- small helpers -------------------------------------------------------------------------------

def _output_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [tuple(a.meta["tensor_meta"].shape) for a in out.all_input_nodes
            if hasattr(a.meta.get("tensor_meta"), "shape")]


def _owner(gm: nn.Module, layer: str) -> nn.Module | None:
    try:
        return gm.get_submodule(layer) if layer else gm
    except AttributeError:
        return None


def _check_plain(gm: fx.GraphModule, key: str) -> None:
    chain = weight_chains(gm).get(key)
    if chain is not None and chain.producers:
        raise FxgrowError(f"grow cannot widen '{key}': it has producers "
                          f"({', '.join(p.target for p in chain.producers)})")
