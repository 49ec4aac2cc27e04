"""Sorted slicing: spec and model errors, exact equivalence at full size, every grid point's
sliced model against its extracted standalone model, coupled channels, depth gates, BN
statistics, composition with other producers, and the sub-model sampling plan."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fxgrow.errors import FxgrowError, PassError, SpecError
from fxgrow.fold import fold
from fxgrow.ir import weight_chains
from fxgrow.nn.mask import MaskProducer
from fxgrow.nn.slicing import DimLayout, Segment, SlicedBatchNorm, SliceProducer, active_channels
from fxgrow.passes import Pipeline
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.prune_regrow import PruneRegrowPass
from fxgrow.passes.template_mixing import TemplateMixingPass
from fxgrow.passes.sorted_slicing import SortedSlicingCallback, SortedSlicingPass, SortedSlicingSpec
from fxgrow.specs.root import parse_spec
from fxgrow.subnets import extract, find_state, preserved_norm_stats, recalibrate, subnet

from .zoo import MLP, ConvBN, Depthwise, ResNetTiny, SharedLinear

FRACTIONS = [0.25, 0.5, 0.75, 1.0]


def sliced(model: nn.Module, x: torch.Tensor, passes=(), **fields):
    fields.setdefault("width", {"fractions": FRACTIONS})
    return Pipeline([*passes, SortedSlicingPass(**fields)])(model, example_input=x).graph_module


class ConcatNet(nn.Module):
    """Two branches concatenated into one BN and conv: each dim holds two sliced groups
    side by side, so the kept channels are not a prefix (the index_select path)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(3, c + 2, 1)
        self.bn = nn.BatchNorm2d(2 * c + 2)
        self.conv = nn.Conv2d(2 * c + 2, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        y = F.max_pool2d(torch.relu(self.conv(y)), 2)
        return self.fc(y.flatten(1))


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP: LayerNorm slicing and skippable blocks without convs."""

    def __init__(self, d: int = 16, blocks: int = 3):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.inp(x.flatten(1))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


CASES = {  # name -> (build, input shape, depth dimension)
    "mlp": (MLP, (1, 8, 8), False),
    "conv_bn": (ConvBN, (1, 8, 8), False),
    "resnet_tiny": (ResNetTiny, (3, 16, 16), True),
    "depthwise": (Depthwise, (3, 16, 16), False),
    "shared_linear": (SharedLinear, (1, 8, 8), False),
    "concat": (ConcatNet, (3, 8, 8), False),
    "residual_mlp": (ResidualMLP, (1, 8, 8), True),
}


def case(name: str, batch: int = 4):
    build, shape, depth = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(batch, *shape)
    fields = {"depth": {"blocks": [1, 3]}} if depth else {}
    return model, x, fields


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so slicing them is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


# --- small exact pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("channels,fraction,multiple,expected", [
    (10, 0.3, 1, 3), (10, 0.25, 1, 3), (10, 0.25, 4, 4), (6, 1.0, 1, 6), (3, 0.1, 1, 1), (10, 0.75, 8, 8), (10, 0.95, 8, 10),
    (64, 0.5, 1, 32), (7, 0.5, 1, 4)])
def test_active_channels(channels, fraction, multiple, expected):
    assert active_channels(channels, fraction, multiple) == expected


def test_layout_keeps_each_groups_prefix_in_place():
    # dim of 2 + 3*2 + 1 positions: group 0 (2 channels), group 1 (3 channels, each twice), one fixed
    layout = DimLayout(0, 9, (Segment(0, 0, 1), Segment(1, 2, 2)))
    kept = layout.kept({0: 1, 1: 2}, {0: 2, 1: 3})
    assert kept.tolist() == [0, 2, 3, 4, 5, 8]


# --- spec and model errors -------------------------------------------------------------------

@pytest.mark.parametrize("fields,path,words", [
    ({"width": {"fractions": [0.5, 1.2]}}, "passes.0.width.fractions", "(0, 1]"),
    ({"width": {"fractions": [0.0, 1.0]}}, "passes.0.width.fractions", "(0, 1]"),
    ({"width": {"fractions": [0.25, 0.5]}}, "passes.0.width.fractions", "include 1.0"),
    ({"width": {"fractions": [0.5, 0.5, 1.0]}}, "passes.0.width.fractions", "distinct"),
    ({"depth": {"blocks": [-1, 2]}}, "passes.0.depth.blocks", ">= 0"),
    ({}, "passes.0", "nothing to slice"),
    ({"width": {"fractions": [0.5, 1.0]}, "sampling": "weighted"}, "passes.0", "weights"),
    ({"width": {"fractions": [0.5, 1.0]}, "mode": "sandwich", "sub_models_per_batch": 1}, "passes.0",
     "sub_models_per_batch"),
    ({"width": {"fractions": [0.5, 1.0]}, "accumulate_batches": 0}, "passes.0.accumulate_batches", "greater than or equal to 1"),
    ({"width": {"fractions": [0.5, 1.0]}, "accumulate": 2, "sub_models_per_batch": 2}, "passes.0", "old name"),
    ({"width": {"fractions": [0.5, 1.0]}, "depth": {"blocks": [1, 2, 3]}, "grid": "list"}, "passes.0", "pairs"),
])
def test_spec_errors_name_the_field(fields, path, words):
    with pytest.raises(SpecError) as e:
        parse_spec({"passes": [{"kind": "sorted_slicing", **fields}]})
    assert any(loc.startswith(path) and words in msg for loc, msg in e.value.errors), e.value.errors


def test_depth_larger_than_the_blocks_is_an_error_naming_them():
    model, x, _ = case("resnet_tiny")
    with pytest.raises(SpecError) as e:
        sliced(model, x, depth={"blocks": [1, 4]})
    assert e.value.errors[0][0] == "passes.0.depth.blocks.1"
    assert "3 skippable blocks (layer1.0, layer1.1, layer2.1)" in e.value.errors[0][1]


def test_depth_must_hold_the_full_depth():
    model, x, _ = case("resnet_tiny")
    with pytest.raises(SpecError, match="must include 3"):
        sliced(model, x, depth={"blocks": [1, 2]})


def test_depth_on_a_model_without_skippable_blocks_is_an_error():
    model, x, _ = case("mlp")
    with pytest.raises(SpecError, match="no skippable residual block"):
        sliced(model, x, depth={"blocks": "all"})


def test_extract_outside_the_grid_lists_the_grid():
    model, x, _ = case("resnet_tiny")
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]}, depth={"blocks": [1, 3]})
    with pytest.raises(FxgrowError, match=r"the grid holds: \(width 0.5, depth 1\), \(width 0.5, depth 3\), "
                                          r"\(width 1, depth 1\), \(width 1, depth 3\)"):
        extract(gm, 0.75, 3)


def test_weights_must_match_the_grid():
    model, x, _ = case("mlp")
    with pytest.raises(SpecError, match="3 weights for 4 grid points"):
        sliced(model, x, sampling="weighted", weights=[1, 1, 1])


def test_nothing_sliceable_is_an_error():
    model, x = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.randn(2, 1, 8, 8)
    with pytest.raises(PassError, match="no channel group can be sliced"):
        sliced(model, x)


# --- equivalence ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_full_size_preserves_computation(name, training):
    model, x, fields = case(name)
    _randomize_norms(model)
    gm = sliced(model, x, **fields)
    model.train(training), gm.train(training)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_every_grid_point_equals_its_extracted_model(name):
    model, x, fields = case(name)
    _randomize_norms(model)
    gm = sliced(model, x, **fields).eval()
    params = {}
    for point in find_state(gm).points:
        small = extract(gm, *point).eval()
        with subnet(gm, *point):
            expected = gm(x)
        assert (small(x) - expected).abs().max() <= 1e-5, point
        assert not any("fxgrow" in k for k in small.state_dict())
        params[point] = sum(p.numel() for p in small.parameters())
    # physically smaller: parameters strictly grow along each dimension of the grid
    for (w, d), n in params.items():
        for (w2, d2), n2 in params.items():
            if (w, d) != (w2, d2) and w <= w2 and d <= d2:
                assert n < n2, ((w, d), (w2, d2))


@pytest.mark.parametrize("name", ["resnet_tiny", "concat", "depthwise"])
def test_training_mode_sub_model_equals_extracted(name):
    """Batch statistics and their running updates agree too."""
    model, x, fields = case(name, batch=6)
    _randomize_norms(model)
    gm = sliced(model, x, **fields).train()
    point = (0.5, find_state(gm).points[len(find_state(gm).points) // 2][1])
    small = extract(gm, *point).train()
    with subnet(gm, *point):
        expected = gm(x)
        torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=0)
        again = extract(gm, *point)  # the updated statistics, cut again
    for (k, v), (k2, v2) in zip(sorted(small.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2
        torch.testing.assert_close(v, v2, atol=1e-6, rtol=0)


def test_the_sliced_model_computes_on_smaller_tensors():
    model, x, _ = case("resnet_tiny")
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]})
    chain = weight_chains(gm)["layer1.0.conv1.weight"]
    producer = chain.modules(gm)[-1]
    assert isinstance(producer, SliceProducer)
    w = gm.get_parameter("layer1.0.conv1.weight")
    with subnet(gm, 0.5):
        cut = producer(w)
        shapes = {}
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
                 for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]
        gm(x)
    for h in hooks:
        h.remove()
    assert cut.shape == (4, 4, 3, 3) and cut.data_ptr() == w.data_ptr()  # a view, not a copy or a mask
    assert shapes["layer1.0.bn1"][1] == 4 and shapes["layer2.1.bn2"][1] == 8


def test_extracted_full_model_loads_into_the_original_class():
    model, x, fields = case("resnet_tiny")
    gm = sliced(model, x, **fields)
    ResNetTiny().load_state_dict(extract(gm).state_dict())  # strict: same keys and shapes
    ResNetTiny().load_state_dict(fold(gm).state_dict())


def test_fold_folds_the_active_sub_model():
    model, x, fields = case("depthwise")
    gm = sliced(model, x, **fields).eval()
    with subnet(gm, 0.5):
        folded = fold(gm).eval()
        torch.testing.assert_close(folded(x), gm(x), atol=1e-5, rtol=0)
    assert folded.dw.groups == 4 and folded.dw.weight.shape == (4, 1, 3, 3)


# --- coupled channels ------------------------------------------------------------------------

def test_coupled_channels_stay_consistent():
    """Every tensor indexing one group keeps the same channels: the residual stream of a
    stage, its BNs and the classifier's input all have ceil(w * C) channels."""
    model, x, fields = case("resnet_tiny")
    gm = sliced(model, x, **fields)
    small = extract(gm, 0.25, 3)
    m = small.get_submodule
    stage1 = [m("conv1").out_channels, m("bn1").num_features] + [
        n for b in ("layer1.0", "layer1.1")
        for n in (m(f"{b}.conv2").out_channels, m(f"{b}.bn2").num_features, m(f"{b}.conv1").in_channels)]
    assert set(stage1) == {2}
    assert m("layer2.0.shortcut.0").out_channels == m("layer2.1.conv2").out_channels == 4
    assert small.fc.in_features == 4 and small.fc.out_features == 10  # classifier outputs never sliced
    assert small.conv1.in_channels == 3  # model input never sliced


def test_concat_keeps_each_branch_prefix():
    model, x, fields = case("concat")
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]})
    small = extract(gm, 0.5)
    assert (small.a.out_channels, small.b.out_channels) == (3, 4)
    assert small.bn.num_features == 7 and small.conv.in_channels == 7
    keep = [0, 1, 2, 6, 7, 8, 9]  # a's first 3 of 6, then b's first 4 of 8
    torch.testing.assert_close(small.conv.weight, model.conv.weight[:4][:, keep])
    torch.testing.assert_close(small.bn.running_var, model.bn.running_var[keep])


def test_index_sliced_batch_norm_updates_only_kept_statistics():
    model, x, _ = case("concat")
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]}).train()
    bn = gm.bn
    before = bn.running_mean.clone()
    with subnet(gm, 0.5):
        gm(x)
    changed = (bn.running_mean != before).nonzero().flatten().tolist()
    assert changed == [0, 1, 2, 6, 7, 8, 9]


# --- depth ------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,shape,expected", [
    (ResNetTiny, (3, 16, 16), ["layer1.0", "layer1.1", "layer2.1"]),
    (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32),
     ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 16, 16),
     [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]),
    (ResidualMLP, (1, 8, 8), ["blocks.0", "blocks.1", "blocks.2"]),
], ids=["resnet_tiny", "resnet18", "mobilenet_v2", "residual_mlp"])
def test_skippable_blocks_are_found(build, shape, expected):
    torch.manual_seed(0)
    p = SortedSlicingPass(depth={"blocks": "all"})
    record = Pipeline([p])(build(), example_input=torch.randn(2, *shape)).records["passes.0"]
    assert record.blocks == expected


def test_a_dropped_block_does_no_work_and_gets_no_gradient():
    model, x, _ = case("resnet_tiny")
    gm = sliced(model, x, width={"fractions": [1.0]}, depth={"blocks": [1, 3]}).train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, i[0].shape[0])))
             for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with subnet(gm, 1.0, 1):
        gm(x).sum().backward()
    for h in hooks:
        h.remove()
    batch = dict(seen)
    assert batch["layer1.0.bn1"] == 4 and batch["layer1.1.bn1"] == 0 and batch["layer2.1.bn2"] == 0
    assert batch["layer2.0.bn1"] == 4  # a shape-changing block always runs
    assert gm.get_parameter("layer1.1.conv1.weight").grad is None
    assert gm.get_parameter("layer1.0.conv1.weight").grad is not None
    # and the dropped block is an exact identity: the extracted model has no layer1.1
    small = extract(gm, 1.0, 1)
    assert not any(k.startswith("layer1.1.") for k in small.state_dict())


# --- BatchNorm statistics ---------------------------------------------------------------------

def test_per_width_statistics_are_separate():
    model, x, _ = case("conv_bn", batch=8)
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]}, bn="per_width").train()
    bn = gm.bn1
    assert isinstance(bn, SlicedBatchNorm) and isinstance(bn, nn.BatchNorm2d)
    full, narrow = bn.running_mean.clone(), bn.running_mean_w0.clone()
    with subnet(gm, 0.5):
        gm(x)
    assert torch.equal(bn.running_mean, full) and not torch.equal(bn.running_mean_w0, narrow)
    assert int(bn.num_batches_tracked_w0) == 1 and int(bn.num_batches_tracked) == 0
    small = extract(gm, 0.5)
    torch.testing.assert_close(small.bn1.running_mean, bn.running_mean_w0)
    gm(x)
    assert not torch.equal(bn.running_mean, full)


def test_recalibration_estimates_the_sub_models_statistics():
    """Recalibrating on batches gives the cumulative mean of the batch statistics of the
    active sub-model; preserved_norm_stats puts the old ones back."""
    model, x, _ = case("conv_bn", batch=16)
    gm = sliced(model, x, width={"fractions": [0.5, 1.0]}).eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    before = gm.bn1.running_mean.clone()
    with preserved_norm_stats(gm), subnet(gm, 0.5):
        assert recalibrate(gm, batches) == 3
        small = extract(gm, 0.5).eval()
        expected = torch.stack([small.conv1(b).mean((0, 2, 3)) for b in batches]).mean(0)
        torch.testing.assert_close(gm.bn1.running_mean[:4], expected, atol=1e-5, rtol=0)
        assert torch.equal(gm.bn1.running_mean[4:], torch.zeros(4))
        assert gm.training is False and gm.bn1.momentum == 0.1
    assert torch.equal(gm.bn1.running_mean, before)


# --- composition -------------------------------------------------------------------------------

def test_masks_are_sliced_with_their_weights():
    model, x, fields = case("resnet_tiny")
    gm = sliced(model, x, passes=[CompanderPass(), PruneRegrowPass(final_sparsity=0.5)], **fields).eval()
    chain = weight_chains(gm)["layer1.0.conv2.weight"]
    roles = [type(m).__name__ for m in chain.modules(gm)]
    assert roles == ["CompandProducer", "MaskProducer", "SliceProducer"]
    g = torch.Generator().manual_seed(0)
    for m in gm.modules():
        if isinstance(m, MaskProducer):
            m.mask.copy_((torch.rand(m.mask.shape, generator=g) > 0.5).float())
    mask = chain.modules(gm)[1].mask
    for point in [(0.5, 1), (0.25, 3), (1.0, 3)]:
        small = extract(gm, *point).eval()
        with subnet(gm, *point):
            assert (small(x) - gm(x)).abs().max() <= 1e-5
    small = extract(gm, 0.5, 3)
    zeros = small.get_submodule("layer1.0.conv2").weight == 0
    assert torch.equal(zeros, mask[:4, :4] == 0)


def stack():
    return [TemplateMixingPass(template_init="preserve"), CompanderPass(), PruneRegrowPass(final_sparsity=0.5)]


def test_full_size_with_other_producers_preserves_computation():
    model, x, fields = case("resnet_tiny")
    model.eval()
    gm = sliced(model, x, passes=stack(), **fields).eval()
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


def test_stacked_sub_models_equal_their_extracted_models():
    model, x, fields = case("resnet_tiny")
    gm = sliced(model, x, passes=stack(), **fields).eval()
    chain = weight_chains(gm)["layer1.1.conv1.weight"]
    assert [type(m).__name__ for m in chain.modules(gm)] == ["MixProducer", "CompandProducer", "MaskProducer",
                                                             "SliceProducer"]
    for point in [(0.25, 1), (0.75, 3)]:
        small = extract(gm, *point).eval()
        with subnet(gm, *point):
            assert (small(x) - gm(x)).abs().max() <= 1e-5


def test_slicing_before_masks_is_rejected():
    with pytest.raises(SpecError, match="must come before sorted_slicing"):
        Pipeline([SortedSlicingPass(width={"fractions": [1.0]}), PruneRegrowPass(final_sparsity=0.5)])


# --- the sampling plan ----------------------------------------------------------------------------

POINTS = [(w, d) for w in (0.25, 0.5, 1.0) for d in (1, 3)]


def plan(**fields):
    """The plan of one batch a step (accumulate_batches: 1)."""
    fields.setdefault("width", {"fractions": [0.25, 0.5, 1.0]})
    full = SortedSlicingCallback(SortedSlicingSpec(**fields)).plan
    return lambda points, seed, step: full(points, seed, step)[0]


def test_plan_is_a_function_of_seed_and_step():
    p = plan(sub_models_per_batch=3)
    assert p(POINTS, 0, 7) == p(POINTS, 0, 7)
    draws = {tuple(p(POINTS, 0, s)) for s in range(50)}
    assert len(draws) > 25 and all(len(d) == 3 for d in draws)
    assert [p(POINTS, 1, s) for s in range(5)] != [p(POINTS, 0, s) for s in range(5)]


def test_old_accumulate_is_sub_models_per_batch():
    with pytest.warns(DeprecationWarning, match="sub_models_per_batch"):
        old = SortedSlicingSpec(width={"fractions": [0.5, 1.0]}, accumulate=3)
    assert old.draws == 3 and old.accumulate_batches == 1


def test_accumulated_batches_each_get_their_own_draw():
    """k batches a step: the first batch draws what a one-batch step draws, the next ones
    continue the step's generator."""
    full = SortedSlicingCallback(SortedSlicingSpec(width={"fractions": [0.25, 0.5, 1.0]}, accumulate_batches=4)).plan
    one = plan()
    for s in range(20):
        batches = full(POINTS, 0, s)
        assert len(batches) == 4 and all(len(b) == 1 for b in batches) and batches[0] == one(POINTS, 0, s)
    assert len({tuple(map(tuple, full(POINTS, 0, s))) for s in range(20)}) == 20
    assert any(len(set(map(tuple, full(POINTS, 0, s)))) > 1 for s in range(20))


@pytest.mark.parametrize("fields, reduction", [({}, "mean"), ({"mode": "summation"}, "sum"),
                                               ({"mode": "summation", "loss_reduction": "mean"}, "mean"),
                                               ({"sub_models_per_batch": 2, "loss_reduction": "sum"}, "sum")])
def test_loss_reduction_defaults(fields, reduction):
    cb = SortedSlicingCallback(SortedSlicingSpec(width={"fractions": [0.5, 1.0]}, **fields))
    assert cb.spec.reduction == reduction
    assert cb.loss_scale(None, 0, 3) == (1.0 if reduction == "sum" else None)  # None: the loop's mean


def test_uniform_and_weighted_sampling_frequencies():
    p = plan()
    counts = {pt: 0 for pt in POINTS}
    for s in range(1200):
        counts[p(POINTS, 0, s)[0]] += 1
    assert all(150 < c < 250 for c in counts.values()), counts
    w = plan(sampling="weighted", weights=[0, 0, 0, 1, 0, 3])
    drawn = [w(POINTS, 0, s)[0] for s in range(400)]
    assert set(drawn) == {(0.5, 3), (1.0, 3)} and 250 < drawn.count((1.0, 3)) < 350


def test_sandwich_runs_largest_smallest_and_random_middles():
    p = plan(mode="sandwich", sub_models_per_batch=4)
    for s in range(20):
        got = p(POINTS, 0, s)
        assert got[:2] == [(1.0, 3), (0.25, 1)] and len(got) == 4
        assert all(pt not in ((1.0, 3), (0.25, 1)) for pt in got[2:])


def test_summation_runs_the_drawn_sub_model_and_all_smaller_ones():
    p = plan(mode="summation")
    for s in range(20):
        got = p(POINTS, 0, s)
        top = got[0]
        assert got == sorted([pt for pt in POINTS if pt[0] <= top[0] and pt[1] <= top[1]], reverse=True)


def test_list_grid_pairs_widths_with_depths():
    model, x, _ = case("resnet_tiny")
    gm = sliced(model, x, width={"fractions": [0.25, 0.5, 1.0]}, depth={"blocks": [0, 1, 3]}, grid="list")
    assert find_state(gm).points == ((0.25, 0), (0.5, 1), (1.0, 3))
    gm = sliced(model, x, width={"fractions": [1.0, 0.5]}, depth={"blocks": [3, 1]}, grid="list")
    assert find_state(gm).points == ((0.5, 1), (1.0, 3))  # sorted: i-th smallest with i-th smallest


def test_describe_lists_groups_and_blocks():
    model, x, fields = case("resnet_tiny")
    rows = SortedSlicingPass(depth={"blocks": "all"}).describe(sliced(model, x, width={"fractions": [0.5, 1.0]}, **fields))
    widths = [r for r in rows if r["dimension"] == "width"]
    assert {(r["full"], r["kept"]) for r in widths} == {(8, "4 / 8 at 0.5 / 1"), (16, "8 / 16 at 0.5 / 1")}
    assert [r["item"] for r in rows if r["dimension"] == "depth"] == [
        "block layer1.0", "block layer1.1", "block layer2.1"]
