"""The engine over the real local backend, real processes and a real store: SQLite, and for the
tests marked @BOTH_STORES also PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ground.errors import (
    Conflict,
    InvalidInput,
    InvalidParameters,
    LimitExceeded,
    NoSiteAvailable,
    NotAllowed,
    NotFound,
    UnknownService,
)
from ground.models import (
    ALLOWED_TRANSITIONS,
    Entry,
    EntryState,
    Event,
    EventState,
    Message,
    Principal,
    ResourceRequest,
    Resources,
    Role,
    can_transition,
)
from orchestrator.engine import Engine
from orchestrator.store import Store
from tests.conftest import ALICE, BOB, BOTH_STORES, make_settings, shutdown

FAST = {"duration_s": 0.05, "records": 2}


def states(entry_transitions: list) -> list[str]:
    return [t.state.value for t in entry_transitions]


# ------------------------------------------------------------------ the state machine


def test_state_machine_table() -> None:
    for terminal in (EntryState.SUCCEEDED, EntryState.FAILED, EntryState.CANCELLED):
        assert not ALLOWED_TRANSITIONS[terminal]
        assert not can_transition(terminal, EntryState.RUNNING)
    assert can_transition(EntryState.PENDING, EntryState.PROVISIONING)
    assert can_transition(EntryState.RUNNING, EntryState.READY)
    assert not can_transition(EntryState.PENDING, EntryState.READY)
    assert not can_transition(EntryState.SUCCEEDED, EntryState.FAILED)


@BOTH_STORES
async def test_job_runs_through_every_state_and_records_its_result(engine: Engine) -> None:
    seen: list[Message] = []
    async with engine.bus.subscribe(lambda m: m.kind in ("transition", "stream")) as sub:
        entry = await engine.launch(ALICE, "sim-instrument", {"x1": 1.0, "x2": 2.0, **FAST})
        done, timed_out = await engine.wait_entry(ALICE, entry.id, timeout_s=20)
        while not sub.queue.empty():
            seen.append(sub.queue.get_nowait())
    assert not timed_out
    assert done.state == EntryState.SUCCEEDED, done.reason
    assert states(done.transitions) == ["pending", "provisioning", "running", "succeeded"]
    stamps = [t.at for t in done.transitions]
    assert stamps == sorted(stamps)
    assert done.exit_code == 0
    assert done.started_at is not None and done.finished_at is not None
    assert set(done.result or {}) >= {"value", "noise_variance"}
    # Transitions were announced in the order they were written, and records streamed.
    announced = [m.state for m in seen if m.kind == "transition" and m.entry_id == entry.id]
    assert announced == [
        EntryState.PENDING,
        EntryState.PROVISIONING,
        EntryState.RUNNING,
        EntryState.SUCCEEDED,
    ]
    assert sum(1 for m in seen if m.kind == "stream" and m.entry_id == entry.id) == 2


@BOTH_STORES
async def test_transition_is_persisted_before_it_is_announced(engine: Engine) -> None:
    checked: list[tuple[str, str]] = []

    async with engine.bus.subscribe(lambda m: m.kind == "transition") as sub:
        entry = await engine.launch(ALICE, "sim-instrument", FAST)
        while True:
            msg = await asyncio.wait_for(sub.get(), 20)
            stored = await engine.store.get_entry(entry.id, transitions=False)
            assert stored is not None
            # The store already holds this state (or a later one) when the message arrives.
            checked.append((msg.state.value, stored.state.value))  # type: ignore[union-attr]
            order = list(EntryState)
            assert order.index(stored.state) >= order.index(msg.state)  # type: ignore[arg-type]
            if msg.state and msg.state.terminal:
                break
    assert checked[-1][0] == "succeeded"


async def test_failed_job_keeps_exit_code_and_log_tail(engine: Engine) -> None:
    entry = await engine.launch(ALICE, "sim-instrument", {**FAST, "fail": True})
    done, _ = await engine.wait_entry(ALICE, entry.id, timeout_s=20)
    assert done.state == EntryState.FAILED
    assert done.exit_code == 3
    assert "exit code 3" in (done.reason or "")


@asynccontextmanager
async def engine_with(
    engine: Engine, tmp_path: Path, name: str, template: str
) -> AsyncIterator[Engine]:
    """An engine over the same home that also knows one more template, `name`: the fixture's
    engine closes first (two engines must not share a home) and this one closes after."""
    extra = tmp_path / "cat"
    extra.mkdir()
    (extra / f"{name}.yaml").write_text(textwrap.dedent(template))
    await shutdown(engine)
    eng = await Engine.open(make_settings(engine.settings.home, catalogue_dirs=[extra]))
    try:
        yield eng
    finally:
        await shutdown(eng)


async def test_job_killed_by_signal_is_failed_with_the_signal(
    engine: Engine, tmp_path: Path
) -> None:
    suicide = """
        name: suicide
        kind: job
        command: ["sh", "-c", "echo about to die; kill -KILL $$"]
        """
    async with engine_with(engine, tmp_path, "suicide", suicide) as eng:
        entry = await eng.launch(ALICE, "suicide")
        done, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=20)
        assert done.state == EntryState.FAILED
        assert "SIGKILL" in (done.reason or "")


async def test_command_that_does_not_exist_fails_clearly(engine: Engine, tmp_path: Path) -> None:
    ghost = "name: ghost\nkind: job\ncommand: [no-such-program-sciorch, --x]\n"
    async with engine_with(engine, tmp_path, "ghost", ghost) as eng:
        entry = await eng.launch(ALICE, "ghost")
        done, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=20)
        assert done.state == EntryState.FAILED
        assert "no-such-program-sciorch" in (done.reason or "")
        assert "not found" in (done.reason or "")


async def test_walltime_expires_the_job(engine: Engine) -> None:
    entry = await engine.launch(
        ALICE, "sim-instrument", {"duration_s": 30}, resources=ResourceRequest(walltime_s=1)
    )
    done, _ = await engine.wait_entry(ALICE, entry.id, timeout_s=20)
    assert done.state == EntryState.EXPIRED
    assert "walltime" in (done.reason or "")


@BOTH_STORES
async def test_cancel_is_idempotent(engine: Engine) -> None:
    entry = await engine.launch(ALICE, "sim-instrument", {"duration_s": 30})
    await engine.wait_entry(ALICE, entry.id, timeout_s=0.5)
    first = await engine.cancel(ALICE, entry.id)
    assert first.state == EntryState.CANCELLED
    assert "alice" in (first.reason or "")
    again = await engine.cancel(ALICE, entry.id)
    assert again.state == EntryState.CANCELLED
    assert states(again.transitions).count("cancelled") == 1


# ------------------------------------------------------------------ bad input


async def test_unknown_service_lists_the_known_ones(engine: Engine) -> None:
    with pytest.raises(UnknownService) as err:
        await engine.launch(ALICE, "no-such-service")
    assert "sim-instrument" in err.value.message and "http-app" in err.value.message
    assert err.value.field == "service"


async def test_parameters_are_validated_before_launch(engine: Engine) -> None:
    with pytest.raises(InvalidParameters) as err:
        await engine.launch(ALICE, "sim-instrument", {"noise_std": "loud"})
    assert err.value.field == "parameters.noise_std"
    with pytest.raises(InvalidParameters) as err:
        await engine.launch(ALICE, "sim-instrument", {"colour": "red"})
    assert err.value.field == "parameters.colour"
    assert "surface" in err.value.message  # lists the known parameters
    entries, _ = await engine.list_entries(ALICE)
    assert entries == []  # nothing was launched


async def test_resources_no_site_can_provide(engine: Engine) -> None:
    with pytest.raises(NoSiteAvailable) as err:
        await engine.launch(ALICE, "sim-instrument", FAST, resources=ResourceRequest(gpus=8))
    assert "needs 8 GPU(s), site has 2" in err.value.message
    with pytest.raises(InvalidInput) as err2:
        await engine.launch(ALICE, "sim-instrument", FAST, site="mars")
    assert err2.value.field == "site"


@BOTH_STORES
async def test_idempotency_key_returns_the_same_entry(engine: Engine) -> None:
    a = await engine.launch(ALICE, "sim-instrument", FAST, idempotency_key="k1")
    b = await engine.launch(ALICE, "sim-instrument", FAST, idempotency_key="k1")
    assert a.id == b.id
    with pytest.raises(Conflict) as err:
        await engine.launch(ALICE, "sim-instrument", {**FAST, "x1": 3}, idempotency_key="k1")
    assert err.value.field == "idempotency_key"
    # Keys belong to a principal: bob's k1 is his own.
    c = await engine.launch(BOB, "sim-instrument", FAST, idempotency_key="k1")
    assert c.id != a.id


@BOTH_STORES
async def test_concurrent_first_calls_share_one_default_event_and_one_entry(
    engine: Engine,
) -> None:
    """Racing calls both miss, both insert: the store's unique constraint decides, and the
    loser answers with the winner's event and entry (on either store's constraint error)."""
    carol = Principal(id="carol")
    entries = await asyncio.gather(
        *(engine.launch(carol, "sim-instrument", FAST, idempotency_key="race") for _ in range(4))
    )
    assert len({e.id for e in entries}) == 1
    assert len({e.event_id for e in entries}) == 1
    assert len(await engine.list_events(carol)) == 1


@BOTH_STORES
async def test_concurrency_limit(engine: Engine, tmp_path: Path) -> None:
    solo = "name: solo\nkind: job\ncommand: [sleep, '30']\nlimits: {max_concurrent: 1}\n"
    async with engine_with(engine, tmp_path, "solo", solo) as eng:
        first = await eng.launch(ALICE, "solo")
        with pytest.raises(LimitExceeded):
            await eng.launch(ALICE, "solo")
        await eng.launch(BOB, "solo")  # the limit is per principal
        await eng.cancel(ALICE, first.id)
        await eng.launch(ALICE, "solo")  # a slot is free again


# ------------------------------------------------------------------ routing


async def test_gpu_request_never_lands_on_a_site_without_gpus(home: Path) -> None:
    sites = [
        {"name": "cpu-only", "kind": "local", "gpus": 0, "cpus": 8, "memory_mb": 8192},
        {
            "name": "gpu-box",
            "kind": "local",
            "gpus": 1,
            "gpu_type": "h100",
            "cpus": 4,
            "memory_mb": 8192,
        },
    ]
    eng = await Engine.open(make_settings(home, sites=sites))
    try:
        cpu = await eng.launch(ALICE, "sim-instrument", FAST)
        gpu = await eng.launch(ALICE, "sim-instrument", FAST, resources=ResourceRequest(gpus=1))
        assert gpu.site == "gpu-box"
        assert cpu.site == "cpu-only"  # equal waits: configuration order decides
        with pytest.raises(NoSiteAvailable) as err:
            await eng.launch(
                ALICE, "sim-instrument", FAST, resources=ResourceRequest(gpus=1, gpu_type="a100")
            )
        assert "a100" in err.value.message
        # An explicit site wins, or fails clearly.
        with pytest.raises(NoSiteAvailable) as err2:
            await eng.launch(
                ALICE, "sim-instrument", FAST, site="cpu-only", resources=ResourceRequest(gpus=1)
            )
        assert "cpu-only" in err2.value.message and "GPU" in err2.value.message
        done, _ = await eng.wait_entry(ALICE, gpu.id, timeout_s=20)
        assert done.state == EntryState.SUCCEEDED
    finally:
        await shutdown(eng)


async def test_router_prefers_the_site_with_the_shorter_wait(home: Path) -> None:
    sites = [
        {"name": "busy", "kind": "local", "gpus": 1, "cpus": 1, "memory_mb": 4096},
        {"name": "idle", "kind": "local", "gpus": 1, "cpus": 1, "memory_mb": 4096},
    ]
    eng = await Engine.open(make_settings(home, sites=sites))
    try:
        hog = await eng.launch(
            ALICE,
            "sim-instrument",
            {"duration_s": 30},
            site="busy",
            resources=ResourceRequest(cpus=1),
        )
        await eng.wait_entry(ALICE, hog.id, timeout_s=0.3)
        nxt = await eng.launch(ALICE, "sim-instrument", FAST)
        assert nxt.site == "idle"
    finally:
        await shutdown(eng)


async def test_site_in_maintenance_is_skipped(home: Path) -> None:
    sites = [
        {"name": "down-for-work", "kind": "local", "maintenance": True},
        {"name": "open", "kind": "local"},
    ]
    eng = await Engine.open(make_settings(home, sites=sites))
    try:
        entry = await eng.launch(ALICE, "sim-instrument", FAST)
        assert entry.site == "open"
        with pytest.raises(NoSiteAvailable, match="maintenance"):
            await eng.launch(ALICE, "sim-instrument", FAST, site="down-for-work")
    finally:
        await shutdown(eng)


# ------------------------------------------------------------------ principals


@BOTH_STORES
async def test_two_principals_see_only_their_own(engine: Engine) -> None:
    ev = await engine.create_event(ALICE, "beamtime")
    entry = await engine.launch(ALICE, "sim-instrument", FAST, event_id=ev.id)
    with pytest.raises(NotFound):
        await engine.get_entry(BOB, entry.id)
    with pytest.raises(NotFound):
        await engine.get_event(BOB, ev.id)
    with pytest.raises(NotFound):
        await engine.read_logs(BOB, entry.id)
    with pytest.raises(NotFound):
        await engine.cancel(BOB, entry.id)
    with pytest.raises(NotFound):
        await engine.launch(BOB, "sim-instrument", FAST, event_id=ev.id)
    assert (await engine.list_entries(BOB))[0] == []
    assert [e.id for e in await engine.list_events(BOB)] == []

    # Viewer: reads, cannot operate.
    await engine.share_event(ALICE, ev.id, "bob", Role.VIEWER)
    assert (await engine.get_entry(BOB, entry.id)).id == entry.id
    with pytest.raises(NotAllowed):
        await engine.launch(BOB, "sim-instrument", FAST, event_id=ev.id)
    with pytest.raises(NotAllowed):
        await engine.stop_event(BOB, ev.id)
    # Operator: launches into it, still cannot stop or re-share it.
    await engine.share_event(ALICE, ev.id, "bob", Role.OPERATOR)
    bobs = await engine.launch(BOB, "sim-instrument", FAST, event_id=ev.id)
    assert bobs.event_id == ev.id
    with pytest.raises(NotAllowed):
        await engine.share_event(BOB, ev.id, "carol", Role.VIEWER)
    # Revoked: gone again. Sharing is idempotent.
    await engine.share_event(ALICE, ev.id, "bob", None)
    await engine.share_event(ALICE, ev.id, "bob", None)
    with pytest.raises(NotFound):
        await engine.get_entry(BOB, entry.id)
    # An admin sees everything.
    admin = Principal(id="root", admin=True)
    assert (await engine.get_entry(admin, entry.id)).id == entry.id


@BOTH_STORES
async def test_list_entries_pages(engine: Engine) -> None:
    ids = [(await engine.launch(ALICE, "sim-instrument", FAST)).id for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await engine.list_entries(ALICE, limit=2, cursor=cursor)
        seen += [e.id for e in page]
        if cursor is None:
            break
    assert seen == ids
    with pytest.raises(InvalidInput):
        await engine.list_entries(ALICE, cursor="not-a-cursor")


# ------------------------------------------------------------------ events


@BOTH_STORES
async def test_stop_event_tears_everything_down(engine: Engine) -> None:
    ev = await engine.create_event(ALICE, "run")
    job = await engine.launch(ALICE, "sim-instrument", {"duration_s": 30}, event_id=ev.id)
    svc = await engine.launch(ALICE, "http-app", event_id=ev.id)
    await engine.wait_entry(ALICE, svc.id, timeout_s=20)
    stopped = await engine.stop_event(ALICE, ev.id)
    assert stopped.state == EventState.STOPPED
    for eid in (job.id, svc.id):
        done, _ = await engine.wait_entry(ALICE, eid, timeout_s=20, until="finished")
        assert done.state == EntryState.CANCELLED
        assert done.reason == "event stopped"
    again = await engine.stop_event(ALICE, ev.id)  # idempotent
    assert again.state == EventState.STOPPED
    with pytest.raises(Conflict):
        await engine.launch(ALICE, "sim-instrument", FAST, event_id=ev.id)


@BOTH_STORES
async def test_event_ttl_expires_its_entries(engine: Engine) -> None:
    ev = await engine.create_event(ALICE, "short", ttl_s=1)
    job = await engine.launch(ALICE, "sim-instrument", {"duration_s": 30}, event_id=ev.id)
    done, _ = await engine.wait_entry(ALICE, job.id, timeout_s=15)
    assert done.state == EntryState.EXPIRED
    assert "lifetime" in (done.reason or "")
    assert (await engine.get_event(ALICE, ev.id)).state == EventState.EXPIRED


# ------------------------------------------------------------------ services


@BOTH_STORES
async def test_service_becomes_ready_with_a_url(engine: Engine) -> None:
    svc = await engine.launch(ALICE, "http-app")
    ready, _ = await engine.wait_entry(ALICE, svc.id, timeout_s=30)
    assert ready.state == EntryState.READY, ready.reason
    assert ready.url == f"{engine.settings.public_url}/entries/{svc.id}/"
    assert states(ready.transitions) == ["pending", "provisioning", "running", "ready"]


async def test_service_whose_health_check_never_passes(engine: Engine, tmp_path: Path) -> None:
    mute = """
        name: mute
        kind: service
        command: ["sh", "-c", "echo listening nowhere; sleep 60"]
        health: {path: /health, timeout_s: 1.5}
        """
    async with engine_with(engine, tmp_path, "mute", mute) as eng:
        svc = await eng.launch(ALICE, "mute")
        done, _ = await eng.wait_entry(ALICE, svc.id, timeout_s=20)
        assert done.state == EntryState.FAILED
        assert "health" in (done.reason or "")
        assert "listening nowhere" in (done.reason or "")  # the log tail


def store_at(home: Path, store_url: str | None) -> Path | str:
    return store_url or home / "s.db"


@BOTH_STORES
async def test_store_schema_is_migrated(home: Path, store_url: str | None) -> None:
    store = await Store.open(store_at(home, store_url))
    try:
        assert await store.schema_version() >= 2
    finally:
        await store.close()
    store = await Store.open(store_at(home, store_url))  # reopening applies nothing twice
    try:
        assert await store.schema_version() >= 2
    finally:
        await store.close()


@BOTH_STORES
async def test_store_reads_never_serve_a_row_older_than_the_last_write(
    home: Path, store_url: str | None
) -> None:
    """get_entry/get_event answer from memory between writes (SQLite): every kind of write must
    show."""
    store = await Store.open(store_at(home, store_url))
    try:
        at = datetime.now(UTC)
        event = Event(id="evt-1", name="e", owner="alice", created_at=at)
        await store.insert_event(event)
        entry = Entry(
            id="ent-1", event_id="evt-1", service="s", version="1", kind="job", site="local",
            submitted_by="alice", state=EntryState.PENDING, resources=Resources(),
            created_at=at, updated_at=at,
        )
        await store.insert_entry(entry, {}, None)

        async def entry_now() -> Entry:
            got = await store.get_entry("ent-1")
            assert got is not None
            assert await store.get_entry("ent-1") == got  # the second read is the cached one
            return got

        async def event_now() -> Event:
            got = await store.get_event("evt-1")
            assert got is not None and await store.get_event("evt-1") == got
            return got

        assert (await entry_now()).state == EntryState.PENDING
        await store.apply_transition("ent-1", EntryState.RUNNING, at, "go", {"exit_code": 3})
        now = await entry_now()
        assert (now.state, now.reason, now.exit_code) == (EntryState.RUNNING, "go", 3)
        assert [t.state for t in now.transitions] == [EntryState.PENDING, EntryState.RUNNING]
        await store.update_entry_fields("ent-1", {"result": {"value": 1}})
        assert (await entry_now()).result == {"value": 1}
        assert (await store.get_entry("ent-1", transitions=False)).transitions == []  # type: ignore[union-attr]

        assert (await event_now()).shares == {}
        await store.set_share("evt-1", "bob", Role.VIEWER)
        assert (await event_now()).shares == {"bob": Role.VIEWER}
        await store.set_share("evt-1", "bob", None)
        assert (await event_now()).shares == {}
        await store.set_event_state("evt-1", EventState.STOPPED, at)
        assert (await event_now()).state == EventState.STOPPED

        # A read that starts while a write is under way is not kept: the next read sees it.
        assert (await entry_now()).state == EntryState.RUNNING
        write = asyncio.create_task(
            store.apply_transition("ent-1", EntryState.SUCCEEDED, at, None, {})
        )
        await asyncio.sleep(0)  # the write holds the store now
        await store.get_entry("ent-1")
        await write
        assert (await entry_now()).state == EntryState.SUCCEEDED
    finally:
        await store.close()


# ------------------------------------------------------------------ kill -9 and reconciliation

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from orchestrator.engine import Engine
    from tests.conftest import ALICE, make_settings

    async def main() -> None:
        eng = await Engine.open(make_settings(Path(sys.argv[1])))
        entry = await eng.launch(ALICE, "sim-instrument", {"duration_s": float(sys.argv[2]),
                                                           "records": 1, "x1": 2.0})
        await eng.wait_entry(ALICE, entry.id, timeout_s=10, until="started")
        print(entry.id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def start_server_and_kill(home: Path, duration: float) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(home), str(duration)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    entry_id = proc.stdout.readline().strip()
    assert entry_id.startswith("ent-"), entry_id
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return entry_id


@BOTH_STORES
async def test_kill_9_job_finished_while_server_was_dead(home: Path, store_url: str | None) -> None:
    entry_id = await asyncio.to_thread(start_server_and_kill, home, 0.5)
    await asyncio.sleep(1.5)  # the job ends while no server watches it
    eng = await Engine.open(make_settings(home))
    try:
        done, _ = await eng.wait_entry(ALICE, entry_id, timeout_s=10)
        assert done.state == EntryState.SUCCEEDED
        assert done.result is not None and "value" in done.result
    finally:
        await shutdown(eng)


@BOTH_STORES
async def test_kill_9_job_still_running_is_re_adopted(home: Path, store_url: str | None) -> None:
    entry_id = await asyncio.to_thread(start_server_and_kill, home, 2.0)
    eng = await Engine.open(make_settings(home))
    try:
        now = await eng.get_entry(ALICE, entry_id)
        assert now.state == EntryState.RUNNING  # re-adopted, not failed
        done, _ = await eng.wait_entry(ALICE, entry_id, timeout_s=15)
        assert done.state == EntryState.SUCCEEDED
        assert done.result is not None
    finally:
        await shutdown(eng)


async def test_kill_9_job_vanished_is_failed_with_a_reason(home: Path) -> None:
    entry_id = await asyncio.to_thread(start_server_and_kill, home, 30)
    with sqlite3.connect(home / "sciorch.db") as db:
        handle = json.loads(
            db.execute("SELECT handle FROM entries WHERE id = ?", (entry_id,)).fetchone()[0]
        )
    os.killpg(handle["pgid"], signal.SIGKILL)  # the whole job dies with nobody watching
    await asyncio.sleep(0.3)
    eng = await Engine.open(make_settings(home))
    try:
        done, _ = await eng.wait_entry(ALICE, entry_id, timeout_s=10)
        assert done.state == EntryState.FAILED
        assert done.reason
    finally:
        await shutdown(eng)


async def test_second_engine_on_the_same_home_is_refused(engine: Engine) -> None:
    with pytest.raises(Conflict, match="another sciorch process"):
        await Engine.open(make_settings(engine.settings.home))


@BOTH_STORES
async def test_a_stop_survives_a_server_restart(home: Path, store_url: str | None) -> None:
    """The server asks for a cancel and goes away before the job has ended: the next server
    records `cancelled` with the caller's reason, not a death by signal."""
    eng = await Engine.open(make_settings(home))
    entry = await eng.launch(ALICE, "sim-instrument", {"duration_s": 30})
    # Generous waits: they end as soon as the state is reached; a loaded CI machine is slow.
    started, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=60, until="started")
    assert started.state == EntryState.RUNNING
    mid = await eng.cancel(ALICE, entry.id, wait_s=0)
    assert not mid.state.terminal
    await eng.close()  # gone before the backend saw the job end
    await asyncio.sleep(0.5)
    eng = await Engine.open(make_settings(home))
    try:
        done, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=60)
        assert done.state == EntryState.CANCELLED
        assert done.reason == "cancelled by alice"
    finally:
        await shutdown(eng)
