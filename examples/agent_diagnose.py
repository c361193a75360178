"""Claude finds out why an entry failed, read-only.

    export ANTHROPIC_API_KEY=sk-ant-...
    python examples/agent_diagnose.py ENTRY_ID           # in-process, on $SCIORCH_HOME
    python examples/agent_diagnose.py                    # first makes an entry that fails
    SCIORCH_URL=http://host:8765/mcp SCIORCH_TOKEN=... python examples/agent_diagnose.py ENTRY_ID

The run is read-only: Claude gets only the tools that change nothing (get_entry, read_logs, ...)
and follows the diagnose_entry playbook, which the goal matches.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from anthropic import AsyncAnthropic
from fastmcp import Client

from sciorch.agent import AgentConfig, connect, run_agent


async def failing_entry(client: Client[Any]) -> str:
    """A sim-instrument measurement with a simulated instrument fault (exit code 3)."""
    submitted = await client.call_tool(
        "submit_job", {"service": "sim-instrument", "parameters": {"fail": True, "duration_s": 0}}
    )
    entry_id = str((submitted.structured_content or {})["id"])
    await client.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 60})
    return entry_id


async def main(entry_id: str | None) -> int:
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("set ANTHROPIC_API_KEY first (export ANTHROPIC_API_KEY=sk-ant-...)", file=sys.stderr)
        return 2
    url, token = os.environ.get("SCIORCH_URL"), os.environ.get("SCIORCH_TOKEN")
    if entry_id is None:
        async with connect(url=url, token=token) as client:
            entry_id = await failing_entry(client)
        print(f"made {entry_id}, which fails", file=sys.stderr)
    config = AgentConfig(
        read_only=True, max_steps=10, max_cost_usd=0.5, transcript_path=Path("agent-diagnose.json")
    )
    async with connect(url=url, token=token, read_only=True) as client:
        result = await run_agent(
            f"Why did entry {entry_id} fail?", client, AsyncAnthropic(), config
        )
    print(result.answer)
    print(result.summary())
    return 0 if result.stopped_reason == "done" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None)))
