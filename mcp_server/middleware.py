"""Middleware: a structured audit log of every mutating call, a cap on argument size, and
per-principal rate limiting (fastmcp's token bucket keyed by the caller)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import mcp_types as mt
from fastmcp.exceptions import ToolError, ValidationError
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.server.middleware.rate_limiting import RateLimitError, RateLimitingMiddleware
from fastmcp.tools.base import ToolResult
from pydantic import ValidationError as PydanticValidationError

from mcp_server.toolset import refused, validation_text
from orchestrator.models import Principal

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
        size = len(json.dumps(context.message.arguments or {}, default=str))
        if size > self.max_bytes:
            raise refused(
                ToolError,
                f"invalid_input: arguments are {size} bytes; at most {self.max_bytes} are accepted",
            )
        return await call_next(context)


class ValidationErrors(Middleware):
    """Arguments that do not fit the tool's schema (wrong type, missing or unknown field) are
    refused by fastmcp before the tool runs, with pydantic's multi-line text and a link; answer
    them in the house format instead: 'invalid_input: <field>: <what is wrong>'."""

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        try:
            return await call_next(context)
        except ValidationError as exc:
            cause = exc.__cause__
            if isinstance(cause, PydanticValidationError):
                raise refused(ToolError, validation_text(cause)) from exc
            raise


class AuditLog(Middleware):
    """One JSON line per mutating tool call: when, who, which tool, arguments, outcome."""

    def __init__(
        self, path: Path, mutating: Collection[str], principal_of: Callable[[], Principal]
    ) -> None:
        self.path = path
        self.mutating = frozenset(mutating)
        self.principal_of = principal_of
        path.parent.mkdir(parents=True, exist_ok=True)

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
            "arguments": context.message.arguments or {},
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
            with self.path.open("a") as f:
                f.write(line + "\n")


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
