"""The HTTP application: the per-entry service proxy, /healthz and /readyz, and (added by the MCP
server) the streamable-HTTP MCP endpoint at /mcp.

`create_http_app(engine, extra_routes=routes, lifespans=lifespans)` with
`mcp_server.transport.mcp_mount(mcp, settings)` is all the MCP server needs to add itself;
`serve_http` opens the engine and runs uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import uvicorn
from fastmcp import FastMCP
from fastmcp.server.auth import AuthProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ground.config import Settings
from mcp_server.server import bearer_reader
from mcp_server.transport import Lifespan, mcp_mount
from orchestrator.engine import Engine
from sciorch.web.artifacts import ArtifactDownloads, BearerReader
from sciorch.web.discovery import client_base, remove_discovery, write_discovery
from sciorch.web.edge import http_protocol
from sciorch.web.hooks import hook_routes
from sciorch.web.hub import Hub
from sciorch.web.proxy import EntryProxy
from sciorch.web.uploads import UploadRoutes

log = logging.getLogger("sciorch.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
READY_TIMEOUT_S = 2.0


def create_http_app(
    engine: Engine,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    lifespans: Sequence[Lifespan] = (),
    bearer: BearerReader | None = None,
    auth: AuthProvider | None = None,
    uploader: BearerReader | None = None,
) -> Starlette:
    """The proxy routes plus GET /healthz (alive) and /readyz (the store answers) and artifact
    downloads. `extra_routes` come first (e.g. the MCP mount); `lifespans` are entered in
    order at start-up (e.g. the MCP app's session manager); `bearer` names who an MCP bearer
    token is (`mcp_server.server.bearer_reader`), for downloads with the /mcp token; `uploader`
    the same with the submit scope, for uploads of inputs (/uploads); `auth` (the MCP server's)
    checks the tokens people sign in to the web hub with."""
    proxy = EntryProxy(lambda: engine)
    downloads = ArtifactDownloads(engine, bearer, proxy.asgi)
    hub = Hub(engine, auth)

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
        *downloads.routes(),
        *hook_routes(engine),
        *UploadRoutes(engine, uploader).routes(),
        *proxy.routes(),
        *hub.routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    app.state.proxy = proxy
    app.state.hub = hub
    return app


def hub_banner(app: Starlette) -> list[str]:
    """Where the web hub is, and on the embedded default the local user's sign-in link."""
    hub: Hub = app.state.hub
    return hub.banner()


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
            remove_discovery(settings.home)
            await close_engine()

    try:
        bearer = uploader = None
        if mcp_factory is not None:
            mcp = mcp_factory(engine)
            bearer = bearer_reader(mcp)
            uploader = bearer_reader(mcp, "submit")
            mcp_routes, mcp_lifespans = mcp_mount(mcp, settings)
            extra_routes = [*mcp_routes, *extra_routes]
            lifespans = [*mcp_lifespans, *lifespans]
        app = create_http_app(
            engine,
            extra_routes=extra_routes,
            lifespans=[engine_lifespan, *lifespans],
            bearer=bearer,
            auth=mcp.auth if mcp_factory is not None else None,
            uploader=uploader,
        )
        for line in hub_banner(app):
            print(line, file=sys.stderr, flush=True)
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
        server = _Announced(config, None if settings.store_url else settings.home)
        log.info("sciorch HTTP on %s:%d, public URL %s", host, port, settings.public_url)
        await server.serve()
    finally:
        remove_discovery(settings.home)
        await close_engine()


class _Announced(uvicorn.Server):
    """A server that, once it listens, leaves a discovery file in `home` (sciorch.web.discovery)
    for the CLI on that home; on PostgreSQL (home None) the CLI uses the store itself."""

    def __init__(self, config: uvicorn.Config, home: Path | None) -> None:
        super().__init__(config)
        self.home = home

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.home is not None and self.servers:
            # The bound port, not the configured one: --port 0 binds any free port.
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            write_discovery(self.home, client_base(str(host), int(port)))
