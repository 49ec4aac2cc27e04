"""Specs that used to be accepted and crash later, or crash the parser itself: each is now a
SpecError naming the field (or the line), raised before any work starts."""
import re
import time

import pytest

from fxgrow.errors import SpecError
from fxgrow.specs.root import parse_spec, parse_spec_text

COMPANDER = "passes:\n  - kind: compander\n"
SLICING = ("passes:\n  - kind: sorted_slicing\n    width: {fractions: [0.5, 1.0]}\n"
           "    sampling: weighted\n    weights: [.nan, 1.0]\n")


@pytest.mark.parametrize("text, path", [
    ("train: {optimizer: {lr: .inf}}\n", "train.optimizer.lr"),
    ("train: {optimizer: {name: sgd, weight_decay: .inf}}\n", "train.optimizer.weight_decay"),
    ("train: {grad_clip: .inf}\n", "train.grad_clip"),
    (COMPANDER + "    a: .inf\n", "passes.0.a"),
    (COMPANDER + "    b: .nan\n", "passes.0.b"),
    (SLICING, "passes.0.weights.0"),
    ("train: {seed: -1}\n", "train.seed"),
    ("train: {seed: 1.0e+20}\n", "train.seed"),
    ("train: {data: {name: digits, split_seed: -3}}\n", "train.data.split_seed"),
    ("model: {example_input: [1, 3, 100000, 100000]}\n", "model.example_input"),
    ("train: {data: {name: digits, image_size: 100000}}\n", "train.data.image_size"),
    ("train: {data: {name: synthetic, train_size: 1000000000000}}\n", "train.data"),
    ("train: {data: {name: synthetic, shape: [100000, 100000]}}\n", "train.data"),
    ("train: {data: {name: digits, crop_padding: 100000}}\n", "train.data.crop_padding"),
])
def test_values_that_crash_later_are_refused(text, path):
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, source="spec.yaml")
    assert path in [loc for loc, _ in info.value.errors], info.value.errors


@pytest.mark.parametrize("pattern, words", [
    ("re:a{99999999999}", "bad regex"),
    ("re:" + "(" * 2000 + "a" + ")" * 2000, "regex"),
    ("re:(a+)+$", "nested repetition"),
    ("re:(.*)*x", "nested repetition"),
    ("re:(a|a)*b", "alternation inside a repetition"),
    ("re:" + "a" * 2000, "longer than"),
    ("re:" + ".*" * 8 + "x", "more than 4 repeats"),
])
def test_hostile_regexes_are_refused(pattern, words):
    with pytest.raises(SpecError) as info:
        parse_spec({"passes": [{"kind": "compander", "targets": {"names": [pattern]}}]})
    assert info.value.errors[0][0] == "passes.0.targets.names"
    assert words in str(info.value)


@pytest.mark.parametrize("pattern", [r"re:^layer\d+\.\d+\.conv\d+$", "re:^fc$", r"re:(conv|bn)\d", "re:a{2}b{3}"])
def test_ordinary_regexes_still_parse(pattern):
    parse_spec({"passes": [{"kind": "compander", "targets": {"names": [pattern]}}]})


def test_duplicate_keys_name_the_key_and_line():
    with pytest.raises(SpecError, match=r"line 3.*duplicate key 'lr'.*line 2") as info:
        parse_spec_text("train:\n  optimizer: {name: sgd, lr: 0.1,\n    lr: 0.5}\n", source="s.yaml")
    assert str(info.value).startswith("s.yaml: ")


def test_merge_keys_are_not_duplicates():
    spec = parse_spec_text("model: {kwargs: {a: &w [1, 2], b: *w}}\n")  # small aliases are fine
    assert spec.model.kwargs == {"a": [1, 2], "b": [1, 2]}
    spec = parse_spec_text("train:\n  optimizer:\n    <<: {name: sgd, lr: 0.1}\n    lr: 0.2\n")
    assert spec.train.optimizer.lr == 0.2  # an explicit key overrides a merged one, as YAML says


def test_deep_nesting_is_an_error_not_a_recursion_error():
    for text in ("model: {kwargs: {a: " + "[" * 500 + "]" * 500 + "}}\n", "[" * 5000 + "]" * 5000):
        with pytest.raises(SpecError, match="nested"):
            parse_spec_text(text)
    deep: dict = {}
    for _ in range(500):
        deep = {"a": deep}
    with pytest.raises(SpecError, match="nested"):
        parse_spec({"model": {"kwargs": deep}})


ALIAS_BOMB = """\
model:
  kwargs:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""


def test_alias_bomb_is_refused_quickly():
    started = time.perf_counter()
    with pytest.raises(SpecError, match="expands to more than"):
        parse_spec_text(ALIAS_BOMB)
    assert time.perf_counter() - started < 10  # a bound on a hang, not a speed test
    recursive = "model: {kwargs: {x: &x [*x]}}\n"
    with pytest.raises(SpecError):
        parse_spec_text(recursive)


@pytest.mark.parametrize("text, words", [
    ("name: !!binary aGVsbG8=\n", "!!binary"),
    ("model: {kwargs: {x: !!set {a, b}}}\n", "!!set"),
    ("name: !!python/object:os.system {}\n", "python/object"),
    ("name: !custom x\n", "!custom"),
    ("train: {seed: " + "1" * 5000 + "}\n", "line 1"),
])
def test_tags_and_odd_scalars_are_spec_errors(text, words):
    with pytest.raises(SpecError, match=re.escape(words)):
        parse_spec_text(text)


def test_dates_stay_strings():
    assert parse_spec_text("name: 2024-05-01\n").name == "2024-05-01"


def test_non_utf8_and_oversized_text():
    with pytest.raises(SpecError, match="not UTF-8"):
        parse_spec_text(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="larger than"):
        parse_spec_text("name: x\n" + "#" * (2 << 20))


def test_a_huge_integer_in_data_gives_a_message_not_a_crash():
    with pytest.raises(SpecError) as info:
        parse_spec({"train": {"seed": 10 ** 5000}})
    assert len(str(info.value)) < 500


@pytest.mark.parametrize("kwargs, path", [
    ({"width": {0: None}}, "model.kwargs.width.0"),    # would come back as {"0": None} from the run folder
    ({True: 1}, "model.kwargs.True"),                  # YAML's `on: 1`
    ({"clip": float("inf")}, "model.kwargs.clip"),     # would come back as null
])
def test_values_that_do_not_survive_the_run_folder_are_refused(kwargs, path):
    """The property test found these: a spec that parses must parse back the same from the
    JSON copy a run folder keeps, or a restored model is built with other arguments."""
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"kwargs": kwargs}})
    assert [loc for loc, _ in info.value.errors] == [path]


def test_an_alias_expansion_too_large_to_store_is_refused():
    """Under the value limit (6^6 strings) but, expanded as spec.yaml stores it, over 1 MiB:
    refused at parse time, so no run writes a spec.yaml it cannot read back."""
    rows = ["    l0: &l0 [" + ", ".join(["x" * 40] * 6) + "]"]
    rows += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 6) + "]" for i in range(1, 6)]
    with pytest.raises(SpecError, match="its aliases expanded as a run folder stores it"):
        parse_spec_text("model:\n  kwargs:\n" + "\n".join(rows) + "\n")
