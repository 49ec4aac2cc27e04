"""Network growth (ALGORITHMS.md section 1.2): widen a template-mixed network by g.

Growth is an event, not a rewrite at spec time: the pass checks the model and hands the
loop a `GrowCallback`, which at `at` builds the grown GraphModule with `grow_model` and
swaps it in through `ctx.replace_model`.

`grow_model` widens every non-fixed channel group of `fxgrow.analysis.coupling` by g.
A mixed weight becomes a grid of blocks (see `fxgrow.nn.mixing`): the source blocks
(diagonal; stacked rows for a layer whose inputs stay, e.g. the first; side-by-side
columns for one whose outputs stay, e.g. the classifier) keep source net i's alphas over
its own templates, every other block gets new alphas over the template set the layout
picks. Per-channel tensors (biases, norm parameters and statistics) are concatenated
across sources; a bias whose outputs stay but whose inputs grew is the sum of the
sources' biases, so the classifier's logits are the sum of the source nets' logits.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..analysis import forward_flops
from ..analysis.coupling import ChannelGroup, ChannelUse, channel_groups
from ..errors import FxgrowError
from ..ir import _KIND_BY_FN, fetch_attr, is_layer, layer_types, meta, weight_chains
from ..nn.compander import CompandProducer
from ..nn.mixing import MixProducer, TemplateBank
from ..specs.base import PassSpec, StrictModel
from ..train.callbacks import Callback, TrainContext
from .base import Match, Pass, PassContext, register_pass
from .template_mixing import TemplateMixingPass, describe, mix_producers

# Producers growth knows how to carry over; anything else in a chain is refused.
SUPPORTED_PRODUCERS = (MixProducer, CompandProducer)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class GrowAt(StrictModel):
    """When to grow: exactly one of these."""

    epoch: int | None = Field(None, ge=0, description="at the start of this epoch (0-based)")
    step: int | None = Field(None, ge=0, description="before this optimizer step (0-based)")
    flops_fraction: float | None = Field(
        None, gt=0, lt=1, description="once this run has spent this fraction of the FLOPs of "
                                      "training the grown model for the whole run")

    @model_validator(mode="after")
    def _exactly_one(self) -> "GrowAt":
        given = [k for k in ("epoch", "step", "flops_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of epoch, step, flops_fraction (got {given or 'none'})")
        return self


class GrowSpec(PassSpec):
    kind: Literal["grow"] = "grow"
    factor: int = Field(2, ge=2, description="g: every growing channel group becomes g times wider")
    at: GrowAt
    fuse: list[str] = Field(default_factory=list, description=(
        "run folders or checkpoint.pt files of other trained small runs of the same spec; "
        "source net 0 is this run's model, the fused ones follow on the diagonal"))
    layout: Literal["vertical", "horizontal"] = "vertical"
    new_coefficients: Literal["orthogonal", "random", "copy"] = "orthogonal"
    noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to every new alpha")

    @field_validator("fuse", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None or value == "none" else value

    @model_validator(mode="before")
    @classmethod
    def _no_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "targets" in data:
            raise ValueError("grow has no targets: it widens every coupled channel group")
        return data

    @model_validator(mode="after")
    def _sources_fit(self) -> "GrowSpec":
        if len(self.fuse) + 1 > self.factor:
            raise ValueError(f"{len(self.fuse)} fused runs plus this one are more source nets "
                             f"than factor={self.factor} diagonal blocks")
        return self

    def check_train(self, train) -> list[tuple[str, str]]:
        epochs = getattr(train, "epochs", None)
        if self.at.epoch is not None and getattr(train, "steps", None) is None and epochs is not None \
                and self.at.epoch >= epochs:
            return [("at.epoch", f"growth at epoch {self.at.epoch} never happens: training has "
                                 f"{epochs} epochs (0..{epochs - 1})")]
        return []


# --------------------------------------------------------------------------------------
# Where every channel goes.

def _new_positions(entries: list[tuple[ChannelUse, ChannelGroup]], g: int, length: int,
                   where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each index of the grown dim: the band (source) it comes from and its index in
    the old dim. A growing group's block of C channels (each repeated `repeat` times)
    becomes g*C channels, band b first: band-major inside the block."""
    entries = sorted(entries, key=lambda e: e[0].offset)
    bands, olds, covered = [], [], 0
    for use, group in entries:
        span = group.size * use.repeat
        if use.offset != covered:
            raise FxgrowError(f"{where}: channel groups leave a gap or overlap at index {covered}")
        local = torch.arange(span)
        copies = g if not group.fixed else 1
        bands.append(torch.arange(copies).repeat_interleave(span))
        olds.append(use.offset + local.repeat(copies))
        covered += span
    if covered != length:
        raise FxgrowError(f"{where}: channel groups cover {covered} of {length} indices")
    return torch.cat(bands), torch.cat(olds)


def _default_band(owner: nn.Module | None, param: str, like: torch.Tensor) -> torch.Tensor | None:
    """The value of channels no source net provides, or None to copy a source."""
    if param == "running_var" or (param == "weight" and isinstance(owner, _NORMS)):
        return torch.ones_like(like)
    if param in ("bias", "running_mean") and (isinstance(owner, _NORMS) or owner is None
                                              or _is_weight_layer(owner)):
        return torch.zeros_like(like)
    return None


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


# --------------------------------------------------------------------------------------
# New coefficients.

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
    """Hands out new alphas per bank and template set, in a fixed order."""

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


def _source_index(r: int, c: int, rows: int, cols: int, n: int) -> int | None:
    """Which source net block (r, c) copies, or None for a new block."""
    if rows == cols:
        i = r if r == c else None
    elif cols == 1:
        i = r
    elif rows == 1:
        i = c
    else:
        raise FxgrowError(f"a {rows}x{cols} block grid")
    return i if i is not None and i < n else None


# --------------------------------------------------------------------------------------

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
                    "of template mixing and compander producers only")
        for producer in chain.modules(gm):
            if isinstance(producer, MixProducer) and (producer.grid != (1, 1) or producer.sets != 1):
                raise FxgrowError(f"'{key}' has grown already; growing twice is not supported")


def load_source(path: str | Path, reference: dict[str, torch.Tensor], where: str = "fuse") -> dict[str, torch.Tensor]:
    """The model state of another run (a run folder or a checkpoint file), checked tensor
    by tensor against `reference` (this run's ungrown state)."""
    from ..train.checkpoint import CHECKPOINT, load_checkpoint

    file = Path(path) / CHECKPOINT if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FxgrowError(f"{where}: no checkpoint at {file} (train the run to fuse first)")
    try:
        state = load_checkpoint(file)
    except Exception as e:  # torch.load raises pickle, zip and runtime errors alike
        raise FxgrowError(f"{where}: cannot read {file}: {e}") from None
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


@torch.no_grad()
def grow_model(gm: fx.GraphModule, sources: list[dict[str, torch.Tensor]], factor: int,
               example: torch.Tensor, *, layout: str = "vertical",
               new_coefficients: str = "orthogonal", noise: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The grown copy of `gm` and a summary. `sources[i]` is the state_dict of source net i
    (same structure as `gm`; `sources[0]` is normally `gm.state_dict()`)."""
    g, n = factor, len(sources)
    if not 1 <= n <= g:
        raise FxgrowError(f"{n} source nets for factor {g}: need 1..{g}")
    check_growable(gm)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(iter(sources[0].values())).device
    sources = [{k: v.to(device) for k, v in s.items()} for s in sources]
    new = copy.deepcopy(gm)
    _propagate_shapes(new, example)
    out_before = _output_shapes(new)
    groups = channel_groups(new)
    growing = [grp for grp in groups if not grp.fixed]
    if not growing:
        reasons = "; ".join(f"{grp.size} channels of {', '.join(grp.producers) or 'the input'}: "
                            f"{grp.reason}" for grp in groups)
        raise FxgrowError(f"no channel group can grow ({reasons})")

    slices: dict[tuple[str, str], dict[int, list[tuple[ChannelUse, ChannelGroup]]]] = {}
    for grp in groups:
        for use in grp.uses:
            slices.setdefault((use.layer, use.param), {}).setdefault(use.dim, []).append((use, grp))
    producers = {p.source: (path, p) for path, p in mix_producers(new).items()}
    weight_layers = set(layer_types(new))

    def grows(layer: str, param: str, dim: int) -> bool:
        return any(not grp.fixed for _, grp in slices.get((layer, param), {}).get(dim, []))

    # Mixed weights: grids of blocks over the source nets' templates.
    coefficients = _Coefficients(new_coefficients, noise, generator)
    plans = []
    for key, (path, producer) in producers.items():
        layer, _, param = key.rpartition(".")
        shape = producer.block_shape
        rows = g if grows(layer, param, 0) else 1
        cols = g if len(shape) > 1 and grows(layer, param, 1) else 1
        perms = []
        for dim, bands in ((0, rows), (1, cols)):
            entries = slices.get((layer, param), {}).get(dim, [])
            if bands == 1:
                perms.append(None)
                continue
            if any(grp.fixed for _, grp in entries):
                raise FxgrowError(f"'{key}' dim {dim} mixes growing and fixed channel groups "
                                  f"({'; '.join(grp.reason for _, grp in entries if grp.fixed)})")
            band, old = _new_positions(entries, g, shape[dim], f"'{key}' dim {dim}")
            perm = band * shape[dim] + old
            perms.append(None if torch.equal(perm, torch.arange(len(perm))) else perm.to(device))
        set_axis = "row" if cols == 1 else "col" if rows == 1 else ("row" if layout == "vertical" else "col")
        band_count = rows if set_axis == "row" else cols
        set_index = [b % n for b in range(band_count)]
        k = producer.alpha.shape[-1]
        alpha = torch.zeros(rows, cols, k, dtype=torch.float64)
        new_blocks = []
        for r in range(rows):
            for c in range(cols):
                s = set_index[r] if set_axis == "row" else set_index[c]
                i = _source_index(r, c, rows, cols, n)
                if i is not None:
                    alpha[r, c] = sources[i][f"{path}.alpha"].view(k).to(torch.float64).cpu()
                    coefficients.note(producer.bank, s, alpha[r, c])
                else:
                    new_blocks.append((r, c, s))
        plans.append((path, producer, rows, cols, perms, set_axis, set_index, alpha, new_blocks))
    for path, producer, rows, cols, perms, set_axis, set_index, alpha, new_blocks in plans:
        k = alpha.shape[-1]
        for r, c, s in new_blocks:
            # the source block mixing the same template set (source net s's own block)
            sr, sc = (s, s) if rows == cols else ((s, 0) if cols == 1 else (0, s))
            alpha[r, c] = coefficients.new(producer.bank, s, k, alpha[sr, sc])
        index = None
        if n > 1 and set_index != list(range(n)):
            index = torch.tensor(set_index, dtype=torch.long, device=device)
        grown = MixProducer(alpha.to(producer.alpha.dtype).to(device), producer.block_shape,
                            bank=producer.bank, source=producer.source, sets=n, set_axis=set_axis,
                            set_index=index, perm_out=perms[0], perm_in=perms[1])
        _set_module(new, path, grown)

    # Template banks: source net i's templates are set i.
    if n > 1:
        for bank_path in {p.bank for _, p in producers.values()}:
            key = f"{bank_path}.templates"
            _set_module(new, bank_path, TemplateBank(torch.cat([s[key] for s in sources]), sets=n))

    # Compander scales must agree across sources: one (a, b) serves every block.
    for path, module in new.named_modules():
        if isinstance(module, CompandProducer):
            for name, value in module.state_dict().items():
                key = f"{path}.{name}"
                if any(not torch.equal(s[key], sources[0][key]) for s in sources[1:]):
                    raise FxgrowError(f"cannot fuse: compander '{key}' differs between the source "
                                      "nets, and one value serves every block of the grown weight")

    # Every other tensor a channel group indexes.
    mixed = set(producers)
    for (layer, param), dims in slices.items():
        key = f"{layer}.{param}" if layer else param
        growing_dims = [d for d in dims if grows(layer, param, d)]
        if key in mixed:
            continue
        owner = _owner(new, layer)
        if layer in weight_layers and param == "weight":
            if growing_dims:
                raise FxgrowError(f"grow needs every layer whose channels grow to be template-mixed: "
                                  f"'{layer}' is not (add it to the template_mixing targets)")
            continue
        if not growing_dims:
            continue
        if len(growing_dims) > 1:
            raise FxgrowError(f"'{key}' would grow along {len(growing_dims)} dims; only weights of "
                              "template-mixed layers can")
        _check_plain(new, key)
        dim = growing_dims[0]
        old = sources[0][key]
        band, index = _new_positions(dims[dim], g, old.shape[dim], f"'{key}' dim {dim}")
        default = _default_band(owner, param, old)
        stacked = torch.stack([sources[b][key] if b < n else
                               (default if default is not None else sources[b % n][key])
                               for b in range(g)])
        value = stacked.movedim(dim + 1, 1)[band.to(device), index.to(device)].movedim(0, dim)
        _set_tensor(new, key, value.contiguous())

    # Layers whose outputs stay but whose inputs grew (the classifier) add up the source
    # nets' partial outputs, so their bias is the sum of the sources' biases.
    for path, producer, rows, cols, *_ in plans:
        key = f"{producer.source.rpartition('.')[0]}.bias"
        if rows == 1 and cols > 1 and n > 1 and key in sources[0]:
            _check_plain(new, key)
            _set_tensor(new, key, torch.stack([s[key] for s in sources]).sum(0))

    _fix_layer_args(new, g, grows)
    new.recompile()
    try:
        _propagate_shapes(new, example)
    except Exception as e:
        raise FxgrowError(f"the grown model does not run ({type(e).__name__}: {e}); a shape "
                          "hard-coded in the model (e.g. x.view(-1, 256)) cannot grow") from None
    if _output_shapes(new) != out_before:
        raise FxgrowError(f"growth changed the output shape: {out_before} -> {_output_shapes(new)}")
    info = {
        "factor": g, "sources": n, "layout": layout, "new_coefficients": new_coefficients,
        "widths": [{"group": grp.id, "before": grp.size, "after": grp.size * g,
                    "producers": grp.producers} for grp in growing],
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in new.parameters()),
    }
    return new, info


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


def surviving_params(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """{name: name} of parameters that growth left unchanged (same name, shape, value):
    the ones whose optimizer state carries over."""
    before = dict(old.named_parameters())
    return {name: name for name, p in new.named_parameters()
            if name in before and before[name].shape == p.shape and torch.equal(before[name], p)}


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
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        raise FxgrowError(f"grow: '{key}' is neither a parameter nor a buffer")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    module.train(getattr(parent, name).training)
    setattr(parent, name, module)


def _fix_layer_args(gm: fx.GraphModule, g: int, grows) -> None:
    """Grouped (depthwise) convs grow their groups with their channels; module attributes
    that describe widths follow the tensors."""
    conv_groups = {}
    for node in gm.graph.nodes:
        if is_layer(node) and meta(node)["module_type"].startswith("Conv"):
            layer = meta(node)["source"]
            groups = node.args[6]
            if groups > 1 and grows(layer, "weight", 0):
                node.args = (*node.args[:6], groups * g, *node.args[7:])
            conv_groups[layer] = node.args[6]
    mixed = {p.source: p for p in mix_producers(gm).values()}
    for path, module in gm.named_modules():
        weight = mixed.get(f"{path}.weight")
        shape = weight.weight_shape if weight else (
            tuple(module.weight.shape) if isinstance(getattr(module, "weight", None), torch.Tensor) else None)
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


# --------------------------------------------------------------------------------------
# The event.

class GrowCallback(Callback):
    name = "grow"

    def __init__(self, spec: GrowSpec):
        self.spec = spec
        self.growth_step: int | None = None
        self.grown = False
        self.input_shape: list[int] | None = None
        self.input_dtype = "float32"
        self.info: dict[str, Any] = {}

    # --- when ---
    def on_train_start(self, ctx: TrainContext) -> None:
        at, total = self.spec.at, ctx.total_steps
        if at.step is not None:
            self.growth_step = at.step
        elif at.epoch is not None:
            self.growth_step = at.epoch * ctx.steps_per_epoch
        if self.growth_step is not None and self.growth_step >= total:
            raise FxgrowError(f"grow.at: growth at step {self.growth_step} never happens: training "
                              f"takes {total} steps")
        if self.spec.fuse and not getattr(ctx, "resumed", False):
            reference = ctx.model.state_dict()
            for i, path in enumerate(self.spec.fuse):
                load_source(path, reference, f"grow.fuse.{i}")

    def on_step_start(self, ctx: TrainContext) -> None:
        if self.grown:
            return
        if self.input_shape is None:
            x = ctx.batch[0]
            self.input_shape, self.input_dtype = list(x.shape[1:]), str(x.dtype).removeprefix("torch.")
        if self.growth_step is None:
            self.growth_step = self._flops_step(ctx)
        if ctx.step >= self.growth_step:
            self._grow(ctx)

    def _flops_step(self, ctx: TrainContext) -> int:
        """The first step at which this run has spent `flops_fraction` of the FLOPs of
        training the grown model for all `total_steps` (same samples per step)."""
        x = ctx.batch[0]
        small = forward_flops(ctx.model, x)
        grown, _ = self._build(ctx, structure_only=True)
        big = forward_flops(grown, x)
        step = math.ceil(self.spec.at.flops_fraction * big * ctx.total_steps / small)
        if step >= ctx.total_steps:
            raise FxgrowError(
                f"grow.at.flops_fraction={self.spec.at.flops_fraction} is never reached: training the "
                f"small model for the whole run spends {small / big:.3f} of the grown model's budget")
        return step

    # --- how ---
    def _example(self, ctx: TrainContext) -> torch.Tensor:
        return torch.zeros((2, *self.input_shape), dtype=getattr(torch, self.input_dtype),
                           device=ctx.device)

    def _build(self, ctx: TrainContext, structure_only: bool) -> tuple[fx.GraphModule, dict]:
        model = ctx.model
        n = 1 + len(self.spec.fuse)
        own = model.state_dict()
        if structure_only:  # the shapes only (resume, FLOPs): no files, no fresh randomness
            sources = [own] * n
        else:
            sources = [own] + [load_source(p, own, f"grow.fuse.{i}") for i, p in enumerate(self.spec.fuse)]
        generator = torch.Generator().manual_seed(int(ctx.seed) * 1_000_003 + int(self.growth_step or 0))
        return grow_model(model, sources, self.spec.factor, self._example(ctx), layout=self.spec.layout,
                          new_coefficients=self.spec.new_coefficients, noise=self.spec.noise,
                          generator=generator)

    def _grow(self, ctx: TrainContext) -> None:
        old = ctx.model
        new, info = self._build(ctx, structure_only=False)
        params = surviving_params(old, new)
        ctx.replace_model(new, params)
        self.grown = True
        self.info = {"step": ctx.step, "epoch": ctx.epoch, **info, "kept_optimizer_state": sorted(params),
                     "fused": list(self.spec.fuse), "blocks": describe(new)}
        ctx.log({"split": "grow", "factor": info["factor"], "sources": info["sources"],
                 "params_before": info["params_before"], "params_after": info["params_after"],
                 "widths": [[w["before"], w["after"]] for w in info["widths"]]})

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        return {"grown": self.grown, "growth_step": self.growth_step, "input_shape": self.input_shape,
                "input_dtype": self.input_dtype, "info": self.info}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        if not state:
            return
        self.growth_step, self.input_shape = state["growth_step"], state["input_shape"]
        self.input_dtype, self.info = state["input_dtype"], state["info"]
        if state["grown"] and not self.grown:
            if ctx is None:
                raise FxgrowError("grow: resuming after growth needs the training context")
            new, _ = self._build(ctx, structure_only=True)  # the checkpoint's values load next
            ctx.replace_model(new)
            self.grown = True

    def report(self) -> dict[str, Any]:
        return {"at": self.spec.at.model_dump(exclude_none=True), "growth_step": self.growth_step,
                "grown": self.grown, **self.info}


@register_pass
class GrowPass(Pass):
    kind = "grow"
    spec_cls = GrowSpec
    preserves_computation = True  # the rewrite changes nothing; growth happens in training
    rank = None
    functionalizes = False

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> list[Match]:
        """The template-mixed layers (their channel groups are known only with shapes)."""
        types = layer_types(gm)
        return [Match(p.source.rpartition(".")[0], types.get(p.source.rpartition(".")[0], "?"),
                      {"bank": p.bank}) for p in mix_producers(gm).values()]

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> None:
        mixing = [p for p in ctx.applied if isinstance(p, TemplateMixingPass)]
        if not mixing:
            raise FxgrowError("grow needs a template_mixing pass before it in `passes`")
        check_growable(gm)
        for p in mixing:  # their FLOPs accounting adds the fused runs' cost
            p.fused_runs = list(self.spec.fuse)

    def callbacks(self, gm: fx.GraphModule) -> list[Callback]:
        check_growable(gm)  # passes after grow may have added producers it cannot carry
        return [GrowCallback(self.spec)]
