"""The store: the source of truth for events, shares, entries and their transitions.

SQLite by default (WAL, one connection per process), PostgreSQL when the `store` setting is a
`postgresql://` URL; the SQL is written once over `orchestrator.database`. Schema changes are
numbered SQL files in `migrations/<dialect>/`, applied in order at open.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from ground.models import (
    ACTIVE_STATES,
    Entry,
    EntryState,
    Event,
    EventState,
    Resources,
    Role,
    Transition,
)
from orchestrator.database import Conn, Database, Row, Where, open_database, parse_ts


def now() -> datetime:
    return datetime.now(UTC)


def _dt(value: str | datetime | None) -> datetime | None:
    return parse_ts(value) if value else None


_ENTRY_COLS = (
    "id, event_id, service, version, kind, site, submitted_by, state, reason, parameters, "
    "resources, created_at, updated_at, started_at, finished_at, exit_code, url, endpoint, "
    "handle, idempotency_key, restarts, result"
)


KNOWN_SIZE = 4096
Known = TypeVar("Known", Entry, Event)

# The two queries that fetch a row with its children as JSON in one round trip (aiosqlite hops
# to its thread per call, so one query where a cursor takes three), per dialect.
_SHARES_JSON = {
    "sqlite": "json_group_object(principal, role)",
    "postgresql": "json_object_agg(principal, role)",
}
_TRANSITIONS_JSON = {
    "sqlite": "json_group_array(json_array(seq, state, at, reason))",
    "postgresql": "json_agg(json_build_array(seq, state, at, reason))",
}


class Store:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._ts = db.ts
        self._event_sql = (
            f"SELECT *, (SELECT {_SHARES_JSON[db.dialect]} FROM shares"
            " WHERE event_id = events.id) AS shares_json FROM events WHERE id = ?"
        )
        self._entry_sql = {
            False: f"SELECT {_ENTRY_COLS} FROM entries WHERE id = ?",
            True: f"SELECT {_ENTRY_COLS}, (SELECT {_TRANSITIONS_JSON[db.dialect]} FROM transitions"
            " WHERE entry_id = entries.id) AS trs_json FROM entries WHERE id = ?",
        }
        # Agents poll one entry (and so its event) over and over; on SQLite each read is a
        # round trip to aiosqlite's thread, most of a get_entry call. There this process is the
        # only writer (the home lock) and every write goes through _writing(), which empties
        # the cache before and after, so an entry or event served from here is what the
        # database holds: while a write is under way reads go to the connection and queue
        # behind it, as before. Entries and events are frozen models, so every reader may
        # share one. On PostgreSQL other processes (replicas) may write, which this process
        # would not see: no cache there, every read asks the server.
        self._caching = db.dialect == "sqlite"
        self._known: dict[tuple[str, str], Entry | Event] = {}
        self._writes_open = 0
        self._generation = 0

    @property
    def dialect(self) -> str:
        return self._db.dialect

    @property
    def database(self) -> Database:
        """The database under this store (the leases live there too)."""
        return self._db

    @asynccontextmanager
    async def _writing(self, transaction: bool = False) -> AsyncIterator[Conn]:
        async with self._db.transaction() if transaction else self._db.writer() as conn:
            self._writes_open += 1
            self._generation += 1
            self._known.clear()
            try:
                yield conn
            finally:
                self._writes_open -= 1
                self._generation += 1
                self._known.clear()

    async def _write(self, sql: str, args: Sequence[Any]) -> None:
        async with self._writing() as conn:
            await conn.execute(sql, args)

    async def _one(
        self, kind: str, key: str, load: Callable[[], Awaitable[Known | None]]
    ) -> Known | None:
        """What `load()` finds for `key`, from memory when no write came since."""
        if not self._caching:
            return await load()
        if not self._writes_open:
            known = self._known.get((kind, key))
            if known is not None:
                return cast(Known, known)
        generation = self._generation
        value = await load()
        if value is not None and generation == self._generation and not self._writes_open:
            if len(self._known) >= KNOWN_SIZE:
                self._known.clear()
            self._known[(kind, key)] = value
        return value

    @classmethod
    async def open(cls, location: Path | str) -> Store:
        """The store at `location`: a SQLite file's path, or a `postgresql://` URL."""
        return cls(await open_database(location, "orchestrator"))

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        return await self._db.schema_version()

    # ------------------------------------------------------------------ events

    async def insert_event(self, event: Event) -> None:
        async with self._writing(transaction=True) as db:
            await db.execute(
                "INSERT INTO events (id, name, owner, site, state, created_at, expires_at, "
                "stopped_at, is_default, reservation, webhook_url) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    event.id,
                    event.name,
                    event.owner,
                    event.site,
                    event.state.value,
                    self._ts(event.created_at),
                    self._ts(event.expires_at),
                    self._ts(event.stopped_at),
                    int(event.default),
                    event.reservation,
                    event.webhook_url,
                ),
            )

    def _event(self, row: Row, shares: dict[str, Role]) -> Event:
        return Event(
            id=row["id"],
            name=row["name"],
            owner=row["owner"],
            site=row["site"],
            state=EventState(row["state"]),
            created_at=parse_ts(row["created_at"]),
            expires_at=_dt(row["expires_at"]),
            stopped_at=_dt(row["stopped_at"]),
            shares=shares,
            default=bool(row["is_default"]),
            reservation=row["reservation"],
            webhook_url=row["webhook_url"],
        )

    async def _shares(self, event_ids: Sequence[str]) -> dict[str, dict[str, Role]]:
        out: dict[str, dict[str, Role]] = {eid: {} for eid in event_ids}
        if not event_ids:
            return out
        marks = ",".join("?" * len(event_ids))
        for row in await self._db.fetch(
            f"SELECT event_id, principal, role FROM shares WHERE event_id IN ({marks})",
            tuple(event_ids),
        ):
            out[row["event_id"]][row["principal"]] = Role(row["role"])
        return out

    async def get_event(self, event_id: str) -> Event | None:
        return await self._one("event", event_id, lambda: self._load_event(event_id))

    async def _load_event(self, event_id: str) -> Event | None:
        row = await self._db.fetchrow(self._event_sql, (event_id,))
        if row is None:
            return None
        shares = {p: Role(r) for p, r in json.loads(row["shares_json"] or "{}").items()}
        return self._event(row, shares)

    async def default_event(self, owner: str) -> Event | None:
        row = await self._db.fetchrow(
            "SELECT id FROM events WHERE owner = ? AND is_default = 1 AND state = 'active'",
            (owner,),
        )
        return await self.get_event(row["id"]) if row else None

    async def list_events(
        self, principal: str | None, include_inactive: bool = False
    ) -> list[Event]:
        """Events `principal` owns or has a share in (all events if principal is None)."""
        where = Where()
        if principal is not None:
            where.add(
                "(owner = ? OR id IN (SELECT event_id FROM shares WHERE principal = ?))",
                principal,
                principal,
            )
        if not include_inactive:
            where.add("state = 'active'")
        rows = await self._db.fetch(
            f"SELECT * FROM events{where.sql()} ORDER BY created_at", where.args
        )
        shares = await self._shares([r["id"] for r in rows])
        return [self._event(r, shares[r["id"]]) for r in rows]

    async def set_event_state(self, event_id: str, state: EventState, at: datetime) -> None:
        await self._write(
            "UPDATE events SET state = ?, stopped_at = ? WHERE id = ? AND state = 'active'",
            (state.value, self._ts(at), event_id),
        )

    async def set_share(self, event_id: str, principal: str, role: Role | None) -> None:
        if role is None:
            await self._write(
                "DELETE FROM shares WHERE event_id = ? AND principal = ?", (event_id, principal)
            )
        else:
            await self._write(
                "INSERT INTO shares (event_id, principal, role) VALUES (?,?,?) "
                "ON CONFLICT(event_id, principal) DO UPDATE SET role = excluded.role",
                (event_id, principal, role.value),
            )

    async def next_expiry(self) -> tuple[str, datetime] | None:
        row = await self._db.fetchrow(
            "SELECT id, expires_at FROM events WHERE state = 'active' AND expires_at IS NOT NULL "
            "ORDER BY expires_at LIMIT 1"
        )
        if row is None:
            return None
        at = _dt(row["expires_at"])
        assert at is not None
        return row["id"], at

    # ------------------------------------------------------------------ entries

    async def insert_entry(
        self, entry: Entry, spec: dict[str, Any], request_hash: str | None
    ) -> None:
        """Insert the entry with its first transition, in one transaction."""
        async with self._writing(transaction=True) as db:
            await db.execute(
                f"INSERT INTO entries ({_ENTRY_COLS}, request_hash, spec) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    entry.id,
                    entry.event_id,
                    entry.service,
                    entry.version,
                    entry.kind,
                    entry.site,
                    entry.submitted_by,
                    entry.state.value,
                    entry.reason,
                    json.dumps(entry.parameters),
                    entry.resources.model_dump_json(),
                    self._ts(entry.created_at),
                    self._ts(entry.updated_at),
                    None,
                    None,
                    None,
                    entry.url,
                    None,
                    json.dumps(entry.handle),
                    entry.idempotency_key,
                    0,
                    None,
                    request_hash,
                    json.dumps(spec),
                ),
            )
            await db.execute(
                "INSERT INTO transitions (entry_id, state, at, reason) VALUES (?,?,?,?)",
                (entry.id, entry.state.value, self._ts(entry.created_at), entry.reason),
            )

    def _entry(self, row: Row, transitions: list[Transition] | None) -> Entry:
        return Entry(
            id=row["id"],
            event_id=row["event_id"],
            service=row["service"],
            version=row["version"],
            kind=row["kind"],
            site=row["site"],
            submitted_by=row["submitted_by"],
            state=EntryState(row["state"]),
            reason=row["reason"],
            parameters=json.loads(row["parameters"]),
            resources=Resources.model_validate_json(row["resources"]),
            created_at=parse_ts(row["created_at"]),
            updated_at=parse_ts(row["updated_at"]),
            started_at=_dt(row["started_at"]),
            finished_at=_dt(row["finished_at"]),
            exit_code=row["exit_code"],
            url=row["url"],
            endpoint=row["endpoint"],
            handle=json.loads(row["handle"]),
            idempotency_key=row["idempotency_key"],
            restarts=row["restarts"],
            result=json.loads(row["result"]) if row["result"] else None,
            transitions=transitions or [],
        )

    async def get_entry(self, entry_id: str, transitions: bool = True) -> Entry | None:
        kind = "entry+transitions" if transitions else "entry"
        return await self._one(kind, entry_id, lambda: self._load_entry(entry_id, transitions))

    async def _load_entry(self, entry_id: str, transitions: bool) -> Entry | None:
        # The entry with its transitions as JSON [seq, state, at, reason] (sorted here by seq).
        row = await self._db.fetchrow(self._entry_sql[transitions], (entry_id,))
        if row is None:
            return None
        trs: list[Transition] | None = None
        if transitions:
            trs = [
                Transition(state=EntryState(state), at=parse_ts(at), reason=reason)
                for _seq, state, at, reason in sorted(json.loads(row["trs_json"] or "[]"))
            ]
        return self._entry(row, trs)

    async def get_spec(self, entry_id: str) -> dict[str, Any]:
        row = await self._db.fetchrow("SELECT spec FROM entries WHERE id = ?", (entry_id,))
        return dict(json.loads(row["spec"])) if row else {}

    async def find_idempotent(self, principal: str, key: str) -> tuple[str, str | None] | None:
        row = await self._db.fetchrow(
            "SELECT id, request_hash FROM entries WHERE submitted_by = ? AND idempotency_key = ?",
            (principal, key),
        )
        return (row["id"], row["request_hash"]) if row else None

    async def list_entries(
        self,
        event_ids: Iterable[str] | None = None,
        states: Iterable[EntryState] | None = None,
        service: str | None = None,
        submitted_by: str | None = None,
        limit: int = 100,
        after: tuple[str, str] | None = None,
    ) -> list[Entry]:
        """Newest-last pages; `after` is the (created_at, id) of the last entry already seen."""
        where = (
            Where()
            .among("event_id", event_ids)
            .among("state", None if states is None else [s.value for s in states])
            .equal("service", service)
            .equal("submitted_by", submitted_by)
        )
        if after is not None:
            where.add("(created_at, id) > (?, ?)", self._ts(parse_ts(after[0])), after[1])
        sql = f"SELECT {_ENTRY_COLS} FROM entries{where.sql()} ORDER BY created_at, id LIMIT ?"
        return [self._entry(r, None) for r in await self._db.fetch(sql, [*where.args, limit])]

    async def count_active(self, submitted_by: str, service: str) -> int:
        marks = ",".join("?" * len(ACTIVE_STATES))
        row = await self._db.fetchrow(
            f"SELECT COUNT(*) FROM entries WHERE submitted_by = ? AND service = ? "
            f"AND state IN ({marks})",
            (submitted_by, service, *[s.value for s in ACTIVE_STATES]),
        )
        return int(row[0]) if row else 0

    async def apply_transition(
        self,
        entry_id: str,
        state: EntryState,
        at: datetime,
        reason: str | None,
        fields: dict[str, Any],
    ) -> None:
        """Write the new state, its extra fields and the transition row in one transaction."""
        sets = ["state = ?", "reason = ?", "updated_at = ?"]
        args: list[Any] = [state.value, reason, self._ts(at)]
        for key, value in fields.items():
            sets.append(f"{key} = ?")
            if key in ("handle", "result"):
                args.append(json.dumps(value) if value is not None else None)
            elif isinstance(value, datetime):
                args.append(self._ts(value))
            else:
                args.append(value)
        args.append(entry_id)
        async with self._writing(transaction=True) as db:
            await db.execute(f"UPDATE entries SET {', '.join(sets)} WHERE id = ?", args)
            await db.execute(
                "INSERT INTO transitions (entry_id, state, at, reason) VALUES (?,?,?,?)",
                (entry_id, state.value, self._ts(at), reason),
            )

    async def request_stop(self, entry_id: str, state: EntryState, reason: str) -> None:
        """Remember the final state a stop asked for; the first request wins."""
        await self._write(
            "UPDATE entries SET stop_requested = ? WHERE id = ? AND stop_requested IS NULL",
            (json.dumps({"state": state.value, "reason": reason}), entry_id),
        )

    async def stop_request(self, entry_id: str) -> tuple[EntryState, str] | None:
        row = await self._db.fetchrow(
            "SELECT stop_requested FROM entries WHERE id = ?", (entry_id,)
        )
        if row is None or row[0] is None:
            return None
        data = json.loads(row[0])
        return EntryState(data["state"]), str(data["reason"])

    async def update_entry_fields(self, entry_id: str, fields: dict[str, Any]) -> None:
        """Fields that change without a state change (a result read after the fact)."""
        if not fields:
            return
        sets, args = [], []
        for key, value in fields.items():
            sets.append(f"{key} = ?")
            args.append(json.dumps(value) if key in ("handle", "result") else value)
        await self._write(f"UPDATE entries SET {', '.join(sets)} WHERE id = ?", (*args, entry_id))
