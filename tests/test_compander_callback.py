"""Compander training behaviour: effective weight decay, the Adam correction, learnable a and b,
metrics and report. Driven by a minimal stand-in for the loop (the event order of
fxgrow/train/callbacks.py), so each formula is checked on its own."""
import copy
import math

import pytest
import torch
from torch import nn

from fxgrow.nn.compander import FUNCTIONS, psi, psi_prime
from fxgrow.passes import PASS_REGISTRY, compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.compander_callback import PERCENTILES, compand_sites, percentiles
from fxgrow.train.callbacks import Callback, ModelChange
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)
from tests.zoo import MLP, ResNetTiny

pytestmark = pytest.mark.usefixtures("one_thread")
LAM = 0.05


class Loop:
    """The loop's side of the callback protocol: groups from overrides, then
    zero_grad -> backward -> after_backward -> step -> after_step."""

    def __init__(self, model, callbacks, optimizer_cls, **defaults):
        self.model, self.step, self.records = model, 0, []
        self.callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        overrides: dict[str, dict] = {}
        for cb in self.callbacks:
            for name, options in cb.param_group_overrides(model).items():
                overrides.setdefault(name, {}).update(options)
        groups: dict[tuple, dict] = {}
        for name, p in model.named_parameters():
            options = overrides.get(name, {})
            groups.setdefault(tuple(sorted(options.items())), {"params": [], **options})["params"].append(p)
        self.optimizer = optimizer_cls(list(groups.values()), **defaults)
        for cb in self.callbacks:
            cb.on_train_start(self)

    def log(self, record):
        self.records.append(record)

    def train_step(self, loss_fn):
        for cb in self.callbacks:
            cb.on_step_start(self)
        self.optimizer.zero_grad(set_to_none=True)
        loss_fn(self.model).backward()
        for cb in self.callbacks:
            cb.after_backward(self)
        self.optimizer.step()
        self.step += 1
        for cb in self.callbacks:
            cb.after_step(self)


class Overrides(Callback):
    name = "overrides"

    def __init__(self, overrides):
        self.overrides = overrides

    def param_group_overrides(self, model):
        return self.overrides


def rewritten(model=None, **fields):
    result = CompanderPass(**fields)(model if model is not None else MLP())
    return result.graph_module, result.callbacks[0]


def mlp_loss(model, seed=0):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model(x).square().mean()


def vs(gm):
    return [s.head for s in compand_sites(gm)]


# --- weight decay ------------------------------------------------------------------------

@pytest.mark.parametrize("function", FUNCTIONS)
def test_effective_decay_adds_the_gradient_of_half_lambda_psi_squared(function):
    gm, cb = rewritten(function=function)
    reference = copy.deepcopy(gm)
    penalty = sum(psi(v, 0.7, 0.8, function).square().sum() for v in vs(reference)) * LAM / 2
    expected = torch.autograd.grad(mlp_loss(reference) + penalty, vs(reference))

    loop = Loop(gm, cb, torch.optim.SGD, lr=0.0, weight_decay=LAM)  # lr 0: look at the gradients
    loop.train_step(mlp_loss)
    for v, g in zip(vs(gm), expected):
        torch.testing.assert_close(v.grad, g, rtol=1e-5, atol=1e-7)


def test_effective_decay_takes_v_out_of_the_optimizers_decay_and_keeps_it_on_biases():
    gm, cb = rewritten()
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.1, weight_decay=LAM)
    decay_of = {id(p): g["weight_decay"] for g in loop.optimizer.param_groups for p in g["params"]}
    assert all(decay_of[id(v)] == 0.0 for v in vs(gm))
    assert all(decay_of[id(p)] == LAM for n, p in gm.named_parameters() if n.endswith("bias"))
    # one SGD step is then plain gradient descent on loss + lam/2 ||psi(v)||^2
    before = [v.detach().clone() for v in vs(gm)]
    reference = copy.deepcopy(gm)
    penalty = sum(psi(v, 0.7, 0.8, "atan").square().sum() for v in vs(reference)) * LAM / 2
    grads = torch.autograd.grad(mlp_loss(reference) + penalty, vs(reference))
    loop.train_step(mlp_loss)
    for v, v0, g in zip(vs(gm), before, grads):
        torch.testing.assert_close(v.detach(), v0 - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_decoupled_effective_decay_with_adamw():
    """AdamW: v <- v - lr * lam * w * psi'(v) - lr * adam(dL/dv)."""
    gm, cb = rewritten()
    lr, eps = 0.01, 1e-8
    loop = Loop(gm, cb, torch.optim.AdamW, lr=lr, weight_decay=LAM, eps=eps)
    before = [v.detach().clone() for v in vs(gm)]
    reference = copy.deepcopy(gm)
    grads = torch.autograd.grad(mlp_loss(reference), vs(reference))
    loop.train_step(mlp_loss)
    for v, v0, g in zip(vs(gm), before, grads):
        decay = LAM * psi(v0, 0.7, 0.8, "atan") * psi_prime(v0, 0.7, 0.8, "atan")
        adam = g / (g.abs() + eps)  # the first Adam step: m_hat = g, v_hat = g^2
        torch.testing.assert_close(v.detach(), v0 - lr * decay - lr * adam, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("learnable", ["layer", "global"])
def test_learnable_scales_decay_v_only_never_a_or_b(learnable):
    gm, cb = rewritten(learnable=learnable)
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.0, weight_decay=LAM)
    decay_of = {n: g["weight_decay"] for g in loop.optimizer.param_groups for n, p in gm.named_parameters()
                if any(p is q for q in g["params"])}
    scales = [n for n in decay_of if n.endswith(("scale.a", "scale.b"))]
    assert len(scales) == (6 if learnable == "layer" else 2)
    assert all(decay_of[n] == 0.0 for n in scales)
    assert all(decay_of[n] == LAM for n in decay_of if n not in scales)  # v included: raw decay
    reference = copy.deepcopy(gm)
    expected = torch.autograd.grad(mlp_loss(reference), list(reference.parameters()))
    loop.train_step(mlp_loss)
    assert all(torch.equal(g, p.grad) for g, p in zip(expected, gm.parameters()))  # nothing added


def test_raw_decay_with_fixed_scales_leaves_the_optimizer_alone():
    gm, cb = rewritten(weight_decay="raw")
    assert cb.param_group_overrides(gm) == {}


# --- the Adam correction ------------------------------------------------------------------

def one_linear(w0):
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([w0]))
    return model


X = torch.tensor([[1.0, 2.0]])  # loss = sum(model(X)) so dL/dw = X = [1, 2] at every step


def linear_loss(model):
    return model(X).sum()


def hand_psi_prime(v, a=0.7, b=0.8):
    return (a / b) / (1 + (v / b) ** 2)


def test_adam_correction_step_equals_the_formula_on_a_hand_computed_case():
    """Adam with constant gradient g: each step is lr * g / (|g| + eps) on dL/dw (the bias
    corrections cancel), and the fix multiplies it by psi'(v) at the step's start."""
    w0, g, lr, eps = [0.3, -0.2], [1.0, 2.0], 0.1, 1e-8
    gm, cb = rewritten(one_linear(w0), adaptive_fix=True, targets={"types": ["Linear"]})
    loop = Loop(gm, cb, torch.optim.Adam, lr=lr, eps=eps, weight_decay=0.0)
    v = [0.8 * math.tan(w / 0.7) for w in w0]
    for _ in range(3):
        v = [vi - lr * gi / (abs(gi) + eps) * hand_psi_prime(vi) for vi, gi in zip(v, g)]
        loop.train_step(linear_loss)
        assert vs(gm)[0].detach().view(-1).tolist() == pytest.approx(v, rel=1e-6, abs=1e-7)
    # without the fix Adam takes the same-size step (lr) whatever psi'(v) is
    plain, cb_plain = rewritten(one_linear(w0), targets={"types": ["Linear"]})
    loop = Loop(plain, cb_plain, torch.optim.Adam, lr=lr, eps=eps, weight_decay=0.0)
    v0 = vs(plain)[0].detach().clone()
    loop.train_step(linear_loss)
    torch.testing.assert_close(vs(plain)[0].detach() - v0, torch.full((1, 2), -lr), rtol=1e-6, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_adam_correction_with_effective_decay(optimizer):
    """With the fix, decay too is a w-space quantity. AdamW (decoupled): the step is
    lr * (adam(dL/dw) + lam * w) times psi'(v). Adam (L2): the moments see dL/dw + lam * w."""
    w0, g, lr, eps = [0.3, -0.2], [1.0, 2.0], 0.1, 1e-8
    gm, cb = rewritten(one_linear(w0), adaptive_fix=True, targets={"types": ["Linear"]})
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    loop = Loop(gm, cb, cls, lr=lr, eps=eps, weight_decay=LAM)
    loop.train_step(linear_loss)
    v0 = [0.8 * math.tan(w / 0.7) for w in w0]
    if optimizer == "adamw":
        steps = [gi / (abs(gi) + eps) + LAM * wi for gi, wi in zip(g, w0)]
    else:
        steps = [(gi + LAM * wi) / (abs(gi + LAM * wi) + eps) for gi, wi in zip(g, w0)]
    expected = [vi - lr * si * hand_psi_prime(vi) for vi, si in zip(v0, steps)]
    assert vs(gm)[0].detach().view(-1).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_a_skipped_step_corrects_nothing_and_hooks_are_registered_once():
    w0, g, lr, eps = [0.3, -0.2], [1.0, 2.0], 0.1, 1e-8
    gm, cb = rewritten(one_linear(w0), adaptive_fix=True, targets={"types": ["Linear"]})
    loop = Loop(gm, cb, torch.optim.Adam, lr=lr, eps=eps)
    loop.optimizer.zero_grad()
    linear_loss(gm).backward()
    cb.after_backward(loop)  # e.g. a GradScaler found an inf and skipped this step
    loop.train_step(linear_loss)
    loop.train_step(linear_loss)
    v = [0.8 * math.tan(w / 0.7) for w in w0]
    for _ in range(2):
        v = [vi - lr * gi / (abs(gi) + eps) * hand_psi_prime(vi) for vi, gi in zip(v, g)]
    assert vs(gm)[0].detach().view(-1).tolist() == pytest.approx(v, rel=1e-6, abs=1e-7)
    assert len(loop.optimizer._optimizer_step_pre_hooks) == len(loop.optimizer._optimizer_step_post_hooks) == 1


def test_gradient_clipping_sees_dl_dv_and_the_optimizer_dl_dw():
    """The correction runs inside optimizer.step(), after the loop's clipping."""
    gm, cb = rewritten(one_linear([0.3, -0.2]), adaptive_fix=True, targets={"types": ["Linear"]})
    loop = Loop(gm, cb, torch.optim.Adam, lr=0.0)
    v = vs(gm)[0]
    loop.optimizer.zero_grad()
    linear_loss(gm).backward()
    cb.after_backward(loop)
    torch.testing.assert_close(v.grad, X * psi_prime(v.detach(), 0.7, 0.8, "atan"))  # what clipping sees
    loop.optimizer.step()
    torch.testing.assert_close(v.grad, X)  # what Adam's moments saw


def test_adaptive_fix_refuses_sgd_at_train_start():
    gm, cb = rewritten(adaptive_fix=True)
    with pytest.raises(ValueError, match="adaptive_fix applies to Adam/AdamW"):
        Loop(gm, cb, torch.optim.SGD, lr=0.1)


# --- learnable a, b, metrics, report --------------------------------------------------------

@pytest.mark.parametrize("learnable", ["layer", "global"])
def test_a_learnable_run_changes_a_and_b_and_reports_them(learnable):
    gm, cb = rewritten(learnable=learnable)
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(20):
        loop.train_step(lambda m: mlp_loss(m, seed=step))
    cb.on_eval(loop, {})
    cb.on_train_end(loop)
    report = cb.report()
    keys = ["fc1.weight", "fc2.weight", "head.weight"]
    assert list(report["a"]) == keys and list(report["b"]) == keys
    assert all(report["a"][k] != 0.5 and report["b"][k] != 1.0 for k in keys)
    if learnable == "global":
        assert len(set(report["a"].values())) == 1
    else:
        assert len(set(report["a"].values())) == 3
    last = loop.records[-1]["compander"]
    assert last["a"] == report["a"] and last["b"] == report["b"]


def test_metrics_hold_weight_percentiles_of_the_first_and_last_layer():
    gm, cb = rewritten(ResNetTiny(), function="erf")
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.01)
    loop.train_step(lambda m: m(torch.randn(2, 3, 16, 16)).square().mean())
    cb.on_eval(loop, {"accuracy": 0.5})
    initial, after = (r["compander"] for r in loop.records)  # step 0, then the eval
    assert "a" not in after  # fixed a, b are in the report, not repeated per eval
    table = after["percentiles"]
    assert table["q"] == list(PERCENTILES)
    assert list(table)[1:] == ["conv1.weight", "fc.weight"]
    site = compand_sites(gm)[-1]
    assert table["fc.weight"]["v"] == percentiles(site.head)
    assert table["fc.weight"]["w"] == pytest.approx(percentiles(psi(site.head.detach(), 0.7, 0.8, "erf")))
    assert table["fc.weight"]["w"] == sorted(table["fc.weight"]["w"], reverse=True)
    assert initial["percentiles"]["fc.weight"] != table["fc.weight"]


def test_report_section():
    gm, cb = rewritten(function="asinh")
    assert cb.report() == {"function": "asinh", "learnable": "none", "weight_decay": "effective",
                           "adaptive_fix": False, "a": 0.7, "b": 0.8,
                           "clamped": {"fc1.weight": 0, "fc2.weight": 0, "head.weight": 0}, "clamped_total": 0}
    restored = rewritten(function="asinh")[1]
    restored.load_state_dict({"clamped": {"fc1.weight": 4}})
    assert restored.report()["clamped_total"] == 4


def test_the_callback_follows_a_replaced_model():
    gm, cb = rewritten()
    loop = Loop(gm, cb, torch.optim.SGD, lr=0.1, weight_decay=LAM)
    loop.train_step(mlp_loss)
    replacement = copy.deepcopy(gm)  # as growth or resume install a new model and optimizer
    loop.model = replacement
    loop.optimizer = torch.optim.SGD([{"params": list(replacement.parameters()), "weight_decay": 0.0}],
                                     lr=0.0, weight_decay=LAM)
    cb.on_model_replaced(loop, gm, replacement, ModelChange())  # what the loop tells every callback
    reference = copy.deepcopy(replacement)
    plain = torch.autograd.grad(mlp_loss(reference), vs(reference))
    loop.train_step(mlp_loss)
    assert all(not torch.allclose(g, v.grad) for g, v in zip(plain, vs(replacement)))


# --- v generated by template mixing -----------------------------------------------------------

@pytest.mark.skipif("template_mixing" not in PASS_REGISTRY, reason="template mixing pass not present")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_effective_decay_reaches_templates_and_alphas_through_the_chain(optimizer):
    mixing = PASS_REGISTRY["template_mixing"](template_init="preserve")
    result = compose(mixing, CompanderPass())(MLP())
    gm = result.graph_module
    alphas = {n: {"weight_decay": 0.0} for n, _ in gm.named_parameters() if n.endswith(".alpha")}
    cb = [result.callbacks[-1], Overrides(alphas)]  # as template mixing's callback sets them
    sites = compand_sites(gm)
    assert all(not s.v_is_parameter for s in sites)
    params = list({id(p): p for s in sites for p in s.parameters()}.values())
    reference = copy.deepcopy(gm)
    ref_sites = compand_sites(reference)
    penalty = sum(psi(s.v(), 0.7, 0.8, "atan").square().sum() for s in ref_sites) * LAM / 2
    ref_params = list({id(p): p for s in ref_sites for p in s.parameters()}.values())
    loss_grads = torch.autograd.grad(mlp_loss(reference), ref_params, retain_graph=True)
    decay_grads = torch.autograd.grad(penalty, ref_params)

    lr, eps = 0.01, 1e-8
    if optimizer == "sgd":
        loop = Loop(gm, cb, torch.optim.SGD, lr=lr, weight_decay=LAM)
    else:
        loop = Loop(gm, cb, torch.optim.AdamW, lr=lr, eps=eps, weight_decay=LAM)
    before = [p.detach().clone() for p in params]
    loop.train_step(mlp_loss)
    for p, p0, gl, gd in zip(params, before, loss_grads, decay_grads):
        if optimizer == "sgd":  # coupled: added to the gradient
            torch.testing.assert_close(p.grad, gl + gd, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p.detach(), p0 - lr * (gl + gd), rtol=1e-5, atol=1e-7)
        else:  # decoupled: a plain step on the penalty next to Adam's step on the loss
            torch.testing.assert_close(p.grad, gl, rtol=1e-5, atol=1e-7)
            expected = p0 - lr * gd - lr * gl / (gl.abs() + eps)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
