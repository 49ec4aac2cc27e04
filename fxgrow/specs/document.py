"""Reading a spec document: bounded YAML in, a plain tree out, or a SpecError.

A spec is a few hundred bytes of mappings (string keys), lists, strings, finite numbers,
booleans and null.
Everything else is refused before validation: text over `MAX_BYTES`, non-UTF-8 bytes,
duplicate keys (YAML keeps the last one silently), tags that build other types
(`!!binary`, `!!set`, `!!python/...`), trees nested deeper than `MAX_DEPTH`, and trees of
more than `MAX_NODES` nodes counting every alias expansion (an "alias bomb" is a small
document whose aliases expand to billions of nodes). The same tree check runs on specs
read back from checkpoints."""
from __future__ import annotations

import math
from typing import Any

import yaml

from ..errors import SpecError

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000
_PLAIN = (str, int, float, bool, type(None))
_REFUSED_TAGS = ("binary", "set", "omap", "pairs")


class _Loader(yaml.SafeLoader):
    """safe_load's loader (pure Python: the C parser recurses without Python's recursion
    guard), nesting bounded while composing, duplicate keys an error and dates kept as
    strings."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError(f"line {mark.line + 1}, column {mark.column + 1}: nested deeper than "
                                f"{MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges; explicit keys override merged ones, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: the base constructor says so
                if first is not key_node:
                    mark = key_node.start_mark
                    raise SpecError(f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r} in a "
                                    f"mapping (first at line {first.start_mark.line + 1}); YAML would silently "
                                    "keep the last one")
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError as e:  # e.g. more digits than Python converts
            raise yaml.constructor.ConstructorError(None, None, str(e), node.start_mark) from None


def _refuse(tag: str):
    def construct(loader, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML type !!{tag} is not allowed in a spec (only mappings, lists, strings, "
                        "numbers, booleans and null)", node.start_mark)
    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
for _tag in _REFUSED_TAGS:
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse(_tag))


def load_yaml(text: str | bytes, source: str | None = None) -> Any:
    """The tree a YAML spec document holds (checked by `check_tree`)."""
    if len(text) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES:,} bytes; specs are small", source)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"not UTF-8 text: byte {text[e.start]:#04x} at offset {e.start}", source) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except SpecError as e:
        raise SpecError(e.errors, source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"malformed YAML: {where}{problem}", source) from None
    except RecursionError:
        raise SpecError(f"malformed YAML: nested deeper than {MAX_DEPTH} levels", source) from None
    check_tree(data, source)
    return data


def check_tree(data: Any, source: str | None = None) -> None:
    """Refuse a tree that is not plain JSON-like data (string keys, finite numbers: what
    survives the run folder's JSON copy of the spec), nests deeper than MAX_DEPTH or has
    more than MAX_NODES nodes (shared and self-referencing containers count once per visit)."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    nodes = 0
    while stack:
        value, path, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SpecError(f"the spec expands to more than {MAX_NODES:,} values (YAML aliases?); specs are small",
                            source)
        if depth > MAX_DEPTH:
            raise SpecError([(_dotted(path[:8]) + "...", f"nested deeper than {MAX_DEPTH} levels")], source)
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):  # the run folder stores specs as JSON, whose keys are strings
                    raise SpecError([(_dotted(path + (key,)), f"a key must be a string, not {type(key).__name__} "
                                      "(quote it; YAML reads yes/no/on/off as booleans)")], source)
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(value, float) and not math.isfinite(value):
            raise SpecError([(_dotted(path), f"{value} is not allowed: numbers must be finite")], source)
        elif isinstance(value, (list, tuple)):
            stack.extend((item, path + (i,), depth + 1) for i, item in enumerate(value))
        elif not isinstance(value, _PLAIN):
            raise SpecError([(_dotted(path), f"a value of type {type(value).__name__} is not allowed (only "
                                             "mappings, lists, strings, numbers, booleans and null)")], source)


def check_stored_size(tree: Any, source: str | None = None) -> None:
    """A run folder stores the spec as YAML with its aliases expanded, and reads it back
    through `load_yaml`: refuse a spec whose expansion would not fit (an alias bomb under
    MAX_NODES can still expand past MAX_BYTES)."""
    size = len(yaml.safe_dump(tree, sort_keys=False).encode())  # as the loop writes spec.yaml
    if size > MAX_BYTES:
        raise SpecError(f"the spec, its aliases expanded as a run folder stores it, is {size:,} bytes of YAML, "
                        f"over {MAX_BYTES:,}; specs are small", source)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() for error messages: bounded, and safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
