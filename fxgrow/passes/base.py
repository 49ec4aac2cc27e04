"""The pass API and the pipeline that applies passes in order.

A pass's life, as torch.fx's passes/infra has it (requires -> call -> ensures):

    requires(gm, ctx)             preconditions; raise with the reason (`inspect --dry-run` runs it too)
    match(gm, ctx) -> [Match]     pure: the layers it would rewrite
    rewrite(gm, matches, ctx) -> Record     inserts producers, tags nodes; the record says what it did
    callbacks(gm, record, ctx) -> [Callback]   training-time behaviour, given the record (may be [])
    describe(gm) -> [row]         its table for `fxgrow inspect` and report.json (may be [])

A pass that changes more than weight chains (sorted slicing) is `reversible`: its
classmethod `reverse(gm)` turns what it added into plain graph code at its current
setting; fold and growth call it (see `Pipeline.reverse`). `Pipeline`/`compose` apply
passes in order on a copy of the graph, check the ordering rules between producers, lint
and recompile once, and name the pass that failed together with the ones that ran before
it. `PassResult.history` keeps every applied pass with its record, in order.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from ..errors import FxgrowError, PassError, SpecError
from ..analysis import channel_groups, propagate_shapes
from ..ir import functionalize, layer_table
from ..specs.base import PassSpec
from ..trace import trace
from ..train.callbacks import Callback

PASS_REGISTRY: dict[str, type["Pass"]] = {}


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass available to specs under its `kind`."""
    if cls.kind in PASS_REGISTRY and PASS_REGISTRY[cls.kind] is not cls:
        raise ValueError(f"two passes claim kind {cls.kind!r}")
    PASS_REGISTRY[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Match:
    """One layer a pass will act on."""

    layer: str
    module_type: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """What one rewrite did, handed to the pass's callbacks (passes subclass it).
    `builds_on`: runs whose trained models this one takes in (growth's fused runs): their
    training cost counts toward this run's."""

    layers: tuple[str, ...] = ()
    builds_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Applied:
    """One pass of a pipeline, applied: the pass, its record, its position."""

    pass_: "Pass"
    record: Record
    index: int


class Analysis:
    """Shapes and channel groups of the graph a pipeline rewrites, computed once, on first
    use, and shared by its passes. Weight-chain rewrites keep them valid (activations keep
    their shapes; the coupling analysis skips chains; a chain's own shape comes from its
    producers' `output_shape`); the pipeline forgets them after a reversible pass, which
    changes the graph's structure."""

    def __init__(self, gm: fx.GraphModule, example: torch.Tensor | None):
        self.gm, self.example = gm, example
        self._shaped = False
        self._groups: dict[bool, list] = {}

    def shapes(self) -> fx.GraphModule:
        """`gm` with `tensor_meta` on its nodes."""
        if not self._shaped:
            if self.example is None:
                raise FxgrowError("the analysis needs an example input (model.example_input)")
            propagate_shapes(self.gm, self.example)
            self._shaped = True
        return self.gm

    def channel_groups(self, follow_sizes: bool = False) -> list:
        """The channel groups; `follow_sizes`: literal sizes are size uses, not fixing (for a
        pass that rewrites them)."""
        if follow_sizes not in self._groups:
            self._groups[follow_sizes] = channel_groups(self.shapes(), follow_sizes)
        return self._groups[follow_sizes]

    def invalidate(self) -> None:
        self._shaped, self._groups = False, {}


@dataclass
class PassContext:
    """What a pass may know beyond the graph."""

    example_input: Any = None  # a tensor, or several inputs (`analysis.shapes.Inputs`)
    seed: int = 0
    index: int = 0              # position in the spec's pass list, for error paths
    applied: list["Pass"] = field(default_factory=list)  # the passes before this one
    history: list[Applied] = field(default_factory=list)  # at `callbacks`: every pass of the pipeline
    analysis: Analysis | None = None  # the pipeline's shared analysis (`analyzed` makes one when missing)

    @property
    def where(self) -> str:
        return f"passes.{self.index}"

    def analyzed(self, gm: fx.GraphModule) -> Analysis:
        if self.analysis is None or self.analysis.gm is not gm:
            self.analysis = Analysis(gm, self.example_input)
        return self.analysis


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    callbacks: list[Callback]
    matches: dict[str, list[Match]]  # "passes.i" -> matches
    history: list[Applied] = field(default_factory=list)

    @property
    def records(self) -> dict[str, Record]:
        """"passes.i" -> what pass i did."""
        return {f"passes.{a.index}": a.record for a in self.history}

    def coverage(self) -> dict[str, dict[str, Any]]:
        """Per pass: the weight matrices it rewrote and every one it left, with the reason
        (`fxgrow.inspection.coverage`; report.json's `coverage`)."""
        from ..inspection import coverage
        return coverage(self.graph_module, self.history)


def tied_once(matches: list[Match], layers: dict) -> list[Match]:
    """One match per weight: layers whose weight is one tied parameter (an embedding and its
    output head) share one chain, so a pass acts on it once; the first layer stands for the
    others (`detail["tied"]`)."""
    first: dict[str, Match] = {}
    out = []
    for m in matches:
        weight = layers[m.layer].weight
        if weight in first:
            first[weight].detail.setdefault("tied", []).append(m.layer)
            continue
        first[weight] = m
        out.append(m)
    return out


class Pass:
    """Base class. Subclasses set `kind`, `spec_cls`, `preserves_computation` and, when
    they insert producers, `rank` (the producers' place in a chain)."""

    kind: ClassVar[str]
    spec_cls: ClassVar[type[PassSpec]]
    preserves_computation: ClassVar[bool] = False
    rank: ClassVar[int | None] = None
    functionalizes: ClassVar[bool] = True  # matched layers are functionalized before rewrite
    reversible: ClassVar[bool] = False     # it changes more than weight chains: it has `reverse`

    def __init__(self, spec: PassSpec | None = None, **fields: Any):
        if spec is None:
            try:
                spec = self.spec_cls(kind=self.kind, **fields)
            except Exception as e:  # pydantic.ValidationError -> field-path SpecError
                from ..specs.root import spec_error
                raise spec_error(e, prefix=self.kind) from None
        elif fields:
            raise TypeError("give either a spec or fields, not both")
        self.spec = spec

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Preconditions on the graph and the pipeline; raise FxgrowError/SpecError naming
        what is missing. Runs before `match`, and in `Pipeline.dry_run`."""

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> list[Match]:
        """Pure: which layers this pass would rewrite (see `Targets`; by default every
        weight matrix fxgrow can rewrite)."""
        layers = layer_table(gm)
        chosen = self.spec.targets.select({p: layer.selectable for p, layer in layers.items()},
                                          where=f"{ctx.where}.targets")
        return tied_once([Match(name, layers[name].module_type) for name in chosen], layers)

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> Record | None:
        raise NotImplementedError

    def check(self, gm: fx.GraphModule, record: Record, ctx: PassContext) -> None:
        """Checks of what the rewritten pipeline will do later (a trial growth), run once
        every pass is applied, so that a model the pass cannot serve fails at rewrite time
        (and in a dry run), not after training started. Default: none."""

    def callbacks(self, gm: fx.GraphModule, record: Record, ctx: PassContext) -> list[Callback]:
        return []

    def describe(self, gm: nn.Module) -> list[dict[str, Any]]:
        """Rows of this pass's table for `fxgrow inspect` (e.g. the template banks)."""
        return []

    @classmethod
    def applied_to(cls, gm: nn.Module) -> bool:
        """Whether `gm` holds nodes this pass added."""
        return isinstance(gm, fx.GraphModule) and any(
            (n.meta.get("fxgrow") or {}).get("pass") == cls.kind for n in gm.graph.nodes)

    @classmethod
    def reverse(cls, gm: fx.GraphModule) -> None:
        """Reversible passes: turn what this pass added into plain graph code, in place, at
        its current setting (weight chains are left for fold)."""
        raise NotImplementedError(f"{cls.kind} is not reversible")

    def __call__(self, gm: fx.GraphModule | nn.Module, example_input: Any = None,
                 seed: int = 0) -> PassResult:
        """Apply this pass alone. `example_input`: a tensor, a tuple of positional tensors, a
        dict of keyword tensors or `analysis.shapes.Inputs`."""
        return Pipeline([self])(gm, example_input=example_input, seed=seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class Pipeline:
    """Apply passes in order. `Pipeline([a, b])(gm)` equals `b(a(gm))`."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)
        self.check_order()

    def check_order(self) -> None:
        """Producers of a later pass must not sit before an earlier pass's producers in a
        chain (mixing first, slicing last): a spec that breaks this is rejected."""
        for j, later in enumerate(self.passes):
            for i, earlier in enumerate(self.passes[:j]):
                if later.rank is not None and earlier.rank is not None and later.rank < earlier.rank:
                    raise SpecError([(f"passes.{j}", (
                        f"{later.kind} must come before {earlier.kind} (passes.{i}): "
                        f"{later.kind} producers sit nearer the parameter in a weight chain "
                        f"(order: template_mixing, compander, prune_regrow, sorted_slicing)"))])

    def __call__(self, model: fx.GraphModule | nn.Module, example_input: Any = None,
                 seed: int = 0, inplace: bool = False) -> PassResult:
        gm = model if isinstance(model, fx.GraphModule) else trace(model)
        if not inplace:
            gm = copy.deepcopy(gm)  # never mutate the user's parameters
        history: list[Applied] = []
        matches: dict[str, list[Match]] = {}
        analysis = Analysis(gm, example_input)
        for index, p in enumerate(self.passes):
            ctx = PassContext(example_input=example_input, seed=seed, index=index,
                              applied=[a.pass_ for a in history], history=list(history), analysis=analysis)
            with self._naming(p, index, history):
                p.requires(gm, ctx)
                found = p.match(gm, ctx)
                if p.functionalizes:
                    functionalize(gm, [m.layer for m in found], recompile=False)
                record = p.rewrite(gm, found, ctx)
                gm.graph.lint()
            if p.reversible:
                analysis.invalidate()
            record = record if record is not None else Record()
            if not record.layers:
                record.layers = tuple(m.layer for m in found)
            matches[ctx.where] = found
            history.append(Applied(p, record, index))
        gm.recompile()
        for a in history:
            ctx = PassContext(example_input=example_input, seed=seed, index=a.index,
                              applied=[b.pass_ for b in history[:a.index]], history=list(history))
            with self._naming(a.pass_, a.index, history[:a.index]):
                a.pass_.check(gm, a.record, ctx)
        return PassResult(gm, self._callbacks(gm, history, example_input, seed), matches, history)

    @staticmethod
    @contextlib.contextmanager
    def _naming(p: Pass, index: int, history: list[Applied]):
        """A failure names the pass and the ones applied before it (spec errors pass as they are)."""
        try:
            yield
        except SpecError:
            raise
        except Exception as e:
            before = ", ".join(f"{a.pass_.kind} (passes.{a.index})" for a in history) or "none"
            detail = str(e) if isinstance(e, FxgrowError) else f"{type(e).__name__}: {e}"
            raise PassError(f"pass {p.kind} (passes.{index}) failed: {detail}\n"
                            f"  passes applied before it: {before}") from e

    def _callbacks(self, gm: fx.GraphModule, history: list[Applied], example_input, seed: int) -> list[Callback]:
        """Callback names key checkpoint state and report sections: when a kind appears
        twice (two companders on different layers), each gets its pass index."""
        kinds = [p.kind for p in self.passes]
        callbacks = []
        for a in history:
            ctx = PassContext(example_input=example_input, seed=seed, index=a.index,
                              applied=[b.pass_ for b in history[:a.index]], history=list(history))
            with self._naming(a.pass_, a.index, history[:a.index]):
                made = a.pass_.callbacks(gm, a.record, ctx)
            for cb in made:
                if kinds.count(a.pass_.kind) > 1:
                    cb.name = f"{cb.name}.{a.index}"
                callbacks.append(cb)
        return callbacks

    def dry_run(self, model: fx.GraphModule | nn.Module, example_input: Any = None,
                seed: int = 0) -> dict[str, list[Match]]:
        """What each pass would match, after every check the rewrite runs: the whole
        pipeline runs on a copy (nothing of `model` changes), so when it returns, applying
        the pipeline will not fail at rewrite time (`trial` returns the whole result)."""
        return self.trial(model, example_input, seed).matches

    def trial(self, model: fx.GraphModule | nn.Module, example_input: Any = None, seed: int = 0) -> PassResult:
        """The pipeline applied to a copy of `model`: its result, or the error the rewrite
        would raise."""
        return self(model, example_input=example_input, seed=seed)


def compose(*passes: Pass) -> Pipeline:
    return Pipeline(list(passes))
