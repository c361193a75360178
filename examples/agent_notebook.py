"""Claude launches a GPU notebook on sciorch and hands back the link.

    export ANTHROPIC_API_KEY=sk-ant-...
    python examples/agent_notebook.py                    # in-process, on $SCIORCH_HOME
    SCIORCH_URL=http://host:8765/mcp SCIORCH_TOKEN=... python examples/agent_notebook.py

The notebook is the `http-app` service (a stand-in for Jupyter in the built-in catalogue). In
process, the link is served by `sciorch serve` on the same home: start it to open the link.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from anthropic import AsyncAnthropic

from sciorch.agent import AgentConfig, connect, run_agent

GOAL = (
    "Launch a GPU notebook and give me the link: start the http-app service with 1 GPU if a "
    "site that is up offers GPUs (otherwise without a GPU, and say so), wait until it is "
    "ready, and answer with its access_url, entry id and site."
)


def confirm(tool: str, arguments: dict[str, object]) -> bool:
    return input(f"Claude wants to run {tool} {arguments}. Allow? [y/N] ").strip() == "y"


async def main() -> int:
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("set ANTHROPIC_API_KEY first (export ANTHROPIC_API_KEY=sk-ant-...)", file=sys.stderr)
        return 2
    config = AgentConfig(
        max_steps=15, max_cost_usd=1.0, transcript_path=Path("agent-notebook.json")
    )
    url, token = os.environ.get("SCIORCH_URL"), os.environ.get("SCIORCH_TOKEN")
    async with connect(url=url, token=token) as client:
        result = await run_agent(GOAL, client, AsyncAnthropic(), config, confirm=confirm)
    print(result.answer)
    for link in result.evidence.urls:
        print("link:", link)
    print(
        f"({result.stopped_reason}; {result.steps} steps; ~${result.cost_usd:.2f}; "
        f"transcript {result.transcript_path})"
    )
    return 0 if result.stopped_reason == "done" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
