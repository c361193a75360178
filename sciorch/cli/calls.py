"""Tool calls from the command line: to a running server's MCP endpoint with --url, else to the
server running on this home (sciorch.cli.link), else to an MCP server over this home's engine in
memory; either way each action is authorised and recorded
with who did it, exactly as when an agent calls the tool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import typer

from flows.manager import flow_manager
from mcp_server.connect import in_process, remote
from mcp_server.server import create_server
from mcp_server.steering_tools import campaign_manager
from sciorch.cli.app import fail, principal, settings_of
from sciorch.cli.link import EngineOps, ServerOps, open_ops

Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def session(
    ctx: typer.Context, url: str | None, token: str | None, body: Callable[[Call], Awaitable[Any]]
) -> Any:
    """Run `body` with a tool caller; a tool's error ends the command with its own line."""

    async def over(client: Any) -> Any:
        async with client:

            async def call(tool: str, args: dict[str, Any]) -> dict[str, Any]:
                res = await client.call_tool(tool, args, raise_on_error=False)
                if res.is_error:
                    text = "\n".join(getattr(c, "text", "") for c in res.content).strip()
                    fail(text or f"{tool} failed")
                return dict(res.structured_content or {})

            return await body(call)

    async def main() -> Any:
        if url is not None:
            return await over(remote(url, token))
        async with open_ops(settings_of(ctx), principal()) as ops:
            if isinstance(ops, ServerOps):  # the server on this home runs campaigns and flows
                return await over(await ops.client())
            assert isinstance(ops, EngineOps)
            campaigns = campaign_manager(ops.engine, auto_resume=False)
            flow_manager(ops.engine, auto_resume=False)
            try:
                return await over(in_process(create_server(ops.engine, principal=ops.who)))
            finally:
                await campaigns.shutdown()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        fail("interrupted", code=130)
