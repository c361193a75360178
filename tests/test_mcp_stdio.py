"""`sciorch serve --transport stdio` spawned as a real subprocess by the official `mcp` SDK's
stdio client, as a chat assistant spawns it, on a temporary SCIORCH_HOME."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import mcp
from mcp.client.stdio import StdioServerParameters

from mcp_server.toolset import TOOLS
from tests.mcp_helpers import (
    CORE_READ_TOOLS,
    CORE_TOOLS,
    assert_only_read_only,
    assert_tool_error,
    core,
    structured,
)

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def stdio_server(home: Path, *flags: str) -> AsyncIterator[mcp.Client]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sciorch.cli", "serve", "--transport", "stdio", *flags],
        env={
            "SCIORCH_HOME": str(home),
            "SCIORCH_PRINCIPAL": "stdio-user",
            "FASTMCP_CHECK_FOR_UPDATES": "off",
        },
        cwd=ROOT,
    )
    async with mcp.Client(params, read_timeout_seconds=60) as client:
        yield client


async def test_stdio_server_lists_submits_and_waits(tmp_path: Path) -> None:
    async with stdio_server(tmp_path / "home") as client:
        tools = (await client.list_tools()).tools
        assert [t.name for t in tools if t.name in CORE_TOOLS] == [s.name for s in TOOLS]
        job = structured(
            await client.call_tool(
                "submit_job",
                {"service": "sim-instrument", "parameters": {"duration_s": 0.8, "records": 2}},
            )
        )
        assert job["submitted_by"] == "stdio-user"  # $SCIORCH_PRINCIPAL
        updates: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append(message or "")

        waited = structured(
            await client.call_tool(
                "wait_entry",
                {"entry_id": job["id"], "timeout_seconds": 30},
                progress_callback=on_progress,
            )
        )
        assert waited["entry"]["state"] == "succeeded" and waited["timed_out"] is False
        assert updates[-1] == "state: succeeded"
        records = [u.split(":")[0] for u in updates if u.startswith("record ")]
        assert records == ["record 0", "record 1"], updates
        results = structured(await client.call_tool("read_results", {"entry_id": job["id"]}))
        assert isinstance(results["result"]["value"], float) and len(results["records"]) == 2
        bad = await client.call_tool("get_entry", {"entry_id": 7})
        assert_tool_error(bad, "invalid_input", "entry_id")
        assert (await client.list_tools()).tools  # still answering
    assert (tmp_path / "home" / "logs" / "audit.jsonl").read_text().count('"submit_job"') == 1


async def test_stdio_cli_read_only_switch(tmp_path: Path) -> None:
    async with stdio_server(tmp_path / "home", "--read-only") as client:
        tools = (await client.list_tools()).tools
        assert core(t.name for t in tools) == CORE_READ_TOOLS
        assert_only_read_only(tools)
        refused = await client.call_tool("submit_job", {"service": "sim-instrument"})
        assert refused.is_error
        listed = structured(await client.call_tool("list_entries", {}))
        assert listed["entries"] == []
