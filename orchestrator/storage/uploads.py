"""Inputs sent by callers: small ones whole (the MCP tool), big ones over HTTP in ranges.

An HTTP upload is created with its total size, then its bytes are PUT in order, each chunk
saying where it starts (`Content-Range: bytes a-b/total`); a client that lost its connection
asks HEAD for the offset reached and goes on from there. The partial file lives under
home/uploads on this server; the whole one moves into the object store and is an input from
then on (`sciorch://uploads/<id>`), readable only by the principal who sent it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterable
from pathlib import Path

from pydantic import BaseModel, Field

from ground.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from ground.models import Principal
from orchestrator.storage import ObjectStore

UPLOAD_URI = "sciorch://uploads/"
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


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


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class Uploads:
    def __init__(self, store: ObjectStore, spool: Path, max_bytes: int) -> None:
        self.store = store
        self.spool = spool
        self.max_bytes = max_bytes
        self._locks: dict[str, asyncio.Lock] = {}
        spool.mkdir(parents=True, exist_ok=True)

    def data_key(self, upload_id: str) -> str:
        return self.store.key("uploads", upload_id, "data")

    def _meta_key(self, upload_id: str) -> str:
        return self.store.key("uploads", upload_id, "meta.json")

    def _part(self, upload_id: str) -> Path:
        return self.spool / f"{upload_id}.part"

    def _pending(self, upload_id: str) -> Path:
        return self.spool / f"{upload_id}.json"

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
        await asyncio.to_thread(self._write_pending, up)
        await asyncio.to_thread(self._part(up.id).touch)
        if size == 0:
            return await self._finish(up)
        return up

    def _write_pending(self, up: Upload) -> None:
        tmp = self._pending(up.id).with_suffix(".tmp")
        tmp.write_text(up.model_dump_json())
        os.replace(tmp, self._pending(up.id))

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
        await self.store.put_bytes(self._meta_key(up.id), up.model_dump_json().encode())
        return up

    async def get(self, principal: Principal, upload_id: str, field: str = "upload_id") -> Upload:
        """The upload, finished or not; another principal's is not found."""
        up: Upload | None = None
        if set(upload_id) <= _NAME_OK and upload_id.startswith("upl-"):
            pending = self._pending(upload_id)
            if pending.exists():
                up = Upload.model_validate_json(await asyncio.to_thread(pending.read_text))
                up.received = (await asyncio.to_thread(self._part(upload_id).stat)).st_size
            else:
                info = await self.store.stat(self._meta_key(upload_id))
                if info is not None:
                    raw = await self.store.read(self._meta_key(upload_id), 0, info.size)
                    up = Upload.model_validate_json(raw)
        if up is None or (up.principal != principal.id and not principal.admin):
            raise NotFound(f"no upload {upload_id!r} of yours", field=field)
        return up

    async def append(
        self,
        principal: Principal,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        length: int | None = None,
    ) -> Upload:
        """Write the bytes from `offset` (which must be where the upload stands)."""
        lock = self._locks.setdefault(upload_id, asyncio.Lock())
        if lock.locked():
            raise Conflict(f"upload {upload_id} is being written by another request", field="id")
        async with lock:
            up = await self.get(principal, upload_id, "id")
            if up.complete:
                raise Conflict(f"upload {upload_id} is already complete", field="id")
            if offset != up.received:
                raise Conflict(
                    f"upload {upload_id} stands at byte {up.received}, not {offset}: "
                    "resume from there",
                    field="offset",
                    offset=up.received,
                )
            if length is not None and offset + length > up.size:
                raise InvalidInput(
                    f"bytes {offset}..{offset + length} go past the upload's size {up.size}",
                    field="content-range",
                )
            written = up.received
            with self._part(upload_id).open("r+b") as f:
                f.seek(offset)
                buf = bytearray()
                try:
                    async for chunk in chunks:
                        if written + len(buf) + len(chunk) > up.size:
                            raise InvalidInput(
                                f"more bytes than the upload's size {up.size}",
                                field="content-range",
                            )
                        buf += chunk
                        if len(buf) >= 1 << 20:
                            await asyncio.to_thread(f.write, buf)
                            written += len(buf)
                            buf = bytearray()
                finally:
                    # What arrived before a broken connection stays: the client resumes.
                    if buf:
                        await asyncio.to_thread(f.write, buf)
                        written += len(buf)
                    await asyncio.to_thread(f.flush)
            up.received = written
            if written == up.size:
                up = await self._finish(up)
        self._locks.pop(upload_id, None)
        return up

    async def _finish(self, up: Upload) -> Upload:
        part = self._part(up.id)
        up.sha256 = await asyncio.to_thread(_hash_file, part)
        up.received = up.size
        up.complete = True
        await self.store.put_file(self.data_key(up.id), part, move=True)
        await self.store.put_bytes(self._meta_key(up.id), up.model_dump_json().encode())
        await asyncio.to_thread(self._pending(up.id).unlink, missing_ok=True)
        return up
