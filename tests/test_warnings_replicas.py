"""Deadline warnings with several replicas on one PostgreSQL store: one replica warns (the
`warnings` lease), and a warning recorded in the store is not sent again by the replica that
takes the lease over."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from orchestrator.engine import Engine
from tests.conftest import ALICE, make_settings, shutdown
from tests.mcp_helpers import free_socket, json_receiver, serve_asgi
from tests.test_replicas import pg_url

__all__ = ["pg_url"]  # the fixture, used by name


async def _until(check: Any, within: float, what: str) -> None:
    for _ in range(int(within / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_two_replicas_post_a_ttl_warning_once_even_across_a_takeover(
    pg_url: str, tmp_path: Path
) -> None:
    got: list[dict[str, Any]] = []

    home = tmp_path / "home"
    settings = {"warning_lead_s": 60, "lease_ttl_s": 3}
    async with serve_asgi(json_receiver(got), free_socket()) as url:
        a = await Engine.open(make_settings(home, **settings))
        b = await Engine.open(make_settings(home, **settings))
        engines = [a, b]
        try:
            event = await a.create_event(ALICE, "short", ttl_s=45, webhook_url=url)
            await _until(lambda: got, 20, "the webhook")
            assert got[0]["kind"] == "ttl" and got[0]["event_id"] == event.id
            assert a.replicas is not None and b.replicas is not None
            holders = [e for e in engines if e.replicas and e.replicas.keeper.holds("warnings")]
            assert len(holders) == 1
            await asyncio.sleep(5.5)  # the holder has scanned again since
            assert len(got) == 1, got
            # The holder stops; the other takes the lease, scans, and sends nothing again.
            holder = holders[0]
            other = b if holder is a else a
            await shutdown(holder)
            engines.remove(holder)
            assert other.replicas is not None
            keeper = other.replicas.keeper
            await _until(lambda: keeper.holds("warnings"), 15, "the takeover")
            await _until(lambda: other.warner is not None, 5, "the new holder's warner")
            await asyncio.sleep(1.5)
            assert len(got) == 1, got
        finally:
            for eng in engines:
                await shutdown(eng)
