"""Leases: one owner for each piece of background work among the replicas that share a store.

A lease is a row (name, owner, deadline) in the store's `leases` table. Its holder renews it
well before the deadline (every `ttl/3` at the latest); any replica may take a lease whose
deadline has passed, so when a replica dies (kill -9 included) another one holds its leases
within `ttl` plus one retry interval. A replica that stops gracefully deletes its rows, and the
others take them at once.

The keeper does not know what the work is: each wanted lease comes with `on_gain` (run as a
task of its own when it is taken: adopt a site's entries, resume a campaign) and `on_loss`
(when another replica took it over, or the store could not be reached for a whole `ttl`: stop
driving that work, without stopping the work itself). A replica that cannot confirm its
leases gives them up on its own side before anybody else may take them, so two replicas drive
the same work only if one's clock runs ahead of the other's by more than the margin between
renewal and deadline; deadlines are written in UTC from the replica's clock (keep replicas'
clocks in sync, as NTP does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from orchestrator.database import Database
from orchestrator.store import now

log = logging.getLogger("sciorch.leases")

Work = Callable[[], Awaitable[None]]


@dataclass
class Want:
    on_gain: Work
    on_loss: Work


WantSource = Callable[[], Awaitable[dict[str, Want]]]


class LeaseKeeper:
    def __init__(
        self, db: Database, owner: str, ttl_s: float, *, retry_s: float | None = None
    ) -> None:
        self.db = db
        self.owner = owner
        self.ttl_s = ttl_s
        # Renewal and retries share one loop: at most every ttl/3, so a lease is renewed twice
        # before its deadline even when one round is late.
        self.interval_s = min(ttl_s / 3, retry_s if retry_s is not None else 1.0)
        self._wants: dict[str, Want] = {}
        self._sources: list[WantSource] = []
        self._held: set[str] = set()
        self._work: dict[str, asyncio.Task[None]] = {}
        self._confirmed = time.monotonic()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()

    # ------------------------------------------------------------------ what is wanted

    def want(self, name: str, on_gain: Work, on_loss: Work) -> None:
        self._wants[name] = Want(on_gain, on_loss)

    def add_source(self, source: WantSource) -> None:
        """Wants found anew each round (campaigns left running, say)."""
        self._sources.append(source)

    def holds(self, name: str) -> bool:
        return name in self._held

    @property
    def held(self) -> set[str]:
        return set(self._held)

    def poke(self) -> None:
        """Run a round now (a lease was released)."""
        self._wake.set()

    async def holder(self, name: str) -> str | None:
        """Who holds `name` now (None: nobody, or its deadline has passed)."""
        row = await self.db.fetchrow(
            "SELECT owner FROM leases WHERE name = ? AND deadline > ?",
            (name, self.db.ts(now())),
        )
        return str(row["owner"]) if row else None

    # ------------------------------------------------------------------ one round

    async def _take(self, name: str) -> bool:
        at = now()
        deadline = self.db.ts(at + timedelta(seconds=self.ttl_s))
        async with self.db.writer() as conn:
            await conn.execute(
                "INSERT INTO leases (name, owner, deadline) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "deadline = excluded.deadline "
                "WHERE leases.owner = excluded.owner OR leases.deadline < ?",
                (name, self.owner, deadline, self.db.ts(at)),
            )
            rows = await conn.fetch("SELECT owner FROM leases WHERE name = ?", (name,))
        return bool(rows) and rows[0]["owner"] == self.owner

    async def acquire(self, name: str, on_gain: Work, on_loss: Work) -> bool:
        """Want `name` from now on and try to take it at once; True when this replica holds
        it (on_gain has then been started)."""
        self.want(name, on_gain, on_loss)
        async with self._round:
            if name in self._held:
                return True
            if not await self._take(name):
                return False
            self._gained(name, self._wants[name])
            return True

    async def tick(self) -> None:
        async with self._round:
            await self._tick()

    async def _tick(self) -> None:
        wants = dict(self._wants)
        for source in self._sources:
            try:
                wants.update(await source())
            except Exception:
                log.exception("finding the leases to want failed")
        at = now()
        try:
            if self._held:
                names = sorted(self._held)
                marks = ",".join("?" * len(names))
                async with self.db.writer() as conn:
                    await conn.execute(
                        f"UPDATE leases SET deadline = ? WHERE owner = ? AND name IN ({marks})",
                        (self.db.ts(at + timedelta(seconds=self.ttl_s)), self.owner, *names),
                    )
                    rows = await conn.fetch(
                        f"SELECT name FROM leases WHERE owner = ? AND name IN ({marks})",
                        (self.owner, *names),
                    )
                kept = {str(r["name"]) for r in rows}
                for name in self._held - kept:
                    log.warning("lease %s was taken over by another replica", name)
                    await self._lost(name)
            self._confirmed = time.monotonic()
            missing = [n for n in wants if n not in self._held]
            if missing:
                marks = ",".join("?" * len(missing))
                taken = {
                    str(r["name"])
                    for r in await self.db.fetch(
                        f"SELECT name FROM leases WHERE name IN ({marks}) AND deadline > ?",
                        (*missing, self.db.ts(at)),
                    )
                }
                for name in missing:
                    if name not in taken and await self._take(name):
                        self._gained(name, wants[name])
        except Exception as exc:
            log.warning("lease round failed: %s", exc)
            if time.monotonic() - self._confirmed > self.ttl_s * 2 / 3:
                # Others may take them soon: stop driving before they do.
                for name in list(self._held):
                    await self._lost(name)

    def _gained(self, name: str, want: Want) -> None:
        log.info("replica %s holds lease %s", self.owner, name)
        self._wants.setdefault(name, want)
        self._held.add(name)
        self._work[name] = asyncio.create_task(self._run(name, want.on_gain), name=f"lease-{name}")

    async def _run(self, name: str, work: Work) -> None:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("work under lease %s failed", name)

    async def _lost(self, name: str) -> None:
        self._held.discard(name)
        task = self._work.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        want = self._wants.get(name)
        if want is not None:
            await self._run(name, want.on_loss)

    async def wait_gained(self) -> None:
        """Until the work started for the leases held now has run (a replica's start)."""
        tasks = [t for t in self._work.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks)

    async def release(self, name: str) -> None:
        """Give `name` up (its work is done) and stop wanting it."""
        self._wants.pop(name, None)
        self._held.discard(name)
        self._work.pop(name, None)
        with contextlib.suppress(Exception):
            await self.db.execute(
                "DELETE FROM leases WHERE name = ? AND owner = ?", (name, self.owner)
            )

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """The first round (awaited with the work it starts), then rounds in the background."""
        await self.tick()
        await self.wait_gained()
        self._loop = asyncio.create_task(self._forever(), name="sciorch-leases")

    async def _forever(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            await self.tick()

    async def stop(self) -> None:
        """Stop renewing and stop the work (leases stay in the store until `release_all`)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(BaseException):
                await self._loop
            self._loop = None
        for task in list(self._work.values()):
            task.cancel()
        for task in list(self._work.values()):
            with contextlib.suppress(BaseException):
                await task
        self._work.clear()

    async def release_all(self) -> list[str]:
        names = sorted(self._held)
        self._held.clear()
        with contextlib.suppress(Exception):
            await self.db.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))
        return names
