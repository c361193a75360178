"""The event bus: pushes entry transitions, log growth and stream records to subscribers.

In-process for SQLite. The engine only calls `publish` and `subscribe`, so when several server
replicas share one PostgreSQL store, `orchestrator.pg_bus.PgBus` (LISTEN/NOTIFY) takes its place
and delivers every replica's messages to each one's subscribers.

Signals are what replicas tell each other (hand this new entry to the site's owner, stop that
campaign): they only ever reach the other replicas, so on this bus they go nowhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ground.models import Message

Filter = Callable[[Message], bool]
SignalHandler = Callable[[dict[str, Any]], None]


class Subscription:
    def __init__(self, match: Filter, maxsize: int) -> None:
        self.match = match
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    async def get(self) -> Message:
        return await self.queue.get()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            yield await self.queue.get()


class Bus:
    # How often a waiter should re-read the store in case a message was lost; None: never
    # (in process, a message is lost only by a stalled subscriber, which re-reads anyway).
    recheck_s: float | None = None

    def __init__(self, maxsize: int = 10_000) -> None:
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[Message], None]] = []
        self._handlers: dict[str, list[SignalHandler]] = {}
        self._maxsize = maxsize

    def add_listener(self, listener: Callable[[Message], None]) -> Callable[[], None]:
        """A callback run synchronously on every message (it must not block); returns the
        function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, message: Message) -> None:
        for listener in tuple(self._listeners):
            listener(message)
        for sub in tuple(self._subs):
            if sub.match(message):
                try:
                    sub.queue.put_nowait(message)
                except asyncio.QueueFull:
                    # A stalled subscriber loses messages rather than stalling the engine; it
                    # can always re-read the store, which is the truth.
                    sub.dropped += 1

    def signal(self, topic: str, data: dict[str, Any]) -> None:
        """Tell the other replicas (none here)."""

    def on_signal(self, topic: str, handler: SignalHandler) -> None:
        """Run `handler` (it must not block) on each signal of `topic` from another replica."""
        self._handlers.setdefault(topic, []).append(handler)

    def _signalled(self, topic: str, data: dict[str, Any]) -> None:
        for handler in tuple(self._handlers.get(topic, ())):
            handler(data)

    async def close(self) -> None:
        """Nothing to release in process."""

    @asynccontextmanager
    async def subscribe(self, match: Filter | None = None) -> AsyncIterator[Subscription]:
        sub = Subscription(match or (lambda _m: True), self._maxsize)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
