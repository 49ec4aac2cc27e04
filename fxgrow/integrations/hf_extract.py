"""A SortedNet sub-model of a Hugging Face model as the same Hugging Face class.

    sizes = sub_model_sizes(model.config, sliced)        # read from the sliced tensors
    small = extract_hf(model, sliced)                    # type(model) from a smaller config
    small.save_pretrained(folder)                        # loads back with from_pretrained

`sliced` is the sub-model's state_dict as SortedNet slices it: the original keys minus the
dropped layers' (the first k entries of the layer list kept), every tensor a prefix of the
original along the sliced dimensions - the first h heads (h * head_dim rows of q/k/v and
columns of o; GQA: the first h / n_rep key/value heads), the first f FFN units, the first e
channels of the hidden stream (embeddings, norms, every projection reading or writing it,
the head). Loading is strict: every key of the smaller class, each of its shape.

What a config can express, per family (`FAMILIES`):
  llama    every (k, h, f, e) with h a multiple of n_rep: num_hidden_layers,
           num_attention_heads, num_key_value_heads = h / n_rep, intermediate_size,
           hidden_size, and head_dim set explicitly (the default hidden_size // heads would
           change it).
  gpt2     n_layer, n_inner, and n_embd / n_head only together, with e == h * head_dim:
  bert     GPT2Attention's head size is n_embd // n_head (BertSelfAttention's
           hidden_size // num_attention_heads), so h heads of the original head size in a
           hidden stream of another width have no config.
Anything else is refused naming the config field and why (FxgrowError); write the plain
sliced GraphModule (`fxgrow extract`) instead.

`write_pretrained(original, small, example, folder)` is what `fxgrow extract` does for a
run of a Hugging Face model: the extracted GraphModule `small` as the original class, its
outputs checked against `small`'s on the example input, then `save_pretrained(folder)`
(config.json + weights: `AutoModelFor....from_pretrained(folder)` loads it, offline).

Imports transformers only when a model is built (the size functions read configs and
tensors)."""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import FxgrowError


@dataclass(frozen=True)
class SubModelSizes:
    """A sub-model of a transformer: the first `layers` layers, `heads` attention heads (of
    the original head size), `kv_heads` key/value heads (GQA; == heads without it), `ffn`
    FFN units per layer, `hidden` channels of the residual stream."""

    layers: int
    heads: int
    kv_heads: int
    ffn: int
    hidden: int


@dataclass(frozen=True)
class Family:
    """How one model family's config and state_dict say its sizes.

    `fields` names the config field of each size; `layer` matches a key of a layer of the
    layer list (group 1: its index); `probes` find each size in the state_dict: (key suffix,
    dim, divisor) - the size is `tensor.shape[dim] // divisor(config)`, read from layer 0
    and checked on every kept layer."""

    name: str
    fields: dict[str, str]
    layer: str
    probes: dict[str, tuple[str, int, Callable[[Any], int]]]
    head_dim: Callable[[Any], int]
    joint_hidden: bool  # head size = hidden // heads in the family's code


def _llama_head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _gpt2_head_dim(cfg) -> int:
    return cfg.n_embd // cfg.n_head


def _bert_head_dim(cfg) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def _one(cfg) -> int:
    return 1


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
         "ffn": "intermediate_size", "hidden": "hidden_size"},
        r"(?:^|\.)layers\.(\d+)\.",
        {"heads": ("self_attn.q_proj.weight", 0, _llama_head_dim),
         "kv_heads": ("self_attn.k_proj.weight", 0, _llama_head_dim),
         "ffn": ("mlp.up_proj.weight", 0, _one),
         "hidden": ("input_layernorm.weight", 0, _one)},
        _llama_head_dim, joint_hidden=False),
    "gpt2": Family(
        "gpt2",
        {"layers": "n_layer", "heads": "n_head", "kv_heads": "n_head", "ffn": "n_inner", "hidden": "n_embd"},
        r"(?:^|\.)h\.(\d+)\.",
        {"heads": ("attn.c_attn.weight", 1, lambda cfg: 3 * _gpt2_head_dim(cfg)),  # Conv1D [in, 3 * heads * D]
         "ffn": ("mlp.c_fc.weight", 1, _one),
         "hidden": ("ln_1.weight", 0, _one)},
        _gpt2_head_dim, joint_hidden=True),
    "bert": Family(
        "bert",
        {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_attention_heads",
         "ffn": "intermediate_size", "hidden": "hidden_size"},
        r"(?:^|\.)encoder\.layer\.(\d+)\.",
        {"heads": ("attention.self.query.weight", 0, _bert_head_dim),
         "ffn": ("intermediate.dense.weight", 0, _one),
         "hidden": ("attention.output.LayerNorm.weight", 0, _one)},
        _bert_head_dim, joint_hidden=True),
}


def family_of(config) -> Family:
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise FxgrowError(f"Hugging Face extract: no rule for model_type {kind!r} ({type(config).__name__}); "
                          f"known: {', '.join(FAMILIES)}. Write the plain sliced GraphModule instead "
                          "(fxgrow extract)")
    return FAMILIES[kind]


def model_sizes(config) -> SubModelSizes:
    """The full model's sizes, from its config."""
    fam = family_of(config)
    values = {size: getattr(config, field) for size, field in fam.fields.items()}
    if fam.name == "gpt2" and values["ffn"] is None:  # GPT2MLP: n_inner or 4 * n_embd
        values["ffn"] = 4 * config.n_embd
    return SubModelSizes(**values)


def sub_model_sizes(config, state_dict: Mapping[str, torch.Tensor]) -> SubModelSizes:
    """The sizes of the sub-model whose sliced tensors `state_dict` holds, read against the
    original `config` (head size, GQA ratio). Refused when the kept layers are not the first
    k, when layers disagree (a config has one size per dimension) or a tensor is not a
    whole number of heads."""
    fam = family_of(config)
    layer_re = re.compile(fam.layer)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = layer_re.search(key)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[key[m.end():]] = tensor
    k = len(per_layer)
    if sorted(per_layer) != list(range(k)):
        raise FxgrowError(f"Hugging Face extract: the state_dict keeps layers {sorted(per_layer)}; a "
                          f"{fam.fields['layers']} config runs the first k layers, so the kept layers must be "
                          "0..k-1")
    if k == 0:
        raise FxgrowError(f"Hugging Face extract: the state_dict holds no layer (no key matches {fam.layer!r})")
    read: dict[str, int] = {}
    for size, (suffix, dim, divisor) in fam.probes.items():
        d = divisor(config)
        seen = {}
        for i, tensors in per_layer.items():
            if suffix not in tensors:
                raise FxgrowError(f"Hugging Face extract: layer {i} has no {suffix} in the state_dict")
            n = tensors[suffix].shape[dim]
            if n % d:
                what = (f"the head size {d}" if d == fam.head_dim(config)
                        else f"{d} (q|k|v side by side: 3 x the head size {fam.head_dim(config)})")
                raise FxgrowError(f"Hugging Face extract: layer {i} {suffix} has {n} on dim {dim}, not a multiple "
                                  f"of {what}")
            seen[i] = n // d
        if len(set(seen.values())) > 1:
            raise FxgrowError(f"Hugging Face extract: layers differ in {size} ({seen}); a config "
                              f"({fam.fields[size]}) gives every layer the same")
        read[size] = seen[0]
    read.setdefault("kv_heads", read["heads"])  # no GQA in the family
    return SubModelSizes(layers=k, **read)


def sub_config(config, sizes: SubModelSizes):
    """A copy of `config` for the sub-model `sizes`, or a refusal naming the field that
    cannot say it."""
    fam, full = family_of(config), model_sizes(config)
    for size in ("layers", "heads", "kv_heads", "ffn", "hidden"):
        value = getattr(sizes, size)
        if not 0 < value <= getattr(full, size):
            raise FxgrowError(f"Hugging Face extract: {size} {value} is not in 1..{getattr(full, size)} "
                              f"({fam.fields[size]} of the original)")
    d, cfg = fam.head_dim(config), copy.deepcopy(config)
    if fam.joint_hidden:
        if sizes.hidden != sizes.heads * d:
            field = fam.fields["heads"] if sizes.heads != full.heads else fam.fields["hidden"]
            raise FxgrowError(
                f"Hugging Face extract: {type(config).__name__}.{field}: {sizes.heads} heads of {d} channels in a "
                f"hidden size of {sizes.hidden} have no {fam.name} config - its attention's head size is "
                f"{fam.fields['hidden']} // {fam.fields['heads']}, so heads and hidden size shrink only together "
                f"(hidden = heads x {d}). Write the plain sliced GraphModule instead (fxgrow extract)")
        cfg_values = {"layers": sizes.layers, "heads": sizes.heads, "ffn": sizes.ffn, "hidden": sizes.hidden}
    else:
        n_rep = full.heads // full.kv_heads
        if sizes.heads % n_rep or sizes.kv_heads != sizes.heads // n_rep:
            raise FxgrowError(
                f"Hugging Face extract: {type(config).__name__}.num_key_value_heads: {sizes.heads} query heads "
                f"with {sizes.kv_heads} key/value heads; the original shares each key/value head among {n_rep} "
                f"query heads (head j reads key/value head j // {n_rep}), so the first h query heads need the "
                f"first h / {n_rep} key/value heads, h a multiple of {n_rep}")
        cfg_values = {"layers": sizes.layers, "heads": sizes.heads, "kv_heads": sizes.kv_heads,
                      "ffn": sizes.ffn, "hidden": sizes.hidden}
        cfg.head_dim = d  # explicit: a config without it computes hidden_size // num_attention_heads
    for size, value in cfg_values.items():
        setattr(cfg, fam.fields[size], value)
    if fam.name == "llama" and getattr(cfg, "layer_types", None):  # one attention kind per kept layer
        cfg.layer_types = list(cfg.layer_types)[: sizes.layers]
    return cfg


def extract_hf(source, state_dict: Mapping[str, torch.Tensor], sizes: SubModelSizes | None = None,
               model_class: type | None = None):
    """The sub-model as `model_class` (default: type(source)) built from `sub_config` and
    loaded strictly with `state_dict` (its sizes read by `sub_model_sizes` unless given).
    `source`: the original `PreTrainedModel`, or its config with `model_class`. Returned in
    eval mode, in the state_dict's floating dtype. Tied parameters (GPT-2's wte / lm_head)
    must hold equal tensors."""
    config = getattr(source, "config", source)
    cls = model_class or (type(source) if hasattr(source, "config") else None)
    if cls is None:
        raise FxgrowError("Hugging Face extract: given a config, name the class too (model_class=...)")
    sizes = sizes or sub_model_sizes(config, state_dict)
    small = cls(sub_config(config, sizes))
    expected = small.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {tuple(state_dict[k].shape)}, the {cls.__name__} of {sizes} has {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise FxgrowError("Hugging Face extract: the state_dict does not fit the smaller config: "
                          + "; ".join(filter(None, [f"missing {missing[:4]}" if missing else "",
                                                    f"unexpected {unexpected[:4]}" if unexpected else "",
                                                    *wrong[:4]])))
    by_tensor: dict[int, list[str]] = {}
    for name, p in small.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    for names in by_tensor.values():
        if len(names) > 1 and not all(torch.equal(state_dict[names[0]], state_dict[n]) for n in names[1:]):
            raise FxgrowError(f"Hugging Face extract: {names} are one tied parameter in {cls.__name__} but the "
                              "state_dict holds different tensors for them")
    floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    if floats:
        small = small.to(floats[0])
    small.load_state_dict(dict(state_dict), strict=True)
    return small.eval()


def is_pretrained(model: Any) -> bool:
    """Whether `model` is a Hugging Face `PreTrainedModel` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _outputs(result: Any) -> torch.Tensor:
    """The tensor the export front-end keeps of a Hugging Face output: its logits."""
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result[0]


def write_pretrained(original, small: torch.nn.Module, example: Any, folder) -> Any:
    """`small` (a plain sub-model GraphModule with the original's state_dict keys) as the
    original's class (`extract_hf`), saved with `save_pretrained(folder)`; returned. Before
    anything is written its outputs on `example` (a tensor, or an object with `args` and
    `kwargs`) must equal `small`'s (to fp32 rounding; exact in practice): a class that reads
    the smaller config differently from the slicing is refused, naming the difference."""
    hf = extract_hf(original, small.state_dict())
    args, kwargs = ((example,), {}) if isinstance(example, torch.Tensor) else (tuple(example.args), dict(example.kwargs))
    with torch.no_grad():
        want, got = _outputs(small.eval()(*args, **kwargs)), _outputs(hf(*args, **kwargs))
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
        diff = (want - got).abs().max().item() if want.shape == got.shape else f"shapes {tuple(got.shape)}"
        raise FxgrowError(f"Hugging Face extract: {type(hf).__name__} from the smaller config computes other "
                          f"outputs than the extracted sub-model on the example input (max abs diff {diff}); "
                          "not written")
    hf.save_pretrained(folder)
    return hf


__all__ = ["FAMILIES", "Family", "SubModelSizes", "extract_hf", "family_of", "is_pretrained", "model_sizes",
           "sub_config", "sub_model_sizes", "write_pretrained"]
