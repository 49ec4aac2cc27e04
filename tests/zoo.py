"""The model zoo the tests share: small models covering the layer patterns passes meet."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """conv+BN CNN ending in flatten -> linear (no global pooling)."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """Stem, two stages of residual blocks (the second downsamples), pool, classifier."""

    def __init__(self, c: int = 8, classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(Block(c, c), Block(c, c))
        self.layer2 = nn.Sequential(Block(c, 2 * c, 2), Block(2 * c, 2 * c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Depthwise(nn.Module):
    """Depthwise-separable blocks (MobileNet style)."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.dw(x)))
        x = torch.relu(self.pw(x))
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, seq: int = 8, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.encoder = nn.TransformerEncoderLayer(d, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (N, seq, 8)
        return self.head(self.encoder(self.embed(x)).mean(1))


class Encoder(nn.Module):
    """Tokens -> nn.TransformerEncoder -> head; `norm_first` picks post-LN or pre-LN. Reads the
    synthetic [B, 1, 8, 8] images as 8 tokens of 8 features (for the training tests)."""

    def __init__(self, norm_first: bool = False, layers: int = 3, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(1))


class SharedLinear(nn.Module):
    """One module called twice: its weight must stay shared."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = torch.relu(self.inp(x.flatten(1)))
        x = torch.relu(self.shared(x))
        return self.head(torch.relu(self.shared(x)))


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    residual: bool = False

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch, *self.input_shape[1:]), generator=g)


ZOO = [
    ZooEntry("mlp", MLP, (1, 1, 8, 8)),
    ZooEntry("conv_bn", ConvBN, (1, 1, 8, 8)),
    ZooEntry("resnet_tiny", ResNetTiny, (1, 3, 16, 16), residual=True),
    ZooEntry("depthwise", Depthwise, (1, 3, 16, 16)),
    ZooEntry("shared_linear", SharedLinear, (1, 1, 8, 8)),
    ZooEntry("transformer", TinyTransformer, (1, 8, 8)),
    ZooEntry("resnet18", lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32), residual=True),
    ZooEntry("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), (1, 3, 32, 32)),
]
SMALL_ZOO = [e for e in ZOO if e.name not in ("resnet18", "mobilenet_v2")]
ZOO_IDS = [e.name for e in ZOO]
