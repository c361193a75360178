"""The results catalogue: every finished entry's parameters, result, artifacts and provenance in
one table (`results`, migration 0004), written by the engine as the entry reaches its final
state and searched by `search_results`.

Provenance is what the engine knows at that moment: service and version, event, site, who
submitted it, the site account when the backend recorded one in the entry's handle (`account`),
start and end, the sha256 of the template (the catalogue's `service@version`, canonical JSON),
and, for an entry a campaign submitted, the campaign and the evaluation's sequence number, read
from the idempotency key the steering runner gives every evaluation (`<campaign>-<seq>-<n>`).

Search is one parameterised statement per page (orchestrator.results_query builds the WHERE
from the query language): visibility first (events the principal owns or has a share in, all
for an admin), then the column filters, the query, the order and a keyset cursor, so a page
costs the same however deep it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from ground.contract import ArtifactStat
from ground.errors import InvalidInput, SciorchError
from ground.models import Entry, Service
from orchestrator.database import Database, Row, parse_ts
from orchestrator.results_query import Field, Node, Sql

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.results")

# The steering runner's idempotency key (steering.runner.key_for); a test keeps them in step.
CAMPAIGN_KEY = re.compile(r"^(?P<campaign>cmp-[0-9a-f]+)-(?P<seq>\d+)-(?P<attempt>\d+)$")
TIME_SORTS = ("finished_at", "started_at", "created_at")

_COLS = (
    "entry_id, event_id, service, version, state, site, submitted_by, account, campaign_id, "
    "evaluation, template_sha256, created_at, started_at, finished_at, parameters, result, "
    "artifacts"
)


def template_sha256(service: Service) -> str:
    """The template's checksum: its validated content, without where it was loaded from."""
    data = service.model_dump(mode="json", exclude={"source"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def campaign_of(idempotency_key: str | None) -> tuple[str | None, int | None]:
    m = CAMPAIGN_KEY.match(idempotency_key or "")
    return (m["campaign"], int(m["seq"])) if m else (None, None)


@dataclass
class ResultRow:
    entry_id: str
    event_id: str
    service: str
    version: str
    state: str
    site: str
    submitted_by: str
    account: str | None
    campaign_id: str | None
    evaluation: int | None
    template_sha256: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    parameters: dict[str, Any]
    result: dict[str, Any] | None
    artifacts: list[ArtifactStat]


@dataclass
class ResultSearch:
    """What to find: every filter is optional; `where` is a parsed query."""

    where: Node | None = None
    service: str | None = None
    event_id: str | None = None
    campaign_id: str | None = None
    states: Sequence[str] = ("succeeded",)
    finished_after: datetime | None = None
    finished_before: datetime | None = None
    sort: str | Field = "finished_at"
    descending: bool = True
    limit: int = 50
    cursor: str | None = None


def _cursor(value: Any, entry_id: str) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    return json.dumps([value, entry_id]).encode().hex()


def _uncursor(cursor: str) -> tuple[Any, str]:
    try:
        value, entry_id = json.loads(bytes.fromhex(cursor))
        if not isinstance(entry_id, str) or not (
            value is None or isinstance(value, int | float | str)
        ):
            raise ValueError(cursor)
        return value, entry_id
    except (ValueError, TypeError) as exc:
        raise InvalidInput("cursor is not one this server issued", field="cursor") from exc


class ResultsIndex:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(
        self,
        entry: Entry,
        artifacts: Sequence[ArtifactStat],
        template_checksum: str | None,
    ) -> None:
        """Index a finished entry (again: the row is replaced, so a re-read result wins)."""
        assert entry.finished_at is not None, "only finished entries are indexed"
        ts = self._db.ts
        campaign, evaluation = campaign_of(entry.idempotency_key)
        account = entry.handle.get("account")
        args = (
            entry.id,
            entry.event_id,
            entry.service,
            entry.version,
            entry.state.value,
            entry.site,
            entry.submitted_by,
            account if isinstance(account, str) else None,
            campaign,
            evaluation,
            template_checksum,
            ts(entry.created_at),
            ts(entry.started_at),
            ts(entry.finished_at),
            json.dumps(entry.parameters),
            json.dumps(entry.result) if entry.result is not None else None,
            json.dumps([a.model_dump() for a in artifacts]),
        )
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLS.split(", ")[1:])
        await self._db.execute(
            f"INSERT INTO results ({_COLS}) VALUES ({','.join('?' * len(args))}) "
            f"ON CONFLICT (entry_id) DO UPDATE SET {updates}",
            args,
        )

    async def index_finished(self, engine: Engine, entry_id: str) -> None:
        """Index the entry the engine has just finished. A failure is logged, never raised:
        the transition is recorded already and matters more than its catalogue row."""
        try:
            entry = await engine.store.get_entry(entry_id, transitions=False)
            if entry is None or entry.finished_at is None:
                return
            backend = engine.backends.get(entry.site)
            artifacts = await backend.list_artifacts(entry.id, entry.handle) if backend else []
            try:
                checksum = template_sha256(engine.catalogue.get(entry.service, entry.version))
            except SciorchError:  # the template is gone from the catalogue
                checksum = None
            await self.record(entry, artifacts, checksum)
        except Exception:
            log.exception("indexing the result of %s failed", entry_id)

    async def count(self) -> int:
        row = await self._db.fetchrow("SELECT COUNT(*) FROM results")
        return int(row[0]) if row else 0

    def _row(self, row: Row) -> ResultRow:
        return ResultRow(
            entry_id=row["entry_id"],
            event_id=row["event_id"],
            service=row["service"],
            version=row["version"],
            state=row["state"],
            site=row["site"],
            submitted_by=row["submitted_by"],
            account=row["account"],
            campaign_id=row["campaign_id"],
            evaluation=row["evaluation"],
            template_sha256=row["template_sha256"],
            created_at=parse_ts(row["created_at"]),
            started_at=parse_ts(row["started_at"]) if row["started_at"] else None,
            finished_at=parse_ts(row["finished_at"]),
            parameters=json.loads(row["parameters"]),
            result=json.loads(row["result"]) if row["result"] else None,
            artifacts=[ArtifactStat.model_validate(a) for a in json.loads(row["artifacts"])],
        )

    async def search(
        self, principal: str | None, q: ResultSearch
    ) -> tuple[list[ResultRow], str | None]:
        """A page of rows `principal` may see (None: every row, for an admin), and the cursor
        of the next page (None at the end)."""
        if not 1 <= q.limit <= 10_000:
            raise InvalidInput("limit must be between 1 and 10000", field="limit")
        sql = Sql(self._db.dialect)
        where: list[str] = []
        if principal is not None:
            where.append(
                "event_id IN (SELECT id FROM events WHERE owner = ? "
                "UNION SELECT event_id FROM shares WHERE principal = ?)"
            )
            sql.args += [principal, principal]
        for column, value in (
            ("service", q.service),
            ("event_id", q.event_id),
            ("campaign_id", q.campaign_id),
        ):
            if value is not None:
                where.append(f"{column} = {sql.bind(value)}")
        if q.states:
            where.append(f"state IN ({', '.join(sql.bind(s) for s in q.states)})")
        if q.finished_after is not None:
            where.append(f"finished_at >= {sql.bind(self._db.ts(q.finished_after))}")
        if q.finished_before is not None:
            where.append(f"finished_at < {sql.bind(self._db.ts(q.finished_before))}")
        if q.where is not None:
            where.append(sql.where(q.where))

        time_sort = isinstance(q.sort, str)
        if isinstance(q.sort, str):
            if q.sort not in TIME_SORTS:
                raise InvalidInput(
                    f"sort: {q.sort!r} is not one of {', '.join(TIME_SORTS)} or a field",
                    field="sort",
                )
            key = q.sort
        else:
            key = sql.number(q.sort)
        direction: Literal["ASC", "DESC"] = "DESC" if q.descending else "ASC"
        cmp = "<" if q.descending else ">"
        if q.cursor:
            value, last_id = _uncursor(q.cursor)
            if time_sort:
                if not isinstance(value, str):
                    raise InvalidInput("cursor is not one this server issued", field="cursor")
                try:
                    value = self._db.ts(parse_ts(value))
                except ValueError as exc:
                    raise InvalidInput(
                        "cursor is not one this server issued", field="cursor"
                    ) from exc
            if value is None:
                where.append(f"({key} IS NULL AND entry_id {cmp} {sql.bind(last_id)})")
            else:
                a, b, c = sql.bind(value), sql.bind(value), sql.bind(last_id)
                nulls = "" if time_sort else f" OR {key} IS NULL"
                where.append(f"({key} {cmp} {a} OR ({key} = {b} AND entry_id {cmp} {c}){nulls})")
        text = f"SELECT {_COLS}, {key} AS sort_key FROM results"
        if where:
            text += " WHERE " + " AND ".join(where)
        text += f" ORDER BY sort_key {direction} NULLS LAST, entry_id {direction} LIMIT "
        text += sql.bind(q.limit + 1)
        rows = await self._db.fetch(text, sql.args)
        nxt = None
        if len(rows) > q.limit:
            rows = rows[: q.limit]
            nxt = _cursor(rows[-1]["sort_key"], rows[-1]["entry_id"])
        return [self._row(r) for r in rows], nxt
