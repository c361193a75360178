"""Several server replicas on one PostgreSQL store: who drives what.

Any replica answers any tool call (the store is the truth, the bus is `PgBus`). Background work
has one owner, held by a lease (orchestrator.leases):

- `site:<name>`: the replica that holds it drives that site's backend: it submits the site's
  new entries, watches them, carries stops through, and on taking the lease over re-adopts
  every active entry of the site, exactly as a restarted server does (`Engine.readopt`).
  Another replica that records a new entry for the site, or a stop, signals the owner on the
  bus; with no owner alive, the entry waits `pending` (or its stop waits in the store) until
  a replica takes the lease and adopts it. An entry is handed to the backend once per owner:
  the owner claims each entry id before it submits or adopts it.
- `expiry`: the replica that holds it runs the event-expiry timer.
- `warnings`: the replica that holds it sends the walltime and TTL warnings
  (orchestrator.deadlines; each is recorded in the store first, so it goes out once).
- `campaign:<id>`: the replica that holds it runs that campaign (steering.manager).

Replicas share one home directory: the work directories of a dead replica's entries (local and
Slurm sites) must be visible to the one that adopts them, and entry tokens signed by one must
verify on the others (the signing key is in the home). On PostgreSQL there is no home lock;
on SQLite one process owns the home and everything in it, and none of this is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ground.contract import LaunchSpec
from ground.models import ACTIVE_STATES, EntryState, Message
from orchestrator.database import PostgresDatabase, split_schema
from orchestrator.deadlines import Warner
from orchestrator.leases import LeaseKeeper
from orchestrator.pg_bus import PgBus

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.replicas")

SUBMIT = "submit"
CANCEL = "cancel"
RELEASED = "leases-released"


def new_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def site_lease(site: str) -> str:
    return f"site:{site}"


async def open_bus(url: str, replica: str) -> PgBus:
    """The bus of the replicas of the store at `url`: one channel per store schema."""
    dsn, schema = split_schema(url)
    return await PgBus.open(dsn, f"sciorch.{schema}", replica)


class Replicas:
    def __init__(self, engine: Engine, bus: PgBus, keeper: LeaseKeeper) -> None:
        self.engine = engine
        self.bus = bus
        self.keeper = keeper
        self.id = keeper.owner
        self._claimed: dict[str, set[str]] = {name: set() for name in engine.backends}
        self._bg: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, engine: Engine) -> Replicas:
        bus = engine.bus
        db = engine.store.database
        assert isinstance(bus, PgBus) and isinstance(db, PostgresDatabase)
        keeper = LeaseKeeper(db, bus.replica, engine.settings.lease_ttl_s)
        self = cls(engine, bus, keeper)
        bus.resolve = self._resolve
        bus.on_signal(SUBMIT, lambda d: self._spawn(self._submitted(str(d["entry_id"]))))
        bus.on_signal(CANCEL, lambda d: self._spawn(self._cancelled(str(d["entry_id"]))))
        bus.on_signal(RELEASED, lambda _d: keeper.poke())
        # An event with a lifetime made on another replica: the expiry owner looks again.
        bus.add_listener(lambda m: engine.wake_expiry() if m.kind == "event" else None)
        bus.add_listener(self._settled)
        for site in engine.backends:
            keeper.want(
                site_lease(site),
                lambda site=site: self._adopt_site(site),  # type: ignore[misc]
                lambda site=site: self._leave_site(site),  # type: ignore[misc]
            )
        keeper.want("expiry", self._start_expiry, self._stop_expiry)
        keeper.want("warnings", self._start_warner, self._stop_warner)
        await keeper.start()
        return self

    async def close(self) -> None:
        """Stop renewing and driving; then (the backends closed by the engine) `release`."""
        await self.keeper.stop()
        await self._stop_expiry()
        await self._stop_warner()
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)

    async def release(self) -> None:
        """Give the leases up so that the others take them at once (a graceful stop)."""
        if await self.keeper.release_all():
            self.bus.signal(RELEASED, {"by": self.id})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _start_expiry(self) -> None:
        self._expiry = asyncio.create_task(self.engine.expiry_loop(), name="sciorch-expiry")

    async def _start_warner(self) -> None:
        if self.engine.warner is None:
            self.engine.warner = Warner(self.engine)
            self.engine.warner.start()

    async def _stop_warner(self) -> None:
        warner, self.engine.warner = self.engine.warner, None
        if warner is not None:
            await warner.close()

    async def _stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None

    # ------------------------------------------------------------------ entries

    def owns(self, site: str) -> bool:
        return self.keeper.holds(site_lease(site))

    def claim(self, site: str, entry_id: str) -> bool:
        """True once per entry while this replica owns its site: then it is ours to drive."""
        claimed = self._claimed.setdefault(site, set())
        if entry_id in claimed:
            return False
        claimed.add(entry_id)
        return True

    def _settled(self, message: Message) -> None:
        """An entry that ended is never driven again: forget its claim."""
        if message.kind == "transition" and message.state is not None and message.state.terminal:
            for claimed in self._claimed.values():
                claimed.discard(message.entry_id or "")

    def hand_over(self, entry_id: str) -> None:
        self.bus.signal(SUBMIT, {"entry_id": entry_id})

    def ask_stop(self, entry_id: str) -> None:
        self.bus.signal(CANCEL, {"entry_id": entry_id})

    async def _submitted(self, entry_id: str) -> None:
        entry = await self.engine.store.get_entry(entry_id, transitions=False)
        if entry is None or entry.state != EntryState.PENDING or not self.owns(entry.site):
            return
        spec = LaunchSpec.model_validate(await self.engine.store.get_spec(entry_id))
        try:
            await self.engine.submit_to_backend(entry.site, spec)
        except Exception as exc:  # recorded as the entry's failure by submit_to_backend
            log.info("entry %s handed over by another replica failed: %s", entry_id, exc)

    async def _cancelled(self, entry_id: str) -> None:
        entry = await self.engine.store.get_entry(entry_id, transitions=False)
        if entry is None or entry.state.terminal or not self.owns(entry.site):
            return
        await self.engine.backends[entry.site].cancel(entry.id, entry.handle)

    async def _adopt_site(self, site: str) -> None:
        entries = await self.engine.store.list_entries(states=ACTIVE_STATES, limit=1_000_000)
        adopted = 0
        for entry in entries:
            if entry.site == site and self.claim(site, entry.id):
                await self.engine.readopt(entry)
                adopted += 1
        log.info("replica %s owns site %s: adopted %d entries", self.id, site, adopted)

    async def _leave_site(self, site: str) -> None:
        """Another replica owns the site now: stop driving it (its work runs on)."""
        self._claimed[site] = set()
        backend = self.engine.backends[site]
        await backend.close()
        await backend.start(self.engine)

    async def _resolve(self, message: Message) -> Message | None:
        """A message that came as a pointer, filled in from the store and the entry's files."""
        if message.entry_id is None:
            return message
        with_transitions = message.kind == "transition"
        entry = await self.engine.store.get_entry(message.entry_id, transitions=with_transitions)
        if entry is None:
            return None
        if message.kind == "transition":
            reason = next(
                (t.reason for t in reversed(entry.transitions) if t.state == message.state), None
            )
            return message.model_copy(update={"reason": reason})
        if message.kind == "stream" and message.record_index is not None:
            backend = self.engine.backends.get(entry.site)
            if backend is None:
                return None
            data = await backend.read_results(
                entry.id, entry.handle, message.record_index, self.engine.settings.max_result_bytes
            )
            if not data.records:
                return None
            return message.model_copy(update={"record": data.records[0]})
        return message
