"""Campaign persistence: `<home>/steering.db`, SQLite in WAL mode, next to the engine's database.

A separate file, because a campaign's runner may live in another process than the engine it
drives (`sciorch steer --url` against a remote server keeps its campaigns in the client's home).
Every ask is written before its job is submitted, the entry id as soon as submit_job answers,
the result when it arrives; that order is what makes resume exact (see steering.runner).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from orchestrator.store import open_sqlite
from steering.models import CampaignRecord, CampaignState, EvaluationRecord

MIGRATIONS: list[str] = [
    """
    CREATE TABLE campaigns (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        owner           TEXT NOT NULL,
        admin           INTEGER NOT NULL DEFAULT 0,
        spec            TEXT NOT NULL,
        seed            INTEGER NOT NULL,
        state           TEXT NOT NULL,
        reason          TEXT,
        endpoint        TEXT NOT NULL DEFAULT 'embedded',
        event_id        TEXT,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        finished_at     TEXT,
        stop_requested  INTEGER NOT NULL DEFAULT 0,
        gp_state        TEXT NOT NULL DEFAULT '{}',
        posterior       TEXT,
        plots           TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX campaigns_owner ON campaigns(owner, created_at);
    CREATE INDEX campaigns_state ON campaigns(state);
    CREATE TABLE evaluations (
        campaign_id      TEXT NOT NULL REFERENCES campaigns(id),
        seq              INTEGER NOT NULL,
        point            TEXT NOT NULL,
        source           TEXT NOT NULL,
        state            TEXT NOT NULL,
        attempt          INTEGER NOT NULL DEFAULT 1,
        idempotency_key  TEXT NOT NULL,
        entry_id         TEXT,
        attempts         TEXT NOT NULL DEFAULT '[]',
        value            REAL,
        noise            REAL,
        result           TEXT,
        reason           TEXT,
        decision_s       REAL,
        asked_at         TEXT NOT NULL,
        submitted_at     TEXT,
        finished_at      TEXT,
        PRIMARY KEY (campaign_id, seq)
    );
    CREATE UNIQUE INDEX evaluations_key ON evaluations(idempotency_key);
    """,
]

_JSON = {"spec", "gp_state", "posterior", "plots", "point", "attempts", "result"}


def now() -> datetime:
    return datetime.now(UTC)


def _encode(key: str, value: Any) -> Any:
    if key == "spec":
        return value.model_dump_json(exclude_none=True)
    if key == "attempts":
        return json.dumps([a if isinstance(a, dict) else a.model_dump() for a in value])
    if key in _JSON:
        return None if value is None else json.dumps(value, default=str)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "value") and not isinstance(value, int | float | str):
        return value.value  # enums
    return value


def _decode_row(row: aiosqlite.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():
        value = row[key]
        if key in _JSON and value is not None:
            value = json.loads(value)
        out[key] = value
    return out


class CampaignStore:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> CampaignStore:
        db = await open_sqlite(path, enumerate(MIGRATIONS, start=1))
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def _exec(self, sql: str, args: tuple[Any, ...] | list[Any]) -> None:
        async with self._lock:
            await self._db.execute(sql, args)

    # ------------------------------------------------------------------ campaigns

    async def insert_campaign(self, rec: CampaignRecord) -> None:
        data = rec.model_dump()
        data["spec"] = rec.spec
        cols = list(data)
        await self._exec(
            f"INSERT INTO campaigns ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [_encode(c, data[c]) for c in cols],
        )

    async def get_campaign(self, campaign_id: str) -> CampaignRecord | None:
        async with self._db.execute("SELECT * FROM campaigns WHERE id = ?", (campaign_id,)) as cur:
            row = await cur.fetchone()
        return CampaignRecord.model_validate(_decode_row(row)) if row else None

    async def list_campaigns(
        self,
        owner: str | None = None,
        states: list[CampaignState] | None = None,
        endpoint: str | None = None,
    ) -> list[CampaignRecord]:
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        if endpoint is not None:
            where.append("endpoint = ?")
            args.append(endpoint)
        sql = "SELECT * FROM campaigns"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id"
        async with self._db.execute(sql, args) as cur:
            return [CampaignRecord.model_validate(_decode_row(r)) async for r in cur]

    async def update_campaign(self, campaign_id: str, **fields: Any) -> None:
        fields["updated_at"] = now()
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self._exec(
            f"UPDATE campaigns SET {sets} WHERE id = ?",
            [*(_encode(k, v) for k, v in fields.items()), campaign_id],
        )

    async def finish_campaign(
        self, campaign_id: str, state: CampaignState, reason: str | None
    ) -> None:
        """Record the end once: a campaign that already ended keeps its first ending."""
        at = now()
        await self._exec(
            "UPDATE campaigns SET state = ?, reason = ?, finished_at = ?, updated_at = ? "
            "WHERE id = ? AND state = 'running'",
            (state.value, reason, at.isoformat(), at.isoformat(), campaign_id),
        )

    # ------------------------------------------------------------------ evaluations

    async def insert_evaluation(self, rec: EvaluationRecord) -> None:
        data = rec.model_dump()
        cols = list(data)
        await self._exec(
            f"INSERT INTO evaluations ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [_encode(c, data[c]) for c in cols],
        )

    async def update_evaluation(self, campaign_id: str, seq: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self._exec(
            f"UPDATE evaluations SET {sets} WHERE campaign_id = ? AND seq = ?",
            [*(_encode(k, v) for k, v in fields.items()), campaign_id, seq],
        )

    async def evaluations(self, campaign_id: str) -> list[EvaluationRecord]:
        async with self._db.execute(
            "SELECT * FROM evaluations WHERE campaign_id = ? ORDER BY seq", (campaign_id,)
        ) as cur:
            return [EvaluationRecord.model_validate(_decode_row(r)) async for r in cur]
