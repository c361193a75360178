"""Campaigns measured elsewhere (ask/tell over MCP) and people in the loop (pause, budget and
stop rules, added and rejected points, notes, export), through the real MCP tools with real
gpCAM; the HTTP and kill -9 cases are in tests/test_bluesky.py."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client, FastMCP

from mcp_server.server import create_server
from orchestrator.engine import Engine
from orchestrator.models import Principal, Role
from orchestrator.payloads.surfaces import SURFACES
from steering.manager import manager_for
from tests.conftest import make_settings, shutdown

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


@pytest.fixture
async def eng(home: Path) -> AsyncIterator[Engine]:
    engine = await Engine.open(make_settings(home))
    try:
        yield engine
    finally:
        await manager_for(engine).shutdown()
        await shutdown(engine)


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
