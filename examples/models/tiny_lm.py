"""A tiny decoder-only language model (GPT-style, pre-LayerNorm) that torch.fx traces as
written: token + position embeddings, `layers` blocks of causal self-attention (separate
q/k/v/o projections of `heads` x `head_dim` channels, default dim / heads;
`F.scaled_dot_product_attention`) and a GELU MLP, a final norm and
an untied head. Input: token ids [batch, tokens]; output: logits [batch, tokens, vocab]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}: give head_dim")
            head_dim = dim // heads
        self.heads, self.dropout = heads, dropout
        # head_dim apart from dim / heads: a heads-sliced sub-model (fewer heads, same hidden size)
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t):  # [B, T, D] -> [B, heads, T, D / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 head_dim: int | None = None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout, head_dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int = 257, block_size: int = 128, dim: int = 64, heads: int = 4,
                 layers: int = 2, mlp_ratio: int = 4, dropout: float = 0.0, head_dim: int | None = None):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout, head_dim) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(positions))))


def build(vocab_size: int = 257, block_size: int = 128, dim: int = 64, heads: int = 4, layers: int = 2,
          mlp_ratio: int = 4, dropout: float = 0.0, head_dim: int | None = None) -> nn.Module:
    return TinyLM(vocab_size, block_size, dim, heads, layers, mlp_ratio, dropout, head_dim)
