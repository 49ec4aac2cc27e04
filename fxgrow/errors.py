"""Errors fxgrow raises on purpose. The CLI prints their message and exits with `exit_code`;
anything else is a bug and shows its traceback."""
from __future__ import annotations


class FxgrowError(Exception):
    """A known failure with a message meant for the user."""

    exit_code = 1


class SpecError(FxgrowError):
    """The spec is invalid. `errors` holds (field path, message) pairs."""

    exit_code = 2

    def __init__(self, errors: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in errors]
        super().__init__(where + "invalid spec\n  " + "\n  ".join(lines))


class ModelLoadError(FxgrowError):
    """MODEL does not name a loadable model."""

    exit_code = 2


class TraceError(FxgrowError):
    """torch.fx could not trace the model."""

    exit_code = 2


class PassError(FxgrowError):
    """A rewrite pass failed; the message names it and the passes that ran before it."""

    exit_code = 1


class UntrustedCodeError(FxgrowError):
    """A run folder names code (a model builder, a data function) that fxgrow will not
    import without the user's say-so; the message names it and how to allow it."""

    exit_code = 2
