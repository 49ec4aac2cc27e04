"""Spec validation: every bad input is a SpecError with the field path, never another exception."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxgrow.errors import SpecError
from fxgrow.passes import PASS_REGISTRY
from fxgrow.specs.base import Targets
from fxgrow.specs.root import Spec, parse_spec, parse_spec_text


def test_defaults_and_roundtrip():
    spec = parse_spec({"passes": [{"kind": "compander"}]})
    assert spec.version == 1 and spec.passes[0].kind == "compander"
    assert parse_spec(spec.model_dump(mode="json")) == spec


def test_spec_is_frozen():
    spec = parse_spec({})
    with pytest.raises(Exception):
        spec.version = 2


@pytest.mark.parametrize("text, path, words", [
    ("passes: [kind: compander", "", "malformed YAML: line"),
    ("passes:\n  - kind: nosuch\n", "passes.0.kind", "unknown pass kind 'nosuch'"),
    ("passes:\n  - kind: compander\n    colour: red\n", "passes.0.colour", "Extra inputs"),
    ("passes:\n  - kind: compander\n    a: [1]\n", "passes.0.a", "valid number"),
    ("passes:\n  - kind: compander\n    a: -0.5\n", "passes.0.a", "greater than 0 (got -0.5)"),
    ("passes:\n  - kind: compander\n    targets: {names: ['re:(']}\n", "passes.0.targets.names", "bad regex"),
    ("train: {epochs: 0}\n", "train.epochs", "greater than or equal to 1"),
    ("version: 3\n", "version", "Input should be 1"),
    ("- 1\n- 2\n", "", "must be a mapping"),
])
def test_bad_input_names_the_field(text, path, words):
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, source="spec.yaml")
    msg = str(info.value)
    assert msg.startswith("spec.yaml: ")
    assert words in msg
    if path:
        assert any(loc == path for loc, _ in info.value.errors), info.value.errors


LAYERS = {"conv1": "Conv2d", "layer1.0.conv1": "Conv2d", "fc": "Linear"}


@pytest.mark.parametrize("targets, chosen", [
    ({}, ["conv1", "layer1.0.conv1", "fc"]),
    ({"types": ["Conv2d"]}, ["conv1", "layer1.0.conv1"]),
    ({"names": ["fc"]}, ["fc"]),
    ({"names": ["re:^layer1\\."]}, ["layer1.0.conv1"]),
    ({"exclude": ["re:^fc$", "conv1"]}, ["layer1.0.conv1"]),
])
def test_targets_select(targets, chosen):
    assert Targets(**targets).select(LAYERS) == chosen


@pytest.mark.parametrize("targets, path", [
    ({"types": ["Conv3d"]}, "passes.0.targets.types.0"),
    ({"names": ["fc2"]}, "passes.0.targets.names.0"),
    ({"exclude": ["re:^nothing"]}, "passes.0.targets.exclude.0"),
    ({"names": ["fc"], "exclude": ["fc"]}, "passes.0.targets"),
])
def test_strict_targets_that_match_nothing_are_errors(targets, path):
    with pytest.raises(SpecError) as info:
        Targets(**targets).select(LAYERS, where="passes.0.targets")
    assert path in [loc for loc, _ in info.value.errors]


def test_non_strict_targets_may_match_nothing():
    assert Targets(names=["fc2"], strict=False).select(LAYERS) == []


def test_json_schema_has_every_pass_kind():
    schema = Spec.model_json_schema()
    text = str(schema)
    for kind in PASS_REGISTRY:
        assert kind in text


# Property: whatever a user writes, the outcome is a Spec or a SpecError.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["re:(", "re:^fc", "Linear", "atan", "layer"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
field_names = st.sampled_from(["kind", "targets", "a", "b", "function", "learnable", "weight_decay",
                               "adaptive_fix", "types", "names", "exclude", "strict", "epochs", "lr",
                               "final_sparsity", "bogus"])


def pass_dicts():
    kinds = st.sampled_from(sorted(PASS_REGISTRY) + ["nosuch", 3, None])
    return st.builds(lambda kind, extra: {"kind": kind, **extra}, kinds,
                     st.dictionaries(field_names, values, max_size=4))


specs = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(1), scalars),
    "name": scalars,
    "model": st.one_of(values, st.fixed_dictionaries({}, optional={"example_input": values, "entry": scalars})),
    "passes": st.one_of(values, st.lists(pass_dicts(), max_size=3)),
    "train": st.one_of(values, st.dictionaries(field_names, values, max_size=3)),
    "bogus": values,
})


@settings(max_examples=1000, deadline=None)
@given(specs)
def test_generated_specs_fail_only_with_spec_errors(data):
    try:
        spec = parse_spec(data)
    except SpecError as e:
        assert str(e)
    else:
        assert isinstance(spec, Spec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_yaml_text_fails_only_with_spec_errors(text):
    try:
        parse_spec_text(text)
    except SpecError:
        pass


@pytest.mark.parametrize("text, path", [
    ("train: {optimizer: {lr: -1}}\n", "train.optimizer.lr"),
    ("train: {data: {name: digits, image_size: 0}}\n", "train.data.image_size"),
])
def test_union_tags_do_not_appear_in_paths(text, path):
    with pytest.raises(SpecError) as info:
        parse_spec_text(text)
    assert [loc for loc, _ in info.value.errors] == [path]
