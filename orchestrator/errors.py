"""Typed errors that say what went wrong and what to do. Every layer raises these; the MCP layer
turns them into tool errors, the CLI into a red line."""

from __future__ import annotations

from typing import Any


class SciorchError(Exception):
    code = "error"

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


class InvalidInput(SciorchError):
    code = "invalid_input"


class UnknownService(InvalidInput):
    code = "unknown_service"


class InvalidParameters(InvalidInput):
    code = "invalid_parameters"


class NoSiteAvailable(SciorchError):
    code = "no_site"


class NotFound(SciorchError):
    """Also raised for objects the caller may not see, so ids of others are not disclosed."""

    code = "not_found"


class NotAllowed(SciorchError):
    code = "not_allowed"


class Conflict(SciorchError):
    code = "conflict"


class LimitExceeded(SciorchError):
    code = "limit_exceeded"


class InvalidTransition(SciorchError):
    code = "invalid_transition"


class BackendError(SciorchError):
    code = "backend_error"
