"""Campaign persistence: `<home>/steering.db`, SQLite in WAL mode, next to the engine's database;
or, when the engine's store is PostgreSQL, the same PostgreSQL database in a schema of its own
(`<schema>_steering`), so that any replica can resume a campaign.

A separate database, because a campaign's runner may live in another process than the engine it
drives (`sciorch steer --url` against a remote server keeps its campaigns in the client's home).
The migrations are `steering/migrations/<dialect>/NNNN_*.sql` (see orchestrator.database).
Every ask is written before its job is submitted, the entry id as soon as submit_job answers,
the result when it arrives; that order is what makes resume exact (see steering.runner).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.database import Database, Row, Where, open_database
from steering.models import ActionRecord, CampaignRecord, CampaignState, EvaluationRecord

_JSON = {
    "owner_claims",
    "spec",
    "gp_state",
    "posterior",
    "plots",
    "point",
    "attempts",
    "result",
    "arguments",
}


def now() -> datetime:
    return datetime.now(UTC)


def _encode(key: str, value: Any, ts: Callable[[datetime], Any]) -> Any:
    if key == "spec":
        return value.model_dump_json(exclude_none=True)
    if key == "attempts":
        return json.dumps([a if isinstance(a, dict) else a.model_dump() for a in value])
    if key in _JSON:
        return None if value is None else json.dumps(value, default=str)
    if isinstance(value, datetime):
        return ts(value)
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "value") and not isinstance(value, int | float | str):
        return value.value  # enums
    return value


def _decode_row(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in row.keys():
        value = row[key]
        if key in _JSON and value is not None:
            value = json.loads(value)
        out[key] = value
    return out


class CampaignStore:
    def __init__(self, db: Database, location: Path | str) -> None:
        self._db = db
        self.location = location

    @classmethod
    async def open(cls, location: Path | str) -> CampaignStore:
        """A SQLite file's path, or the engine's `postgresql://` store URL."""
        return cls(await open_database(location, "steering", schema_suffix="_steering"), location)

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        return await self._db.schema_version()

    async def _exec(self, sql: str, args: tuple[Any, ...] | list[Any]) -> None:
        await self._db.execute(sql, args)

    def _enc(self, key: str, value: Any) -> Any:
        return _encode(key, value, self._db.ts)

    # ------------------------------------------------------------------ campaigns

    async def insert_campaign(self, rec: CampaignRecord) -> None:
        data = rec.model_dump()
        data["spec"] = rec.spec
        cols = list(data)
        await self._exec(
            f"INSERT INTO campaigns ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [self._enc(c, data[c]) for c in cols],
        )

    async def get_campaign(self, campaign_id: str) -> CampaignRecord | None:
        row = await self._db.fetchrow("SELECT * FROM campaigns WHERE id = ?", (campaign_id,))
        return CampaignRecord.model_validate(_decode_row(row)) if row else None

    async def list_campaigns(
        self,
        owner: str | None = None,
        states: list[CampaignState] | None = None,
        endpoint: str | None = None,
    ) -> list[CampaignRecord]:
        where = (
            Where()
            .equal("owner", owner)
            .among("state", None if states is None else [s.value for s in states])
            .equal("endpoint", endpoint)
        )
        rows = await self._db.fetch(
            f"SELECT * FROM campaigns{where.sql()} ORDER BY created_at, id", where.args
        )
        return [CampaignRecord.model_validate(_decode_row(r)) for r in rows]

    async def update_campaign(self, campaign_id: str, **fields: Any) -> None:
        fields["updated_at"] = now()
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self._exec(
            f"UPDATE campaigns SET {sets} WHERE id = ?",
            [*(self._enc(k, v) for k, v in fields.items()), campaign_id],
        )

    async def finish_campaign(
        self, campaign_id: str, state: CampaignState, reason: str | None
    ) -> None:
        """Record the end once: a campaign that already ended keeps its first ending."""
        at = now()
        await self._exec(
            "UPDATE campaigns SET state = ?, reason = ?, finished_at = ?, updated_at = ? "
            "WHERE id = ? AND state = 'running'",
            (state.value, reason, self._db.ts(at), self._db.ts(at), campaign_id),
        )

    # ------------------------------------------------------------------ evaluations

    async def insert_evaluation(self, rec: EvaluationRecord) -> None:
        data = rec.model_dump()
        cols = list(data)
        await self._exec(
            f"INSERT INTO evaluations ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [self._enc(c, data[c]) for c in cols],
        )

    async def update_evaluation(self, campaign_id: str, seq: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        await self._exec(
            f"UPDATE evaluations SET {sets} WHERE campaign_id = ? AND seq = ?",
            [*(self._enc(k, v) for k, v in fields.items()), campaign_id, seq],
        )

    async def evaluations(self, campaign_id: str) -> list[EvaluationRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM evaluations WHERE campaign_id = ? ORDER BY seq", (campaign_id,)
        )
        return [EvaluationRecord.model_validate(_decode_row(r)) for r in rows]

    async def next_seq(self, campaign_id: str) -> int:
        row = await self._db.fetchrow(
            "SELECT MAX(seq) AS top FROM evaluations WHERE campaign_id = ?", (campaign_id,)
        )
        top = row["top"] if row is not None else None
        return 0 if top is None else int(top) + 1

    # ------------------------------------------------------------------ people's actions

    async def insert_action(self, rec: ActionRecord) -> None:
        data = rec.model_dump()
        cols = list(data)
        await self._exec(
            f"INSERT INTO campaign_actions ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' * len(cols))})",
            [self._enc(c, data[c]) for c in cols],
        )

    async def actions(self, campaign_id: str) -> list[ActionRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM campaign_actions WHERE campaign_id = ? ORDER BY at, id", (campaign_id,)
        )
        return [ActionRecord.model_validate(_decode_row(r)) for r in rows]
