"""Several replicas on one PostgreSQL store (the real server that scripts/test.d starts): the
LISTEN/NOTIFY bus, leases and their takeover, engines handing work to the site's owner, and
real `sciorch serve` processes, one of them killed with SIGKILL mid-job and mid-campaign."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ground.config import load_settings
from ground.models import EntryState, Message
from orchestrator.database import split_schema
from orchestrator.engine import Engine
from orchestrator.leases import LeaseKeeper
from orchestrator.pg_bus import MAX_PAYLOAD, PgBus
from orchestrator.store import Store, now
from steering.manager import CampaignManager
from tests.conftest import ALICE, make_settings, postgres_schema, shutdown
from tests.mcp_helpers import free_socket, sdk_client, structured
from tests.processes import cli_env
from tests.test_steering import CAMPAIGN_TOML, ROOT, SERVE, _healthy, _kill_9


@pytest.fixture
async def pg_url(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    async with postgres_schema(monkeypatch) as url:
        yield url


@contextlib.asynccontextmanager
async def campaign_replicas(
    tmp_path: Path,
) -> AsyncIterator[tuple[Engine, Engine, CampaignManager, CampaignManager]]:
    """Two engines on one home and store, each with its campaign manager (no auto-resume)."""
    from mcp_server.steering_tools import campaign_manager

    home = tmp_path / "home"
    a = await Engine.open(make_settings(home))
    b = await Engine.open(make_settings(home))
    on_a = campaign_manager(a, auto_resume=False)
    on_b = campaign_manager(b, auto_resume=False)
    try:
        yield a, b, on_a, on_b
    finally:
        await on_b.shutdown()
        await on_a.shutdown()
        await shutdown(b)
        await shutdown(a)


async def _bus(url: str, replica: str) -> PgBus:
    dsn, schema = split_schema(url)
    return await PgBus.open(dsn, f"sciorch.{schema}", replica)


async def _next(sub: Any) -> Message:
    return await asyncio.wait_for(sub.get(), 5.0)


# ------------------------------------------------------------------------------ the bus


async def test_a_message_published_by_one_replica_reaches_the_others_once_and_in_order(
    pg_url: str,
) -> None:
    a, b = await _bus(pg_url, "a"), await _bus(pg_url, "b")
    try:
        async with a.subscribe() as on_a, b.subscribe() as on_b:
            for i in range(50):
                a.publish(Message(kind="log", entry_id="ent-1", log_size=i, at=now()))
            got = [(await _next(on_b)).log_size for _ in range(50)]
            assert got == list(range(50))
            assert [(await _next(on_a)).log_size for _ in range(50)] == list(range(50))
            await a.flush()
            await asyncio.sleep(0.3)
            assert on_a.queue.empty() and on_b.queue.empty()  # a's own came back and was dropped
            # a signal reaches the others only
            seen: list[dict[str, Any]] = []
            a.on_signal("hello", seen.append)
            b.on_signal("hello", seen.append)
            a.signal("hello", {"from": "a"})
            await a.flush()
            for _ in range(50):
                if seen:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert seen == [{"from": "a"}]
    finally:
        await a.close()
        await b.close()


async def test_a_message_over_the_notify_limit_goes_as_a_pointer_the_receiver_fills_in(
    pg_url: str,
) -> None:
    a, b = await _bus(pg_url, "a"), await _bus(pg_url, "b")
    big = {"data": "x" * (MAX_PAYLOAD * 2)}
    asked: list[Message] = []

    async def resolve(msg: Message) -> Message:
        asked.append(msg)
        return msg.model_copy(update={"record": big})

    b.resolve = resolve
    try:
        async with a.subscribe() as on_a, b.subscribe() as on_b:
            a.publish(Message(kind="stream", entry_id="e", record_index=7, record=big, at=now()))
            assert (await _next(on_a)).record == big  # local delivery is whole
            got = await _next(on_b)
            assert got.record == big and got.record_index == 7
            assert asked[0].record is None  # what travelled was the pointer
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------ leases


async def test_a_dead_replicas_lease_is_taken_over_after_its_deadline_a_released_one_at_once(
    pg_url: str,
) -> None:
    store = await Store.open(pg_url)
    gained: dict[str, float] = {}

    def keeper(owner: str) -> LeaseKeeper:
        k = LeaseKeeper(store.database, owner, ttl_s=2.0, retry_s=0.2)

        async def gain() -> None:
            gained[owner] = time.monotonic()

        async def loss() -> None:
            gained.pop(owner, None)

        k.want("site:local", gain, loss)
        return k

    a, b = keeper("a"), keeper("b")
    try:
        await a.start()
        await b.start()
        assert a.holds("site:local") and not b.holds("site:local")
        await asyncio.sleep(2.5)  # renewed past its first deadline
        assert a.holds("site:local") and not b.holds("site:local")
        assert await b.holder("site:local") == "a"
        await a.stop()  # a dies: no more renewals, the row stays
        died = time.monotonic()
        while "b" not in gained:
            assert time.monotonic() - died < 4.0, "no takeover"
            await asyncio.sleep(0.05)
        took = gained["b"] - died
        assert 0.5 < took <= 2.0 + 0.5, took  # after the deadline, within a retry
        c = keeper("c")
        await c.start()
        assert not c.holds("site:local")
        await b.stop()
        assert await b.release_all() == ["site:local"]
        c.poke()
        for _ in range(40):
            if c.holds("site:local"):
                break
            await asyncio.sleep(0.05)
        assert c.holds("site:local")  # released: taken at once, not after a deadline
        await c.stop()
    finally:
        await a.stop()
        await b.stop()
        await store.close()


# ------------------------------------------------------------------------------ engines


async def test_a_job_submitted_through_a_replica_not_owning_the_site_runs_on_the_owner(
    tmp_path: Path, pg_url: str
) -> None:
    home = tmp_path / "home"
    a = await Engine.open(make_settings(home))
    b = await Engine.open(make_settings(home))  # same home, same store: a replica, not refused
    try:
        assert a.replicas and b.replicas
        assert a.replicas.owns("local") and not b.replicas.owns("local")
        job = await b.launch(
            ALICE, "sim-instrument", {"duration_s": 0.3, "records": 2}, kind="job"
        )
        seen: list[str] = []

        async def on_message(msg: Message) -> None:
            seen.append(msg.kind)

        done, timed_out = await b.wait_entry(ALICE, job.id, 30, on_message=on_message)
        assert not timed_out and done.state == EntryState.SUCCEEDED, done.reason
        assert done.result and "value" in done.result
        assert "stream" in seen  # records made on a, heard on b
        assert done.handle.get("pid")  # a ran it: b's backend never saw it
        assert job.id not in b.backends["local"]._entries  # type: ignore[attr-defined]

        long = await b.launch(ALICE, "sim-instrument", {"duration_s": 60}, kind="job")
        await b.wait_entry(ALICE, long.id, 30, until="started")
        stopped = await b.cancel(ALICE, long.id)
        assert stopped.state == EntryState.CANCELLED, stopped

        # the same idempotency key raced in through both replicas: one entry
        args = ("sim-instrument", {"duration_s": 0.1})
        kw: dict[str, Any] = {"kind": "job", "idempotency_key": "k-1"}
        one, two = await asyncio.gather(a.launch(ALICE, *args, **kw), b.launch(ALICE, *args, **kw))
        assert one.id == two.id
        keyed = [e for e in await a.store.list_entries(limit=100) if e.idempotency_key == "k-1"]
        assert len(keyed) == 1
    finally:
        await shutdown(b)
        await shutdown(a)


async def test_a_replica_that_stalls_stops_driving_and_another_adopts_its_running_job(
    tmp_path: Path, pg_url: str
) -> None:
    """a stops renewing (as a stalled replica would) and lets the site go as on a lost lease;
    b takes the site after the lease's deadline and re-adopts the job a started, which ends
    as it truly did, recorded by b."""
    home = tmp_path / "home"
    a = await Engine.open(make_settings(home, lease_ttl_s=2))
    b = await Engine.open(make_settings(home, lease_ttl_s=2))
    try:
        assert a.replicas and b.replicas and a.replicas.owns("local")
        job = await a.launch(ALICE, "sim-instrument", {"duration_s": 3, "records": 2}, kind="job")
        await b.wait_entry(ALICE, job.id, 20, until="started")
        await a.replicas.keeper.stop()
        await a.replicas._leave_site("local")
        assert not a.backends["local"]._entries  # type: ignore[attr-defined]
        t0 = time.monotonic()
        while not b.replicas.owns("local"):
            assert time.monotonic() - t0 < 5, "no takeover"
            await asyncio.sleep(0.05)
        done, timed_out = await b.wait_entry(ALICE, job.id, 20)
        assert not timed_out and done.state == EntryState.SUCCEEDED, done.reason
        assert done.result and "value" in done.result
        assert job.id not in b.replicas._claimed["local"]  # ended: its claim is forgotten
    finally:
        await shutdown(b)
        await shutdown(a)


async def test_a_waiter_whose_bus_lost_the_end_of_a_job_finds_it_in_the_store(
    tmp_path: Path, pg_url: str
) -> None:
    """Notifications are lost while a listener reconnects: wait_entry re-reads the store."""
    home = tmp_path / "home"
    a = await Engine.open(make_settings(home))
    b = await Engine.open(make_settings(home))
    try:
        assert isinstance(b.bus, PgBus)
        b.bus.recheck_s = 0.5
        b.bus._in = SimpleNamespace(put_nowait=lambda _e: None)  # type: ignore[assignment]
        job = await b.launch(ALICE, "sim-instrument", {"duration_s": 0.2}, kind="job")
        t0 = time.monotonic()
        done, timed_out = await b.wait_entry(ALICE, job.id, 20)
        assert done.state == EntryState.SUCCEEDED and not timed_out
        assert time.monotonic() - t0 < 6  # found at a re-read, not at the deadline
    finally:
        await shutdown(b)
        await shutdown(a)


async def test_the_proxy_of_any_replica_reaches_a_service_another_one_runs(
    tmp_path: Path, pg_url: str
) -> None:
    """Launched through b, run by a (the site's owner), ready as b hears it; b's proxy takes
    the entry token a signed (the key is in the shared home) and reaches the service."""
    import httpx

    import tools
    from sciorch.web.app import create_http_app
    from tests.mcp_helpers import serve_asgi
    from tools.models import EntryRef, LaunchServiceInput

    home = tmp_path / "home"
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    a = await Engine.open(make_settings(home, public_url=base))
    b = await Engine.open(make_settings(home, public_url=base))
    try:
        view = await tools.launch_service(b, ALICE, LaunchServiceInput(service="http-app"))
        ready, timed_out = await b.wait_entry(ALICE, view.id, timeout_s=30)
        assert not timed_out and ready.state == EntryState.READY, ready.reason
        signed_by_a = await tools.get_entry(a, ALICE, EntryRef(entry_id=view.id))
        assert signed_by_a.access_url
        token = signed_by_a.access_url.split("?token=", 1)[1]
        async with (
            serve_asgi(create_http_app(b), sock) as served,
            httpx.AsyncClient(
                base_url=served, trust_env=False, timeout=20, follow_redirects=True
            ) as http,
        ):
            page = await http.get(f"/entries/{view.id}/", params={"token": token})
            assert page.status_code == 200, page.text
            assert view.id in page.text
            stopped = await b.cancel(ALICE, view.id)
            assert stopped.state == EntryState.CANCELLED
            gone = await http.get(f"/entries/{view.id}/")  # the cookie the first one set
            assert gone.status_code != 200  # b knows at once that a stopped it
    finally:
        await shutdown(b)
        await shutdown(a)


async def test_a_campaign_runs_where_its_lease_is_and_stops_or_updates_through_any_replica(
    tmp_path: Path, pg_url: str
) -> None:
    from steering.spec import CampaignSpec

    async with campaign_replicas(tmp_path) as (a, b, on_a, on_b):
        heard: list[str] = []
        on_b.listeners.append(heard.append)
        spec = CampaignSpec.model_validate(
            tomllib.loads(CAMPAIGN_TOML.format(duration=0.3, budget=40))
        )
        view = await on_a.start(ALICE, spec)
        assert view.id in on_a.tasks and view.id not in on_b.tasks
        assert await b.replicas.keeper.holder(f"campaign:{view.id}") == a.replicas.id  # type: ignore[union-attr]
        for _ in range(200):  # evaluations go on, run by a, heard on b
            if heard.count(view.id) >= 3:
                break
            await asyncio.sleep(0.05)
        assert heard.count(view.id) >= 3
        assert on_b.leases is not None and await on_b.leases.run_elsewhere(view.id)
        stopped = await on_b.stop(ALICE, view.id)  # asks a, which runs it
        assert stopped.state == "stopped", stopped.reason
        await asyncio.wait_for(on_a.wait(view.id), 30)
        assert await b.replicas.keeper.holder(f"campaign:{view.id}") is None  # type: ignore[union-attr]


async def test_an_external_campaign_is_asked_where_it_runs_and_refused_with_the_why_elsewhere(
    tmp_path: Path, pg_url: str
) -> None:
    from ground.errors import Conflict
    from steering.spec import CampaignSpec
    from tests.test_steering_external import external_spec

    async with campaign_replicas(tmp_path) as (_, _, on_a, on_b):
        view = await on_a.start(ALICE, CampaignSpec.model_validate(external_spec()))
        asked = await on_a.ask(ALICE, view.id, 1)
        assert len(asked.points) == 1
        with pytest.raises(Conflict, match=f"campaign_id: {view.id} is run by the replica"):
            await on_b.ask(ALICE, view.id, 1)
        assert view.id not in on_b.runners  # no second optimizer handing out points


# ------------------------------------------------------------------------------ real servers


def _start(home: Path, port: int, store: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*SERVE, "--port", str(port)],
        env=cli_env(home, "alice", SCIORCH_STORE=store),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def _query(url: str, sql: str, *args: Any, steering: bool = False) -> list[Any]:
    import asyncpg

    dsn, schema = split_schema(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'SET search_path = "{schema}{"_steering" if steering else ""}"')
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _port() -> int:
    with free_socket() as sock:
        return int(sock.getsockname()[1])


async def test_kill_9_of_the_replica_owning_a_running_job_and_campaign_the_other_adopts_them(
    tmp_path: Path, pg_url: str
) -> None:
    """Two real `sciorch serve` on one PostgreSQL and one home, over streamable HTTP (current
    protocol). A job submitted through one is waited on through the other; then the replica
    that owns the site and runs a campaign is killed with SIGKILL while a job and evaluations
    run: the other takes its leases over within 10 s, the job reaches its true end (succeeded,
    with its result), and the campaign completes with every evaluation once."""
    from mcp_server.auth import create_token

    home = tmp_path / "home"
    budget = 9
    spec = tomllib.loads(CAMPAIGN_TOML.format(duration=0.5, budget=budget))
    token = create_token(load_settings(home).keys_dir, "alice", ["read", "submit"], 600)
    pa, pb = _port(), _port()
    a = _start(home, pa, pg_url)
    b: subprocess.Popen[bytes] | None = None
    try:
        await _healthy(a, f"http://127.0.0.1:{pa}")
        b = _start(home, pb, pg_url)
        await _healthy(b, f"http://127.0.0.1:{pb}")
        owners = await _query(pg_url, "SELECT name, owner FROM leases")
        assert {r["name"] for r in owners} >= {"site:local", "expiry"}
        first = {r["owner"] for r in owners}
        assert len(first) == 1 and f"-{a.pid}-" in next(iter(first))
        async with (
            sdk_client(f"http://127.0.0.1:{pa}/mcp", token) as on_a,
            sdk_client(f"http://127.0.0.1:{pb}/mcp", token) as on_b,
        ):
            assert on_a.protocol_version == on_b.protocol_version == "2026-07-28"
            short = structured(
                await on_a.call_tool(
                    "submit_job",
                    {"service": "sim-instrument", "parameters": {"duration_s": 0.5}},
                )
            )
            waited = structured(
                await on_b.call_tool("wait_entry", {"entry_id": short["id"], "timeout_seconds": 30})
            )
            assert waited["entry"]["state"] == "succeeded" and waited["timed_out"] is False

            cid = structured(await on_a.call_tool("start_campaign", spec))["id"]
            job = structured(
                await on_b.call_tool(  # handed over to a, which owns the site
                    "submit_job",
                    {"service": "sim-instrument", "parameters": {"duration_s": 8, "records": 3}},
                )
            )
            started = structured(
                await on_b.call_tool(
                    "wait_entry",
                    {"entry_id": job["id"], "timeout_seconds": 30, "until": "started"},
                )
            )
            assert started["entry"]["state"] == "running"
            deadline = time.monotonic() + 90
            while True:  # evaluations done and others in flight
                rows = await _query(
                    pg_url,
                    "SELECT state FROM evaluations WHERE campaign_id = $1",
                    cid,
                    steering=True,
                )
                states = [r["state"] for r in rows]
                if states.count("succeeded") >= 3 and "submitted" in states:
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.05)
        before = {
            r["seq"]: r["entry_id"]
            for r in await _query(
                pg_url,
                "SELECT seq, entry_id FROM evaluations WHERE campaign_id = $1",
                cid,
                steering=True,
            )
        }
        killed = time.monotonic()
        _kill_9(a)
        took = None
        while time.monotonic() - killed < 20:
            rows = await _query(pg_url, "SELECT name, owner FROM leases")
            held = {r["name"]: r["owner"] for r in rows}
            if all(f"-{b.pid}-" in held.get(n, "") for n in ("site:local", f"campaign:{cid}")):
                took = time.monotonic() - killed
                break
            await asyncio.sleep(0.1)
        assert took is not None and took <= 10.0, took

        async with sdk_client(f"http://127.0.0.1:{pb}/mcp", token) as on_b:
            done = structured(
                await on_b.call_tool("wait_entry", {"entry_id": job["id"], "timeout_seconds": 60})
            )
            entry = done["entry"]
            assert entry["state"] == "succeeded", entry
            assert entry["exit_code"] == 0 and "value" in (entry["result"] or {})
            deadline = time.monotonic() + 120
            while True:
                view = structured(
                    await on_b.call_tool(
                        "get_campaign", {"campaign_id": cid, "evaluations": False}
                    )
                )
                if view["state"] != "running":
                    break
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.2)
        assert view["state"] == "completed", view["reason"]
        assert view["progress"]["succeeded"] == budget and view["progress"]["retries"] == 0
        evals = await _query(
            pg_url,
            "SELECT seq, state, entry_id, point FROM evaluations WHERE campaign_id = $1"
            " ORDER BY seq",
            cid,
            steering=True,
        )
        assert [e["seq"] for e in evals] == list(range(budget))
        assert all(e["state"] == "succeeded" for e in evals)
        for seq, entry_id in before.items():
            if entry_id:  # in flight or done at the kill: re-adopted, not run again
                assert evals[seq]["entry_id"] == entry_id
        keys = await _query(
            pg_url,
            "SELECT idempotency_key, count(*) AS n FROM entries WHERE idempotency_key LIKE $1"
            " GROUP BY idempotency_key",
            f"{cid}%",
        )
        assert len(keys) == budget and all(k["n"] == 1 for k in keys)  # one job per point
        points = {tuple(round(v, 9) for v in json.loads(e["point"]).values()) for e in evals}
        assert len(points) == budget
    finally:
        _kill_9(a)
        if b is not None:
            b.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                b.wait(20)
            _kill_9(b)
