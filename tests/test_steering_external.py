"""Campaigns measured elsewhere (ask/tell over MCP) and people in the loop (pause, budget and
stop rules, added and rejected points, notes, export), through the real MCP tools with real
gpCAM; the HTTP and kill -9 cases are in tests/test_bluesky.py."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client

from ground.models import Principal
from mcp_server.server import create_server
from mcp_server.steering_tools import campaign_manager
from orchestrator.engine import Engine
from orchestrator.payloads.surfaces import SURFACES
from steering.space import Space, min_distances
from steering.spec import parse_spec
from tests.conftest import campaign_engine, make_settings, shutdown
from tests.mcp_helpers import text_of
from tests.processes import HIDE_PYARROW

ALICE = Principal(id="alice")
BOB = Principal(id="bob")
BRANIN = SURFACES["branin"]


def external_spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "objective": {"kind": "external", "field": "value", "goal": "minimise"},
        "space": [
            {"name": "x1", "low": -5.0, "high": 10.0},
            {"name": "x2", "low": 0.0, "high": 15.0},
        ],
        "budget": {"evaluations": 12},
        "noise": {"variance": 1e-4},
        "seed": 5,
    }
    spec.update(over)
    return spec


def structured(result: Any) -> dict[str, Any]:
    return dict(result.structured_content or {})


def branin(point: dict[str, Any]) -> float:
    return BRANIN([point["x1"], point["x2"]])


eng = campaign_engine()


@pytest.fixture
async def alice(eng: Engine) -> AsyncIterator[Client[Any]]:
    async with Client(create_server(eng, principal=ALICE)) as client:
        yield client


async def call(client: Client[Any], tool: str, **args: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, args))


async def test_an_external_campaign_is_asked_and_told_over_mcp(alice: Client[Any]) -> None:
    started = await call(alice, "start_campaign", **external_spec())
    cid = started["id"]
    assert started["kind"] == "external" and started["service"] is None
    told = 0
    while True:
        asked = await call(alice, "ask_campaign", campaign_id=cid, n=2)
        if asked["done"]:
            break
        assert asked["points"], asked
        for p in asked["points"]:
            res = await call(
                alice, "tell_campaign", campaign_id=cid, point_id=p["point_id"],
                value=branin(p["point"]),
            )
            assert res["recorded"] is True
            told += 1
            again = await call(
                alice, "tell_campaign", campaign_id=cid, point_id=p["point_id"], value=99.0
            )
            assert again["recorded"] is False and again["value"] == res["value"]
    view = await call(alice, "get_campaign", campaign_id=cid)
    assert view["state"] == "completed", view["reason"]
    assert told == 12 and view["progress"]["succeeded"] == 12
    assert view["best"]["value"] < 5.0


async def test_asks_repeat_by_key_leases_pass_and_untold_points_are_accepted(
    alice: Client[Any],
) -> None:
    cid = (await call(alice, "start_campaign", **external_spec(
        objective={"kind": "external", "goal": "minimise", "ask_timeout_s": 0.5}
    )))["id"]
    first = await call(alice, "ask_campaign", campaign_id=cid, n=2, ask_key="k1")
    again = await call(alice, "ask_campaign", campaign_id=cid, n=2, ask_key="k1")
    assert [p["point_id"] for p in again["points"]] == [p["point_id"] for p in first["points"]]
    assert first["pending"] == 2
    mine = {"x1": 3.0, "x2": 2.5}  # never suggested
    res = await call(alice, "tell_campaign", campaign_id=cid, point=mine, value=branin(mine),
                     tell_key="t1")
    dup = await call(alice, "tell_campaign", campaign_id=cid, point=mine, value=1.0,
                     tell_key="t1")
    assert res["recorded"] and not dup["recorded"] and dup["point_id"] == res["point_id"]
    bad = await alice.call_tool(
        "tell_campaign", {"campaign_id": cid, "point": {"x1": 30.0, "x2": 1.0}, "value": 1.0},
        raise_on_error=False,
    )
    assert bad.is_error and "point.x1" in text_of(bad) and "outside" in text_of(bad)
    await asyncio.sleep(1.0)
    view = await call(alice, "get_campaign", campaign_id=cid)
    states = {e["point_id"]: e for e in view["evaluations"]}
    assert [states[p["point_id"]]["state"] for p in first["points"]] == ["released"] * 2
    assert states[res["point_id"]]["source"] == "external"
    late = first["points"][0]  # a late measurement is still a measurement
    told = await call(alice, "tell_campaign", campaign_id=cid, point_id=late["point_id"],
                      value=branin(late["point"]))
    assert told["recorded"] and told["told"] == 2


async def test_people_steer_an_external_campaign_and_every_action_is_recorded(
    eng: Engine, alice: Client[Any]
) -> None:
    cid = (await call(alice, "start_campaign", **external_spec()))["id"]
    paused = await call(alice, "pause_campaign", campaign_id=cid, note="beam down")
    assert paused["paused"] is True
    none = await call(alice, "ask_campaign", campaign_id=cid, n=1)
    assert none["points"] == [] and none["paused"] and "paused" in none["reason"]
    await call(alice, "resume_campaign", campaign_id=cid)
    added = {"x1": 9.0, "x2": 3.0}
    await call(alice, "add_points", campaign_id=cid, points=[added])
    got = (await call(alice, "ask_campaign", campaign_id=cid, n=1))["points"]
    assert got[0]["point"] == added and got[0]["source"] == "added"  # a person's point first
    for p in got:
        await call(alice, "tell_campaign", campaign_id=cid, point_id=p["point_id"],
                   value=branin(p["point"]))
    # Past the design, the GP's own suggestion, rejected: neither it nor its neighbours again.
    for _ in range(6):
        for p in (await call(alice, "ask_campaign", campaign_id=cid, n=1))["points"]:
            await call(alice, "tell_campaign", campaign_id=cid, point_id=p["point_id"],
                       value=branin(p["point"]))
    suggestion = (await call(alice, "ask_campaign", campaign_id=cid, n=1))["points"][0]
    assert suggestion["source"] == "gp"
    await call(alice, "reject_point", campaign_id=cid, point_id=suggestion["point_id"],
               note="out of the sample")
    refused = await alice.call_tool(
        "tell_campaign",
        {"campaign_id": cid, "point_id": suggestion["point_id"], "value": 1.0},
        raise_on_error=False,
    )
    assert refused.is_error and "rejected" in text_of(refused)
    after = (await call(alice, "ask_campaign", campaign_id=cid, n=3))["points"]
    space = Space(parse_spec(external_spec()).space)
    rejected = space.encode([suggestion["point"]])
    assert min(min_distances(space.encode([p["point"] for p in after]), rejected)) > 0.03
    for p in after:
        await call(alice, "tell_campaign", campaign_id=cid, point_id=p["point_id"],
                   value=branin(p["point"]))
    await call(alice, "annotate_campaign", campaign_id=cid, text="looks converged")
    done = await call(alice, "update_campaign", campaign_id=cid, budget={"evaluations": 11})
    assert done["spec"]["budget"]["evaluations"] == 11
    last = (await call(alice, "ask_campaign", campaign_id=cid, n=5))["points"]
    assert len(last) == 1  # 10 told, room for one
    told = await call(alice, "tell_campaign", campaign_id=cid, point_id=last[0]["point_id"],
                      value=branin(last[0]["point"]))
    assert told["done"] and told["state"] == "completed"
    view = await call(alice, "get_campaign", campaign_id=cid)
    assert view["progress"]["succeeded"] == 11 and view["progress"]["rejected"] == 1
    actions = [(a["principal"], a["action"]) for a in view["actions"]]
    assert actions == [("alice", a) for a in (
        "start", "pause", "resume", "add_points", "reject", "annotate", "update"
    )]
    assert view["actions"][1]["arguments"] == {"note": "beam down"}
    exported = await call(alice, "export_campaign", campaign_id=cid)
    rows = list(csv.DictReader(io.StringIO(exported["text"])))
    assert exported["rows"] == len(rows) == len(view["evaluations"])
    assert {r["state"] for r in rows} == {"succeeded", "rejected"}
    assert float(rows[0]["x1"]) == 9.0 and rows[0]["source"] == "added"
    # Another principal sees nothing of it, and can steer nothing.
    async with Client(create_server(eng, principal=BOB)) as bob:
        res = await bob.call_tool("pause_campaign", {"campaign_id": cid}, raise_on_error=False)
        assert res.is_error and text_of(res).startswith("not_found")


async def test_people_steer_a_service_campaign(eng: Engine, alice: Client[Any]) -> None:
    spec = {
        "objective": {
            "service": "sim-instrument",
            "parameters": {"surface": "branin", "duration_s": 0.02, "records": 1},
            "goal": "minimise",
        },
        "space": external_spec()["space"],
        "budget": {"evaluations": 30},
        "batch_size": 1,
        "seed": 3,
    }
    cid = (await call(alice, "start_campaign", **spec))["id"]
    await call(alice, "pause_campaign", campaign_id=cid)
    await asyncio.sleep(0.5)
    before = (await call(alice, "get_campaign", campaign_id=cid))["progress"]
    await asyncio.sleep(0.5)
    still = (await call(alice, "get_campaign", campaign_id=cid))["progress"]
    assert still["in_flight"] == 0 and still["done"] == before["done"]  # paused: nothing new
    added = {"x1": -3.0, "x2": 12.0}
    await call(alice, "add_points", campaign_id=cid, points=[added, {"x1": 9.0, "x2": 2.0}])
    view = await call(alice, "get_campaign", campaign_id=cid)
    queued = [e for e in view["evaluations"] if e["state"] == "queued"]
    await call(alice, "reject_point", campaign_id=cid, point_id=queued[1]["point_id"])
    await call(alice, "update_campaign", campaign_id=cid, budget={"evaluations": 8})
    await call(alice, "resume_campaign", campaign_id=cid)
    deadline = asyncio.get_running_loop().time() + 90
    while True:
        view = await call(alice, "get_campaign", campaign_id=cid)
        if view["state"] != "running" and not view["active"]:
            break
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.2)
    assert view["state"] == "completed", view["reason"]
    evals = view["evaluations"]
    assert view["progress"]["succeeded"] == 8 and view["progress"]["rejected"] == 1
    first = next(e for e in evals if e["source"] == "added" and e["state"] == "succeeded")
    assert first["point"] == added and first["entry_id"]  # measured by a job
    after = [e for e in evals if e["seq"] > first["seq"]]
    assert all(e["asked_at"] >= first["asked_at"] for e in after)
    assert [a["action"] for a in view["actions"]] == [
        "start", "pause", "add_points", "reject", "update", "resume"
    ]


def test_the_campaign_cli_annotates_and_exports(tmp_path: Path) -> None:
    import subprocess
    import sys

    home = tmp_path / "home"

    async def prepare() -> str:
        engine = await Engine.open(make_settings(home))
        try:
            async with Client(create_server(engine, principal=ALICE)) as client:
                cid = str((await call(client, "start_campaign", **external_spec()))["id"])
                for p in (await call(client, "ask_campaign", campaign_id=cid, n=2))["points"]:
                    await call(client, "tell_campaign", campaign_id=cid,
                               point_id=p["point_id"], value=branin(p["point"]))
            return cid
        finally:
            await campaign_manager(engine).shutdown()
            await shutdown(engine)

    cid = asyncio.run(prepare())
    env = {"SCIORCH_HOME": str(home), "SCIORCH_PRINCIPAL": "alice", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sciorch.cli", "campaign", *args],
            env=env, capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parent.parent,
        )

    done = cli("annotate", cid, "sample changed")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "data.csv"
    done = cli("export", cid, "-o", str(out))
    assert done.returncode == 0 and "2 rows" in done.stdout, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["state"] for r in rows] == ["succeeded", "succeeded"] and rows[0]["x1"]
    # Parquet, typed: the numbers as numbers, the times as timestamps.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_out = tmp_path / "data.parquet"
    done = cli("export", cid, "-o", str(table_out))
    assert done.returncode == 0 and "2 rows" in done.stdout, done.stderr
    table = pq.read_table(table_out)
    got = table.to_pylist()
    assert [r["seq"] for r in got] == [int(r["seq"]) for r in rows]
    assert [r["x1"] for r in got] == [float(r["x1"]) for r in rows]
    assert [r["value"] for r in got] == [float(r["value"]) for r in rows]
    assert [r["state"] for r in got] == ["succeeded", "succeeded"]
    types = {f.name: f.type for f in table.schema}
    assert types["seq"] == pa.int64() and types["x1"] == types["value"] == pa.float64()
    assert types["asked_at"] == pa.timestamp("us", tz="UTC") and types["state"] == pa.string()
    hidden = subprocess.run(  # as if pyarrow were not installed: the extra is named
        [sys.executable, "-c", HIDE_PYARROW, "campaign", "export", cid, "-o", str(table_out)],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert hidden.returncode == 2 and "pip install 'sciorch[parquet]'" in hidden.stderr
    bad = cli("reject", cid, f"{cid}-p0")
    assert bad.returncode == 2 and "already measured" in bad.stderr, bad.stderr

    async def actions() -> list[tuple[str, str]]:
        engine = await Engine.open(make_settings(home))
        try:
            view = await campaign_manager(engine, auto_resume=False).get(ALICE, cid)
            return [(a.principal, a.action) for a in view.actions or []]
        finally:
            await campaign_manager(engine).shutdown()
            await shutdown(engine)

    assert asyncio.run(actions()) == [("alice", "start"), ("alice", "annotate")]
