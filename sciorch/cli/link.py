"""What a command acts through: this process's own engine, or the `sciorch serve` already
running on the same home.

On SQLite one process owns a home (the engine's home lock). While `sciorch serve` runs there
it has left `<home>/server.json` (sciorch.web.discovery); a command then calls the same typed
operations as MCP tools on that server, over streamable HTTP, with a short-lived token it signs
itself with the home's key for the local user (as `sciorch token create` does). The answers are
the same pydantic models, so every command renders them the same either way. A file left by a
server killed with -9 (its process gone, or its address answering for someone else) is noticed,
said so on stderr, and the command works in this process as it does with no server; the file
is removed once this process holds the home. On PostgreSQL there is no home lock: a command is
a short-lived replica on the shared store (orchestrator.replicas) and needs no server.

`Ops` is the one surface commands use: `call(tools.x, request)` plus the two things that are no
single tool call (being told an entry's log grew, reading an artifact's bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx2
from fastmcp import Client
from mcp.client.subscriptions import ResourceUpdated, SubscriptionLost, listen
from pydantic import BaseModel

import tools
from ground.config import Settings
from ground.errors import ERROR_META_KEY, SciorchError
from ground.models import Message, Principal
from mcp_server.auth import create_token
from mcp_server.connect import remote
from mcp_server.toolset import TOOLS, ToolSpec
from orchestrator.engine import Engine
from sciorch.web.discovery import Discovery, discovery_path, read_discovery, remove_discovery
from tools.models import EntryRef, ReadResultsInput, WaitEntryInput, WaitResult

M = TypeVar("M", bound=BaseModel)
OnMessage = Callable[[Message], Awaitable[None]] | None

# Tokens the CLI signs for itself: long enough for any one command's calls, short enough that
# one left in a shell history is soon worthless. Renewed before a call when it is nearly spent.
TOKEN_TTL_S = 900
TOKEN_RENEW_S = 120
PROBE_TIMEOUT_S = 10.0
# Under the client's 300 s read timeout: a long wait is several calls.
REMOTE_WAIT_SLICE_S = 240.0
LOCAL_LOG_FALLBACK_S = 2.0

_SPECS: dict[Callable[..., Any], ToolSpec] = {spec.op: spec for spec in TOOLS}


class Ops(ABC):
    """The typed operations as one principal sees them, wherever they run."""

    who: Principal
    # How long one wait_entry call may wait (a longer wait is several).
    wait_slice_s: float
    # Whether an entry's URL answers only while a server runs (in-process: after this exits).
    server_running: bool

    @abstractmethod
    async def call(self, op: Callable[..., Awaitable[M]], req: BaseModel | None = None,
                   on_message: OnMessage = None) -> M:  # fmt: skip
        """The operation `op` of `tools` with `req` (and `on_message` for wait_entry)."""

    @abstractmethod
    def log_changes(self, entry_id: str) -> contextlib.AbstractAsyncContextManager[
        Callable[[], Awaitable[None]]
    ]:  # fmt: skip
        """A function that returns when the entry's log may have grown (or a while passed)."""

    @abstractmethod
    def artifact_bytes(self, entry_id: str, path: str) -> AsyncIterator[bytes]:
        """An artifact's content, a chunk at a time."""


class EngineOps(Ops):
    wait_slice_s = 86400.0
    server_running = False

    def __init__(self, engine: Engine, who: Principal) -> None:
        self.engine, self.who = engine, who

    async def call(self, op: Callable[..., Awaitable[M]], req: BaseModel | None = None,
                   on_message: OnMessage = None) -> M:  # fmt: skip
        if req is None:
            return await op(self.engine, self.who)
        if on_message is not None:
            return await op(self.engine, self.who, req, on_message)
        return await op(self.engine, self.who, req)

    @contextlib.asynccontextmanager
    async def log_changes(self, entry_id: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        wanted = ("log", "transition")
        async with self.engine.bus.subscribe(
            lambda m: m.entry_id == entry_id and m.kind in wanted
        ) as sub:

            async def changed() -> None:
                # Pushed by the engine; the timeout is only a bounded fallback.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.get(), timeout=LOCAL_LOG_FALLBACK_S)
                while not sub.queue.empty():
                    sub.queue.get_nowait()

            yield changed

    async def artifact_bytes(self, entry_id: str, path: str) -> AsyncIterator[bytes]:
        offset = 0
        while True:
            _, chunk = await self.engine.read_artifact(self.who, entry_id, path, offset)
            yield chunk.data
            offset = chunk.next_offset
            if not chunk.data or offset >= chunk.size:
                return


class ServerOps(Ops):
    """The same operations as tool calls on the server that `found` describes."""

    wait_slice_s = REMOTE_WAIT_SLICE_S
    server_running = True

    def __init__(self, found: Discovery, settings: Settings, who: Principal) -> None:
        self.found, self.settings, self.who = found, settings, who
        self._client: Client[Any] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._token = ""
        self._token_until = 0.0
        self._shown: dict[str, list[int]] = {}

    def token(self) -> str:
        if time.time() > self._token_until - TOKEN_RENEW_S:
            scopes = ["admin"] if self.who.admin else ["submit"]
            self._token = create_token(self.settings.keys_dir, self.who.id, scopes, TOKEN_TTL_S)
            self._token_until = time.time() + TOKEN_TTL_S
            if self._client is not None:  # a client keeps the token it was made with
                self._client = None
        return self._token

    async def client(self) -> Client[Any]:
        token = self.token()
        client = self._client
        if client is None:
            client = remote(self.found.mcp_url, token)
            await self._stack.enter_async_context(client)
            self._client = client
        return client

    async def probe(self) -> None:
        """Raises unless the server answers and accepts this home's token (a refused token:
        another home's server now has the address). Connecting is a request (server/discover)
        that carries the token."""
        await asyncio.wait_for(self.client(), PROBE_TIMEOUT_S)

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def call(self, op: Callable[..., Awaitable[M]], req: BaseModel | None = None,
                   on_message: OnMessage = None) -> M:  # fmt: skip
        if on_message is not None and isinstance(req, WaitEntryInput):
            return await self._wait_telling(req, on_message)  # type: ignore[return-value]
        model: M = await self._call(_SPECS[op], req)
        return model

    async def _call(self, spec: ToolSpec, req: BaseModel | None) -> Any:
        args = {} if req is None else req.model_dump(mode="json", exclude_none=True)
        try:
            res = await (await self.client()).call_tool(spec.name, args, raise_on_error=False)
        except (httpx2.HTTPError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise SciorchError(
                f"the server at {self.found.base_url} stopped answering ({detail})", field="server"
            ) from exc
        if res.is_error:
            error = SciorchError.from_dict((res.meta or {}).get(ERROR_META_KEY))
            text = "\n".join(getattr(c, "text", "") for c in res.content).strip()
            raise error or SciorchError(text or f"{spec.name} failed")
        return spec.output.model_validate(res.structured_content or {})

    async def _wait_telling(
        self, req: WaitEntryInput, on_message: Callable[[Message], Awaitable[None]]
    ) -> WaitResult:
        """wait_entry, telling `on_message` each transition and stream record meanwhile, as
        the engine's bus tells an in-process waiter. Over the current protocol a plain call
        carries no progress: the entry's resources are listened to instead, and what changed
        is read back from the entry (every transition is in it) and its results (by index),
        so nothing is missed even when updates come faster than they are read."""
        entry_id = req.entry_id
        shown = self._shown.setdefault(entry_id, [1, 0])  # [transitions, records]: not creation

        async def tell_transitions() -> None:
            view = await self._call(_SPECS[tools.get_entry], EntryRef(entry_id=entry_id))
            for tr in view.transitions[shown[0] :]:
                shown[0] += 1
                msg = Message(
                    kind="transition", entry_id=entry_id, state=tr.state, reason=tr.reason, at=tr.at
                )
                await on_message(msg)

        async def tell_records() -> None:
            while True:
                page = await self._call(
                    _SPECS[tools.read_results],
                    ReadResultsInput(entry_id=entry_id, since_record=shown[1]),
                )
                for record in page.records:
                    msg = Message(
                        kind="stream", entry_id=entry_id, record_index=shown[1], record=record,
                        at=datetime.now(UTC),
                    )  # fmt: skip
                    shown[1] += 1
                    await on_message(msg)
                if not page.more_records or not page.records:
                    return

        base = f"sciorch://entries/{entry_id}"
        client = await self.client()
        async with listen(client.session, resource_subscriptions=[base, base + "/results"]) as sub:
            waiting = asyncio.create_task(self._call(_SPECS[tools.wait_entry], req))
            try:
                await tell_transitions()
                await tell_records()
                while not waiting.done():
                    heard = asyncio.ensure_future(anext(sub))
                    await asyncio.wait({waiting, heard}, return_when=asyncio.FIRST_COMPLETED)
                    if not heard.done():
                        heard.cancel()
                        break
                    try:
                        event = heard.result()
                    except (StopAsyncIteration, SubscriptionLost):
                        await asyncio.wait({waiting})  # the stream ended: catch up after
                        break
                    if isinstance(event, ResourceUpdated) and event.uri == base:
                        await tell_transitions()
                    elif isinstance(event, ResourceUpdated):
                        await tell_records()
                res: WaitResult = await waiting
            finally:
                waiting.cancel()
        await tell_transitions()
        await tell_records()
        return res

    @contextlib.asynccontextmanager
    async def log_changes(self, entry_id: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        base = f"sciorch://entries/{entry_id}"
        client = await self.client()
        async with listen(client.session, resource_subscriptions=[base, base + "/log"]) as sub:
            ended = False

            async def changed() -> None:
                # Pushed by the server; the timeout is only a bounded fallback (and the
                # interval once the stream has ended).
                nonlocal ended
                if ended:
                    await asyncio.sleep(LOCAL_LOG_FALLBACK_S)
                    return
                try:
                    await asyncio.wait_for(anext(sub), timeout=LOCAL_LOG_FALLBACK_S)
                except TimeoutError:
                    pass
                except (StopAsyncIteration, SubscriptionLost):
                    ended = True

            yield changed

    async def artifact_bytes(self, entry_id: str, path: str) -> AsyncIterator[bytes]:
        # The server's download route streams the file as it is, where read_artifact would
        # hand text back decoded.
        url = f"{self.found.base_url}/entries/{quote(entry_id)}/artifacts/{quote(path)}"
        headers = {"authorization": f"Bearer {self.token()}"}
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=300.0)) as http:
            async with http.stream("GET", url, headers=headers) as resp:
                if resp.status_code != 200:
                    body = json.loads(await resp.aread() or b"{}")
                    raise SciorchError(str(body.get("error") or resp.status_code), field="path")
                async for data in resp.aiter_bytes():
                    yield data


def _say(text: str) -> None:
    from sciorch.cli.app import err

    err.print(text, style="yellow")


async def find_server(settings: Settings, who: Principal) -> tuple[ServerOps | None, bool]:
    """(the server running on this home, connected, or None; whether a discovery file was
    there that is not current, said so on stderr)."""
    found = None if settings.store_url else read_discovery(settings.home)
    if found is None:
        return None, False
    if not found.serves(settings.home):
        why = f"it describes a server of another home ({found.home})"
    elif not found.alive():
        why = f"its process {found.pid} is gone"
    else:
        ops = ServerOps(found, settings, who)
        try:
            await ops.probe()
        except Exception as exc:  # refused, not answering: not a server we can use
            await ops.aclose()
            detail = " ".join(str(exc).split()) or type(exc).__name__
            why = f"{found.mcp_url} does not answer for this home ({detail})"
        else:
            return ops, False
    _say(
        f"sciorch: not using {discovery_path(settings.home)}: {why}; working in this process "
        "instead"
    )
    return None, True


async def server_here(
    settings: Settings, who: Principal, ttl_s: int, read_only: bool = False
) -> tuple[str, str] | None:
    """(MCP URL, a token for `who` lasting `ttl_s`, only the read scope if `read_only`) of the
    server running on this home, if one answers: for the clients that speak MCP themselves (a
    campaign runner, the agent)."""
    server, _ = await find_server(settings, who)
    if server is None:
        return None
    await server.aclose()
    scopes = ["read"] if read_only else ["admin"] if who.admin else ["submit"]
    return server.found.mcp_url, create_token(settings.keys_dir, who.id, scopes, ttl_s)


@contextlib.asynccontextmanager
async def open_ops(settings: Settings, who: Principal) -> AsyncIterator[Ops]:
    """The server running on this home if there is one that answers, else an engine opened
    here (closed after)."""
    server, stale = await find_server(settings, who)
    if server is not None:
        try:
            yield server
        finally:
            await server.aclose()
        return
    engine = await Engine.open(settings)
    try:
        if stale:  # this process owns the home now: no server can be writing the file
            found = read_discovery(settings.home)
            if found is not None:
                remove_discovery(settings.home, found.pid)
        yield EngineOps(engine, who)
    finally:
        await engine.close()
