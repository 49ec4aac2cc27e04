"""The zoo (issue 13): models from torchvision and timm nobody here tuned to, each built in
train mode as `fxgrow apply` builds it and rewritten by preserving passes with default
targets (the compander with its exact inverse init, prune_regrow's all-ones masks). For each:
the rewritten model equals the original in eval and in train mode (same random numbers), the
fold equals it too and its state_dict loads strictly into a freshly built original, and
default targets cover at least 99% of the weight-matrix parameters unless the row says why
(the test checks that reason is the one reported); or the model is refused with an
FxgrowError whose message the row gives. Run with `-s` to see each row's coverage."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import timm
import torch
import torchvision
from torch import nn

from fxgrow import api
from fxgrow.errors import FxgrowError
from fxgrow.fold import fold
from fxgrow.specs.root import parse_spec

def tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


def tm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kw)


def tv_vit_small() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


def timm_mixer_small() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (2 layers, dropout) over patch tokens."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 8, 8)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.enc(t).mean(1))


class HandRMS(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSMLP(nn.Module):
    """A residual MLP with torch's nn.RMSNorm and a hand-written one."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.inp = nn.Linear(3 * 16 * 16, d)
        self.n1, self.f1 = nn.RMSNorm(d), nn.Linear(d, d)
        self.n2, self.f2 = HandRMS(d), nn.Linear(d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        h = h + self.f1(self.n1(h))
        h = h + self.f2(self.n2(h))
        return self.head(h)


@dataclass(frozen=True)
class Row:
    name: str
    build: Callable[[], nn.Module]
    size: int = 64                 # input: (2, 3, size, size)
    slow: bool = False
    min_share: float = 0.99        # of the weight-matrix parameters default targets cover
    why: str = ""                  # below 0.99: a phrase of the reason report.json gives
    refused: str = ""              # a phrase of the FxgrowError the model is refused with


C10 = {"num_classes": 10}
ROWS = [
    # --- the default run: one of every kind of model, at the lowest cost ---
    Row("tv_mobilenet_v3_small", tv("mobilenet_v3_small", **C10)),          # depthwise, SE, hardswish, nn.Dropout
    Row("tv_squeezenet1_1", tv("squeezenet1_1", **C10)),                    # concat
    Row("tv_shufflenet_v2_x0_5", tv("shufflenet_v2_x0_5", **C10)),          # channel shuffle
    Row("tv_efficientnet_b0", tv("efficientnet_b0", **C10)),                # StochasticDepth (reads self.training)
    Row("tv_regnet_y_400mf", tv("regnet_y_400mf", **C10)),                  # grouped convs, SE
    Row("tv_vit_small", tv_vit_small, size=32),                             # nn.MultiheadAttention, class token
    Row("torch_encoder", TorchEncoder, size=32),                            # nn.TransformerEncoder(Layer)
    Row("rms_mlp", RMSMLP, size=16),                                        # nn.RMSNorm, a hand-written RMSNorm
    Row("timm_test_efficientnet", tm("test_efficientnet", **C10)),          # BatchNormAct2d (reads self.training)
    Row("timm_test_byobnet", tm("test_byobnet", **C10)),
    Row("timm_test_resnet", tm("test_resnet", **C10)),
    Row("timm_test_convnext", tm("test_convnext", **C10)),                  # LayerNorm2d, layer scale
    Row("timm_test_vit", tm("test_vit", dynamic_img_size=False, img_size=64, **C10)),  # timm Attention
    Row("timm_test_vit_drop", tm("test_vit", dynamic_img_size=False, img_size=64, drop_rate=0.1,
                                 attn_drop_rate=0.1, drop_path_rate=0.1, **C10)),  # DropPath, mode-selected dropout_p
    Row("timm_mobilenetv3_small_050", tm("mobilenetv3_small_050", **C10)),  # timm.layers.Linear classifier
    Row("timm_mixer_small", timm_mixer_small, size=32),                     # MLP-Mixer
    Row("timm_test_nfnet", tm("test_nfnet", **C10), min_share=0.05,
        why="computed weight: the parameter passes through Tensor.reshape -> batch_norm"),  # ScaledStdConv2d
    Row("timm_mobilevit_xxs", tm("mobilevit_xxs", **C10),
        refused="cannot trace module 'stages.2.1' (MobileVitBlock)"),
    Row("timm_test_vit_dynamic", tm("test_vit", **C10), refused="cannot trace module '<root>' (VisionTransformer)"),
    Row("tv_googlenet_aux", tv("googlenet", aux_logits=True, init_weights=True, **C10),
        refused="cannot trace the root (GoogLeNet) for both train() and eval(): it reads self.training"),
    # --- slow ---
    Row("tv_resnet18", tv("resnet18", **C10), slow=True),
    Row("tv_resnet50", tv("resnet50", **C10), slow=True),
    Row("tv_resnext50_32x4d", tv("resnext50_32x4d", **C10), slow=True),
    Row("tv_mobilenet_v2", tv("mobilenet_v2", **C10), slow=True),
    Row("tv_mnasnet0_5", tv("mnasnet0_5", **C10), slow=True),               # a version-dependent state_dict loader
    Row("tv_densenet121", tv("densenet121", **C10), slow=True),
    Row("tv_convnext_tiny", tv("convnext_tiny", **C10), slow=True),
    Row("tv_vit_b_16", tv("vit_b_16", image_size=64, **C10), slow=True),
    Row("tv_swin_t", tv("swin_t", **C10), slow=True, min_share=0.68,
        why="read by shifted_window_attention"),  # torchvision passes qkv/proj weights to an fx.wrap'ed function
    Row("timm_resnet18", tm("resnet18", **C10), slow=True),
    Row("timm_efficientnet_b0", tm("efficientnet_b0", **C10), slow=True),
    Row("timm_efficientnet_b0_drop", tm("efficientnet_b0", drop_rate=0.2, drop_path_rate=0.1, **C10), slow=True),
    Row("timm_regnety_002", tm("regnety_002", **C10), slow=True),
    Row("timm_resnext26ts", tm("resnext26ts", **C10), slow=True),
    Row("timm_convnext_atto", tm("convnext_atto", **C10), slow=True),
    Row("timm_convnext_atto_rms", tm("convnext_atto_rms", **C10), slow=True),
    Row("timm_ghostnet_050", tm("ghostnet_050", **C10), slow=True),          # root F.dropout(training=self.training)
    Row("timm_poolformer_s12", tm("poolformer_s12", **C10), slow=True),
    Row("timm_vit_tiny", tm("vit_tiny_patch16_224", img_size=64, **C10), slow=True),
    Row("timm_vit_tiny_drop", tm("vit_tiny_patch16_224", img_size=64, drop_rate=0.1, attn_drop_rate=0.1,
                                 drop_path_rate=0.1, **C10), slow=True),
    Row("timm_deit_tiny", tm("deit_tiny_patch16_224", img_size=64, **C10), slow=True),
    Row("timm_mixer_s32", tm("mixer_s32_224", img_size=64, **C10), slow=True),
    Row("timm_resmlp_12", tm("resmlp_12_224", img_size=64, **C10), slow=True),
    Row("timm_swin_tiny", tm("swin_tiny_patch4_window7_224", img_size=64, window_size=4, **C10), slow=True),
    Row("timm_nf_resnet26", tm("nf_resnet26", **C10), slow=True, min_share=0.0,
        why="computed weight: the parameter passes through Tensor.reshape -> batch_norm"),
    Row("timm_levit_128s", tm("levit_128s", img_size=64, **C10), slow=True,
        refused="cannot trace 'stages.0.blocks.0.attn' (Attention) for both train() and eval()"),
]
PARAMS = [pytest.param(r, id=r.name, marks=[pytest.mark.slow] if r.slow else []) for r in ROWS]

# Preserving rewrites, default targets: every weight matrix.
PASSES = [{"kind": "compander", "a": 4.0, "b": 1.0}, {"kind": "prune_regrow", "final_sparsity": 0.5}]
TOL = {"eval": 1e-5, "train": 1e-4}  # max |a - b| / max |b|; train: batch statistics over 2 samples


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensor_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def difference(model: nn.Module, reference: nn.Module, x: torch.Tensor, mode: str) -> float:
    """Relative difference of the outputs in `mode`, the same random numbers for both, on
    copies (train mode updates running statistics)."""
    model, reference = copy.deepcopy(model), copy.deepcopy(reference)
    outputs = []
    for m in (reference, model):
        getattr(m, mode)()
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(tensor_of(m(x)))
    ref, got = outputs
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("row", PARAMS)
def test_zoo_row(row: Row):
    spec = parse_spec({"model": {"example_input": [1, 3, row.size, row.size]}, "passes": PASSES})
    torch.manual_seed(0)
    model = row.build()
    assert model.training  # as `apply` builds it
    x = torch.randn(2, 3, row.size, row.size, generator=torch.Generator().manual_seed(0))
    if row.refused:
        with pytest.raises(FxgrowError) as info:
            api.compile_spec(spec, model)
        assert row.refused in str(info.value)
        print(f"\nzoo {row.name}: refused: {str(info.value).splitlines()[0]}")
        return
    result = api.compile_spec(spec, model)
    gm = result.graph_module
    rewritten = {mode: difference(gm, model, x, mode) for mode in ("eval", "train")}
    folded = fold(gm)
    state = copy.deepcopy(folded.state_dict())
    folded_diff = {mode: difference(folded, model, x, mode) for mode in ("eval", "train")}
    coverage = result.coverage()["passes.0"]
    print(f"\nzoo {row.name}: default targets cover {coverage['share']:.2%} of the weight-matrix parameters "
          f"({coverage['rewritten']}/{coverage['weights']} matrices); rewritten vs original "
          f"eval {rewritten['eval']:.1e} train {rewritten['train']:.1e}; folded eval {folded_diff['eval']:.1e} "
          f"train {folded_diff['train']:.1e}")
    for mode, tol in TOL.items():
        assert rewritten[mode] <= tol and folded_diff[mode] <= tol, (mode, rewritten, folded_diff)
    torch.manual_seed(1)
    row.build().load_state_dict(state, strict=True)
    assert coverage["share"] >= row.min_share
    if coverage["share"] < 0.99:
        assert row.why and any(row.why in r["reason"] for r in coverage["untouched"]), coverage["untouched"][:3]
    assert all(r["reason"] for r in coverage["untouched"])  # nothing left without a reason
    assert coverage == {**result.coverage()["passes.1"], "kind": "compander"}  # both passes: the same layers
