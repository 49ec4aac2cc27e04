"""Template mixing: the producer's formula, the pass's banks, inits, gradients, fold."""
import pytest
import torch
from torch import nn

from fxgrow.errors import PassError, SpecError
from fxgrow.fold import fold
from fxgrow.ir import weight_chains
from fxgrow.nn.mixing import MixProducer, TemplateBank
from fxgrow.passes import Pipeline
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.template_mixing import (TemplateMixingCallback, TemplateMixingPass,
                                           mix_producers, retarget, share_groups)
from tests.zoo import SMALL_ZOO, ZOO


# The torchvision models take seconds each on 2 busy cores: they run with -m slow.
ZOO_TABLE = [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e not in SMALL_ZOO else [])
             for e in ZOO]


def mixed(model, x, **fields):
    return TemplateMixingPass(**fields)(model, x).graph_module


class Chain(nn.Module):
    """Weight shapes in graph order: A A A B A A (A = 16x16, B = 16x16x... different)."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.a3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)
        self.up = nn.Linear(8, 16)
        self.a4, self.a5 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        x = self.a3(torch.relu(self.a2(torch.relu(self.a1(x)))))
        x = self.up(torch.relu(self.b(x)))
        return self.a5(torch.relu(self.a4(x)))


# --- the producer --------------------------------------------------------------------------

def test_mix_is_the_weighted_sum_of_templates():
    t = torch.randn(3, 4, 5, 2)
    alpha = torch.tensor([0.5, -2.0, 1.5])
    w = MixProducer(alpha.clone(), (4, 5, 2))(t)
    assert torch.allclose(w, 0.5 * t[0] - 2.0 * t[1] + 1.5 * t[2])


@pytest.mark.parametrize("set_axis", ["row", "col"])
def test_grown_mix_places_blocks_by_hand(set_axis):
    """Block (r, c) = sum_k alpha[r, c, k] * T[set, k], set from the row or the column."""
    k, co, ci = 2, 3, 4
    t = torch.randn(2 * k, co, ci, 3)  # two template sets
    alpha = torch.randn(2, 2, k)
    w = MixProducer(alpha, (co, ci, 3), sets=2, set_axis=set_axis)(t)
    assert w.shape == (2 * co, 2 * ci, 3)
    sets = t.view(2, k, co, ci, 3)
    for r in range(2):
        for c in range(2):
            s = r if set_axis == "row" else c
            block = sum(alpha[r, c, j] * sets[s, j] for j in range(k))
            assert torch.allclose(w[r * co:(r + 1) * co, c * ci:(c + 1) * ci], block, atol=1e-6)


def test_grown_mix_applies_channel_permutations():
    t = torch.randn(2, 4, 3)
    alpha = torch.randn(2, 2, 2)
    plain = MixProducer(alpha.clone(), (4, 3))(t)
    perm_out, perm_in = torch.randperm(8), torch.randperm(6)
    permuted = MixProducer(alpha.clone(), (4, 3), perm_out=perm_out, perm_in=perm_in)(t)
    assert torch.equal(permuted, plain[perm_out][:, perm_in])
    assert MixProducer(alpha.clone(), (4, 3), set_index=torch.tensor([0, 0]), sets=1).block_sets() == [[0, 0], [0, 0]]


def test_template_bank_splits_sets():
    bank = TemplateBank(torch.zeros(6, 2, 2), sets=3)
    assert bank.per_set == 2
    with pytest.raises(ValueError):
        TemplateBank(torch.zeros(5, 2, 2), sets=2)


# --- sharing rules -------------------------------------------------------------------------

def test_share_groups_follow_the_rules():
    shapes = dict(a1=(16, 16), a2=(16, 16), a3=(16, 16), b=(8, 16), up=(16, 8), a4=(16, 16), a5=(16, 16))
    assert share_groups(shapes, "pairs") == [["a1", "a2"], ["a3"], ["b"], ["up"], ["a4", "a5"]]
    assert share_groups(shapes, "none") == [[n] for n in shapes]
    assert share_groups(shapes, "shape") == [["a1", "a2", "a3", "a4", "a5"], ["b"], ["up"]]


@pytest.mark.parametrize("share,expected", [
    ("pairs", [{"a1", "a2"}, {"a3"}, {"b"}, {"up"}, {"a4", "a5"}]),
    ("none", [{n} for n in ("a1", "a2", "a3", "b", "up", "a4", "a5")]),
    ("shape", [{"a1", "a2", "a3", "a4", "a5"}, {"b"}, {"up"}]),
])
def test_banks_on_a_hand_built_net(share, expected):
    gm = mixed(Chain(), torch.randn(2, 16), share=share, templates=8 if share == "shape" else 2)
    rows = TemplateMixingPass().describe(gm)
    banks: dict[str, set] = {}
    for row in rows:
        banks.setdefault(row["bank"], set()).add(row["weight"].removesuffix(".weight"))
    for row in rows:
        assert {w.removesuffix(".weight") for w in row["shared_with"]} == \
            banks[row["bank"]] - {row["weight"].removesuffix(".weight")}
    assert sorted(banks.values(), key=sorted) == sorted(expected, key=sorted)
    assert len(list(gm.fxgrow.banks.children())) == len(expected)


# --- initialization ------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ZOO_TABLE)
def test_preserve_keeps_outputs_and_folds_back(entry):
    model, x = entry.build().eval(), entry.example()
    gm = mixed(model, x, template_init="preserve").eval()
    ref = model(x)
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    folded = fold(gm)
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    entry.build().load_state_dict(folded.state_dict(), strict=True)


@pytest.mark.parametrize("share,k,coefficients", [("none", 1, "orthogonal"), ("pairs", 2, "random"),
                                                  ("shape", 8, "orthogonal"), ("shape", 8, "random")])
@pytest.mark.parametrize("entry", SMALL_ZOO, ids=[e.name for e in SMALL_ZOO])
def test_preserve_with_shared_banks(entry, share, k, coefficients):
    model, x = entry.build().eval(), entry.example()
    gm = mixed(model, x, template_init="preserve", share=share, templates=k,
               coefficient_init=coefficients).eval()
    assert TemplateMixingPass(template_init="preserve").preserves_computation
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_weights_move_into_banks():
    gm = mixed(Chain(), torch.randn(2, 16))
    keys = set(gm.state_dict())
    assert not any(k.endswith(".weight") and not k.startswith("fxgrow") for k in keys)
    assert {f"{n}.bias" for n in ("a1", "a2", "a3", "b", "up", "a4", "a5")} <= keys
    assert sum(k.endswith(".templates") for k in keys) == 5
    assert sum(k.endswith("weight_mix.alpha") for k in keys) == 7
    for chain in weight_chains(gm).values():
        if chain.param == "weight":
            assert chain.head.target.startswith("fxgrow.banks.")
            assert [type(m) for m in chain.modules(gm)] == [MixProducer]


@pytest.mark.parametrize("layers,k", [(2, 2), (3, 4), (5, 2), (1, 3)])
def test_orthogonal_alphas_are_orthonormal_where_dims_allow(layers, k):
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))

        def forward(self, x):
            for fc in self.fcs:
                x = fc(x)
            return x

    gm = mixed(Same(), torch.randn(2, 8), share="shape", templates=k)
    alphas = torch.stack([p.alpha.detach().view(-1) for p in mix_producers(gm).values()]).double()
    eye = torch.eye(min(layers, k), dtype=torch.float64)
    gram = alphas @ alphas.T if layers <= k else alphas.T @ alphas
    torch.testing.assert_close(gram, eye, rtol=0, atol=1e-6)


def test_kaiming_templates_have_he_scale():
    gm = mixed(nn.Sequential(nn.Linear(512, 256)), torch.randn(2, 512), templates=3)
    t = gm.fxgrow.banks.bank0.templates.detach()
    for k in range(3):
        assert abs(t[k].std().item() / (2 / 512) ** 0.5 - 1) < 0.03
    # orthonormal coefficients keep the mixed weight at the same scale
    w = mix_producers(gm)["fxgrow.0.weight_mix"](gm.fxgrow.banks.bank0.templates).detach()
    assert abs(w.std().item() / (2 / 512) ** 0.5 - 1) < 0.05


def test_seed_decides_the_init():
    x = torch.randn(2, 16)
    a = TemplateMixingPass()(Chain(), x, seed=0).graph_module.state_dict()
    b = TemplateMixingPass()(Chain(), x, seed=0).graph_module.state_dict()
    c = TemplateMixingPass()(Chain(), x, seed=1).graph_module.state_dict()
    key = "fxgrow.banks.bank0.templates"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


# --- training behaviour --------------------------------------------------------------------

@pytest.mark.parametrize("entry", SMALL_ZOO, ids=[e.name for e in SMALL_ZOO])
def test_templates_and_alphas_receive_gradients(entry):
    gm = mixed(entry.build(), entry.example())
    gm(entry.example(batch=4)).square().sum().backward()
    banks = [m for m in gm.modules() if isinstance(m, TemplateBank)]
    assert banks and all(b.templates.grad is not None and b.templates.grad.abs().sum() > 0 for b in banks)
    for path, p in mix_producers(gm).items():
        assert p.alpha.grad is not None and p.alpha.grad.abs().sum() > 0, path


def test_alpha_gradient_is_the_template_inner_product():
    gm = mixed(nn.Sequential(nn.Linear(6, 3, bias=False)), torch.randn(2, 6))
    x = torch.randn(5, 6)
    gm(x).sum().backward()
    t = gm.fxgrow.banks.bank0.templates.detach()
    grad_w = torch.ones(5, 3).T @ x  # dL/dW for L = sum(W x)
    producer = next(iter(mix_producers(gm).values()))
    expected = torch.stack([(grad_w * t[k]).sum() for k in range(2)])
    torch.testing.assert_close(producer.alpha.grad.view(-1), expected, rtol=1e-5, atol=1e-5)


def test_alphas_get_no_weight_decay_by_default():
    gm = mixed(Chain(), torch.randn(2, 16))
    overrides = TemplateMixingCallback(TemplateMixingPass().spec).param_group_overrides(gm)
    alphas = {n for n, _ in gm.named_parameters() if n.endswith(".alpha")}
    assert set(overrides) == alphas and all(v == {"weight_decay": 0.0} for v in overrides.values())
    spec = TemplateMixingPass(coefficient_weight_decay=None).spec
    assert TemplateMixingCallback(spec).param_group_overrides(gm) == {}


def test_retarget_resolves_templates_exactly():
    gm = mixed(Chain(), torch.randn(2, 16))
    producers = mix_producers(gm)
    targets = {"a1.weight": torch.randn(16, 16), "a3.weight": torch.randn(16, 16)}
    before_a2 = producers["fxgrow.a2.weight_mix"](gm.fxgrow.banks.bank0.templates).detach()
    residual = retarget(gm, targets)
    assert max(residual.values()) < 1e-5
    torch.testing.assert_close(producers["fxgrow.a1.weight_mix"](gm.fxgrow.banks.bank0.templates),
                               targets["a1.weight"], rtol=0, atol=1e-5)
    # the bank's other layer keeps its weight
    torch.testing.assert_close(producers["fxgrow.a2.weight_mix"](gm.fxgrow.banks.bank0.templates),
                               before_a2, rtol=0, atol=1e-5)


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_is_rejected_clearly():
    with pytest.raises(SpecError, match="templates"):
        TemplateMixingPass(templates=0)
    with pytest.raises(SpecError, match="share"):
        TemplateMixingPass(share="triples")
    with pytest.raises(PassError, match="at most K=2 layers per bank"):
        mixed(Chain(), torch.randn(2, 16), share="shape", template_init="preserve")
    with pytest.raises(SpecError, match="template_mixing must come before compander"):
        Pipeline([CompanderPass(), TemplateMixingPass()])
