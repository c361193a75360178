"""A campaign seeded with earlier results (`seed_from`): through the MCP tools with the real
gpCAM, the second campaign on the same instrument starts from what the first measured (told to
the GP before its first suggestion, never run again), and only from results its owner may see."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from ground.errors import InvalidInput
from ground.models import Principal
from mcp_server.server import create_server
from orchestrator.engine import Engine
from steering.spec import load_spec
from tests.conftest import campaign_engine
from tests.test_steering import branin_spec, finished, structured

eng = campaign_engine()


@pytest.fixture
async def alice(eng: Engine) -> AsyncIterator[Client[Any]]:
    async with Client(create_server(eng, principal=Principal(id="alice"))) as client:
        yield client


def entry_count(home: Path) -> int:
    with sqlite3.connect(home / "sciorch.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


async def evaluations(client: Client[Any], campaign_id: str) -> list[dict[str, Any]]:
    view = structured(await client.call_tool("get_campaign", {"campaign_id": campaign_id}))
    return list(view["evaluations"])


async def test_a_seeded_campaign_starts_from_earlier_results_without_running_them_again(
    eng: Engine, alice: Client[Any], home: Path
) -> None:
    first = structured(
        await alice.call_tool("start_campaign", branin_spec(budget={"evaluations": 8}))
    )["id"]
    assert (await finished(alice, first))["state"] == "completed"
    measured = {e["entry_id"]: e["value"] for e in await evaluations(alice, first)}
    assert len(measured) == 8 and entry_count(home) == 8

    spec = branin_spec(
        budget={"evaluations": 4},
        seed_from={"query": 'surface = "branin" and value < 1000', "campaign_id": first},
    )
    second = structured(await alice.call_tool("start_campaign", spec))["id"]
    view = await finished(alice, second)
    assert view["state"] == "completed", view["reason"]
    evals = await evaluations(alice, second)
    seeds = [e for e in evals if e["source"] == "seed"]
    # Every earlier result is known data: the same entries and values, all before any ask.
    assert {e["entry_id"]: e["value"] for e in seeds} == measured
    assert [e["seq"] for e in seeds] == list(range(8))
    asked = [e for e in evals if e["source"] != "seed"]
    # Eight known points cover the initial design (2 here): the GP makes the first suggestion, and
    # the budget counts only new measurements; nothing seeded ran again.
    assert [e["source"] for e in asked] == ["gp"] * 4
    assert all(e["state"] == "succeeded" and e["entry_id"] not in measured for e in asked)
    assert entry_count(home) == 8 + 4

    # Bob's campaign with the same seed_from finds none of alice's results.
    async with Client(create_server(eng, principal=Principal(id="bob"))) as bob:
        cid = structured(
            await bob.call_tool(
                "start_campaign",
                branin_spec(budget={"evaluations": 2}, seed_from={"query": 'surface = "branin"'}),
            )
        )["id"]
        assert (await finished(bob, cid))["state"] == "completed"
        assert [e["source"] for e in await evaluations(bob, cid)] == ["design", "design"]


async def test_a_bad_seed_query_is_refused_at_start_naming_the_field(alice: Client[Any]) -> None:
    with pytest.raises(ToolError, match=r"seed_from\.query: at column 8: expected a value"):
        await alice.call_tool("start_campaign", branin_spec(seed_from={"query": "value <"}))


def test_seed_from_in_a_campaign_file(tmp_path: Path) -> None:
    text = (
        '[objective]\nservice = "sim-instrument"\n'
        '[[space]]\nname = "x1"\nlow = -5.0\nhigh = 10.0\n'
        "[seed_from]\nquery = 'surface = \"branin\" and value < 5'\n"
        'campaign_id = "cmp-1a2b3c4d5e6f"\n'
    )
    (tmp_path / "c.toml").write_text(text)
    seed = load_spec(tmp_path / "c.toml").seed_from
    assert seed is not None and seed.campaign_id == "cmp-1a2b3c4d5e6f" and seed.limit == 500
    assert seed.query == 'surface = "branin" and value < 5'
    (tmp_path / "bad.toml").write_text(text.replace("value < 5", "value << 5"))
    with pytest.raises(InvalidInput) as info:
        load_spec(tmp_path / "bad.toml")
    assert info.value.field == "seed_from.query"
    assert "at column 31: expected a value" in info.value.message
