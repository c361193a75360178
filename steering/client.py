"""The runner's only way into sciorch: MCP tool calls through a fastmcp Client, in memory
(`Client(server)`) or over HTTP (`Client(url, auth=BearerAuth(token))`), as mcp_server.connect
makes them; steering is handed a factory of such clients and never builds one itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fastmcp import Client
from fastmcp.client.client import CallToolResult

from ground.errors import ERROR_META_KEY, SciorchError

log = logging.getLogger("sciorch.steering")


class ToolFailed(Exception):
    """A tool answered with an error: its code, message and field as the server sent them
    (the error data in the result's `_meta`); the text alone if the result has none."""

    def __init__(self, tool: str, text: str, error: SciorchError | None = None) -> None:
        self.tool = tool
        self.code = error.code if error else "error"
        self.message = error.message if error else text
        self.field = error.field if error else None
        super().__init__(f"{tool}: {text}")

    @classmethod
    def of(cls, tool: str, result: CallToolResult) -> ToolFailed:
        text = "\n".join(getattr(c, "text", "") for c in result.content).strip()
        error = SciorchError.from_dict((result.meta or {}).get(ERROR_META_KEY))
        return cls(tool, text or (error.text() if error else f"{tool} failed"), error)


class Tools:
    """Calls tools on one session. Transport failures (a remote server restarting) are retried
    with back-off on a fresh session for `patience_s`; tool errors are raised at once."""

    def __init__(self, make_client: Callable[[], Client[Any]], patience_s: float = 300.0) -> None:
        self._make = make_client
        self._client: Client[Any] | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._patience = patience_s
        self._reconnect_lock = asyncio.Lock()
        self._entered = False

    async def __aenter__(self) -> Tools:
        await self._open()
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._entered = False
        await self._close()

    async def _open(self) -> None:
        stack = contextlib.AsyncExitStack()
        client = self._make()
        await stack.enter_async_context(client)
        self._client, self._stack = client, stack

    async def _close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            try:
                await stack.aclose()
            except Exception as e:  # closing a broken session must not hide the real error
                log.debug("closing the MCP session: %s", e)

    async def _reconnect(self, broken: Client[Any] | None) -> None:
        async with self._reconnect_lock:
            if self._client is not broken:
                return  # another caller already reconnected
            await self._close()
            await self._open()

    async def call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._patience
        limited_until = loop.time() + max(60.0, self._patience)
        delay = 0.5
        while True:
            client = self._client
            if client is None and not self._entered:
                raise RuntimeError("Tools used outside `async with`")
            try:
                if client is None:  # the server was still down at the last reconnect
                    raise ConnectionError("not connected")
                result = await client.call_tool(name, args or {}, raise_on_error=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "rate limit" in str(exc).lower() and loop.time() < limited_until:
                    await asyncio.sleep(1.0)  # the server's per-principal rate limit
                    continue
                if loop.time() + delay > deadline:
                    raise
                log.warning("%s failed (%s); retrying in %.1f s", name, exc, delay)
                await asyncio.sleep(delay)  # back-off only while the server is unreachable
                delay = min(delay * 2, 30.0)
                try:
                    await self._reconnect(client)
                except Exception as again:
                    log.warning("reconnecting failed: %s", again)
                continue
            if result.is_error:
                raise ToolFailed.of(name, result)
            return dict(result.structured_content or {})
