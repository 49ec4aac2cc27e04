"""The pass API and the pipeline that applies passes in order.

A pass = a validated spec + a pure `match` + a `rewrite` that inserts producers + optional
training-time callbacks. `Pipeline`/`compose` apply passes in order on a copy of the graph,
check the ordering rules between producers, lint and recompile once, and name the pass
that failed together with the ones that ran before it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from ..errors import FxgrowError, PassError, SpecError
from ..ir import functionalize, layer_types
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
class PassContext:
    """What a pass may know beyond the graph."""

    example_input: torch.Tensor | None = None
    seed: int = 0
    index: int = 0              # position in the spec's pass list, for error paths
    applied: list["Pass"] = field(default_factory=list)  # passes already applied

    @property
    def where(self) -> str:
        return f"passes.{self.index}"


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    callbacks: list[Callback]
    matches: dict[str, list[Match]]  # "passes.i" -> matches


class Pass:
    """Base class. Subclasses set `kind`, `spec_cls`, `preserves_computation` and, when
    they insert producers, `rank` (the producers' place in a chain)."""

    kind: ClassVar[str]
    spec_cls: ClassVar[type[PassSpec]]
    preserves_computation: ClassVar[bool] = False
    rank: ClassVar[int | None] = None
    functionalizes: ClassVar[bool] = True  # matched layers are functionalized before rewrite

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

    def match(self, gm: fx.GraphModule, ctx: PassContext) -> list[Match]:
        """Pure: which layers this pass would rewrite."""
        layers = layer_types(gm)
        chosen = self.spec.targets.select(layers, where=f"{ctx.where}.targets")
        return [Match(name, layers[name]) for name in chosen]

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> None:
        raise NotImplementedError

    def callbacks(self, gm: fx.GraphModule) -> list[Callback]:
        return []

    def __call__(self, gm: fx.GraphModule | nn.Module, example_input: torch.Tensor | None = None,
                 seed: int = 0) -> PassResult:
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

    def __call__(self, model: fx.GraphModule | nn.Module, example_input: torch.Tensor | None = None,
                 seed: int = 0, inplace: bool = False) -> PassResult:
        gm = model if isinstance(model, fx.GraphModule) else trace(model)
        if not inplace:
            gm = copy.deepcopy(gm)  # never mutate the user's parameters
        applied: list[Pass] = []
        matches: dict[str, list[Match]] = {}
        for index, p in enumerate(self.passes):
            ctx = PassContext(example_input=example_input, seed=seed, index=index, applied=list(applied))
            try:
                found = p.match(gm, ctx)
                if p.functionalizes:
                    functionalize(gm, [m.layer for m in found])
                p.rewrite(gm, found, ctx)
                gm.graph.lint()
            except SpecError:
                raise
            except Exception as e:
                before = ", ".join(f"{q.kind} (passes.{k})" for k, q in enumerate(applied)) or "none"
                detail = str(e) if isinstance(e, FxgrowError) else f"{type(e).__name__}: {e}"
                raise PassError(f"pass {p.kind} (passes.{index}) failed: {detail}\n"
                                f"  passes applied before it: {before}") from e
            matches[ctx.where] = found
            applied.append(p)
        gm.recompile()
        return PassResult(gm, self._callbacks(gm), matches)

    def _callbacks(self, gm: fx.GraphModule) -> list[Callback]:
        """Callback names key checkpoint state and report sections: when a kind appears
        twice (two companders on different layers), each gets its pass index."""
        kinds = [p.kind for p in self.passes]
        callbacks = []
        for index, p in enumerate(self.passes):
            for cb in p.callbacks(gm):
                if kinds.count(p.kind) > 1:
                    cb.name = f"{cb.name}.{index}"
                callbacks.append(cb)
        return callbacks

    def dry_run(self, model: fx.GraphModule | nn.Module) -> dict[str, list[Match]]:
        """What each pass would match, without rewriting (passes see the graph as the
        earlier passes would leave it only in layer names, which rewrites keep)."""
        gm = model if isinstance(model, fx.GraphModule) else trace(model)
        return {f"passes.{i}": p.match(gm, PassContext(index=i)) for i, p in enumerate(self.passes)}


def compose(*passes: Pass) -> Pipeline:
    return Pipeline(list(passes))
