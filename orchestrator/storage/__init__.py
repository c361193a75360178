"""The storage layer: where artifacts and inputs are kept once they leave a job's work dir.

An `ObjectStore` holds objects by key ('/'-separated). `local` (the embedded default) is a
directory under home; `s3` is any S3-compatible store, through boto3 (the `s3` extra). Every
read is a byte range and every write a stream of chunks, so no file is ever held whole in
memory, whatever its size. On top: `ArtifactArchive` (a finished job's output/, kept past its
work dir and its event), `Uploads` (inputs sent by callers, resumable) and `resolve_inputs`
(what a launch's `inputs` name, checked before anything runs).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from ground.config import Settings
from ground.contract import OutputUpload
from ground.errors import InvalidInput

# Writes go out in parts of this size (S3 multipart needs at least 5 MiB but the last).
PART_BYTES = 8 << 20


class ObjectInfo(BaseModel):
    key: str
    size: int
    mtime: float


class ObjectStore(Protocol):
    kind: str

    def key(self, *parts: str) -> str:
        """The full key of sciorch's object `parts` (under the configured prefix)."""

    def key_of_url(self, url: str, field: str) -> str:
        """The key an `s3://bucket/key` URL names in this store (InvalidInput naming `field`
        for another store's URL)."""

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> ObjectInfo: ...

    async def put_file(self, key: str, path: Path, *, move: bool = False) -> ObjectInfo:
        """Store the file at `path` (`move`: the file may be consumed, a rename where it can)."""

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...

    async def stat(self, key: str) -> ObjectInfo | None: ...

    async def read(self, key: str, offset: int, limit: int) -> bytes: ...

    async def list(self, prefix: str) -> list[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def concat(self, key: str, parts: Sequence[str]) -> ObjectInfo:
        """The objects `parts`, in order, as one object at `key`; the parts are gone after.
        (An upload's ranges, each received as an object of its own, perhaps by another
        replica.)"""

    async def delete_prefix(self, prefix: str) -> int:
        """Every object under `prefix` (a folder: it ends in '/')."""

    def local_path(self, key: str) -> Path | None:
        """A path this server can read the object at, where the store has one."""

    async def presign(self, key: str, ttl_s: int) -> str | None:
        """A URL anyone holding it can GET the object from, where the store makes them."""

    def upload_form(self, key_prefix: str, ttl_s: int, max_bytes: int) -> OutputUpload | None:
        """A form its holder can upload objects under `key_prefix` with and nothing else (an
        S3 POST policy), where the store makes them."""


def open_store(settings: Settings) -> ObjectStore:
    cfg = settings.storage
    if cfg.kind == "s3":
        if not cfg.bucket:
            raise InvalidInput("storage kind s3 needs a bucket", field="storage.bucket")
        from orchestrator.storage.s3 import S3Store

        return S3Store(cfg)
    from orchestrator.storage.local import LocalStore

    return LocalStore(cfg.path or settings.home / "storage")


async def read_chunks(
    store: ObjectStore, key: str, size: int, chunk: int = 1 << 20
) -> AsyncIterable[bytes]:
    offset = 0
    while offset < size:
        data = await store.read(key, offset, min(chunk, size - offset))
        if not data:
            return
        yield data
        offset += len(data)


__all__ = ["PART_BYTES", "ObjectInfo", "ObjectStore", "open_store", "read_chunks"]
