"""The CIFAR ResNet of examples/models/resnet_cifar.py with any number of BasicBlocks per
stage, `blocks <= (2, 2, 2, 2)`: the standalone models of SortedNet's depth sub-models.
Depth d of a sorted ResNet-18 keeps the first d of its 5 skippable blocks (layer1.0,
layer1.1, layer2.1, layer3.1, layer4.1), so depth 3 is `blocks: [2, 2, 1, 1]`."""
import importlib.util
from pathlib import Path

from torch import nn

_path = Path(__file__).resolve().parents[2] / "examples" / "models" / "resnet_cifar.py"
_spec = importlib.util.spec_from_file_location("fxgrow_experiments_resnet_cifar", _path)
resnet_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resnet_cifar)


def build(blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64, in_channels: int = 3) -> nn.Module:
    model = resnet_cifar.build(18, num_classes, width, in_channels)
    for name, n in zip(("layer1", "layer2", "layer3", "layer4"), blocks):
        stage = getattr(model, name)
        if not 1 <= n <= len(stage):
            raise ValueError(f"{name}: {n} blocks (1 to {len(stage)})")
        setattr(model, name, nn.Sequential(*list(stage)[:n]))
    return model
