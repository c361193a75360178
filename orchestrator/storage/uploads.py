"""Inputs sent by callers: small ones whole (the MCP tool), big ones over HTTP in ranges.

An HTTP upload is created with its total size, then its bytes are PUT in order, each range
saying where it starts (`Content-Range: bytes a-b/total`); a client that lost its connection
asks HEAD for the offset reached and goes on from there, through any replica. Nothing lives on
one server's disk: the upload's state is a row of the store (table `uploads`), and each PUT's
bytes, as they arrive, become one object of the storage layer (`uploads/<id>/parts/...`; on S3
a multipart object). A PUT cut off keeps what arrived. The part is recorded by a
compare-and-set on `received`, so of two PUTs racing from one offset (on two replicas) one
wins and the other gets 409 with the offset to resume from. Once the last byte is in, the
parts are joined into one object (`ObjectStore.concat`), which is an input from then on
(`sciorch://uploads/<id>`), readable only by the principal who sent it.

The checksum: a replica hashes the bytes it receives (off the event loop) and keeps the hash
while the next range may continue it; a range that lands on another replica, or after a
restart, drops it, and the whole object is hashed from storage once it is complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from ground.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from ground.models import Principal
from orchestrator.database import Database, Row, parse_ts
from orchestrator.storage import PART_BYTES, ObjectStore, read_chunks

UPLOAD_URI = "sciorch://uploads/"
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# Received bytes are written (and hashed) in blocks of this size: a few thread hops a
# hundred MB, and a few MB held.
BLOCK = 4 << 20
_HASHES_KEPT = 256


class Upload(BaseModel):
    id: str
    principal: str
    name: str = Field(description="the file name it was sent as")
    size: int = Field(description="total bytes")
    received: int = 0
    complete: bool = False
    sha256: str | None = None
    created_at: float

    @property
    def uri(self) -> str:
        return UPLOAD_URI + self.id


def _check_name(name: str) -> str:
    if not name or len(name) > 200 or not set(name) <= _NAME_OK or name.startswith("."):
        raise InvalidInput(
            f"upload name must be a plain file name (letters, digits, . _ -), got {name!r}",
            field="name",
        )
    return name


class _Blocks:
    """The request's chunks in BLOCK-sized blocks, counted, at most `room` bytes, and hashed
    on a worker thread when a hash runs: block k is hashed while the store writes it (the
    hash of k is awaited before k+1's starts, so the hash sees the blocks in order)."""

    def __init__(self, chunks: AsyncIterable[bytes], room: int, hasher: Any | None) -> None:
        self.chunks = chunks
        self.room = room
        self.hasher = hasher
        self.count = 0
        self._hashing: asyncio.Future[None] | None = None

    async def _out(self, parts: list[bytes]) -> bytes:
        block = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.hasher is not None:
            await self.hashed()
            self._hashing = asyncio.ensure_future(asyncio.to_thread(self.hasher.update, block))
        self.count += len(block)
        return block

    async def hashed(self) -> None:
        """Wait for the last block's hash (before the hash is read or kept)."""
        if self._hashing is not None:
            await self._hashing
            self._hashing = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        held: list[bytes] = []
        size = 0
        try:
            async for chunk in self.chunks:
                if self.count + size + len(chunk) > self.room:
                    raise InvalidInput(
                        "more bytes than the upload's size (Content-Range's total)",
                        field="content-range",
                    )
                held.append(chunk)
                size += len(chunk)
                if size >= BLOCK:
                    yield await self._out(held)
                    held, size = [], 0
            if held:
                yield await self._out(held)
        finally:
            await self.hashed()


class Uploads:
    def __init__(self, store: ObjectStore, db: Database, max_bytes: int) -> None:
        self.store = store
        self.db = db
        self.max_bytes = max_bytes
        # (upload id, offset reached) -> the running sha256 of bytes 0..offset on this replica.
        self._hashes: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def data_key(self, upload_id: str) -> str:
        return self.store.key("uploads", upload_id, "data")

    def _part_key(self, upload_id: str, offset: int) -> str:
        # The token keeps two racing PUTs from one offset off each other's object.
        return self.store.key(
            "uploads", upload_id, "parts", f"{offset:016d}-{secrets.token_hex(4)}"
        )

    async def _insert(self, up: Upload) -> None:
        created = self.db.ts(datetime.fromtimestamp(up.created_at, UTC))
        await self.db.execute(
            "INSERT INTO uploads (id, principal, name, size, received, complete, sha256, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                up.id,
                up.principal,
                up.name,
                up.size,
                up.received,
                int(up.complete),
                up.sha256,
                created,
            ),
        )

    async def create(self, principal: Principal, name: str, size: int) -> Upload:
        if size < 0:
            raise InvalidInput("size must be >= 0", field="size")
        if size > self.max_bytes:
            raise LimitExceeded(
                f"an upload is at most {self.max_bytes} bytes (storage.max_upload_bytes)",
                field="size",
            )
        up = Upload(
            id="upl-" + secrets.token_hex(8),
            principal=principal.id,
            name=_check_name(name),
            size=size,
            created_at=time.time(),
        )
        await self._insert(up)
        if size == 0:
            return await self._finish(up, [], hashlib.sha256())
        return up

    async def put_small(self, principal: Principal, name: str, data: bytes) -> Upload:
        up = Upload(
            id="upl-" + secrets.token_hex(8),
            principal=principal.id,
            name=_check_name(name),
            size=len(data),
            received=len(data),
            complete=True,
            sha256=hashlib.sha256(data).hexdigest(),
            created_at=time.time(),
        )
        await self.store.put_bytes(self.data_key(up.id), data)
        await self._insert(up)
        return up

    async def _row(self, upload_id: str) -> Row | None:
        if not (set(upload_id) <= _NAME_OK and upload_id.startswith("upl-")):
            return None
        return await self.db.fetchrow("SELECT * FROM uploads WHERE id = ?", (upload_id,))

    @staticmethod
    def _upload(row: Row) -> Upload:
        return Upload(
            id=row["id"],
            principal=row["principal"],
            name=row["name"],
            size=row["size"],
            received=row["received"],
            complete=bool(row["complete"]),
            sha256=row["sha256"],
            created_at=parse_ts(row["created_at"]).timestamp(),
        )

    async def get(self, principal: Principal, upload_id: str, field: str = "upload_id") -> Upload:
        """The upload, finished or not; another principal's is not found."""
        up, _ = await self._get(principal, upload_id, field)
        return up

    async def _get(
        self, principal: Principal, upload_id: str, field: str
    ) -> tuple[Upload, list[str]]:
        row = await self._row(upload_id)
        if row is None or (row["principal"] != principal.id and not principal.admin):
            raise NotFound(f"no upload {upload_id!r} of yours", field=field)
        return self._upload(row), list(json.loads(row["parts"]))

    async def append(
        self,
        principal: Principal,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        length: int | None = None,
    ) -> Upload:
        """Write the bytes from `offset` (which must be where the upload stands)."""
        up, parts = await self._get(principal, upload_id, "id")
        if up.complete:
            raise Conflict(f"upload {upload_id} is already complete", field="id")
        if offset != up.received:
            raise self._elsewhere(up)
        if length is not None and offset + length > up.size:
            raise InvalidInput(
                f"bytes {offset}..{offset + length} go past the upload's size {up.size}",
                field="content-range",
            )
        hasher = hashlib.sha256() if offset == 0 else self._hashes.pop((up.id, offset), None)
        blocks = _Blocks(chunks, up.size - offset, hasher)
        key = self._part_key(up.id, offset)
        if offset < up.size:
            try:
                await self.store.put_stream(key, blocks)
            finally:
                await blocks.hashed()
        if blocks.count:
            done = offset + blocks.count
            async with self.db.writer() as conn:
                won = await conn.fetch(
                    "UPDATE uploads SET received = ?, parts = ? "
                    "WHERE id = ? AND received = ? AND complete = 0 RETURNING id",
                    (done, json.dumps([*parts, key]), up.id, offset),
                )
            if not won:  # another PUT from this offset was recorded first
                await self.store.delete(key)
                raise self._elsewhere(await self.get(principal, upload_id, "id"))
            parts.append(key)
            up.received = done
        elif offset < up.size:
            await self.store.delete(key)
        if up.received < up.size:
            if hasher is not None and blocks.count:
                self._keep_hash(up.id, up.received, hasher)
            return up
        # Complete: joined here. A PUT of nothing at the end finishes an upload whose replica
        # stopped between recording the last part and joining.
        return await self._finish(up, parts, hasher)

    @staticmethod
    def _elsewhere(up: Upload) -> Conflict:
        return Conflict(
            f"upload {up.id} stands at byte {up.received}: resume from there",
            field="offset",
            offset=up.received,
        )

    def _keep_hash(self, upload_id: str, offset: int, hasher: Any) -> None:
        self._hashes[(upload_id, offset)] = hasher
        while len(self._hashes) > _HASHES_KEPT:
            self._hashes.popitem(last=False)

    async def _finish(self, up: Upload, parts: list[str], hasher: Any | None) -> Upload:
        key = self.data_key(up.id)
        kept = await self.store.stat(key)
        if kept is None or kept.size != up.size:  # else joined before a restart
            if up.size == 0:
                await self.store.put_bytes(key, b"")
            else:
                await self.store.concat(key, parts)
        if hasher is None:
            hasher = hashlib.sha256()
            async for block in read_chunks(self.store, key, up.size, PART_BYTES):
                await asyncio.to_thread(hasher.update, block)
        up.sha256 = hasher.hexdigest()
        up.received = up.size
        up.complete = True
        await self.db.execute(
            "UPDATE uploads SET received = ?, complete = 1, sha256 = ?, parts = '[]' WHERE id = ?",
            (up.size, up.sha256, up.id),
        )
        return up
