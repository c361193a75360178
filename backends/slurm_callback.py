"""The Slurm backend's HTTP listener for the wrappers' pokes, for sites whose compute nodes
cannot deliver file events to this host: `POST <path>/slurm/<site>/<entry id>/<started|exited>`.
A poke is a hint, never trusted for the outcome (the state always comes from Slurm), so it
needs no secret."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from ground.errors import InvalidInput


class CallbackListener:
    """Listens on `listen` ('host:port'); `on_hint(entry_id, what)` hears each poke."""

    def __init__(self, site: str, on_hint: Callable[[str, str], None]) -> None:
        self.site = site
        self._on_hint = on_hint
        self._server: asyncio.Server | None = None

    async def start(self, listen: str, callback_url: str | None) -> dict[str, str]:
        """Start listening; returns the environment that tells a job where to poke."""
        host, _, port_s = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            port = int(port_s)
        except ValueError:
            raise InvalidInput(
                f"site {self.site!r}: callback_listen must be 'host:port', not {listen!r}",
                field=f"sites.{self.site}.callback_listen",
            ) from None
        self._server = await asyncio.start_server(self._on_connection, host, port)
        bound = int(self._server.sockets[0].getsockname()[1])
        reach = host if host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        url = callback_url or f"http://{reach}:{bound}"
        parts = urlsplit(url)
        return {
            "SCIORCH_CALLBACK_HOST": parts.hostname or "127.0.0.1",
            "SCIORCH_CALLBACK_PORT": str(parts.port or bound),
            "SCIORCH_CALLBACK_PATH": parts.path.rstrip("/") + f"/slurm/{self.site}",
        }

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            for _ in range(100):
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
            writer.write(b"HTTP/1.0 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (TimeoutError, OSError):
            return
        finally:
            writer.close()
        parts = line.decode(errors="replace").split()
        if len(parts) < 2:
            return
        segs = [s for s in parts[1].split("/") if s]
        if len(segs) < 2:
            return
        self._on_hint(segs[-2], segs[-1])


__all__ = ["CallbackListener"]
