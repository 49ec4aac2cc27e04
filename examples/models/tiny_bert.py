"""A tiny BERT-style text classifier: Hugging Face's BertForSequenceClassification built from
a BertConfig (post-LayerNorm encoder, learned positions, a pooler and a linear classifier;
nothing downloaded). torch.fx cannot trace it (transformers' forward is a `*args, **kwargs`
wrapper), so its specs say `model.frontend: export`. Input: token ids [batch, tokens] (full
blocks, no padding, so no attention mask); output: a SequenceClassifierOutput whose `logits`
[batch, labels] the export front-end keeps."""
from __future__ import annotations

from torch import nn


def config(vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
           block_size: int = 64, labels: int = 2, dropout: float = 0.0):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=block_size, num_labels=labels,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0)


def build(vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128,
          block_size: int = 64, labels: int = 2, dropout: float = 0.0) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(
        config(vocab_size, hidden, layers, heads, ffn, block_size, labels, dropout))
