"""A SortedNet sub-model of a Hugging Face model as the same class from a smaller config
(fxgrow.integrations.hf_extract), on tiny GPT-2 / LLaMA / BERT built from configs (nothing
downloaded).

The state_dicts are sliced by hand the way SortedNet slices (first k layers, first h heads,
first f FFN units, first e hidden channels). The reference is the original model's own code
(`torch.func.functional_call`) with its layer list cut to the first k and the sliced tensors
zero-padded back to the full shapes: a dropped head's q/k/v rows and o columns, a dropped
FFN unit's rows, biases and output columns are zero, which takes them out of the sum
(exact in exact arithmetic; asserted to 1e-6). Hidden size cannot be masked (a norm
averages over every channel): LLaMA's hidden point is checked against the original code on
the unpadded sliced tensors (its code reads every size from the tensors), GPT-2 / BERT's
joint point (hidden = heads x head_dim) by strict loading, shapes and the round trip."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from torch.func import functional_call

from fxgrow.errors import FxgrowError
from fxgrow.integrations.hf_extract import SubModelSizes, extract_hf, model_sizes, sub_config, sub_model_sizes

VOCAB, D = 96, 8  # head size 8 everywhere


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=4, n_head=4, n_inner=64, bos_token_id=0,
        eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=D, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
        pad_token_id=None))


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, num_labels=3))


def layer_list(model):
    return {"gpt2": "transformer.h", "llama": "model.layers", "bert": "bert.encoder.layer"}[model.config.model_type]


def prefix_3(t, dim, n):
    """The first n of each of the 3 equal blocks (q | k | v) along dim."""
    return torch.cat([c.narrow(dim, 0, n) for c in t.chunk(3, dim)], dim)


def slice_rule(family, full: SubModelSizes, s: SubModelSizes):
    """name -> the sliced tensor, as SortedNet slices (prefixes of every sliced dimension)."""
    a, kv, f, e = s.heads * D, s.kv_heads * D, s.ffn, s.hidden

    def cut(name, t):
        if family == "llama":
            if name.endswith("q_proj.weight"): return t[:a, :e]
            if name.endswith(("k_proj.weight", "v_proj.weight")): return t[:kv, :e]
            if name.endswith("o_proj.weight"): return t[:e, :a]
            if name.endswith(("gate_proj.weight", "up_proj.weight")): return t[:f, :e]
            if name.endswith("down_proj.weight"): return t[:e, :f]
            if name.endswith("norm.weight"): return t[:e]
            if name.endswith(("embed_tokens.weight", "lm_head.weight")): return t[:, :e]
        if family == "gpt2":  # Conv1D weights are [in, out]
            if name.endswith("c_attn.weight"): return prefix_3(t[:e], 1, a)
            if name.endswith("c_attn.bias"): return prefix_3(t, 0, a)
            if name.endswith("attn.c_proj.weight"): return t[:a, :e]
            if name.endswith("mlp.c_fc.weight"): return t[:e, :f]
            if name.endswith("mlp.c_fc.bias"): return t[:f]
            if name.endswith("mlp.c_proj.weight"): return t[:f, :e]
            if name.endswith(("c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                              "ln_f.weight", "ln_f.bias")): return t[:e]
            if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")): return t[:, :e]
        if family == "bert":
            if any(f".{p}." in name for p in ("query", "key", "value")):
                return t[:a, :e] if name.endswith("weight") else t[:a]
            if "attention.output.dense" in name: return t[:e, :a] if name.endswith("weight") else t[:e]
            if "intermediate.dense" in name: return t[:f, :e] if name.endswith("weight") else t[:f]
            if ".output.dense" in name: return t[:e, :f] if name.endswith("weight") else t[:e]
            if "LayerNorm" in name: return t[:e]
            if "pooler.dense" in name: return t[:e, :e] if name.endswith("weight") else t[:e]
            if name.endswith("embeddings.weight") or name == "classifier.weight": return t[:, :e]
        return t
    return cut


def sliced_state(model, s: SubModelSizes) -> dict[str, torch.Tensor]:
    lst, full = layer_list(model), model_sizes(model.config)
    cut = slice_rule(model.config.model_type, full, s)
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith(lst + ".") and int(name[len(lst) + 1:].split(".")[0]) >= s.layers:
            continue
        out[name] = cut(name, t).clone()
    return out


def masked_reference(model, sliced, k, inputs, pad: bool = True):
    """The original model's code on the sliced tensors (zero-padded back to the full shapes
    when `pad`), its layer list cut to the first k."""
    ref = copy.deepcopy(model).eval()
    parent, attr = layer_list(ref).rsplit(".", 1)
    holder = ref.get_submodule(parent)
    setattr(holder, attr, getattr(holder, attr)[:k])
    ref.config.num_hidden_layers = k  # LlamaModel runs layers[: num_hidden_layers]
    params = {}
    for name, p in ref.named_parameters(remove_duplicate=False):
        t = sliced[name]
        if pad:
            full = torch.zeros_like(p)
            full[tuple(slice(0, n) for n in t.shape)] = t
            t = full
        params[name] = t
    with torch.no_grad():
        return functional_call(ref, params, (inputs,), tie_weights=False).logits


ZOO = {"gpt2": gpt2, "llama": llama, "bert": bert}
S = SubModelSizes
# (family, sub-model): every point is maskable (the hidden stream is kept whole)
MASKED = [
    ("llama", S(layers=2, heads=4, kv_heads=2, ffn=64, hidden=32)),   # depth
    ("llama", S(layers=4, heads=2, kv_heads=1, ffn=64, hidden=32)),   # heads (GQA: 1 of 2 kv heads)
    ("llama", S(layers=4, heads=4, kv_heads=2, ffn=24, hidden=32)),   # FFN
    ("llama", S(layers=3, heads=2, kv_heads=1, ffn=40, hidden=32)),   # all three
    ("gpt2", S(layers=2, heads=4, kv_heads=4, ffn=64, hidden=32)),
    ("gpt2", S(layers=3, heads=4, kv_heads=4, ffn=16, hidden=32)),
    ("bert", S(layers=1, heads=4, kv_heads=4, ffn=64, hidden=32)),
    ("bert", S(layers=3, heads=4, kv_heads=4, ffn=48, hidden=32)),
]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build().eval() for name, build in ZOO.items()}


def ids(batch=2, tokens=11):
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,s", MASKED, ids=lambda v: v if isinstance(v, str) else
                         f"k{v.layers}h{v.heads}f{v.ffn}e{v.hidden}")
def test_extracted_equals_the_masked_original(models, family, s):
    model = models[family]
    sliced = sliced_state(model, s)
    assert sub_model_sizes(model.config, sliced) == s
    small = extract_hf(model, sliced)
    assert type(small) is type(model) and not small.training
    assert model_sizes(small.config) == s
    x = ids()
    with torch.no_grad():
        out = small(x).logits
    ref = masked_reference(model, sliced, s.layers, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for name, t in small.state_dict().items():  # it holds exactly the sliced tensors
        assert torch.equal(t, sliced[name]), name


def test_full_sizes_give_the_original_back(models):
    for model in models.values():
        full = model_sizes(model.config)
        small = extract_hf(model, model.state_dict())
        x = ids()
        with torch.no_grad():
            assert torch.equal(small(x).logits, model(x).logits)
        assert sub_model_sizes(model.config, model.state_dict()) == full


def test_llama_hidden_equals_the_original_code_on_the_sliced_tensors(models):
    model = models["llama"]
    s = S(layers=2, heads=2, kv_heads=1, ffn=32, hidden=16)
    sliced = sliced_state(model, s)
    assert sub_model_sizes(model.config, sliced) == s
    small = extract_hf(model, sliced)
    assert small.config.head_dim == D  # not hidden // heads
    x = ids()
    with torch.no_grad():
        out = small(x).logits
    torch.testing.assert_close(out, masked_reference(model, sliced, s.layers, x, pad=False), rtol=0, atol=1e-6)
    # zero-padding cannot express it: RMSNorm averages over 16 channels, not 32
    assert not torch.allclose(out, masked_reference(model, sliced, s.layers, x), atol=1e-3)


@pytest.mark.parametrize("family,s", [("gpt2", S(layers=2, heads=2, kv_heads=2, ffn=40, hidden=16)),
                                      ("bert", S(layers=3, heads=3, kv_heads=3, ffn=32, hidden=24))])
def test_joint_hidden_loads_strictly(models, family, s):
    model = models[family]
    sliced = sliced_state(model, s)
    assert sub_model_sizes(model.config, sliced) == s
    small = extract_hf(model, sliced)
    assert model_sizes(small.config) == s
    x = ids()
    with torch.no_grad():
        out = small(x).logits
    assert out.shape == model(x).logits.shape and torch.isfinite(out).all()
    assert all(torch.equal(t, sliced[n]) for n, t in small.state_dict().items())
    if family == "gpt2":  # still tied
        assert small.lm_head.weight is small.transformer.wte.weight


def test_from_config_and_class(models):
    model = models["llama"]
    s = S(layers=1, heads=2, kv_heads=1, ffn=16, hidden=32)
    small = extract_hf(model.config, sliced_state(model, s), model_class=transformers.LlamaForCausalLM)
    assert model_sizes(small.config) == s and model.config.num_hidden_layers == 4  # the original config unchanged
    with pytest.raises(FxgrowError, match="name the class too"):
        extract_hf(model.config, sliced_state(model, s))


@pytest.mark.parametrize("family,s,message", [
    ("gpt2", S(layers=4, heads=2, kv_heads=2, ffn=64, hidden=32),
     r"GPT2Config.n_head: 2 heads of 8 channels in a hidden size of 32 have no gpt2 config - its attention's "
     r"head size is n_embd // n_head"),
    ("gpt2", S(layers=4, heads=4, kv_heads=4, ffn=64, hidden=16), r"GPT2Config.n_embd: 4 heads of 8 channels"),
    ("bert", S(layers=2, heads=3, kv_heads=3, ffn=64, hidden=32),
     r"BertConfig.num_attention_heads: 3 heads of 8 channels in a hidden size of 32 have no bert config"),
    ("llama", S(layers=2, heads=3, kv_heads=1, ffn=64, hidden=32),
     r"LlamaConfig.num_key_value_heads: 3 query heads with 1 key/value heads; the original shares each "
     r"key/value head among 2 query heads"),
])
def test_refusals_name_the_config_field(models, family, s, message):
    model = models[family]
    with pytest.raises(FxgrowError, match=message):
        sub_config(model.config, s)
    with pytest.raises(FxgrowError, match=message):
        extract_hf(model, sliced_state(model, s))


def test_state_dict_refusals(models):
    model = models["llama"]
    s = S(layers=2, heads=4, kv_heads=2, ffn=64, hidden=32)
    sliced = sliced_state(model, s)
    gap = {k.replace("model.layers.1.", "model.layers.3."): v for k, v in sliced.items()}
    with pytest.raises(FxgrowError, match=r"keeps layers \[0, 3\]; a num_hidden_layers config runs the first k"):
        sub_model_sizes(model.config, gap)
    uneven = dict(sliced, **{"model.layers.1.mlp.up_proj.weight": sliced["model.layers.1.mlp.up_proj.weight"][:32]})
    with pytest.raises(FxgrowError, match=r"layers differ in ffn \(\{0: 64, 1: 32\}\); a config "
                                          r"\(intermediate_size\) gives every layer the same"):
        sub_model_sizes(model.config, uneven)
    ragged = dict(sliced, **{f"model.layers.{i}.self_attn.q_proj.weight":
                             sliced[f"model.layers.{i}.self_attn.q_proj.weight"][:12] for i in range(2)})
    with pytest.raises(FxgrowError, match=r"layer 0 self_attn.q_proj.weight has 12 on dim 0, not a multiple of "
                                          r"the head size 8"):
        sub_model_sizes(model.config, ragged)
    gpt = models["gpt2"]
    odd = dict(gpt.state_dict())
    odd["transformer.h.0.attn.c_attn.weight"] = odd["transformer.h.0.attn.c_attn.weight"][:, :40]
    with pytest.raises(FxgrowError, match=r"layer 0 attn.c_attn.weight has 40 on dim 1, not a multiple of 24 "
                                          r"\(q\|k\|v side by side: 3 x the head size 8\)"):
        sub_model_sizes(gpt.config, odd)
    short = {k: v for k, v in sliced.items() if k != "model.norm.weight"}
    with pytest.raises(FxgrowError, match=r"does not fit the smaller config: missing \['model.norm.weight'\]"):
        extract_hf(model, short)
    bad = dict(sliced, **{"lm_head.weight": sliced["lm_head.weight"][:, :16]})
    with pytest.raises(FxgrowError, match=r"lm_head.weight: \(96, 16\), the LlamaForCausalLM of .* has \(96, 32\)"):
        extract_hf(model, bad, sizes=s)
    tied = sliced_state(models["gpt2"], model_sizes(models["gpt2"].config))
    tied["lm_head.weight"] = tied["lm_head.weight"] + 1
    with pytest.raises(FxgrowError, match=r"one tied parameter in GPT2LMHeadModel"):
        extract_hf(models["gpt2"], tied)


def test_unknown_family_is_refused():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    with pytest.raises(FxgrowError, match=r"no rule for model_type 't5' \(T5Config\); known: llama, gpt2, bert"):
        model_sizes(config)
