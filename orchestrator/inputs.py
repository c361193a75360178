"""A launch's `inputs`: what each names, checked before anything runs, then where the site
can get it (`StagedInput`).

A value is one of
  sciorch://uploads/<id>                           a file the caller uploaded
  sciorch://entries/<entry_id>/artifacts/<path>    another entry's artifact (a file, or with a
                                                   trailing '/' a directory of them); the
                                                   caller must be able to see that entry
  s3://<bucket>/<key>                              an object (or, ending in '/', a prefix) in
                                                   the configured store
Every refusal names `inputs.<name>`: an input the template does not declare, a required one
missing, a reference that cannot be read, one over `max_bytes`, a file where a directory is
wanted (or the other way round), a path that would leave the work dir.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote

from ground.contract import MAX_ARTIFACT_READ, StagedFile, StagedInput
from ground.errors import InvalidInput, LimitExceeded, NotFound, SciorchError
from ground.models import InputSpec, Principal, Service
from orchestrator.storage import ObjectStore, read_chunks
from orchestrator.storage.uploads import UPLOAD_URI

if TYPE_CHECKING:
    from orchestrator.engine import Engine

ARTIFACT_URI = "sciorch://entries/"
# Presigned URLs handed to a site live this long (the job must have started by then).
PRESIGN_TTL_S = 24 * 3600


@dataclass(frozen=True)
class _File:
    path: str  # under inputs/<name>; '' for a file input
    size: int
    key: str | None = None  # an object in the store
    entry_id: str | None = None  # else an artifact read through the engine
    artifact: str | None = None


@dataclass(frozen=True)
class Resolved:
    spec: InputSpec
    files: list[_File]


def _safe_rel(rel: str, field: str) -> str:
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or "\0" in rel:
        raise InvalidInput(f"{rel!r} would lead out of the work dir", field=field)
    return pure.as_posix()


async def resolve_inputs(
    engine: Engine, principal: Principal, svc: Service, given: Mapping[str, str]
) -> list[Resolved]:
    declared = {i.name: i for i in svc.inputs}
    for name in given:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise InvalidInput(
                f"{svc.name} declares no input {name!r} (its inputs: {known})",
                field=f"inputs.{name}",
            )
    out: list[Resolved] = []
    for spec in svc.inputs:
        field = f"inputs.{spec.name}"
        ref = given.get(spec.name)
        if ref is None:
            if spec.required:
                raise InvalidInput(f"input {spec.name!r} is required", field=field)
            continue
        if not isinstance(ref, str):
            raise InvalidInput("an input is given as a URI string", field=field)
        try:
            files = await _files(engine, principal, spec, ref, field)
        except SciorchError as exc:
            if exc.field == field:
                raise
            raise type(exc)(exc.message, field=field) from exc
        total = sum(f.size for f in files)
        if spec.max_bytes is not None and total > spec.max_bytes:
            raise LimitExceeded(
                f"input {spec.name!r} is {total} bytes; the template allows {spec.max_bytes}",
                field=field,
            )
        out.append(Resolved(spec, files))
    return out


async def _files(
    engine: Engine, principal: Principal, spec: InputSpec, ref: str, field: str
) -> list[_File]:
    store = engine.storage
    want_dir = spec.kind == "directory"
    if ref.startswith(UPLOAD_URI):
        if want_dir:
            raise InvalidInput(
                "an upload is one file; a directory input takes an artifact directory "
                "(sciorch://entries/<id>/artifacts/<dir>/) or an s3:// prefix",
                field=field,
            )
        up = await engine.uploads.get(principal, ref.removeprefix(UPLOAD_URI), field)
        if not up.complete:
            raise InvalidInput(
                f"upload {up.id} has {up.received} of {up.size} bytes: finish it first",
                field=field,
            )
        return [_File("", up.size, key=engine.uploads.data_key(up.id))]
    if ref.startswith(ARTIFACT_URI):
        entry_id, sep, path = ref.removeprefix(ARTIFACT_URI).partition("/artifacts/")
        if not sep or not entry_id:
            raise InvalidInput(
                f"{ref!r} is not sciorch://entries/<entry_id>/artifacts/<path>", field=field
            )
        path = unquote(path)
        stats = await engine.list_artifacts(principal, entry_id)
        if not want_dir:
            stat = next((s for s in stats if s.path == path), None)
            if stat is None:
                raise NotFound(f"entry {entry_id} has no artifact {path!r}", field=field)
            return [_File("", stat.size, entry_id=entry_id, artifact=path)]
        prefix = path.rstrip("/") + "/" if path.strip("/") else ""
        return [
            _File(
                _safe_rel(s.path[len(prefix) :], field), s.size, entry_id=entry_id, artifact=s.path
            )
            for s in stats
            if s.path.startswith(prefix)
        ] or _empty(ref, field)
    if ref.startswith("s3://"):
        key = store.key_of_url(ref, field)
        if not want_dir:
            info = await store.stat(key)
            if info is None:
                raise NotFound(f"no object {ref!r}", field=field)
            return [_File("", info.size, key=key)]
        prefix = key.rstrip("/") + "/"
        objs = await store.list(prefix)
        return [
            _File(_safe_rel(o.key[len(prefix) :], field), o.size, key=o.key) for o in objs
        ] or _empty(ref, field)
    raise InvalidInput(
        f"{ref!r}: an input is sciorch://uploads/<id>, sciorch://entries/<id>/artifacts/<path> "
        "or s3://<bucket>/<key>",
        field=field,
    )


def _empty(ref: str, field: str) -> list[_File]:
    raise NotFound(f"{ref!r} holds no files", field=field)


async def stage_inputs(
    engine: Engine,
    principal: Principal,
    entry_id: str,
    resolved: list[Resolved],
    urls_only: bool,
) -> list[StagedInput]:
    """Where the site gets each file: a path this server can read (the store's own file, or
    a copy made under home/staging) and, where the store presigns, a URL. `urls_only`: the
    site downloads (Kubernetes), so no copy is made here."""
    store = engine.storage
    staging = engine.settings.home / "staging" / entry_id
    out: list[StagedInput] = []
    for r in resolved:
        field = f"inputs.{r.spec.name}"
        files: list[StagedFile] = []
        for f in r.files:
            key = f.key
            if key is None and f.entry_id and f.artifact:
                manifest = await engine.archive.manifest(f.entry_id)
                if manifest is not None:
                    key = engine.archive.object_key(f.entry_id, f.artifact)
            url = await store.presign(key, PRESIGN_TTL_S) if key else None
            source: Path | None = None
            if key is not None:
                source = store.local_path(key)
            if source is None and not urls_only:
                source = staging / r.spec.name / f.path if f.path else staging / r.spec.name
                await _copy_here(engine, principal, store, f, key, source)
            if urls_only and url is None:
                raise InvalidInput(
                    f"input {r.spec.name!r}: this site downloads its inputs, and only an "
                    'S3 store ([storage] kind = "s3") hands out URLs for them',
                    field=field,
                )
            files.append(
                StagedFile(
                    path=f.path,
                    size=f.size,
                    source=None if urls_only or source is None else str(source),
                    url=url,
                )
            )
        out.append(StagedInput(name=r.spec.name, kind=r.spec.kind, files=files))
    return out


async def _copy_here(
    engine: Engine,
    principal: Principal,
    store: ObjectStore,
    f: _File,
    key: str | None,
    target: Path,
) -> None:
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    with target.open("wb") as out:
        if key is not None:
            async for data in read_chunks(store, key, f.size):
                await asyncio.to_thread(out.write, data)
            return
        assert f.entry_id is not None and f.artifact is not None
        offset = 0
        while True:
            _, chunk = await engine.read_artifact(
                principal, f.entry_id, f.artifact, offset, MAX_ARTIFACT_READ
            )
            if not chunk.data:
                return
            await asyncio.to_thread(out.write, chunk.data)
            offset = chunk.next_offset


def drop_staging(engine: Engine, entry_id: str) -> None:
    shutil.rmtree(engine.settings.home / "staging" / entry_id, ignore_errors=True)
