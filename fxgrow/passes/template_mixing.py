"""Template mixing pass (ALGORITHMS.md section 1.1).

Every targeted weight becomes `W_l = sum_k alpha[l, k] * T[b(l), k]`: the layer's weight
parameter is removed, its chain now starts at `get_attr(fxgrow.banks.bank<i>.templates)`
and a `MixProducer` holding the layer's alphas is the chain's first producer.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import fx, nn

from ..analysis import forward_flops
from ..analysis.ends import named_layers
from ..errors import FxgrowError, SpecError
from ..ir import META, WeightChain, fetch_attr, insert_producer, weight_chains
from ..nn.mixing import MixProducer, TemplateBank, mix_producers, preserving_templates, retarget  # noqa: F401
from ..specs.base import PassSpec, Time, _pattern_matches, check_layer_patterns, resolve_time
from ..train.callbacks import Callback, TrainContext
from ..train.data import stable_seed
from .base import Match, Pass, PassContext, Record, register_pass

BANKS = f"{META}.banks"


class TemplateMixingSpec(PassSpec):
    kind: Literal["template_mixing"] = "template_mixing"
    templates: int = Field(2, ge=1, description="K: templates per bank")
    templates_per_bank: dict[str, int] = Field(default_factory=dict, description=(
        "K for the banks holding these layers (module path or re: pattern; the first that matches a "
        "bank's first layer wins), e.g. the ImageNet configuration's 2 to 5; other banks: `templates`"))
    share: Literal["pairs", "role_pairs", "none", "shape"] = "pairs"
    coefficient_init: Literal["orthogonal", "random"] = "orthogonal"
    template_init: Literal["kaiming", "kaiming_bank", "preserve"] = "kaiming"
    coefficient_weight_decay: float | None = Field(
        0.0, ge=0, description="weight decay on the alphas; null: the optimizer's")
    freeze_coefficients: list[str] = Field(default_factory=list, description=(
        "layers whose alphas do not train (kept through growth): first (the layers reading the model input), "
        "last (the classifier), module paths or re: patterns"))
    flops_reference: Time | None = Field(None, description=(
        "the target's training schedule that flops_norm compares with (a time of this run); default: the "
        "steps before growth (the paper's protocol: the target trains as long as net 1), or the whole run"))

    @field_validator("templates_per_bank")
    @classmethod
    def _valid_k(cls, value: dict[str, int]) -> dict[str, int]:
        check_layer_patterns(value)
        bad = [k for k, n in value.items() if not isinstance(n, int) or n < 1]
        if bad:
            raise ValueError(f"{bad[0]!r}: K must be an int >= 1")
        return value

    @field_validator("freeze_coefficients")
    @classmethod
    def _valid_names(cls, value: list[str]) -> list[str]:
        check_layer_patterns(value, ("first", "last"))
        return value


def share_groups(shapes: dict[str, tuple[int, ...]], rule: str) -> list[list[str]]:
    """Layers (in graph order) grouped into banks.

    pairs: two layers adjacent in graph order with the same weight shape share a bank
    (groups of at most 2); role_pairs: layers of the same role and shape in adjacent blocks
    (module paths equal but for the block index, `layer2.0.conv2` and `layer2.1.conv2`) pair
    up in block order, as MixtureGrowth's ImageNet bank configuration shares them (a layer
    without a block index, or left over, has a bank of its own); none: one bank per layer;
    shape: one bank per shape."""
    names = list(shapes)
    if rule == "none":
        return [[n] for n in names]
    if rule == "role_pairs":
        return _role_pairs(shapes)
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


def _role(path: str) -> tuple[str, int] | None:
    """(the path with its block index as '*', the index), or None. The block index is the last
    numeric part followed by a name (`layer2.1.conv2`, `stages.0.blocks.3.conv`): a trailing
    number indexes inside a block (`layer2.0.downsample.0`) or a flat Sequential (VGG's
    `features.3`), which has no blocks."""
    parts = path.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].isdigit() and not parts[i + 1].isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:]), int(parts[i])
    return None


def _role_pairs(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    by_role: dict[tuple[str, tuple[int, ...]], list[tuple[int, str]]] = {}
    alone: list[str] = []
    for name in shapes:
        role = _role(name)
        if role is None:
            alone.append(name)
        else:
            by_role.setdefault((role[0], shapes[name]), []).append((role[1], name))
    groups = [[n] for n in alone]
    for members in by_role.values():
        ordered = [n for _, n in sorted(members)]
        groups += [ordered[i:i + 2] for i in range(0, len(ordered), 2)]
    order = {n: i for i, n in enumerate(shapes)}
    return sorted(groups, key=lambda g: order[g[0]])


def bank_sizes(groups: list[list[str]], spec: TemplateMixingSpec, where: str = "") -> list[int]:
    """K of each bank: `templates_per_bank`'s first pattern matching one of its layers, else
    `templates`; a bank whose layers match different K is an error."""
    sizes = []
    for group in groups:
        asked = {}
        for name in group:
            k = next((k for p, k in spec.templates_per_bank.items() if _pattern_matches(p, name)), None)
            if k is not None:
                asked[name] = k
        if len(set(asked.values())) > 1:
            raise SpecError([(f"{where}.templates_per_bank".lstrip("."),
                              f"layers sharing one bank ask for different K: {asked}")])
        sizes.append(next(iter(asked.values()), spec.templates))
    return sizes


def init_coefficients(layers: int, k: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """(layers, K) alphas: orthonormal rows when layers <= K (columns otherwise), or N(0, 1)."""
    alphas = torch.empty(layers, k, dtype=torch.float64)
    if how == "orthogonal":
        nn.init.orthogonal_(alphas, generator=generator)
    else:
        alphas.normal_(generator=generator)
    return alphas


def kaiming_templates(k: int, like: torch.Tensor, generator: torch.Generator, bank: bool = False) -> torch.Tensor:
    """K templates, each with the He init (fan_in, ReLU) of a weight shaped like `like`; or
    with `bank`, the MixtureGrowth authors' init: `kaiming_normal_` of the stacked (K, Co, Ci,
    ...) tensor, whose fan_in torch counts as Co * Ci * k^2 (1/sqrt(Co) of the per-template std)."""
    t = torch.empty((k, *like.shape), dtype=like.dtype, device="cpu")
    if bank:
        nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu", generator=generator)
    else:
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
            "frozen": not p.alpha.requires_grad,
        })
    return rows


class TemplateMixingCallback(Callback):
    """No weight decay on the alphas, the bank table, and the run's training FLOPs.

    FLOPs: forward FLOPs per sample are counted with FlopCounterMode on a training batch
    (again whenever the model is replaced, e.g. by growth); each step adds 3 x forward x
    samples. At the end, against the reference (3 x the final model's forward FLOPs x the
    samples of `flops_reference` steps, default the steps before growth: the target trained
    from scratch for net 1's schedule), `flops_norm` is MixtureGrowth's: the fused runs (net 2)
    plus this run after growth, net 1 (this run before growth, the given net) not counted
    (the paper's 0.45X = 0.25 + 0.20); `flops_norm_all_nets` counts every small net's training
    too. A run that never grows counts all its training in both."""

    name = "template_mixing"

    def __init__(self, spec: TemplateMixingSpec, fused_runs: list[str] | None = None):
        self.spec = spec
        self.fused_runs = list(fused_runs or [])
        self.table: list[dict[str, Any]] = []
        self.train_flops = 0.0
        self.samples = 0
        self.steps = 0
        self.before_growth: list[float] | None = None  # [train_flops, steps] when growth replaced the model
        self.flops_per_sample = 0.0
        self._measure = True  # on the next training batch: at the start and after a replaced model
        self.summary: dict[str, Any] = {}

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if self.spec.coefficient_weight_decay is None:
            return {}
        return {f"{path}.alpha": {"weight_decay": self.spec.coefficient_weight_decay}
                for path, p in mix_producers(model).items() if p.alpha.requires_grad}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.table = bank_table(ctx.model)
        self._measure = True

    def on_model_replaced(self, ctx: TrainContext, old: nn.Module, new: nn.Module, change) -> None:
        self._measure = True
        if getattr(change, "cause", None) == "grow" and self.before_growth is None:
            self.before_growth = [self.train_flops, self.steps]

    def after_step(self, ctx: TrainContext) -> None:
        inputs = ctx.batch[0]
        if self._measure:
            self.flops_per_sample = forward_flops(ctx.model, inputs) / len(inputs)
            self._measure = False
        samples = len(inputs) * getattr(ctx, "world", 1) * getattr(ctx, "batches_per_step", 1)
        self.samples += samples
        self.steps += 1
        self.train_flops += 3 * self.flops_per_sample * samples

    def on_epoch_end(self, ctx: TrainContext) -> None:
        ctx.log({"split": "flops", "train_flops": self.train_flops,
                 "forward_flops_per_sample": self.flops_per_sample})

    def on_train_end(self, ctx: TrainContext) -> None:
        self.table = bank_table(ctx.model)
        fused = [_run_train_flops(run) for run in self.fused_runs]
        fused_total = sum(f for f in fused if f is not None)
        before, grown_at = self.before_growth or (0.0, None)
        if self.spec.flops_reference is not None:
            reference_steps = resolve_time(self.spec.flops_reference, ctx.total_steps,
                                           getattr(ctx, "steps_per_epoch", None))
        else:
            reference_steps = grown_at if grown_at else self.steps
        per_step = self.samples / self.steps if self.steps else 0.0
        reference = 3 * self.flops_per_sample * per_step * reference_steps
        counted = fused_total + (self.train_flops - before if grown_at is not None else self.train_flops)
        all_nets = fused_total + self.train_flops
        self.summary = {
            "train_flops": self.train_flops,
            "train_flops_before_growth": before if grown_at is not None else None,
            "fused_train_flops": fused,
            "counted_train_flops": counted,
            "all_nets_train_flops": all_nets,
            "reference_steps": reference_steps,
            "reference_flops": reference,
            "flops_norm": counted / reference if reference else None,
            "flops_norm_all_nets": all_nets / reference if reference else None,
        }
        if any(f is None for f in fused):
            self.summary["note"] = "a fused run has no report.json with template_mixing.train_flops"
        ctx.log({"split": "flops", **self.summary})

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self.train_flops, "samples": self.samples, "steps": self.steps,
                "before_growth": self.before_growth}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        self.train_flops = float(state.get("train_flops", 0.0))
        self.samples = int(state.get("samples", 0))
        self.steps = int(state.get("steps", 0))
        self.before_growth = state.get("before_growth")

    def report(self) -> dict[str, Any]:
        return {"templates": self.spec.templates, "share": self.spec.share,
                "coefficient_init": self.spec.coefficient_init,
                "template_init": self.spec.template_init,
                "frozen_coefficients": [row["weight"] for row in self.table if row.get("frozen")],
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
        sizes = bank_sizes(groups, spec, ctx.where)
        try:
            frozen = set(named_layers(gm, spec.freeze_coefficients, list(targeted)))
        except ValueError as e:
            raise SpecError([(f"{ctx.where}.freeze_coefficients", str(e))]) from None
        if spec.template_init == "preserve":
            for group, k in zip(groups, sizes):
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
        alphas_of = [init_coefficients(len(group), k, spec.coefficient_init, g)
                     for group, k, g in zip(groups, sizes, generators)]
        if spec.template_init == "preserve":
            templates_of = [preserving_templates(a, w).to(w[0].dtype) for a, w in zip(alphas_of, weights_of)]
        else:
            bank = spec.template_init == "kaiming_bank"
            with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
                templates_of = list(pool.map(lambda k, w, g: kaiming_templates(k, w[0], g, bank),
                                             sizes, weights_of, generators))
        for i, (group, weights, alphas, templates) in enumerate(zip(groups, weights_of, alphas_of, templates_of)):
            path = f"{BANKS}.bank{first + i}"
            gm.add_submodule(path, TemplateBank(templates.detach()))  # a fresh tensor: no copy
            for name, alpha in zip(group, alphas):
                chain = targeted[name]
                _replace_head(gm, chain, f"{path}.templates")
                weight = weights[group.index(name)]
                mix = MixProducer(alpha.to(weight.dtype).to(weight.device).clone(),
                                  tuple(weight.shape), bank=path, source=chain.key)
                mix.alpha.requires_grad_(name not in frozen)  # frozen alphas stay so through growth
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
