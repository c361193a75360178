"""Drive a sciorch campaign from a Bluesky plan: the plan asks sciorch for points, moves ophyd
devices there, reads the detector and tells sciorch the value, until the campaign is done.

    bridge = SciorchBridge.connect("http://host:8765/mcp", token)
    RE(steer_plan(bridge, campaign_id, {"x1": motor1, "x2": motor2}, det, "det"))

The campaign is an external one (`objective.kind = "external"`, see steering.external), started
with the `start_campaign` tool. Installed with the `bluesky` extra (bluesky, ophyd).

The RunEngine runs plans on its own event loop, and an MCP session belongs to the loop that
opened it; so the MCP client lives on a thread and loop of its own (`SciorchBridge`), and the
plan waits for each call with `bps.wait_for` on a future of that loop: the RunEngine keeps
processing messages (pause, abort) while a call is out. The client retries while the server is
unreachable (steering.client.Tools: a restart, a kill -9), and every call is safe to repeat: an
ask carries an `ask_key` (a repeated ask returns the same points) and a tell a `tell_key` (a
point told twice is recorded once). After a server crash the plan carries on where it was.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from itertools import chain
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import Msg

from steering.client import Tools

Plan = Generator[Msg, Any, Any]


class SciorchBridge:
    """An MCP client to sciorch on a thread of its own, callable from any event loop (the
    RunEngine's) or from plain code."""

    def __init__(self, make_client: Callable[[], Any], patience_s: float = 300.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tools = Tools(make_client, patience_s)
        self._submit(self._tools.__aenter__()).result(timeout=patience_s)

    @classmethod
    def connect(cls, url: str, token: str | None = None, patience_s: float = 300.0) -> Any:
        from fastmcp import Client
        from fastmcp.client.auth import BearerAuth

        auth = BearerAuth(token) if token else None
        return cls(lambda: Client(url, auth=auth), patience_s)

    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call_sync(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._submit(self._tools.call(tool, args)).result()
        return result

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """Awaitable on any loop; the call itself runs on the bridge's."""
        result: dict[str, Any] = await asyncio.wrap_future(
            self._submit(self._tools.call(tool, args))
        )
        return result

    def plan_call(self, tool: str, args: dict[str, Any]) -> Plan:
        """A plan stub: the tool's structured result, without blocking the RunEngine."""
        tasks = yield from bps.wait_for([lambda: self.call(tool, args)])
        return tasks[0].result()

    def close(self) -> None:
        try:
            self._submit(self._tools.__aexit__(None, None, None)).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    def __enter__(self) -> SciorchBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def steer_plan(
    bridge: SciorchBridge,
    campaign_id: str,
    motors: Mapping[str, Any],
    detector: Any,
    field: str,
    n_per_batch: int = 1,
    *,
    noise_field: str | None = None,
    poll_s: float = 1.0,
    md: dict[str, Any] | None = None,
) -> Plan:
    """One Bluesky run measuring a campaign: ask for `n_per_batch` points, for each move the
    `motors` (space parameter name -> ophyd positioner) there, trigger and read the detector and
    the motors (one event), tell sciorch the reading `field` (and `noise_field` as its noise
    variance); until sciorch says the campaign is done. While it is paused, or every point of the
    budget is out, the plan waits `poll_s` and asks again."""
    session = secrets.token_hex(4)
    meta = {"sciorch_campaign": campaign_id, **(md or {})}

    def inner() -> Plan:
        asks = 0
        while True:
            asks += 1
            args = {
                "campaign_id": campaign_id,
                "n": n_per_batch,
                "ask_key": f"{campaign_id}-{session}-{asks}",
            }
            asked = yield from bridge.plan_call("ask_campaign", args)
            if asked.get("done"):
                return asked
            if not asked.get("points"):
                yield from bps.sleep(poll_s)
                continue
            for p in asked["points"]:
                unknown = sorted(set(p["point"]) - set(motors))
                if unknown:
                    raise KeyError(f"no motor for space parameters {unknown}")
                moves = chain.from_iterable((motors[k], v) for k, v in p["point"].items())
                yield from bps.mv(*moves)
                reading = yield from bps.trigger_and_read([detector, *motors.values()])
                tell: dict[str, Any] = {
                    "campaign_id": campaign_id,
                    "point_id": p["point_id"],
                    "value": float(reading[field]["value"]),
                    "tell_key": p["point_id"],
                }
                if noise_field is not None:
                    tell["noise_variance"] = float(reading[noise_field]["value"])
                told = yield from bridge.plan_call("tell_campaign", tell)
                if told.get("done"):
                    return told

    return (yield from bpp.run_wrapper(inner(), md=meta))  # type: ignore[no-untyped-call]
