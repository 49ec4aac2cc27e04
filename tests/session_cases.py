"""Small specs, one per pass (and all five at once), and fxgrow's own run of each: what the
driver tests (plain loop, Lightning, HF) compare with. Digits, CPU, a few steps, tiny models.

`reference(case)` is what `fxgrow apply` runs (`api.run`: build the model seeded, compile the
spec, `Trainer.fit`), minus writing the folded model."""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

import fxgrow
from fxgrow.api import spec_dump
from fxgrow.train import Trainer
from fxgrow.train.data import Batches, epoch_permutation, load_data

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"

TRAIN = """
train:
  data: digits
  steps: {steps}
  batch_size: 64
  optimizer: {optimizer}
  schedule: {{name: cosine, warmup_steps: 2}}
  checkpoint: false
  progress: none
  eval_every_epochs: null
"""
SGD = "{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}"
ADAMW = "{name: adamw, lr: 3.0e-3, weight_decay: 0.01}"

CNN = "{example_input: [1, 1, 8, 8], kwargs: {width: 4}}"
CASES = {  # name: (model file, passes, steps, optimizer)
    "prune_regrow": ("small_cnn.py", f"""
model: {CNN}
passes:
  - {{kind: prune_regrow, preset: granet, final_sparsity: 0.8, schedule: {{start: 0.0, end: 0.7, every: 2}}}}
""", 10, SGD),
    "compander_sgd": ("small_cnn.py", f"""
model: {CNN}
passes:
  - {{kind: compander, a: 0.7, b: 0.8}}
""", 8, SGD),
    "compander_adamw_fix": ("small_cnn.py", f"""
model: {CNN}
passes:
  - {{kind: compander, learnable: layer, adaptive_fix: true}}
""", 8, ADAMW),
    "sorted_slicing": ("mlp.py", """
model: {example_input: [1, 1, 8, 8], kwargs: {hidden: 16}}
passes:
  - {kind: sorted_slicing, width: {fractions: [0.25, 0.5, 1.0]}, mode: sandwich, sub_models_per_batch: 3}
""", 8, SGD),
    "mixing_grow": ("small_cnn.py", f"""
model: {CNN}
passes:
  - {{kind: template_mixing, templates: 2, share: pairs}}
  - {{kind: grow, factor: 2, at: {{step: 4}}}}
""", 8, SGD),
    # growth's learning-rate restart (a callback's lr_factor) reaches the session's scheduler
    "grow_lr_restart": ("small_cnn.py", f"""
model: {CNN}
passes:
  - {{kind: template_mixing, templates: 2, share: pairs}}
  - {{kind: grow, factor: 2, at: {{epoch: 1}}, lr: {{base: 0.05, min: 0.0, cycles: 1, warmup_epochs: 0}}}}
""", 66, SGD),
    "all_passes": ("resnet_cifar.py", """
model: {example_input: [1, 1, 8, 8], kwargs: {width: 4, in_channels: 1}}
passes:
  - {kind: template_mixing, templates: 2, share: pairs, template_init: preserve}
  - {kind: compander}
  - {kind: prune_regrow, preset: granet, final_sparsity: 0.5, schedule: {start: 0.0, end: 0.8, every: 2}}
  - kind: sorted_slicing
    width: {fractions: [0.25, 0.5, 1.0]}
    depth: {blocks: [3, 5]}
    mode: stochastic
    sub_models_per_batch: 2
    bn: per_width
  - {kind: grow, factor: 2, at: {step: 4}}
""", 8, SGD),
}


def spec_of(name: str, steps: int | None = None) -> tuple[str, fxgrow.Spec]:
    """(model reference, spec) of case `name`, trained for `steps` (default: the case's)."""
    model, passes, default_steps, optimizer = CASES[name]
    text = f"version: 1\nname: {name}\n{passes}" + TRAIN.format(steps=steps or default_steps, optimizer=optimizer)
    return str(MODELS / model), fxgrow.parse_spec_text(text, source=name)


@lru_cache(maxsize=None)
def digits():
    return load_data(spec_of("prune_regrow")[1].train.data)


def steps_per_epoch(spec: fxgrow.Spec) -> int:
    return Batches(digits(), "train", spec.train.batch_size, torch.device("cpu")).steps_per_epoch


@lru_cache(maxsize=None)
def _reference(name: str, steps: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    ref, spec = spec_of(name, steps)
    result = fxgrow.compile_spec(spec, fxgrow.build_model(spec, ref))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(result.graph_module, spec.train, callbacks=result.callbacks, out_dir=out,
                          spec_dump=spec_dump(spec), data=digits())
        report = trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, report


def reference(name: str, steps: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Final state_dict and report of fxgrow's own Trainer on case `name` (cached)."""
    return _reference(name, steps or CASES[name][2])


def prepared_train():
    """The training split as model inputs (`Data.prepare` is elementwise, so preparing it at
    once gives the values fxgrow's loop prepares batch by batch) and targets."""
    data = digits()
    x, y = data.train
    return data.prepare(x), y


class EpochSampler(torch.utils.data.Sampler):
    """fxgrow's training order (`Batches.epoch`: a permutation seeded by (seed, epoch), the
    incomplete last batch dropped) as a per-example sampler with `set_epoch` (Lightning
    calls it on a loader's sampler; HF's Trainer too)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size * self.batch_size

    def __iter__(self):
        return iter(epoch_permutation(self.n, self.seed, self.epoch)[:len(self)].tolist())


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of two state_dicts that are not bit-identical (with their largest
    difference), or their key difference."""
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())[:4]}"]
    return [f"{k}: max |diff| {(a[k].double() - b[k].double()).abs().max().item():.3g}"
            for k in a if not torch.equal(a[k], b[k])]
