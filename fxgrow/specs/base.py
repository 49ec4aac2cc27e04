"""Building blocks every spec class uses: strict frozen models and layer targets."""
from __future__ import annotations

import re
import re._constants as _sre  # the parsed-regex vocabulary (stable since 3.11)
import re._parser as _sre_parse
from typing import Annotated, Any, Iterable, Mapping, NamedTuple, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, field_validator,
                      model_validator)

from ..errors import SpecError
from .document import short_repr



class StrictModel(BaseModel):
    """Frozen, no unknown fields: a typo in YAML is an error, never silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


MAX_REGEX_LENGTH = 500
MAX_REGEX_REPEATS = 4  # k free repeats in a row match an n-character path in O(n^(k+1)) steps
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)


def check_regex(pattern: str) -> None:
    """Compile a target regex, refusing the ones Python's backtracking matcher can take
    exponential time on: a repetition inside a repetition (`(a+)+`, `(.*)*`) or an
    alternation inside a repetition (`(a|a)*`), and more than MAX_REGEX_REPEATS repeats of
    variable count (`.*.*.*.*.*x` takes seconds on one 40-character path). What is left
    matches a module path in well under a millisecond. Raises ValueError with the reason."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regex longer than {MAX_REGEX_LENGTH} characters")
    try:
        re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise ValueError(f"bad regex: {e or type(e).__name__}") from None
    stack = [(parsed, False)]  # (sub-pattern, inside a repetition)
    free = 0
    while stack:
        sub, repeated = stack.pop()
        for op, av in sub:
            if op in _REPEATS:
                lo, hi, body = av
                free += lo != hi
                if free > MAX_REGEX_REPEATS:
                    raise ValueError(f"more than {MAX_REGEX_REPEATS} repeats of variable count (*, +, ?, {{m,n}}) "
                                     "can take seconds to match; split it into several `re:` entries")
                if hi > 1 and repeated:
                    raise ValueError("nested repetition (like `(a+)+`) can take exponential time to match; "
                                     "write it without a repeat inside a repeat")
                stack.append((body, repeated or hi > 1))
            elif op is _sre.BRANCH:
                if repeated:
                    raise ValueError("alternation inside a repetition (like `(a|b)*`) can take exponential "
                                     "time to match; use a character class or several `re:` entries")
                stack.extend((branch, repeated) for branch in av[1])
            elif op is _sre.SUBPATTERN:
                stack.append((av[3], repeated))
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                stack.append((av[1], repeated))
            elif op is _sre.ATOMIC_GROUP:
                stack.append((av, repeated))
            elif op is _sre.GROUPREF_EXISTS:
                stack.extend((branch, repeated) for branch in av[1:] if branch is not None)


# --- one vocabulary for time in training --------------------------------------------------

class At(StrictModel):
    """A point in training, exactly one of: `step` (once that many optimizer steps are done),
    `epoch` (at the start of that epoch, 0-based) or `fraction` (of all optimizer steps)."""

    step: int | None = Field(None, ge=0, description="once this many optimizer steps are done")
    epoch: int | None = Field(None, ge=0, description="at the start of this epoch (0-based)")
    fraction: float | None = Field(None, ge=0, le=1, description="of all optimizer steps")

    @model_validator(mode="after")
    def _exactly_one(self) -> "At":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        return self


def check_time(value: Any, at: type[At] = At) -> int | float | At:
    """A time as given: an int (optimizer steps), a float in [0, 1] (a fraction of training)
    or a mapping validated as `at`; anything else is an error that says so."""
    if isinstance(value, bool):
        raise ValueError("a time is an int (steps), a float (a fraction of training) or a mapping, not a bool")
    if isinstance(value, float) and not 0 <= value <= 1:
        raise ValueError("a float is a fraction of training and must be in [0, 1]; "
                         "give an int for a step count")
    if isinstance(value, int) and value < 0:
        raise ValueError("a step count must be >= 0")
    if isinstance(value, dict):
        return at.model_validate(value)  # its errors keep their field paths
    if not isinstance(value, (int, float, at)):
        raise ValueError(f"a time is an int (steps), a float (a fraction of training) or "
                         f"{{{'|'.join(at.model_fields)}: ...}}")
    return value


def time_type(at: type[At] = At) -> Any:
    """The field type of a time whose mapping form is `at` (one error per bad value, not
    one per union member)."""
    return Annotated[Union[StrictInt, StrictFloat, at], BeforeValidator(lambda v: check_time(v, at))]


# A time: an int counts optimizer steps, a float in [0, 1] is a fraction of training, or an `At`.
Time = time_type()


def resolve_time(value: int | float | At, total_steps: int, steps_per_epoch: int | None = None) -> int:
    """The optimizer step count a time stands for in a run of `total_steps`."""
    if isinstance(value, At):
        if value.epoch is not None:
            if steps_per_epoch is None:
                raise SpecError("a time in epochs needs the run's steps per epoch")
            return value.epoch * steps_per_epoch
        value = value.step if value.step is not None else value.fraction
    return value if isinstance(value, int) else round(value * total_steps)


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern == name


def check_layer_patterns(patterns: Iterable[str], words: tuple[str, ...] = ()) -> None:
    """A spec field listing layers: module paths, `re:` patterns (checked like targets'), or
    one of `words`; raises ValueError naming the bad entry."""
    for p in patterns:
        if p in words:
            continue
        if not p:
            raise ValueError("empty name")
        if p.startswith("re:"):
            try:
                check_regex(p[3:])
            except ValueError as e:
                raise ValueError(f"{short_repr(p)}: {e}") from None


class Selectable(NamedTuple):
    """What targets see of one layer: the type names it answers to (its kind's, e.g. Linear,
    and its own class's, e.g. timm's Linear or a user's MyLinear), the module path it belongs
    to (attention's two projections belong to the attention module), whether its weight is a
    matrix (default targets take every one that is) and why it cannot be rewritten ("" when
    it can; default targets leave it, and say so)."""

    types: tuple[str, ...]
    module: str = ""
    matrix: bool = True
    refusal: str = ""


class Targets(StrictModel):
    """Which layers a pass acts on.

    A layer is selected when its type is in `types` (by default: every layer holding a
    weight matrix that fxgrow can rewrite), it matches one of `names` (when given; exact
    module paths or `re:` regexes searched in the path) and matches no `exclude` entry. With
    `strict` (default), a `names`/`exclude` entry or an explicitly listed type that matches
    nothing is an error, and so is an empty selection.
    """

    types: list[str] | None = Field(None, description="layer types (class names such as Linear, Conv2d, Embedding, "
                                                       "MultiheadAttention); default: every weight matrix")
    names: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    strict: bool = True

    @field_validator("names", "exclude")
    @classmethod
    def _valid_regex(cls, patterns: list[str]) -> list[str]:
        check_layer_patterns(patterns)
        return patterns

    def select(self, layers: Mapping[str, "str | Selectable"], where: str = "targets") -> list[str]:
        """Pick names from `layers` ({path: type name or Selectable}, in graph order)."""
        table = _selectables(layers)
        chosen = [name for name, layer in table.items() if self.why_not(name, layer) is None]
        if self.strict:
            problems = self._unmatched(table, where)
            if not chosen:
                present = {t for layer in table.values() for t in layer.types}
                problems.append((where, f"selects no layer (layer types here: {_summary(present)})"))
            if problems:
                raise SpecError(problems)
        return chosen

    def why_not(self, name: str, layer: "str | Selectable") -> str | None:
        """Why these targets leave layer `name` (None: they select it)."""
        layer = layer if isinstance(layer, Selectable) else Selectable((layer,), name)
        named = any(_pattern_matches(p, n) for p in self.names for n in (name, layer.module))
        if self.names and not named:
            return "not in targets.names"
        if self.types is None:
            if not layer.matrix and not named:
                return "its weight is not a matrix (default targets take weight matrices; list its type in types)"
            if layer.refusal and not named:  # named: the rewrite says why it cannot
                return layer.refusal
        elif not any(t in self.types for t in layer.types):
            return f"its type {layer.types[-1]} is not in targets.types"
        excluded = next((p for p in self.exclude for n in (name, layer.module) if _pattern_matches(p, n)), None)
        if excluded is not None:
            return f"excluded by targets.exclude {excluded!r}"
        return None

    def _unmatched(self, layers: dict[str, Selectable], where: str) -> list[tuple[str, str]]:
        problems = []
        if self.types is not None:
            present = {t for layer in layers.values() for t in layer.types}
            for i, t in enumerate(self.types):
                if t not in present:
                    problems.append((f"{where}.types.{i}", f"no layer of type {t!r} (present: {_summary(present)})"))
        for field in ("names", "exclude"):
            for i, p in enumerate(getattr(self, field)):
                if not any(_pattern_matches(p, n) for name, layer in layers.items() for n in (name, layer.module)):
                    problems.append((f"{where}.{field}.{i}", f"{p!r} matches no targetable layer"))
        return problems


def _selectables(layers: Mapping[str, "str | Selectable"]) -> dict[str, Selectable]:
    return {name: layer if isinstance(layer, Selectable) else Selectable((layer,), name)
            for name, layer in layers.items()}


def _summary(types: Iterable[str]) -> str:
    types = sorted(set(types))
    return ", ".join(types) if types else "none"


class PassSpec(StrictModel):
    """Base of every pass's spec. Subclasses add `kind: Literal[...]` and their fields."""

    kind: str
    targets: Targets = Field(default_factory=Targets)

    def check_train(self, train) -> list[tuple[str, str]]:
        """Problems this pass has with the spec's `train:` section, as (field, message)
        with the field relative to this pass (e.g. "adaptive_fix"). Default: none."""
        return []
