"""The two stores, SQLite and PostgreSQL, behave alike: the same migrations, the same records,
the campaign store included; and what only PostgreSQL must do (several processes on one
database): reads that see other writers, migrations that run once when replicas start at once.
PostgreSQL is the real server that scripts/test.d/15-postgresql.sh starts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ground.config import load_settings
from ground.errors import InvalidInput, SciorchError
from ground.models import Entry, EntryState, Event, Resources
from orchestrator.database import DIALECTS, migrations, split_schema
from orchestrator.store import Store
from steering.manager import new_record
from steering.models import Attempt, CampaignState, EvalState, EvaluationRecord
from steering.spec import CampaignSpec
from steering.store import CampaignStore
from tests.conftest import ALICE, BOTH_STORES, drop_schemas, postgres_base_url

ROOT = Path(__file__).resolve().parent.parent
AT = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def entry(entry_id: str = "ent-1", **over: Any) -> Entry:
    data: dict[str, Any] = dict(
        id=entry_id, event_id="evt-1", service="s", version="1", kind="job", site="local",
        submitted_by="alice", state=EntryState.PENDING, resources=Resources(gpus=1),
        parameters={"zeta": 1, "a": [1.5, "x"]}, created_at=AT, updated_at=AT,
        handle={"pid": 12},
    )
    data.update(over)
    return Entry(**data)


@pytest.fixture
async def pg_schema() -> AsyncIterator[tuple[str, str]]:
    """(URL with a fresh schema, the base URL); the schemas are dropped afterwards."""
    base = postgres_base_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{base}?schema={schema}", base
    finally:
        await drop_schemas(base, schema, f"{schema}_steering")


def location(tmp_path: Path, store_url: str | None, name: str) -> Path | str:
    return store_url or tmp_path / name


# ------------------------------------------------------------------ migrations


@pytest.mark.parametrize("package", ["orchestrator", "steering"])
async def test_both_dialects_have_the_same_migrations_making_the_same_columns(
    package: str, tmp_path: Path, pg_schema: tuple[str, str]
) -> None:
    numbers = {d: [n for n, _ in migrations(package, d)] for d in DIALECTS}
    assert numbers["sqlite"] == numbers["postgresql"] != []
    assert numbers["sqlite"] == list(range(1, len(numbers["sqlite"]) + 1))

    opener = Store.open if package == "orchestrator" else CampaignStore.open
    lite = await opener(tmp_path / "s.db")
    await lite.close()
    with sqlite3.connect(tmp_path / "s.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        sqlite_cols = {
            (t, r[1]) for t in tables if t != "sqlite_sequence"
            for r in db.execute(f"PRAGMA table_info({t})")
        }

    url, base = pg_schema
    pg = await opener(url)
    try:
        assert await pg.schema_version() == numbers["postgresql"][-1]
    finally:
        await pg.close()
    import asyncpg

    schema = split_schema(url)[1] + ("" if package == "orchestrator" else "_steering")
    conn = await asyncpg.connect(base)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name <> 'schema_version'",
            schema,
        )
    finally:
        await conn.close()
    assert {(r["table_name"], r["column_name"]) for r in rows} == sqlite_cols


async def test_replicas_that_start_at_once_migrate_once(pg_schema: tuple[str, str]) -> None:
    """Without the advisory lock the second CREATE TABLE of the same schema fails."""
    url, _ = pg_schema
    stores = await asyncio.gather(*(Store.open(url) for _ in range(4)))
    try:
        latest = len(migrations("orchestrator", "postgresql"))
        assert {await s.schema_version() for s in stores} == {latest}
    finally:
        for s in stores:
            await s.close()


# ------------------------------------------------------------------ the engine's store


@BOTH_STORES
async def test_records_read_back_as_they_were_written(
    tmp_path: Path, store_url: str | None
) -> None:
    store = await Store.open(location(tmp_path, store_url, "s.db"))
    try:
        event = Event(id="evt-1", name="e", owner="alice", created_at=AT,
                      expires_at=AT + timedelta(hours=1))
        await store.insert_event(event)
        assert await store.get_event("evt-1") == event
        assert await store.next_expiry() == ("evt-1", AT + timedelta(hours=1))
        first = entry(idempotency_key="k1")
        await store.insert_entry(first, {"command": ["x"]}, "hash-1")
        second = entry("ent-2", created_at=AT + timedelta(seconds=1))
        await store.insert_entry(second, {}, None)

        got = await store.get_entry("ent-1")
        assert got is not None
        assert got.model_dump(exclude={"transitions"}) == first.model_dump(exclude={"transitions"})
        assert [(t.state, t.at) for t in got.transitions] == [(EntryState.PENDING, AT)]
        assert await store.get_spec("ent-1") == {"command": ["x"]}
        assert await store.find_idempotent("alice", "k1") == ("ent-1", "hash-1")
        assert await store.find_idempotent("alice", "k2") is None

        later = AT + timedelta(seconds=5)
        await store.apply_transition(
            "ent-1", EntryState.RUNNING, later, "go",
            {"started_at": later, "handle": {"pid": 13}, "exit_code": 0},
        )
        got = await store.get_entry("ent-1")
        assert got is not None
        assert (got.state, got.started_at, got.handle, got.updated_at) == (
            EntryState.RUNNING, later, {"pid": 13}, later
        )
        assert [t.state for t in got.transitions] == [EntryState.PENDING, EntryState.RUNNING]
        await store.update_entry_fields("ent-1", {"result": {"value": 0.5}, "url": "http://u"})
        got = await store.get_entry("ent-1", transitions=False)
        assert got is not None and (got.result, got.url) == ({"value": 0.5}, "http://u")

        await store.request_stop("ent-1", EntryState.CANCELLED, "by alice")
        await store.request_stop("ent-1", EntryState.EXPIRED, "later")  # the first one wins
        assert await store.stop_request("ent-1") == (EntryState.CANCELLED, "by alice")
        assert await store.stop_request("ent-2") is None
        assert await store.count_active("alice", "s") == 2

        page = await store.list_entries(event_ids=["evt-1"], limit=1)
        assert [e.id for e in page] == ["ent-1"]
        after = (page[0].created_at.isoformat(), page[0].id)
        assert [e.id for e in await store.list_entries(event_ids=["evt-1"], after=after)] == [
            "ent-2"
        ]
        running = await store.list_entries(states=[EntryState.RUNNING], submitted_by="alice")
        assert [e.id for e in running] == ["ent-1"]
        assert [e.id for e in await store.list_events("alice")] == ["evt-1"]
        assert await store.list_events("bob") == []
    finally:
        await store.close()


async def test_postgres_reads_see_what_another_process_wrote(pg_schema: tuple[str, str]) -> None:
    """Two stores on one PostgreSQL database stand for two replicas: a read in one sees the
    other's write at once (a read cache emptied only by this process's writes would not)."""
    url, _ = pg_schema
    one, two = await Store.open(url), await Store.open(url)
    try:
        await one.insert_event(Event(id="evt-1", name="e", owner="alice", created_at=AT))
        await one.insert_entry(entry(), {}, None)
        seen = await one.get_entry("ent-1")
        assert seen is not None and seen.state == EntryState.PENDING
        assert await one.get_entry("ent-1") == seen
        await two.apply_transition("ent-1", EntryState.RUNNING, AT, None, {})
        now = await one.get_entry("ent-1")
        assert now is not None and now.state == EntryState.RUNNING
    finally:
        await one.close()
        await two.close()


# ------------------------------------------------------------------ the campaign store


@BOTH_STORES
async def test_campaign_store_reads_back_what_it_wrote(
    tmp_path: Path, store_url: str | None
) -> None:
    spec = CampaignSpec.model_validate(
        {
            "objective": {"service": "sim-instrument", "parameters": {"surface": "branin"}},
            "space": [
                {"name": "temperature", "low": -5.0, "high": 10.0},
                {"name": "x", "low": 0.0, "high": 15.0},
            ],
            "budget": {"evaluations": 4},
            "seed": 2**32 - 1,
        }
    )
    store = await CampaignStore.open(location(tmp_path, store_url, "steering.db"))
    try:
        rec = new_record(ALICE, spec, "embedded")
        await store.insert_campaign(rec)
        assert await store.get_campaign(rec.id) == rec
        await store.update_campaign(rec.id, event_id="evt-1", gp_state={"hps": [1.0, 0.25]},
                                    stop_requested=True)
        ev = EvaluationRecord(
            campaign_id=rec.id, seq=0, point={"temperature": 1.25, "x": 2.0}, source="design",
            state=EvalState.ASKED, idempotency_key="key-0",
            attempts=[Attempt(attempt=1, idempotency_key="key-0")], asked_at=AT,
        )
        await store.insert_evaluation(ev)
        await store.update_evaluation(
            rec.id, 0, state=EvalState.SUCCEEDED, value=0.397887, entry_id="ent-1",
            finished_at=AT + timedelta(seconds=2), result={"value": 0.397887},
        )
        (got,) = await store.evaluations(rec.id)
        assert got == ev.model_copy(
            update={"state": EvalState.SUCCEEDED, "value": 0.397887, "entry_id": "ent-1",
                    "finished_at": AT + timedelta(seconds=2), "result": {"value": 0.397887}}
        )

        await store.finish_campaign(rec.id, CampaignState.COMPLETED, "budget spent")
        await store.finish_campaign(rec.id, CampaignState.FAILED, "later")  # first ending kept
        done = await store.get_campaign(rec.id)
        assert done is not None
        assert (done.state, done.reason, done.event_id, done.stop_requested, done.gp_state) == (
            CampaignState.COMPLETED, "budget spent", "evt-1", True, {"hps": [1.0, 0.25]}
        )
        assert done.finished_at is not None and done.seed == 2**32 - 1
        assert [c.id for c in await store.list_campaigns(owner="alice")] == [rec.id]
        assert await store.list_campaigns(states=[CampaignState.RUNNING]) == []
    finally:
        await store.close()


# ------------------------------------------------------------------ the setting


def test_the_store_setting_comes_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCIORCH_STORE", raising=False)
    monkeypatch.delenv("SCIORCH_CONFIG", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    assert load_settings(home).store_url is None
    (home / "config.toml").write_text('store = "postgresql://u@db:5432/sciorch?schema=lab"\n')
    assert load_settings(home).store_url == "postgresql://u@db:5432/sciorch?schema=lab"
    monkeypatch.setenv("SCIORCH_STORE", "postgresql://other/db")
    assert load_settings(home).store_url == "postgresql://other/db"
    monkeypatch.delenv("SCIORCH_STORE")
    (home / "config.toml").write_text(f'database_url = "sqlite:///{tmp_path}/x.db"\n')
    settings = load_settings(home)  # the setting's first name is still read
    assert settings.store_url is None and settings.db_path == tmp_path / "x.db"
    (home / "config.toml").write_text('store = "mysql://db"\n')
    with pytest.raises(InvalidInput, match=r"store: String should match pattern"):
        load_settings(home)
    with pytest.raises(InvalidInput, match=r"^store: schema 'Bad-Name'"):
        split_schema("postgresql://db/x?schema=Bad-Name")


# ------------------------------------------------------------------ end to end


def test_sciorch_runs_a_job_with_its_store_on_postgresql(
    tmp_path: Path, pg_schema: tuple[str, str]
) -> None:
    """The `sciorch` command, configured with `store = "postgresql://..."`, runs a job: the
    entry is in PostgreSQL (a second process reads it there), and no SQLite file is made."""
    url, base = pg_schema
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'store = "{url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIORCH_")}
    env.update(SCIORCH_HOME=str(home), SCIORCH_PRINCIPAL="tester", COLUMNS="200", NO_COLOR="1",
               FASTMCP_CHECK_FOR_UPDATES="off")

    def sciorch(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "sciorch.cli", *args], env=env, capture_output=True,
            text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    out = sciorch("submit", "sim-instrument", "-p", "x1=1", "-p", "duration_s=0.1", "--wait")
    entry_id = out.splitlines()[0].strip()
    assert re.match(r"^ent-[0-9a-f]+$", entry_id), out
    assert json.loads(out.split("\n", 1)[1])["point"]["x1"] == 1.0
    assert "succeeded" in sciorch("status", entry_id)
    assert not (home / "sciorch.db").exists()

    async def stored_state() -> str:
        import asyncpg

        conn = await asyncpg.connect(base)
        try:
            schema = split_schema(url)[1]
            return str(await conn.fetchval(f'SELECT state FROM "{schema}".entries WHERE id = $1',
                                           entry_id))
        finally:
            await conn.close()

    assert asyncio.run(stored_state()) == "succeeded"


async def test_an_unreachable_postgresql_is_a_typed_error_without_the_password() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = rf"^store: cannot open PostgreSQL at 127.0.0.1:{port}/x"
    with pytest.raises(SciorchError, match=where) as err:
        await Store.open(f"postgresql://u:hunter2@127.0.0.1:{port}/x")
    assert "hunter2" not in str(err.value) and err.value.field == "store"
