"""The HTTP edge: uvicorn's h11 protocol with a deadline for each request's head, so slow or
silent clients cannot hold connections open."""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ground.config import Settings

log = logging.getLogger("sciorch.http")


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head.

    uvicorn's only timer on a connection is the keep-alive one, and the first byte of the next
    request stops it: a client that connects and sends nothing, or sends its headers a byte at
    a time, holds the connection (and a file descriptor and buffer) for as long as it likes. The
    deadline starts when the connection opens or the previous response ends and stops when a
    whole request head has arrived; the body and the response have no deadline (SSE streams
    last). A client cut off mid-head gets 408."""

    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self.transport.write(REQUEST_TIMEOUT)
        log.info("closing %s: no whole request head in %gs", self.client, self.header_timeout_s)
        self.transport.close()


def http_protocol(settings: Settings) -> type[H11Protocol]:
    """The uvicorn HTTP protocol class with this configuration's header deadline."""
    return type(
        "HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": settings.http_header_timeout_s}
    )


