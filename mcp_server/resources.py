"""MCP resources for entries, and the bridge that turns engine bus messages into
`ResourceUpdated` events for clients listening through `subscriptions/listen`."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import mcp_types
from fastmcp import FastMCP
from fastmcp.resources import ResourceContent, ResourceResult
from mcp.server.subscriptions import ListenHandler, ResourceUpdated, ServerEvent
from pydantic import BaseModel, ValidationError

import tools
from ground.contract import whole_utf8
from ground.errors import SciorchError
from ground.models import Message, Principal
from mcp_server.toolset import refused_read
from orchestrator.engine import Engine
from tools import models as m

ENTRY = "sciorch://entries/{entry_id}"
_ENTRY_URI = re.compile(r"^sciorch://entries/([^/]+)(?:/log|/results|/artifacts/.+)?$")
LOG_TAIL_BYTES = 256 * 1024

log = logging.getLogger("sciorch.mcp")


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
    if msg.kind == "warning":  # a deadline is near: the entry's reason says which
        return [entry]
    return []


def register_resources(mcp: FastMCP, engine: Engine, principal_of: Callable[[], Principal]) -> None:
    async def guarded(coro_fn: Callable[[Principal], object]) -> str:
        try:
            return str(await coro_fn(principal_of()))  # type: ignore[misc]
        except (SciorchError, ValidationError) as exc:  # an id from the URI that no id fits
            raise refused_read(exc) from exc

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

    @mcp.resource(
        ENTRY + "/artifacts/{path*}",
        description="A file the entry wrote to its output dir, with its MIME type: text as "
        "text, other files as a blob. The first 1 MiB of a bigger file (its `_meta` says the "
        "size); read_artifact reads on from next_offset",
    )
    async def artifact_resource(entry_id: str, path: str) -> ResourceResult:
        try:
            _, chunk = await engine.read_artifact(principal_of(), entry_id, path)
        except SciorchError as exc:
            raise refused_read(exc) from exc
        mime = m.mime_type_of(path)
        raw = chunk.data
        body: str | bytes = raw
        if m.is_text(mime):
            if chunk.next_offset < chunk.size:
                raw = whole_utf8(raw)
            body = raw.decode("utf-8", errors="replace")
        end = chunk.offset + len(raw)
        meta = {"size": chunk.size, "next_offset": end, "eof": end >= chunk.size}
        return ResourceResult([ResourceContent(body, mime_type=mime, meta=meta)])


class WatchBus:
    """The bus behind every listen stream. Each listener is kept with the principal that
    opened its stream, and an update reaches it only if that principal may see the URI when
    the update is published: revoking a share silences streams that are already open."""

    def __init__(
        self,
        principal_of: Callable[[], Principal],
        visible: Callable[[Principal, str], Awaitable[bool]],
    ) -> None:
        self._principal_of = principal_of
        self._visible = visible
        self._listeners: dict[object, tuple[Callable[[ServerEvent], None], Principal]] = {}

    async def publish(self, event: ServerEvent) -> None:
        uri = event.uri if isinstance(event, ResourceUpdated) else None
        verdicts: dict[tuple[str, bool], bool] = {}
        for listener, who in list(self._listeners.values()):
            if uri is not None:
                key = (who.id, who.admin)
                if key not in verdicts:
                    verdicts[key] = await self._visible(who, uri)
                if not verdicts[key]:
                    continue
            try:
                listener(event)
            except Exception:  # one broken stream must not starve the others
                log.exception("listen stream delivery failed; continuing")
        await asyncio.sleep(0)  # let the streams drain between bursts

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        # Called by the SDK's ListenHandler inside the listen request, so the principal
        # of the request is the principal of the stream.
        token = object()
        self._listeners[token] = (listener, self._principal_of())

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe


def attach_subscriptions(
    mcp: FastMCP,
    engine: Engine,
    principal_of: Callable[[], Principal],
    extra_visible: Callable[[Principal, str], Awaitable[bool | None]] | None = None,
) -> WatchBus:
    """Serve `subscriptions/listen` (fastmcp 4.1 does not) and feed it from the engine's bus.
    A listener learns only that a URI it names changed, and only while its principal may see
    that entry (URIs it may not see when it starts listening are left out of the honored
    filter, as if they did not exist); reading a URI is authorised as usual. `extra_visible`
    decides for URIs of other resources (campaigns): True or False, or None for "not mine"."""

    async def visible(who: Principal, uri: str) -> bool:
        if extra_visible is not None:
            verdict = await extra_visible(who, uri)
            if verdict is not None:
                return verdict
        match = _ENTRY_URI.match(uri)
        if match is None:
            return False
        try:
            await engine.get_entry(who, match.group(1))
        except SciorchError:
            return False
        return True

    sub_bus = WatchBus(principal_of, visible)
    handler = ListenHandler(sub_bus)

    async def listen(
        ctx: Any, params: mcp_types.SubscriptionsListenRequestParams
    ) -> mcp_types.SubscriptionsListenResult:
        wanted = params.notifications.resource_subscriptions
        if wanted:
            who = principal_of()
            kept = [uri for uri in wanted if await visible(who, uri)]
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


def updates_for(sub_bus: WatchBus, uri_of: Callable[[str], str]) -> Callable[[str], None]:
    """A listener for a manager's changes (campaigns, flow runs: called with an id, maybe
    outside the loop) that sends ResourceUpdated for `uri_of(id)` to subscriptions."""
    pending: set[asyncio.Task[None]] = set()

    def forward(ident: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(sub_bus.publish(ResourceUpdated(uri=uri_of(ident))))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return forward


@dataclass(frozen=True)
class RecordResource:
    """A resource `sciorch://<kind>/{<key>}` holding one record of a manager (a campaign, a
    flow run) as its get tool returns it: readable and watchable by whoever may get it, and
    updated whenever the manager says the record changed."""

    template: str
    description: str
    get: Callable[[Principal, str], Awaitable[BaseModel]]
    # May `who` see it: by default `get` succeeding; a manager may have a cheaper way.
    check: Callable[[Principal, str], Awaitable[object]] | None = None

    @property
    def _key(self) -> str:
        return self.template[self.template.index("{") + 1 : self.template.index("}")]

    def uri(self, ident: str) -> str:
        return self.template.format(**{self._key: ident})

    def ident(self, uri: str) -> str | None:
        prefix = self.template[: self.template.index("{")]
        rest = uri.removeprefix(prefix)
        return rest if rest != uri and rest and "/" not in rest else None

    def register(self, mcp: FastMCP, principal_of: Callable[[], Principal]) -> None:
        async def read(**params: str) -> str:
            try:
                view = await self.get(principal_of(), params[self._key])
            except SciorchError as exc:
                raise refused_read(exc) from exc
            return view.model_dump_json()

        # fastmcp matches the template's parameter to the function's by name (inspect.signature,
        # and pydantic reads the annotations), so `read` takes the template's own name.
        read.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(self._key, inspect.Parameter.KEYWORD_ONLY, annotation=str)],
            return_annotation=str,
        )
        read.__annotations__ = {self._key: str, "return": str}
        read.__name__ = self.template.split("://")[1].split("/")[0].replace("-", "_")
        mcp.resource(self.template, mime_type="application/json", description=self.description)(
            read
        )

    async def visible(self, who: Principal, uri: str) -> bool | None:
        """For subscriptions/listen: may `who` watch `uri` (None: not one of these records)."""
        ident = self.ident(uri)
        if ident is None:
            return None
        try:
            await (self.check or self.get)(who, ident)
        except SciorchError:
            return False
        return True

    def publish(self, listeners: list[Callable[[str], None]], sub_bus: WatchBus) -> None:
        """Send ResourceUpdated for a record's URI whenever its manager reports a change."""
        listeners.append(updates_for(sub_bus, self.uri))
