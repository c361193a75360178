"""Flow persistence: `<home>/flows.db` (SQLite, WAL) next to the engine's database, or the
engine's PostgreSQL database in a schema of its own (`<schema>_flows`).

The order of writes is what makes a restart exact (see flows.runner): a step's row is written
(pending, with its attempt) before its job is submitted with an idempotency key derived from
(run, step, attempt); its entry id as soon as the engine answers; its result before any step
that needs it starts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from flows.models import RunRecord, RunState, StepRecord, TriggerRecord
from orchestrator.database import Database, IntegrityError, Row, Where, open_database

_JSON = {
    "owner_claims",
    "spec",
    "inputs",
    "trigger_info",
    "outputs",
    "item",
    "result",
    "config",
    "cursor",
}
Rec = TypeVar("Rec", bound=BaseModel)


def now() -> datetime:
    return datetime.now(UTC)


class FlowStore:
    def __init__(self, db: Database, location: Path | str) -> None:
        self._db = db
        self.location = location

    @classmethod
    async def open(cls, location: Path | str) -> FlowStore:
        """A SQLite file's path, or the engine's `postgresql://` store URL."""
        return cls(await open_database(location, "flows", schema_suffix="_flows"), location)

    async def close(self) -> None:
        await self._db.close()

    def _enc(self, key: str, value: Any) -> Any:
        if key in _JSON:
            return None if value is None else json.dumps(value, default=str)
        if isinstance(value, datetime):
            return self._db.ts(value)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, Enum):
            return value.value
        return value

    @staticmethod
    def _dec(row: Row, model: type[Rec]) -> Rec:
        out: dict[str, Any] = {}
        for key in row.keys():
            value = row[key]
            if key in _JSON and isinstance(value, str):
                value = json.loads(value)
            out[key] = value
        return model.model_validate(out)

    async def _insert(self, table: str, rec: BaseModel) -> None:
        data = rec.model_dump()
        cols = list(data)
        await self._db.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [self._enc(c, data[c]) for c in cols],
        )

    async def _update(self, table: str, where: dict[str, Any], fields: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        cond = " AND ".join(f"{k} = ?" for k in where)
        await self._db.execute(
            f"UPDATE {table} SET {sets} WHERE {cond}",
            [*(self._enc(k, v) for k, v in fields.items()), *where.values()],
        )

    # ------------------------------------------------------------------ runs

    async def insert_run(self, rec: RunRecord) -> RunRecord:
        """Record a new run; with an idempotency key already used by its owner, the run that
        has it (and nothing is written)."""
        if rec.idempotency_key is not None:
            found = await self.find_run(rec.owner, rec.idempotency_key)
            if found is not None:
                return found
        try:
            await self._insert("flow_runs", rec)
        except IntegrityError:
            assert rec.idempotency_key is not None
            found = await self.find_run(rec.owner, rec.idempotency_key)
            assert found is not None
            return found
        return rec

    async def find_run(self, owner: str, key: str) -> RunRecord | None:
        row = await self._db.fetchrow(
            "SELECT * FROM flow_runs WHERE owner = ? AND idempotency_key = ?", (owner, key)
        )
        return self._dec(row, RunRecord) if row else None

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._db.fetchrow("SELECT * FROM flow_runs WHERE id = ?", (run_id,))
        return self._dec(row, RunRecord) if row else None

    async def list_runs(
        self,
        owners: list[str] | None = None,
        event_ids: list[str] | None = None,
        flow: str | None = None,
        states: list[RunState] | None = None,
        trigger_id: str | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        """Newest first. `owners` and `event_ids` together: runs of either."""
        where = (
            Where()
            .either(Where().among("owner", owners), Where().among("event_id", event_ids or None))
            .equal("flow", flow)
            .among("state", None if states is None else [s.value for s in states])
            .equal("trigger_id", trigger_id)
        )
        rows = await self._db.fetch(
            f"SELECT * FROM flow_runs{where.sql()} ORDER BY created_at DESC, id DESC LIMIT ?",
            [*where.args, limit],
        )
        return [self._dec(r, RunRecord) for r in rows]

    async def oldest_queued(self, trigger_id: str, n: int) -> list[RunRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM flow_runs WHERE state = 'queued' AND trigger_id = ? "
            "ORDER BY created_at, id LIMIT ?",
            (trigger_id, n),
        )
        return [self._dec(r, RunRecord) for r in rows]

    async def count_runs(self, trigger_id: str, state: RunState) -> int:
        row = await self._db.fetchrow(
            "SELECT COUNT(*) AS n FROM flow_runs WHERE trigger_id = ? AND state = ?",
            (trigger_id, state.value),
        )
        return int(row["n"]) if row else 0

    async def update_run(self, run_id: str, **fields: Any) -> None:
        fields["updated_at"] = now()
        await self._update("flow_runs", {"id": run_id}, fields)

    async def finish_run(
        self, run_id: str, state: RunState, reason: str | None, outputs: Any = None
    ) -> bool:
        """Record the end once: a run that already ended keeps its first ending."""
        at = now()
        before = await self.get_run(run_id)
        if before is None or before.state.terminal:
            return False
        await self._db.execute(
            "UPDATE flow_runs SET state = ?, reason = ?, outputs = ?, finished_at = ?, "
            "updated_at = ? WHERE id = ? AND state IN ('queued', 'running')",
            (
                state.value,
                reason,
                self._enc("outputs", outputs),
                self._db.ts(at),
                self._db.ts(at),
                run_id,
            ),
        )
        return True

    # ------------------------------------------------------------------ steps

    async def insert_step(self, rec: StepRecord) -> None:
        try:
            await self._insert("flow_steps", rec)
        except IntegrityError:
            pass  # written before a restart: the row stands

    async def steps(self, run_id: str) -> list[StepRecord]:
        rows = await self._db.fetch(
            "SELECT * FROM flow_steps WHERE run_id = ? ORDER BY started_at IS NULL, started_at, "
            "key",
            (run_id,),
        )
        return [self._dec(r, StepRecord) for r in rows]

    async def update_step(self, run_id: str, key: str, **fields: Any) -> None:
        await self._update("flow_steps", {"run_id": run_id, "key": key}, fields)

    # ------------------------------------------------------------------ triggers

    async def insert_trigger(self, rec: TriggerRecord) -> None:
        await self._insert("flow_triggers", rec)

    async def get_trigger(self, trigger_id: str) -> TriggerRecord | None:
        row = await self._db.fetchrow("SELECT * FROM flow_triggers WHERE id = ?", (trigger_id,))
        return self._dec(row, TriggerRecord) if row else None

    async def list_triggers(self, owner: str | None = None) -> list[TriggerRecord]:
        sql = "SELECT * FROM flow_triggers WHERE active = 1"
        args: list[Any] = []
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        rows = await self._db.fetch(sql + " ORDER BY created_at, id", args)
        return [self._dec(r, TriggerRecord) for r in rows]

    async def update_trigger(self, trigger_id: str, **fields: Any) -> None:
        await self._update("flow_triggers", {"id": trigger_id}, fields)
