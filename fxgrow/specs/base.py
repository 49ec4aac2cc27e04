"""Building blocks every spec class uses: strict frozen models and layer targets."""
from __future__ import annotations

import re
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import SpecError

# Layer types a pass can target by default: the ones functionalization understands.
WEIGHT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


class StrictModel(BaseModel):
    """Frozen, no unknown fields: a typo in YAML is an error, never silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern == name


class Targets(StrictModel):
    """Which layers a pass acts on.

    A layer is selected when its type is in `types`, it matches one of `names` (when
    given; exact module paths or `re:` regexes searched in the path) and matches no
    `exclude` entry. With `strict` (default), a `names`/`exclude` entry or an explicitly
    listed type that matches nothing is an error, and so is an empty selection.
    """

    types: list[str] = Field(default_factory=lambda: list(WEIGHT_LAYER_TYPES))
    names: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    strict: bool = True

    @field_validator("names", "exclude")
    @classmethod
    def _valid_regex(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {p!r}: {e}") from None
            elif not p:
                raise ValueError("empty name")
        return patterns

    def select(self, layers: dict[str, str], where: str = "targets") -> list[str]:
        """Pick names from `layers` ({module path: type name}, in graph order)."""
        chosen = [
            name for name, typ in layers.items()
            if typ in self.types
            and (not self.names or any(_pattern_matches(p, name) for p in self.names))
            and not any(_pattern_matches(p, name) for p in self.exclude)
        ]
        if self.strict:
            problems = self._unmatched(layers, where)
            if not chosen:
                problems.append((where, f"selects no layer (layer types here: {_summary(layers.values())})"))
            if problems:
                raise SpecError(problems)
        return chosen

    def _unmatched(self, layers: dict[str, str], where: str) -> list[tuple[str, str]]:
        problems = []
        if "types" in self.model_fields_set:
            present = set(layers.values())
            for i, t in enumerate(self.types):
                if t not in present:
                    problems.append((f"{where}.types.{i}", f"no layer of type {t!r} (present: {_summary(present)})"))
        for field in ("names", "exclude"):
            for i, p in enumerate(getattr(self, field)):
                if not any(_pattern_matches(p, n) for n in layers):
                    problems.append((f"{where}.{field}.{i}", f"{p!r} matches no targetable layer"))
        return problems


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
