"""`sciorch serve` (MCP over streamable HTTP or stdio, the proxy, /healthz) and `sciorch token`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import typer

from ground.models import (
    parse_duration_s,
)
from orchestrator.engine import Engine
from sciorch.cli.app import app, err, fail, guard, principal, settings_of


@app.command()
def serve(
    ctx: typer.Context,
    transport: Annotated[str, typer.Option(help="stdio or http", case_sensitive=False)] = "http",
    host: Annotated[str | None, typer.Option(help="address to listen on [config: host]")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on [config: port]")] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="offer only tools that change nothing")
    ] = False,
    disable_destructive: Annotated[
        bool,
        typer.Option("--disable-destructive", help="leave out tools that stop or cancel work"),
    ] = False,
) -> None:
    """Run the MCP server. http (default 127.0.0.1): MCP at /mcp with bearer-token auth (see
    `sciorch token create`), the per-entry service proxy and /healthz. stdio: MCP over
    stdin/stdout as the local user (for chat assistants that spawn it)."""
    from mcp_server.oauth import resource_server
    from mcp_server.server import create_server

    transport = transport.lower()
    if transport not in ("http", "stdio"):
        fail(f"unknown transport {transport!r}; use stdio or http", "transport")
    settings = guard(lambda: settings_of(ctx))
    if transport == "stdio":

        async def stdio() -> None:
            engine = await Engine.open(settings)
            try:
                server = create_server(
                    engine,
                    principal=principal(),
                    read_only=read_only,
                    disable_destructive=disable_destructive,
                )
                await server.run_stdio_async(show_banner=False)
            finally:
                await engine.close()

        with contextlib.suppress(KeyboardInterrupt):
            guard(lambda: asyncio.run(stdio()))
        return

    from sciorch.web.app import serve_http

    shown = f"http://{host or settings.host}:{settings.port if port is None else port}"
    err.print(f"sciorch: serving {settings.home} on {shown} (MCP at /mcp; Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        guard(
            lambda: asyncio.run(
                serve_http(
                    settings,
                    host,
                    port,
                    mcp_factory=lambda engine: create_server(
                        engine,
                        auth=resource_server(engine.settings),
                        read_only=read_only,
                        disable_destructive=disable_destructive,
                    ),
                )
            )
        )


token_app = typer.Typer(help="Bearer tokens for the HTTP MCP endpoint.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    sub: Annotated[str, typer.Option(help="the principal the token speaks for")],
    scopes: Annotated[
        str, typer.Option(help="comma list of read, submit, admin, sciorch.urgent")
    ] = "read",
    ttl: Annotated[str, typer.Option(help="lifetime, e.g. 3600, 30m, 1h, 7d")] = "1h",
) -> None:
    """Print one signed token on stdout (signed by this home's key, made on first use)."""
    from mcp_server.auth import create_token, parse_scopes

    settings = guard(lambda: settings_of(ctx))
    try:
        seconds = parse_duration_s(ttl)
    except ValueError as exc:
        fail(str(exc), "ttl")
    token = guard(lambda: create_token(settings.keys_dir, sub, parse_scopes(scopes), seconds))
    print(token)
