"""The spec parser against whatever a user, a damaged file or a hostile run folder can hand
it: random trees, mutations of every spec in examples/, damaged text (non-UTF-8, truncation,
duplicate keys, tags, alias bombs, deep nesting) and hostile regexes. Every document parses
or raises an FxgrowError; nothing else escapes, nothing hangs (a watchdog turns a hang
into a failure), and what parses survives the round trip a run folder makes."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from fxgrow.api import spec_dump
from fxgrow.errors import FxgrowError
from fxgrow.specs.root import Spec, parse_spec, parse_spec_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {p.name: p.read_text() for p in sorted((ROOT / "examples").glob("*.yaml"))}
assert len(EXAMPLES) >= 10
TREES = {name: yaml.safe_load(text) for name, text in EXAMPLES.items()}
# A hang never returns; a slow parse on a loaded machine does. 60 s tells them apart with a
# margin (a document parses in milliseconds idle; one failed at 10 s on a 2-core box at load 5).
WATCHDOG_S = 60
# Paths a target regex is matched against: real-looking and long.
LAYERS = {"conv1": "Conv2d", "layer1.0.conv1": "Conv2d", "layer4.1.downsample.0": "Conv2d",
          "model.encoder.layers.11.self_attn.out_proj": "Linear", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": "Linear",
          "fc": "Linear"}


def _words(schema) -> set[str]:
    """Every field name and enum value in the JSON Schema: the vocabulary of a spec."""
    words: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            words.update(k for k in node.get("properties", {}) if isinstance(k, str))
            words.update(v for v in node.get("enum", []) if isinstance(v, str))
            if isinstance(node.get("const"), str):
                words.add(node["const"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return words


VOCABULARY = sorted(_words(Spec.model_json_schema()))

# --- building blocks ---------------------------------------------------------------------

hostile_regexes = st.one_of(
    st.sampled_from(["(a+)+$", "(.*)*x", "(a|a)*b", "(a|aa)+$", "a{99999999999}", "(" * 2000 + ")" * 2000,
                     "(" * 300 + "a" + ")" * 300, "a" * 5000, ".*" * 12 + "x", "(?:a{1,1000}){1,1000}",
                     "[", "(?P<x", "\\", "(?<=a+)b", "(?(1)a|b)", "a**", "x{2,1}", "(?i)" * 50, "\\1(a)",
                     "^layer\\d+\\.\\d+\\.conv\\d+$", "(conv|bn)\\d", "(?>a+)+b", "a*+a*+a*+a*+a*+b"]),
    st.text(alphabet="()[]{}*+?|.^$\\a0-,:=!<>P", max_size=40),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(VOCABULARY),
                    hostile_regexes.map(lambda r: "re:" + r))
keys = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=8), st.integers(-3, 3), st.none())
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=4)),
                     max_leaves=24)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def _mutate(tree, path, how, value):
    """A copy of `tree` with the node at `path` deleted, replaced, or given a sibling."""
    if not path:
        return value if how != "delete" else {}
    parent = _get(tree, path[:-1])
    key = path[-1]
    if how == "delete":
        del parent[key]
    elif how == "replace":
        parent[key] = value
    elif isinstance(parent, dict):
        parent[f"bogus_{len(parent)}"] = value
    else:
        parent.insert(key, value)
    return tree


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@st.composite
def tree_mutations(draw):
    name = draw(st.sampled_from(sorted(TREES)))
    tree = yaml.safe_load(EXAMPLES[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        path = draw(st.sampled_from(paths))
        tree = _mutate(tree, path, draw(st.sampled_from(["delete", "replace", "insert"])), draw(trees))
    return tree


@st.composite
def regex_targets(draw):
    """An example spec whose first pass (or a compander) targets hostile regexes."""
    tree = yaml.safe_load(EXAMPLES[draw(st.sampled_from(sorted(TREES)))])
    if not tree.get("passes"):
        tree["passes"] = [{"kind": "compander"}]
    field = draw(st.sampled_from(["names", "exclude"]))
    tree["passes"][0]["targets"] = {field: ["re:" + r for r in draw(st.lists(hostile_regexes, min_size=1, max_size=3))],
                                    "strict": draw(st.booleans())}
    return tree


def alias_bomb(width: int, depth: int) -> str:
    lines = ["model:", "  kwargs:", f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


TAGS = ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGVsbG8=",
        "!!set {a, b}", "!!omap [{a: 1}]", "!!timestamp 2024-01-01", "!custom x", "!!float nan", "!!int 0x1F",
        "&a [*a]", "*undefined", "<<: {lr: 1}", "2024-05-01", "1" * 5000, "\x00", "\ud800", "\ufeff"]


@st.composite
def damaged_texts(draw):
    text = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))]
    data = text.encode()
    how = draw(st.sampled_from(["truncate", "flip", "non_utf8", "duplicate_line", "drop_line", "insert_tag",
                                "bomb", "deep", "insert_text"]))
    lines = text.splitlines(keepends=True)
    if how == "truncate":
        return data[:draw(st.integers(0, len(data)))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if how == "non_utf8":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) + data[i:]
    if how in ("duplicate_line", "drop_line"):
        i = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[:i] + ([lines[i]] * 2 if how == "duplicate_line" else []) + lines[i + 1:])
    if how == "insert_tag":
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        head, sep, _ = line.partition(": ")
        tag = draw(st.sampled_from(TAGS))
        return "".join(lines[:i] + [f"{head}{sep or ': '}{tag}\n"] + lines[i + 1:])
    if how == "bomb":
        return alias_bomb(draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    if how == "deep":
        depth = draw(st.integers(1, 3000))
        open_, close = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        if open_ == "- ":
            return "model:\n  kwargs:\n    x:\n" + "".join("  " * (3 + d) + "-\n" for d in range(depth))
        return "model: {kwargs: {x: " + open_ * depth + "1" + close * depth + "}}\n"
    i = draw(st.integers(0, len(text)))
    return text[:i] + draw(st.text(max_size=20)) + text[i:]


documents = st.one_of(
    trees,                                   # any tree, fed as data
    trees.map(lambda t: ("yaml", t)),        # the same as YAML text
    tree_mutations(),
    tree_mutations().map(lambda t: ("yaml", t)),
    regex_targets(),
    damaged_texts(),
    st.binary(max_size=200),
)

# --- the property ------------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(seconds: int):
    def fire(signum, frame):
        raise TimeoutError(f"the parser took over {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def parse(document):
    if isinstance(document, tuple):
        try:
            text = yaml.safe_dump(document[1])
        except (yaml.YAMLError, TypeError, ValueError, RecursionError):
            return None  # some trees (None keys next to 'null' keys...) have no YAML form
        return parse_spec_text(text, source="doc.yaml")
    if isinstance(document, (str, bytes)):
        return parse_spec_text(document, source="doc.yaml")
    return parse_spec(document, source="doc")


@seed(15)
@settings(max_examples=1200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(documents)
def test_every_document_parses_or_raises_an_fxgrow_error(document):
    with watchdog(WATCHDOG_S):
        try:
            spec = parse(document)
        except FxgrowError as e:
            assert str(e).strip()
            return
        if spec is None:
            return
        assert isinstance(spec, Spec)
        # A run folder stores spec_dump(spec) as YAML and in the checkpoint: both parse back.
        dump = spec_dump(spec)
        assert parse_spec(dump) == spec
        assert parse_spec_text(yaml.safe_dump(dump, sort_keys=False)) == spec
        for p in spec.passes:  # hostile target regexes that parsed also match in bounded time
            try:
                p.targets.select(LAYERS)
            except FxgrowError:
                pass
