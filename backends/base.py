"""What every backend shares below the supervisor: the job contract's file layout (`WorkDir`),
its readers, site options and `tell`. The contract types (LaunchSpec, Reporter, Backend, the
log and result types) live in ground.contract and are re-exported here.

Backends never touch the store. They are told what to run (`LaunchSpec`), and they report what
happens through `Reporter`; the engine persists each report before it announces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from ground.config import DEFAULT_MAX_RESULT_BYTES as DEFAULT_MAX_RESULT_BYTES
from ground.contract import (
    INPUTS_DIR,
    MAX_RECORD_BYTES,
    OVERSIZE_RESULT,
    PAGE_BYTES,
    PAGE_RECORDS,
    ArtifactChunk,
    ArtifactStat,
    Backend,
    HealthSpec,
    LaunchSpec,
    LogChunk,
    Outcome,
    Reporter,
    ResultData,
    StagedInput,
    omitted_record,
    whole_utf8,
)
from ground.errors import InvalidInput, NotFound, invalid_input

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("sciorch.backends")


def site_options(model: type[M], site: str, options: Mapping[str, Any]) -> M:
    """A site's backend settings, validated; errors name the field as `sites.<site>.<key>`."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise invalid_input(exc, where=f"site {site!r}", field_prefix=f"sites.{site}.") from exc


async def tell(
    reporter: Reporter | None, entry_id: str, method: str, *args: Any, **kw: Any
) -> None:
    """Call the reporter; its failure is logged, never raised into the backend's own work
    (a watch or a flush must go on for the other entries)."""
    if reporter is None:
        return
    try:
        await getattr(reporter, method)(entry_id, *args, **kw)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("reporter.%s for %s failed", method, entry_id)


@dataclass(frozen=True)
class WorkDir:
    """The job contract's files for one entry, on whatever filesystem the job sees.

    params.json   parameters ($SCIORCH_PARAMS)
    result.json   final result, a JSON object ($SCIORCH_RESULT)
    stream.jsonl  intermediate results, one JSON object a line ($SCIORCH_STREAM)
    output/       files ($SCIORCH_OUTPUT_DIR)
    log           stdout and stderr together
    exit.json     written by the wrapper when the command ends
    """

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def stream(self) -> Path:
        return self.root / "stream.jsonl"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def exit(self) -> Path:
        return self.root / "exit.json"

    @property
    def inputs(self) -> Path:
        return self.root / INPUTS_DIR

    def prepare(self, parameters: Mapping[str, Any], inputs: Sequence[StagedInput] = ()) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        self.stage_inputs(inputs)
        tmp = self.params.with_suffix(".tmp")
        tmp.write_text(json.dumps(parameters))
        os.replace(tmp, self.params)

    def stage_inputs(self, inputs: Sequence[StagedInput]) -> None:
        """Copy each input's files to inputs/<name>[/<path>] (blocking). The engine checked
        the names and paths; they are checked again here, where they become paths."""
        for staged in inputs:
            for f in staged.files:
                rel = PurePosixPath(staged.name, f.path) if f.path else PurePosixPath(staged.name)
                if rel.is_absolute() or ".." in rel.parts or len(rel.parts) > 64:
                    raise InvalidInput(
                        f"input path {rel} leads out of the work dir", field=f"inputs.{staged.name}"
                    )
                if f.source is None:
                    raise InvalidInput(
                        "this site copies inputs from files the server can read; "
                        f"{staged.name} has none",
                        field=f"inputs.{staged.name}",
                    )
                target = self.inputs / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f.source, target)
            if staged.kind == "directory":
                (self.inputs / staged.name).mkdir(parents=True, exist_ok=True)

    def contract_env(self) -> dict[str, str]:
        return {
            "SCIORCH_PARAMS": str(self.params),
            "SCIORCH_RESULT": str(self.result),
            "SCIORCH_RESULTS": str(self.result),
            "SCIORCH_STREAM": str(self.stream),
            "SCIORCH_OUTPUT_DIR": str(self.output),
            "SCIORCH_WORKDIR": str(self.root),
            "SCIORCH_INPUTS": str(self.inputs),
        }

    def read_logs(self, offset: int, limit: int) -> LogChunk:
        try:
            size = self.log.stat().st_size
        except FileNotFoundError:
            return LogChunk(data="", offset=offset, next_offset=offset, size=0)
        offset = max(0, min(offset, size))
        with self.log.open("rb") as f:
            f.seek(offset)
            raw = f.read(limit)
        if len(raw) == limit:
            raw = whole_utf8(raw)
        return LogChunk(
            data=raw.decode("utf-8", errors="replace"),
            offset=offset,
            next_offset=offset + len(raw),
            size=size,
        )

    def read_results(
        self, since_record: int, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    ) -> ResultData:
        result: dict[str, Any] | None = None
        size = file_size(self.result)
        if size > max_result_bytes:
            self._keep_result_as_artifact()
        elif self.result.exists():
            try:
                loaded = json.loads(self.result.read_text() or "null")
                result = loaded if isinstance(loaded, dict) else {"value": loaded}
            except json.JSONDecodeError as exc:
                result = {"error": f"result file is not valid JSON: {exc}"}
        records, more = read_stream(self.stream, since_record)
        artifacts = [rel for rel, _ in self._artifact_files()]
        return ResultData(
            result=result,
            result_bytes=size,
            records=records,
            next_record=since_record + len(records),
            more_records=more,
            artifacts=artifacts,
        )

    def _keep_result_as_artifact(self) -> None:
        """A hard link (a copy where links fail) of the result in output/: no byte of it is
        read here, and the file the job wrote stays where it was."""
        target = self.output / OVERSIZE_RESULT
        try:
            if os.path.samefile(self.result, target):
                return
        except OSError:
            pass
        self.output.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (OVERSIZE_RESULT + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.result, tmp)
        except OSError:
            shutil.copyfile(self.result, tmp)
        os.replace(tmp, target)

    # Reads larger than this go to a thread rather than hold up the event loop.
    BIG_READ = 1 << 20

    async def read_logs_async(self, offset: int, limit: int) -> LogChunk:
        if limit > self.BIG_READ:
            return await asyncio.to_thread(self.read_logs, offset, limit)
        return self.read_logs(offset, limit)

    async def read_results_async(
        self, since_record: int, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    ) -> ResultData:
        if file_size(self.stream) + file_size(self.result) > self.BIG_READ:
            return await asyncio.to_thread(self.read_results, since_record, max_result_bytes)
        return self.read_results(since_record, max_result_bytes)

    def artifact_file(self, path: str) -> Path:
        """output/`path`, refused (naming `path`) when it would lead out of output/."""
        pure = PurePosixPath(path)
        if not path or "\0" in path or "\\" in path or pure.is_absolute():
            raise InvalidInput(
                f"path must be a relative path under the entry's output directory, got {path!r}",
                field="path",
            )
        if ".." in pure.parts:
            raise InvalidInput(f"path must not contain '..', got {path!r}", field="path")
        root = self.output.resolve()
        target = (root / pure).resolve()
        if not target.is_relative_to(root):
            raise InvalidInput(
                f"path {path!r} leads out of the entry's output directory", field="path"
            )
        if not target.is_file():
            raise NotFound(f"no artifact {path!r} in this entry's output", field="path")
        return target

    def _artifact_files(self) -> Iterator[tuple[str, Path]]:
        """(path relative to output/, the file) for every regular file under output/, in
        order; symlinks that lead out of it are left out."""
        root = self.output.resolve()
        if not root.is_dir():
            return
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                real = (Path(folder) / name).resolve()
                if real.is_relative_to(root) and real.is_file():
                    yield (Path(folder) / name).relative_to(root).as_posix(), real

    def list_artifacts(self) -> list[ArtifactStat]:
        """The artifacts with size and checksum. Blocking (hashes files): call it in a thread."""
        out: list[ArtifactStat] = []
        for rel, real in self._artifact_files():
            digest, st = _sha256(real)
            out.append(ArtifactStat(path=rel, size=st.st_size, mtime=st.st_mtime, sha256=digest))
        return out

    def read_artifact(self, path: str, offset: int, limit: int) -> ArtifactChunk:
        """Blocking: call it in a thread."""
        target = self.artifact_file(path)
        with target.open("rb") as f:
            st = os.fstat(f.fileno())
            offset = max(0, min(offset, st.st_size))
            f.seek(offset)
            data = f.read(limit)
        return ArtifactChunk(
            path=path,
            data=data,
            offset=offset,
            next_offset=offset + len(data),
            size=max(st.st_size, offset + len(data)),
            mtime=st.st_mtime,
        )

    def read_outcome(self) -> Outcome | None:
        try:
            return Outcome.model_validate_json(self.exit.read_text())
        except (FileNotFoundError, ValueError):
            return None


_CHUNK = 1 << 16


def _lines(f: IO[bytes], max_line: int) -> Iterator[tuple[bytes | None, int]]:
    """Complete lines from f's position, read a chunk at a time: (the line, or None when it is
    longer than `max_line` and so was never held whole; its length with the newline). The part
    after the last newline is not complete yet and is not yielded."""
    pending = bytearray()
    dropped = 0  # bytes seen of the current line, once it is too long to keep
    while chunk := f.read(_CHUNK):
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:nl]
            n = dropped + len(pending) + len(piece)
            yield (None if dropped or n > max_line else bytes(pending + piece)), n + 1
            pending.clear()
            dropped = 0
            start = nl + 1
        rest = chunk[start:]
        if dropped or len(pending) + len(rest) > max_line:
            dropped += len(pending) + len(rest)
            pending.clear()
        else:
            pending += rest


def _record(line: bytes | None, size: int) -> dict[str, Any]:
    """A stream line as a record: a JSON object as is, another JSON value as {"value": v}, a
    line that is not JSON as {"raw": line}, a line over the cap as `omitted_record`."""
    if line is None:
        return omitted_record(size - 1)
    text = line.decode("utf-8", errors="replace")
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        rec = {"raw": text}
    return rec if isinstance(rec, dict) else {"value": rec}


def read_stream(
    path: Path, since_record: int, limit: int = PAGE_RECORDS, max_bytes: int = PAGE_BYTES
) -> tuple[list[dict[str, Any]], bool]:
    """A page of records from record `since_record` on: at most `limit` records and (past the
    first) `max_bytes` of lines; and whether more complete records follow."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return [], False
    with f:
        lines = _lines(f, MAX_RECORD_BYTES)
        for _ in zip(range(since_record), lines, strict=False):
            pass
        out: list[dict[str, Any]] = []
        used = 0
        for line, n in lines:
            if out and (len(out) >= limit or used + n > max_bytes):
                return out, True
            out.append(_record(line, n))
            used += n
    return out, False


def read_new_records(
    path: Path, offset: int, max_bytes: int = PAGE_BYTES
) -> tuple[list[dict[str, Any]], int]:
    """A page (`max_bytes` of lines, at least one line) of the complete JSON lines of a stream
    file from byte `offset` on, and the offset after them; parsed like `read_stream`. A
    half-written last line waits for the next call."""
    try:
        f = path.open("rb")
    except OSError:
        return [], offset
    out: list[dict[str, Any]] = []
    used = 0
    with f:
        f.seek(offset)
        for line, n in _lines(f, MAX_RECORD_BYTES):
            out.append(_record(line, n))
            used += n
            if used >= max_bytes or len(out) >= PAGE_RECORDS:
                break
    return out, offset + used


@dataclass
class ContractTail:
    """How much of a work dir's log and stream has been reported, so each byte of log growth
    and each stream record is reported once, in order."""

    log_size: int = 0
    stream_offset: int = 0
    stream_index: int = 0

    def skip_existing(self, wd: WorkDir) -> None:
        """On adopt: what is already written counts as reported; only growth is new."""
        self.log_size = file_size(wd.log)
        self.stream_offset = self.stream_index = 0
        try:
            f = wd.stream.open("rb")
        except OSError:
            return
        with f:
            for _, n in _lines(f, 0):  # counted, never held
                self.stream_offset += n
                self.stream_index += 1

    async def report(self, reporter: Reporter | None, entry_id: str, wd: WorkDir) -> None:
        """Tell the reporter what is new: the log's size if it grew, then each new record,
        a page at a time (a big stream is never held whole)."""
        grown, records = self.news(wd)
        if grown is not None:
            await tell(reporter, entry_id, "log_grew", grown)
        while records:
            for index, record in records:
                await tell(reporter, entry_id, "stream_record", index, record)
            records = self.next_records(wd)

    def news(self, wd: WorkDir) -> tuple[int | None, list[tuple[int, dict[str, Any]]]]:
        """(the log's new size, or None if it did not grow; the first page of new records with
        their index; `next_records` gives the pages after it)."""
        size = file_size(wd.log)
        grown = None
        if size > self.log_size:
            self.log_size = grown = size
        return grown, self.next_records(wd)

    def next_records(self, wd: WorkDir) -> list[tuple[int, dict[str, Any]]]:
        records, self.stream_offset = read_new_records(wd.stream, self.stream_offset)
        start = self.stream_index
        self.stream_index += len(records)
        return list(enumerate(records, start))


# Artifact checksums by (file, size, mtime): a file is hashed once, again only after it changed.
_DIGESTS: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_DIGESTS_KEPT = 4096


def _sha256(path: Path) -> tuple[str, os.stat_result]:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if (known := _DIGESTS.get(key)) is not None:
        _DIGESTS.move_to_end(key)
        return known, st
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        after = os.fstat(f.fileno())
    digest = h.hexdigest()
    # A file still being written is hashed again next time rather than remembered wrongly.
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        _DIGESTS[key] = digest
        if len(_DIGESTS) > _DIGESTS_KEPT:
            _DIGESTS.popitem(last=False)
    return digest, after


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = [
    "Backend",
    "ContractTail",
    "HealthSpec",
    "LaunchSpec",
    "LogChunk",
    "Outcome",
    "Reporter",
    "ResultData",
    "WorkDir",
    "file_size",
    "read_new_records",
    "read_stream",
    "site_options",
    "tell",
]
