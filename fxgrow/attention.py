"""`nn.MultiheadAttention` with fewer heads, or a cut embedding, in plain ops.

nn.MultiheadAttention can only hold `num_heads` heads of `embed_dim / num_heads` channels in
`embed_dim` channels, with its input and output that wide too. A sorted-slicing sub-model
keeps the first h heads of head_dim D (the same D), and may cut the model's hidden size E
on its own: h * D != E', which no nn.MultiheadAttention computes. `attention_code` is that
computation, written once for two uses that must agree op for op:

- at run time (the sliced model, `fxgrow.layers.multi_head_attention` on cut tensors), with
  `f = run` calling each op;
- in fold/extract, with `f` writing each op as a graph node (`_fold_mha_code`): the extracted
  sub-model is plain torch code, and equals the sliced one exactly.

It follows `F.multi_head_attention_forward` (torch 2.x): the in-projection packed or not as
the inputs are the same tensor or not, masks made float (-inf where a bool mask is True) and
merged, bias_k/bias_v and add_zero_attn appended to the keys, softmax(q k^T / sqrt(D)) v, the
out-projection, weights averaged over the kept heads. A 3-d attn_mask ([N * H, L, S]) keeps
the kept heads' masks. With dropout the attention weights are dropped explicitly (softmax,
dropout, bmm) in both uses: `F.dropout` at run time, an `nn.Dropout` of the module's p in
the folded code, which draw the same mask and follow the mode.
Only the decisions are Python (shapes' ranks, dtypes, which inputs are the same tensor):
`Facts` reads them from tensors at run time and from the graph's shapes in fold.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx


@dataclass(frozen=True)
class Facts:
    """What `attention_code` branches on."""

    batched: bool            # query is [L, N, E] (or [N, L, E]), not [L, E]
    same_qk: bool            # query is key (self-attention)
    same_kv: bool            # key is value
    kpm_bool: bool | None    # key_padding_mask: bool, float, or None (absent)
    mask_bool: bool | None   # attn_mask likewise
    mask_dim: int            # attn_mask's rank (0: absent)


def facts_of(query, key, value, key_padding_mask, attn_mask,
             rank: Callable[[Any], int], is_bool: Callable[[Any], bool]) -> Facts:
    """The facts of one call; `rank(t)` and `is_bool(t)` read a tensor, or a graph node's shape."""
    return Facts(batched=rank(query) == 3, same_qk=query is key, same_kv=key is value,
                 kpm_bool=None if key_padding_mask is None else is_bool(key_padding_mask),
                 mask_bool=None if attn_mask is None else is_bool(attn_mask),
                 mask_dim=0 if attn_mask is None else rank(attn_mask))


def tensor_facts(query, key, value, key_padding_mask, attn_mask) -> Facts:
    return facts_of(query, key, value, key_padding_mask, attn_mask, lambda t: t.dim(),
                    lambda t: t.dtype == torch.bool)


def node_facts(query, key, value, key_padding_mask, attn_mask) -> Facts:
    """Facts from ShapeProp's `tensor_meta` (fold runs on a traced, shape-propagated graph)."""
    def meta(n):
        m = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        if m is None:
            raise ValueError(f"attention fold needs the shapes of {n}: run ShapeProp first")
        return m
    return facts_of(query, key, value, key_padding_mask, attn_mask, lambda n: len(meta(n).shape),
                    lambda n: meta(n).dtype == torch.bool)


def run(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def attention_code(f, facts: Facts, query, key, value, in_proj_weight, in_proj_bias, out_proj_weight,
                   out_proj_bias, bias_k, bias_v, key_padding_mask, attn_mask, *, heads: int, head_dim: int,
                   full_heads: int, drop: Callable | None, add_zero_attn: bool, batch_first: bool,
                   need_weights: bool, average_attn_weights: bool, is_causal: bool):
    """(attn_output, attn_weights or None) of multi-head attention with `heads` heads of
    `head_dim` (the module had `full_heads`); `f(fn, *args)` runs or writes every op;
    `drop(weights)` is the attention dropout (None: the module's dropout is 0)."""
    width = heads * head_dim  # q/k/v channels
    size = lambda t, d: f(operator.getitem, f(getattr, t, "shape"), d)  # noqa: E731
    if facts.batched and batch_first:  # MHA.forward: to [L, N, E], keeping which inputs are the same
        query = f(torch.transpose, query, 1, 0)
        key = query if facts.same_qk else f(torch.transpose, key, 1, 0)
        value = key if facts.same_kv else f(torch.transpose, value, 1, 0)
    if not facts.batched:
        query = f(torch.unsqueeze, query, 1)
        key = query if facts.same_qk else f(torch.unsqueeze, key, 1)
        value = key if facts.same_kv else f(torch.unsqueeze, value, 1)
        if key_padding_mask is not None:
            key_padding_mask = f(torch.unsqueeze, key_padding_mask, 0)
    tgt, bsz = size(query, 0), size(query, 1)

    def as_float(mask, is_bool):  # _canonical_mask: a bool mask is -inf where True
        if mask is None or not is_bool:
            return mask
        zeros = f(torch.zeros_like, mask, dtype=f(getattr, query, "dtype"))
        return f(torch.masked_fill, zeros, mask, float("-inf"))

    key_padding_mask = as_float(key_padding_mask, facts.kpm_bool)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    mask_2d = facts.mask_dim == 2
    if is_causal and key_padding_mask is None and not need_weights and drop is None:
        attn_mask, mask_2d = None, False  # SDPA's own causal mask
    else:
        attn_mask = as_float(attn_mask, facts.mask_bool)
        is_causal = False  # the mask says it

    # in-projection: rows are [q heads | k heads | v heads], `width` each. Its inputs are made
    # contiguous: on a strided one torch's linear picks its kernel by whether the weight
    # requires grad, and a cut weight (no grad under no_grad) and a parameter would differ
    query = f(torch.Tensor.contiguous, query)
    key = query if facts.same_qk else f(torch.Tensor.contiguous, key)
    value = key if facts.same_kv else f(torch.Tensor.contiguous, value)
    if facts.same_qk and facts.same_kv:
        proj = f(torch.chunk, f(F.linear, query, in_proj_weight, in_proj_bias), 3, -1)
        q, k, v = (f(operator.getitem, proj, i) for i in range(3))
    else:
        ws = f(torch.chunk, in_proj_weight, 3)
        bs = f(torch.chunk, in_proj_bias, 3) if in_proj_bias is not None else None
        w = lambda i: f(operator.getitem, ws, i)  # noqa: E731
        b = lambda i: f(operator.getitem, bs, i) if bs is not None else None  # noqa: E731
        q = f(F.linear, query, w(0), b(0))
        k = f(F.linear, key, w(1), b(1))
        v = f(F.linear, value, w(2), b(2))

    if attn_mask is not None:
        if facts.mask_dim == 2:
            attn_mask = f(torch.unsqueeze, attn_mask, 0)
        elif heads != full_heads:  # [N * H, L, S]: the kept heads' masks
            per_head = f(torch.reshape, attn_mask, (bsz, full_heads, size(attn_mask, 1), size(attn_mask, 2)))
            kept = f(operator.getitem, per_head, (slice(None), slice(0, heads)))
            attn_mask = f(torch.reshape, kept, (f(operator.mul, bsz, heads), size(attn_mask, 1), size(attn_mask, 2)))
    if bias_k is not None:
        k = f(torch.cat, [k, f(torch.Tensor.repeat, bias_k, 1, bsz, 1)])
        v = f(torch.cat, [v, f(torch.Tensor.repeat, bias_v, 1, bsz, 1)])
        attn_mask = None if attn_mask is None else f(F.pad, attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else f(F.pad, key_padding_mask, (0, 1))
    rows = f(operator.mul, bsz, heads)
    q = f(torch.transpose, f(torch.reshape, q, (tgt, rows, head_dim)), 0, 1)
    k = f(torch.transpose, f(torch.reshape, k, (size(k, 0), rows, head_dim)), 0, 1)
    v = f(torch.transpose, f(torch.reshape, v, (size(v, 0), rows, head_dim)), 0, 1)
    if add_zero_attn:
        zeros = f(torch.zeros_like, f(operator.getitem, k, (slice(None), slice(0, 1))))
        k = f(torch.cat, [k, zeros], dim=1)
        v = f(torch.cat, [v, zeros], dim=1)
        attn_mask = None if attn_mask is None else f(F.pad, attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else f(F.pad, key_padding_mask, (0, 1))
    src = size(k, 1)
    if key_padding_mask is not None:
        kpm = f(torch.Tensor.expand, f(torch.reshape, key_padding_mask, (bsz, 1, 1, src)), -1, heads, -1, -1)
        kpm = f(torch.reshape, kpm, (rows, 1, src))
        attn_mask, mask_2d = (kpm, False) if attn_mask is None else (f(operator.add, attn_mask, kpm), mask_2d)

    if need_weights or drop is not None:
        q_scaled = f(operator.mul, q, math.sqrt(1.0 / float(head_dim)))
        kt = f(torch.transpose, k, -2, -1)
        scores = f(torch.bmm, q_scaled, kt) if attn_mask is None else f(torch.baddbmm, attn_mask, q_scaled, kt)
        weights = f(torch.softmax, scores, -1)
        if drop is not None:
            weights = drop(weights)
        out = f(torch.bmm, weights, v)  # [N * h, L, D]
        out = f(torch.reshape, f(torch.Tensor.contiguous, f(torch.transpose, out, 0, 1)),
                (f(operator.mul, tgt, bsz), width))
    else:
        weights = None
        if attn_mask is not None:
            attn_mask = (f(torch.unsqueeze, attn_mask, 0) if mask_2d
                         else f(torch.reshape, attn_mask, (bsz, heads, -1, src)))
        q4 = f(torch.reshape, q, (bsz, heads, tgt, head_dim))
        k4 = f(torch.reshape, k, (bsz, heads, src, head_dim))
        v4 = f(torch.reshape, v, (bsz, heads, src, head_dim))
        out = f(F.scaled_dot_product_attention, q4, k4, v4, attn_mask, 0.0, is_causal)
        out = f(torch.reshape, f(torch.Tensor.contiguous, f(torch.permute, out, (2, 0, 1, 3))),
                (f(operator.mul, bsz, tgt), width))
    out = f(F.linear, out, out_proj_weight, out_proj_bias)
    out = f(torch.reshape, out, (tgt, bsz, size(out, 1)))
    if need_weights:
        weights = f(torch.reshape, weights, (bsz, heads, tgt, src))
        if average_attn_weights:
            weights = f(torch.mean, weights, 1)
        if not facts.batched:
            weights = f(torch.squeeze, weights, 0)
    else:
        weights = None
    if not facts.batched:
        out = f(torch.squeeze, out, 1)
    elif batch_first:
        out = f(torch.transpose, out, 1, 0)
    return out, weights
