"""Growth through LayerNorm models (ConvNeXt, ViT from timm): the traced-through layer norms
read their normalized_shape from their input and normalize over the grown width, parameters
read directly (layer scales, cls_token) widen like norm parameters, a model whose grown copy
could not run is refused before training (and by the dry run), and a ConvNeXt grows mid-run
through the Trainer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow import api
from fxgrow.errors import PassError
from fxgrow.fold import fold
from fxgrow.passes import Pipeline
from fxgrow.passes.grow import GrowPass
from fxgrow.passes.grow_model import grow_model
from fxgrow.passes.template_mixing import TemplateMixingPass
from fxgrow.specs import parse_spec
from fxgrow.train import Trainer
from tests.test_slicing_norms import build
from tests.test_train_loop import one_thread  # noqa: F401  (fixture)

pytest.importorskip("timm")


def mixed(model: nn.Module, x: torch.Tensor):
    return Pipeline([TemplateMixingPass(targets={"types": ["Conv2d", "Linear"]})])(model, example_input=x).graph_module


@pytest.mark.parametrize("name", ["timm_test_convnext", "timm_test_vit"])
def test_layer_norm_models_grow_and_normalize_over_the_grown_width(name):
    model, x = build(name)
    gm = mixed(model, x)
    grown, info = grow_model(gm, [gm.state_dict()], 2, x)
    assert all(w["after"] == 2 * w["before"] for w in info["widths"])
    norms = [n for n in grown.graph.nodes if n.target is F.layer_norm]
    assert norms and all(isinstance(n.args[1], torch.fx.Node) for n in norms)  # x.shape[-1:], not a literal
    grown.eval()
    plain = fold(grown).eval()
    torch.testing.assert_close(plain(x), grown(x), rtol=0, atol=0)
    # one source net: the new half of every norm starts at weight 1, bias 0; its own half is kept
    first = next(p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    old, new = model.get_submodule(first), plain.get_submodule(first)
    c = old.weight.shape[0]
    assert torch.equal(new.weight[:c], old.weight) and torch.equal(new.weight[c:], torch.ones(c))
    assert torch.equal(new.bias[c:], torch.zeros(c))
    if name == "timm_test_vit":
        assert plain.cls_token.shape[-1] == plain.pos_embed.shape[-1] == 2 * model.cls_token.shape[-1]


class OwnProjection(nn.Module):
    """A projection written as F.linear over the model's own parameter: not a layer template
    mixing can target, and it would have to grow along both dims."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.proj = nn.Parameter(torch.randn(8, 8) / 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.linear(torch.relu(self.inp(x)), self.proj))


def test_a_model_whose_growth_cannot_work_is_refused_before_training_and_by_the_dry_run():
    x = torch.randn(2, 6)
    passes = [TemplateMixingPass(), GrowPass(at=5)]
    with pytest.raises(PassError, match=r"pass grow \(passes.1\) failed: 'proj' would grow along 2 dims"):
        Pipeline(passes)(OwnProjection(), example_input=x)
    with pytest.raises(PassError, match="'proj' would grow along 2 dims"):
        Pipeline(passes).dry_run(OwnProjection(), example_input=x)


def test_convnext_grows_mid_run_through_the_trainer(tmp_path, one_thread):  # noqa: F811
    spec = parse_spec({
        "name": "convnext_grow",
        "model": {"entry": "timm:create_model", "kwargs": {"model_name": "test_convnext", "num_classes": 10},
                  "example_input": [1, 3, 32, 32]},
        "passes": [{"kind": "template_mixing"}, {"kind": "grow", "at": {"step": 6}}],
        "train": {"data": {"name": "digits", "image_size": 32, "channels": 3}, "steps": 12, "batch_size": 32,
                  "progress": "none", "optimizer": {"name": "adamw", "lr": 2e-3}}})
    torch.manual_seed(0)
    result = api.compile_spec(spec, api.build_model(spec))
    trainer = Trainer(result.graph_module, spec.train, result.callbacks, out_dir=tmp_path,
                      spec_dump=api.spec_dump(spec))
    report = trainer.fit()
    grow = report["grow"]
    assert grow["grown"] and grow["step"] == 6
    assert [w["after"] for w in grow["widths"]] == [2 * w["before"] for w in grow["widths"]]
    assert grow["params_after"] > grow["params_before"]
    assert report["accuracy"] > 0.2  # ten classes: chance is 0.1
    model = trainer.model.eval()
    folded = fold(model).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
    assert folded.get_submodule("stem.1").weight.shape == (2 * 24,)  # the stem's LayerNorm2d grew


@pytest.mark.parametrize("name", ["timm_test_convnext", "timm_test_vit", "tv_regnet_tiny"])
def test_width_one_half_of_the_grown_and_sliced_net_is_the_net_before_growth(name):
    """A grown LayerNorm normalizes over the grown width; cut back to the first band (width
    1/g), it normalizes over the source net's channels again: that sub-model is the small net
    (grouped convs: its conv groups)."""
    from fxgrow.passes.sorted_slicing import SortedSlicingPass
    from fxgrow.subnets import subnet

    model, x = build(name)
    slicing = SortedSlicingPass(width={"fractions": [0.5, 1.0]})
    gm = Pipeline([TemplateMixingPass(targets={"types": ["Conv2d", "Linear"]}), slicing])(
        model, example_input=x).graph_module.eval()
    grown = grow_model(gm, [gm.state_dict()], 2, x, carried=[slicing]).model.eval()
    with subnet(grown, 0.5):
        torch.testing.assert_close(grown(x), gm(x), rtol=1e-4, atol=1e-5)
