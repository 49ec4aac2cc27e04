"""Width-0.5 parameter shares and 50% filter pruning on ViT/ConvNeXt/RegNet/ResNeXt (issue 13).

    python bench/norms_and_groups.py [regnet_y_400mf resnext50_32x4d convnext_tiny convnext_atto vit_tiny]

For each model: the share of parameters the width-0.5 sub-model of sorted slicing keeps
(extracted, so physically smaller), and the parameters left after filter pruning at 50% of
every channel group (scope: layer, classifier outputs kept) with `fold --shrink`'s export,
checked against the masked model. Torch-Pruning's figures for the same models (1.6.1, magnitude
importance, ratio 0.5) are in docs/DECISIONS.md and README.md.
"""
from __future__ import annotations

import sys
import time

import torch
import torchvision

from fxgrow.passes import Pipeline
from fxgrow.passes.prune_regrow import PruneRegrowPass
from fxgrow.passes.prune_regrow_filters import export_pruned, filter_groups, masked_norms, prune_channels
from fxgrow.passes.prune_regrow_masks import masked_weights
from fxgrow.passes.sorted_slicing import SortedSlicingPass
from fxgrow.subnets import extract


def _timm(name: str, **kw):
    import timm
    return lambda: timm.create_model(name, pretrained=False, **kw)


MODELS = {
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(),  # 1000 classes, as the issue counted
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "convnext_atto": _timm("convnext_atto", num_classes=10),
    "vit_tiny": _timm("vit_tiny_patch16_224", img_size=64, num_classes=10),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 64, 64)
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]().train()
        start = time.perf_counter()
        sliced = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})])(model, example_input=x).graph_module
        share = count(extract(sliced, 0.5)) / count(model)
        result = PruneRegrowPass(final_sparsity=0.5, granularity="filter", scope="layer",
                                 schedule={"start": 0.0, "end": 0.5, "every": 10})(model, example_input=x)
        gm = result.graph_module
        prune_channels(filter_groups(masked_weights(gm), result.callbacks[0].channel_uses, masked_norms(gm)), 0.5,
                       "layer")
        gm.eval()
        small = export_pruned(gm, x).eval()
        with torch.no_grad():
            y = gm(x)
            error = float((small(x) - y).abs().max() / y.abs().max())
        print(f"{name}: width 0.5 keeps {share:.3f}; 50% filter pruning {count(model):,} -> {count(small):,} "
              f"params (shrunk vs masked: {error:.1e} relative); {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
