"""The HTTP application: the per-entry service proxy, a health endpoint and (added by the MCP
server) the streamable-HTTP MCP endpoint at /mcp.

`create_http_app(engine, extra_routes=routes, lifespans=lifespans)` with `mcp_mount(mcp, settings)`
is all the MCP server needs to add itself; `serve_http` opens the engine and runs uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import h11
import uvicorn
from fastmcp import FastMCP
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ground.config import Settings
from mcp_server.proxy import EntryProxy
from orchestrator.engine import Engine

log = logging.getLogger("sciorch.http")

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[Any]]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
READY_TIMEOUT_S = 2.0


def create_http_app(
    engine: Engine,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    lifespans: Sequence[Lifespan] = (),
) -> Starlette:
    """The proxy routes plus GET /healthz (alive) and /readyz (the store answers).
    `extra_routes` come first (e.g. the MCP mount); `lifespans` are entered in order at
    start-up (e.g. the MCP app's session manager)."""
    proxy = EntryProxy(lambda: engine)

    async def healthz(request: Request) -> Response:
        try:
            sites = [
                {"name": s.name, "kind": s.kind, "status": s.status.value}
                for s in await engine.list_sites()
            ]
        except Exception as exc:  # a broken site must not make the server look dead
            log.warning("healthz: listing sites failed: %s", exc)
            sites = [{"name": name, "status": "unknown"} for name in engine.backends]
        return JSONResponse({"ok": True, "sites": sites})

    async def readyz(request: Request) -> Response:
        # Readiness, unlike liveness, follows the store: a replica that cannot reach PostgreSQL
        # leaves the Service's endpoints rather than being restarted (which would not help).
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):  # a hung store must not pile up probes
                await engine.store.schema_version()
        except Exception as exc:
            log.warning("readyz: store unreachable: %s", exc)
            return JSONResponse({"ok": False, "error": "store_unavailable"}, status_code=503)
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(proxy.aclose)
            for extra in lifespans:
                await stack.enter_async_context(extra(app))
            yield

    routes: list[BaseRoute] = [
        *extra_routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *proxy.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    app.state.proxy = proxy
    return app


def mcp_mount(
    mcp: FastMCP, settings: Settings, path: str = "/mcp"
) -> tuple[list[BaseRoute], list[Lifespan]]:
    """The streamable-HTTP MCP endpoint at `path`, with its session manager's lifespan.

    Answered at `path` itself: mounted as a sub-application it would live at `path/`, and
    Starlette would redirect every `path` request there with a Location built from the
    request's Host header, before any check. Host and Origin are checked first of all (DNS
    rebinding: fastmcp's guard, refusing a foreign Host with 421 and a foreign Origin with 403),
    before the bearer token. `path/` (where it used to live) is answered the same way."""
    from mcp_server.oauth import ResourceServer

    hosts, origins = mcp_allowlists(settings)
    mcp_app = mcp.http_app(
        path=path, host_origin_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )

    # RFC 9728 metadata lives at the origin's root, outside the MCP endpoint.
    well_known = mcp.auth.well_known_routes() if isinstance(mcp.auth, ResourceServer) else []
    routes: list[BaseRoute] = [
        *well_known,
        Route(path, endpoint=mcp_app),
        Route(path + "/", endpoint=_AtPath(mcp_app, path)),
    ]
    return routes, [mcp_app.lifespan]


class _AtPath:
    """An ASGI app handing every request to `app` as if it were made at `path` (an object, not
    a function: Starlette routes a function for GET only)."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app({**scope, "path": self.path}, receive, send)


def mcp_allowlists(settings: Settings) -> tuple[list[str], list[str]]:
    """(Host names, browser Origins) /mcp accepts besides what fastmcp's guard always does (the
    loopback names, the listen address, and an Origin that is the request's own): public_url's,
    loopback origins and the configured ones (fnmatch patterns)."""
    public = urlsplit(settings.public_url)
    hosts = [*([public.hostname] if public.hostname else []), *settings.allowed_hosts]
    origins = [
        *(f"{scheme}://{host}:*" for scheme in ("http", "https") for host in LOOPBACK_NAMES),
        # A literal, not a pattern: an IPv6 address's brackets would read as a character class.
        *([glob.escape(f"{public.scheme}://{public.netloc}")] if public.netloc else []),
        *settings.allowed_origins,
    ]
    return hosts, origins


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head.

    uvicorn's only timer on a connection is the keep-alive one, and the first byte of the next
    request stops it: a client that connects and sends nothing, or sends its headers a byte at
    a time, holds the connection (and a file descriptor and buffer) for as long as it likes. The
    deadline starts when the connection opens or the previous response ends and stops when a
    whole request head has arrived; the body and the response have no deadline (SSE streams
    last). A client cut off mid-head gets 408."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self.transport.write(REQUEST_TIMEOUT)
        log.info("closing %s: no whole request head in %gs", self.client, self.header_timeout_s)
        self.transport.close()


def http_protocol(settings: Settings) -> type[H11Protocol]:
    """The uvicorn HTTP protocol class with this configuration's header deadline."""
    return type(
        "HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": settings.http_header_timeout_s}
    )


def public_url_for(host: str, port: int) -> str:
    """The URL clients reach a server listening on host:port at."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def settings_for_listen(settings: Settings, host: str, port: int) -> Settings:
    """Make entry URLs point at this server: unless public_url was configured (file, environment
    or override), it follows the host and port the server listens on."""
    if "public_url" in settings.model_fields_set:
        return settings
    if (host, port) == (DEFAULT_HOST, DEFAULT_PORT):
        return settings
    return settings.model_copy(update={"public_url": public_url_for(host, port)})


async def serve_http(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    lifespans: Sequence[Lifespan] = (),
    log_level: str = "info",
    mcp_factory: Callable[[Engine], FastMCP] | None = None,
) -> None:
    """Open the engine, serve the HTTP app until SIGINT/SIGTERM, close the engine. With
    `mcp_factory`, the MCP server it builds over the engine answers at /mcp."""
    host = host if host is not None else settings.host
    port = port if port is not None else settings.port
    settings = settings_for_listen(settings, host, port)
    engine = await Engine.open(settings)
    closed = False

    async def close_engine() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await engine.close()
            log.info("engine closed")

    @contextlib.asynccontextmanager
    async def engine_lifespan(app: Starlette) -> AsyncIterator[None]:
        # Closed at the app's shutdown: after SIGTERM uvicorn re-raises the signal as soon as
        # it has shut down, so code after `server.serve()` may never run.
        try:
            yield
        finally:
            await close_engine()

    try:
        if mcp_factory is not None:
            mcp_routes, mcp_lifespans = mcp_mount(mcp_factory(engine), settings)
            extra_routes = [*mcp_routes, *extra_routes]
            lifespans = [*mcp_lifespans, *lifespans]
        app = create_http_app(
            engine, extra_routes=extra_routes, lifespans=[engine_lifespan, *lifespans]
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            lifespan="on",
            ws="websockets-sansio",
            proxy_headers=False,
            http=http_protocol(settings),
            timeout_keep_alive=settings.http_idle_timeout_s,
        )
        server = uvicorn.Server(config)
        log.info("sciorch HTTP on %s:%d, public URL %s", host, port, settings.public_url)
        await server.serve()
    finally:
        await close_engine()
