"""Filter pruning through norms other than BatchNorm, parameters read directly and grouped
convs, on timm and torchvision models: a norm whose statistics run across pruned channels
leaves them out (MaskedNorm), so the physically smaller export computes what the masked
model computes (shrunk == masked), fold computes it exactly, and 50% of channels removes
about three quarters of the parameters, as Torch-Pruning does."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxgrow.errors import SpecError
from fxgrow.fold import fold
from fxgrow.nn.masked_norm import MaskedNorm
from fxgrow.passes.prune_regrow_filters import export_pruned, filter_groups, masked_norms
from fxgrow.passes.prune_regrow_masks import masked_weights
from tests.test_prune_regrow import Loop, filter_pruned
from tests.test_slicing_norms import CASES, NormMLP, build

pytest.importorskip("timm")

PRUNED = {  # name -> largest share of parameters the export at 50% of channels may keep
    "timm_test_vit": 0.40, "timm_test_convnext": 0.30, "timm_test_byobnet": 0.30, "timm_test_efficientnet_gn": 0.32,
    "tv_regnet_tiny": 0.42, "tv_resnext_tiny": 0.30, "layer_norms": 0.35, "group_norm": 0.6,
}


def model_and_input(name: str, batch: int = 4):
    if name == "layer_norms":  # NormMLP's hand-written RMSNorm is refused (below): LayerNorm there
        torch.manual_seed(0)
        return NormMLP(hand=False), torch.randn(batch, 5, 12)
    return build(name, batch)


def shape_of(name: str) -> tuple[int, ...]:
    return (5, 12) if name == "layer_norms" else CASES[name][1]


@pytest.mark.parametrize("name", list(PRUNED))
def test_shrunk_equals_masked_and_fold_is_exact(name):
    model, x = model_and_input(name)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gm, cbs = filter_pruned(model, x, final_sparsity=0.5, scope="layer", regrow="random")
    Loop(gm, cbs, total_steps=6, in_shape=shape_of(name)).run()
    groups = filter_groups(masked_weights(gm), cbs[0].channel_uses, masked_norms(gm))
    for g in groups:  # every norm over a group leaves out exactly the group's pruned channels
        for norm, offset, repeat in g.norms:
            kept = norm.keep[offset:offset + g.size * repeat].view(g.size, repeat)
            assert torch.equal(kept.bool(), g.active().view(-1, 1).expand(-1, repeat))
    assert cbs[0].report()["actual_sparsity"] == pytest.approx(0.5, abs=0.1)
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
        small = export_pruned(gm, x).eval()
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        folded = fold(gm).eval()
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
    assert not any(isinstance(m, MaskedNorm) for m in list(small.modules()) + list(folded.modules()))
    fresh = model_and_input(name)[0]
    fresh.load_state_dict(folded.state_dict())  # strict: the keys and shapes of the user's model
    share = sum(p.numel() for p in small.parameters()) / sum(v.numel() for k, v in original.items()
                                                             if k in dict(model.named_parameters()))
    print(f"{name}: 50% of channels pruned keeps {share:.3f} of the parameters, "
          f"{len(masked_norms(gm))} norms masked")
    assert share <= PRUNED[name]


@pytest.mark.parametrize("name", ["timm_test_vit", "timm_test_convnext", "layer_norms"])
def test_masked_norms_preserve_computation_at_the_dense_start(name):
    model, x = model_and_input(name)
    gm, _ = filter_pruned(model, x)
    assert masked_norms(gm)
    for training in (False, True):
        model.train(training), gm.train(training)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_masked_norm_state_survives_a_checkpoint():
    model, x = model_and_input("timm_test_convnext")
    gm, cbs = filter_pruned(model, x, final_sparsity=0.5, scope="layer")
    Loop(gm, cbs, total_steps=6, in_shape=(3, 32, 32)).run()
    again, _ = filter_pruned(model_and_input("timm_test_convnext")[0], x)
    again.load_state_dict(gm.state_dict())
    assert [n.full for n in masked_norms(again)] == [n.full for n in masked_norms(gm)] and not masked_norms(gm)[0].full
    gm.eval(), again.eval()
    torch.testing.assert_close(again(x), gm(x), rtol=0, atol=0)


def test_a_hand_written_norm_over_the_channels_is_refused_naming_it():
    """x * rsqrt(mean(x^2)): its mean would count pruned channels, and nothing can mask a
    hand-written op: the stream cannot be filter-pruned, and the error says why."""
    torch.manual_seed(0)
    with pytest.raises(SpecError) as e:
        filter_pruned(NormMLP(hand=True), torch.randn(2, 5, 12))
    assert "'inp'" in str(e.value) and "Tensor.mean (mean) in 'norms.3' computes across these channels" in str(e.value)


def test_fold_shrink_of_a_filter_pruned_vit_run(tmp_path):
    """The CLI way: `fxgrow apply` a ViT with filter pruning, then `fxgrow fold --shrink`:
    the shrunk model computes what the run's folded (masked) model computes."""
    from tests.cli_runs import cli

    (tmp_path / "spec.yaml").write_text(
        "model:\n  entry: timm:create_model\n  kwargs: {model_name: test_vit, num_classes: 10, img_size: 32,"
        " dynamic_img_size: false}\n  example_input: [1, 3, 32, 32]\n"
        "passes:\n  - kind: prune_regrow\n    granularity: filter\n    final_sparsity: 0.5\n    scope: layer\n"
        "    schedule: {start: 0, end: 4, every: 2}\n"
        "train: {data: {name: digits, image_size: 32, channels: 3}, steps: 6, batch_size: 16, progress: none}\n")
    out = tmp_path / "run"
    result = cli("apply", tmp_path / "spec.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    result = cli("fold", out, "--shrink", "-o", tmp_path / "small.pt")
    assert result.exit_code == 0, result.output
    full = torch.load(out / "folded.pt", weights_only=False).eval()
    small = torch.load(tmp_path / "small.pt", weights_only=False).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < 0.45 * count(full)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = full(x)
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
