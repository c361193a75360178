"""The optional data plane for high-rate stream records: Redis Streams.

Records relayed through the control plane (`$SCIORCH_STREAM` JSON lines, read by the backend,
published on the bus, carried by wait_entry and read_results) suit tens of records a second.
For a detector's rate, with `data_plane = "redis://..."` configured, a job also gets
`SCIORCH_REDIS_URL` and `SCIORCH_REDIS_STREAM` and appends (XADD) to the stream named for its
entry, `sciorch:entries:<entry_id>`, and a client that may see the entry asks the
`stream_access` tool for the stream's coordinates and a credential of its own, and reads (XREAD)
from Redis directly. sciorch carries only the coordinates.

Each credential is a Redis ACL user made for one entry and one use: the job's may only XADD to
its stream, a reader's only read it (XREAD, XRANGE, XREVRANGE, XLEN, XINFO); neither can touch
another key or run another command. They are short-lived: every grant records its deadline in a
sorted set, and each later grant (and the entry's end, for the job's) deletes the users past it.
sciorch connects as the admin the URL names (the default user, with its password).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from ground.errors import InvalidInput, SciorchError

GRANTS = "sciorch:grants"  # sorted set: ACL user name -> unix deadline
Role = Literal["writer", "reader"]
_COMMANDS: dict[Role, str] = {
    "writer": "+xadd +ping",
    "reader": "+xread +xrange +xrevrange +xlen +xinfo|stream +ping",
}


def stream_key(entry_id: str) -> str:
    return f"sciorch:entries:{entry_id}"


@dataclass(frozen=True)
class Grant:
    host: str
    port: int
    stream: str
    username: str
    password: str
    expires_at: float  # unix seconds

    def url(self) -> str:
        return f"redis://{quote(self.username)}:{quote(self.password)}@{self.host}:{self.port}/0"


class RedisPlane:
    def __init__(self, url: str, public_host: str | None = None) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise InvalidInput(
                "data_plane: Redis Streams need redis-py: pip install 'sciorch[redis]'",
                field="data_plane",
            ) from exc
        parts = urlsplit(url)
        self.host = public_host or parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self._redis: Any = aioredis.from_url(url, decode_responses=True)
        self._where = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{self.port}"))

    async def close(self) -> None:
        await self._redis.aclose()

    async def grant(self, entry_id: str, role: Role, ttl_s: float) -> Grant:
        """A new ACL user for `entry_id`'s stream, allowed what `role` needs, for `ttl_s`."""
        name = f"sciorch-{role}-{entry_id}-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(24)
        deadline = time.time() + ttl_s
        try:
            await self.sweep()
            await self._redis.execute_command(
                "ACL", "SETUSER", name, "reset", "on", f">{password}",
                f"~{stream_key(entry_id)}", "resetchannels", *_COMMANDS[role].split(),
            )  # fmt: skip
            await self._redis.zadd(GRANTS, {name: deadline})
        except OSError as exc:
            raise SciorchError(f"data plane {self._where}: {exc}", field="data_plane") from exc
        except Exception as exc:  # redis-py's own errors (connection, auth, ...)
            raise SciorchError(f"data plane {self._where}: {exc}", field="data_plane") from exc
        return Grant(self.host, self.port, stream_key(entry_id), name, password, deadline)

    async def sweep(self, now: float | None = None) -> int:
        """Delete the users whose grants have run out; how many."""
        names = await self._redis.zrangebyscore(GRANTS, "-inf", now or time.time())
        if names:
            await self._redis.execute_command("ACL", "DELUSER", *names)
            await self._redis.zrem(GRANTS, *names)
        return len(names)

    async def revoke(self, username: str) -> None:
        await self._redis.execute_command("ACL", "DELUSER", username)
        await self._redis.zrem(GRANTS, username)
