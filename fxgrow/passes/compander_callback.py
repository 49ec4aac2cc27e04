"""Training-time behaviour of the compander (ALGORITHMS.md section 2).

Weight decay. `effective` (fixed a, b) decays the effective weight w = psi(v): the
penalty lambda/2 * ||psi(v)||^2 has gradient lambda * w * psi'(v) in v, which is added to
v's gradient (SGD, Adam: coupled L2) or taken as a plain step v -= lr * lambda * w * psi'(v)
(AdamW: decoupled), and v's own optimizer decay is set to 0. lambda is the optimizer's
`weight_decay`. `raw` leaves the optimizer's decay on v. a and b never get decay.

Adam correction (`adaptive_fix`). Adam divides away the psi'(v) factor of dL/dv, so the
reparameterization would no longer shape the step. Before the step, v's gradient is
divided by psi'(v): the optimizer's moments are those of dL/dw. After the step, the step
it took is multiplied by psi'(v): v <- v0 + (v - v0) * psi'(v0).

Both run in optimizer step pre/post hooks, armed by `after_backward`: so the decay term
and the division come after gradient clipping (which sees dL/dv, as for any parameter)
and GradScaler unscaling, a skipped step does nothing, and the rescale happens before
any `after_step` callback (e.g. growth replacing the model). Where optimizer.step() runs
a closure (Lightning's automatic optimization) its pre-hooks fire before the closure's
backward, so the driver sends `before_optimizer_step` after clipping instead: the pre-step
work runs there and the pre-hook finds nothing armed.

When v is generated (template mixing before the compander) there is no v parameter: the
decay gradient is then taken through the chain by autograd, into the templates and
alphas, and `adaptive_fix` is rejected at rewrite time.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..ir import producer_sites, run_producers
from ..nn.base import Producer
from ..nn.compander import CompanderScale, CompandProducer, psi, psi_and_prime_many, psi_prime
from ..train.callbacks import Callback, TrainContext

# The lines of the paper's weight-distribution figure (TensorBoard's distribution bands).
PERCENTILES = (100, 93, 84, 69, 50, 31, 16, 7, 0)


@dataclass
class Site:
    """One compander in a model: the chain `key`, its parameter `head`, the producers
    between the head and the compander (`upstream`: empty unless mixing), the producer."""

    key: str
    head: nn.Parameter
    upstream: list[Producer]
    producer: CompandProducer

    @property
    def v_is_parameter(self) -> bool:
        return not self.upstream

    def v(self) -> torch.Tensor:
        """The compander's input."""
        return run_producers(self.head, self.upstream)

    def parameters(self) -> list[nn.Parameter]:
        """What v is computed from."""
        return [self.head] + [p for m in self.upstream for p in m.parameters()]


def compand_sites(model: nn.Module) -> list[Site]:
    """Every compander of `model`, in graph order of the layers it feeds."""
    if not isinstance(model, fx.GraphModule):
        return []
    return [Site(chain.key, head, upstream, producer)
            for chain, producer, upstream, head in producer_sites(model, CompandProducer)]


def percentiles(t: torch.Tensor, qs: tuple[float, ...] = PERCENTILES) -> list[float]:
    """Linear-interpolated percentiles (numpy's default) of all entries of `t`; unlike
    torch.quantile, no size limit."""
    flat = t.detach().flatten().float().sort().values
    pos = torch.tensor(qs, dtype=torch.float64, device=flat.device) / 100 * (flat.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(flat.dtype)
    return (flat[lo] + (flat[hi] - flat[lo]) * frac).tolist()


def _decoupled(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))


def _adaptive(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


class CompanderCallback(Callback):
    """Learnable a and b are kept positive: psi is odd in each, so a sign flip would flip
    every weight of the layer (and b = 0 divides by zero). After every optimizer step each is
    projected back to at least 1e-3 of its initial value (the plain-parameter gradient
    dynamics of the paper otherwise); the report counts the projections."""

    name = "compander"

    def __init__(self, spec, clamped: dict[str, int], starts: dict[str, dict[str, Any]] | None = None):
        self.function: str = spec.function
        self.learnable: str = spec.learnable
        self.decay: str = spec.decay_mode
        self.adaptive_fix: bool = spec.adaptive_fix
        self.initial_ab = spec.initial_ab
        self.clamped = clamped
        self.starts = dict(starts or {})  # weights the init moved to the start edge (see CompanderPass._inverse)
        self.start_moves: dict[str, Any] = {}  # how far they moved in training, measured at the end
        self.projected = 0  # learnable a or b projected back to positive
        self.floors = tuple(1e-3 * x for x in spec.initial_ab)
        self.scales: dict[str, tuple[float, float]] = {}  # last seen (a, b) per layer
        self._sites: list[Site] = []      # of the trained model: found at the start and when it is replaced
        self._armed: float | None = None  # lambda for the next optimizer step
        self._hooks: list[Any] = []       # our step hooks on the current optimizer
        self._pending: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []

    def _attach(self, ctx: TrainContext) -> None:
        """Find the companders of ctx.model and hook ctx.optimizer's steps (at the start and
        whenever the loop replaces the model, which rebuilds the optimizer)."""
        self._sites = compand_sites(ctx.model)
        for hook in self._hooks:
            hook.remove()
        self._hooks = [ctx.optimizer.register_step_pre_hook(self._on_optimizer_step),
                       ctx.optimizer.register_step_post_hook(self._after_optimizer_step)]

    # --- optimizer groups ----------------------------------------------------------------

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        name_of = {id(p): n for n, p in model.named_parameters()}
        no_decay: list[torch.Tensor] = []
        for site in compand_sites(model):  # asked while the optimizer for `model` is built
            if self.decay == "effective":
                no_decay.append(site.head)  # decayed through psi(v) at the optimizer step instead
            if site.producer.scale.learnable:
                no_decay += [site.producer.scale.a, site.producer.scale.b]
        return {name_of[id(p)]: {"weight_decay": 0.0} for p in no_decay if id(p) in name_of}

    # --- per step ------------------------------------------------------------------------

    def on_train_start(self, ctx: TrainContext) -> None:
        if self.adaptive_fix and not _adaptive(ctx.optimizer):
            raise ValueError(f"compander: adaptive_fix applies to Adam/AdamW, not "
                             f"{type(ctx.optimizer).__name__}")
        if _adaptive(ctx.optimizer) and not self.adaptive_fix:
            warnings.warn(f"compander: {type(ctx.optimizer).__name__} without adaptive_fix normalises dL/dv, so "
                          "psi'(v) cancels and every step moves v by about lr wherever it is: the compander "
                          "does not shape the updates (set adaptive_fix: true, or train with SGD)", stacklevel=2)
        self._attach(ctx)

    def on_model_replaced(self, ctx: TrainContext, old: nn.Module, new: nn.Module, change) -> None:
        self._attach(ctx)

    def on_step_start(self, ctx: TrainContext) -> None:
        if ctx.step == 0:  # the initial distribution, for the weight-distribution figure
            ctx.log({"compander": self.snapshot()})

    def after_backward(self, ctx: TrainContext) -> None:
        # The work happens inside optimizer.step(), in the hooks below: after gradient
        # clipping and GradScaler unscaling, and only when the step is really taken.
        lam = float(ctx.optimizer.defaults.get("weight_decay", 0.0)) if self.decay == "effective" else 0.0
        self._armed = lam if lam or self.adaptive_fix else None

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        self._on_optimizer_step(ctx.optimizer, (), {})  # disarms: the pre-hook then does nothing

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._armed is None:
            return
        lam, self._armed = self._armed, None
        decoupled = _decoupled(optimizer)
        lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        sites = self._sites
        with torch.no_grad():
            for scale, vs in _leaf_groups(sites):
                self._correct(vs, scale, lam, decoupled, lr)
        if lam:
            _decay_generated([s for s in sites if not s.v_is_parameter], self.function, lam, decoupled, lr)

    def _correct(self, vs: list[nn.Parameter], scale: CompanderScale, lam: float, decoupled: bool,
                 lr: dict[int, float]) -> None:
        grads = [v.grad for v in vs]
        ws, ds = psi_and_prime_many(vs, scale.a, scale.b, self.function)
        if lam:
            decay = torch._foreach_mul(ws, ds)  # d/dv of ||psi(v)||^2 / 2
            if decoupled:
                torch._foreach_mul_(decay, [lam * lr[id(v)] for v in vs])
                torch._foreach_sub_(vs, decay)
            elif not self.adaptive_fix:
                torch._foreach_add_(grads, decay, alpha=lam)
        if self.adaptive_fix:
            # psi' > 0 mathematically; where it underflows dL/dv is 0 too, and so stays.
            torch._foreach_clamp_min_(ds, max(torch.finfo(v.dtype).tiny for v in vs))
            torch._foreach_div_(grads, ds)  # dL/dw
            if lam and not decoupled:
                torch._foreach_add_(grads, ws, alpha=lam)  # d/dw of lam/2 ||w||^2
            self._pending.append((vs, torch._foreach_clone(vs), ds))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for vs, before, ds in self._pending:
                torch._foreach_sub_(vs, before)  # the step the optimizer took on dL/dw
                torch._foreach_mul_(vs, ds)
                torch._foreach_add_(vs, before)
            if self.learnable != "none":
                self._keep_scales_positive()
        self._pending = []

    def _keep_scales_positive(self) -> None:
        scales = {id(s.producer.scale): s.producer.scale for s in self._sites}.values()
        for scale in scales:
            for p, floor in ((scale.a, self.floors[0]), (scale.b, self.floors[1])):
                if float(p) < floor:  # one sync per learnable scalar and step
                    p.clamp_(min=floor)
                    self.projected += 1

    # --- metrics and report ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """a and b per layer (when learnable) and the weight percentiles of the first and
        last companded layer: w = psi(v) and v, at PERCENTILES."""
        sites = self._sites
        record: dict[str, Any] = {}
        if self.learnable != "none":
            self.scales = {s.key: s.producer.scale.values() for s in sites}
            record["a"] = {k: a for k, (a, _) in self.scales.items()}
            record["b"] = {k: b for k, (_, b) in self.scales.items()}
        with torch.no_grad():
            ends = {s.key: s for s in (sites[:1] + sites[-1:])}
            record["percentiles"] = {"q": list(PERCENTILES), **{
                key: {"w": percentiles(s.producer(s.v())), "v": percentiles(s.v())} for key, s in ends.items()}}
        return record

    def on_eval(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        ctx.log({"compander": self.snapshot()})

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.learnable != "none":
            self.scales = {s.key: s.producer.scale.values() for s in self._sites}
        self.start_moves = {}
        with torch.no_grad():
            for site in self._sites:
                start = self.starts.get(site.key)
                if start is None:
                    continue
                w = site.producer(site.v()).flatten()
                index = start["index"].to(w.device)
                if int(index.max()) >= w.numel():  # grown: the positions are others now
                    self.start_moves[site.key] = "not measured: the weight changed shape (growth)"
                    continue
                moved = (w[index].double() - start["start"].to(w.device)).abs()
                self.start_moves[site.key] = {"max": float(moved.max()), "mean": float(moved.mean())}

    def report(self) -> dict[str, Any]:
        a, b = self.initial_ab
        if self.learnable != "none" and self.scales:
            a = {k: v[0] for k, v in self.scales.items()}
            b = {k: v[1] for k, v in self.scales.items()}
        out = {"function": self.function, "learnable": self.learnable, "weight_decay": self.decay,
               "adaptive_fix": self.adaptive_fix, "a": a, "b": b, "clamped": dict(self.clamped),
               "clamped_total": sum(self.clamped.values())}
        if self.starts:  # the weights that started at the edge: how far the init moved them, how far training did
            out["clamped_start_shift"] = {k: v["shift"] for k, v in self.starts.items()}
            out["clamped_moved_in_training"] = dict(self.start_moves)
        if self.learnable != "none":
            out["scale_projections"] = self.projected
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"clamped": dict(self.clamped), "starts": self.starts, "projected": self.projected}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext | None = None) -> None:
        self.clamped = dict(state.get("clamped", self.clamped))
        self.starts = dict(state.get("starts", self.starts))
        self.projected = int(state.get("projected", 0))


def _leaf_groups(sites: list[Site]) -> list[tuple[CompanderScale, list[nn.Parameter]]]:
    """The v parameters that have a gradient, grouped by the (a, b) they share (fixed
    values, or one learnable pair), so each group is one set of foreach calls."""
    groups: dict[Any, tuple[CompanderScale, list[nn.Parameter]]] = {}
    seen: set[int] = set()
    for s in sites:
        if s.v_is_parameter and s.head.grad is not None and id(s.head) not in seen:
            seen.add(id(s.head))
            scale = s.producer.scale
            key = id(scale) if scale.learnable else scale.values()
            groups.setdefault(key, (scale, []))[1].append(s.head)
    return list(groups.values())


def _decay_generated(sites: list[Site], function: str, lam: float, decoupled: bool,
                     lr: dict[int, float]) -> None:
    """Effective decay for a generated v: the gradient of lam/2 ||psi(v)||^2 with respect
    to what v is made of, by autograd through the chain."""
    if not sites:
        return
    with torch.enable_grad():
        vs = [s.v() for s in sites]
    with torch.no_grad():
        terms = [lam * psi(v, *s.producer.scale.values(), function) *
                 psi_prime(v, *s.producer.scale.values(), function) for s, v in zip(sites, vs)]
    params = list({id(p): p for s in sites for p in s.parameters() if p.requires_grad}.values())
    grads = torch.autograd.grad(vs, params, terms, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if decoupled:
                p.sub_(g, alpha=lr[id(p)])
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
