"""Server-sent events for the hub's pages: entry states and log growth from the engine's bus,
campaign changes from the campaign manager's listeners. Nothing here polls: a stream waits on
a queue the bus (or the manager) fills, and each message is checked against the caller through
the same typed operations a page uses, so a stream never shows what the caller may not see
(an entry of an event shared and then unshared goes quiet)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from ground.errors import SciorchError
from ground.models import Message, Principal
from orchestrator.engine import Engine
from tools import operations as ops
from tools.models import EntryRef, ReadLogsInput

KEEPALIVE_S = 15.0
LOG_CHUNK = 65536


def sse(event: str, data: Any) -> bytes:
    body = json.dumps(data, default=str, separators=(",", ":"))
    return f"event: {event}\ndata: {body}\n\n".encode()


def entry_state(view: Any) -> dict[str, Any]:
    return {
        "id": view.id,
        "state": view.state.value,
        "reason": view.reason,
        "access_url": view.access_url,
        "exit_code": view.exit_code,
        # what a row of the entries list shows, so a new entry joins the list as it appears
        "service": view.service,
        "site": view.site,
        "submitted_by": view.submitted_by,
        "created_at": view.created_at.isoformat(),
        "transitions": [
            {"state": t.state.value, "at": t.at.isoformat(), "reason": t.reason}
            for t in getattr(view, "transitions", [])
        ],
    }


async def entry_stream(
    engine: Engine,
    principal: Principal,
    event_id: str | None,
    entry_id: str | None,
    log_offset: int | None,
) -> AsyncIterator[bytes]:
    """Transitions of the caller's entries (of one event, or one entry); with `log_offset`
    (one entry), its log from there on as it grows."""

    def wanted(m: Message) -> bool:
        if m.kind not in ("transition", "log") or m.entry_id is None:
            return False
        if m.kind == "log" and (log_offset is None or m.entry_id != entry_id):
            return False
        if entry_id is not None:
            return m.entry_id == entry_id
        return event_id is None or m.event_id == event_id

    offset = log_offset or 0
    async with engine.bus.subscribe(wanted) as sub:
        yield b": open\n\n"
        if entry_id is not None:
            # what happened between the page's render and this subscription
            try:
                view = await ops.get_entry(engine, principal, EntryRef(entry_id=entry_id))
            except SciorchError as exc:
                yield sse("refused", {"error": exc.text()})
                return
            yield sse("entry", entry_state(view))
            if log_offset is not None:
                async for chunk in _logs(engine, principal, entry_id, offset):
                    offset = chunk["next_offset"]
                    yield sse("log", chunk)
        while True:
            try:
                msg = await asyncio.wait_for(sub.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            assert msg.entry_id is not None
            try:
                if msg.kind == "log":
                    async for chunk in _logs(engine, principal, msg.entry_id, offset):
                        offset = chunk["next_offset"]
                        yield sse("log", chunk)
                    continue
                view = await ops.get_entry(engine, principal, EntryRef(entry_id=msg.entry_id))
            except SciorchError:
                continue  # not (or no longer) the caller's to see
            yield sse("entry", entry_state(view))


async def _logs(
    engine: Engine, principal: Principal, entry_id: str, offset: int
) -> AsyncIterator[dict[str, Any]]:
    while True:
        chunk = await ops.read_logs(
            engine, principal, ReadLogsInput(entry_id=entry_id, offset=offset, limit=LOG_CHUNK)
        )
        if chunk.next_offset <= offset:
            return
        yield {"data": chunk.data, "offset": chunk.offset, "next_offset": chunk.next_offset}
        offset = chunk.next_offset
        if offset >= chunk.size:
            return


async def campaign_stream(
    listeners: list[Callable[[str], None]],
    campaign_id: str,
    view: Callable[[], Any],
) -> AsyncIterator[bytes]:
    """The campaign's view each time the manager says it changed (coalesced: a burst of
    changes while one view is being read makes one more read, not one each)."""
    changed = asyncio.Event()

    def listener(cid: str) -> None:
        if cid == campaign_id:
            changed.set()

    listeners.append(listener)
    try:
        yield b": open\n\n"
        while True:
            try:
                data = await view()
            except SciorchError as exc:
                yield sse("refused", {"error": exc.text()})
                return
            yield sse("campaign", data)
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
                    break
                except TimeoutError:
                    yield b": keepalive\n\n"
            changed.clear()
    finally:
        with contextlib.suppress(ValueError):
            listeners.remove(listener)
