"""The `train:` section of a spec (owned by the training loop)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel


class OptimizerSpec(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)


class TrainSpec(StrictModel):
    data: str = "digits"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
