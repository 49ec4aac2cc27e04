"""Pass pipeline: composition, ordering rules, failure messages, the preserves_computation contract."""
from typing import Literal

import pytest
import torch

from fxgrow.errors import FxgrowError, PassError, SpecError
from fxgrow.passes import PASS_REGISTRY, Pass, Pipeline, compose
from fxgrow.passes.compander import CompanderPass
from fxgrow.specs.base import PassSpec
from fxgrow.trace import trace
from tests.zoo import SMALL_ZOO, ResNetTiny


def test_compose_equals_sequential_application():
    model = ResNetTiny().eval()
    x = torch.randn(2, 3, 16, 16)
    a = CompanderPass(targets={"types": ["Conv2d"]})
    b = CompanderPass(targets={"types": ["Linear"]}, function="asinh")
    composed = compose(a, b)(model).graph_module.eval()
    sequential = b(a(model).graph_module).graph_module.eval()
    assert torch.equal(composed(x), sequential(x))
    sd1, sd2 = composed.state_dict(), sequential.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert str(composed.graph) == str(sequential.graph)


def test_pipeline_does_not_touch_the_users_model():
    model = ResNetTiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CompanderPass()(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _test_pass(kind: str, rank: int | None, fail: bool = False) -> Pass:
    spec_cls = type(f"{kind}Spec", (PassSpec,), {"__annotations__": {"kind": Literal[kind]}, "kind": kind})

    class TestPass(Pass):
        def rewrite(self, gm, matches, ctx):
            if fail:
                raise RuntimeError("exploded")

    TestPass.kind, TestPass.spec_cls, TestPass.rank = kind, spec_cls, rank
    return TestPass()


def test_wrong_producer_order_is_rejected_naming_both_passes():
    with pytest.raises(SpecError) as info:
        Pipeline([_test_pass("slicer", 30), _test_pass("mixer", 0)])
    (loc, msg), = info.value.errors
    assert loc == "passes.1" and "mixer must come before slicer (passes.0)" in msg


def test_failure_names_failing_pass_and_those_before_it():
    with pytest.raises(PassError) as info:
        compose(CompanderPass(), _test_pass("boom", None, fail=True))(ResNetTiny())
    msg = str(info.value)
    assert "pass boom (passes.1) failed: RuntimeError: exploded" in msg
    assert "passes applied before it: compander (passes.0)" in msg


def test_dry_run_matches_without_rewriting():
    gm = trace(ResNetTiny())
    before = str(gm.graph)
    matches = Pipeline([CompanderPass(targets={"types": ["Linear"]})]).dry_run(gm)
    assert [m.layer for m in matches["passes.0"]] == ["fc"]
    assert str(gm.graph) == before


def test_programmatic_fields_are_validated_like_yaml():
    with pytest.raises(SpecError) as info:
        CompanderPass(a=0)
    assert info.value.errors[0][0] == "compander.a"


# Passes whose default spec cannot stand alone get the smallest pipeline that exercises them.
SETUPS = {
    "grow": [("template_mixing", {"template_init": "preserve"}), ("grow", {"at": {"epoch": 1}})],
    "sorted_slicing": [("sorted_slicing", {"width": {"fractions": [0.5, 1.0]}})],
    "template_mixing": [("template_mixing", {"template_init": "preserve"})],
}


@pytest.mark.parametrize("kind", sorted(PASS_REGISTRY))
@pytest.mark.parametrize("entry", SMALL_ZOO, ids=[e.name for e in SMALL_ZOO])
def test_preserves_computation_contract(kind, entry):
    """Every pass that claims it leaves outputs unchanged right after rewriting; the graph
    lints either way."""
    passes = [PASS_REGISTRY[k](**fields) for k, fields in SETUPS.get(kind, [(kind, {})])]
    model = entry.build().eval()
    x = entry.example()
    try:
        gm = Pipeline(passes)(model, example_input=x).graph_module.eval()
    except FxgrowError as e:
        pytest.skip(f"{kind} does not apply to {entry.name}: {e}")
    gm.graph.lint()
    assert all(p.preserves_computation for p in passes), f"{kind}: pick a preserving setup"
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_two_passes_of_one_kind_get_distinct_callback_names():
    a = CompanderPass(targets={"types": ["Conv2d"]}, learnable="layer")
    b = CompanderPass(targets={"types": ["Linear"]})
    names = [cb.name for cb in compose(a, b)(ResNetTiny()).callbacks]
    assert len(names) == len(set(names)) == 2 and names == ["compander.0", "compander.1"]
