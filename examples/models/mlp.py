"""A small MLP for 8x8 digits (input 1x8x8, flattened)."""
from torch import nn


def build(hidden: int = 128, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )
