"""Weight compander pass (ALGORITHMS.md section 2): every targeted weight becomes
w = psi(v) with v initialised to psi^-1(w), so outputs are unchanged right after it."""
from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import fx

from ..errors import FxgrowError
from ..ir import fetch_attr, insert_producer, weight_chains
from ..nn.compander import CompanderScale, CompandProducer, psi_inverse
from ..specs.base import PassSpec
from .base import Match, Pass, PassContext, register_pass

LEARNABLE_INIT = (0.5, 1.0)  # the paper's "fine" version starts here


class CompanderSpec(PassSpec):
    kind: Literal["compander"] = "compander"
    function: Literal["atan", "asinh", "erf"] = "atan"
    a: float | None = Field(None, gt=0, description="default 0.7, or 0.5 when learnable")
    b: float | None = Field(None, gt=0, description="default 0.8, or 1.0 when learnable")
    learnable: Literal["none", "layer", "global"] = "none"
    weight_decay: Literal["effective", "raw"] | None = Field(
        None, description="default: effective for fixed a, b; raw (on v) when learnable")
    adaptive_fix: bool = False
    max_clamped_fraction: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _decay_matches_learnable(self) -> "CompanderSpec":
        if self.learnable != "none" and self.weight_decay == "effective":
            raise ValueError("weight_decay: 'effective' needs fixed a and b; "
                             "with learnable a, b decay applies to v only ('raw')")
        return self

    @property
    def initial_ab(self) -> tuple[float, float]:
        da, db = LEARNABLE_INIT if self.learnable != "none" else (0.7, 0.8)
        return (self.a if self.a is not None else da, self.b if self.b is not None else db)

    @property
    def decay_mode(self) -> str:
        return self.weight_decay or ("raw" if self.learnable != "none" else "effective")

    def check_train(self, train) -> list[tuple[str, str]]:
        if self.adaptive_fix and train.optimizer.name not in ("adam", "adamw"):
            return [("adaptive_fix", f"applies to Adam/AdamW only (train.optimizer.name is "
                                     f"{train.optimizer.name!r})")]
        return []


@register_pass
class CompanderPass(Pass):
    kind = "compander"
    spec_cls = CompanderSpec
    preserves_computation = True
    rank = CompandProducer.rank

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> None:
        spec: CompanderSpec = self.spec
        a, b = spec.initial_ab
        chains = weight_chains(gm)
        shared = CompanderScale(a, b, learnable=True) if spec.learnable == "global" else None
        self.clamped: dict[str, int] = {}
        for m in matches:
            chain = chains[f"{m.layer}.weight"]
            if chain.producers:
                raise FxgrowError(f"'{chain.key}' already has producers "
                                  f"({', '.join(p.target for p in chain.producers)}); the compander "
                                  "initialises v from the raw parameter, so apply it first or "
                                  "right after template mixing")
            param = fetch_attr(gm, chain.head.target)
            with torch.no_grad():
                v, clamped = psi_inverse(param, a, b, spec.function)
                param.copy_(v)
            self._check_clamped(chain.key, clamped, param.numel())
            scale = shared if shared is not None else CompanderScale(a, b, spec.learnable == "layer")
            insert_producer(gm, chain, CompandProducer(scale, spec.function), self.kind)

    def _check_clamped(self, key: str, clamped: int, total: int) -> None:
        self.clamped[key] = clamped
        if clamped > self.spec.max_clamped_fraction * total:
            raise FxgrowError(f"{clamped} of {total} weights of '{key}' lie outside the range of "
                              f"{self.spec.function} with a={self.spec.initial_ab[0]}: raise `a`")
        if clamped:
            warnings.warn(f"compander: clamped {clamped} of {total} weights of '{key}'", stacklevel=2)
