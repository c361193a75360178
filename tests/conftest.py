"""Shared fixtures: a real engine on a temporary home with the local backend (two virtual GPUs),
a real SQLite store and the built-in catalogue."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

from orchestrator.config import Settings, load_settings
from orchestrator.engine import Engine
from orchestrator.models import Principal

ALICE = Principal(id="alice")
BOB = Principal(id="bob")


def make_settings(home: Path, **overrides: Any) -> Settings:
    sites = overrides.pop(
        "sites",
        [{"name": "local", "kind": "local", "gpus": 2, "gpu_type": "virtual", "cpus": 8,
          "memory_mb": 16384, "term_grace_s": 1}],
    )
    return load_settings(home, sites=sites, **overrides)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
async def engine(home: Path) -> AsyncIterator[Engine]:
    eng = await Engine.open(make_settings(home))
    try:
        yield eng
    finally:
        await shutdown(eng)


async def shutdown(eng: Engine) -> None:
    """Close an engine and kill what it still runs (tests must not leak processes)."""
    for backend in eng.backends.values():
        await backend.shutdown_all()
    await eng.close()


@pytest.fixture
def engine_factory(home: Path) -> Callable[..., Any]:
    async def make(**overrides: Any) -> Engine:
        return await Engine.open(make_settings(home, **overrides))

    return make
