"""Claude finds the setting that maximises the simulated signal in N measurements.

    export ANTHROPIC_API_KEY=sk-ant-...
    python examples/agent_optimise.py [N]                # in-process, on $SCIORCH_HOME
    SCIORCH_URL=http://host:8765/mcp SCIORCH_TOKEN=... python examples/agent_optimise.py 30

The instrument is `sim-instrument` on the branin surface; its `value` is a cost, so the signal
is -value. If the server offers the steering tools (start_campaign) Claude runs a Gaussian-process
campaign with them; otherwise it chooses the points itself and submits them with submit_job.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from anthropic import AsyncAnthropic

from sciorch.agent import AgentConfig, connect, run_agent


def goal(n: int, steering: bool) -> str:
    how = (
        "Use the steering tools: start a campaign over x1 in [-5, 10] and x2 in [0, 15] with "
        "start_campaign, then follow it with get_campaign until it has finished."
        if steering
        else "Choose the points yourself: submit several sim-instrument jobs per turn with "
        "submit_job (each with an idempotency_key), wait for them, read their results and "
        "choose the next points near the best so far and where you know least."
    )
    return (
        "Find the setting that maximises the simulated signal in at most "
        f"{n} measurements: the signal is minus the `value` that sim-instrument measures on "
        f"the branin surface (x1 in [-5, 10], x2 in [0, 15]). {how} Answer with the best "
        "point, its value, how many measurements you used and their entry ids."
    )


async def main(n: int) -> int:
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("set ANTHROPIC_API_KEY first (export ANTHROPIC_API_KEY=sk-ant-...)", file=sys.stderr)
        return 2
    config = AgentConfig(
        max_steps=2 * n + 10, max_cost_usd=3.0, transcript_path=Path("agent-optimise.json")
    )
    url, token = os.environ.get("SCIORCH_URL"), os.environ.get("SCIORCH_TOKEN")
    async with connect(url=url, token=token) as client:
        steering = "start_campaign" in {t.name for t in await client.list_tools()}
        result = await run_agent(goal(n, steering), client, AsyncAnthropic(), config)
    print(result.answer)
    print(result.summary())
    return 0 if result.stopped_reason == "done" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)))
