"""A finished job's artifacts, copied from its work dir into the object store.

The copy is made as the job ends (the engine calls `keep` before it announces the final
state), a file at a time in ranges, so it outlives the work dir, the site and the event. A
manifest, written last, lists what was kept; while it is missing the work dir still serves.
Each manifest carries `expires_at` from the event's retention (none: kept for ever) and
`sweep` deletes what has expired. A site whose files this server cannot read (Kubernetes:
they are in the pod) has its jobs upload them under their entry's prefix instead
(`upload_grant`), and `keep_uploaded` writes the manifest of what arrived.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel, Field

from ground.contract import ArtifactChunk, ArtifactStat, OutputUpload
from ground.errors import NotFound
from orchestrator.storage import ObjectStore, read_chunks

log = logging.getLogger("sciorch.storage")

ReadRange = Callable[[str, int, int], Awaitable[ArtifactChunk]]

_CHUNK = 1 << 20
# An upload form outlives the job's walltime by this much (its wait in the queue), up to
# the week a SigV4 signature lasts at most.
UPLOAD_GRACE_S = 86400
UPLOAD_MAX_TTL_S = 7 * 86400


def upload_ttl_s(walltime_s: int | None) -> int:
    return min(UPLOAD_MAX_TTL_S, (walltime_s or 86400) + UPLOAD_GRACE_S)


class Manifest(BaseModel):
    entry_id: str
    event_id: str
    stored_at: float
    expires_at: float | None = None
    artifacts: list[ArtifactStat] = Field(default_factory=list)

    def has(self, path: str) -> bool:
        return any(a.path == path for a in self.artifacts)


class EventRetention(BaseModel):
    retention_days: float | None = None


class ArtifactArchive:
    def __init__(self, store: ObjectStore, default_days: float | None = None) -> None:
        self.store = store
        self.default_days = default_days
        # Manifests are immutable once written; the last few read are kept.
        self._cache: OrderedDict[str, Manifest | None] = OrderedDict()

    def _manifest_key(self, entry_id: str) -> str:
        return self.store.key("manifests", f"{entry_id}.json")

    def object_key(self, entry_id: str, path: str) -> str:
        return self.store.key("artifacts", entry_id, path)

    async def set_retention(self, event_id: str, days: float | None) -> None:
        body = EventRetention(retention_days=days).model_dump_json().encode()
        await self.store.put_bytes(self.store.key("events", f"{event_id}.json"), body)

    async def retention(self, event_id: str) -> float | None:
        key = self.store.key("events", f"{event_id}.json")
        info = await self.store.stat(key)
        if info is None:
            return self.default_days
        raw = await self.store.read(key, 0, info.size)
        return EventRetention.model_validate_json(raw).retention_days

    async def keep(
        self, entry_id: str, event_id: str, stats: list[ArtifactStat], read: ReadRange
    ) -> Manifest:
        """Copy each listed file in ranges, then write the manifest."""
        kept: list[ArtifactStat] = []
        for stat in stats:

            async def chunks(path: str = stat.path) -> AsyncIterator[bytes]:
                offset = 0
                while True:
                    chunk = await read(path, offset, _CHUNK)
                    if not chunk.data:
                        return
                    yield chunk.data
                    offset = chunk.next_offset

            try:
                info = await self.store.put_stream(self.object_key(entry_id, stat.path), chunks())
            except NotFound:  # deleted while it was being kept
                continue
            kept.append(stat.model_copy(update={"size": info.size}))
        return await self._write_manifest(entry_id, event_id, kept)

    def upload_prefix(self, entry_id: str) -> str:
        return self.object_key(entry_id, "") + "/"

    def upload_grant(self, entry_id: str, ttl_s: int, max_bytes: int) -> OutputUpload | None:
        """A form the entry's job can upload its output files with, under its own prefix
        only (None where the store makes no such forms)."""
        return self.store.upload_form(self.upload_prefix(entry_id), ttl_s, max_bytes)

    async def keep_uploaded(self, entry_id: str, event_id: str) -> Manifest:
        """The manifest of what the entry's job uploaded itself (`upload_grant`): each object
        under its prefix, hashed here in ranges (the job's own word is not taken for it)."""
        prefix = self.upload_prefix(entry_id)
        kept: list[ArtifactStat] = []
        for info in await self.store.list(prefix):
            path = info.key[len(prefix) :]
            if not path or path.startswith("/") or ".." in path.split("/"):
                continue
            digest = hashlib.sha256()
            async for chunk in read_chunks(self.store, info.key, info.size, _CHUNK):
                digest.update(chunk)
            kept.append(
                ArtifactStat(path=path, size=info.size, mtime=info.mtime, sha256=digest.hexdigest())
            )
        return await self._write_manifest(entry_id, event_id, kept)

    async def _write_manifest(
        self, entry_id: str, event_id: str, kept: list[ArtifactStat]
    ) -> Manifest:
        days = await self.retention(event_id)
        at = time.time()
        manifest = Manifest(
            entry_id=entry_id,
            event_id=event_id,
            stored_at=at,
            expires_at=None if days is None else at + days * 86400,
            artifacts=kept,
        )
        await self.store.put_bytes(
            self._manifest_key(entry_id), manifest.model_dump_json().encode()
        )
        self._remember(entry_id, manifest)
        return manifest

    def _remember(self, entry_id: str, manifest: Manifest | None) -> None:
        self._cache[entry_id] = manifest
        self._cache.move_to_end(entry_id)
        while len(self._cache) > 1024:
            self._cache.popitem(last=False)

    async def manifest(self, entry_id: str) -> Manifest | None:
        if entry_id in self._cache and self._cache[entry_id] is not None:
            return self._cache[entry_id]
        key = self._manifest_key(entry_id)
        info = await self.store.stat(key)
        manifest = None
        if info is not None:
            manifest = Manifest.model_validate_json(await self.store.read(key, 0, info.size))
            if manifest.expires_at is not None and manifest.expires_at <= time.time():
                manifest = None
            else:
                self._remember(entry_id, manifest)
        return manifest

    async def read(self, manifest: Manifest, path: str, offset: int, limit: int) -> ArtifactChunk:
        stat = next((a for a in manifest.artifacts if a.path == path), None)
        if stat is None:
            raise NotFound(f"no artifact {path!r} in this entry's output", field="path")
        offset = max(0, min(offset, stat.size))
        data = await self.store.read(self.object_key(manifest.entry_id, path), offset, limit)
        return ArtifactChunk(
            path=path,
            data=data,
            offset=offset,
            next_offset=offset + len(data),
            size=stat.size,
            mtime=stat.mtime,
        )

    async def sweep(self, at: float | None = None) -> list[str]:
        """Delete the artifacts whose retention has ended; the entries whose were deleted."""
        at = time.time() if at is None else at
        gone: list[str] = []
        for info in await self.store.list(self.store.key("manifests") + "/"):
            raw = await self.store.read(info.key, 0, info.size)
            try:
                manifest = Manifest.model_validate_json(raw)
            except ValueError:
                log.warning("unreadable manifest %s left alone", info.key)
                continue
            if manifest.expires_at is None or manifest.expires_at > at:
                continue
            await self.store.delete_prefix(self.store.key("artifacts", manifest.entry_id) + "/")
            await self.store.delete(info.key)
            self._cache.pop(manifest.entry_id, None)
            gone.append(manifest.entry_id)
        return gone
