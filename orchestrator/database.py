"""The database under the stores: SQLite (aiosqlite) or PostgreSQL (asyncpg), behind one small
interface so that each store writes its SQL once.

The stores write SQL with `?` placeholders in the subset both dialects share; the few fragments
that differ (JSON aggregates) the store picks by `Database.dialect`. Timestamps go in through
`Database.ts` (ISO text on SQLite, `timestamptz` on PostgreSQL) and come back as `str` or
`datetime`, which `parse_ts` turns into one. JSON is text on SQLite and `jsonb` on PostgreSQL;
asyncpg passes both as `str` each way, so encoding stays in the stores.

Schema changes are numbered files, `<package>/migrations/<dialect>/NNNN_name.sql`, with the same
numbers in both dialects (a test checks that they also make the same tables and columns).
SQLite remembers the last one applied in `PRAGMA user_version`; PostgreSQL in a
`schema_version` table in the store's own schema, and applies them under an advisory lock, so
replicas that start at once migrate once.

SQLite is one connection per process: reads go straight to it, writes take turns on a lock
(`writer()` in autocommit, `transaction()` in BEGIN IMMEDIATE), exactly as the store did before
this layer. PostgreSQL is a pool: each read or write takes a connection of its own.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosqlite

from ground.errors import InvalidInput, SciorchError

DIALECTS = ("sqlite", "postgresql")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class IntegrityError(Exception):
    """A constraint refused a write (say, a unique key that a concurrent call took first), the
    same on both dialects, so that the engine's race handling does not depend on the driver."""


def _pg_integrity(exc: Exception) -> bool:
    """asyncpg's errors of SQLSTATE class 23, integrity constraint violation."""
    return str(getattr(exc, "sqlstate", "")).startswith("23")


class Row(Protocol):
    """What both drivers' rows offer: by column name or position, and the names."""

    def __getitem__(self, key: int | str) -> Any: ...
    def keys(self) -> Iterable[str]: ...


class Conn(Protocol):
    """A connection held for one write (or one transaction)."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None: ...
    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...


def migrations(package: str, dialect: str) -> list[tuple[int, str]]:
    folder = importlib_resources.files(package) / "migrations" / dialect
    out = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            out.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(out)


def parse_ts(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


class Where:
    """The AND-ed conditions of a listing query and their `?` arguments, built from optional
    filters: a filter given as None adds nothing; an empty list of values matches nothing."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def add(self, condition: str, *args: Any) -> Where:
        self.conditions.append(condition)
        self.args += args
        return self

    def equal(self, column: str, value: Any) -> Where:
        return self if value is None else self.add(f"{column} = ?", value)

    def among(self, column: str, values: Iterable[Any] | None) -> Where:
        if values is None:
            return self
        items = list(values)
        if not items:
            return self.add("0 = 1")
        return self.add(f"{column} IN ({','.join('?' * len(items))})", *items)

    def either(self, *alternatives: Where) -> Where:
        """One condition: any of `alternatives` (each AND-ed inside); nothing if none has a
        condition."""
        given = [a for a in alternatives if a.conditions]
        if not given:
            return self
        return self.add(
            "(" + " OR ".join(f"({' AND '.join(a.conditions)})" for a in given) + ")",
            *[arg for a in given for arg in a.args],
        )

    def sql(self) -> str:
        """' WHERE ...', or '' when there is no condition."""
        return " WHERE " + " AND ".join(self.conditions) if self.conditions else ""


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


class Database(ABC):
    dialect: ClassVar[str]

    @staticmethod
    @abstractmethod
    def ts(value: datetime | None) -> Any:
        """A timestamp as this dialect stores it."""

    @abstractmethod
    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        return next(iter(await self.fetch(sql, args)), None)

    @abstractmethod
    def writer(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for statements that each commit on their own."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A connection in a transaction: committed at the end, rolled back on an error."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        async with self.writer() as conn:
            await conn.execute(sql, args)

    @abstractmethod
    async def schema_version(self) -> int: ...

    @abstractmethod
    async def close(self) -> None: ...


async def open_database(location: str | Path, package: str, *, schema_suffix: str = "") -> Database:
    """The database at `location` (a path or `sqlite:///path` for SQLite, a `postgresql://` URL
    for PostgreSQL) with `package`'s migrations applied. On PostgreSQL the tables live in the
    schema named by the URL's `schema` query parameter (default `sciorch`) plus
    `schema_suffix`, so that two stores can share one database."""
    if is_postgres_url(location):
        return await PostgresDatabase.open(str(location), package, schema_suffix)
    path = Path(str(location).removeprefix("sqlite:///"))
    return SqliteDatabase(await open_sqlite(path, migrations(package, "sqlite")))


# ---------------------------------------------------------------------------------- SQLite


async def open_sqlite(path: Path, scripts: Iterable[tuple[int, str]]) -> aiosqlite.Connection:
    """A WAL connection in autocommit mode with the numbered migration scripts applied once each,
    in order (`PRAGMA user_version` remembers the last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path, isolation_level=None)
    db.row_factory = aiosqlite.Row
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=5000",
    ):
        await db.execute(f"PRAGMA {pragma}")
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    for version, sql in scripts:
        if version > current:
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;"
            )
    return db


class _SqliteConn:
    __slots__ = ("_db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        try:
            await self._db.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return cast(list[Row], await self._db.execute_fetchall(sql, args))


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._conn = _SqliteConn(db)
        # One connection is shared by every coroutine: writes take turns so that one
        # coroutine's transaction never swallows another's statements.
        self._lock = asyncio.Lock()

    @staticmethod
    def ts(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        # One hop to aiosqlite's thread (a cursor takes three).
        return cast(list[Row], await self._db.execute_fetchall(sql, args))

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[Conn]:
        async with self._lock:
            yield self._conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def schema_version(self) -> int:
        row = await self.fetchrow("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def close(self) -> None:
        await self._db.close()


# ------------------------------------------------------------------------------ PostgreSQL


@functools.lru_cache(maxsize=4096)
def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (the stores' SQL has no `?` elsewhere)."""
    head, *rest = sql.split("?")
    return head + "".join(f"${i}{part}" for i, part in enumerate(rest, 1))


def split_schema(url: str) -> tuple[str, str]:
    """(the URL without our `schema` parameter, the schema name it gave or `sciorch`)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), "sciorch")
    if not _SCHEMA_NAME.match(schema):
        raise InvalidInput(
            f"store: schema {schema!r} must be a lower-case SQL name ([a-z_][a-z0-9_]*)",
            field="store",
        )
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class _PgConn:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        try:
            await self._conn.execute(_numbered(sql), *args)
        except Exception as exc:
            if _pg_integrity(exc):
                raise IntegrityError(str(exc)) from exc
            raise

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return cast(list[Row], await self._conn.fetch(_numbered(sql), *args))


async def _keep_session(conn: Any) -> None:
    """Skip asyncpg's reset on release (RESET ALL, UNLISTEN *, ...: a round trip that doubled a
    read's time): the stores change no session state, so a pooled connection is always clean.
    Code that LISTENs or takes session locks must hold a connection of its own."""


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        self.schema = schema

    @classmethod
    async def open(cls, url: str, package: str, schema_suffix: str = "") -> PostgresDatabase:
        try:
            import asyncpg
        except ImportError as exc:
            raise InvalidInput(
                "store: a postgresql:// store needs asyncpg: pip install 'sciorch[postgresql]'",
                field="store",
            ) from exc
        dsn, schema = split_schema(url)
        schema += schema_suffix
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=10,
                # UTC, so that timestamps inside JSON aggregates read back as they went in.
                server_settings={"search_path": schema, "timezone": "UTC"},
                reset=_keep_session,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            where = urlsplit(dsn)  # named without the password
            raise SciorchError(
                f"store: cannot open PostgreSQL at {where.hostname}:{where.port or 5432}"
                f"{where.path}: {exc}",
                field="store",
            ) from exc
        db = cls(pool, schema)
        try:
            await db._migrate(migrations(package, "postgresql"))
        except BaseException:
            await pool.close()
            raise
        return db

    async def _migrate(self, scripts: Sequence[tuple[int, str]]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Replicas that start together wait here for the first one's migration.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('sciorch-migrate:' || $1))", self.schema
            )
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{self.schema}".schema_version ('
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(
                f'SELECT coalesce(max(version), 0) FROM "{self.schema}".schema_version'
            )
            for version, sql in scripts:
                if version > current:
                    await conn.execute(sql)
                    await conn.execute(
                        f'INSERT INTO "{self.schema}".schema_version (version) VALUES ($1)',
                        version,
                    )

    @staticmethod
    def ts(value: datetime | None) -> datetime | None:
        return value

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return cast(list[Row], await self._pool.fetch(_numbered(sql), *args))

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn:
            yield _PgConn(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgConn(conn)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        try:
            await self._pool.execute(_numbered(sql), *args)
        except Exception as exc:
            if _pg_integrity(exc):
                raise IntegrityError(str(exc)) from exc
            raise

    async def schema_version(self) -> int:
        version = await self._pool.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        return int(version)

    async def close(self) -> None:
        await self._pool.close()
