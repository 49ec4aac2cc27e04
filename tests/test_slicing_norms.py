"""Sorted slicing through norms other than BatchNorm (LayerNorm modules and functional ones,
RMSNorm, GroupNorm, timm's LayerNorm2d and BatchNormAct2d), parameters read directly (layer
scales, cls_token, pos_embed) and grouped convs (whole groups), on timm and torchvision
models nobody here wrote: the full width is the model, every sub-model equals its extracted
standalone model, and width 0.5 keeps about a quarter of the parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fxgrow.passes import Pipeline
from fxgrow.passes.sorted_slicing import SortedSlicingPass
from fxgrow.subnets import extract, find_state, subnet
from tests.test_coupling_norms import HandRMS

timm = pytest.importorskip("timm")


def tiny_regnet() -> nn.Module:
    """torchvision's RegNet (grouped 3x3 convs of group width 8, squeeze-excitation), small."""
    from torchvision.models.regnet import BlockParams, RegNet
    return RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8, w_m=2, group_width=8, se_ratio=0.25),
                  num_classes=10)


def tiny_resnext() -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4)


class NormMLP(nn.Module):
    """A residual token MLP through every kind of norm over the stream: LayerNorm (with and
    without affine), nn.RMSNorm, a hand-written RMSNorm, a functional layer norm of the model's
    own parameters, and a layer scale."""

    def __init__(self, d: int = 16, hand: bool = True):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d, elementwise_affine=False), nn.RMSNorm(d),
                                    HandRMS(d) if hand else nn.LayerNorm(d, bias=False)])
        self.w, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.gamma = nn.Parameter(torch.full((d,), 0.5))
        self.f = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(5))
        self.head = nn.Linear(d, 10)

    def forward(self, x):  # (N, tokens, 12)
        h = self.inp(x)
        for norm, f in zip(self.norms, self.f):
            h = h + f(norm(h))
        h = h + self.gamma * self.f[4](F.layer_norm(h, (h.shape[-1],), self.w, self.b))
        return self.head(h.mean(1))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 16)  # one group: statistics over every channel
        self.conv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn4 = nn.GroupNorm(4, 16)  # four groups: whole groups are kept
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.gn1(self.stem(x)))
        h = torch.relu(self.gn4(self.conv(h))) + h
        return self.head(h.mean((2, 3)))


def _timm(name: str, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


CASES = {  # name -> (build, input shape, largest share of parameters width 0.5 may keep)
    "timm_test_vit": (_timm("test_vit", img_size=32, dynamic_img_size=False), (3, 32, 32), 0.40),
    "timm_test_convnext": (_timm("test_convnext"), (3, 32, 32), 0.30),
    "timm_test_byobnet": (_timm("test_byobnet"), (3, 32, 32), 0.30),  # BatchNormAct2d
    "timm_test_efficientnet_gn": (_timm("test_efficientnet_gn"), (3, 32, 32), 0.32),  # GroupNormAct, functional
    "tv_regnet_tiny": (tiny_regnet, (3, 32, 32), 0.40),
    "tv_resnext_tiny": (tiny_resnext, (3, 32, 32), 0.30),
    "norm_mlp": (NormMLP, (5, 12), 0.32),
    "group_norm": (GroupNormNet, (3, 8, 8), 0.55),  # half its parameters sit in the stem and the head
}


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial statistics and affine parameters, so cutting them is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t.dim() == 1 and t.is_floating_point() and not isinstance(m, (nn.Linear, nn.Conv2d)):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name else
                            torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name in ("weight", "gamma") else 0))


def build(name: str, batch: int = 4):
    make, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = make()
    _randomize_norms(model)
    return model, torch.randn(batch, *shape)


def sliced(model: nn.Module, x: torch.Tensor, fractions=(0.25, 0.5, 1.0)):
    return Pipeline([SortedSlicingPass(width={"fractions": list(fractions)})])(model, example_input=x).graph_module


@pytest.mark.parametrize("name", list(CASES))
def test_full_width_is_the_model_and_every_width_equals_its_extracted_model(name):
    model, x = build(name)
    gm = sliced(model, x)
    for training in (False, True):
        model.train(training), gm.train(training)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    gm.eval()
    params = {}
    for point in find_state(gm).points:
        small = extract(gm, *point).eval()
        with subnet(gm, *point):
            expected = gm(x)
        torch.testing.assert_close(small(x), expected, rtol=0, atol=1e-5)
        assert not any("fxgrow" in k for k in small.state_dict())
        params[point[0]] = sum(p.numel() for p in small.parameters())
    assert params[0.25] < params[0.5] < params[1.0]
    share = params[0.5] / params[1.0]
    print(f"{name}: width 0.5 keeps {share:.3f} of {params[1.0]:,} parameters")
    assert share <= CASES[name][2]


@pytest.mark.parametrize("name", ["timm_test_byobnet", "tv_regnet_tiny"])
def test_training_mode_sub_model_equals_extracted(name):
    """Batch statistics and their running updates agree too (BatchNormAct2d, grouped convs)."""
    model, x = build(name, batch=6)
    gm = sliced(model, x).train()
    small = extract(gm, 0.5).train()
    with subnet(gm, 0.5):
        torch.testing.assert_close(small(x), gm(x), rtol=0, atol=1e-5)
        again = extract(gm, 0.5)
    for (k, v), (k2, v2) in zip(sorted(small.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=1e-6)


def test_batch_norm_act_keeps_its_activation():
    """timm's BatchNormAct2d stays a leaf of its own kind: the sliced twin and the extracted
    plain module run its activation (a plain BatchNorm2d would drop it)."""
    model, x = build("timm_test_byobnet")
    gm = sliced(model, x)
    path, original = next((p, m) for p, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"
                          and not isinstance(m.act, nn.Identity))
    for width in (0.5, 1.0):
        small = extract(gm, width)
        bn = small.get_submodule(path)
        assert type(bn) is type(original) and type(bn.act) is type(original.act)
        assert bn.num_features == (original.num_features if width == 1.0 else bn.weight.shape[0]) == bn.running_mean.shape[0]
    model.load_state_dict(extract(gm).state_dict())  # strict: the full width is the original


def test_grouped_convs_keep_whole_groups():
    model, x = build("tv_regnet_tiny")
    gm = sliced(model, x, fractions=(0.5, 1.0))
    small = extract(gm, 0.5)
    grouped = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped
    for path, conv in grouped:
        cut = small.get_submodule(path)
        assert cut.groups == (conv.groups + 1) // 2 and cut.weight.shape[1] == conv.weight.shape[1]  # group width kept
        assert cut.out_channels == cut.groups * conv.out_channels // conv.groups
    tiny_regnet().load_state_dict(extract(gm).state_dict())


def test_vit_residual_stream_and_cls_token_are_cut():
    model, x = build("timm_test_vit")
    gm = sliced(model, x, fractions=(0.5, 1.0))
    small = extract(gm, 0.5)
    dim = model.cls_token.shape[-1]
    assert small.cls_token.shape[-1] == small.pos_embed.shape[-1] == dim // 2
    assert small.get_submodule("blocks.0.norm1").weight.shape == (dim // 2,)
    assert small.get_submodule("blocks.0.attn.qkv").weight.shape[1] == dim // 2


def test_a_norm_without_a_sliced_twin_keeps_its_group_at_full_width():
    """A LayerNorm over tokens and channels has no sliced twin: its group stays whole, and the
    record says why."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b, self.head = nn.Linear(4, 8), nn.LayerNorm((3, 8)), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):  # (N, 3, 4)
            return self.head(torch.relu(self.b(self.ln(self.a(x)))).mean(1))

    result = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})])(Net(), example_input=torch.randn(2, 3, 4))
    kept = result.callbacks[0].summary["groups"]["full_width"]
    assert "layer_norm 'ln' (LayerNorm) cannot be sliced as it is configured" in kept.values()
    assert list(find_state(result.graph_module).full.values()) == [8]  # b's outputs are still cut


# --- the width warning and the checks a dry run makes ----------------------------------------

class Opaque(nn.Module):
    """A leaf the analysis knows nothing about: the stream it reads stays whole."""

    def forward(self, x):
        return x * 1.0


class HalfOpaque(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.inp, self.opaque = nn.Linear(8, d), Opaque()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(3))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.opaque(self.inp(x))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_width_one_half_that_keeps_most_parameters_warns_naming_the_whole_groups():
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"width 0.5 keeps 55% of the parameters .* left at full width: group 2 "
                                         r"\(32 channels of blocks.0.2, blocks.1.2\): unknown op Opaque \(opaque\); "
                                         r"group 1 \(32 channels of inp\)"):
        result = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})])(_leaf_traced(HalfOpaque()),
                                                                             example_input=x)
    share = result.callbacks[0].summary["params_share_at_width_0.5"]
    kept = sum(p.numel() for p in extract(result.graph_module, 0.5).parameters())
    full = sum(p.numel() for p in HalfOpaque().parameters())
    assert share == pytest.approx(kept / full, abs=1e-3) and share > 0.5


def _leaf_traced(model: nn.Module):
    from fxgrow.trace import trace
    return trace(model, leaf_modules=["Opaque"])


@pytest.mark.parametrize("name", ["timm_test_convnext", "timm_test_vit"])
def test_models_cut_through_their_norms_do_not_warn(name, recwarn):
    model, x = build(name)
    result = Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})])(model, example_input=x)
    assert not [w for w in recwarn if "sorted_slicing" in str(w.message)]
    share = result.callbacks[0].summary["params_share_at_width_0.5"]
    kept = sum(p.numel() for p in extract(result.graph_module, 0.5).parameters())
    assert share == pytest.approx(kept / sum(p.numel() for p in model.parameters()), abs=1e-3)


def test_the_dry_run_runs_the_sliceable_group_check():
    model = nn.Sequential(nn.Linear(4, 3))  # input and output channels only: nothing to cut
    with pytest.raises(Exception, match="no channel group can be sliced"):
        Pipeline([SortedSlicingPass(width={"fractions": [0.5, 1.0]})]).dry_run(model, example_input=torch.randn(2, 4))
