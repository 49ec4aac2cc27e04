"""A small CNN for 8x8 to 32x32 images (digits, Fashion-MNIST, CIFAR): three conv-BN-ReLU
stages, global average pooling, one linear classifier. FX-traceable."""
from torch import nn


def _stage(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + [nn.MaxPool2d(2)] if pool else layers


def build(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    return nn.Sequential(
        *_stage(in_channels, width, pool=False),
        *_stage(width, 2 * width, pool=True),
        *_stage(2 * width, 4 * width, pool=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
