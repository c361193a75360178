"""Shared fixtures: a real engine on a temporary home with the local backend (two virtual GPUs),
a real SQLite store and the built-in catalogue. Tests marked `@BOTH_STORES` run twice, the
second time on the real PostgreSQL server that scripts/test.d/15-postgresql.sh starts
($SCIORCH_TEST_POSTGRES), each in a fresh schema."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

from ground.config import Settings, load_settings
from ground.models import Principal
from mcp_server.steering_tools import campaign_manager
from orchestrator.engine import Engine

ALICE = Principal(id="alice")
BOB = Principal(id="bob")

BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)


def postgres_base_url() -> str:
    """The test PostgreSQL's URL: skip without one, but fail under CI=true."""
    url = os.environ.get("SCIORCH_TEST_POSTGRES")
    if not url:
        why = "no test PostgreSQL ($SCIORCH_TEST_POSTGRES; bash scripts/test.sh starts one)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return url


async def drop_schemas(base_url: str, *schemas: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(base_url)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def postgres_schema(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A fresh schema on the test PostgreSQL, exported as $SCIORCH_STORE too (so that child
    processes use it); it and its campaign schema are dropped afterwards."""
    base = postgres_base_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = f"{base}{'&' if '?' in base else '?'}schema={schema}"
    monkeypatch.setenv("SCIORCH_STORE", url)
    try:
        yield url
    finally:
        await drop_schemas(base, schema, f"{schema}_steering", f"{schema}_flows")


@pytest.fixture
async def store_url(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str | None]:
    """None (SQLite in home, the default), or with `@BOTH_STORES` also a PostgreSQL URL with a
    fresh schema, exported as $SCIORCH_STORE so that every engine the test opens (in this
    process or a child) uses it; the schemas are dropped afterwards."""
    monkeypatch.delenv("SCIORCH_STORE", raising=False)
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
        return
    async with postgres_schema(monkeypatch) as url:
        yield url


def make_settings(home: Path, **overrides: Any) -> Settings:
    sites = overrides.pop(
        "sites",
        [
            {
                "name": "local",
                "kind": "local",
                "gpus": 2,
                "gpu_type": "virtual",
                "cpus": 8,
                "memory_mb": 16384,
                "term_grace_s": 1,
            }
        ],
    )
    return load_settings(home, sites=sites, **overrides)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
async def engine(home: Path, store_url: str | None) -> AsyncIterator[Engine]:
    eng = await Engine.open(make_settings(home))
    assert eng.store.dialect == ("postgresql" if store_url else "sqlite")
    try:
        yield eng
    finally:
        await shutdown(eng)


async def shutdown(eng: Engine) -> None:
    """Close an engine and kill what it still runs (tests must not leak processes)."""
    for backend in eng.backends.values():
        await backend.shutdown_all()
    await eng.close()


@dataclass
class EngineHost:
    """Engines opened on one site, each a 'server run' over the same home and catalogue."""

    home: Path
    site: dict[str, Any]
    catalogue: Path
    engines: list[Engine] = field(default_factory=list)

    async def open(self, **site_overrides: Any) -> Engine:
        site = {**self.site, **site_overrides}
        eng = await Engine.open(
            make_settings(self.home, sites=[site], catalogue_dirs=[self.catalogue])
        )
        self.engines.append(eng)
        return eng

    async def restart(self, eng: Engine) -> Engine:
        """What a server restart does: the engine goes away, its work keeps running."""
        await eng.close()
        self.engines.remove(eng)
        return await self.open()


def campaign_engine() -> Any:
    """An `eng` fixture for steering tests: an engine in `home` whose campaign manager is shut
    down before the engine (campaigns hold engine work)."""

    @pytest.fixture
    async def eng(home: Path, store_url: str | None) -> AsyncIterator[Engine]:
        engine = await Engine.open(make_settings(home))
        try:
            yield engine
        finally:
            await campaign_manager(engine).shutdown()
            await shutdown(engine)

    return eng


@pytest.fixture
def engine_factory(home: Path) -> Callable[..., Any]:
    async def make(**overrides: Any) -> Engine:
        return await Engine.open(make_settings(home, **overrides))

    return make


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """A store connection left open (aiosqlite's worker thread is not a daemon) would keep the
    interpreter from exiting after the last test, and CI would wait for its time limit: name
    the leak on stderr and end the process with the tests' own status."""
    import sys
    import threading

    left = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread()
        and not t.daemon
        and getattr(getattr(t, "_target", None), "__name__", "") == "_connection_worker_thread"
    ]
    if left and _EXIT_STATUS:
        print(f"conftest: {len(left)} store connection(s) left open by the tests", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
