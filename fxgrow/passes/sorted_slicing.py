"""Sorted slicing (ALGORITHMS.md section 4, SortedNet): one set of weights trained as a grid
of nested sub-models. A sub-model is a point (width fraction, kept skippable blocks).

Width w keeps the first ceil(w * C) channels of every coupled channel group (the analysis
in `fxgrow.analysis.coupling`): a `SliceProducer` ends the chain of every weight and bias
that indexes a sliced group, norm layers are replaced at their path by sliced ones, and
depthwise convs take their `groups` from a `ConvGroups` module. Depth d keeps the first d
skippable residual blocks (output shape == input shape, y = x + f(x)), found in the traced
graph (`sorted_slicing_plan.py`) and bracketed by `DepthGate`s. The callback picks the sub-models of every step from
a generator seeded by (seed, step) and evaluates the whole grid at the end of training.
"""
from __future__ import annotations

import collections
import itertools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import fx, nn

from ..analysis.coupling import param_key
from ..analysis.shapes import graph_checks
from ..errors import FxgrowError, SpecError
from ..ir import META, fetch_attr, insert_producer, is_layer, meta, replace_submodule, replace_tensor, weight_chains
from ..layers import follow_input, kind_of, layer_call
from ..nn.slicing import (SLICED_NORMS, ConvGroups, DepthGate, LayerExit, SliceProducer, SubnetState,
                          active_channels)
from ..specs.base import PassSpec, StrictModel
from ..subnets import evaluate_grid, find_state, recalibrate
from ..train.callbacks import Callback
from ..train.data import stable_seed
from .base import Match, Pass, PassContext, Record, register_pass
from .sorted_slicing_layers import LayerList, drop_layers, entry_of, find_layer_list, group_dimension
from .sorted_slicing_plan import Block, SlicePlan, plan_slicing, skippable_blocks, width_share
from .sorted_slicing_sizes import fold_sizes, follow_sizes

# --- spec -------------------------------------------------------------------------------


class WidthSpec(StrictModel):
    fractions: list[float] = Field(min_length=1, description="width fractions in (0, 1]; must include 1.0")
    multiple_of: int = Field(1, ge=1, description="round every group's kept channels up to a multiple")

    @field_validator("fractions")
    @classmethod
    def _valid(cls, fractions: list[float]) -> list[float]:
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must lie in (0, 1] (got {bad[0]})")
        if 1.0 not in fractions:
            raise ValueError("fractions must include 1.0 (the largest sub-model)")
        if len(set(fractions)) != len(fractions):
            raise ValueError("fractions must be distinct")
        return sorted(fractions)


class DepthSpec(StrictModel):
    blocks: list[int] | Literal["all"] = Field(
        "all", description="kept-block counts; `all`: every count from 0 to the number of skippable blocks")
    by: Literal["auto", "layers", "residual"] = Field(
        "auto", description="what a block is: layers (the entries of the model's layer list, a transformer's "
                            "layers), residual (every y = x + f(x)), auto (layers when the model has one layer "
                            "list holding all its residual blocks, else residual)")
    layers: str | None = Field(None, description="the layer list's module path (e.g. model.layers); default: "
                                                 "the longest ModuleList / Sequential of one module type")
    every_depth: bool = Field(False, description="Sorted LLaMA: every sub-model drawn runs at every depth of the "
                                                 "grid on the same batch, the losses summed (mode: stochastic)")

    @field_validator("blocks")
    @classmethod
    def _valid(cls, blocks):
        if blocks == "all":
            return blocks
        if not blocks:
            raise ValueError("give at least one block count")
        if min(blocks) < 0:
            raise ValueError(f"block counts must be >= 0 (got {min(blocks)})")
        if len(set(blocks)) != len(blocks):
            raise ValueError("block counts must be distinct")
        return sorted(blocks)

    @model_validator(mode="before")
    @classmethod
    def _by_layers(cls, data: Any) -> Any:
        """Naming the layer list means blocks are its layers."""
        if isinstance(data, dict) and data.get("layers") is not None:
            if data.get("by", "layers") == "residual":
                raise ValueError("layers names a layer list: it needs by: layers (or auto), not residual")
            data = {**data, "by": "layers"}
        return data


PER_DIMENSION = ("hidden", "heads", "ffn")  # the paper's Table 8 dimensions besides layers


class SortedSlicingSpec(PassSpec):
    kind: Literal["sorted_slicing"] = "sorted_slicing"
    width: WidthSpec | None = Field(None, description="one fraction for every sliced channel group")
    hidden: WidthSpec | None = Field(None, description="the residual stream's channels (model hidden size), "
                                                      "a dimension of its own")
    heads: WidthSpec | None = Field(None, description="attention heads (the first h of every attention), a "
                                                     "dimension of its own")
    ffn: WidthSpec | None = Field(None, description="every other channel inside the layers (FFN hidden size), a "
                                                   "dimension of its own")
    depth: DepthSpec | None = None
    grid: Literal["product", "list"] = Field(
        "product", description="product: every combination of the dimensions' values; list: the i-th smallest "
                                "of each dimension together")
    sampling: Literal["uniform", "weighted"] = "uniform"
    weights: list[float] | None = Field(None, description="one per grid point (grid order), for sampling: weighted")
    mode: Literal["stochastic", "summation", "sandwich"] = "stochastic"
    sub_models_per_batch: int | None = Field(
        None, ge=1, description="sub-models drawn for each batch, all run on that same batch; default 1, "
                                "sandwich 4 (the largest, the smallest and 2 random)")
    accumulate_batches: int = Field(
        1, ge=1, description="SortedNet's gradient accumulation (gacc = k): one optimizer step takes k "
                             "batches, each with its own draw, so an epoch has batches / k steps")
    loss_reduction: Literal["sum", "mean"] | None = Field(
        None, description="how the losses of one batch's sub-models combine: sum (default for summation, "
                          "the paper's) or mean (default otherwise); the k batches of a step are averaged")
    bn: Literal["recalibrate", "per_width", "shared"] = "recalibrate"
    recalibrate_batches: int = Field(10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """`accumulate` ran k sub-models on one batch; that is `sub_models_per_batch` now
        (SortedNet's gradient accumulation over batches is `accumulate_batches`)."""
        if isinstance(data, dict) and "accumulate" in data:
            if "sub_models_per_batch" in data:
                raise ValueError("accumulate is the old name of sub_models_per_batch: give one of them")
            warnings.warn("sorted_slicing: `accumulate` is now `sub_models_per_batch` (k sub-models on one "
                          "batch); SortedNet's gradient accumulation over k batches is `accumulate_batches`",
                          DeprecationWarning, stacklevel=2)
            data = {("sub_models_per_batch" if k == "accumulate" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "SortedSlicingSpec":
        named = [d for d in PER_DIMENSION if getattr(self, d) is not None]
        if self.width is None and self.depth is None and not named:
            raise ValueError("give width and/or depth (or heads / ffn / hidden): nothing to slice")
        if self.width is not None and named:
            raise ValueError(f"width cuts every channel group by one fraction; {', '.join(named)} "
                             f"{'gives its' if len(named) == 1 else 'give their'} own: use width or "
                             f"{'/'.join(PER_DIMENSION)}, not both")
        if self.sampling == "weighted":
            if not self.weights:
                raise ValueError("sampling: weighted needs `weights` (one per grid point)")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        elif self.weights is not None:
            raise ValueError("weights apply to sampling: weighted only")
        if self.depth is not None and self.depth.every_depth and self.mode != "stochastic":
            raise ValueError(f"depth.every_depth runs every depth of each drawn sub-model (Sorted LLaMA); mode "
                             f"{self.mode} picks its own set: use mode: stochastic")
        if self.mode == "sandwich" and self.sub_models_per_batch is not None and self.sub_models_per_batch < 2:
            raise ValueError("sandwich runs the largest and the smallest sub-model: sub_models_per_batch "
                             "must be >= 2")
        counts = {d: len(s.fractions) for d, s in self.dimensions().items()}
        if isinstance(self.depth, DepthSpec) and self.depth.blocks != "all":
            counts["depth"] = len(self.depth.blocks)
        if self.grid == "list" and len(set(counts.values()) - {1}) > 1:
            listed = ", ".join(f"{n} {d}" for d, n in counts.items())
            raise ValueError(f"grid: list pairs widths with depths: {listed} values")
        return self

    def dimensions(self) -> dict[str, WidthSpec]:
        """The width dimensions given, in point order: {"width": ...}, or some of hidden, heads, ffn."""
        return {d: getattr(self, d) for d in ("width", *PER_DIMENSION) if getattr(self, d) is not None}

    @property
    def draws(self) -> int:
        """Sub-models drawn for each batch."""
        if self.sub_models_per_batch is not None:
            return self.sub_models_per_batch
        return 4 if self.mode == "sandwich" else 1

    @property
    def reduction(self) -> str:
        every_depth = self.depth is not None and self.depth.every_depth
        return self.loss_reduction or ("sum" if self.mode == "summation" or every_depth else "mean")


# --- the pass ----------------------------------------------------------------------------


@dataclass
class SlicingRecord(Record):
    blocks: list[str] = field(default_factory=list)           # the skippable blocks, in order
    depth_by: str = ""                                        # "layers" | "residual" ("" without depth)
    depth_note: str = ""                                      # why the other kind of block was not used
    points: list[tuple[float, int]] = field(default_factory=list)
    sliced: list[int] = field(default_factory=list)           # channel groups sliced
    full_width: dict[int, str] = field(default_factory=dict)  # group -> why it stays at full width
    share_at_half: float = 1.0  # parameters the width-0.5 sub-model keeps, of the whole model's


@register_pass
class SortedSlicingPass(Pass):
    kind = "sorted_slicing"
    spec_cls = SortedSlicingSpec
    preserves_computation = True  # the largest sub-model is the original model
    rank = SliceProducer.rank
    reversible = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if ctx.example_input is None:
            raise FxgrowError("sorted_slicing needs an example input (model.example_input) to find "
                              "channel groups and residual blocks")
        if find_state(gm) is not None or any(p.kind == self.kind for p in ctx.applied):
            raise FxgrowError("the model is sliced already: use one sorted_slicing pass")
        if self.spec.width is not None:  # which groups can be cut, and how much that saves (dry runs too)
            groups = ctx.analyzed(gm).channel_groups(follow_sizes=True)
            plan = plan_slicing(gm, groups, {m.layer for m in self.match(gm, ctx)})
            _require_a_sliced_group(plan)
            share, lost = width_share(gm, groups, plan, 0.5, self.spec.width.multiple_of)
            if share > WARN_SHARE:
                warnings.warn(_width_warning(share, lost, plan, groups), stacklevel=2)

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> SlicingRecord:
        spec: SortedSlicingSpec = self.spec
        analysis = ctx.analyzed(gm)
        analysis.shapes()
        blocks, layer_list, by, note = self._depth_blocks(gm, ctx) if spec.depth is not None else ([], None, "", "")
        depths = self._depths(blocks, ctx)
        dims = {d: s.fractions for d, s in spec.dimensions().items()} or {"width": [1.0]}
        if spec.grid == "product":
            points = [(*widths, d) for widths in itertools.product(*dims.values()) for d in depths]
        else:
            axes = [*dims.values(), depths]
            n = max(len(a) for a in axes)
            axes = [a * n if len(a) == 1 else a for a in axes]
            if len({len(a) for a in axes}) > 1:
                raise SpecError([(f"{ctx.where}.grid", "list pairs widths with depths: "
                                  + ", ".join(f"{len(a)} {d}" for a, d in zip(axes, [*dims, "depth"])))])
            points = list(zip(*axes))
        largest = (1.0,) * len(dims) + (len(blocks),)
        if largest not in points:
            raise SpecError([(f"{ctx.where}.grid", "the grid must hold the largest sub-model "
                                                   f"({', '.join(f'{d} 1.0' for d in dims)}, depth {len(blocks)})")])
        if spec.weights is not None and len(spec.weights) != len(points):
            raise SpecError([(f"{ctx.where}.weights", f"{len(spec.weights)} weights for {len(points)} grid points")])

        share = 1.0
        group_dims: dict[int, str] = {}
        if spec.width is not None:
            groups = analysis.channel_groups(follow_sizes=True)
            plan = plan_slicing(gm, groups, {m.layer for m in matches})
            _require_a_sliced_group(plan)
            share = width_share(gm, groups, plan, 0.5, spec.width.multiple_of)[0]
        elif set(dims) & set(PER_DIMENSION):
            groups = analysis.channel_groups(follow_sizes=True)
            plan, group_dims = self._plan_dimensions(gm, groups, matches, layer_list, ctx)
            share = width_share(gm, groups, plan, 0.5)[0]
        else:
            plan = SlicePlan([], {}, {}, {})
        multiples = {d: s.multiple_of for d, s in spec.dimensions().items()}
        for d, fractions in dims.items():
            _require_distinct_fractions(d, fractions, [g for g in plan.sliced if group_dims.get(g.id, "width") == d],
                                        multiples.get(d, 1), ctx)
        # `width` (or depth alone): every group in the one dimension, as group_dims defaults
        state = SubnetState(dims, {g.id: g.size for g in plan.sliced}, multiples, len(blocks), points, group_dims)
        state.depth_note = f"by {by}: {note}" if by else ""  # for inspect: which blocks, and why
        gm.add_submodule(f"{META}.subnet", state)
        self._slice_chains(gm, plan, state)
        follow_sizes(gm, plan, state, self.kind)
        self._slice_norms(gm, plan, state)
        if layer_list is not None:
            _gate_layers(gm, layer_list, state, self.kind)
        else:
            self._gate_blocks(gm, blocks, state)
        gm.graph.lint()
        gm.recompile()
        _check_every_point(gm, state, ctx.example_input)
        return SlicingRecord(tuple(m.layer for m in matches), blocks=[b.name for b in blocks], points=points,
                             sliced=[g.id for g in plan.sliced], full_width=dict(plan.kept), share_at_half=share,
                             depth_by=by, depth_note=note)

    def _plan_dimensions(self, gm: fx.GraphModule, groups: list, matches: list[Match], layers: LayerList | None,
                         ctx: PassContext) -> tuple[SlicePlan, dict[int, str]]:
        """The slicing plan of the groups of the dimensions given, and each sliced group's
        dimension: heads (a group of attention heads), hidden (the residual stream: a group
        used by more than one layer, or outside the layers too, as the embedding's), ffn
        (every other group inside one layer)."""
        spec = self.spec
        given = [d for d in PER_DIMENSION if getattr(spec, d) is not None]
        if layers is None:
            try:
                layers = find_layer_list(gm, spec.depth.layers if spec.depth is not None else None)
            except FxgrowError as e:
                raise SpecError([(f"{ctx.where}.{given[0]}", f"{'/'.join(given)} are dimensions of a model's "
                                                             f"layers: {e}")]) from e
        dim_of = {g.id: group_dimension(g, layers.path) for g in groups if not g.fixed}
        plan = plan_slicing(gm, [g for g in groups if g.fixed or dim_of[g.id] in given], {m.layer for m in matches})
        for g in groups:
            if not g.fixed and dim_of[g.id] not in given:
                plan.kept[g.id] = f"a {dim_of[g.id]} group; {dim_of[g.id]} is not a dimension of this spec"
        for d in given:  # a dimension that cuts nothing would make its grid points silent copies
            if not any(dim_of[g.id] == d for g in plan.sliced):
                raise SpecError([(f"{ctx.where}.{d}", _nothing_to_slice(d, groups, dim_of, plan))])
        _require_a_sliced_group(plan)
        return plan, {g.id: dim_of[g.id] for g in plan.sliced}

    def _depth_blocks(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list, LayerList | None, str, str]:
        """(blocks, the layer list or None, "layers" | "residual", why the other kind was not
        used). A block is one entry of the layer list (by: layers), or one skippable residual
        block (by: residual); auto takes the layer list when one is found and holds every
        residual block (a transformer: two residual adds per layer, post-LN norms between),
        else the residual blocks (a ResNet, whose stages are lists of different blocks)."""
        spec = self.spec.depth
        residual = skippable_blocks(gm) if spec.by != "layers" else []
        if spec.by == "residual":
            return residual, None, "residual", "by: residual"
        try:
            found = find_layer_list(gm, spec.layers)
        except FxgrowError as e:
            if spec.by == "layers":
                raise SpecError([(f"{ctx.where}.depth.{'layers' if spec.layers else 'by'}", str(e))]) from e
            return residual, None, "residual", f"not by layers: {e}"
        outside = [b.name for b in residual if entry_of(b.end, found.path) is None]
        if outside:
            return residual, None, "residual", (f"layer list '{found.path}' does not hold the residual blocks "
                                                f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}")
        inside = f"; its {len(residual)} residual blocks are counted as layers" if residual else ""
        return [_Entry(e) for e in found.entries], found, "layers", f"layer list '{found.path}'{inside}"

    def _depths(self, blocks: list[Block], ctx: PassContext) -> list[int]:
        spec = self.spec.depth
        if spec is None:
            return [len(blocks)]
        if not blocks:
            raise SpecError([(f"{ctx.where}.depth", "the model has no skippable residual block "
                                                    "(y = x + f(x) with equal input and output shapes) and no "
                                                    "layer list")])
        if spec.blocks == "all":
            return list(range(len(blocks) + 1))
        for i, d in enumerate(spec.blocks):
            if d > len(blocks):
                raise SpecError([(f"{ctx.where}.depth.blocks.{i}",
                                  f"{d} blocks asked, the model has {len(blocks)} skippable blocks "
                                  f"({', '.join(b.name for b in blocks)})")])
        if len(blocks) not in spec.blocks:
            raise SpecError([(f"{ctx.where}.depth.blocks", f"must include {len(blocks)}, the full depth (the "
                                                           f"largest sub-model); the skippable blocks are "
                                                           f"{', '.join(b.name for b in blocks)}")])
        return list(spec.blocks)

    def _slice_chains(self, gm: fx.GraphModule, plan: SlicePlan, state: SubnetState) -> None:
        chains = weight_chains(gm)
        for key, layouts in plan.chains.items():
            insert_producer(gm, chains[key], SliceProducer(state, layouts), self.kind)
        # Options that count channels (a grouped conv's groups) follow the cut; a functional
        # layer norm's normalized_shape follows its input.
        follow = set(plan.follow)
        for node in list(gm.graph.nodes):
            call = layer_call(node, gm)
            if call is not None and node.name in follow:
                follow_input(call)
            if call is None or not (is_layer(node) or call.functional):
                continue
            for option, (role, dim) in call.kind.channel_options(call).items():
                key = param_key(*call.params[role]) if role in call.params else ""
                layout = next((lay for lay in plan.chains.get(key, plan.params.get(key, [])) if lay.dim == dim), None)
                if layout is None:
                    continue
                path = f"{META}.{call.path.replace('.', '_')}.{option}"
                gm.add_submodule(path, ConvGroups(state, layout, call.options[option]))
                with gm.graph.inserting_before(node):
                    counted = gm.graph.call_module(path, ())
                counted.meta[META] = {"role": option, "pass": self.kind, "source": call.path}
                call.set_option(option, counted)
        self._slice_reads(gm, plan, state)  # last: functional layers are found by their get_attr operands

    def _slice_reads(self, gm: fx.GraphModule, plan: SlicePlan, state: SubnetState) -> None:
        """Parameters the graph reads directly (a layer scale, cls_token, a functional norm's
        weight) are cut right after the read; `reverse` bakes the cut into the parameter."""
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" or node.target not in plan.params:
                continue
            path = f"{META}.{node.target.replace('.', '_')}_read_slice"
            gm.add_submodule(path, SliceProducer(state, plan.params[node.target]))
            users = list(node.users)
            with gm.graph.inserting_after(node):
                cut = gm.graph.call_module(path, (node,))
            for user in users:
                user.replace_input_with(node, cut)
            cut.meta[META] = {"role": "read_slice", "pass": self.kind, "source": node.target}

    def _slice_norms(self, gm: fx.GraphModule, plan: SlicePlan, state: SubnetState) -> None:
        for path, layout in plan.norms.items():
            old = gm.get_submodule(path)
            replace_submodule(gm, path, kind_of(old).sliced(old, state, layout, per_width=self.spec.bn == "per_width"))

    def _gate_blocks(self, gm: fx.GraphModule, blocks: list[Block], state: SubnetState) -> None:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        used: set[str] = set()
        exits: dict[fx.Node, fx.Node] = {}  # block end -> its exit gate, for blocks in a row
        for index, block in enumerate(blocks):
            x = exits.get(block.x, block.x)
            base = f"{META}.depth.{block.name.replace('.', '_')}"
            path, k = base, 1
            while path in used:
                path, k = f"{base}_{k}", k + 1
            used.add(path)
            gm.add_submodule(path, DepthGate(state, index, block.name))
            tag = {"role": "gate", "pass": self.kind, "block": block.name, "index": index}
            first = min(block.nodes, key=order.__getitem__)
            with gm.graph.inserting_before(first):
                enter = gm.graph.call_module(path, (x,))
            for n in block.nodes:
                n.replace_input_with(x, enter)
            with gm.graph.inserting_after(block.end):
                leave = gm.graph.call_module(path, (x, block.end))
            block.end.replace_all_uses_with(leave, delete_user_cb=lambda u: u is not leave)
            exits[block.end] = leave
            enter.meta[META] = {**tag, "side": "enter"}
            leave.meta[META] = {**tag, "side": "exit"}

    def callbacks(self, gm: fx.GraphModule, record: SlicingRecord, ctx: PassContext) -> list[Callback]:
        summary = {"blocks": record.blocks, "depth_by": record.depth_by, "depth_note": record.depth_note,
                   "groups": {"sliced": record.sliced,
                              "full_width": {str(g): why for g, why in record.full_width.items()}},
                   "params_share_at_width_0.5": round(record.share_at_half, 4)}
        return [SortedSlicingCallback(self.spec, summary)]

    def describe(self, gm: nn.Module) -> list[dict[str, Any]]:
        return subnet_table(gm)

    @classmethod
    def applied_to(cls, gm: nn.Module) -> bool:
        return find_state(gm) is not None

    @classmethod
    def reverse(cls, gm: fx.GraphModule, full: bool = False) -> None:
        """Turn the slicing machinery at the active sub-model (with `full`, the largest) into
        plain graph code, in place: depth gates become the kept block or a bypass, sliced
        norms plain norms holding the cut tensors, counted options (groups) constants. Slice
        producers that cut nothing at that width leave their chains (all of them at the
        largest sub-model, which takes the slicing off entirely); the others stay, frozen
        at it, for fold."""
        state = find_state(gm)
        if state is None:
            return
        if full:
            state.activate(*state.largest)
        graph = gm.graph
        gates = [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DepthGate)]
        taken_off = {n.target for n in gates}
        for node in [n for n in graph.nodes if n.op == "call_module"
                     and isinstance(gm.get_submodule(n.target), LayerExit)]:
            node.replace_all_uses_with(node.args[state.depth])  # the stream after the kept layers
            graph.erase_node(node)
            drop_layers(gm, gm.get_submodule(node.target).layers, state.depth)
            taken_off.add(node.target)
        for node in gates:  # exits first: a dropped block's body then has no user outside it
            if len(node.args) == 2:
                kept = gm.get_submodule(node.target).kept
                node.replace_all_uses_with(node.args[1] if kept else node.args[0])
                graph.erase_node(node)
        for node in gates:
            if len(node.args) == 1:
                if not gm.get_submodule(node.target).kept:
                    _erase_descendants(graph, node)
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        frozen = False
        fold_sizes(gm)
        for node in list(graph.nodes):
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, ConvGroups):
                value = module()
                for user in list(node.users):  # an int argument again
                    user.replace_input_with(node, value)
            elif isinstance(module, SliceProducer) and meta(node).get("role") == "read_slice":
                if module.cuts[state.width_index]:  # the parameter itself is cut: the read is plain again
                    replace_tensor(gm, node.args[0].target, module._copy_cut(fetch_attr(gm, node.args[0].target)))
                node.replace_all_uses_with(node.args[0])
            elif isinstance(module, SliceProducer) and module.cuts[state.width_index]:
                frozen = True
                continue
            elif isinstance(module, SliceProducer):
                node.replace_all_uses_with(node.args[0])
            else:
                continue
            graph.erase_node(node)
            taken_off.add(node.target)
        for path, module in list(gm.named_modules()):
            if isinstance(module, SLICED_NORMS):
                replace_submodule(gm, path, module.plain())
        graph.lint()
        for path in taken_off | (set() if frozen else {f"{META}.subnet"}):
            gm.delete_submodule(path)
        gm.recompile()


@dataclass
class _Entry:
    """A layer-list entry as a depth block (its name is all the record and errors need)."""

    name: str


def _gate_layers(gm: fx.GraphModule, layers: LayerList, state: SubnetState, kind: str) -> None:
    """One `LayerExit` reading the stream h_0 .. h_L; the nodes after the list read it instead of h_L."""
    path = f"{META}.depth.{layers.path.replace('.', '_') or 'layers'}"
    gm.add_submodule(path, LayerExit(state, layers.path, layers.entries))
    last = layers.streams[-1]
    after = [u for u in last.users if entry_of(u, layers.path) is None]
    with gm.graph.inserting_after(last):
        leave = gm.graph.call_module(path, tuple(layers.streams))
    leave.meta.update({k: last.meta[k] for k in ("tensor_meta", "val") if k in last.meta})
    leave.meta[META] = {"role": "gate", "pass": kind, "layers": layers.path}
    for user in after:
        user.replace_input_with(last, leave)


WARN_SHARE = 0.5  # a net cut everywhere keeps about a quarter at width 0.5: warn above a half


def _require_a_sliced_group(plan: SlicePlan) -> None:
    if not plan.sliced:
        reasons = "; ".join(f"group {g}: {r}" for g, r in plan.kept.items()) or "no channel groups"
        raise FxgrowError(f"sorted_slicing: no channel group can be sliced ({reasons})")


def _require_distinct_fractions(dim: str, fractions: list[float], groups: list, multiple_of: int,
                                ctx: PassContext) -> None:
    """Two fractions of one dimension that keep the same channels in each of its groups are one
    sub-model twice (GQA's kv units: 4 query heads in 2 units have no 1-head sub-model): the
    grid and the report would show a point that is not there."""
    seen: dict[tuple[int, ...], float] = {}
    for f in sorted(fractions):
        kept = tuple(active_channels(g.size, f, multiple_of) for g in groups)
        if kept and kept in seen:
            units = "; ".join(sorted({_units(g) for g in groups}))
            raise SpecError([(f"{ctx.where}.{dim}.fractions",
                              f"{dim} {seen[kept]:g} and {f:g} keep the same channels in every {dim} group "
                              f"({units}): one sub-model twice; drop one or give fractions that differ by a "
                              "whole unit")])
        seen[kept] = f


def _units(g) -> str:
    if g.heads:
        per = f"{g.heads_per_unit} query heads of {g.head_dim} channels (a kv head)" if g.heads_per_unit > 1 else \
            f"a head of {g.head_dim} channels"
        return f"{g.size} units of {per}"
    return f"{g.size} channels"


def _nothing_to_slice(dim: str, groups: list, dim_of: dict[int, str], plan: SlicePlan, most: int = 3) -> str:
    """Why dimension `dim` of a sorted_slicing spec finds no group to cut: its groups and
    why each stays whole (a fixed group whose channels are heads counts as a heads group)."""
    mine = [g for g in groups if dim_of.get(g.id) == dim or (dim == "heads" and g.fixed and g.heads)]
    if dim == "heads":  # the stream read as heads is cut by `hidden` (group_dimension)
        mine += [g for g in groups if dim_of.get(g.id) == "hidden" and g.heads]
    if not mine:
        return f"the model has no {dim} channel group (no {_DIMENSION_WORDS[dim]} found in its layers)"
    why = [f"group {g.id} ({', '.join(g.producers[:2]) or 'no producer'}): "
           + ("the residual stream, read as heads: a hidden group, cut by `hidden`" if dim_of.get(g.id) == "hidden"
              else plan.kept.get(g.id) or g.reason) for g in mine[:most]]
    more = f"; and {len(mine) - most} more" if len(mine) > most else ""
    return f"no {dim} group can be sliced, so {dim} would cut nothing: " + "; ".join(why) + more


_DIMENSION_WORDS = {"heads": "attention whose heads come from projections of their own",
                    "ffn": "channels inside one layer", "hidden": "residual stream"}


def _width_warning(share: float, lost: dict[int, int], plan: SlicePlan, groups: list, most: int = 5) -> str:
    """Width 0.5 keeps `share` of the parameters: name the groups left whole that cost most."""
    by_id = {g.id: g for g in groups}
    ranked = sorted(lost, key=lambda g: -lost[g])
    named = [f"group {g} ({by_id[g].size} channels of {', '.join(by_id[g].producers[:2])}): "
             f"{plan.kept.get(g, by_id[g].reason)}" for g in ranked[:most]]
    more = f"; and {len(ranked) - most} more" if len(ranked) > most else ""
    where = "; ".join(named) + more if named else (
        "most parameters sit where channels are never cut (the model input's and outputs' channels)")
    return (f"sorted_slicing: width 0.5 keeps {share:.0%} of the parameters (a model cut everywhere keeps about "
            f"25%); left at full width: {where}")


def _erase_descendants(graph: fx.Graph, enter: fx.Node) -> None:
    """Remove a dropped block's body: every node computed from its entry gate."""
    body, stack = set(), [enter]
    while stack:
        for user in stack.pop().users:
            if user not in body:
                body.add(user)
                stack.append(user)
    for node in reversed(graph.nodes):
        if node in body:
            graph.erase_node(node)


def subnet_table(gm: nn.Module) -> list[dict[str, Any]]:
    """The sub-model dimensions for `fxgrow inspect`: every sliced channel group with its
    kept channels per width fraction, every gated block with the depths that keep it."""
    state = find_state(gm)
    if state is None:
        return []
    rows = []
    for g, sizes in state.sizes.items():
        dim = state.group_dims[g]
        axis = state.dims.index(dim)
        kept = {w[axis]: size for w, size in zip(state.widths, sizes)}  # one size per fraction of its dimension
        rows.append({"dimension": dim, "item": f"group {g}", "full": state.full[g],
                     "kept": " / ".join(str(kept[f]) for f in sorted(kept))
                             + f" at {' / '.join(f'{f:g}' for f in sorted(kept))}"})
    gates = {m.index: m.block for m in gm.modules() if isinstance(m, DepthGate)}
    for m in gm.modules():
        if isinstance(m, LayerExit):
            gates.update({i: f"{entry} (layer list)" for i, entry in enumerate(m.entries)})
    rows += [{"dimension": "depth", "item": f"block {gates[i]}", "full": "", "kept": f"at depth >= {i + 1}"}
             for i in sorted(gates)]
    if getattr(state, "depth_note", ""):
        rows.append({"dimension": "depth blocks", "item": "found", "full": "", "kept": state.depth_note})
    return rows


@torch.no_grad()
def _check_every_point(gm: fx.GraphModule, state: SubnetState, example: torch.Tensor) -> None:
    """Run the sub-models once, on meta tensors (shapes, no arithmetic), so a model that
    hard-codes a channel count or a block that cannot run on an empty batch fails here,
    naming the sub-model. See `_points_to_check` for which ones."""
    try:
        with graph_checks(gm) as check:
            for point in _points_to_check(state):
                state.activate(*point)
                try:
                    check(example)
                except Exception as e:
                    raise FxgrowError(f"sub-model ({state.describe(point)}) does not run: "
                                      f"{type(e).__name__}: {e}") from e
    finally:
        state.activate(*state.largest)


def _points_to_check(state: SubnetState) -> list[tuple[float, int]]:
    """The grid points whose runs cover every failure a sub-model can have. The largest is
    left out: every slice is the identity there and every gate passes, so it runs the model
    whose shapes were just propagated. In a product grid, every width at the full depth
    (each channel count, on a full batch in every block) and every depth at the smallest
    width (each set of dropped blocks running on an empty batch, with cut channels) cover
    the rest: a failure only at a larger width of a smaller depth would need an op that
    fails on an empty batch with full channels but not with fewer. A list grid is checked
    point by point."""
    points = [p for p in state.points if p != state.largest]
    widths, depths = sorted({p[:-1] for p in state.points}), sorted({p[-1] for p in state.points})
    if len(state.points) != len(widths) * len(depths):  # not a product grid
        return points
    full, smallest = max(depths), min(widths)
    return [p for p in points if p[-1] == full or p[:-1] == smallest]


# --- training ------------------------------------------------------------------------------


def _allow_a_graph_per_sub_model(count: int) -> None:
    """torch.compile specializes on the active sub-model (plain ints): let it keep one graph
    per grid point instead of falling back to eager after its default 8."""
    dynamo = sys.modules.get("torch._dynamo")  # loaded by torch.compile; nothing to do without it
    if dynamo is not None:
        config = dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), count + 8))


class SortedSlicingCallback(Callback):
    """Before every micro-step, makes the next planned sub-model active; after the step,
    the largest again (so evaluation during training sees the full model). With `bn:
    recalibrate`, the last step recalibrates the largest sub-model's BatchNorm statistics
    on the last `recalibrate_batches` training batches (what the final evaluation, the
    checkpoint and the folded model hold). At the end of training, evaluates the whole
    grid, each sub-model recalibrated alike (report section `grid`)."""

    name = "sorted_slicing"

    def __init__(self, spec: SortedSlicingSpec, summary: dict[str, Any] | None = None):
        self.spec = spec
        self.summary = summary or {}  # plain data about the rewrite, for the report
        self.grid: list[dict[str, Any]] = []
        self._plan: list[list[tuple[float, int]]] = []  # this step's sub-models, per batch
        self._recent: collections.deque[torch.Tensor] = collections.deque(maxlen=spec.recalibrate_batches)
        self._subnet: SubnetState | None = None  # the model's slicing state

    # sampling: a pure function of (seed, step)
    def plan(self, points: list[tuple[float, int]], seed: int, step: int) -> list[list[tuple[float, int]]]:
        """The sub-models step `step` runs on each of its `accumulate_batches` batches, in
        order (one generator for the step, drawing batch after batch)."""
        g = torch.Generator().manual_seed(stable_seed(seed, step, self.name))
        return [self._draw(points, g) for _ in range(self.spec.accumulate_batches)]

    def _draw(self, points: list[tuple[float, int]], g: torch.Generator) -> list[tuple[float, int]]:
        """The sub-models one batch runs."""
        spec = self.spec
        weights = torch.tensor(spec.weights if spec.weights is not None else [1.0] * len(points),
                               dtype=torch.float64)
        if spec.mode == "sandwich":
            largest, smallest = max(points), min(points)
            middle = [i for i, p in enumerate(points) if p not in (largest, smallest) and weights[i] > 0]
            drawn = []
            if middle and spec.draws > 2:
                idx = torch.multinomial(weights[middle], spec.draws - 2, replacement=True, generator=g)
                drawn = [points[middle[i]] for i in idx.tolist()]
            return [largest, smallest] + drawn
        drawn = [points[i] for i in torch.multinomial(weights, spec.draws, replacement=True, generator=g).tolist()]
        if spec.mode == "stochastic" and spec.depth is not None and spec.depth.every_depth:
            # Sorted LLaMA: each drawn width at every depth, through the shared final norm and head
            widths = {p[:-1] for p in drawn}
            return sorted({p for p in points if p[:-1] in widths}, reverse=True)
        if spec.mode == "stochastic":
            return drawn
        # summation: each drawn sub-model and every grid point it contains, largest first
        chosen = {p for d in drawn for p in points if all(a <= b for a, b in zip(p, d))}
        return sorted(chosen, reverse=True)

    def on_train_start(self, ctx) -> None:
        self._subnet = None
        state = self._state(ctx)
        state.activate(*state.largest)
        _allow_a_graph_per_sub_model(len(state.points))

    def on_step_start(self, ctx) -> None:
        state = self._state(ctx)
        self._plan = self.plan(list(state.points), ctx.seed, ctx.step)

    def on_model_replaced(self, ctx, old, new, change) -> None:
        self._subnet = None  # growth put slicing back on the grown model: a new state

    def batches_per_step(self) -> int:
        return self.spec.accumulate_batches

    def micro_steps(self, ctx) -> int:
        return len(self._batch_plan(ctx))

    def loss_scale(self, ctx, index: int, count: int) -> float | None:
        return 1.0 if self.spec.reduction == "sum" else None  # None: the loop's mean

    def on_micro_step(self, ctx, index: int) -> None:
        if index == 0 and ctx.batch is not None and ctx.step >= ctx.total_steps - self.spec.recalibrate_batches:
            self._recent.append(ctx.batch[0].detach())  # the last batches recalibrate BN at the end
        plan = self._batch_plan(ctx)
        self._state(ctx).activate(*plan[index % len(plan)])

    def _batch_plan(self, ctx) -> list[tuple[float, int]]:
        return self._plan[getattr(ctx, "batch_index", 0) % len(self._plan)]

    def after_step(self, ctx) -> None:
        state = self._state(ctx)
        state.activate(*state.largest)
        if ctx.step == ctx.total_steps and self.spec.bn == "recalibrate" and self._recent:
            # Training mixed every sub-model into the shared statistics: give the largest its
            # own before the final evaluation, checkpoint and fold.
            recalibrate(ctx.model, list(self._recent))

    def on_train_end(self, ctx) -> None:
        model = ctx.model
        calibration = list(self._recent) if self.spec.bn == "recalibrate" else None
        example = self._recent[-1][:1] if self._recent else (ctx.batch[0][:1] if ctx.batch is not None else None)
        self.grid = evaluate_grid(model, ctx.evaluate, example, calibration=calibration or None)

    def report(self) -> dict[str, Any]:
        return {"mode": self.spec.mode, "bn": self.spec.bn, "sub_models_per_batch": self.spec.draws,
                "accumulate_batches": self.spec.accumulate_batches, "loss_reduction": self.spec.reduction,
                **self.summary, "grid": self.grid}

    def state_dict(self) -> dict[str, Any]:
        # The batches kept for the final recalibration: a run resumed in its last steps
        # must recalibrate on the same inputs as one never stopped.
        return {"recent": [x.cpu() for x in self._recent]}

    def load_state_dict(self, state: dict[str, Any], ctx=None) -> None:
        device = getattr(ctx, "device", None)
        self._recent.clear()
        self._recent.extend(x.to(device) if device is not None else x for x in state.get("recent", []))

    def _state(self, ctx) -> SubnetState:
        # Looked up once per model (on_train_start and on_model_replaced forget it), not every step.
        if self._subnet is None:
            self._subnet = find_state(ctx.model)
            if self._subnet is None:
                raise FxgrowError("sorted_slicing: the model has no slicing state (was the pass applied?)")
        return self._subnet
