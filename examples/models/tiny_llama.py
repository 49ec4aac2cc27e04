"""A tiny LLaMA-style causal LM: Hugging Face's LlamaForCausalLM built from a LlamaConfig
(nothing downloaded). torch.fx cannot trace it (transformers' forward is a `*args, **kwargs`
wrapper), so its specs say `model.frontend: export`. Input: token ids [batch, tokens];
output: a CausalLMOutputWithPast whose `logits` the export front-end keeps."""
from __future__ import annotations

from torch import nn


def config(vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
           ffn: int = 192, block_size: int = 128, dropout: float = 0.0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=block_size,
                       attention_dropout=dropout, tie_word_embeddings=False, use_cache=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build(vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          ffn: int = 192, block_size: int = 128, dropout: float = 0.0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config(vocab_size, hidden, layers, heads, kv_heads, ffn, block_size, dropout))
