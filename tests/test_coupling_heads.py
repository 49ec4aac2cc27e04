"""Attention heads in the channel coupling (fx graphs): a head split (C -> (H, head_dim))
makes the heads one channel group in units of head_dim, grouped-query attention in units of
one kv head and its query heads; a literal head count is a size use that sorted slicing
rewrites. Group structure exact on hand-written attention; end to end, sorted slicing keeps
the model at width 1.0 and its width-0.5 sub-model equals the extracted one exactly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models.tiny_lm import build as tiny_lm
from fxgrow.analysis import channel_groups, propagate_shapes
from fxgrow.analysis.coupling import ChannelUse as U
from fxgrow import api
from fxgrow.fold import fold
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import extract, subnet
from fxgrow.trace import trace
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

VOCAB, TOKENS = 40, 6


class ManualAttention(nn.Module):
    """softmax(q k^T / sqrt(D)) v written out, heads split by `view(B, T, H, D)` with literal
    sizes and merged by `reshape(B, T, H * D)`; `kv_heads < heads`: LLaMA's repeat_kv
    (expand + reshape) gives each kv head to `heads / kv_heads` query heads."""

    def __init__(self, dim=16, heads=4, kv_heads=None, head_dim=4):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads or heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, self.kv * head_dim)
        self.v = nn.Linear(dim, self.kv * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def repeat_kv(self, t):  # [B, kv, T, D] -> [B, H, T, D]
        if self.kv == self.h:
            return t
        b, _, n, d = t.shape
        return t[:, :, None, :, :].expand(b, self.kv, self.h // self.kv, n, d).reshape(b, self.h, n, d)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.repeat_kv(self.k(x).view(b, n, self.kv, self.d).transpose(1, 2))
        v = self.repeat_kv(self.v(x).view(b, n, self.kv, self.d).transpose(1, 2))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, self.h * self.d))


class InferredHeads(ManualAttention):
    """HF's style: `view(B, T, -1, head_dim)` (no head count in the graph) + SDPA."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        return self.o(y.transpose(1, 2).flatten(2))


class LM(nn.Module):
    """Embedding -> pre-norm attention block -> MLP block -> head, around `attention`."""

    def __init__(self, attention, dim=16):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids):
        x = self.tok(ids)
        x = x + self.attn(self.ln1(x))
        return self.head(x + self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def gqa_manual():
    return LM(ManualAttention(heads=4, kv_heads=2))


def gqa_sdpa():
    return LM(InferredHeads(heads=4, kv_heads=2))


# name -> (build, units, head_dim, heads per unit, the literals that size the heads: node -> literal)
MODELS = {
    "tiny_lm": (lambda: tiny_lm(vocab_size=VOCAB, block_size=8, dim=16, heads=4, layers=1), 4, 4, 1,
                {"unflatten": 4, "unflatten_1": 4, "unflatten_2": 4}),
    "manual": (lambda: LM(ManualAttention()), 4, 4, 1, {"view": 4, "view_1": 4, "view_2": 4, "reshape": 16}),
    "manual_gqa": (gqa_manual, 2, 4, 2, {"view": 4, "view_1": 2, "view_2": 2, "expand": 2, "expand_1": 2,
                                         "reshape": 4, "reshape_1": 4, "reshape_2": 16}),
    "sdpa_inferred": (lambda: LM(InferredHeads()), 4, 4, 1, {}),
    "sdpa_gqa": (gqa_sdpa, 2, 4, 2, {}),
}


def ids(batch=2, seed=0, tokens=TOKENS):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


SPEC = {"model": {"example_input": {"shape": [2, TOKENS], "dtype": "int64", "high": VOCAB}},
        "passes": [{"kind": "sorted_slicing", "width": {"fractions": [0.5, 1.0]}}], "train": {"steps": 1}}


def groups_of(model, follow_sizes):
    gm = trace(model)
    propagate_shapes(gm, ids())
    return channel_groups(gm, follow_sizes)


def heads_group(groups):
    (group,) = [g for g in groups if g.heads]
    return group


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_are_one_group_in_units_of_head_dim(name):
    build, units, d, per_unit, literals = MODELS[name]
    torch.manual_seed(0)
    g = heads_group(groups_of(build(), follow_sizes=True))
    attn = "blocks.0.attn" if name == "tiny_lm" else "attn"
    q, kv = per_unit * d, d  # channels of one unit in the query and in the key/value projections
    assert (g.size, g.head_dim, g.heads_per_unit, g.fixed) == (units, d, per_unit, False), g.reason
    assert sorted(g.uses) == sorted([U(f"{attn}.q", "weight", 0, 0, q), U(f"{attn}.q", "bias", 0, 0, q),
                                     U(f"{attn}.k", "weight", 0, 0, kv), U(f"{attn}.k", "bias", 0, 0, kv),
                                     U(f"{attn}.v", "weight", 0, 0, kv), U(f"{attn}.v", "bias", 0, 0, kv),
                                     U(f"{attn}.o", "weight", 1, 0, q)])
    assert {u.node: u.size for u in g.size_uses} == literals
    # the analysis without size following: a literal head count fixes the heads
    g = heads_group(groups_of(build(), follow_sizes=False))
    assert g.fixed == bool(literals)
    if literals:
        assert g.reason.startswith(f"{next(iter(literals))} hard-codes a size of {next(iter(literals.values()))}")


def test_head_dim_is_no_group_and_the_stream_and_ffn_stay_free():
    torch.manual_seed(0)
    groups = groups_of(LM(ManualAttention()), follow_sizes=True)
    free = sorted((g.size, g.heads, g.producers[0]) for g in groups if not g.fixed)
    assert free == [(4, True, "attn.q"), (16, False, "tok"), (32, False, "fc1")]
    assert not any(u.layer.startswith("attn.") and u.repeat == 1 and u.dim == 0 and u.layer != "attn.o"
                   for g in groups for u in g.uses)  # no group of single channels inside a head


class ModuleSplit(nn.Module):
    """Heads split by an nn.Unflatten module: its sizes are a module attribute, not a graph
    literal, so nothing could follow a cut: the heads stay whole."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.split = nn.Unflatten(-1, (heads, dim // heads))

    def forward(self, x):
        q = self.split(self.q(x)).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2))


def test_a_split_inside_a_module_keeps_the_heads_whole():
    torch.manual_seed(0)
    groups = groups_of(LM(ModuleSplit()), follow_sizes=True)
    (g,) = [g for g in groups if "attn.q" in g.producers]
    assert g.fixed and "Unflatten (attn.split) splits channels into blocks by sizes it holds itself" in g.reason


@pytest.mark.parametrize("name", list(MODELS))
def test_sorted_slicing_cuts_whole_heads_exactly(name):
    build, units, d, per_unit, _ = MODELS[name]
    torch.manual_seed(0)
    check_slicing(build(), "blocks.0.attn" if name == "tiny_lm" else "attn", units, d, per_unit)


def check_slicing(model, attn, units, d, per_unit):
    """Sorted slicing (width 0.5, 1.0) through a spec: the model at width 1.0 in train and
    eval, whole units kept at 0.5, sliced == extracted, folded == the model."""
    x = ids(3, seed=1)
    result = api.compile_spec(parse_spec(SPEC), model)
    gm = result.graph_module
    record = result.records["passes.0"]
    group = heads_group(channel_groups(propagate_shapes(trace(model), ids()), True))
    assert group.id in record.sliced
    with torch.no_grad():
        for training in (False, True):
            model.train(training), gm.train(training)
            assert torch.equal(gm(x), model(x))
        gm.eval()
        with subnet(gm, width=0.5):
            a = gm(x)
        small = extract(gm, width=0.5)
        assert torch.equal(a, small(x))
        shorter = ids(1, seed=2, tokens=TOKENS - 2)  # the followed sizes are the heads', not the tokens'
        with subnet(gm, width=0.5):
            assert torch.equal(gm(shorter), small(shorter))
        assert torch.equal(fold(gm)(x), model(x))  # folded at the largest sub-model: the model again
    kept = -(-units // 2)  # whole units: half the kv heads, and their query heads
    sd = small.state_dict()
    assert sd[f"{attn}.q.weight"].shape[0] == kept * per_unit * d
    assert sd[f"{attn}.k.weight"].shape[0] == kept * d
    assert sd[f"{attn}.o.weight"].shape[1] == kept * per_unit * d
    assert not any(n.op == "call_module" and "size" in n.target for n in small.graph.nodes)  # literals again


class NanoAttention(ManualAttention):
    """nanoGPT's style: `B, T, C = x.size()`, heads of `C // n_head`, merged back by
    `view(B, T, C)`. The merge reads the stream's width, so heads and hidden are one group
    (hidden = heads x head_dim); `C // n_head` is arithmetic on that width, which a cut would
    change without the analysis following it (C // 4 at half width is not head_dim): the
    group stays whole, naming the computed size, and the FFN is still cut."""

    def forward(self, x):
        b, n, c = x.size()
        q, k, v = (p(x).view(b, n, self.h, c // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).contiguous().view(b, n, c))


def test_a_size_computed_from_a_cut_width_keeps_heads_and_hidden_whole():
    torch.manual_seed(0)
    model = LM(NanoAttention())
    groups = groups_of(model, follow_sizes=True)
    g = heads_group(groups)
    assert (g.size, g.head_dim, g.fixed) == (4, 4, True)
    assert {U("tok", "weight", 1, 0, 4), U("ln1", "weight", 0, 0, 4), U("attn.q", "weight", 1, 0, 4),
            U("attn.q", "weight", 0, 0, 4), U("attn.o", "weight", 0, 0, 4), U("head", "weight", 1, 0, 4)} <= set(g.uses)
    assert g.reason.startswith("view computes a size (floordiv) from sizes the analysis does not follow")
    with pytest.warns(UserWarning, match="width 0.5 keeps .* left at full width: group 0"):
        result = api.compile_spec(parse_spec(SPEC), model)
    record = result.records["passes.0"]
    assert record.sliced == [g.id for g in groups if g.producers == ["fc1"]]
    x = ids(3, seed=1)
    with torch.no_grad(), subnet(result.graph_module, width=0.5):
        assert torch.equal(result.graph_module(x), extract(result.graph_module, width=0.5)(x))


def test_inspect_names_the_heads_groups(tmp_path):
    from typer.testing import CliRunner

    from fxgrow.cli.main import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {{example_input: {{shape: [2, {TOKENS}], dtype: int64, high: {VOCAB}}}}}\npasses: []\n")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["inspect", "tests.test_coupling_heads:gqa_sdpa", str(spec)])
    assert result.exit_code == 0, result.output
    assert "2 kv heads (2 query heads each) of 4" in result.output
