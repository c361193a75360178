"""What every backend shares below the supervisor: the job contract's file layout (`WorkDir`),
its readers, site options and `tell`. The contract types (LaunchSpec, Reporter, Backend, the
log and result types) live in backends.contract and are re-exported here.

Backends never touch the store. They are told what to run (`LaunchSpec`), and they report what
happens through `Reporter`; the engine persists each report before it announces it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from backends.contract import (
    Backend,
    HealthSpec,
    LaunchSpec,
    LogChunk,
    Outcome,
    Reporter,
    ResultData,
)
from orchestrator.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("sciorch.backends")


def site_options(model: type[M], site: str, options: Mapping[str, Any]) -> M:
    """A site's backend settings, validated; errors name the field as `sites.<site>.<key>`."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(
            f"site {site!r}: {loc}: {err['msg']}", field=f"sites.{site}.{loc}"
        ) from exc


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


# ----------------------------------------------------------------------------- job contract


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

    def prepare(self, parameters: Mapping[str, Any]) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        tmp = self.params.with_suffix(".tmp")
        tmp.write_text(json.dumps(parameters))
        os.replace(tmp, self.params)

    def contract_env(self) -> dict[str, str]:
        return {
            "SCIORCH_PARAMS": str(self.params),
            "SCIORCH_RESULT": str(self.result),
            "SCIORCH_RESULTS": str(self.result),
            "SCIORCH_STREAM": str(self.stream),
            "SCIORCH_OUTPUT_DIR": str(self.output),
            "SCIORCH_WORKDIR": str(self.root),
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
        # Never cut a UTF-8 character in two: hand back only whole characters.
        cut = len(raw)
        if cut == limit:
            for back in range(1, min(4, cut) + 1):
                b = raw[cut - back]
                if b & 0xC0 == 0xC0:  # a lead byte: is its sequence complete?
                    need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4
                    if back < need:
                        cut -= back
                    break
                if b & 0x80 == 0:
                    break
        raw = raw[:cut]
        return LogChunk(
            data=raw.decode("utf-8", errors="replace"),
            offset=offset,
            next_offset=offset + len(raw),
            size=size,
        )

    def read_results(self, since_record: int) -> ResultData:
        result: dict[str, Any] | None = None
        if self.result.exists():
            try:
                loaded = json.loads(self.result.read_text() or "null")
                result = loaded if isinstance(loaded, dict) else {"value": loaded}
            except json.JSONDecodeError as exc:
                result = {"error": f"result file is not valid JSON: {exc}"}
        records = read_stream(self.stream, since_record)
        artifacts = (
            sorted(str(p.relative_to(self.output)) for p in self.output.rglob("*") if p.is_file())
            if self.output.exists()
            else []
        )
        return ResultData(
            result=result,
            records=records,
            next_record=since_record + len(records),
            artifacts=artifacts,
        )

    # Reads larger than this go to a thread rather than hold up the event loop.
    BIG_READ = 1 << 20

    async def read_logs_async(self, offset: int, limit: int) -> LogChunk:
        if limit > self.BIG_READ:
            return await asyncio.to_thread(self.read_logs, offset, limit)
        return self.read_logs(offset, limit)

    async def read_results_async(self, since_record: int) -> ResultData:
        if file_size(self.stream) + file_size(self.result) > self.BIG_READ:
            return await asyncio.to_thread(self.read_results, since_record)
        return self.read_results(since_record)

    def read_outcome(self) -> Outcome | None:
        try:
            return Outcome.model_validate_json(self.exit.read_text())
        except (FileNotFoundError, ValueError):
            return None


def read_stream(path: Path, since_record: int) -> list[dict[str, Any]]:
    """Complete JSON lines from `since_record` on; a half-written last line is left for later,
    a line that is not a JSON object becomes {"raw": line}."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the part after the last newline is not complete yet
    out: list[dict[str, Any]] = []
    for line in lines[since_record:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = {"raw": line}
        out.append(rec if isinstance(rec, dict) else {"value": rec})
    return out


def read_new_records(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of a stream file from byte `offset` on, and the offset after them;
    parsed and numbered like `read_stream`. A half-written last line waits for the next call."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            raw = f.read()
    except OSError:
        return [], offset
    end = raw.rfind(b"\n")
    if end < 0:
        return [], offset
    out: list[dict[str, Any]] = []
    for line in raw[:end].decode("utf-8", errors="replace").split("\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = {"raw": line}
        out.append(rec if isinstance(rec, dict) else {"value": rec})
    return out, offset + end + 1


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
        try:
            raw = wd.stream.read_bytes()
        except OSError:
            raw = b""
        end = raw.rfind(b"\n")
        self.stream_offset, self.stream_index = (end + 1, raw.count(b"\n")) if end >= 0 else (0, 0)

    async def report(self, reporter: Reporter | None, entry_id: str, wd: WorkDir) -> None:
        """Tell the reporter what is new: the log's size if it grew, then each new record."""
        grown, records = self.news(wd)
        if grown is not None:
            await tell(reporter, entry_id, "log_grew", grown)
        for index, record in records:
            await tell(reporter, entry_id, "stream_record", index, record)

    def news(self, wd: WorkDir) -> tuple[int | None, list[tuple[int, dict[str, Any]]]]:
        """(the log's new size, or None if it did not grow; the new records with their index)."""
        size = file_size(wd.log)
        grown = None
        if size > self.log_size:
            self.log_size = grown = size
        records, self.stream_offset = read_new_records(wd.stream, self.stream_offset)
        start = self.stream_index
        self.stream_index += len(records)
        return grown, list(enumerate(records, start))


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
