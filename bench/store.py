"""The store on PostgreSQL against the store on SQLite, measured in the same run.

    python bench/store.py [--entries 300] [--rounds 3] [--postgres URL] [--only sqlite]

Per round and store: --entries entries are inserted, then for each in turn a state transition
(`apply_transition`: the UPDATE and the transition row, one transaction), the first
`get_entry` after it (from the database: a write empties SQLite's read cache) and a second
`get_entry` (SQLite answers it from its cache; PostgreSQL has none, other replicas may write,
so it asks the server again). Medians and p90 in microseconds, per round.

SQLite is a file in a temporary directory (WAL, synchronous=NORMAL, as the engine opens it).
PostgreSQL is $SCIORCH_TEST_POSTGRES or --postgres; without either the bench starts the test
server with scripts/postgres.sh (and stops it again), in a fresh schema dropped at the end.
Note that the test server runs with fsync=off, so its commits cost what SQLite's do without a
disk flush: the comparison is of round trips and query work, not of durability.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ground.models import Entry, EntryState, Event, Resources
from orchestrator.store import Store

ROOT = Path(__file__).resolve().parent.parent

STATES = [EntryState.PROVISIONING, EntryState.RUNNING, EntryState.SUCCEEDED]


def stats(samples: list[float]) -> tuple[float, float]:
    """(median, p90) in microseconds."""
    us = sorted(s * 1e6 for s in samples)
    return statistics.median(us), us[min(len(us) - 1, round(0.9 * (len(us) - 1)))]


async def timed(samples: list[float], call: Awaitable[Any]) -> None:
    start = time.perf_counter()
    await call
    samples.append(time.perf_counter() - start)


async def one_round(store: Store, n: int, tag: str) -> dict[str, list[float]]:
    at = datetime.now(UTC)
    event_id = f"evt-{tag}"
    await store.insert_event(Event(id=event_id, name="bench", owner="bench", created_at=at))
    ids = [f"ent-{tag}-{i}" for i in range(n)]
    for entry_id in ids:
        entry = Entry(
            id=entry_id, event_id=event_id, service="sim-instrument", version="1.0.0",
            kind="job", site="local", submitted_by="bench", state=EntryState.PENDING,
            resources=Resources(), parameters={"x1": 1.0, "x2": 2.0}, created_at=at,
            updated_at=at, handle={"pid": 1},
        )
        await store.insert_entry(entry, {"command": ["true"]}, None)
    out: dict[str, list[float]] = {"apply_transition": [], "get_entry": [], "get_entry again": []}
    for i, entry_id in enumerate(ids):
        state = STATES[i % len(STATES)]
        now = datetime.now(UTC)
        await timed(
            out["apply_transition"],
            store.apply_transition(entry_id, state, now, None, {"exit_code": 0}),
        )
        await timed(out["get_entry"], store.get_entry(entry_id))
        await timed(out["get_entry again"], store.get_entry(entry_id))
    return out


def start_postgres() -> tuple[str, bool]:
    """(URL, whether this run started the server)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "postgres.sh"), "start"],
        capture_output=True, text=True, check=True,
    )
    env_file = Path(proc.stdout.strip().splitlines()[-1])
    line = env_file.read_text().strip()
    return line.split("=", 1)[1], "up on" in proc.stderr


async def drop_schema(base: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=os.environ.get("SCIORCH_TEST_POSTGRES"))
    parser.add_argument("--only", choices=["sqlite"], help="SQLite alone (no PostgreSQL)")
    args = parser.parse_args()

    started = False
    base = args.postgres
    if not base and not args.only:
        base, started = await asyncio.to_thread(start_postgres)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    results: dict[str, list[dict[str, list[float]]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"sqlite": await Store.open(Path(tmp) / "bench.db")}
            if not args.only:
                stores["postgresql"] = await Store.open(f"{base}?schema={schema}")
            try:
                for r in range(args.rounds):
                    for name, store in stores.items():  # interleaved: both see the same machine
                        res = await one_round(store, args.entries, f"{r}")
                        results.setdefault(name, []).append(res)
            finally:
                for store in stores.values():
                    await store.close()
    finally:
        if base and not args.only:
            await drop_schema(base, schema)
        if started:
            await asyncio.to_thread(
                subprocess.run, ["bash", str(ROOT / "scripts" / "postgres.sh"), "stop"], check=False
            )

    print(f"store bench: {args.entries} entries x {args.rounds} rounds (median / p90, us)")
    medians: dict[tuple[str, str], list[float]] = {}
    for name, rounds in results.items():
        print(f"{name}:")
        for i, res in enumerate(rounds, 1):
            cells = []
            for op, samples in res.items():
                med, p90 = stats(samples)
                medians.setdefault((name, op), []).append(med)
                cells.append(f"{op} {med:7.1f} / {p90:7.1f}")
            print(f"  round {i}: " + " | ".join(cells))
    if args.only:
        return
    print("postgresql / sqlite (median of the rounds' medians):")
    for op in ("apply_transition", "get_entry", "get_entry again"):
        pg = statistics.median(medians[("postgresql", op)])
        lite = statistics.median(medians[("sqlite", op)])
        print(f"  {op:17s} sqlite {lite:7.1f} us  postgresql {pg:7.1f} us  = {pg / lite:5.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
