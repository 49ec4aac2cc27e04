"""The extension points are real: a layer kind, a producer and a pass defined in this file
alone (no fxgrow file touched) take part in tracing, functionalization, channel coupling,
the compander, fold, growth and the loop's model-replaced event."""
from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from fxgrow.analysis import channel_groups, propagate_shapes
from fxgrow.analysis.coupling import ChannelUse
from fxgrow.fold import fold
from fxgrow.ir import insert_producer, weight_chains
from fxgrow.layers import LayerKind, register_layer_kind, unregister_layer_kind
from fxgrow.nn.base import Producer
from fxgrow.passes import PASS_REGISTRY, Pass, Pipeline, Record, register_pass
from fxgrow.passes.compander import CompanderPass
from fxgrow.passes.grow_model import grow_model
from fxgrow.passes.template_mixing import TemplateMixingPass
from fxgrow.specs.base import PassSpec
from fxgrow.trace import trace
from fxgrow.train import Callback, ModelChange, Trainer
from tests.test_train_loop import mlp, one_thread, spec  # noqa: F401  (fixture)
from tests.zoo import ConvBN

pytestmark = pytest.mark.usefixtures("one_thread")


# --- a toy layer kind: a per-channel affine y = x * w + b over dim 1 --------------------------

def channel_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x * weight.view(shape) + bias.view(shape)


class ChannelAffine(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        return channel_affine(x, self.weight, self.bias)


def _couple(c, call) -> None:
    """Shape unchanged; weight and bias index the channels of dim 1."""
    xin = c.layouts[call.x]
    out = c.output(call.node, {d: [xin[d]] for d in range(len(xin))})
    for role in ("weight", "bias"):
        c.use(out[1], call.params.get(role), 0, call.node)


def _rebuild(tensors, options) -> nn.Module:
    module = ChannelAffine(tensors["weight"].shape[0])
    with torch.no_grad():
        module.weight.copy_(tensors["weight"])
        module.bias.copy_(tensors["bias"])
    return module


AFFINE = LayerKind("channel_affine", (ChannelAffine,), channel_affine, ("weight", "bias"), ("weight", "bias"),
                   _couple, targetable=True, rebuild=_rebuild, fills={"weight": 1.0, "bias": 0.0})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.affine = ChannelAffine(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.affine(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture
def affine_kind():
    register_layer_kind(AFFINE)
    yield AFFINE
    unregister_layer_kind(AFFINE)


def test_a_registered_layer_kind_is_traced_coupled_targeted_and_folded(affine_kind):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 1, 8, 8)
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv1", "affine", "conv2", "fc"]
    # its parameters join the channel group of the conv before it
    group = next(g for g in channel_groups(propagate_shapes(gm, x)) if "conv1" in g.producers)
    assert {ChannelUse("affine", "weight", 0), ChannelUse("affine", "bias", 0),
            ChannelUse("conv1", "weight", 0), ChannelUse("conv2", "weight", 1)} <= set(group.uses)
    assert not group.fixed
    # a pass targets it by type: functionalized through the table, companded, folded back
    # (a = 1.5: weights near 1 lie beyond the default a = 0.7's start edge 0.874)
    result = CompanderPass(a=1.5, targets={"types": ["ChannelAffine"]})(model, example_input=x)
    rewritten = result.graph_module.eval()
    assert any(n.target is channel_affine for n in rewritten.graph.nodes)
    assert list(weight_chains(rewritten)) == ["affine.weight", "affine.bias"]
    torch.testing.assert_close(rewritten(x), model(x), rtol=1e-5, atol=1e-6)
    folded = fold(rewritten)
    assert isinstance(folded.get_submodule("affine"), ChannelAffine)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_without_the_entry_the_layer_is_opaque():
    gm = trace(Net())
    assert "affine" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]  # traced through


# --- a toy producer and the pass that inserts it -------------------------------------------

class Offset(Producer):
    """w -> w + c, one learnable scalar per weight (0 at the start: outputs unchanged)."""

    rank = 15  # after the compander, before the mask
    role = "offset"

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, w):
        return w + self.c

    def grow(self, growth, path):
        return self  # one scalar serves every block of the grown weight


class OffsetSpec(PassSpec):
    kind: Literal["toy_offset"] = "toy_offset"


class Replacements(Callback):
    """Counts the model swaps the loop announces."""

    name = "toy_offset"

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def on_model_replaced(self, ctx, old, new, change):
        assert ctx.model is new and old is not new
        self.seen.append((change.cause, sum(isinstance(m, Offset) for m in new.modules())))


class OffsetPass(Pass):
    kind = "toy_offset"
    spec_cls = OffsetSpec
    preserves_computation = True
    rank = Offset.rank

    def rewrite(self, gm, matches, ctx):
        chains = weight_chains(gm)
        for m in matches:
            insert_producer(gm, chains[f"{m.layer}.weight"], Offset(), self.kind)
        return Record(tuple(m.layer for m in matches))

    def callbacks(self, gm, record, ctx):
        return [Replacements()]


@pytest.fixture
def offset_pass():
    register_pass(OffsetPass)
    yield OffsetPass
    del PASS_REGISTRY[OffsetPass.kind]


def test_a_new_producer_composes_folds_and_grows(offset_pass):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = ConvBN().eval()
    pipeline = Pipeline([TemplateMixingPass(template_init="preserve"), CompanderPass(), OffsetPass()])
    gm = pipeline(model, example_input=x).graph_module.eval()
    chain = weight_chains(gm)["conv2.weight"]
    assert [type(m).__name__ for m in chain.modules(gm)] == ["MixProducer", "CompandProducer", "Offset"]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fold(gm)(x), gm(x), rtol=1e-5, atol=1e-6)
    # growth knows no producer class: the offset comes along, one per grown weight
    grown = grow_model(gm, [gm.state_dict()], 2, x, new_coefficients="zero").model.eval()
    assert sum(isinstance(m, Offset) for m in grown.modules()) == 3
    assert grown.get_submodule("conv2").out_channels == 32
    torch.testing.assert_close(grown(x), gm(x), rtol=1e-4, atol=1e-5)  # zero new blocks: the source net


class SwapAt(Callback):
    """Replaces the model by a copy at step 2, as growth would."""

    name = "swap"

    def after_step(self, ctx):
        if ctx.step == 2:
            import copy
            ctx.replace_model(copy.deepcopy(ctx.model), ModelChange(cause="toy"))


def test_the_loop_announces_a_replaced_model(offset_pass, tmp_path):
    torch.manual_seed(0)
    result = OffsetPass()(mlp(), example_input=torch.randn(2, 12))
    (replacements,) = result.callbacks
    trainer = Trainer(result.graph_module, spec(epochs=1), [SwapAt(), replacements], out_dir=tmp_path)
    trainer.fit()
    assert replacements.seen == [("toy", 2)]
    assert all(p in {q for g in trainer.optimizer.param_groups for q in g["params"]}
               for p in trainer.model.parameters())
