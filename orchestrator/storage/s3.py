"""Any S3-compatible object store, through obstore (the `s3` extra): async, in Rust, with
no Python-level buffering. Writes are multipart in PART_BYTES parts, two in flight at most,
reads are ranged GETs: memory stays a few parts deep whatever the object's size."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from ground.config import StorageConfig
from ground.contract import OutputUpload
from ground.errors import InvalidInput, NotFound
from orchestrator.storage import PART_BYTES, ObjectInfo, read_chunks
from orchestrator.storage.post_policy import presigned_post

IN_FLIGHT = 2


class S3Store:
    kind = "s3"

    def __init__(self, cfg: StorageConfig) -> None:
        try:
            import obstore
            from obstore.store import S3Store as _S3
        except ImportError as exc:  # pragma: no cover - the extra is in the test set
            raise InvalidInput(
                "storage kind s3 needs obstore: pip install 'sciorch[s3]'", field="storage.kind"
            ) from exc
        assert cfg.bucket
        self._cfg = cfg
        self._obs: Any = obstore
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix.strip("/")
        config: dict[str, Any] = {"region": cfg.region}
        if cfg.endpoint:
            config["endpoint"] = cfg.endpoint
            config["virtual_hosted_style_request"] = False
        if cfg.access_key_id:
            config["access_key_id"] = cfg.access_key_id
        if cfg.secret_access_key:
            config["secret_access_key"] = cfg.secret_access_key
        self._store: Any = _S3(
            cfg.bucket,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": bool(cfg.endpoint and cfg.endpoint.startswith("http:"))},
        )

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def key_of_url(self, url: str, field: str) -> str:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if bucket != self.bucket:
            raise InvalidInput(
                f"{url!r} is not in this server's bucket {self.bucket!r}", field=field
            )
        if not key or ".." in key.split("/"):
            raise InvalidInput(f"{url!r} names no object key", field=field)
        return key

    def local_path(self, key: str) -> Path | None:
        return None

    async def presign(self, key: str, ttl_s: int) -> str | None:
        url: str = await self._obs.sign_async(self._store, "GET", key, timedelta(seconds=ttl_s))
        return url

    def upload_form(self, key_prefix: str, ttl_s: int, max_bytes: int) -> OutputUpload | None:
        cfg = self._cfg
        access = cfg.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = cfg.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            return None  # credentials from elsewhere (instance roles): nothing to sign with
        if cfg.endpoint:
            url = f"{cfg.endpoint.rstrip('/')}/{self.bucket}"  # path style, as obstore's
        else:
            url = f"https://{self.bucket}.s3.{cfg.region}.amazonaws.com"
        return presigned_post(
            url=url,
            bucket=self.bucket,
            key_prefix=key_prefix,
            access_key=access,
            secret_key=secret,
            region=cfg.region,
            ttl_s=ttl_s,
            max_bytes=max_bytes,
            session_token=os.environ.get("AWS_SESSION_TOKEN") if not cfg.access_key_id else None,
        )

    async def _put(self, key: str, source: Any) -> ObjectInfo:
        await self._obs.put_async(
            self._store, key, source, chunk_size=PART_BYTES, max_concurrency=IN_FLIGHT
        )
        info = await self.stat(key)
        assert info is not None
        return info

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> ObjectInfo:
        return await self._put(key, chunks)

    async def put_file(self, key: str, path: Path, *, move: bool = False) -> ObjectInfo:
        info = await self._put(key, path)
        if move:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        return info

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        await self._obs.put_async(self._store, key, data, use_multipart=False)
        return ObjectInfo(key=key, size=len(data), mtime=0.0)

    async def stat(self, key: str) -> ObjectInfo | None:
        from obstore.exceptions import NotFoundError

        try:
            meta = await self._obs.head_async(self._store, key)
        except (NotFoundError, FileNotFoundError):
            return None
        return ObjectInfo(key=key, size=meta["size"], mtime=meta["last_modified"].timestamp())

    async def read(self, key: str, offset: int, limit: int) -> bytes:
        from obstore.exceptions import NotFoundError

        if limit <= 0:
            return b""
        try:
            data = await self._obs.get_range_async(self._store, key, start=offset, length=limit)
        except (NotFoundError, FileNotFoundError) as exc:
            raise NotFound(f"no object {key!r}", field="key") from exc
        except Exception:
            # A range that starts at or past the end is an error to obstore; it is EOF here.
            info = await self.stat(key)
            if info is None:
                raise NotFound(f"no object {key!r}", field="key") from None
            if offset >= info.size:
                return b""
            raise
        return bytes(data)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        async for batch in self._obs.list(self._store, prefix):
            for meta in batch:
                out.append(
                    ObjectInfo(
                        key=meta["path"], size=meta["size"], mtime=meta["last_modified"].timestamp()
                    )
                )
        return sorted(out, key=lambda o: o.key)

    async def concat(self, key: str, parts: Sequence[str]) -> ObjectInfo:
        if len(parts) == 1:  # a copy inside the store: no byte passes through here
            await self._obs.rename_async(self._store, parts[0], key)
        else:
            # obstore has no multipart API to join parts server-side: the parts are read
            # back in ranges and written as one multipart object, a few parts in memory.
            async def chunks() -> AsyncIterator[bytes]:
                for part in parts:
                    info = await self.stat(part)
                    if info is None:
                        raise NotFound(f"no object {part!r}", field="key")
                    async for data in read_chunks(self, part, info.size, PART_BYTES):
                        yield data

            await self._put(key, chunks())
            await self._obs.delete_async(self._store, list(parts))
        info = await self.stat(key)
        assert info is not None
        return info

    async def delete(self, key: str) -> None:
        await self._obs.delete_async(self._store, key)

    async def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in await self.list(prefix)]
        for i in range(0, len(keys), 1000):
            await self._obs.delete_async(self._store, keys[i : i + 1000])
        return len(keys)
