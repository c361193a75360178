"""Middleware: a structured audit log of every mutating call, a cap on argument size, and
per-principal rate limiting (fastmcp's token bucket keyed by the caller)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, cast

import mcp_types as mt
from fastmcp.exceptions import ValidationError
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.server.middleware.rate_limiting import RateLimitError, RateLimitingMiddleware
from fastmcp.tools.base import ToolResult
from pydantic import ValidationError as PydanticValidationError

from ground.errors import InvalidInput
from ground.models import Principal
from mcp_server.toolset import Refused, error_result, refusal

audit_log = logging.getLogger("sciorch.audit")

MAX_ARGUMENT_BYTES = 256 * 1024


class ArgumentSizeLimit(Middleware):
    """Refuse oversize tool arguments before anything parses them."""

    def __init__(self, max_bytes: int = MAX_ARGUMENT_BYTES) -> None:
        self.max_bytes = max_bytes

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        arguments = context.message.arguments or {}
        size = len(json.dumps(arguments, default=str))
        if size > self.max_bytes:
            # Named: the caller should know which value to shrink.
            sizes = {k: len(json.dumps(v, default=str)) for k, v in arguments.items()}
            largest = max(sizes, key=sizes.__getitem__, default="arguments")
            raise Refused(
                InvalidInput(
                    f"{largest}: {sizes.get(largest, size)} bytes; the arguments are {size} "
                    f"bytes, at most {self.max_bytes} are accepted",
                    field=largest,
                )
            )
        return await call_next(context)


class ErrorResults(Middleware):
    """Every refused call is answered the same way, its typed error as data next to the
    one-line text (`toolset.error_result`). Arguments that do not fit the tool's schema (wrong
    type, missing or unknown field) are refused by fastmcp before the tool runs, with
    pydantic's multi-line text and a link; they get the house format too:
    'invalid_input: <field>: <what is wrong>'. Outermost, so it sees every refusal."""

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        try:
            return await call_next(context)
        except Refused as exc:
            return error_result(exc.error)
        except ValidationError as exc:
            cause = exc.__cause__
            if isinstance(cause, PydanticValidationError):
                return error_result(refusal(cause).error)
            raise


AUDIT_MAX_BYTES = 10 << 20
AUDIT_BACKUPS = 5
AUDIT_VALUE_BYTES = 4096


def digest(value: Any, cap: int) -> Any:
    """`value` as the audit log keeps it: as is when its JSON is at most `cap` bytes, else
    {"sha256", "bytes"} of that JSON (enough to match it to a payload, never the payload)."""
    text = json.dumps(value, default=str, sort_keys=True)
    if len(text) <= cap:
        return value
    data = text.encode()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class AuditLog(Middleware):
    """One JSON line per mutating tool call: when, who, which tool, arguments, outcome. Each
    argument value over `value_bytes` (and all of them, if the rest is still over) is logged as
    its digest, refused calls included; the file rotates at `max_bytes`, keeping `backups`."""

    def __init__(
        self,
        path: Path,
        mutating: Collection[str],
        principal_of: Callable[[], Principal],
        *,
        max_bytes: int = AUDIT_MAX_BYTES,
        backups: int = AUDIT_BACKUPS,
        value_bytes: int = AUDIT_VALUE_BYTES,
    ) -> None:
        self.path = path
        self.mutating = frozenset(mutating)
        self.principal_of = principal_of
        self.value_bytes = value_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        # A handler of its own, on no logger: each server keeps its own file, whatever the
        # process's logging configuration.
        self._file = RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )

    def arguments(self, arguments: dict[str, Any]) -> Any:
        kept = {k: digest(v, self.value_bytes) for k, v in arguments.items()}
        return digest(kept, 4 * self.value_bytes)

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        name = context.message.name
        if name not in self.mutating:
            return await call_next(context)
        started = time.perf_counter()
        record: dict[str, Any] = {
            "at": datetime.now(UTC).isoformat(),
            "principal": self.principal_of().id,
            "tool": name,
            "arguments": self.arguments(context.message.arguments or {}),
        }
        try:
            result = await call_next(context)
        except Exception as exc:
            record["outcome"] = "error"
            record["error"] = str(exc)[:500]
            raise
        else:
            record["outcome"] = "ok"
            structured = result.structured_content or {}
            if isinstance(structured, dict) and "id" in structured:
                record["object_id"] = structured["id"]
            return result
        finally:
            record["ms"] = round((time.perf_counter() - started) * 1000, 2)
            line = json.dumps(record, default=str)
            audit_log.info(line)
            self._file.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))


# Requests that make the engine work; everything else (task status polls, listings, pings,
# subscriptions) is housekeeping. A client waiting on a task polls its status for as long as
# it runs: counted in full, a few waits would spend a principal's whole budget.
WORK_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})
HOUSEKEEPING_COST = 0.1


class RateLimit(RateLimitingMiddleware):
    """fastmcp's per-principal token bucket, where a tool call, resource read or prompt costs
    one token and any other request a tenth of one."""

    async def on_request(
        self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]
    ) -> Any:
        who = await self._get_client_identifier(context)
        cost = 1.0 if context.method in WORK_METHODS else HOUSEKEEPING_COST
        bucket = self.limiters[who]
        # consume() is typed for whole tokens; its arithmetic is float throughout.
        if not await bucket.consume(cast(int, cost)):
            # When the bucket will hold `cost` again, rounded up to a tenth of a second. Over
            # HTTP the refusal is a JSON-RPC error inside a 200 response, where no Retry-After
            # header can go: it says so in the text, and in the error's data.
            wait = math.ceil((cost - bucket.tokens) / bucket.refill_rate * 10) / 10
            refusal = RateLimitError(
                f"rate_limited: Rate limit exceeded for client: {who} (at most "
                f"{self.max_requests_per_second:g} calls per second, bursts of "
                f"{self.burst_capacity}); retry after {wait:g} s (retry_after_s={wait:g})"
            )
            refusal.error.data = {"retry_after_s": wait}
            raise refusal
        return await call_next(context)


def rate_limit(
    principal_of: Callable[[], Principal], per_second: float, burst: int | None
) -> RateLimit:
    return RateLimit(
        max_requests_per_second=per_second,
        burst_capacity=burst,
        get_client_id=lambda _ctx: principal_of().id,
    )
