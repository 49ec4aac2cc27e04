"""Optimizer and learning-rate schedule from the spec, with parameter groups that
callbacks ask for, and rebuilding both for a replaced model."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..specs.train import AdamWSpec, OptimizerSpec, ScheduleSpec, SGDSpec


def optimizer_options(spec: OptimizerSpec) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if isinstance(spec, SGDSpec):
        return torch.optim.SGD, dict(lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                     weight_decay=spec.weight_decay)
    if isinstance(spec, AdamWSpec):
        return torch.optim.AdamW, dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                                       weight_decay=spec.weight_decay)
    raise TypeError(f"unknown optimizer spec {spec!r}")


def merge_overrides(model: nn.Module, per_callback: Iterable[tuple[str, dict[str, dict[str, Any]]]]
                    ) -> dict[str, dict[str, Any]]:
    """One {param name: options} from every callback's `param_group_overrides`; two
    callbacks setting one option of one parameter differently is an error."""
    names = {n for n, _ in model.named_parameters()}
    merged: dict[str, dict[str, Any]] = {}
    owner: dict[tuple[str, str], str] = {}
    for who, overrides in per_callback:
        for name, options in overrides.items():
            if name not in names:
                raise ValueError(f"callback {who!r}: param_group_overrides names {name!r}, not a parameter of the model")
            for key, value in options.items():
                previous = merged.setdefault(name, {}).get(key, value)
                if previous != value:
                    raise ValueError(f"callbacks {owner[name, key]!r} and {who!r} set {key} of {name!r} "
                                     f"to {previous!r} and {value!r}")
                merged[name][key] = value
                owner.setdefault((name, key), who)
    return merged


def param_groups(model: nn.Module, overrides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by their overrides (in first-seen order, so the
    grouping is deterministic and a checkpoint's optimizer state loads back)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        options = overrides.get(name, {})
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        groups.setdefault(key, {"params": [], **options})["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, spec: OptimizerSpec, overrides: dict[str, dict[str, Any]]
                    ) -> torch.optim.Optimizer:
    cls, defaults = optimizer_options(spec)
    return cls(param_groups(model, overrides), **defaults)


def lr_factor(spec: ScheduleSpec, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of each group's base learning rate for optimizer step t (0-based)."""
    warmup = spec.warmup_steps if spec.warmup_steps is not None else round(spec.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)
    milestones = [round(m * steps_per_epoch) for m in spec.milestones]

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        if spec.name == "cosine":
            progress = (t - warmup) / max(1, total_steps - warmup)
            return spec.min_factor + (1 - spec.min_factor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if spec.name == "multistep":
            return spec.gamma ** sum(t >= m for m in milestones)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float], step: int) -> LambdaLR:
    """A LambdaLR positioned at `step` (the next optimizer step takes factor(step))."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, factor, last_epoch=step - 1)


def transfer_state(old: torch.optim.Optimizer, old_params: dict[str, nn.Parameter], new: torch.optim.Optimizer,
                   new_params: dict[str, nn.Parameter], param_map: dict[str, str] | None) -> list[str]:
    """Give each new parameter the optimizer state of the old parameter it continues:
    `param_map[new name]` when given, else the parameter of the same name. State moves
    only between equal shapes (an explicit mapping between different shapes is an
    error). Returns the names of new parameters that kept state."""
    param_map = param_map or {}
    kept = []
    for name, p in new_params.items():
        source = param_map.get(name, name)
        q = old_params.get(source)
        if q is None or q not in old.state:
            if name in param_map and q is None:
                raise ValueError(f"replace_model: param_map maps {name!r} to {source!r}, not an old parameter")
            continue
        if q.shape != p.shape:
            if name in param_map:
                raise ValueError(f"replace_model: param_map maps {name!r} {tuple(p.shape)} to {source!r} "
                                 f"{tuple(q.shape)}; optimizer state needs equal shapes")
            continue
        new.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v for k, v in old.state[q].items()}
        kept.append(name)
    return kept
