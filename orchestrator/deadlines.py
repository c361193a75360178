"""Deadlines: warnings before an entry's walltime or an event's lifetime runs out, webhooks that
carry them, and extending a running entry's time where its site allows it.

A warning is sent once per deadline, `warning_lead_s` before it: the entry's `reason` says what
is coming (so a client listening to the entry's resource reads it after the ResourceUpdated
that the bus message `warning` causes), the server logs it, and an event with a webhook gets an
HTTP POST whose body is signed with the event's secret (`X-Sciorch-Signature: sha256=<hex
HMAC-SHA256 of the body>`), retried with back-off. Extending an entry moves its deadline, so a
new warning comes before the new end.

With several replicas on one store, one of them warns: the Warner runs under the `warnings`
lease (orchestrator.replicas), and a warning is recorded in `warnings_sent` (entry or event,
kind, deadline) before anything is sent, so a replica that takes the lease over never sends it
again. That makes a warning at most once: a holder killed between recording one and posting
its webhook loses that webhook (the entry's reason and the bus message went first).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx

from ground.contract import ExtendableBackend
from ground.errors import Conflict, InvalidInput, NotSupported
from ground.models import ACTIVE_STATES, Entry, EventState, Message, Principal
from orchestrator.database import IntegrityError
from orchestrator.store import now

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.deadlines")

SIGNATURE_HEADER = "X-Sciorch-Signature"
WEBHOOK_ATTEMPTS = 5
WEBHOOK_FIRST_DELAY_S = 0.5  # doubled after each failed attempt
MAX_SCAN_S = 5.0


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def set_webhook_secret(engine: Engine, event_id: str, secret: str) -> None:
    await engine.store.database.execute(
        "UPDATE events SET webhook_secret = ? WHERE id = ?", (secret, event_id)
    )


async def _webhook_secret(engine: Engine, event_id: str) -> str | None:
    row = await engine.store.database.fetchrow(
        "SELECT webhook_secret FROM events WHERE id = ?", (event_id,)
    )
    return None if row is None else row["webhook_secret"]


def entry_deadline(entry: Entry) -> datetime | None:
    """When a running entry's walltime ends (None: not started)."""
    if entry.started_at is None or entry.state not in ACTIVE_STATES:
        return None
    return entry.started_at + timedelta(seconds=entry.resources.walltime_s)


async def extend_entry(
    engine: Engine, principal: Principal, entry_id: str, walltime_s: int
) -> Entry:
    """Make the entry's whole walltime `walltime_s`, where its site can (Slurm); a typed error
    naming why where it cannot."""
    entry = await engine.get_entry(principal, entry_id)
    await engine.event_to_submit_to(principal, entry.event_id)  # operator on an active event
    if entry.state.terminal:
        raise Conflict(f"entry {entry_id} has ended ({entry.state.value})", field="entry_id")
    backend = engine.backends.get(entry.site)
    if not isinstance(backend, ExtendableBackend):
        kind = backend.kind if backend is not None else "unknown"
        raise NotSupported(
            f"site {entry.site!r} ({kind}) cannot extend a running entry: its time limit is "
            "fixed when it starts; submit a new entry with a longer walltime",
            field="entry_id",
        )
    if walltime_s <= entry.resources.walltime_s:
        raise InvalidInput(
            f"walltime_seconds must be more than the current {entry.resources.walltime_s}",
            field="walltime_seconds",
        )
    await backend.extend(entry.id, entry.handle, walltime_s)
    resources = entry.resources.model_copy(update={"walltime_s": walltime_s})
    await engine.store.update_entry_fields(
        entry.id,
        {
            "resources": resources.model_dump_json(),
            "reason": f"walltime extended to {walltime_s} s",
        },
    )
    engine.bus.publish(
        Message(kind="warning", entry_id=entry.id, event_id=entry.event_id, at=now())
    )
    return await engine.get_entry(principal, entry_id)


class Warner:
    """The background loop that sends the warnings (one per engine that drives the sites)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sent: set[tuple[str, str]] = set()  # (entry or event id, deadline) already warned
        self.deliveries: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sciorch-warner")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self.deliveries) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        lead = self.engine.settings.warning_lead_s
        interval = max(0.2, min(MAX_SCAN_S, lead / 4 if lead else MAX_SCAN_S))
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deadline scan failed")
            await asyncio.sleep(interval)

    async def scan(self) -> None:
        store, lead = self.engine.store, self.engine.settings.warning_lead_s
        at = now()
        for entry in await store.list_entries(states=ACTIVE_STATES, limit=1_000_000):
            end = entry_deadline(entry)
            if end is not None and (end - at).total_seconds() <= lead:
                await self._warn("walltime", entry.event_id, entry, end)
        for event in await store.list_events(None, include_inactive=False):
            if event.state == EventState.ACTIVE and event.expires_at is not None:
                if (event.expires_at - at).total_seconds() <= lead:
                    await self._warn("ttl", event.id, None, event.expires_at)

    async def _first_time(self, kind: str, subject: str, deadline: str) -> bool:
        """Record the warning; False when it was recorded before (by any replica)."""
        db = self.engine.store.database
        owner = self.engine.replicas.id if self.engine.replicas is not None else None
        try:
            await db.execute(
                "INSERT INTO warnings_sent (subject, kind, deadline, sent_at, sent_by) "
                "VALUES (?,?,?,?,?)",
                (subject, kind, deadline, db.ts(now()), owner),
            )
        except IntegrityError:
            return False
        return True

    async def _warn(self, kind: str, event_id: str, entry: Entry | None, end: datetime) -> None:
        key = (entry.id if entry else event_id, end.isoformat())
        if key in self.sent:
            return
        self.sent.add(key)
        if not await self._first_time(kind, *key):
            return
        left = max(0, int((end - now()).total_seconds()))
        what = "walltime" if kind == "walltime" else "event lifetime"
        text = f"{what} ends in {left} s (at {end.isoformat(timespec='seconds')})"
        store = self.engine.store
        entries = (
            [entry]
            if entry
            else await store.list_entries(event_ids=[event_id], states=ACTIVE_STATES, limit=10000)
        )
        for e in entries:
            await store.update_entry_fields(e.id, {"reason": text})
            self.engine.bus.publish(
                Message(kind="warning", entry_id=e.id, event_id=event_id, reason=text, at=now())
            )
        log.warning("%s %s: %s", "entry" if entry else "event", key[0], text)
        event = await store.get_event(event_id)
        if event is not None and event.webhook_url:
            body = {
                "kind": kind,
                "event_id": event_id,
                "entry_id": entry.id if entry else None,
                "deadline": end.isoformat(),
                "seconds_left": left,
                "message": text,
            }
            task = asyncio.get_running_loop().create_task(self._deliver(event.webhook_url, body))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        secret = await _webhook_secret(self.engine, str(payload["event_id"])) or ""
        body = json.dumps(payload, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
        delay = WEBHOOK_FIRST_DELAY_S
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
                try:
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code < 300:
                        return
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    why = str(exc) or type(exc).__name__
                log.info("webhook %s attempt %d failed: %s", url, attempt, why)
                if attempt < WEBHOOK_ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
        log.warning("webhook %s: gave up after %d attempts", url, WEBHOOK_ATTEMPTS)


__all__ = [
    "SIGNATURE_HEADER",
    "Warner",
    "entry_deadline",
    "extend_entry",
    "set_webhook_secret",
    "sign",
]
