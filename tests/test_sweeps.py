"""Sweeps on the local site (the throttle of the local pool), urgent work (the policy, the
front of the local queue), deadline warnings with signed webhooks, and the same tools over MCP
with a second principal who is refused."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp
import pytest

from ground.errors import Conflict, InvalidInput, InvalidParameters, NotAllowed, NotSupported
from ground.models import EntryState, Principal, ResourceRequest
from mcp_server.server import create_server
from orchestrator import deadlines, sweeps
from orchestrator.engine import Engine
from steering.spec import parse_spec
from tests.conftest import ALICE, BOB, BOTH_STORES, make_settings, shutdown
from tests.mcp_helpers import (
    assert_tool_error,
    free_socket,
    json_receiver,
    run_http_server,
    script_catalogue,
    sdk_client,
    serve_asgi,
    structured,
    webhook_receiver,
)
from tests.test_steering import branin_spec

PAYLOAD = """
import json, os, time
p = json.load(open(os.environ["SCIORCH_PARAMS"]))
t0 = time.time()
time.sleep(p.get("sleep", 0.3))
out = {"x": p["x"], "y": 2 * p["x"], "t0": t0, "t1": time.time()}
json.dump(out, open(os.environ["SCIORCH_RESULT"], "w"))
"""
PROPS = {"x": {"type": "integer", "minimum": 0}, "sleep": {"type": "number"}}


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    return script_catalogue(tmp_path, "double", PAYLOAD, PROPS)


async def open_engine(home: Path, catalogue: Path, cpus: int = 8, **kw: Any) -> Engine:
    site = {"name": "local", "kind": "local", "cpus": cpus, "memory_mb": 16384, "term_grace_s": 1}
    return await Engine.open(make_settings(home, sites=[site], catalogue_dirs=[catalogue], **kw))


@pytest.fixture
async def eng(home: Path, catalogue: Path, store_url: str | None) -> AsyncIterator[Engine]:
    engine = await open_engine(home, catalogue, urgent_principals=["alice"])
    try:
        yield engine
    finally:
        await shutdown(engine)


def most_at_once(results: list[dict[str, Any]]) -> int:
    """The largest number of elements whose [t0, t1] overlap."""
    edges = sorted([(r["t0"], 1) for r in results] + [(r["t1"], -1) for r in results])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def test_a_local_sweep_runs_at_most_throttle_elements_at_once(eng: Engine) -> None:
    sweep = await sweeps.submit_sweep(
        eng, ALICE, "double", [{"x": i, "sleep": 0.4} for i in range(6)], throttle=2
    )
    done, timed_out = await sweeps.wait_sweep(eng, ALICE, sweep.id, timeout_s=60)
    assert not timed_out and done.counts == {"succeeded": 6}
    results = [e.result or {} for e in done.entries]
    assert [r["y"] for r in results] == [0, 2, 4, 6, 8, 10]
    assert most_at_once(results) == 2  # bounded, and the bound was used


async def test_each_element_is_validated_before_anything_is_recorded(eng: Engine) -> None:
    with pytest.raises(InvalidParameters, match="element 1: ") as bad:
        await sweeps.submit_sweep(eng, ALICE, "double", [{"x": 1}, {"x": "two"}])
    assert bad.value.field == "parameter_sets[1].x"
    with pytest.raises(InvalidParameters) as extra:
        await sweeps.submit_sweep(eng, ALICE, "double", grid={"x": [1], "nope": [2]})
    assert extra.value.field == "grid[0].nope"
    entries, _ = await eng.list_entries(ALICE)
    assert entries == []


@BOTH_STORES
async def test_a_grid_expands_and_the_idempotency_key_returns_the_same_sweep(
    eng: Engine,
) -> None:
    grid = {"x": [1, 2], "sleep": [0.01, 0.02]}
    first = await sweeps.submit_sweep(eng, ALICE, "double", grid=grid, idempotency_key="k1")
    assert [e.parameters for e in first.entries] == [
        {"x": 1, "sleep": 0.01},
        {"x": 1, "sleep": 0.02},
        {"x": 2, "sleep": 0.01},
        {"x": 2, "sleep": 0.02},
    ]
    again = await sweeps.submit_sweep(eng, ALICE, "double", grid=grid, idempotency_key="k1")
    assert again.id == first.id
    with pytest.raises(Conflict) as clash:
        await sweeps.submit_sweep(eng, ALICE, "double", grid={"x": [3]}, idempotency_key="k1")
    assert clash.value.field == "idempotency_key"
    await sweeps.wait_sweep(eng, ALICE, first.id, timeout_s=30)


async def test_urgent_work_goes_to_the_front_of_the_local_queue(
    home: Path, catalogue: Path
) -> None:
    eng = await open_engine(home, catalogue, cpus=1, urgent_principals=["alice"])
    try:
        one = ResourceRequest(cpus=1)
        busy = await eng.launch(ALICE, "double", {"x": 0, "sleep": 0.5}, resources=one)
        normal = [
            await eng.launch(ALICE, "double", {"x": i, "sleep": 0.05}, resources=one)
            for i in (1, 2)
        ]
        urgent = await eng.launch(
            ALICE, "double", {"x": 9, "sleep": 0.05}, resources=one, priority="urgent"
        )
        for e in (busy, *normal, urgent):
            done, _ = await eng.wait_entry(ALICE, e.id, timeout_s=30)
            assert done.state == EntryState.SUCCEEDED, done.reason
        starts = {
            e.id: (await eng.get_entry(ALICE, e.id)).result["t0"]  # type: ignore[index]
            for e in (*normal, urgent)
        }
        assert starts[urgent.id] < min(starts[n.id] for n in normal), starts
    finally:
        await shutdown(eng)


async def test_urgent_work_is_refused_to_a_principal_the_policy_does_not_name(
    eng: Engine,
) -> None:
    with pytest.raises(NotAllowed, match=r"sciorch\.urgent") as refused:
        await eng.launch(BOB, "double", {"x": 1}, priority="urgent")
    assert refused.value.field == "priority"
    with pytest.raises(NotAllowed):
        await sweeps.submit_sweep(eng, BOB, "double", [{"x": 1}], priority="urgent")
    # The scope grants it without the list.
    ok = await eng.launch(Principal(id="carol", urgent=True), "double", {"x": 1}, priority="urgent")
    assert ok.state == EntryState.PENDING


async def test_a_local_entry_cannot_be_extended_and_says_why(eng: Engine) -> None:
    entry = await eng.launch(ALICE, "double", {"x": 1, "sleep": 5})
    await eng.wait_entry(ALICE, entry.id, timeout_s=10, until="started")
    with pytest.raises(NotSupported, match=r"\(local\) cannot extend") as refused:
        await deadlines.extend_entry(eng, ALICE, entry.id, 3600)
    assert refused.value.field == "entry_id"
    await eng.cancel(ALICE, entry.id)


async def test_a_walltime_warning_reaches_the_bus_and_a_signed_webhook(
    home: Path, catalogue: Path
) -> None:
    got: list[tuple[bytes, str]] = []

    def answer(body: bytes, headers: dict[bytes, bytes]) -> int:
        got.append((body, headers.get(b"x-sciorch-signature", b"").decode()))
        return 503 if len(got) == 1 else 204  # the first delivery fails: it is retried

    secret = "s3cret-s3cret-s3cret"
    async with serve_asgi(webhook_receiver(answer), free_socket()) as url:
        eng = await open_engine(home, catalogue, warning_lead_s=30)
        try:
            event = await eng.create_event(ALICE, "beam", webhook_url=url + "/hook")
            await deadlines.set_webhook_secret(eng, event.id, secret)
            async with eng.bus.subscribe(lambda m: m.kind == "warning") as sub:
                entry = await eng.launch(
                    ALICE,
                    "double",
                    {"x": 1, "sleep": 5},
                    event_id=event.id,
                    resources=ResourceRequest(walltime_s=20),
                )
                msg = await asyncio.wait_for(sub.get(), 20)
            assert msg.entry_id == entry.id and "walltime ends in" in (msg.reason or "")
            assert "walltime ends in" in ((await eng.get_entry(ALICE, entry.id)).reason or "")
            for _ in range(100):
                if len(got) >= 2:
                    break
                await asyncio.sleep(0.1)
            assert len(got) == 2, got
            body, sig = got[1]
            want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(sig, want)
            payload = json.loads(body)
            assert payload["kind"] == "walltime" and payload["entry_id"] == entry.id
            assert got[0] == got[1]  # the retry carries the same signed body
            await eng.cancel(ALICE, entry.id)
        finally:
            await shutdown(eng)


async def test_sweep_tools_over_mcp_with_a_second_principal_refused(
    home: Path, catalogue: Path
) -> None:
    async with run_http_server(home, settings={"catalogue_dirs": [catalogue]}) as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as alice:
            view = structured(
                await alice.call_tool(
                    "submit_sweep",
                    {
                        "service": "double",
                        "grid": {"x": [1, 2, 3]},
                        "parameters": {"sleep": 0.05},
                        "throttle": 2,
                    },
                )
            )
            assert view["size"] == 3 and view["throttle"] == 2
            done = structured(
                await alice.call_tool("wait_sweep", {"sweep_id": view["id"], "timeout_seconds": 30})
            )
            assert done["sweep"]["counts"] == {"succeeded": 3}
            assert [e["result"]["y"] for e in done["sweep"]["elements"]] == [2, 4, 6]
            bad = await alice.call_tool(
                "submit_sweep", {"service": "double", "parameter_sets": [{"x": 1}, {"x": -1}]}
            )
            assert_tool_error(bad, "parameter_sets[1].x")
            local = done["sweep"]["elements"][0]["entry_id"]
            refused = await alice.call_tool(
                "extend_entry", {"entry_id": local, "walltime_seconds": 7200}
            )
            assert_tool_error(refused, "entry_id")
        async with sdk_client(srv.mcp_url, srv.token("bob")) as bob:
            hidden = await bob.call_tool("get_sweep", {"sweep_id": view["id"]})
            assert_tool_error(hidden, "not_found")
            cancel = await bob.call_tool("cancel_sweep", {"sweep_id": view["id"]})
            assert_tool_error(cancel, "not_found")
            urgent = await bob.call_tool(
                "submit_job",
                {"service": "double", "parameters": {"x": 1}, "priority": "urgent"},
            )
            assert_tool_error(urgent, "not_allowed", "priority")
        token = srv.token("dave", "read,submit,sciorch.urgent")
        async with sdk_client(srv.mcp_url, token) as dave:
            ok = structured(
                await dave.call_tool(
                    "submit_job",
                    {"service": "double", "parameters": {"x": 1}, "priority": "urgent"},
                )
            )
            assert ok["state"] == "pending"


def test_a_campaign_file_may_ask_for_urgent_evaluations() -> None:
    base = branin_spec()
    urgent = {**base, "objective": {**base["objective"], "priority": "urgent"}}
    assert parse_spec(urgent, "c.toml").objective.priority == "urgent"
    wrong = {**base, "objective": {**base["objective"], "priority": "high"}}
    with pytest.raises(InvalidInput) as bad:
        parse_spec(wrong, "c.toml")
    assert (bad.value.field or "").startswith("objective.priority")


async def test_a_listening_client_hears_the_walltime_warning(home: Path, catalogue: Path) -> None:
    eng = await open_engine(home, catalogue, warning_lead_s=25)
    try:
        entry = await eng.launch(
            ALICE, "double", {"x": 1, "sleep": 60}, resources=ResourceRequest(walltime_s=30)
        )
        running, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=10, until="started")
        assert running.state == EntryState.RUNNING
        uri = f"sciorch://entries/{entry.id}"
        async with mcp.Client(create_server(eng, principal=ALICE)._mcp_server) as sdk:
            async with sdk.listen(resource_subscriptions=[uri]) as sub:
                update = await asyncio.wait_for(anext(aiter(sub)), 10)
        assert update.uri == uri  # type: ignore[union-attr]
        # The entry says why it changed; the walltime has not run out yet.
        now = await eng.get_entry(ALICE, entry.id)
        assert now.state == EntryState.RUNNING
        assert "walltime ends in" in (now.reason or ""), now.reason
        await eng.cancel(ALICE, entry.id)
    finally:
        await shutdown(eng)


async def test_an_events_ttl_warning_is_posted_to_its_webhook(home: Path, catalogue: Path) -> None:
    got: list[dict[str, Any]] = []

    async with serve_asgi(json_receiver(got), free_socket()) as url:
        eng = await open_engine(home, catalogue, warning_lead_s=120)
        try:
            event = await eng.create_event(ALICE, "short", ttl_s=60, webhook_url=url)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.1)
            assert got and got[0]["kind"] == "ttl" and got[0]["event_id"] == event.id, got
            assert 0 < got[0]["seconds_left"] <= 60
        finally:
            await shutdown(eng)
