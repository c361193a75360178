"""The streamable-HTTP MCP transport: where the endpoint is mounted in the HTTP app, and which
Host and Origin headers it accepts (DNS rebinding)."""

from __future__ import annotations

import glob
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

from fastmcp import FastMCP
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ground.config import Settings

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[Any]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


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


