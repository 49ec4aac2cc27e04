"""The whole spec: model, passes (a discriminated union on `kind`), train."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import SpecError
from ..passes import PASS_REGISTRY
from .base import StrictModel
from .document import MAX_BYTES, check_stored_size, check_tree, load_yaml, short_repr
from .train import TrainSpec


MAX_EXAMPLE_VALUES = 1 << 26  # 256 MiB of float32
INTEGER_DTYPES = ("int64", "int32")


class ExampleInput(StrictModel):
    """One example input tensor: its shape and dtype; integer ids (tokens) are drawn
    uniformly from [low, high), e.g. `{shape: [1, 64], dtype: int64, high: 512}` for a
    model over a 512-token vocabulary. Floats are standard normal."""

    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    dtype: Literal["float32", "float64", "float16", "bfloat16", "int64", "int32"] = "float32"
    low: int = 0
    high: int | None = Field(None, validate_default=True,
                             description="integer dtypes: one past the largest id (the vocabulary size)")

    @field_validator("low")
    @classmethod
    def _low_for_ids(cls, low: int, info: ValidationInfo) -> int:
        if info.data.get("dtype", "int64") not in INTEGER_DTYPES:
            raise ValueError(f"a range applies to integer dtypes, not {info.data['dtype']}")
        return low

    @field_validator("high")
    @classmethod
    def _high_for_ids(cls, high: int | None, info: ValidationInfo) -> int | None:
        dtype = info.data.get("dtype")
        if dtype is None:  # dtype failed: its error says why
            return high
        if dtype not in INTEGER_DTYPES:
            if high is not None:
                raise ValueError(f"a range applies to integer dtypes, not {dtype}")
        elif high is None:
            raise ValueError(f"{dtype} ids need a range: high = the vocabulary size")
        elif "low" in info.data and high <= info.data["low"]:
            raise ValueError(f"must be more than low ({info.data['low']})")
        return high


def _example_kind(value: Any) -> str:
    if isinstance(value, (dict, ExampleInput)):
        return "tensor"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, dict, ExampleInput)):
        return "inputs"
    return "shape"


Shape = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
OneInput = Annotated[Union[Annotated[Shape, Tag("shape")], Annotated[ExampleInput, Tag("tensor")]],
                     Discriminator(_example_kind)]


class ModelRef(StrictModel):
    """Which model to build and how to trace it."""

    entry: str | None = None   # "path/to/file.py[:callable]" or "package.module:callable"
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the callable
    # A shape (a float tensor), one `ExampleInput` (dtype, id range), or a list of them (the
    # forward's positional inputs, in order).
    example_input: Annotated[
        Union[Annotated[Shape, Tag("shape")], Annotated[ExampleInput, Tag("tensor")],
              Annotated[list[OneInput], Field(min_length=1), Tag("inputs")]],
        Discriminator(_example_kind)] = Field(default_factory=lambda: [1, 3, 32, 32])
    # Keyword inputs of the forward, by name: each a shape or an `ExampleInput`.
    example_kwargs: dict[str, OneInput] = Field(default_factory=dict)
    leaf_modules: list[str] = Field(default_factory=list)  # type names or module paths kept opaque
    # Forward arguments fixed while tracing (e.g. a flag that drives Python control flow).
    concrete_args: dict[str, Any] = Field(default_factory=dict)
    # How the model becomes a graph: torch.fx tracing, torch.export (models FX cannot trace, such
    # as Hugging Face transformers), or fx falling back to export with a warning saying why.
    frontend: Literal["fx", "export", "auto"] = "fx"

    @model_validator(mode="after")
    def _not_huge(self) -> "ModelRef":
        values = sum(math.prod(e.shape) for e in self.examples) + sum(math.prod(e.shape) for e in self.keyword_examples.values())
        if values > MAX_EXAMPLE_VALUES:
            raise ValueError(f"model.example_input: {values:,} values is more than {MAX_EXAMPLE_VALUES:,} "
                             "(one example's input shape, batch 1 is enough)")
        return self

    @property
    def examples(self) -> list[ExampleInput]:
        """The positional example inputs in their full form (a shape alone is a float32 tensor)."""
        ex = self.example_input
        items = ex if isinstance(ex, list) and ex and not isinstance(ex[0], int) else [ex]
        return [_full(e) for e in items]

    @property
    def keyword_examples(self) -> dict[str, ExampleInput]:
        return {name: _full(e) for name, e in self.example_kwargs.items()}

    @property
    def example(self) -> ExampleInput:
        """The first example input in its full form."""
        return self.examples[0]

    def with_example_shape(self, shape: list[int]) -> "ModelRef":
        """This reference with another shape for its (first) example input, dtype and range kept."""
        ex = self.example_input
        several = isinstance(ex, list) and ex and not isinstance(ex[0], int)
        first = ex[0] if several else ex
        first = list(shape) if isinstance(first, list) else first.model_copy(update={"shape": list(shape)})
        return self.model_copy(update={"example_input": [first, *ex[1:]] if several else first})


def _full(ex: "list[int] | ExampleInput") -> ExampleInput:
    return ex if isinstance(ex, ExampleInput) else ExampleInput(shape=ex)


def _pass_union() -> Any:
    specs = tuple(cls.spec_cls for cls in PASS_REGISTRY.values())
    if len(specs) == 1:
        return specs[0]
    return Annotated[Union[specs], Field(discriminator="kind")]  # type: ignore[valid-type]


PassSpecUnion = _pass_union()


class Spec(StrictModel):
    version: Literal[1] = 1
    name: str | None = None
    model: ModelRef = Field(default_factory=ModelRef)
    passes: list[PassSpecUnion] = Field(default_factory=list)  # type: ignore[valid-type]
    train: TrainSpec = Field(default_factory=TrainSpec)

    @field_validator("passes", mode="before")
    @classmethod
    def _known_kinds(cls, value: Any) -> Any:
        # Say which kinds exist instead of pydantic's generic tag error.
        if isinstance(value, list):
            for i, item in enumerate(value):
                kind = item.get("kind") if isinstance(item, dict) else None
                if isinstance(item, dict) and not (isinstance(kind, str) and kind in PASS_REGISTRY):
                    raise ValueError(f"passes.{i}.kind: unknown pass kind {item.get('kind')!r} "
                                     f"(known: {', '.join(sorted(PASS_REGISTRY))})")
        return value

    @model_validator(mode="after")
    def _passes_agree_with_train(self) -> "Spec":
        problems = [(f"passes.{i}.{field}", msg) for i, p in enumerate(self.passes)
                    for field, msg in p.check_train(self.train)]
        if problems:
            raise SpecError(problems)
        return self


_TAGGED_TRAIN_FIELDS = ("data", "optimizer")  # discriminated unions inside `train:`


def spec_error(e: ValidationError, source: str | None = None, prefix: str | None = None) -> SpecError:
    """Turn pydantic's errors into `field.path: message (got value)` lines."""
    if not isinstance(e, ValidationError):
        return SpecError(str(e), source)
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        # Drop the union tags pydantic inserts ("passes.1.compander.a", "train.optimizer.sgd.lr").
        if len(loc) >= 3 and loc[0] == "passes" and loc[2] in PASS_REGISTRY:
            del loc[2]
        if len(loc) >= 3 and loc[0] == "train" and loc[1] in _TAGGED_TRAIN_FIELDS:
            del loc[2]
        if len(loc) >= 3 and loc[:2] == ["model", "example_input"]:  # the shape/tensor/inputs tag
            del loc[2]
            if len(loc) >= 4 and loc[2].isdigit() and loc[3] in ("shape", "tensor"):  # one of several
                del loc[3]
        if len(loc) >= 4 and loc[:2] == ["model", "example_kwargs"] and loc[3] in ("shape", "tensor"):
            del loc[3]
        path = ".".join(([prefix] if prefix else []) + loc)
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith(("passes.", "model.example_input")):
            path, _, msg = msg.partition(": ")
        got = err.get("input")
        if err["type"] not in ("missing",) and not isinstance(got, (dict, list)):
            msg += f" (got {short_repr(got)})"
        lines.append((path, msg))
    return SpecError(lines, source)


def parse_spec(data: Any, source: str | None = None) -> Spec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a mapping, not {type(data).__name__}", source)
    check_tree(data, source)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, source) from None
    except SpecError as e:  # raised by cross-section checks
        raise SpecError(e.errors, source) from None
    check_stored_size(spec.model_dump(mode="json", exclude_unset=True), source)  # what api.spec_dump stores
    return spec


def with_overrides(spec: Spec, updates: dict[str, Any], source: str) -> Spec:
    """`spec` with dotted fields replaced (e.g. {"train.seed": 3}), validated again like
    the spec itself; errors name `source` (e.g. the command-line option)."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    for dotted, value in updates.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return parse_spec(data, source)


def load_spec(path: str | Path) -> Spec:
    """Read a YAML spec file. Every problem is a SpecError naming the file and the field."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}", str(path)) from None
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e}", str(path)) from None
    return parse_spec_text(text, str(path))


def parse_spec_text(text: str | bytes, source: str | None = None) -> Spec:
    """Parse a YAML document (str, or bytes that must be UTF-8) into a Spec."""
    return parse_spec(load_yaml(text, source), source)


def spec_json_schema() -> str:
    return json.dumps(Spec.model_json_schema(), indent=2)
