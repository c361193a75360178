"""The results catalogue: the query language (parsed, never evaluated; errors name the column
and what was expected), the index and its search on both stores (filters, comparisons by JSON
type, sorting, cursors, who sees what), the migration's backfill, and the search_results tool
and `sciorch search` over a real engine whose jobs really ran."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from ground.contract import ArtifactStat
from ground.errors import InvalidInput
from ground.models import Entry, EntryState, Event, EventState, Principal, Resources, Role
from mcp_server.server import create_server
from orchestrator.database import migrations, open_sqlite
from orchestrator.engine import Engine
from orchestrator.results import CAMPAIGN_KEY, ResultSearch, ResultsIndex, campaign_of
from orchestrator.results_query import BoolOp, Compare, Field, Not, parse_field, parse_query
from orchestrator.store import Store
from steering.runner import key_for
from tests.conftest import BOTH_STORES, make_settings, shutdown
from tests.mcp_helpers import structured, submit_sim, wait_entry
from tests.processes import HIDE_PYARROW, cli_env

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------ the query language


def test_the_query_parses_with_and_binding_tighter_than_or() -> None:
    tree = parse_query('surface = "branin" and value < 0.5 or not result.ok = true')
    assert tree == BoolOp(
        "or",
        (
            BoolOp(
                "and",
                (
                    Compare(Field(None, ("surface",)), "=", "branin"),
                    Compare(Field(None, ("value",)), "<", 0.5),
                ),
            ),
            Not(Compare(Field("result", ("ok",)), "=", True)),
        ),
    )
    assert parse_query("(params.n >= 3 or x != 'a\\'b') and y = null") == BoolOp(
        "and",
        (
            BoolOp(
                "or",
                (
                    Compare(Field("parameters", ("n",)), ">=", 3),
                    Compare(Field(None, ("x",)), "!=", "a'b"),
                ),
            ),
            Compare(Field(None, ("y",)), "=", None),
        ),
    )
    assert parse_query("  ") is None
    assert parse_field("result.loss") == Field("result", ("loss",))


@pytest.mark.parametrize(
    ("text", "column", "expected"),
    [
        ("value <", 8, "a value"),
        ("value < 0.5 and", 16, "a field name"),
        ("value 0.5", 7, "a comparison"),
        ("(value < 1", 11, "')'"),
        ("value < 1)", 10, "'and', 'or' or the end"),
        ("__import__('os').system('x') = 1", 17, "a field, value, operator"),
        ("__import__('os') = 1", 11, "a comparison"),
        ("value < true", 9, "a number or a string"),
        ("value = 1 ; drop table results", 11, "a field, value, operator"),
        ("result = 1", 8, "'.' and a field of result"),
    ],
)
def test_a_bad_query_names_the_column_and_what_was_expected(
    text: str, column: int, expected: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_query(text)
    assert info.value.field == "query"
    assert f"at column {column}: expected {expected}" in info.value.message, info.value.message


def test_campaign_keys_are_the_steering_runners() -> None:
    assert campaign_of(key_for("cmp-1a2b3c4d5e6f", 7, 2)) == ("cmp-1a2b3c4d5e6f", 7)
    assert CAMPAIGN_KEY.match("my-own-key") is None and campaign_of(None) == (None, None)


# ------------------------------------------------------------------ the index on both stores


@pytest.fixture
async def store(tmp_path: Path, store_url: str | None) -> AsyncIterator[Store]:
    s = await Store.open(store_url or tmp_path / "sciorch.db")
    try:
        yield s
    finally:
        await s.close()


async def add_event(store: Store, event_id: str, owner: str) -> None:
    await store.insert_event(
        Event(id=event_id, name=event_id, owner=owner, state=EventState.ACTIVE, created_at=T0)
    )


async def finish(
    store: Store,
    entry_id: str,
    event_id: str,
    parameters: dict[str, Any],
    result: dict[str, Any] | None,
    minutes: int,
    *,
    state: EntryState = EntryState.SUCCEEDED,
    service: str = "sim",
    key: str | None = None,
) -> Entry:
    entry = Entry(
        id=entry_id, event_id=event_id, service=service, version="1.0.0", kind="job",
        site="local", submitted_by="alice", state=EntryState.PENDING, resources=Resources(),
        parameters=parameters, created_at=T0, updated_at=T0, idempotency_key=key,
        handle={"account": "acct-7"},
    )  # fmt: skip
    await store.insert_entry(entry, {}, None)
    at = T0 + timedelta(minutes=minutes)
    await store.apply_transition(
        entry_id, state, at, None, {"result": result, "finished_at": at, "started_at": T0}
    )
    done = await store.get_entry(entry_id, transitions=False)
    assert done is not None
    return done


async def catalogue(store: Store) -> ResultsIndex:
    index = ResultsIndex(store.database)
    await add_event(store, "evt-a", "alice")
    await add_event(store, "evt-b", "bob")
    rows = [
        ("ent-1", {"surface": "branin", "x": 1.0}, {"value": 0.4}, 1),
        ("ent-2", {"surface": "branin", "x": 2.0}, {"value": 3.5}, 2),
        ("ent-3", {"surface": "hartmann", "x": 3.0}, {"value": 0.1}, 3),
        ("ent-4", {"surface": "branin", "value": 0.2}, {"loss": "n/a"}, 4),
        ("ent-5", {"surface": "branin", "x": 5.0}, {"value": "0.3"}, 5),
        ("ent-6", {"surface": "branin", "x": 6.0}, {"value": 0.45, "ok": True}, 6),
    ]
    for entry_id, params, result, minutes in rows:
        key = key_for("cmp-00aa11bb22cc", minutes, 1) if minutes <= 2 else None
        entry = await finish(store, entry_id, "evt-a", params, result, minutes, key=key)
        artifacts = [ArtifactStat(path="plot.png", size=12, mtime=0.0, sha256="ab" * 32)]
        await index.record(entry, artifacts if entry_id == "ent-1" else [], "c0ffee")
    failed = await finish(store, "ent-7", "evt-a", {"surface": "branin"}, None, 7,
                          state=EntryState.FAILED)  # fmt: skip
    await index.record(failed, [], None)
    bobs = await finish(store, "ent-b1", "evt-b", {"surface": "branin", "x": 0.0},
                        {"value": 0.0}, 8)  # fmt: skip
    await index.record(bobs, [], None)
    return index


async def ids(index: ResultsIndex, who: str | None, **search: Any) -> list[str]:
    if isinstance(search.get("where"), str):
        search["where"] = parse_query(search["where"])
    rows, _ = await index.search(who, ResultSearch(**search))
    return [r.entry_id for r in rows]


@BOTH_STORES
async def test_search_compares_fields_by_json_type_on_both_stores(store: Store) -> None:
    index = await catalogue(store)
    q = 'surface = "branin" and value < 0.5'
    # ent-4's value is a parameter (its result has none), ent-5's is a string: not < 0.5.
    assert await ids(index, "alice", where=q) == ["ent-6", "ent-4", "ent-1"]
    assert await ids(index, "alice", where="result.value < 0.5") == ["ent-6", "ent-3", "ent-1"]
    assert await ids(index, "alice", where='value = "0.3"') == ["ent-5"]
    assert await ids(index, "alice", where="parameters.x >= 2 and parameters.x <= 5") == [
        "ent-5", "ent-3", "ent-2"
    ]  # fmt: skip
    assert await ids(index, "alice", where="ok = true or surface = 'hartmann'") == [
        "ent-6", "ent-3"
    ]  # fmt: skip
    assert await ids(index, "alice", where="not surface = 'branin'") == ["ent-3"]
    assert await ids(index, "alice", where="x != 1 and x < 3") == ["ent-2"]
    assert await ids(index, "alice", where="nothing = 1") == []
    # The column filters: service, campaign, time, states.
    assert await ids(index, "alice", campaign_id="cmp-00aa11bb22cc") == ["ent-2", "ent-1"]
    assert await ids(index, "alice", service="other") == []
    window = dict(
        finished_after=T0 + timedelta(minutes=2), finished_before=T0 + timedelta(minutes=4)
    )
    assert await ids(index, "alice", **window) == ["ent-3", "ent-2"]
    assert await ids(index, "alice", states=("failed",)) == ["ent-7"]


@BOTH_STORES
async def test_search_sorts_by_a_field_and_pages_with_a_cursor(store: Store) -> None:
    index = await catalogue(store)
    by_value = dict(sort=parse_field("result.value"), descending=False)
    # Numbers ascending; rows without a number there (ent-4, ent-5) last, by id.
    assert await ids(index, "alice", **by_value) == [
        "ent-3", "ent-1", "ent-6", "ent-2", "ent-4", "ent-5"
    ]  # fmt: skip
    for search in (by_value, {"sort": "finished_at"}, dict(sort=parse_field("x"), descending=True)):
        whole = await ids(index, "alice", **search)
        paged: list[str] = []
        cursor = None
        while True:
            rows, cursor = await index.search(
                "alice",
                ResultSearch(**search, limit=2, cursor=cursor),  # type: ignore[arg-type]
            )
            paged += [r.entry_id for r in rows]
            if cursor is None:
                break
        assert paged == whole and len(whole) == 6
    with pytest.raises(InvalidInput) as info:
        await index.search("alice", ResultSearch(cursor="zz"))
    assert info.value.field == "cursor"


@BOTH_STORES
async def test_search_shows_only_events_the_principal_may_see(store: Store) -> None:
    index = await catalogue(store)
    assert await ids(index, "bob") == ["ent-b1"]
    assert await ids(index, "mallory") == []
    assert await ids(index, "mallory", event_id="evt-a", where="value < 100") == []
    await store.set_share("evt-a", "mallory", Role.VIEWER)
    assert len(await ids(index, "mallory")) == 6
    assert len(await ids(index, None)) == 7  # an admin sees every event
    rows, _ = await index.search("alice", ResultSearch(where=parse_query("x = 1")))
    row = rows[0]
    assert (row.campaign_id, row.evaluation, row.account) == ("cmp-00aa11bb22cc", 1, "acct-7")
    assert row.template_sha256 == "c0ffee" and row.started_at == T0
    assert row.artifacts[0].path == "plot.png" and row.artifacts[0].size == 12


async def test_the_migration_indexes_entries_that_finished_before_it(tmp_path: Path) -> None:
    path = tmp_path / "sciorch.db"
    old = [m for m in migrations("orchestrator", "sqlite") if m[0] < 4]
    db = await open_sqlite(path, old)
    await db.close()
    store = await Store.open(path)
    try:
        await add_event(store, "evt-a", "alice")
        await finish(store, "ent-old", "evt-a", {"x": 1}, {"value": 2}, 1)
    finally:
        await store.close()
    # As if the entry had finished before 0004: its table gone, then 0004 run over the store
    # (later migrations stay applied: they run once).
    (backfill,) = [sql for n, sql in migrations("orchestrator", "sqlite") if n == 4]
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE results")
        raw.executescript(backfill)
    store = await Store.open(path)
    try:
        index = ResultsIndex(store.database)
        assert await ids(index, "alice", where="value = 2") == ["ent-old"]
    finally:
        await store.close()


# ------------------------------------------------------------------ the tool and the CLI


async def test_search_results_finds_finished_jobs_only_for_whoever_may_see_them(
    home: Path,
) -> None:
    eng = await Engine.open(make_settings(home))
    try:
        ids_ = await _search_through_the_tool(eng)
    finally:
        await shutdown(eng)  # the CLI opens the home next
    _search_through_the_cli(home, ids_)


async def _search_through_the_tool(eng: Engine) -> list[str]:
    alice = Client(create_server(eng, principal=Principal(id="alice")))
    bob = Client(create_server(eng, principal=Principal(id="bob")))
    async with alice, bob:
        ids_ = []
        for x1 in (1.0, 2.0, 3.0):
            entry = await submit_sim(alice, surface="branin", x1=x1, x2=2.0, duration_s=0.01)
            assert (await wait_entry(alice, entry["id"], 60))["entry"]["state"] == "succeeded"
            ids_.append(entry["id"])
        page = structured(
            await alice.call_tool(
                "search_results",
                {"query": 'surface = "branin" and x1 >= 2', "sort": "x1", "order": "asc",
                 "format": "csv"},
            )
        )  # fmt: skip
        assert [r["entry_id"] for r in page["rows"]] == ids_[1:]
        row = page["rows"][0]
        assert row["service"] == "sim-instrument" and row["site"] == "local"
        assert row["submitted_by"] == "alice" and len(row["template_sha256"]) == 64
        assert row["started_at"] and row["finished_at"] and isinstance(row["result"], dict)
        table = list(csv.DictReader(io.StringIO(page["csv"])))
        assert [t["entry_id"] for t in table] == ids_[1:]
        assert [float(t["parameters.x1"]) for t in table] == [2.0, 3.0]
        # Bob sees nothing of alice's, by query or by naming her event.
        assert structured(await bob.call_tool("search_results", {}))["rows"] == []
        with pytest.raises(ToolError, match="not_found"):
            await bob.call_tool("search_results", {"event_id": row["event_id"]})
        with pytest.raises(ToolError, match=r"invalid_input: query: at column 4: expected"):
            await alice.call_tool("search_results", {"query": "x1 ~ 2"})
        with pytest.raises(ToolError, match="sort"):
            await alice.call_tool("search_results", {"sort": "x1; drop"})
    return ids_


def _search_through_the_cli(home: Path, ids_: list[str]) -> None:
    env = cli_env(home, principal="alice")
    out = tmp = home.parent / "found.csv"
    done = subprocess.run(
        [sys.executable, "-m", "sciorch.cli", "search", "x1 < 2.5", "--csv", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2 rows" in done.stdout
    assert sorted(r["entry_id"] for r in csv.DictReader(tmp.open())) == sorted(ids_[:2])
    bad = subprocess.run(
        [sys.executable, "-m", "sciorch.cli", "search", "x1 <"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "at column 5: expected a value" in bad.stderr
    parquet = home.parent / "found.parquet"
    search = ["search", "--parquet", str(parquet)]
    # Without pyarrow: refused before anything runs, naming the extra to install.
    hidden = subprocess.run(
        [sys.executable, "-c", HIDE_PYARROW, *search],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert hidden.returncode == 2 and "pip install 'sciorch[parquet]'" in hidden.stderr
    assert not parquet.exists()
    wrote = subprocess.run(
        [sys.executable, "-m", "sciorch.cli", *search],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    table = pq.read_table(parquet)
    rows = sorted(table.to_pylist(), key=lambda r: r["parameters.x1"])
    assert [r["entry_id"] for r in rows] == ids_  # submitted with x1 = 1, 2, 3
    assert [r["parameters.x1"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["service"] == "sim-instrument" and r["state"] == "succeeded" for r in rows)
    types = {f.name: f.type for f in table.schema}
    assert types["parameters.x1"] == pa.float64() and types["parameters.surface"] == pa.string()
    assert types["result.value"] == pa.float64() and types["entry_id"] == pa.string()
    assert types["finished_at"] == pa.timestamp("us", tz="UTC")
    assert all(r["finished_at"] > r["started_at"] for r in rows)
    as_bob = subprocess.run(
        [sys.executable, "-m", "sciorch.cli", "search", "--json"],
        env=cli_env(home, principal="bob"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert as_bob.returncode == 0 and json.loads(as_bob.stdout)["rows"] == []
