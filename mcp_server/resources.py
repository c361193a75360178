"""MCP resources for entries, and the bridge that turns engine bus messages into
`ResourceUpdated` events for clients listening through `subscriptions/listen`."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types
from fastmcp import FastMCP
from fastmcp.exceptions import ResourceError
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated

import tools
from mcp_server.toolset import error_text, refused
from orchestrator.engine import Engine
from orchestrator.errors import SciorchError
from orchestrator.models import Message, Principal
from tools import models as m

ENTRY = "sciorch://entries/{entry_id}"
_ENTRY_URI = re.compile(r"^sciorch://entries/([^/]+)(?:/log|/results)?$")
LOG_TAIL_BYTES = 256 * 1024


def entry_uris(entry_id: str) -> tuple[str, str, str]:
    base = ENTRY.format(entry_id=entry_id)
    return base, base + "/log", base + "/results"


def uris_for(msg: Message) -> list[str]:
    """Which resources a bus message changes."""
    if msg.entry_id is None:
        return []
    entry, log, results = entry_uris(msg.entry_id)
    if msg.kind == "transition":
        return [entry, results] if msg.state and msg.state.terminal else [entry]
    if msg.kind == "log":
        return [log]
    if msg.kind == "stream":
        return [results]
    return []


def register_resources(mcp: FastMCP, engine: Engine, principal_of: Callable[[], Principal]) -> None:
    async def guarded(coro_fn: Callable[[Principal], object]) -> str:
        try:
            return str(await coro_fn(principal_of()))  # type: ignore[misc]
        except SciorchError as exc:
            raise refused(ResourceError, error_text(exc)) from exc

    @mcp.resource(ENTRY, mime_type="application/json", description="An entry (as get_entry)")
    async def entry_resource(entry_id: str) -> str:
        async def get(p: Principal) -> str:
            view = await tools.get_entry(engine, p, m.EntryRef(entry_id=entry_id))
            return view.model_dump_json()

        return await guarded(get)

    @mcp.resource(
        ENTRY + "/log", mime_type="text/plain", description="The last 256 KiB of the entry's log"
    )
    async def log_resource(entry_id: str) -> str:
        async def get(p: Principal) -> str:
            head = await tools.read_logs(engine, p, m.ReadLogsInput(entry_id=entry_id, limit=1))
            start = max(0, head.size - LOG_TAIL_BYTES)
            chunk = await tools.read_logs(
                engine, p, m.ReadLogsInput(entry_id=entry_id, offset=start, limit=LOG_TAIL_BYTES)
            )
            return chunk.data

        return await guarded(get)

    @mcp.resource(
        ENTRY + "/results",
        mime_type="application/json",
        description="Final result, intermediate records and artifacts (as read_results)",
    )
    async def results_resource(entry_id: str) -> str:
        async def get(p: Principal) -> str:
            res = await tools.read_results(engine, p, m.ReadResultsInput(entry_id=entry_id))
            return json.dumps(res.model_dump(mode="json"))

        return await guarded(get)


def attach_subscriptions(
    mcp: FastMCP,
    engine: Engine,
    principal_of: Callable[[], Principal] | None = None,
    extra_visible: Callable[[str], Awaitable[bool | None]] | None = None,
) -> InMemorySubscriptionBus:
    """Serve `subscriptions/listen` (fastmcp 4.1 does not) and feed it from the engine's bus.
    A listener learns only that a URI it names changed, and only for entries it may see
    (with `principal_of`, the others are left out of the honored filter as if they did not
    exist); reading a URI is authorised as usual. `extra_visible` decides for URIs of other
    resources (campaigns): True or False, or None for "not mine"."""
    sub_bus = InMemorySubscriptionBus()
    handler = ListenHandler(sub_bus)

    async def visible(uri: str) -> bool:
        if extra_visible is not None:
            verdict = await extra_visible(uri)
            if verdict is not None:
                return verdict
        match = _ENTRY_URI.match(uri)
        if match is None or principal_of is None:
            return match is not None
        try:
            await engine.get_entry(principal_of(), match.group(1))
        except SciorchError:
            return False
        return True

    async def listen(
        ctx: Any, params: mcp_types.SubscriptionsListenRequestParams
    ) -> mcp_types.SubscriptionsListenResult:
        wanted = params.notifications.resource_subscriptions
        if wanted:
            kept = [uri for uri in wanted if await visible(uri)]
            notifications = params.notifications.model_copy(
                update={"resource_subscriptions": kept or None}
            )
            params = params.model_copy(update={"notifications": notifications})
        return await handler(ctx, params)

    mcp._mcp_server.add_request_handler(
        "subscriptions/listen", mcp_types.SubscriptionsListenRequestParams, listen
    )
    pending: set[asyncio.Task[None]] = set()

    def forward(msg: Message) -> None:
        for uri in uris_for(msg):
            task = asyncio.get_running_loop().create_task(sub_bus.publish(ResourceUpdated(uri=uri)))
            pending.add(task)
            task.add_done_callback(pending.discard)

    engine.bus.add_listener(forward)
    return sub_bus
