"""SortedNet on transformers end to end (issue 14, item 3), a table over models x dimensions:
tiny_lm (hand-written q/k/v + SDPA, torch.fx), and tiny Hugging Face LLaMA (GQA: heads move
in kv units), BERT (post-LN) and GPT-2 (packed q|k|v) through torch.export, all built from
configs with dropout 0 (train mode is deterministic too).

For every sorted_slicing spec over heads / ffn / hidden / depth (by layers): the largest
sub-model is the original model bit for bit in train() and eval(); each mixed point's sliced
sub-model equals `extract` exactly (fp32 eval) and, for the HF models, `extract_hf` of the
original class from the smaller config (loaded strictly) wherever the config can say the
point, and a refusal naming the field where it cannot. GPT-2's packed q|k|v is cut per third
(its heads sliced equal GPT-2's own code on zero-padded weights). All four techniques stacked keep
the function at the largest sub-model, train a few steps, and fold into the original class."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow import api
from fxgrow.errors import FxgrowError, SpecError
from fxgrow.fold import fold
from fxgrow.passes import Pipeline
from fxgrow.passes.sorted_slicing import SortedSlicingPass
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import extract, find_state, kept_units, subnet
from fxgrow.train import Trainer
from tests.test_sorted_layers import _no_dropout
from tests.test_text import write_docs
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
from fxgrow.integrations.hf_extract import extract_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "models"))
import tiny_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, TOKENS = 257, 8  # the byte tokenizer's vocabulary: the stacked runs train on text


def _hf(config_cls, auto, **fields):
    def build():
        config = _no_dropout(config_cls(vocab_size=VOCAB, **fields))
        config.use_cache = False
        return getattr(transformers, auto).from_config(config)
    return build


# name -> (builder, front-end, the layer list)
MODELS = {
    "tiny_lm": (lambda: tiny_lm.build(vocab_size=VOCAB, block_size=16, dim=32, heads=4, layers=2), "fx", "blocks"),
    "llama": (_hf(transformers.LlamaConfig, "AutoModelForCausalLM", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=None),
              "export", "model.layers"),
    "bert": (_hf(transformers.BertConfig, "AutoModelForSequenceClassification", hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
                 num_labels=3), "export", "bert.encoder.layer"),
    "gpt2": (_hf(transformers.GPT2Config, "AutoModelForCausalLM", n_positions=16, n_embd=32, n_layer=2, n_head=4,
                 bos_token_id=0, eos_token_id=0), "export", "transformer.h"),
}

HALF = {"fractions": [0.5, 1.0]}
BY_LAYERS = {"blocks": "all", "by": "layers"}
SPECS = {  # spec name -> the sorted_slicing fields
    "heads": {"heads": HALF},
    "heads+ffn+depth": {"heads": HALF, "ffn": HALF, "depth": BY_LAYERS},
    "hidden+heads": {"hidden": HALF, "heads": HALF},
    "all": {"hidden": HALF, "heads": HALF, "ffn": HALF, "depth": BY_LAYERS},
    "hidden": {"hidden": HALF},
    "ffn+depth": {"ffn": HALF, "depth": BY_LAYERS},
}

# (model, spec, point): what the HF config makes of it - "" when it can say the point, else
# the words of the refusal. GPT-2 and BERT: head size = hidden // heads, so hidden shrinks
# only with the heads (e = h x head_dim), so GPT-2's config cannot say fewer heads alone; no
# layer at all (depth 0: embeddings, final norm, head) is refused by extract_hf.
JOINT = "heads and hidden size shrink only together"
CASES = [
    ("tiny_lm", "heads", {"heads": 0.5}, None),
    ("tiny_lm", "all", {"hidden": 0.5, "heads": 0.5, "ffn": 0.5, "depth": 1}, None),
    ("llama", "heads", {"heads": 0.5}, ""),
    ("llama", "heads+ffn+depth", {"heads": 0.5, "ffn": 0.5, "depth": 1}, ""),
    ("llama", "hidden", {"hidden": 0.5}, ""),
    ("llama", "all", {"hidden": 0.5, "heads": 0.5, "ffn": 0.5, "depth": 1}, ""),
    ("llama", "all", {"hidden": 0.5, "heads": 1.0, "ffn": 0.5, "depth": 0}, "holds no layer"),
    ("bert", "heads", {"heads": 0.5}, JOINT),
    ("bert", "heads+ffn+depth", {"heads": 1.0, "ffn": 0.5, "depth": 1}, ""),
    ("bert", "heads+ffn+depth", {"heads": 0.5, "ffn": 0.5, "depth": 1}, JOINT),
    ("bert", "all", {"hidden": 0.5, "heads": 0.5, "ffn": 0.5, "depth": 1}, ""),
    ("bert", "hidden+heads", {"hidden": 0.5, "heads": 1.0}, JOINT),
    ("gpt2", "ffn+depth", {"ffn": 0.5, "depth": 1}, ""),
    ("gpt2", "heads", {"heads": 0.5}, JOINT),
    ("gpt2", "heads+ffn+depth", {"heads": 0.5, "ffn": 0.5, "depth": 1}, JOINT),
    ("gpt2", "hidden+heads", {"hidden": 0.5, "heads": 0.5}, ""),
    ("gpt2", "hidden", {"hidden": 0.5}, JOINT),
]


def spec_for(name: str, passes: list, train: dict | None = None):
    _, frontend, _ = MODELS[name]
    return parse_spec({"model": {"frontend": frontend, "example_input": {"shape": [1, TOKENS], "dtype": "int64",
                                                                          "high": VOCAB}},
                       "passes": passes, "train": train or {"steps": 1}})


def ids(batch=3, tokens=TOKENS, seed=5):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def out(y):
    return y.logits if hasattr(y, "logits") else y


def run(model, x, training):
    model.train(training)
    with torch.no_grad():
        return out(model(x))


_built: dict = {}


def original(name: str) -> nn.Module:
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = MODELS[name][0]().eval()
    return _built[name]


_sliced: dict = {}


def sliced(name: str, spec: str) -> nn.Module:
    """The original model rewritten by sorted_slicing with SPECS[spec], once per module."""
    if (name, spec) not in _sliced:
        s = spec_for(name, [{"kind": "sorted_slicing", **SPECS[spec]}])
        _sliced[name, spec] = api.compile_spec(s, api.trace_model(s, original(name))).graph_module
    return _sliced[name, spec]


@pytest.mark.parametrize("name, spec", sorted({(c[0], c[1]) for c in CASES}))
def test_the_largest_sub_model_is_the_original(name, spec):
    gm, model, x = sliced(name, spec), original(name), ids()
    state = find_state(gm)
    assert state.point == max(state.points)
    assert set(state.group_dims.values()) == set(state.dims)  # every dimension given cuts a group
    for training in (False, True):
        assert torch.equal(run(gm, x, training), run(model, x, training)), training
    gm.eval()


@pytest.mark.parametrize("name, spec, at, hf", CASES, ids=[f"{c[0]}-{c[1]}-" + ",".join(
    f"{k}{v:g}" for k, v in c[2].items()) for c in CASES])
def test_sliced_equals_extracted_and_the_hf_class(name, spec, at, hf):
    gm, model, x = sliced(name, spec), original(name), ids()
    at = dict(at)
    depth = at.pop("depth", None)
    gm.eval()
    with torch.no_grad(), subnet(gm, depth=depth, **at) as point:
        ours = gm(x)
    small = extract(gm, at=point)
    with torch.no_grad():
        assert torch.equal(out(small(x)), ours)
    assert not torch.equal(ours, run(model, x, False))  # the point cuts something
    units = kept_units(gm, depth=depth, **at)
    if depth is not None:
        assert units["layers"] == {MODELS[name][2]: depth}
    if hf is None:
        return
    state = small.state_dict()
    if hf:
        with pytest.raises(FxgrowError, match=hf):
            extract_hf(model, state)
        return
    theirs = extract_hf(model, state)  # loads strictly into the smaller config's class
    assert type(theirs) is type(model)
    with torch.no_grad():
        assert torch.equal(out(theirs(x)), ours)


def test_heads_move_in_kv_units_under_gqa():
    gm = sliced("llama", "heads")
    state = find_state(gm)
    assert sorted(state.full.values()) == [2, 2]  # 2 kv heads per layer, each with its 2 query heads
    small = extract(gm, heads=0.5)
    q, k = (small.get_parameter(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qk")
    assert (q.shape[0], k.shape[0]) == (2 * 8, 1 * 8)


def test_fractions_that_keep_the_same_kv_units_are_refused():
    """Before: heads 0.25 on 4 query heads in 2 kv units silently kept 2 heads, the same
    sub-model as heads 0.5, as a grid point (and report row) of its own."""
    s = spec_for("llama", [{"kind": "sorted_slicing", "heads": {"fractions": [0.25, 0.5, 1.0]}}])
    with pytest.raises(SpecError, match=r"passes.0.heads.fractions: heads 0.25 and 0.5 keep the same channels in "
                                        r"every heads group \(2 units of 2 query heads of 8 channels \(a kv head\)\)"):
        api.compile_spec(s, api.trace_model(s, original("llama")))


def test_gpt2_heads_sliced_equal_its_own_code_on_zero_padded_weights():
    """GPT-2 packs q|k|v in one Conv1D (c_attn, output 3E) and splits it: heads 0.5 keeps the
    first 2 of 4 heads in each third. GPT-2's own forward with the dropped heads' c_attn
    columns (q, k and v) and c_proj rows zeroed computes the same function: a dropped head
    attends uniformly to zero values and its output meets zero rows."""
    gm, model, x = sliced("gpt2", "heads"), original("gpt2"), ids()
    gm.eval()
    with torch.no_grad(), subnet(gm, heads=0.5):
        ours = gm(x)
    e, kept = model.config.n_embd, model.config.n_embd // 2  # 2 heads of 8
    params = dict(model.named_parameters())
    for i in range(model.config.n_layer):
        attn = f"transformer.h.{i}.attn."
        drop = torch.cat([torch.arange(t * e + kept, (t + 1) * e) for t in range(3)])
        for name, dim, index in (("c_attn.weight", 1, drop), ("c_attn.bias", 0, drop),
                                 ("c_proj.weight", 0, torch.arange(kept, e))):
            params[attn + name] = params[attn + name].index_fill(dim, index, 0.0)
    with torch.no_grad():
        theirs = out(torch.func.functional_call(model, params, (x,)))
    diff = (ours - theirs).abs().max().item()
    print(f"gpt2 heads 0.5 vs zero-padded functional_call: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert not torch.allclose(ours, run(model, x, False))  # heads 0.5 cuts something
    small = extract(gm, heads=0.5)
    thirds = torch.cat([torch.arange(t * e, t * e + kept) for t in range(3)])  # first 2 heads of q, k, v
    for name, dim, index in (("c_attn.weight", 1, thirds), ("c_attn.bias", 0, thirds),
                             ("c_proj.weight", 0, torch.arange(kept))):
        name = "transformer.h.0.attn." + name
        assert torch.equal(small.get_parameter(name), model.get_parameter(name).index_select(dim, index)), name


class StreamAttention(nn.Module):
    """A residual attention block whose queries are the residual stream itself, split into
    heads (no query projection): the stream's channel group is heads as well."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.k, self.v, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(x), split(self.k(x)), split(self.v(x)), is_causal=True)
        return x + self.o(y.transpose(1, 2).flatten(2))


class StreamLM(nn.Module):
    def __init__(self, dim=16, heads=2, layers=2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.blocks = nn.Sequential(*(StreamAttention(dim, heads) for _ in range(layers)))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x):
        return self.head(self.blocks(self.tok(x)))


def test_a_stream_read_as_heads_is_the_hidden_dimension():
    """Before: the stream's group was labelled heads, so `heads: 0.5` halved the model's
    hidden size and `hidden` was refused as 'a heads group'."""
    torch.manual_seed(0)
    model, x = StreamLM().eval(), ids()
    with pytest.raises(SpecError, match="heads: no heads group can be sliced.*the residual stream, read as heads: "
                                        "a hidden group, cut by `hidden`"):
        Pipeline([SortedSlicingPass(heads=HALF)])(model, example_input=x)
    gm = Pipeline([SortedSlicingPass(hidden=HALF)])(model, example_input=x).graph_module.eval()
    state = find_state(gm)
    assert list(state.group_dims.values()) == ["hidden"] and list(state.full.values()) == [2]  # cut in whole heads
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        with subnet(gm, hidden=0.5):
            half = gm(x)
        small = extract(gm, hidden=0.5)
        assert torch.equal(small(x), half) and small.get_parameter("tok.weight").shape == (VOCAB, 8)


# --- all four techniques stacked ----------------------------------------------------------

STACK = [{"kind": "template_mixing", "templates": 2, "template_init": "preserve"},
         {"kind": "compander"},  # SGD: adaptive_fix needs v a parameter, and mixing generates it
         {"kind": "prune_regrow", "final_sparsity": 0.5, "schedule": {"start": 0.0, "end": 0.5, "every": 1}},
         {"kind": "sorted_slicing", **SPECS["heads+ffn+depth"], "sub_models_per_batch": 2}]


def _train_spec(name: str, folder: Path) -> dict:
    files = [str(folder / "*.txt")]
    data = {"name": "text", "files": files, "block_size": TOKENS, "test_fraction": 0.3}
    if name == "bert":  # sequence classification: each pattern of `files` one class
        for c in range(3):
            write_docs(folder / f"c{c}", count=4, words=30, seed=c)
        data.update(files=[str(folder / f"c{c}" / "*.txt") for c in range(3)], label_by="pattern")
    else:
        write_docs(folder, count=6, words=40)
    return {"data": data, "steps": 3, "batch_size": 4, "log_every_steps": 1, "progress": "none",
            "optimizer": {"name": "sgd", "lr": 0.05}}


@pytest.mark.parametrize("name", ["tiny_lm", "llama", "bert"])
def test_four_techniques_stacked_keep_the_function_train_and_fold(name, tmp_path):
    model, x = original(name), ids()
    stack = copy.deepcopy(STACK)
    if name == "tiny_lm":  # nn.Embedding's N(0, 1) init lies past the compander's range (refused): linears only
        stack[1]["targets"] = {"types": ["Linear"]}
    spec = spec_for(name, stack, _train_spec(name, tmp_path / "text"))
    result = api.compile_spec(spec, api.trace_model(spec, model))
    gm = result.graph_module
    for training in (False, True):  # mixing and companding round: a few ulps
        torch.testing.assert_close(run(gm, x, training), run(model, x, training), rtol=0, atol=1e-5)
    report = Trainer(gm, spec.train, callbacks=result.callbacks, out_dir=tmp_path / "run",
                     spec_dump=api.spec_dump(spec)).fit()
    assert set(report["sorted_slicing"]) and report["prune_regrow"]
    gm.eval()
    with subnet(gm, depth=len(model.get_submodule(MODELS[name][2]))):  # the largest sub-model
        trained = run(gm, x, False)
        folded = fold(copy.deepcopy(gm)).eval()
    assert not torch.equal(trained, run(model, x, False))  # it trained
    fresh = type(model)(model.config) if hasattr(model, "config") else MODELS[name][0]()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(out(fresh.eval()(x)), trained, rtol=0, atol=1e-6)
        assert torch.equal(out(folded(x)), trained)


def test_flops_of_a_live_sub_model_with_attention():
    """Before: counting a sliced fx model with SDPA at a smaller point (template mixing's FLOP
    meter after each step) failed in FlopCounterMode's module tracker - a leaf parameter
    handed to a slicing producer has no grad_fn under no_grad."""
    from fxgrow.analysis.cost import forward_flops
    gm, x = sliced("tiny_lm", "heads"), ids()
    with subnet(gm, heads=0.5):
        live = forward_flops(gm, x)
    assert live == forward_flops(extract(gm, heads=0.5), x) < forward_flops(gm, x)


def test_group_dimension_puts_the_stream_before_the_head_flag():
    from fxgrow.analysis.coupling import ChannelGroup, ChannelUse
    from fxgrow.passes.sorted_slicing_layers import group_dimension

    def group(layers, heads=False):
        return ChannelGroup(0, 2, [ChannelUse(name, "weight", 0) for name in layers], [layers[0]], False, heads=heads)
    assert group_dimension(group(["tok", "blocks.0.k", "blocks.1.o"], heads=True), "blocks") == "hidden"
    assert group_dimension(group(["blocks.0.q", "blocks.0.k", "blocks.0.o"], heads=True), "blocks") == "heads"
