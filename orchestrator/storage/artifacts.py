"""A finished job's artifacts, copied from its work dir into the object store.

The copy is made as the job ends (the engine calls `keep` before it announces the final
state), a file at a time in ranges, so it outlives the work dir, the site and the event. A
manifest, written last, lists what was kept; while it is missing the work dir still serves.
Each manifest carries `expires_at` from the event's retention (none: kept for ever) and
`sweep` deletes what has expired.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel, Field

from ground.contract import ArtifactChunk, ArtifactStat
from ground.errors import NotFound
from orchestrator.storage import ObjectStore

log = logging.getLogger("sciorch.storage")

ReadRange = Callable[[str, int, int], Awaitable[ArtifactChunk]]

_CHUNK = 1 << 20


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
