"""Typed errors that say what went wrong and what to do. Every layer raises these; the MCP layer
turns them into tool errors (the one-line `text()` for people, `to_dict()` as data for
programs), the CLI into a red line.

`invalid_input` is the one place a pydantic ValidationError becomes a typed error: every
loader, the tools and the CLI call it, so the field is named the same way everywhere."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

# Where a tool error's data sits in the error result's `_meta` (not in structuredContent:
# clients validate that against the tool's output schema, some even on error results).
ERROR_META_KEY = "sciorch/error"


class SciorchError(Exception):
    code = "error"

    def __init_subclass__(cls, *, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:  # without one a subclass keeps its parent's (SlurmError)
            cls.code = code

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        if self.details:
            out["details"] = self.details
        return out

    def text(self) -> str:
        """The one line a person reads (and clients older than the error data parse):
        `code: message [field: x]`."""
        return f"{self.code}: {self.message}" + (f" [field: {self.field}]" if self.field else "")

    @classmethod
    def from_dict(cls, data: Any) -> SciorchError | None:
        """The error `to_dict` describes (the class its code names), or None if `data` is
        not one."""
        if not isinstance(data, dict) or not isinstance(data.get("message"), str):
            return None
        code = data.get("code")
        kind = next((k for k in _subclasses(SciorchError) if k.code == code), SciorchError)
        field = data.get("field")
        err = kind(data["message"], field=field if isinstance(field, str) else None)
        details = data.get("details")
        if isinstance(details, dict):
            err.details = details
        if kind is SciorchError and isinstance(code, str):
            err.code = code
        return err


def _subclasses(cls: type[SciorchError]) -> list[type[SciorchError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# One line an error kind: its code is what clients match on (`to_dict`, `text`).
class InvalidInput(SciorchError, code="invalid_input"): ...
class UnknownService(InvalidInput, code="unknown_service"): ...
class InvalidParameters(InvalidInput, code="invalid_parameters"): ...
class NoSiteAvailable(SciorchError, code="no_site"): ...
class NotAllowed(SciorchError, code="not_allowed"): ...
class AccountNotMapped(NotAllowed, code="account_not_mapped"): ...
class Conflict(SciorchError, code="conflict"): ...
class LimitExceeded(SciorchError, code="limit_exceeded"): ...
class InvalidTransition(SciorchError, code="invalid_transition"): ...
class BackendError(SciorchError, code="backend_error"): ...


class NotSupported(SciorchError, code="not_supported"):
    """The site cannot do this at all (extend a job's time on a site without a scheduler)."""


class NotFound(SciorchError, code="not_found"):
    """Also raised for objects the caller may not see, so ids of others are not disclosed."""


class FieldValueError(ValueError):
    """Raised in a model validator about one of the model's inputs (`memory` of resources):
    pydantic places the error at the model, `invalid_input` names the input under it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# A whole-document check of ours names its field first ("acquisition: ...").
_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): ")
_SHOWN = 3


def _loc_part(part: object) -> str:
    """A location step as shown: quoted when it is empty or holds blanks or control characters
    (an unknown key chosen by a caller must not break the one-line error)."""
    text = str(part)
    if text and text.isprintable() and not any(c.isspace() for c in text):
        return text
    return json.dumps(text)


def invalid_input(
    exc: ValidationError,
    *,
    where: str | None = None,
    default_field: str | None = None,
    field_prefix: str = "",
) -> InvalidInput:
    """A ValidationError as one InvalidInput: 'field: what is wrong' for its first errors
    (prefixed with `where`, e.g. a file), the first error's dotted path as the field (after
    `field_prefix`, for a model that sits inside a larger document)."""
    errors = exc.errors(include_url=False, include_input=False)
    parts: list[str] = []
    first: str | None = None
    for err in errors[:_SHOWN]:
        loc = ".".join(_loc_part(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        cause = err.get("ctx", {}).get("error")
        named = _NAMED.match(msg)
        if isinstance(cause, FieldValueError):
            loc = ".".join(filter(None, (loc, cause.field)))
        elif not loc and named:
            loc, msg = named.group(1), msg[named.end() :]
        loc = loc or default_field or ""
        first = first if first is not None else loc
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - _SHOWN} more)" if len(errors) > _SHOWN else ""
    prefix = f"{where}: " if where else ""
    field = f"{field_prefix}{first}" if first else (field_prefix.rstrip(".") or None)
    return InvalidInput(prefix + "; ".join(parts) + more, field=field)


_TRACEBACK_HEAD = "Traceback (most recent call last):"
REASON_CHARS = 2000


def reason_line(text: str) -> str:
    """A failure reason as one line for clients: line breaks become ' | ', and a Python
    traceback in a log tail keeps only its last line (the exception); the whole traceback
    stays in the entry's log."""
    kept: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.strip() == _TRACEBACK_HEAD:
            in_traceback = True
            continue
        if in_traceback and (line[:1].isspace() or not line.strip()):
            continue  # frames, source lines, carets
        in_traceback = False
        if line.strip():
            kept.append(line.strip())
    out = " | ".join(kept).replace("log tail: |", "log tail:")
    return out if len(out) <= REASON_CHARS else out[: REASON_CHARS - 1] + "…"
