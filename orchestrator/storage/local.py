"""The embedded store: objects are files under one directory, keys their relative paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterable, Sequence
from pathlib import Path, PurePosixPath

from ground.contract import OutputUpload
from ground.errors import InvalidInput, NotFound
from orchestrator.storage import ObjectInfo


def _info(key: str, path: Path) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)


def _copy_all(src: int, dst: int, size: int) -> None:
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(src, dst, min(left, 1 << 30))
            if n == 0:
                break
            left -= n
    except OSError:  # no copy_file_range here (another OS, some filesystems): read and write
        os.lseek(src, size - left, os.SEEK_SET)
        while left > 0 and (block := os.read(src, min(left, 1 << 20))):
            os.write(dst, block)
            left -= len(block)


class LocalStore:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p)

    def key_of_url(self, url: str, field: str) -> str:
        raise InvalidInput(
            f'{url!r}: object-store URLs need [storage] kind = "s3"; this server keeps its '
            "files on its own disk (upload the file, or name an entry's artifact)",
            field=field,
        )

    def _path(self, key: str) -> Path:
        pure = PurePosixPath(key)
        if not key or pure.is_absolute() or ".." in pure.parts:
            raise InvalidInput(f"bad object key {key!r}", field="key")
        return self.root / pure

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def presign(self, key: str, ttl_s: int) -> str | None:
        return None

    def upload_form(self, key_prefix: str, ttl_s: int, max_bytes: int) -> OutputUpload | None:
        return None

    def _tmp(self, target: Path) -> tuple[int, str]:
        target.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=target.parent, prefix=".part-")

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> ObjectInfo:
        target = self._path(key)
        fd, tmp = await asyncio.to_thread(self._tmp, target)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(os.replace, tmp, target)
        except BaseException:
            await asyncio.to_thread(Path(tmp).unlink, missing_ok=True)
            raise
        return _info(key, target)

    async def put_file(self, key: str, path: Path, *, move: bool = False) -> ObjectInfo:
        target = self._path(key)

        def put() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                try:
                    os.replace(path, target)
                    return
                except OSError:  # another filesystem: copy
                    pass
            fd, tmp = self._tmp(target)
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)

        await asyncio.to_thread(put)
        return _info(key, target)

    async def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        async def one() -> AsyncIterable[bytes]:
            yield data

        return await self.put_stream(key, one())

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_info, key, path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def read(self, key: str, offset: int, limit: int) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with path.open("rb") as f:
                f.seek(offset)
                return f.read(limit)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError as exc:
            raise NotFound(f"no object {key!r}", field="key") from exc

    async def list(self, prefix: str) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
            out: list[ObjectInfo] = []
            if base.is_file():
                return [_info(prefix, base)]
            for folder, dirs, files in os.walk(base):
                dirs.sort()
                for name in sorted(files):
                    if name.startswith(".part-"):
                        continue
                    p = Path(folder) / name
                    out.append(_info(p.relative_to(self.root).as_posix(), p))
            return out

        return await asyncio.to_thread(walk)

    async def concat(self, key: str, parts: Sequence[str]) -> ObjectInfo:
        target = self._path(key)
        paths = [self._path(p) for p in parts]

        def join() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            if len(paths) == 1:
                os.replace(paths[0], target)
                return
            # Appended to the first part, in the kernel (no bytes through this process; a
            # reflink where the filesystem has them).
            with paths[0].open("r+b") as out:  # not "ab": copy_file_range refuses O_APPEND
                out.seek(0, os.SEEK_END)
                for path in paths[1:]:
                    with path.open("rb") as f:
                        _copy_all(f.fileno(), out.fileno(), os.fstat(f.fileno()).st_size)
            os.replace(paths[0], target)
            for path in paths:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(join)
        return _info(key, target)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def delete_prefix(self, prefix: str) -> int:
        def rm() -> int:
            base = self._path(prefix.rstrip("/"))
            if base.is_file():
                base.unlink()
                return 1
            if not base.is_dir():
                return 0
            n = sum(len(files) for _, _, files in os.walk(base))
            shutil.rmtree(base, ignore_errors=True)
            return n

        return await asyncio.to_thread(rm)
