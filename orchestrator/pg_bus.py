"""The event bus across replicas: PostgreSQL LISTEN/NOTIFY on the store's own database.

Each replica delivers its own messages to its subscribers at once (as the in-process bus does)
and sends them to the others with NOTIFY on one channel per store schema, so `wait_entry`,
listen streams, campaign updates and the proxy see every change whichever replica made it. The
engine publishes after the store write has committed, and NOTIFYs leave in the order they were
published (one sender task, batched), so a replica hears the transitions of an entry in the
order they were written.

A notification carries an envelope `{"o": origin replica, "n": sequence, ...}` with the message
itself (`"m"`) or, when that would pass PostgreSQL's payload limit (8000 bytes), a pointer
(`"p"`: the message without its record and reason) that the receiver fills in from the store
and the entry's files (`resolve`, set by the engine). A replica ignores its own notifications
(it delivered them already). Signals (`"s"`, `"d"`) go only to the other replicas.

Two connections of its own, not from the store's pool: the listening one (a pooled connection
is reset on release, which would UNLISTEN) and the sending one, each re-opened after a loss.
While the listener is down, other replicas' messages are lost; subscribers that must not miss
an end (wait_entry) read the store again when the bus reconnects (`reconnected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ground.models import Message
from orchestrator.bus import Bus

log = logging.getLogger("sciorch.bus")

MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses 8000 and more
_BATCH = 200

Resolve = Callable[[Message], Awaitable[Message | None]]


class PgBus(Bus):
    recheck_s = 10.0

    def __init__(self, dsn: str, channel: str, replica: str, maxsize: int = 10_000) -> None:
        super().__init__(maxsize)
        self.dsn = dsn
        self.channel = channel
        self.replica = replica
        self.resolve: Resolve | None = None
        self.reconnected: list[Callable[[], None]] = []
        self._seq = itertools.count(1)
        self._out: asyncio.Queue[str] = asyncio.Queue()
        self._in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listening = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued or in hand
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self.sent = 0
        self.received = 0

    @classmethod
    async def open(cls, dsn: str, channel: str, replica: str) -> PgBus:
        bus = cls(dsn, channel, replica)
        bus._tasks = [
            asyncio.create_task(bus._listen(), name="sciorch-bus-listen"),
            asyncio.create_task(bus._send(), name="sciorch-bus-send"),
            asyncio.create_task(bus._deliver(), name="sciorch-bus-deliver"),
        ]
        try:
            await asyncio.wait_for(bus._listening.wait(), 30)
        except BaseException:
            await bus.close()
            raise
        return bus

    # ------------------------------------------------------------------ out

    def publish(self, message: Message) -> None:
        super().publish(message)
        body = message.model_dump(mode="json", exclude_none=True)
        if not self._queue({"m": body}):
            small = {"record", "reason"}
            self._queue({"p": message.model_dump(mode="json", exclude_none=True, exclude=small)})

    def signal(self, topic: str, data: dict[str, Any]) -> None:
        if not self._queue({"s": topic, "d": data}):
            log.error("signal %s dropped: over %d bytes", topic, MAX_PAYLOAD)

    def _queue(self, envelope: dict[str, Any]) -> bool:
        text = json.dumps({"o": self.replica, "n": next(self._seq), **envelope}, default=str)
        if len(text.encode()) > MAX_PAYLOAD:
            return False
        self._idle.clear()
        self._out.put_nowait(text)
        return True

    async def _connect(self) -> Any:
        import asyncpg

        return await asyncpg.connect(self.dsn)

    async def _send(self) -> None:
        conn: Any = None
        batch: list[str] = []
        while True:
            if not batch:
                batch.append(await self._out.get())
                while len(batch) < _BATCH and not self._out.empty():
                    batch.append(self._out.get_nowait())
            try:
                if conn is None or conn.is_closed():
                    conn = await self._connect()
                await conn.execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i)"
                    " ORDER BY i",
                    self.channel,
                    batch,
                )
                self.sent += len(batch)
                batch = []
                if self._out.empty():
                    self._idle.set()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    if conn is not None:
                        await conn.close()
                raise
            except Exception as exc:
                log.warning("bus: sending failed (%s); retrying", exc)
                conn = None
                await asyncio.sleep(0.5)

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Until what was published so far has been sent (bounded)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    # ------------------------------------------------------------------ in

    async def _listen(self) -> None:
        first = True
        while True:
            lost = asyncio.Event()
            conn: Any = None
            try:
                conn = await self._connect()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                self._listening.set()
                if not first:
                    log.info("bus: listening again on %s", self.channel)
                    for hook in tuple(self.reconnected):
                        hook()
                first = False
                await lost.wait()
                log.warning("bus: the listening connection was lost; reconnecting")
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            except Exception as exc:
                log.warning("bus: cannot listen (%s); retrying", exc)
            await asyncio.sleep(0.5)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            envelope = json.loads(payload)
        except ValueError:
            return
        if envelope.get("o") != self.replica:
            self._in.put_nowait(envelope)

    async def _deliver(self) -> None:
        """One task, so that messages reach subscribers in the order they were sent."""
        while True:
            envelope = await self._in.get()
            self.received += 1
            try:
                if "s" in envelope:
                    self._signalled(str(envelope["s"]), dict(envelope.get("d") or {}))
                    continue
                if "m" in envelope:
                    message: Message | None = Message.model_validate(envelope["m"])
                else:
                    message = Message.model_validate(envelope["p"])
                    if self.resolve is not None:
                        message = await self.resolve(message)
                if message is not None:
                    Bus.publish(self, message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bus: delivering a message failed")

    async def close(self) -> None:
        if self._listening.is_set():
            await self.flush()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
