"""Connections to a sciorch MCP server for the clients inside sciorch (the agent runner, the
campaign runner, `sciorch steer --url`): one place that knows both transports.

- `remote(url, token)`: streamable HTTP with a bearer token.
- `in_process(server)`: the in-memory transport to a server of this process.
- `connect(...)`: either, connected, as an async context manager; in-process it opens an engine.
- `CampaignClients(engine)`: what the campaign manager is handed: a client acting as a given
  principal, through a server built for that principal (rate limits raised: its calls are the
  campaign's own), one server per principal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastmcp import Client, FastMCP
from fastmcp.client.auth import BearerAuth

from ground.config import Settings, default_home, load_settings
from ground.errors import InvalidInput
from ground.models import Principal
from orchestrator.engine import Engine


def remote(url: str, token: str | None) -> Client[Any]:
    """A client of the server at `url` (not connected yet)."""
    return Client(url, auth=BearerAuth(token) if token else None)


def in_process(server: FastMCP) -> Client[Any]:
    """A client of a server in this process (not connected yet)."""
    return Client(server)


@contextlib.asynccontextmanager
async def connect(
    *,
    url: str | None = None,
    token: str | None = None,
    settings: Settings | None = None,
    principal: Principal | None = None,
    read_only: bool = False,
) -> AsyncIterator[Client[Any]]:
    """A connected MCP client: to the server at `url` with a bearer `token`, or to an in-process
    server over an engine opened on `settings` (default: $SCIORCH_HOME), acting as `principal`
    (default: the local user). `read_only` makes the in-process server offer only read-only
    tools, so its user cannot change anything even through a mistake of its own."""
    if url:
        if not token:
            raise InvalidInput(
                "a remote server needs a bearer token: pass --token or set $SCIORCH_TOKEN "
                "(on the server: sciorch token create --sub NAME --scopes submit)",
                field="token",
            )
        async with remote(url, token) as client:
            yield client
        return

    from mcp_server.server import create_server, local_principal

    engine = await Engine.open(settings or load_settings(default_home()))
    try:
        server = create_server(
            engine, principal=principal or local_principal(), read_only=read_only
        )
        async with in_process(server) as client:
            yield client
    finally:
        await engine.close()


class CampaignClients:
    """Clients for campaign runners: `clients(principal)` acts as that principal through a
    server of its own (tools and resources, no campaign lifespan: see register_steering)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._servers: dict[tuple[str, bool], FastMCP] = {}

    def __call__(self, principal: Principal) -> Client[Any]:
        key = (principal.id, principal.admin)
        server = self._servers.get(key)
        if server is None:
            from mcp_server.server import create_server

            server = create_server(
                self.engine,
                principal=principal,
                rate_per_second=1000.0,
                rate_burst=2000,
                campaign_runner=True,
            )
            self._servers[key] = server
        return in_process(server)
