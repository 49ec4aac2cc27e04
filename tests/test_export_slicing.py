"""Sorted slicing (width) on torch.export graphs of tiny GPT-2, LLaMA (GQA) and BERT: the aten
coupling rules find the hidden (residual stream), FFN and head groups; the sliced graph is the
capture at width 1.0 (train and eval) and its width-0.5 sub-model equals the extracted one
exactly; the extracted LLaMA is `LlamaForCausalLM` of the halved config, bitwise."""
from __future__ import annotations

import copy

import pytest
import torch

from fxgrow import api
from fxgrow.analysis import channel_groups, propagate_shapes
from fxgrow.analysis.coupling import ChannelUse as U
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import extract, subnet
from tests.test_export_frontend import captured, ids, run, spec_for  # noqa: F401  (captured: a fixture)
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")

SLICING = [{"kind": "sorted_slicing", "width": {"fractions": [0.5, 1.0]}}]

# model -> (the embedding writing the stream, a layer's module path, its FFN's first layer, FFN
# size, units of its heads group, query heads per unit, why the heads stay whole)
EXPECTED = {
    "llama": ("model.embed_tokens", "model.layers.{i}.", "mlp.gate_proj", 64, 2, 2, ""),
    "bert": ("bert.embeddings.word_embeddings", "bert.encoder.layer.{i}.", "intermediate.dense", 64, 4, 1, ""),
    "gpt2": ("transformer.wte", "transformer.h.{i}.", "mlp.c_fc", 128, 4, 1, ""),  # packed q|k|v: cut per piece
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_aten_rules_find_hidden_ffn_and_head_groups(captured, name):
    _, gm = captured[name]
    stream, layer, ffn, ffn_size, units, per_unit, whole = EXPECTED[name]
    groups = channel_groups(propagate_shapes(copy.deepcopy(gm), ids(1)), follow_sizes=True)
    by_producer = {p: g for g in groups for p in g.producers}
    hidden = by_producer[stream]
    assert not hidden.fixed and hidden.size == 32 and not hidden.heads
    for i in range(2):
        g = by_producer[layer.format(i=i) + ffn]
        assert (g.fixed, g.size, g.heads) == (False, ffn_size, False), g.reason
        (g,) = [g for g in groups if g.heads and any(u.layer.startswith(layer.format(i=i)) for u in g.uses)]
        assert (g.size, g.head_dim, g.heads_per_unit) == (units, 8, per_unit)
        assert g.fixed == bool(whole) and whole.format(i=i) in g.reason
        if name == "gpt2":  # c_attn's q|k|v thirds are three slices, the split's size follows them
            attn = layer.format(i=i) + "attn."
            assert sorted((u.layer, u.param, u.dim, u.offset, u.repeat) for u in g.uses) == sorted(
                [(attn + "c_attn", p, d, o, 8) for p, d in (("weight", 1), ("bias", 0)) for o in (0, 32, 64)]
                + [(attn + "c_proj", "weight", 0, 0, 8)])
            assert [(u.arg, u.size, u.offset, u.repeat) for u in g.size_uses
                    if u.node.startswith("split")] == [(1, 32, 0, 8)]
    # mask and position arithmetic on the token ids fixes no group that holds weights' channels
    # but the vocabulary (model output) and the buffers it reads
    fixed = [g for g in groups if g.fixed and not g.heads and all(u.param == "weight" for u in g.uses)
             and g.producers]
    assert all(g.reason == "model output" or "packed projection" in g.reason for g in fixed), \
        [(g.producers, g.reason) for g in fixed]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_width_slicing_on_an_exported_graph_is_exact(captured, name):
    model, gm = captured[name]
    sliced = api.compile_spec(spec_for(SLICING), copy.deepcopy(gm)).graph_module
    x = ids()
    for training in (False, True):  # width 1.0: the capture itself, bit for bit
        assert torch.equal(run(sliced, x, training), run(gm, x, training))
    sliced.eval()
    with torch.no_grad(), subnet(sliced, width=0.5):
        half = sliced(x)
    small = extract(sliced, width=0.5)
    shorter = ids(2, tokens=5)  # the capture keeps batch and tokens free; the followed sizes are channels'
    with torch.no_grad():
        assert torch.equal(small(x), half)
        with subnet(sliced, width=0.5):
            assert torch.equal(sliced(shorter), small(shorter))
    assert half.shape == run(gm, x, False).shape
    if name != "llama":
        return
    # the HF class of the halved config (head_dim explicit, kv heads halved with the heads)
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size, config.head_dim = 16, 32, 8
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, half)


class Mixer(torch.nn.Module):
    """Two projections side by side (cat) through a functional RMSNorm, permutes and a
    token select: aten cat, rms_norm (its normalized_shape holds both groups), permute,
    select and mean."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 6), torch.nn.Linear(8, 4)
        self.w = torch.nn.Parameter(torch.rand(10) + 0.5)
        self.out = torch.nn.Linear(10, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], -1)
        y = torch.relu(torch.nn.functional.rms_norm(y, (10,), self.w).permute(0, 2, 1)).permute(0, 2, 1)
        return self.out(y[:, 0] + y.mean(1))


def test_concatenated_groups_follow_an_exported_rms_norm():
    spec = parse_spec({"model": {"frontend": "export", "example_input": {"shape": [2, 5, 8]}},
                       "passes": SLICING, "train": {"steps": 1}})
    torch.manual_seed(0)
    model = Mixer().eval()
    gm = api.trace_model(spec, model)
    groups = channel_groups(propagate_shapes(copy.deepcopy(gm), torch.randn(2, 5, 8)), follow_sizes=True)
    free = {g.producers[0]: g for g in groups if not g.fixed}
    assert sorted(free) == ["a", "b"]
    assert U("", "w", 0, 6, 1) in free["b"].uses and [(u.node, u.offset) for u in free["b"].size_uses] == [
        ("rms_norm", 6)]
    assert [n.kind for n in free["a"].normalizers] == ["rms_norm"]
    with pytest.warns(UserWarning, match="width 0.5 keeps"):
        sliced = api.compile_spec(spec, copy.deepcopy(gm)).graph_module.eval()
    _half_is_extracted(sliced, gm)


def _half_is_extracted(sliced, gm):
    """Width 1.0 is `gm` bit for bit, width 0.5 its extract's function (fp32 eval); the extract."""
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert torch.equal(sliced(x), gm(x))
        with subnet(sliced, width=0.5):
            half = sliced(x)
        small = extract(sliced, width=0.5)
        assert torch.equal(small(x), half)
    return small


class Packed(torch.nn.Module):
    """One projection packing three pieces (GPT-2's q|k|v), split and read by three layers:
    `split` by one size (equal pieces), by a list of sizes, or of a cat of two projections."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        self.proj, self.left, self.right = torch.nn.Linear(8, 12), torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
        self.outs = torch.nn.ModuleList(torch.nn.Linear(4, 3) for _ in range(3))

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], -1) if self.split == "cat" else self.proj(x)
        pieces = torch.split(y, [4, 4, 4] if self.split == "sizes" else 4, -1)
        return sum(out(torch.relu(p)) for out, p in zip(self.outs, pieces))


@pytest.mark.parametrize("split", ["size", "sizes", "cat"])
def test_equal_pieces_of_a_packed_projection_are_one_group(split):
    spec = parse_spec({"model": {"frontend": "export", "example_input": {"shape": [2, 5, 8]}},
                       "passes": SLICING, "train": {"steps": 1}})
    torch.manual_seed(0)
    gm = api.trace_model(spec, Packed(split).eval())
    shaped = propagate_shapes(copy.deepcopy(gm), torch.randn(2, 5, 8))
    pieces = [g for g in channel_groups(shaped, follow_sizes=True) if any((u.layer, u.dim) == ("outs.0", 1) for u in g.uses)]
    assert len(pieces) == 1
    (g,) = pieces
    if split != "size":  # unequal-able sizes, or a split of two blocks side by side: not cut
        assert g.fixed and "cuts channels into pieces (a packed projection" in g.reason
        return
    assert not g.fixed and g.size == 4 and g.producers == ["proj"]
    assert sorted(g.uses) == sorted([U("proj", p, d, o) for p, d in (("weight", 0), ("bias", 0)) for o in (0, 4, 8)]
                                    + [U(f"outs.{i}", "weight", 1) for i in range(3)])
    assert [(u.arg, u.size) for u in g.size_uses] == [(1, 4)]
    (fixed,) = [g for g in channel_groups(shaped) if any((u.layer, u.dim) == ("outs.0", 1) for u in g.uses)]
    assert fixed.fixed and "hard-codes a size of 4" in fixed.reason  # growth cannot rewrite the split's size
    with pytest.warns(UserWarning, match="width 0.5 keeps"):  # the input's and outputs' channels stay
        sliced = api.compile_spec(spec, copy.deepcopy(gm)).graph_module.eval()
    small = _half_is_extracted(sliced, gm)
    assert small.get_parameter("proj.weight").shape == (6, 8)
    assert torch.equal(small.get_parameter("proj.weight"), gm.get_parameter("proj.weight")[[0, 1, 4, 5, 8, 9]])
