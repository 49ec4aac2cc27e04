"""Functionalization, weight chains, fold and tracing on the model zoo."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxgrow.errors import TraceError
from fxgrow.fold import fold
from fxgrow.ir import functionalize, insert_producer, is_layer, layer_table, layer_types, weight_chains
from fxgrow.nn.base import Producer
from fxgrow.trace import trace
from tests.zoo import ZOO, ZOO_IDS, SharedLinear


def functional(model):
    gm = trace(model)
    functionalize(gm, list(layer_types(gm)))
    return gm


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_functionalize_then_fold_is_exact(entry):
    model = entry.build().eval()
    x = entry.example()
    gm = functional(model).eval()
    gm.graph.lint()
    ref = model(x)
    assert torch.equal(gm(x), ref)
    folded = fold(gm)
    assert not any(is_layer(n) for n in folded.graph.nodes)
    assert not hasattr(folded, "fxgrow")
    assert torch.equal(folded(x), ref)
    entry.build().load_state_dict(folded.state_dict(), strict=True)


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_every_targetable_layer_gets_chains(entry):
    model = entry.build()
    layers = layer_table(trace(model))
    gm = functional(model)
    chains = weight_chains(gm)
    expected = {layer.weight for layer in layers.values()} | {layer.bias for layer in layers.values() if layer.bias}
    assert set(chains) == expected
    for name in layers:  # every layer finds its chains by its own name ("attn.in_proj.weight" too)
        assert f"{name}.weight" in chains
    n_layers = sum(1 for n in gm.graph.nodes if is_layer(n))
    assert n_layers >= len({layer.module for layer in layers.values()})  # (attention: two layers, one call)


def test_module_called_twice_keeps_one_shared_weight():
    gm = functional(SharedLinear())
    calls = [n for n in gm.graph.nodes if is_layer(n) and n.meta["fxgrow"]["source"] == "shared"]
    assert len(calls) == 2
    assert calls[0].args[1] is calls[1].args[1]  # the same chain tail feeds both calls
    gets = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "shared.weight"]
    assert len(gets) == 1


class Scale(Producer):
    def __init__(self, factor, rank, role):
        super().__init__()
        self.factor, self.role = factor, role
        self.rank = rank

    def forward(self, w):
        return w * self.factor


def test_insert_producer_orders_by_rank_and_fold_evaluates_chain():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    gm = functional(model)
    chain = weight_chains(gm)["0.weight"]
    insert_producer(gm, chain, Scale(2.0, 20, "late"), "test")
    insert_producer(gm, chain, Scale(3.0, 10, "early"), "test")
    gm.recompile()
    gm.graph.lint()
    chain = weight_chains(gm)["0.weight"]
    assert [m.role for m in chain.modules(gm)] == ["early", "late"]
    expected = F.linear(x, model[0].weight * 6, model[0].bias)
    torch.testing.assert_close(gm(x), expected)
    folded = fold(gm)
    torch.testing.assert_close(folded(x), expected)
    assert isinstance(folded.get_submodule("0"), nn.Linear)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: FX cannot trace it
            return x
        return -x


def test_trace_error_names_module_and_fix():
    with pytest.raises(TraceError) as info:
        trace(Untraceable())
    msg = str(info.value)
    assert "'block'" in msg and "DataDependent" in msg and "leaf_modules" in msg


def test_leaf_module_makes_it_traceable():
    gm = trace(Untraceable(), leaf_modules=["DataDependent"])
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)
    x = torch.randn(3, 4)
    model = Untraceable()
    gm = trace(model, leaf_modules=["block"])
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_flops_match_flop_counter_on_the_original(entry):
    from torch.utils.flop_counter import FlopCounterMode

    from fxgrow.analysis import forward_flops, propagate_shapes_and_flops
    model = entry.build().eval()
    x = entry.example()
    with FlopCounterMode(display=False) as counter:
        model(x)
    expected = counter.get_total_flops()
    assert expected > 0
    gm = functional(model)
    assert forward_flops(gm, x) == expected
    assert propagate_shapes_and_flops(gm, x) == expected
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["tensor_meta"].shape) == tuple(model(x).shape)


def test_flops_of_a_model_with_shared_parameters():
    from fxgrow.analysis import forward_flops
    from fxgrow.passes.compander import CompanderPass
    from tests.zoo import ResNetTiny
    model = ResNetTiny()
    gm = CompanderPass(learnable="global")(model).graph_module  # one (a, b) pair in every chain
    x = torch.randn(1, 3, 16, 16)
    assert forward_flops(gm, x) == forward_flops(model, x) > 0


def test_shapes_of_a_training_model_with_batch_one_and_1x1_maps():
    from fxgrow.analysis import propagate_shapes
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    gm = trace(model).train()
    propagate_shapes(gm, torch.randn(1, 3, 4, 4))  # BN over one value per channel: eval stats are used
    assert gm.training and gm.get_submodule("1").training
    assert [n for n in gm.graph.nodes if n.op == "output"][0].args[0].meta["tensor_meta"].shape == (1, 4)


class _Colliding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a_b = nn.Module()
        self.a_b.c = nn.Linear(4, 4)
        self.a = nn.Module()
        self.a.b_c = nn.Linear(4, 4)

    def forward(self, x):
        return self.a.b_c(self.a_b.c(x))


def test_producer_paths_mirror_layer_paths_without_collisions():
    from fxgrow.passes.compander import CompanderPass
    gm = CompanderPass()(_Colliding()).graph_module  # 'a_b.c' and 'a.b_c' once collided as 'a_b_c'
    assert isinstance(gm.get_submodule("fxgrow.a_b.c.weight_compand"), Producer)
    assert isinstance(gm.get_submodule("fxgrow.a.b_c.weight_compand"), Producer)


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, double: bool = False):
        y = self.fc(x)
        if double:  # Python control flow on an argument: concrete_args fixes it while tracing
            y = y * 2
        return y


def test_spec_concrete_args_fix_control_flow_arguments():
    from fxgrow.api import trace_model
    from fxgrow.specs.root import parse_spec
    model, x = _Flagged(), torch.randn(3, 4)
    with pytest.raises(TraceError):
        trace_model(parse_spec({}), model)
    gm = trace_model(parse_spec({"model": {"concrete_args": {"double": True}}}), model)
    assert torch.equal(gm(x), model(x, double=True))
