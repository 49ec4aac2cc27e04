"""Building the grown network (ALGORITHMS.md section 1.2); `grow.py` decides when.

`grow_model` widens every non-fixed channel group of `fxgrow.analysis.coupling` by g.
A template-mixed weight becomes a grid of blocks (see `fxgrow.nn.mixing`): the source
blocks (the diagonal; stacked rows for a layer whose inputs stay, e.g. the first; side by
side columns for one whose outputs stay, e.g. the classifier) keep source net i's alphas
over its own template set, every other block gets new alphas over the set the layout
picks. Per-channel tensors (biases, norm parameters and statistics) are concatenated
across sources; a bias whose outputs stay while its inputs grew is the sum of the
sources' biases, so the classifier's logits are the sum of the source nets' logits.

Masks (prune_regrow) grow with their weights: every source block keeps its source net's
mask, every new block starts dense and is marked `fresh`; before the next forward the
prune_regrow callback brings the grown masks to the sparsity in force, keeping the source
masks and choosing the new blocks' active positions by magnitude (see
`PruneRegrowCallback.relayout`). Sorted slicing is taken off at the largest sub-model
(depth gates, sliced norms and slice producers become plain code; full-width norm
statistics kept) and put back on the grown graph with the same spec: width fractions stay
fractions of the now g-times-wider groups, so width 1/g of the grown net is source net 0's
channels.

Channel order: a growing group of C channels becomes g*C channels, band b (source b's
channels) first: band-major. Where a tensor dim holds several groups (concat), each group
is band-major within its own block; the mixed weight's `perm_out`/`perm_in` map the
band-major block grid to that order.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..analysis.coupling import ChannelGroup, ChannelUse, channel_groups
from ..errors import FxgrowError
from ..ir import is_layer, layer_types, meta, weight_chains
from ..nn.compander import CompandProducer
from ..nn.mask import MaskProducer
from ..nn.mixing import MixProducer, TemplateBank
from ..nn.slicing import SliceProducer
from .template_mixing import mix_producers

# Producers growth knows how to carry over; anything else in a chain is refused.
SUPPORTED_PRODUCERS = (MixProducer, CompandProducer, MaskProducer, SliceProducer)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- checks and sources -------------------------------------------------------------------

def check_growable(gm: nn.Module) -> None:
    """Refuse models growth cannot widen faithfully, with the reason."""
    if not mix_producers(gm):
        raise FxgrowError("grow needs template-mixed layers: put a template_mixing pass before it")
    if not isinstance(gm, fx.GraphModule):
        return
    for key, chain in weight_chains(gm).items():
        for node in chain.producers:
            producer = gm.get_submodule(node.target)
            if not isinstance(producer, SUPPORTED_PRODUCERS):
                raise FxgrowError(
                    f"grow cannot widen '{key}': its weight chain has a {producer.role} producer "
                    f"({meta(node).get('pass', type(producer).__name__)}); growth supports chains "
                    "of template mixing, compander, mask and slice producers only")
            if isinstance(producer, MaskProducer) and producer.channel_uses:
                raise FxgrowError(f"grow cannot widen '{key}': prune_regrow with granularity: filter "
                                  "prunes channel groups, and growth changes them (use granularity: element)")
            if isinstance(producer, MixProducer) and (producer.grid != (1, 1) or producer.sets != 1):
                raise FxgrowError(f"'{key}' has grown already; growing twice is not supported")


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


# --- where channels go -------------------------------------------------------------------

class _Channels:
    """Every parameter slice the channel groups index, by (layer, param) and dim."""

    def __init__(self, groups: list[ChannelGroup]):
        self.slices: dict[tuple[str, str], dict[int, list[tuple[ChannelUse, ChannelGroup]]]] = {}
        for grp in groups:
            for use in grp.uses:
                self.slices.setdefault((use.layer, use.param), {}).setdefault(use.dim, []).append((use, grp))

    def entries(self, layer: str, param: str, dim: int) -> list[tuple[ChannelUse, ChannelGroup]]:
        return self.slices.get((layer, param), {}).get(dim, [])

    def grows(self, layer: str, param: str, dim: int) -> bool:
        return any(not grp.fixed for _, grp in self.entries(layer, param, dim))

    def positions(self, layer: str, param: str, dim: int, g: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each index of the grown dim: the band (source) it comes from and its index
        in the old dim. A growing block of C channels (each repeated `repeat` times)
        becomes g*C channels, band-major; a fixed block stays as it is (band 0)."""
        where = f"'{layer}.{param}' dim {dim}"
        bands, olds, covered = [], [], 0
        for use, group in sorted(self.entries(layer, param, dim), key=lambda e: e[0].offset):
            span = group.size * use.repeat
            if use.offset != covered:
                raise FxgrowError(f"{where}: channel groups leave a gap or overlap at index {covered}")
            copies = 1 if group.fixed else g
            bands.append(torch.arange(copies).repeat_interleave(span))
            olds.append(use.offset + torch.arange(span).repeat(copies))
            covered += span
        if covered != length:
            raise FxgrowError(f"{where}: channel groups cover {covered} of {length} indices")
        return torch.cat(bands), torch.cat(olds)


# --- new coefficients ------------------------------------------------------------------------

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def _orthogonal_to(existing: list[torch.Tensor], k: int, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector orthogonal to `existing` (Gram-Schmidt); just a random unit
    vector when they already span all K dims."""
    v = torch.randn(k, generator=generator, dtype=torch.float64)
    basis: list[torch.Tensor] = []
    for e in existing:
        r = e.to(torch.float64)
        for b in basis:
            r = r - (r @ b) * b
        if r.norm() > 1e-8:
            basis.append(_unit(r))
    if len(basis) >= k:
        return _unit(v)
    for b in basis:
        v = v - (v @ b) * b
    return _unit(v)


class _Coefficients:
    """Hands out new alphas; remembers, per bank and template set, the alphas using it."""

    def __init__(self, how: str, noise: float, generator: torch.Generator):
        self.how, self.noise, self.generator = how, noise, generator
        self.used: dict[tuple[str, int], list[torch.Tensor]] = {}

    def note(self, bank: str, template_set: int, alpha: torch.Tensor) -> None:
        self.used.setdefault((bank, template_set), []).append(alpha.detach().flatten())

    def new(self, bank: str, template_set: int, k: int, copy_of: torch.Tensor) -> torch.Tensor:
        if self.how == "orthogonal":
            alpha = _orthogonal_to(self.used.get((bank, template_set), []), k, self.generator)
        elif self.how == "random":
            alpha = torch.randn(k, generator=self.generator, dtype=torch.float64)
        elif self.how == "copy":
            alpha = copy_of.detach().flatten().to(torch.float64).cpu().clone()
        elif self.how == "zero":  # test-only: proves where the source blocks land
            alpha = torch.zeros(k, dtype=torch.float64)
        else:
            raise ValueError(f"unknown new_coefficients {self.how!r}")
        if self.noise:
            alpha = alpha + self.noise * torch.randn(k, generator=self.generator, dtype=torch.float64)
        self.note(bank, template_set, alpha)
        return alpha


# --- one mixed weight's block grid ---------------------------------------------------------

@dataclass
class _Grid:
    path: str                       # the MixProducer's module path
    producer: MixProducer           # the ungrown one
    rows: int
    cols: int
    set_axis: str                   # the template set is picked by the row or by the column
    set_index: list[int]            # the set of each row (or column)
    perms: tuple[torch.Tensor | None, torch.Tensor | None]
    alpha: torch.Tensor             # (rows, cols, K), float64
    new_blocks: list[tuple[int, int, int]] = field(default_factory=list)  # (r, c, set)

    @property
    def layer(self) -> str:
        return self.producer.source.rpartition(".")[0]

    def source_block(self, i: int) -> tuple[int, int]:
        """Where source net i's own block sits: the diagonal, or down the single column,
        or along the single row."""
        if self.rows == self.cols:
            return i, i
        return (i, 0) if self.cols == 1 else (0, i)


def _plan_grid(path: str, producer: MixProducer, channels: _Channels, sources: list[dict], g: int,
               layout: str, coefficients: _Coefficients) -> _Grid:
    layer, _, param = producer.source.rpartition(".")
    shape, n = producer.block_shape, len(sources)
    rows = g if channels.grows(layer, param, 0) else 1
    cols = g if len(shape) > 1 and channels.grows(layer, param, 1) else 1
    perms = []
    for dim, bands in ((0, rows), (1, cols)):
        if bands == 1:
            perms.append(None)
            continue
        fixed = [grp.reason for _, grp in channels.entries(layer, param, dim) if grp.fixed]
        if fixed:
            raise FxgrowError(f"'{producer.source}' dim {dim} mixes growing and fixed channel groups "
                              f"({'; '.join(fixed)})")
        band, old = channels.positions(layer, param, dim, g, shape[dim])
        perm = band * shape[dim] + old  # index into the band-major block grid
        perms.append(None if torch.equal(perm, torch.arange(len(perm))) else perm)
    set_axis = "row" if cols == 1 else "col" if rows == 1 else ("row" if layout == "vertical" else "col")
    set_index = [b % n for b in range(rows if set_axis == "row" else cols)]
    k = producer.alpha.shape[-1]
    grid = _Grid(path, producer, rows, cols, set_axis, set_index, tuple(perms),
                 torch.zeros(rows, cols, k, dtype=torch.float64))
    sourced = {grid.source_block(i): i for i in range(min(n, max(rows, cols)))}
    for r in range(rows):
        for c in range(cols):
            s = set_index[r] if set_axis == "row" else set_index[c]
            if (r, c) in sourced:
                grid.alpha[r, c] = sources[sourced[r, c]][f"{path}.alpha"].view(k).to(torch.float64).cpu()
                coefficients.note(producer.bank, s, grid.alpha[r, c])
            else:
                grid.new_blocks.append((r, c, s))
    return grid


def _grown_producer(grid: _Grid, n: int, coefficients: _Coefficients, device: torch.device) -> MixProducer:
    p = grid.producer
    for r, c, s in grid.new_blocks:  # `copy` takes the alphas of source net s's own block
        grid.alpha[r, c] = coefficients.new(p.bank, s, grid.alpha.shape[-1], grid.alpha[grid.source_block(s)])
    index = None
    if n > 1 and grid.set_index != list(range(n)):
        index = torch.tensor(grid.set_index, dtype=torch.long, device=device)
    perm_out, perm_in = (None if q is None else q.to(device) for q in grid.perms)
    return MixProducer(grid.alpha.to(device=device, dtype=p.alpha.dtype), p.block_shape, bank=p.bank,
                       source=p.source, sets=n, set_axis=grid.set_axis, set_index=index,
                       perm_out=perm_out, perm_in=perm_in)


# --- the whole model ---------------------------------------------------------------------------

@torch.no_grad()
def grow_model(gm: fx.GraphModule, sources: list[dict[str, torch.Tensor]], factor: int,
               example: torch.Tensor, *, layout: str = "vertical",
               new_coefficients: str = "orthogonal", noise: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The grown copy of `gm` and a summary. `sources[i]` is the state_dict of source net i
    (same structure as `gm`; `sources[0]` is normally `gm.state_dict()`). `example` is an
    input batch (of at least one sample) for the shapes."""
    g, n = factor, len(sources)
    if not 1 <= n <= g:
        raise FxgrowError(f"{n} source nets for factor {g}: need 1..{g}")
    check_growable(gm)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(iter(sources[0].values())).device
    sources = [{k: v.to(device) for k, v in s.items()} for s in sources]
    new = copy.deepcopy(gm)
    from .sorted_slicing import reslice, unslice  # (sorted_slicing imports grow's neighbours)
    slicing = unslice(new)
    _propagate_shapes(new, example)
    out_before = _output_shapes(new)
    groups = channel_groups(new)
    growing = [grp for grp in groups if not grp.fixed]
    if not growing:
        reasons = "; ".join(f"{grp.size} channels of {', '.join(grp.producers) or 'the input'}: "
                            f"{grp.reason}" for grp in groups)
        raise FxgrowError(f"no channel group can grow ({reasons})")
    channels = _Channels(groups)

    # Mixed weights: plan every grid first, so orthogonal new alphas see all source alphas.
    coefficients = _Coefficients(new_coefficients, noise, generator)
    grids = [_plan_grid(path, p, channels, sources, g, layout, coefficients)
             for path, p in mix_producers(new).items()]
    for grid in grids:
        _set_module(new, grid.path, _grown_producer(grid, n, coefficients, device))
    if n > 1:  # template banks: source net i's templates are set i
        for bank in dict.fromkeys(grid.producer.bank for grid in grids):
            key = f"{bank}.templates"
            _set_module(new, bank, TemplateBank(torch.cat([s[key] for s in sources]), sets=n))
    _check_compander_scales(new, sources)
    _grow_masks(new, channels, grids, sources, g)
    _widen_tensors(new, channels, sources, g, {grid.producer.source for grid in grids})
    for grid in grids:  # outputs stay, inputs grew (the classifier): add up the sources
        key = f"{grid.layer}.bias"
        if grid.rows == 1 and grid.cols > 1 and n > 1 and key in sources[0]:
            _check_plain(new, key)
            _set_tensor(new, key, torch.stack([s[key] for s in sources]).sum(0))
    _fix_layer_args(new, g, channels)
    new.recompile()
    try:
        _propagate_shapes(new, example)
    except Exception as e:
        raise FxgrowError(f"the grown model does not run ({type(e).__name__}: {e}); a shape "
                          "hard-coded in the model (e.g. x.view(-1, 256)) cannot grow") from None
    if _output_shapes(new) != out_before:
        raise FxgrowError(f"growth changed the output shape: {out_before} -> {_output_shapes(new)}")
    if slicing is not None:
        reslice(new, *slicing, example)
    info = {
        "factor": g, "sources": n, "layout": layout, "new_coefficients": new_coefficients,
        "widths": [{"group": grp.id, "before": grp.size, "after": grp.size * g,
                    "producers": grp.producers} for grp in growing],
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in new.parameters()),
    }
    return new, info


def _check_compander_scales(gm: nn.Module, sources: list[dict]) -> None:
    """One (a, b) serves every block of a grown weight: the sources must agree on it."""
    for path, module in gm.named_modules():
        if isinstance(module, CompandProducer):
            for name in module.state_dict():
                key = f"{path}.{name}"
                if any(not torch.equal(s[key], sources[0][key]) for s in sources[1:]):
                    raise FxgrowError(f"cannot fuse: compander '{key}' differs between the source "
                                      "nets, and one value serves every block of the grown weight")


def _grow_masks(gm: fx.GraphModule, channels: _Channels, grids: list[_Grid], sources: list[dict],
                g: int) -> None:
    """The mask of every grown mixed weight: source block i holds source net i's mask, the
    new blocks are all ones and `fresh` (the prune_regrow callback lays them out)."""
    by_weight = {grid.producer.source: grid for grid in grids}
    for chain in weight_chains(gm).values():
        for node in chain.producers:
            mask = gm.get_submodule(node.target)
            grid = by_weight.get(chain.key)
            if not isinstance(mask, MaskProducer) or grid is None or grid.rows * grid.cols == 1:
                continue
            old = mask.mask
            if old.dim() < 2:
                raise FxgrowError(f"grow cannot widen the mask of '{chain.key}': a 1-d mask")
            shape = grid.producer.block_shape
            index = []  # per dim: (band of each grown index, its index in the source block)
            for dim, bands in ((0, grid.rows), (1, grid.cols)):
                if bands == 1:
                    index.append((torch.zeros(shape[dim], dtype=torch.long), torch.arange(shape[dim])))
                else:
                    index.append(channels.positions(chain.layer, chain.param, dim, g, shape[dim]))
            (band_out, old_out), (band_in, old_in) = (tuple(t.to(old.device) for t in pair) for pair in index)
            grown = torch.ones(len(band_out), len(band_in), *old.shape[2:], dtype=old.dtype, device=old.device)
            fresh = torch.ones(grown.shape, dtype=torch.bool, device=old.device)
            for i in range(min(len(sources), max(grid.rows, grid.cols))):
                r, c = grid.source_block(i)
                rows = (band_out == r).nonzero().flatten()
                cols = (band_in == c).nonzero().flatten()
                block = sources[i][f"{node.target}.mask"][old_out[rows][:, None], old_in[cols][None, :]]
                grown[rows[:, None], cols[None, :]] = block.to(grown)
                fresh[rows[:, None], cols[None, :]] = False
            mask._buffers["mask"] = grown
            mask.fresh = fresh


def _widen_tensors(gm: fx.GraphModule, channels: _Channels, sources: list[dict], g: int,
                   mixed: set[str]) -> None:
    """Every tensor a growing channel group indexes, other than the mixed weights: band b
    from source b, or for bands without a source the norm defaults (gamma=1, beta=0,
    mean=0, var=1), zero biases, or a copy of source b mod n for anything else."""
    n = len(sources)
    weight_layers = set(layer_types(gm))
    for (layer, param), dims in channels.slices.items():
        key = f"{layer}.{param}" if layer else param
        growing = [d for d in dims if channels.grows(layer, param, d)]
        if key in mixed or not growing:
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
        default = _default_band(_owner(gm, layer), param, old)
        stacked = torch.stack([sources[b][key] if b < n else default if default is not None
                               else sources[b % n][key] for b in range(g)])
        value = stacked.movedim(dim + 1, 1)[band.to(old.device), index.to(old.device)].movedim(0, dim)
        _set_tensor(gm, key, value.contiguous())


def _default_band(owner: nn.Module | None, param: str, like: torch.Tensor) -> torch.Tensor | None:
    """The value of channels no source net provides, or None to copy a source."""
    if param == "running_var" or (param == "weight" and isinstance(owner, _NORMS)):
        return torch.ones_like(like)
    if param in ("bias", "running_mean") and (owner is None or isinstance(owner, _NORMS + _WEIGHT_LAYERS)):
        return torch.zeros_like(like)
    return None


def _fix_layer_args(gm: fx.GraphModule, g: int, channels: _Channels) -> None:
    """Depthwise convs grow their groups with their channels; module attributes that
    describe widths follow the tensors."""
    conv_groups = {}
    for node in gm.graph.nodes:
        if is_layer(node) and meta(node)["module_type"].startswith("Conv"):
            layer, groups = meta(node)["source"], node.args[6]
            if groups > 1 and channels.grows(layer, "weight", 0):
                node.args = (*node.args[:6], groups * g, *node.args[7:])
            conv_groups[layer] = node.args[6]
    mixed = {p.source: p for p in mix_producers(gm).values()}
    for path, module in gm.named_modules():
        weight = getattr(module, "weight", None)
        shape = (mixed[f"{path}.weight"].weight_shape if f"{path}.weight" in mixed
                 else tuple(weight.shape) if isinstance(weight, torch.Tensor) else None)
        if shape is None:
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = shape[0], shape[1]
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            module.groups = conv_groups.get(path, module.groups)
            module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = shape[0]
        elif isinstance(module, nn.GroupNorm):
            if module.num_groups == module.num_channels:
                module.num_groups = shape[0]
            module.num_channels = shape[0]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(shape)


# --- small helpers -------------------------------------------------------------------------------

@torch.no_grad()
def _propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """ShapeProp on the real tensors in eval mode (no statistics change). A forward on a
    batch of two is cheap next to a training run, and exact for every parameter layout,
    shared parameters included."""
    was_training = gm.training
    gm.eval()
    try:
        ShapeProp(gm).propagate(example)
    finally:
        gm.train(was_training)


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


def _set_tensor(gm: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_path, _, name = key.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=owner._parameters[name].requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        raise FxgrowError(f"grow: '{key}' is neither a parameter nor a buffer")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    module.train(getattr(parent, name).training)
    setattr(parent, name, module)
