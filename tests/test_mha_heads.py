"""nn.MultiheadAttention's heads under sorted slicing: its q|k|v channels are one group of
heads (units of head_dim, used three times by the in-projection), its input and output
channels the hidden size. A sub-model keeps the first h heads; where no
nn.MultiheadAttention holds them (h * head_dim != the hidden size) the layer runs - and
extract writes it - as the plain ops of `fxgrow.attention.attention_code`.

Proved here: that code equals torch's MultiheadAttention at full size over its options
(masks, bias_kv, zero attention, weights, sequence-first, unbatched, cross-attention), and a
cut one equals a full one whose dropped heads are zeroed; on a model zoo (hand-written
blocks, nn.TransformerEncoder, sequence-first with masks) the largest sub-model is the
model (train and eval), sliced == extracted exactly at every point, and the extract holds an
nn.MultiheadAttention where one can hold the point, plain torch code where none can."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow import api
from fxgrow.attention import attention_code, run, tensor_facts
from fxgrow.fold import fold
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import extract, subnet
from fxgrow.train import Trainer
from tests.test_text import write_docs

VOCAB, TOKENS, DIM, HEADS = 40, 6, 16, 4


def code(m: nn.MultiheadAttention, q, k, v, heads=None, w=None, out_w=None, **kw):
    """attention_code on `m`'s tensors (or cut ones), as the sliced model runs it."""
    kpm, mask = kw.pop("key_padding_mask", None), kw.pop("attn_mask", None)
    opts = dict(need_weights=True, average_attn_weights=True, is_causal=False) | kw
    d = m.embed_dim // m.num_heads
    w = m.in_proj_weight if w is None else w
    b = m.in_proj_bias
    if heads is not None and heads != m.num_heads:
        rows = torch.cat([torch.arange(i * m.embed_dim, i * m.embed_dim + heads * d) for i in range(3)])
        w, b = w[rows], (b[rows] if b is not None else None)
    out_w = m.out_proj.weight if out_w is None else out_w
    bias_k, bias_v = m.bias_k, m.bias_v
    if heads is not None and heads != m.num_heads:
        out_w = out_w[:, :heads * d]
        bias_k = bias_k[..., :heads * d] if bias_k is not None else None
        bias_v = bias_v[..., :heads * d] if bias_v is not None else None
    return attention_code(run, tensor_facts(q, k, v, kpm, mask), q, k, v, w, b, out_w, m.out_proj.bias, bias_k,
                          bias_v, kpm, mask, heads=heads or m.num_heads, head_dim=d, full_heads=m.num_heads,
                          drop=None, add_zero_attn=m.add_zero_attn, batch_first=m.batch_first, **opts)


def _inputs(batch_first, batched=True, cross=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = ((2, 5) if batch_first else (5, 2)) if batched else (5,)
    q = torch.randn(*shape, DIM, generator=g)
    if not cross:
        return q, q, q
    kshape = ((2, 7) if batch_first else (7, 2)) if batched else (7,)
    k = torch.randn(*kshape, DIM, generator=g)
    return q, k, torch.randn(*kshape, DIM, generator=g)


CASES = {  # name -> (module options, call options, batched, cross)
    "self": ({}, {}, True, False),
    "seq_first": ({"batch_first": False}, {}, True, False),
    "no_weights": ({}, {"need_weights": False}, True, False),
    "per_head_weights": ({}, {"average_attn_weights": False}, True, False),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {}, True, False),
    "cross_kpm": ({}, {"key_padding_mask": "bool"}, True, True),
    "causal_float_mask": ({}, {"attn_mask": "causal", "need_weights": False, "is_causal": True}, True, False),
    "mask_and_kpm": ({}, {"attn_mask": "causal", "key_padding_mask": "float"}, True, False),
    "per_head_mask": ({}, {"attn_mask": "3d", "need_weights": False}, True, False),
    "unbatched": ({}, {}, False, False),
    "no_bias": ({"bias": False}, {"need_weights": False}, True, True),
}


def _call_options(opts, q, k, m):
    opts = dict(opts)
    batch_first = m.batch_first
    n = (q.shape[0] if batch_first else q.shape[1]) if q.dim() == 3 else 1
    L, S = q.shape[-3 + batch_first] if q.dim() == 3 else q.shape[0], k.shape[-3 + batch_first] if k.dim() == 3 else k.shape[0]
    if opts.get("key_padding_mask"):
        pad = torch.zeros(n, S, dtype=torch.bool)
        pad[0, -2:] = True
        opts["key_padding_mask"] = pad if opts["key_padding_mask"] == "bool" else \
            torch.zeros(n, S).masked_fill(pad, float("-inf"))
        if q.dim() == 2:
            opts["key_padding_mask"] = opts["key_padding_mask"][0]
    if opts.get("attn_mask") == "causal":
        opts["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
    elif opts.get("attn_mask") == "3d":
        opts["attn_mask"] = torch.randn(n * m.num_heads, L, S, generator=torch.Generator().manual_seed(3))
    return opts


@pytest.mark.parametrize("name", list(CASES))
def test_the_code_is_torchs_multihead_attention_at_full_size(name):
    module_opts, call_opts, batched, cross = CASES[name]
    torch.manual_seed(0)
    m = nn.MultiheadAttention(DIM, HEADS, **({"batch_first": True} | module_opts)).eval()
    q, k, v = _inputs(m.batch_first, batched, cross)
    opts = _call_options(call_opts, q, k, m)
    with torch.no_grad():
        want = m(q, k, v, **opts)
        got = code(m, q, k, v, **opts)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("per_head_mask",)])
def test_a_cut_is_the_full_attention_with_the_dropped_heads_zeroed(name):
    """Keeping the first h heads = the full layer whose other heads' out-projection columns
    are zero (they then add nothing), for every option; the per-head weights are the kept
    heads' own."""
    module_opts, call_opts, batched, cross = CASES[name]
    torch.manual_seed(1)
    m = nn.MultiheadAttention(DIM, HEADS, **({"batch_first": True} | module_opts)).eval()
    q, k, v = _inputs(m.batch_first, batched, cross, seed=2)
    opts = _call_options(call_opts, q, k, m)
    d, h = DIM // HEADS, 2
    zeroed = m.out_proj.weight.detach().clone()
    zeroed[:, h * d:] = 0
    with torch.no_grad():
        out, weights = code(m, q, k, v, heads=h, **opts)
        full_out, _ = code(m, q, k, v, out_w=zeroed, **(opts | {"average_attn_weights": False}))
        _, per_head = code(m, q, k, v, **(opts | {"average_attn_weights": False, "need_weights": True}))
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-6)
    if weights is not None:
        kept = per_head[..., :h, :, :] if per_head.dim() == 4 else per_head[:h]
        if opts.get("average_attn_weights", True):
            kept = kept.mean(dim=-3)
        torch.testing.assert_close(weights, kept, rtol=1e-5, atol=1e-6)


def test_a_cut_per_head_mask_keeps_the_kept_heads_masks():
    torch.manual_seed(4)
    m = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    q, k, v = _inputs(True)
    mask = torch.randn(2 * HEADS, 5, 5)
    d = DIM // HEADS
    zeroed = m.out_proj.weight.detach().clone()
    zeroed[:, 2 * d:] = 0
    with torch.no_grad():
        cut, _ = code(m, q, k, v, heads=2, attn_mask=mask, need_weights=False)
        full, _ = code(m, q, k, v, out_w=zeroed, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


# --- models -----------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), x + mlp(ln(x)); the attention as the user calls it."""

    def __init__(self, batch_first=True, **attn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, **attn)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x, pad=None, mask=None):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, key_padding_mask=pad, attn_mask=mask)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MHALM(nn.Module):
    """Tokens -> 2 blocks -> norm -> head. `masks`: a padding mask from the ids (token 0)
    and a causal float mask; `seq_first`: the blocks run on [T, B, C]."""

    def __init__(self, seq_first=False, masks=False, vocab=VOCAB, **attn):
        super().__init__()
        self.seq_first, self.masks = seq_first, masks
        self.tok = nn.Embedding(vocab, DIM)
        self.blocks = nn.ModuleList(Block(batch_first=not seq_first, **attn) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, vocab)

    def forward(self, ids):
        x = self.tok(ids)
        pad = mask = None
        if self.masks:
            pad = ids == 0
            mask = torch.triu(torch.full((ids.shape[1], ids.shape[1]), float("-inf")), diagonal=1)
        if self.seq_first:
            x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x, pad, mask)
        if self.seq_first:
            x = x.transpose(0, 1)
        return self.head(self.norm(x))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (post-LN or pre-LN layers), traced into."""

    def __init__(self, norm_first=False):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        return self.head(self.encoder(self.tok(ids)))


ZOO = {
    "blocks": lambda: MHALM(),
    "blocks_seq_first_masks": lambda: MHALM(seq_first=True, masks=True),
    "blocks_bias_kv": lambda: MHALM(add_bias_kv=True, add_zero_attn=True),
    "encoder_post_ln": lambda: TorchEncoder(),
    "encoder_pre_ln": lambda: TorchEncoder(norm_first=True),
}
SPECS = {  # name -> (pass spec, points to check: (extract kwargs, the attention is cut there))
    "width": ({"width": {"fractions": [0.5, 1.0]}}, [({"width": 0.5}, True)]),
    "heads": ({"heads": {"fractions": [0.25, 0.5, 1.0]}}, [({"heads": 0.5}, True), ({"heads": 0.25}, True)]),
    "hidden": ({"hidden": {"fractions": [0.5, 1.0]}}, [({"hidden": 0.5}, True)]),
    "heads_ffn_depth": ({"heads": {"fractions": [0.5, 1.0]}, "ffn": {"fractions": [0.5, 1.0]},
                         "depth": {"blocks": [1, 2]}},
                        [({"heads": 0.5, "ffn": 0.5, "depth": 1}, True), ({"heads": 1.0, "ffn": 0.5, "depth": 1}, False)]),
}


def ids(batch=3, seed=1, tokens=TOKENS):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def compiled(model, slicing):
    spec = {"model": {"example_input": {"shape": [2, TOKENS], "dtype": "int64", "high": VOCAB}},
            "passes": [{"kind": "sorted_slicing", **slicing}], "train": {"steps": 1}}
    return api.compile_spec(parse_spec(spec), model).graph_module


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("name", list(ZOO))
def test_heads_slice_and_extract_exactly(name, spec):
    torch.manual_seed(0)
    model = ZOO[name]()
    slicing, points = SPECS[spec]
    gm = compiled(model, slicing)
    x = ids()
    x[0, -1] = 0  # a padded token where the model masks padding
    with torch.no_grad():
        for training in (False, True):
            model.train(training), gm.train(training)
            assert torch.equal(gm(x), model(x)), f"largest sub-model != model (train={training})"
        gm.eval(), model.eval()
        for at, cut in points:
            with subnet(gm, **at):
                want = gm(x)
            small = extract(gm, **at)
            assert torch.equal(small(x), want), at
            # a cut attention is plain torch code; an uncut one the user's nn.MultiheadAttention
            attns = [m for m in small.modules() if isinstance(m, nn.MultiheadAttention)]
            assert len(attns) == (0 if cut else len([m for m in model.modules() if isinstance(m, nn.MultiheadAttention)])
                                  - (2 - at.get("depth", 2))), (at, small.code)
            assert "fxgrow" not in small.code and "multi_head_attention" not in small.code
            keys = {k for k in small.state_dict() if "attn" in k}
            assert {k.rsplit(".", 1)[-1] for k in keys} >= {"in_proj_weight", "weight"}
            shorter = ids(1, seed=2, tokens=TOKENS - 2)
            with subnet(gm, **at):
                assert torch.equal(small(shorter), gm(shorter))
        assert torch.equal(fold(gm)(x), model(x))


def byte_lm():
    """The spec's model: the blocks LM over bytes, with attention dropout."""
    return MHALM(vocab=257, dropout=0.1)


def test_trained_with_dropout_compander_and_masks_then_extracted(tmp_path):
    """Compander, prune/regrow masks and heads x FFN x depth slicing on nn.MultiheadAttention
    with dropout 0.1, trained a few steps on text: in train mode (the same seed) a cut
    sub-model's attention dropout equals its extract's; the fold at full size loads into a
    fresh model, strict, and computes what the trained graph does."""
    write_docs(tmp_path / "text", count=6, words=40)
    spec = parse_spec({
        "model": {"entry": "tests.test_mha_heads:byte_lm",
                  "example_input": {"shape": [2, TOKENS], "dtype": "int64", "high": 257}},
        "passes": [{"kind": "compander", "targets": {"types": ["Linear", "MultiheadAttention"]}},
                   {"kind": "prune_regrow", "final_sparsity": 0.5, "schedule": {"start": 0.0, "end": 0.5, "every": 1}},
                   {"kind": "sorted_slicing", "heads": {"fractions": [0.5, 1.0]}, "ffn": {"fractions": [0.5, 1.0]},
                    "depth": {"blocks": [1, 2]}, "sub_models_per_batch": 2}],
        "train": {"data": {"name": "text", "files": [str(tmp_path / "text" / "*.txt")], "block_size": TOKENS,
                           "test_fraction": 0.3},
                  "steps": 3, "batch_size": 4, "progress": "none", "optimizer": {"name": "sgd", "lr": 0.05}}})
    torch.manual_seed(0)
    model = byte_lm()
    result = api.compile_spec(spec, api.trace_model(spec, model))
    gm = result.graph_module
    Trainer(gm, spec.train, callbacks=result.callbacks, out_dir=tmp_path / "run", spec_dump=api.spec_dump(spec)).fit()
    x = torch.randint(0, 257, (3, TOKENS), generator=torch.Generator().manual_seed(3))
    at = {"heads": 0.5, "ffn": 0.5, "depth": 2}
    with torch.no_grad():
        gm.train()
        with subnet(gm, **at):
            torch.manual_seed(7)
            want = gm(x)
        small = extract(gm, **at).train()
        torch.manual_seed(7)
        assert torch.equal(small(x), want)
        gm.eval()
        torch.manual_seed(7)
        with subnet(gm, **at):
            assert not torch.equal(gm(x), want)  # train mode dropped attention weights
        with subnet(gm, heads=1.0, ffn=1.0, depth=2):
            trained = gm(x)
            folded = fold(gm).eval()
    fresh = byte_lm()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained, rtol=0, atol=1e-6)
        assert torch.equal(folded(x), trained)
