"""A Wide ResNet as MixtureGrowth's CIFAR code builds it (`template_mixing_wrn_no_bank.py`,
plain convs here): a 3x3 stem, three stages of pre-activation blocks (BN-ReLU-conv3x3-
BN-ReLU-conv3x3, a 1x1 shortcut conv where the shape changes, fed by the first BN-ReLU),
a final BN-ReLU, global average pooling and a linear classifier. FX-traceable.

WRN-depth-width has (depth - 4) / 6 blocks a stage and widths [stem, 16w, 32w, 64w]. The
authors' small net halves every width, the stem's too: the target WRN-28-10 (stem 16) grows
from `build(28, 5, stem=8)`.
"""
from __future__ import annotations

from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin, stride) != (cout, 1) else None

    def forward(self, x):
        out = self.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + residual


def build(depth: int = 16, width: float = 1, num_classes: int = 10, in_channels: int = 1, stem: int = 16) -> nn.Module:
    if (depth - 4) % 6:
        raise ValueError(f"a WRN has depth 6n + 4 (got {depth})")
    blocks = (depth - 4) // 6
    channels = [stem, int(16 * width), int(32 * width), int(64 * width)]
    stages = []
    for i in range(3):
        cin, cout = channels[i], channels[i + 1]
        stages.append(nn.Sequential(*[Block(cin if b == 0 else cout, cout, (1 if i == 0 else 2) if b == 0 else 1)
                                      for b in range(blocks)]))
    return nn.Sequential(
        nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
        *stages,
        nn.BatchNorm2d(channels[3]), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(channels[3], num_classes),
    )
