"""Layers are found by what they compute: any F.linear/F.conv*/F.embedding whose weight is a
parameter (subclasses FX traces through, the user's own functional code), attention's
projections, embeddings and transposed convs; the default targets are every weight matrix,
and every one a pass leaves is listed with the reason. Tied weights have one chain."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow.analysis import channel_groups, propagate_shapes
from fxgrow.analysis.coupling import ChannelUse
from fxgrow.errors import PassError
from fxgrow.fold import fold
from fxgrow.ir import functionalize, layer_table, weight_chains
from fxgrow.passes import compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.prune_regrow import PruneRegrowPass
from fxgrow.trace import trace

TOL = dict(rtol=1e-5, atol=1e-6)


class MyLinear(nn.Linear):
    """A subclass with its own forward: FX traces through it to an F.linear call."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2.0


class Kinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)     # F.linear on a bare parameter
        self.sub = MyLinear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        h = F.linear(self.emb(ids), self.w)
        h = self.sub(h)
        h = self.mha(h, h, h, need_weights=False)[0]
        h = self.up(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def kinds():
    torch.manual_seed(0)
    return Kinds()


def same(model_a, model_b, x, **tol):
    """Outputs equal in train (same random numbers) and in eval."""
    for mode in ("train", "eval"):
        getattr(model_a, mode)(), getattr(model_b, mode)()
        torch.manual_seed(5)
        out_a = model_a(x)
        torch.manual_seed(5)
        torch.testing.assert_close(model_b(x), out_a, **(tol or TOL))


def test_the_layer_table_finds_layers_by_what_they_compute():
    table = layer_table(trace(kinds()))
    assert {p: (l.kind.type_name, l.module_type, l.weight) for p, l in table.items()} == {
        "emb": ("Embedding", "Embedding", "emb.weight"),
        "w": ("Linear", "Kinds", "w"),
        "sub": ("Linear", "MyLinear", "sub.weight"),
        "mha.in_proj": ("MultiheadAttention", "MultiheadAttention", "mha.in_proj_weight"),
        "mha.out_proj": ("MultiheadAttention", "MultiheadAttention", "mha.out_proj.weight"),
        "up": ("ConvTranspose1d", "ConvTranspose1d", "up.weight"),
        "head": ("Linear", "Linear", "head.weight"),
    }


def test_default_targets_rewrite_every_weight_matrix_exactly_and_fold_loads_into_the_original():
    model, ids = kinds(), torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        model.emb.weight.mul_(0.3)  # inside the compander's range at a=2
    result = compose(CompanderPass(a=2.0), PruneRegrowPass(final_sparsity=0.5))(model, example_input=ids[:1])
    chains = weight_chains(result.graph_module)
    assert {k for k, c in chains.items() if c.producers} == {
        "emb.weight", "w", "sub.weight", "mha.in_proj_weight", "mha.out_proj.weight", "up.weight", "head.weight"}
    for section in result.coverage().values():
        assert section["share"] == 1.0 and section["untouched"] == []
    same(copy.deepcopy(model), copy.deepcopy(result.graph_module), ids)
    folded = fold(result.graph_module)
    assert isinstance(folded.mha, nn.MultiheadAttention) and isinstance(folded.up, nn.ConvTranspose1d)
    state = folded.state_dict()
    same(copy.deepcopy(model), folded, ids)
    fresh = Kinds()
    fresh.load_state_dict(state, strict=True)
    same(copy.deepcopy(model), fresh, ids)


def test_types_select_by_kind_or_by_the_modules_own_class():
    model, ids = kinds(), torch.randint(0, 20, (2, 5))
    by_kind = CompanderPass(a=4.0, targets={"types": ["Linear"]})(model, example_input=ids)
    assert [m.layer for m in by_kind.matches["passes.0"]] == ["w", "sub", "head"]
    by_class = CompanderPass(a=4.0, targets={"types": ["MyLinear"]})(model, example_input=ids)
    assert [m.layer for m in by_class.matches["passes.0"]] == ["sub"]
    attention = CompanderPass(a=4.0, targets={"names": ["mha"]})(model, example_input=ids)  # its module path
    assert [m.layer for m in attention.matches["passes.0"]] == ["mha.in_proj", "mha.out_proj"]


@pytest.mark.parametrize("batch_first, kwargs", [(True, {"need_weights": False}), (False, {}),
                                                 (True, {"need_weights": True, "average_attn_weights": False})])
def test_functional_attention_is_the_module_bit_for_bit(batch_first, kwargs):
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=batch_first)

        def forward(self, q, kv):
            return self.mha(q, kv, kv, **kwargs)

    model, q, kv = Attend(), torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    gm = trace(model)
    functionalize(gm, ["mha.in_proj", "mha.out_proj"])
    assert not any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)
    for mode, grad in (("train", True), ("eval", True), ("eval", False)):  # eval without grad: the fused kernel
        getattr(model, mode)(), getattr(gm, mode)()
        with torch.set_grad_enabled(grad):
            torch.manual_seed(1)
            expected = model(q, kv)
            torch.manual_seed(1)
            got = gm(q, kv)
        for a, b in zip(got, expected):
            assert (a is None and b is None) or torch.equal(a, b)
    type(model)().load_state_dict(fold(gm).state_dict(), strict=True)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class TinyGPT(nn.Module):
    """GPT-like, its output head tied to the token embedding (as GPT-2's wte / lm_head)."""

    def __init__(self, vocab=40, d=16, seq=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        with torch.no_grad():
            self.wte.weight.mul_(0.2)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.blocks(self.wte(ids) + self.wpe(pos))
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("targets", [{}, {"types": ["Linear"]}])
def test_a_tied_weight_has_one_chain_and_fold_keeps_it_tied(targets):
    torch.manual_seed(0)
    model, ids = TinyGPT(), torch.randint(0, 40, (2, 8))
    result = compose(CompanderPass(a=2.0, targets=targets),
                     PruneRegrowPass(final_sparsity=0.5, initial_sparsity=0.3, targets=targets))(model, example_input=ids)
    gm = result.graph_module
    chains = weight_chains(gm)
    assert chains["lm_head.weight"] is chains["wte.weight"]  # one chain, whichever name asks
    tails = {n.target.__name__: n.args[1] for n in gm.graph.nodes if getattr(n.target, "__name__", "") in
             ("embedding", "linear") and n.args[1].meta.get("fxgrow", {}).get("source") == "wte.weight"}
    assert set(tails) == {"embedding", "linear"} and len(set(tails.values())) == 1
    mask = gm.get_submodule("fxgrow.wte.weight_mask").mask
    assert 0 < float(mask.mean()) < 1  # the initial sparse layout, seen by the embedding and the head alike
    with torch.no_grad():
        effective = chains["wte.weight"].modules(gm)[0](gm.wte.weight) * mask
    folded = fold(gm)
    assert folded.wte.weight is folded.lm_head.weight
    torch.testing.assert_close(folded.wte.weight, effective, **TOL)
    same(copy.deepcopy(gm), folded, ids)
    fresh = TinyGPT()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert fresh.wte.weight is fresh.lm_head.weight
    same(folded, fresh, ids)


def test_a_tied_weight_without_sparsity_rewrites_to_the_same_function():
    torch.manual_seed(0)
    model, ids = TinyGPT(), torch.randint(0, 40, (2, 8))
    result = CompanderPass(a=2.0, targets={"types": ["Linear"]})(model, example_input=ids)
    same(copy.deepcopy(model), copy.deepcopy(result.graph_module), ids)
    assert torch.equal(model.wte.weight, model.lm_head.weight)  # the user's model untouched


class Opaque(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


class TiedIntoALeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = Opaque(self.fc.weight)

    def forward(self, x):
        return self.other(self.fc(x))


def test_a_weight_tied_into_a_module_fxgrow_cannot_rewrite_is_refused():
    with pytest.raises(PassError, match=r"'fc.weight' is the weight of a layer being rewritten, and 'other' "
                                        r"\(Opaque\) reads it too"):
        CompanderPass()(trace(TiedIntoALeaf(), leaf_modules=["Opaque"]), example_input=torch.randn(2, 8))


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d in small: the weight the conv uses is computed from the parameter."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = StdConv(3, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.proj = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.embed = nn.Embedding(10, 8, max_norm=1.0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.std(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
        h = self.lstm(h)[0]
        h = torch.einsum("nld,de->nle", h, self.proj)
        return self.fc(h.mean(1)) + self.embed(torch.arange(4)).sum()


def test_every_weight_a_pass_leaves_is_listed_with_the_reason():
    result = CompanderPass(a=4.0, targets={"exclude": ["fc"], "strict": False})(Mixed(), example_input=torch.randn(1, 3, 4, 4))
    section = result.coverage()["passes.0"]
    reasons = {row["weight"]: row["reason"] for row in section["untouched"]}
    assert set(reasons) == {"std.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "proj", "embed.weight", "fc.weight"}
    assert reasons["std.weight"].startswith("computed weight: the parameter passes through Tensor.reshape -> "
                                            "batch_norm -> Tensor.reshape_as before conv2d")
    assert reasons["lstm.weight_ih_l0"] == "inside 'lstm' (LSTM), which the graph calls whole (a module FX does not trace into)"
    assert reasons["proj"] == "read by einsum, not by a layer function fxgrow rewrites"
    assert reasons["embed.weight"].startswith("max_norm renormalizes the stored weight in place")
    assert reasons["fc.weight"] == "excluded by targets.exclude 'fc'"
    assert section["rewritten"] == 0 and section["weights"] == 6 and section["share"] == 0.0


def test_an_explicitly_named_layer_that_cannot_be_rewritten_is_an_error():
    with pytest.raises(PassError, match=r"layer 'embed' \(Embedding\) cannot be functionalized: max_norm"):
        CompanderPass(targets={"names": ["embed"]})(Mixed(), example_input=torch.randn(1, 3, 4, 4))


def test_transposed_conv_channels_couple_like_a_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
                          nn.ReLU(), nn.Conv2d(6, 4, 1))
    groups = channel_groups(propagate_shapes(trace(model), torch.randn(1, 3, 4, 4)))
    up = next(g for g in groups if "2" in g.producers)
    assert not up.fixed and up.size == 6
    assert {ChannelUse("2", "weight", 1), ChannelUse("2", "bias", 0), ChannelUse("4", "weight", 1)} <= set(up.uses)
    into = next(g for g in groups if "0" in g.producers)
    assert ChannelUse("2", "weight", 0) in into.uses


def test_an_encoder_layer_is_traced_into_its_attention_and_linears():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), 2,
                                  enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    table = layer_table(trace(model))
    assert sorted(table) == sorted(f"layers.{i}.{name}" for i in range(2)
                                   for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"))
    result = compose(CompanderPass(a=2.0), PruneRegrowPass(final_sparsity=0.5))(model, example_input=x)
    assert result.coverage()["passes.0"]["share"] == 1.0
    same(copy.deepcopy(model), copy.deepcopy(result.graph_module), x)
    type(model)(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False) \
        .load_state_dict(fold(result.graph_module).state_dict(), strict=True)


class Padded(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


def test_an_encoder_called_with_a_mask_stays_whole_and_is_listed():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                    enable_nested_tensor=False)
    gm = trace(Padded(encoder))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["encoder"]
    x, padding = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    result = CompanderPass(targets={"strict": False})(gm, example_input=(x, padding))
    reasons = {r["weight"]: r["reason"] for r in result.coverage()["passes.0"]["untouched"]}
    assert reasons["encoder.layers.0.linear1.weight"] == ("inside 'encoder' (TransformerEncoder), which the graph "
                                                          "calls whole (a module FX does not trace into)")
