"""A Bluesky RunEngine plan with ophyd.sim motors and a detector measures a sciorch campaign
over MCP (streamable HTTP, the current protocol) against a real `sciorch serve`, which is killed
with SIGKILL mid-campaign and started again: the plan carries on, nothing is lost or told twice."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bluesky import RunEngine
from ophyd.sim import SynSignal, motor1, motor2

from ground.config import load_settings
from mcp_server.auth import create_token
from steering.bluesky import SciorchBridge, steer_plan
from tests.mcp_helpers import free_socket, sdk_client
from tests.mcp_helpers import structured as sdk_structured
from tests.test_steering import _healthy, _kill_9, _start_serve

PEAK = (1.0, -2.0)
WIDTH = 1.5
BUDGET = 30

CAMPAIGN = {
    "name": "bluesky: 2D Gaussian peak",
    "objective": {"kind": "external", "field": "det", "goal": "maximise", "reference": 1.0},
    "space": [
        {"name": "motor1", "low": -5.0, "high": 5.0},
        {"name": "motor2", "low": -5.0, "high": 5.0},
    ],
    "budget": {"evaluations": BUDGET},
    "noise": {"variance": 1e-6},
    "seed": 11,
}


def peak(x: float, y: float) -> float:
    return math.exp(-((x - PEAK[0]) ** 2 + (y - PEAK[1]) ** 2) / (2 * WIDTH**2))


def _told(home: Path, cid: str) -> list[tuple[int, str, str, float | None, str | None]]:
    db = home / "steering.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return list(
                con.execute(
                    "SELECT seq, state, point, value, tell_key FROM evaluations "
                    "WHERE campaign_id = ? ORDER BY seq",
                    (cid,),
                )
            )
    except sqlite3.Error:
        return []


async def _start(base: str, token: str) -> str:
    async with sdk_client(base + "/mcp", token) as client:
        assert client.protocol_version == "2026-07-28"
        return str(sdk_structured(await client.call_tool("start_campaign", CAMPAIGN))["id"])


async def _get(base: str, token: str, cid: str) -> dict[str, Any]:
    async with sdk_client(base + "/mcp", token) as client:
        args = {"campaign_id": cid, "evaluations": True}
        return sdk_structured(await client.call_tool("get_campaign", args))


def test_a_bluesky_plan_completes_a_campaign_through_a_server_killed_mid_way(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    token = create_token(load_settings(home).keys_dir, "alice", ["read", "submit"], 600)
    with free_socket() as sock:
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    procs = [_start_serve(home, port)]
    det = SynSignal(
        func=lambda: peak(motor1.readback.get(), motor2.readback.get()), name="det"
    )
    killed_at: list[int] = []

    def kill_and_restart() -> None:
        """SIGKILL the server once a third of the points are told, then start it again."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(1 for r in _told(home, cid) if r[1] == "succeeded") >= BUDGET // 3:
                break
            time.sleep(0.02)
        killed_at.append(sum(1 for r in _told(home, cid) if r[1] == "succeeded"))
        _kill_9(procs[-1])
        procs.append(_start_serve(home, port))

    try:
        asyncio.run(_healthy(procs[0], base))
        cid = asyncio.run(_start(base, token))
        events: Counter[str] = Counter()
        RE = RunEngine({})
        RE.subscribe(lambda name, doc: events.update([name]))  # type: ignore[no-untyped-call]
        killer = threading.Thread(target=kill_and_restart, daemon=True)
        started = time.monotonic()
        with SciorchBridge.connect(base + "/mcp", token, patience_s=90) as bridge:
            killer.start()
            RE(steer_plan(bridge, cid, {"motor1": motor1, "motor2": motor2}, det, "det", 3))
        elapsed = time.monotonic() - started
        killer.join(5)
        view = asyncio.run(_get(base, token, cid))
    finally:
        for proc in procs:
            _kill_9(proc)
    assert killed_at and 0 < killed_at[0] < BUDGET, killed_at
    assert view["state"] == "completed", view["reason"]
    assert view["progress"]["succeeded"] == BUDGET
    rows = _told(home, cid)
    told = [r for r in rows if r[1] == "succeeded"]
    assert len(told) == BUDGET  # nothing lost
    assert len({r[2] for r in told}) == BUDGET and len({r[4] for r in told}) == BUDGET
    assert not [r for r in rows if r[1] != "succeeded"], rows  # no ask orphaned by the crash
    assert events["event"] == BUDGET and events["stop"] == 1  # each point measured once
    for _seq, _, point, value, _ in told:  # what the detector read is what sciorch recorded
        p = json.loads(point)
        assert math.isclose(value or 0.0, peak(p["motor1"], p["motor2"]), abs_tol=1e-6)
    best = view["best"]
    assert best["value"] > 0.95, best
    assert math.dist((best["point"]["motor1"], best["point"]["motor2"]), PEAK) < 0.5
    print(f"30-point campaign with a kill -9 at {killed_at[0]} told: {elapsed:.1f} s")
