"""Compander math and rewrite: psi, psi', inverses; equivalence on the zoo; fold; spec errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from fxgrow.errors import PassError, SpecError
from fxgrow.fold import fold
from fxgrow.ir import insert_producer, weight_chains
from fxgrow.nn.base import Producer
from fxgrow.nn.compander import (FUNCTIONS, CompandProducer, psi, psi_and_prime_many, psi_inverse,
                                 psi_prime, start_limit)
from fxgrow.passes import PASS_REGISTRY, compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.compander_callback import compand_sites, percentiles
from fxgrow.specs.root import parse_spec
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)
from tests.zoo import SMALL_ZOO, ZOO, ZOO_IDS, MLP, ResNetTiny, SharedLinear

pytestmark = pytest.mark.usefixtures("one_thread")
A, B = 0.7, 0.8


def inside_range(function, n=50, seed=0):
    """float64 weights strictly inside psi's range for (A, B)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * A * 0.95


# --- the math ------------------------------------------------------------------------

@pytest.mark.parametrize("function", FUNCTIONS)
def test_psi_gradcheck_in_v_a_and_b(function):
    v = torch.randn(20, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(A, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v, a, b: psi(v, a, b, function), (v, a, b))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_psi_prime_is_the_derivative_of_psi(function):
    v = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(psi(v, A, B, function).sum(), v)
    torch.testing.assert_close(psi_prime(v, A, B, function), autograd, rtol=1e-12, atol=0)
    # and against central differences, independent of autograd's formulas
    h = 1e-6
    numeric = (psi(v + h, A, B, function) - psi(v - h, A, B, function)) / (2 * h)
    torch.testing.assert_close(psi_prime(v, A, B, function), numeric, rtol=1e-7, atol=1e-9)
    assert gradcheck(lambda v: psi_prime(v, A, B, function), (v,))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_inverse_inverts_and_its_derivative_is_one_over_psi_prime(function):
    w = inside_range(function).requires_grad_()
    v, clamped = psi_inverse(w, A, B, function)
    assert clamped == 0
    torch.testing.assert_close(psi(v, A, B, function), w, rtol=1e-12, atol=1e-13)
    assert gradcheck(lambda w: psi_inverse(w, A, B, function)[0], (w,))
    (dv_dw,) = torch.autograd.grad(v.sum(), w)
    torch.testing.assert_close(dv_dw, 1 / psi_prime(v.detach(), A, B, function), rtol=1e-9, atol=0)


@pytest.mark.parametrize("function, edge", [
    ("atan", A * math.atan(3)),                        # psi'(v) / psi'(0) = 1 / (1 + u^2) = 0.1 at u = 3
    ("erf", A * math.erf(math.sqrt(math.log(10)))),    # exp(-u^2) = 0.1
    ("asinh", A * math.asinh(math.sqrt(99))),          # 1 / sqrt(1 + u^2) = 0.1
])
def test_inverse_starts_no_weight_where_psi_is_flat(function, edge):
    """Weights beyond the edge start at it, with their sign (min_slope 0.1): psi' is a tenth of
    its peak there, where a start at psi's range (psi' ~ 1e-6) would never move again."""
    assert start_limit(function) * A == pytest.approx(edge, rel=1e-15)
    w = torch.tensor([0.0, 0.5 * edge, -0.999 * edge, 1.01 * edge, -3.0, 10.0], dtype=torch.float64)
    v, clamped = psi_inverse(w, A, B, function)
    assert clamped == 3 and torch.isfinite(v).all()
    torch.testing.assert_close(psi(v[3:], A, B, function), torch.tensor([edge, -edge, edge], dtype=torch.float64))
    torch.testing.assert_close(psi(v[:3], A, B, function), w[:3])
    assert float(psi_prime(v[3], A, B, function) / psi_prime(torch.zeros(()), A, B, function)) == pytest.approx(0.1)
    assert start_limit("atan", 0.01) * A == pytest.approx(1.029440, abs=1e-6)  # a lower min_slope: closer to the range


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("scalar", ["float", "tensor"])
def test_many_tensor_form_equals_psi_and_psi_prime(function, scalar):
    vs = [torch.randn(3, 4) * 3, torch.randn(7), torch.randn(2, 3, 3, 3)]
    a, b = (A, B) if scalar == "float" else (torch.tensor(A), torch.tensor(B))
    ws, ds = psi_and_prime_many(vs, a, b, function)
    for v, w, d in zip(vs, ws, ds):
        torch.testing.assert_close(w, psi(v, a, b, function))
        torch.testing.assert_close(d, psi_prime(v, a, b, function))


def test_percentiles_match_numpy():
    t = torch.randn(1001) ** 3
    qs = (100, 93, 84, 69, 50, 31, 16, 7, 0)
    np.testing.assert_allclose(percentiles(t, qs), np.percentile(t.numpy(), qs), rtol=1e-6, atol=1e-7)


# --- the rewrite ---------------------------------------------------------------------

# torchvision's fan_out init gives mobilenet_v2's 16-output pointwise conv std 0.35: 8 of its 512
# weights lie beyond the default start edge 0.874 (refused above 1%); a = 1 moves its edge to 1.25.
WIDER = {"mobilenet_v2": {"a": 1.0}}


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_preserves_computation_on_the_zoo(entry):
    model = entry.build().eval()
    x = entry.example()
    gm = CompanderPass(**WIDER.get(entry.name, {}))(model).graph_module.eval()
    gm.graph.lint()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    targeted = [k for k in weight_chains(gm) if k.endswith("weight")]  # (attention's in_proj_weight too)
    sites = compand_sites(gm)
    assert [s.key for s in sites] == targeted  # every conv/linear weight, never a bias or norm
    assert all(not c.producers for k, c in weight_chains(gm).items() if k.endswith("bias"))


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("entry", SMALL_ZOO, ids=[e.name for e in SMALL_ZOO])
def test_preserves_computation_for_every_function(entry, function):
    model = entry.build().eval()
    x = entry.example()
    gm = CompanderPass(function=function)(model).graph_module.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("learnable", ["layer", "global"])
def test_preserves_computation_with_learnable_scales(function, learnable):
    model = ResNetTiny().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = CompanderPass(function=function, learnable=learnable)(model).graph_module.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_learnable_scales_are_per_layer_or_one_global_pair():
    names = lambda gm: [n for n, _ in gm.named_parameters() if n.endswith(("scale.a", "scale.b"))]  # noqa: E731
    layer = CompanderPass(learnable="layer")(MLP()).graph_module
    assert len(names(layer)) == 6
    glob = CompanderPass(learnable="global")(MLP()).graph_module
    assert len(names(glob)) == 2
    scales = {id(s.producer.scale) for s in compand_sites(glob)}
    assert len(scales) == 1
    assert [p.item() for n, p in glob.named_parameters() if n in names(glob)] == [0.5, 1.0]
    fixed = CompanderPass()(MLP()).graph_module
    assert names(fixed) == [] and compand_sites(fixed)[0].producer.scale.values() == (A, B)


def test_the_gradient_reaching_v_is_dl_dw_times_psi_prime():
    gm = CompanderPass()(ResNetTiny()).graph_module
    outputs = {}

    def keep(module, inputs, out):
        out.retain_grad()
        outputs[module] = out

    for site in compand_sites(gm):
        site.producer.register_forward_hook(keep)
    gm(torch.randn(4, 3, 16, 16)).square().sum().backward()
    for site in compand_sites(gm):
        v = site.head
        torch.testing.assert_close(v.grad, outputs[site.producer].grad * psi_prime(v.detach(), A, B, "atan"))


def test_clamped_weights_warn_with_their_count_and_fail_above_one_percent():
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, :3] = torch.tensor([2.0, -2.5, 3.0])  # 3 of 2048 > 0.7 * pi / 2
    with pytest.warns(UserWarning, match="3 of 2048 weights of 'fc1.weight' start at"):
        result = CompanderPass()(model)
    report = result.callbacks[0].report()
    assert report["clamped"] == {"fc1.weight": 3, "fc2.weight": 0, "head.weight": 0}
    assert report["clamped_start_shift"] == {"fc1.weight": pytest.approx(3.0 - 0.7 * math.atan(3))}
    with torch.no_grad():
        model.fc1.weight[1] = 5.0  # 67 of 2048 > 1%
    with pytest.raises(PassError, match=r"67 of 2048 weights of 'fc1.weight'.*raise `a` to at least 4.003"):
        CompanderPass()(model)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8, bias=False)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("model_cls", [Tied, SharedLinear])
def test_a_parameter_used_twice_is_inverted_once(model_cls):
    model = model_cls().eval()
    x = torch.randn(3, 8) if model_cls is Tied else torch.randn(3, 1, 8, 8)
    gm = CompanderPass()(model).graph_module
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


# --- fold and state_dict ----------------------------------------------------------------

def perturbed(gm, seed=1):
    """As if trained: v and any learnable a, b moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


FOLD_CASES = [(e, learnable) for e in ZOO if e.name in ("conv_bn", "resnet_tiny", "depthwise")
              for learnable in ("none", "layer", "global")]
FOLD_CASES += [pytest.param(e, "none", marks=pytest.mark.slow) for e in ZOO if e.name == "resnet18"]


@pytest.mark.parametrize("entry, learnable", FOLD_CASES, ids=lambda v: getattr(v, "name", v))
def test_fold_gives_identical_outputs_and_loads_into_the_original_class(entry, learnable):
    model = entry.build()
    x = entry.example()
    gm = perturbed(CompanderPass(learnable=learnable)(model).graph_module).eval()
    folded = fold(gm)
    assert not any(isinstance(m, CompandProducer) for m in folded.modules())
    assert (folded(x) - gm(x)).abs().max() <= 1e-6
    plain = entry.build().eval()
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert (plain(x) - gm(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("learnable", ["none", "layer", "global"])
def test_state_dict_loads_into_a_fresh_rewrite(learnable):
    trained = perturbed(CompanderPass(learnable=learnable)(ResNetTiny()).graph_module).eval()
    fresh = CompanderPass(learnable=learnable)(ResNetTiny()).graph_module.eval()
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh(x), trained(x))
    if learnable == "global":  # still one shared pair after loading
        assert len({id(s.producer.scale) for s in compand_sites(fresh)}) == 1


# --- stacking ---------------------------------------------------------------------------

class HalfMask(Producer):
    """A stand-in for a mask producer (rank 20): zeroes every other entry."""

    rank, role = 20, "mask"

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("mask", (torch.arange(math.prod(shape)) % 2).float().view(shape))

    def forward(self, w):
        return w * self.mask


def test_a_later_producer_sits_after_the_compander_and_fold_still_matches():
    gm = CompanderPass()(MLP()).graph_module
    for chain in weight_chains(gm).values():
        if chain.param == "weight":
            insert_producer(gm, chain, HalfMask(gm.get_parameter(chain.head.target).shape), "test")
    gm.recompile()
    roles = [[type(m).__name__ for m in c.modules(gm)] for c in weight_chains(gm).values() if c.param == "weight"]
    assert roles == [["CompandProducer", "HalfMask"]] * 3
    perturbed(gm)
    x = torch.randn(5, 1, 8, 8)
    assert (fold(gm)(x) - gm(x)).abs().max() <= 1e-6


@pytest.mark.skipif("template_mixing" not in PASS_REGISTRY, reason="template mixing pass not present")
@pytest.mark.parametrize("share", ["pairs", "none"])
def test_after_template_mixing_the_inverse_init_resolves_the_templates(share):
    mixing = PASS_REGISTRY["template_mixing"](template_init="preserve", share=share)
    model = ResNetTiny().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = compose(mixing, CompanderPass())(model).graph_module.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    sites = compand_sites(gm)
    assert sites and all(len(s.upstream) == 1 for s in sites)
    assert (fold(perturbed(gm))(x) - gm(x)).abs().max() <= 1e-6


@pytest.mark.skipif("template_mixing" not in PASS_REGISTRY, reason="template mixing pass not present")
def test_adaptive_fix_is_refused_when_v_is_generated():
    mixing = PASS_REGISTRY["template_mixing"](template_init="preserve")
    with pytest.raises(PassError, match="adaptive_fix needs v to be a parameter"):
        compose(mixing, CompanderPass(adaptive_fix=True))(ResNetTiny())


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("fields, train, path, words", [
    ({"a": 0}, {}, "passes.0.a", "greater than 0"),
    ({"b": -1.0}, {}, "passes.0.b", "greater than 0"),
    ({"function": "tanh"}, {}, "passes.0.function", "'atan', 'asinh' or 'erf'"),
    ({"learnable": "layer", "weight_decay": "effective"}, {}, "passes.0.weight_decay", "needs fixed a and b"),
    ({"learnable": "sometimes"}, {}, "passes.0.learnable", "'none', 'layer' or 'global'"),
    ({"adaptive_fix": True}, {"optimizer": {"name": "sgd"}}, "passes.0.adaptive_fix", "Adam/AdamW only"),
    ({"max_clamped_fraction": 2}, {}, "passes.0.max_clamped_fraction", "less than or equal to 1"),
])
def test_bad_input_is_a_spec_error_with_the_field_path(fields, train, path, words):
    with pytest.raises(SpecError) as info:
        parse_spec({"passes": [{"kind": "compander", **fields}], "train": train})
    assert any(loc == path and words in msg for loc, msg in info.value.errors), info.value.errors


def test_good_combinations_parse():
    spec = parse_spec({"passes": [{"kind": "compander", "adaptive_fix": True, "learnable": "layer"}],
                       "train": {"optimizer": {"name": "adamw"}}})
    p = spec.passes[0]
    assert p.initial_ab == (0.5, 1.0) and p.decay_mode == "raw"
    assert parse_spec({"passes": [{"kind": "compander"}]}).passes[0].decay_mode == "effective"
