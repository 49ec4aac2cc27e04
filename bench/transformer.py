"""A pre-norm transformer encoder classifier (ViT-style) for CIFAR-shaped inputs cut into
patches: (batch, tokens, patch features) -> logits. Attention is q/k/v/out nn.Linear
around F.scaled_dot_product_attention, so every weight is an nn.Linear the passes can
rewrite; FX-traceable (no shape reads)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, in_features: int = 48, dim: int = 256, depth: int = 6, heads: int = 4,
                 mlp_ratio: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def build(in_features: int = 48, dim: int = 256, depth: int = 6, heads: int = 4, mlp_ratio: int = 4,
          classes: int = 10) -> nn.Module:
    return Transformer(in_features, dim, depth, heads, mlp_ratio, classes)
