"""Results catalogue benchmark: search_results' query over 100,000 indexed results on SQLite,
against a full scan (every row loaded and filtered in Python) in the same run.

    python bench/search.py [--rows 100000] [--repeat 20]

The catalogue is filled straight through sqlite3 (events, entries and results rows as the
engine writes them: 20 events of one owner, 5 services, 7 surfaces, values uniform in [0, 100)),
then each query runs through ResultsIndex.search (the SQL the tool runs, parsed from the query
language) `--repeat` times; the median is reported. Target: the typical query (one service,
`surface = "branin" and value < 5`, newest first, a page of 50) under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.results import ResultSearch, ResultsIndex
from orchestrator.results_query import parse_field, parse_query
from orchestrator.store import Store

SERVICES = ["sim-instrument", "xrd-fit", "tomo-recon", "saxs-reduce", "sim-beamline"]
SURFACES = ["branin", "hartmann3", "hartmann6", "rosenbrock", "sphere", "ackley", "himmelblau"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fill(path: Path, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    events = [f"evt-{i:04d}" for i in range(20)]
    db.executemany(
        "INSERT INTO events (id, name, owner, state, created_at) VALUES (?,?,?,?,?)",
        [
            (e, e, "alice" if i < 19 else "bob", "active", T0.isoformat())
            for i, e in enumerate(events)
        ],
    )
    entries, results = [], []
    for i in range(n):
        eid = f"ent-{i:08d}"
        ev = events[i % len(events)]
        svc = SERVICES[i % len(SERVICES)]
        params = {
            "surface": rng.choice(SURFACES),
            "x1": rng.uniform(-5, 10),
            "x2": rng.uniform(0, 15),
        }
        result = {"value": rng.uniform(0, 100), "noise": 0.01, "records": 10}
        start = T0 + timedelta(seconds=30 * i)
        end = start + timedelta(seconds=20)
        key = f"cmp-{i // 1000:012x}-{i % 1000}-1" if i % 2 else None
        entries.append(
            (eid, ev, svc, "1.0.0", "job", "local", "alice", "succeeded", json.dumps(params),
             "{}", start.isoformat(), end.isoformat(), start.isoformat(), end.isoformat(), key,
             json.dumps(result), "{}")
        )  # fmt: skip
        campaign, evaluation = (f"cmp-{i // 1000:012x}", i % 1000) if key else (None, None)
        results.append(
            (eid, ev, svc, "1.0.0", "succeeded", "local", "alice", None, campaign, evaluation,
             "ab" * 32, start.isoformat(), start.isoformat(), end.isoformat(), json.dumps(params),
             json.dumps(result), "[]")
        )  # fmt: skip
    db.executemany(
        "INSERT INTO entries (id, event_id, service, version, kind, site, submitted_by, state, "
        "parameters, resources, created_at, updated_at, started_at, finished_at, "
        "idempotency_key, result, spec) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        entries,
    )
    db.executemany(
        "INSERT INTO results (entry_id, event_id, service, version, state, site, submitted_by, "
        "account, campaign_id, evaluation, template_sha256, created_at, started_at, "
        "finished_at, parameters, result, artifacts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        results,
    )
    db.commit()
    db.execute("ANALYZE")
    db.close()


def scan(rows: list[Any], service: str, test: Any, limit: int = 50) -> list[str]:
    """The full scan: what a caller without the index does with every row in hand."""
    visible = {f"evt-{i:04d}" for i in range(19)}
    hits = []
    for r in rows:
        params, result = json.loads(r[3]), json.loads(r[4])
        if r[1] in visible and r[2] == service and test(params, result):
            hits.append((r[5], r[0]))
    hits.sort(reverse=True)
    return [h[1] for h in hits[:limit]]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sciorch.db"
        store = await Store.open(path)  # the schema, migrations applied
        t = time.perf_counter()
        fill(path, args.rows)
        print(f"filled {args.rows} results in {time.perf_counter() - t:.1f} s")
        index = ResultsIndex(store.database)
        assert await index.count() == args.rows
        queries: list[tuple[str, ResultSearch]] = [
            (
                'typical: service + surface = "branin" and value < 5, newest 50',
                ResultSearch(
                    where=parse_query('surface = "branin" and value < 5'), service="sim-instrument"
                ),
            ),
            (
                "campaign: one campaign's evaluations, newest 50",
                ResultSearch(campaign_id="cmp-000000000031"),
            ),
            (
                "time window: one hour, value < 50",
                ResultSearch(
                    where=parse_query("value < 50"),
                    finished_after=T0 + timedelta(days=10),
                    finished_before=T0 + timedelta(days=10, hours=1),
                ),
            ),
            (
                'best 10 by value: service + surface = "branin" (sorts every match)',
                ResultSearch(
                    where=parse_query('surface = "branin"'),
                    service="sim-instrument",
                    sort=parse_field("value"),
                    descending=False,
                    limit=10,
                ),
            ),
        ]
        figures = []
        for label, q in queries:
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                rows, _ = await index.search("alice", q)
                times.append((time.perf_counter() - t) * 1000)
            figures.append((label, statistics.median(times), max(times), len(rows)))
        t = time.perf_counter()
        raw = await store.database.fetch(
            "SELECT entry_id, event_id, service, parameters, result, finished_at FROM results"
        )
        hits = scan(
            raw,
            "sim-instrument",
            lambda p, r: p.get("surface") == "branin" and r.get("value", 1e9) < 5,
        )
        full_ms = (time.perf_counter() - t) * 1000
        typical, _ = await index.search("alice", queries[0][1])
        assert [r.entry_id for r in typical] == hits, "the index and the scan disagree"
        await store.close()
    print(f"\n{'query':70} {'median ms':>10} {'max ms':>8} {'rows':>5}")
    for label, med, worst, n in figures:
        print(f"{label:70} {med:10.1f} {worst:8.1f} {n:5d}")
    print(f"{'full scan: load all ' + str(args.rows) + ' rows, filter in Python (typical)':70} "
          f"{full_ms:10.1f} {'':8} {len(hits):5d}")  # fmt: skip
    typical_ms = figures[0][1]
    verdict = "met" if typical_ms < 100 else "NOT met"
    print(f"\ntypical query {typical_ms:.1f} ms vs full scan {full_ms:.0f} ms "
          f"({full_ms / typical_ms:.0f}x); target < 100 ms: {verdict}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
