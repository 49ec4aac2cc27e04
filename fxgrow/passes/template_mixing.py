"""Template mixing pass (ALGORITHMS.md section 1.1).

Every targeted weight becomes `W_l = sum_k alpha[l, k] * T[b(l), k]`: the layer's weight
parameter is removed, its chain now starts at `get_attr(fxgrow.banks.bank<i>.templates)`
and a `MixProducer` holding the layer's alphas is the chain's first producer.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import fx, nn

from ..analysis import forward_flops
from ..errors import FxgrowError
from ..ir import META, WeightChain, fetch_attr, insert_producer, weight_chains
from ..nn.mixing import MixProducer, TemplateBank, mix_producers, preserving_templates, retarget  # noqa: F401
from ..specs.base import PassSpec
from ..train.callbacks import Callback, TrainContext
from ..train.data import stable_seed
from .base import Match, Pass, PassContext, Record, register_pass

BANKS = f"{META}.banks"


class TemplateMixingSpec(PassSpec):
    kind: Literal["template_mixing"] = "template_mixing"
    templates: int = Field(2, ge=1, description="K: templates per bank")
    share: Literal["pairs", "none", "shape"] = "pairs"
    coefficient_init: Literal["orthogonal", "random"] = "orthogonal"
    template_init: Literal["kaiming", "preserve"] = "kaiming"
    coefficient_weight_decay: float | None = Field(
        0.0, ge=0, description="weight decay on the alphas; null: the optimizer's")


def share_groups(shapes: dict[str, tuple[int, ...]], rule: str) -> list[list[str]]:
    """Layers (in graph order) grouped into banks.

    pairs: two layers adjacent in graph order with the same weight shape share a bank
    (groups of at most 2); none: one bank per layer; shape: one bank per shape."""
    names = list(shapes)
    if rule == "none":
        return [[n] for n in names]
    if rule == "shape":
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for n in names:
            by_shape.setdefault(shapes[n], []).append(n)
        return list(by_shape.values())
    groups: list[list[str]] = []
    for n in names:
        last = groups[-1] if groups else None
        if last is not None and len(last) == 1 and shapes[last[0]] == shapes[n]:
            last.append(n)
        else:
            groups.append([n])
    return groups


def init_coefficients(layers: int, k: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """(layers, K) alphas: orthonormal rows when layers <= K (columns otherwise), or N(0, 1)."""
    alphas = torch.empty(layers, k, dtype=torch.float64)
    if how == "orthogonal":
        nn.init.orthogonal_(alphas, generator=generator)
    else:
        alphas.normal_(generator=generator)
    return alphas


def kaiming_templates(k: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """K templates, each with the He init (fan_in, ReLU) of a weight shaped like `like`."""
    t = torch.empty((k, *like.shape), dtype=like.dtype, device="cpu")
    for i in range(k):
        nn.init.kaiming_normal_(t[i], mode="fan_in", nonlinearity="relu", generator=generator)
    return t.to(like.device)


def bank_table(gm: nn.Module) -> list[dict[str, Any]]:
    """The bank table for `fxgrow inspect` and report.json: one row per mixed weight, with
    its bank, the layers sharing that bank, and after growth the block grid and the
    template set each block mixes."""
    producers = list(mix_producers(gm).values())
    sharing: dict[str, list[str]] = {}
    for p in producers:
        sharing.setdefault(p.bank, []).append(p.source)
    rows = []
    for p in producers:
        bank: TemplateBank = gm.get_submodule(p.bank)
        r, c = p.grid
        rows.append({
            "weight": p.source,
            "bank": p.bank.removeprefix(BANKS + "."),
            "shared_with": [s for s in sharing[p.bank] if s != p.source],
            "templates": bank.per_set,
            "sets": bank.sets,
            "shape": list(p.weight_shape),
            "blocks": f"{r}x{c}",
            "block_sets": p.block_sets(),
        })
    return rows


class TemplateMixingCallback(Callback):
    """No weight decay on the alphas, the bank table, and the run's training FLOPs.

    FLOPs: forward FLOPs per sample are counted with FlopCounterMode on a training batch
    (again whenever the model is replaced, e.g. by growth); each step adds 3 x forward x
    samples. At the end `flops_norm` = (this run's FLOPs + those of the runs fused into it)
    / (3 x the final model's forward FLOPs x the samples this run saw): the cost relative
    to training the final architecture from scratch for the same epochs."""

    name = "template_mixing"

    def __init__(self, spec: TemplateMixingSpec, fused_runs: list[str] | None = None):
        self.spec = spec
        self.fused_runs = list(fused_runs or [])
        self.table: list[dict[str, Any]] = []
        self.train_flops = 0.0
        self.samples = 0
        self.flops_per_sample = 0.0
        self._measure = True  # on the next training batch: at the start and after a replaced model
        self.summary: dict[str, Any] = {}

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if self.spec.coefficient_weight_decay is None:
            return {}
        return {f"{path}.alpha": {"weight_decay": self.spec.coefficient_weight_decay}
                for path in mix_producers(model)}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.table = bank_table(ctx.model)
        self._measure = True

    def on_model_replaced(self, ctx: TrainContext, old: nn.Module, new: nn.Module, change) -> None:
        self._measure = True

    def after_step(self, ctx: TrainContext) -> None:
        inputs = ctx.batch[0]
        if self._measure:
            self.flops_per_sample = forward_flops(ctx.model, inputs) / len(inputs)
            self._measure = False
        samples = len(inputs) * getattr(ctx, "world", 1)
        self.samples += samples
        self.train_flops += 3 * self.flops_per_sample * samples

    def on_epoch_end(self, ctx: TrainContext) -> None:
        ctx.log({"split": "flops", "train_flops": self.train_flops,
                 "forward_flops_per_sample": self.flops_per_sample})

    def on_train_end(self, ctx: TrainContext) -> None:
        self.table = bank_table(ctx.model)
        fused = [_run_train_flops(run) for run in self.fused_runs]
        reference = 3 * self.flops_per_sample * self.samples
        spent = self.train_flops + sum(f for f in fused if f is not None)
        self.summary = {
            "train_flops": self.train_flops,
            "fused_train_flops": fused,
            "reference_flops": reference,
            "flops_norm": spent / reference if reference else None,
        }
        if any(f is None for f in fused):
            self.summary["note"] = "a fused run has no report.json with template_mixing.train_flops"
        ctx.log({"split": "flops", "train_flops": self.train_flops, **self.summary})

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self.train_flops, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        self.train_flops = float(state.get("train_flops", 0.0))
        self.samples = int(state.get("samples", 0))

    def report(self) -> dict[str, Any]:
        return {"templates": self.spec.templates, "share": self.spec.share,
                "coefficient_init": self.spec.coefficient_init,
                "template_init": self.spec.template_init,
                "banks": len({row["bank"] for row in self.table}), **self.summary,
                "weights": self.table}


def _run_train_flops(run: str) -> float | None:
    """Training FLOPs another run reported (its own plus what it fused), or None."""
    path = Path(run)
    report = (path if path.is_dir() else path.parent) / "report.json"
    try:
        section = json.loads(report.read_text())["template_mixing"]
        return float(section["train_flops"]) + sum(f or 0.0 for f in section.get("fused_train_flops", []))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@register_pass
class TemplateMixingPass(Pass):
    kind = "template_mixing"
    spec_cls = TemplateMixingSpec
    preserves_computation = False  # with the default kaiming templates; see __init__
    rank = MixProducer.rank

    def __init__(self, spec: TemplateMixingSpec | None = None, **fields: Any):
        super().__init__(spec, **fields)
        # `preserve` templates reproduce every weight exactly.
        self.preserves_computation = self.spec.template_init == "preserve"

    def rewrite(self, gm: fx.GraphModule, matches: list[Match], ctx: PassContext) -> Record:
        spec: TemplateMixingSpec = self.spec
        chains = weight_chains(gm)
        targeted: dict[str, WeightChain] = {}
        for m in matches:
            chain = chains[f"{m.layer}.weight"]
            if chain.producers:
                raise FxgrowError(f"'{chain.key}' already has producers "
                                  f"({', '.join(p.target for p in chain.producers)}); template "
                                  "mixing must be the first producer of a weight chain")
            targeted[m.layer] = chain
        shapes = {name: tuple(fetch_attr(gm, c.head.target).shape) for name, c in targeted.items()}
        groups = share_groups(shapes, spec.share)
        k = spec.templates
        if spec.template_init == "preserve":
            for group in groups:
                if len(group) > k:
                    raise FxgrowError(
                        f"template_init: preserve needs at most K={k} layers per bank, but "
                        f"{', '.join(group)} share one; raise `templates` or use share: pairs/none")
        first = _next_bank_index(gm)
        # One generator per bank (seeded by the run's seed and the bank), so the banks'
        # templates draw independently: in parallel threads, as torch's normal_ is serial.
        generators = [torch.Generator().manual_seed(stable_seed(ctx.seed, self.kind, first + i))
                      for i in range(len(groups))]
        weights_of = [[fetch_attr(gm, targeted[name].head.target) for name in group] for group in groups]
        alphas_of = [init_coefficients(len(group), k, spec.coefficient_init, g) for group, g in zip(groups, generators)]
        if spec.template_init == "preserve":
            templates_of = [preserving_templates(a, w).to(w[0].dtype) for a, w in zip(alphas_of, weights_of)]
        else:
            with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
                templates_of = list(pool.map(lambda w, g: kaiming_templates(k, w[0], g), weights_of, generators))
        for i, (group, weights, alphas, templates) in enumerate(zip(groups, weights_of, alphas_of, templates_of)):
            path = f"{BANKS}.bank{first + i}"
            gm.add_submodule(path, TemplateBank(templates.detach()))  # a fresh tensor: no copy
            for name, alpha in zip(group, alphas):
                chain = targeted[name]
                _replace_head(gm, chain, f"{path}.templates")
                weight = weights[group.index(name)]
                mix = MixProducer(alpha.to(weight.dtype).to(weight.device).clone(),
                                  tuple(weight.shape), bank=path, source=chain.key)
                insert_producer(gm, chain, mix, self.kind)
        return Record(tuple(targeted))

    def callbacks(self, gm: fx.GraphModule, record: Record, ctx: PassContext) -> list[Callback]:
        # The runs the pipeline builds on (growth's fused nets) count in the FLOPs accounting.
        fused = [run for a in ctx.history for run in a.record.builds_on]
        return [TemplateMixingCallback(self.spec, fused)]

    def describe(self, gm: nn.Module) -> list[dict[str, Any]]:
        return bank_table(gm)


def _replace_head(gm: fx.GraphModule, chain: WeightChain, target: str) -> None:
    """Point the chain at the bank's templates and drop the layer's own weight parameter
    (its state_dict key disappears; fold rebuilds it)."""
    old = chain.head
    with gm.graph.inserting_before(old):
        head = gm.graph.get_attr(target)
    head.meta[META] = {"role": "param", "source": target, "layer": chain.layer,
                       "param": chain.param}
    old.replace_all_uses_with(head)
    gm.graph.erase_node(old)
    gm.get_submodule(chain.layer).register_parameter(chain.param, None)
    chain.head = head


def _next_bank_index(gm: nn.Module) -> int:
    try:
        banks = gm.get_submodule(BANKS)
    except AttributeError:
        return 0
    return len(list(banks.children()))
