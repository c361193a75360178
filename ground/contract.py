"""The backend contract: what the engine and a backend say to each other, and nothing else.

`LaunchSpec` is what to run, `Reporter` is how a backend talks back (each call is persisted
before it returns), `Backend` is what the engine may ask of a site, and `LogChunk` and
`ResultData` are what reads return. These types import no backend and no engine, so they can
sit in the layer every other layer shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from ground.config import DEFAULT_MAX_RESULT_BYTES
from ground.models import AccountUsage, Capabilities, EntryState, Resources, ServiceKind, SiteStatus


class HealthSpec(BaseModel):
    path: str = "/"
    timeout_s: float = 60
    interval_s: float = 0.2


class StagedFile(BaseModel):
    """One file of an input, where a site can get it: `source` a file this server can read
    (copied into the work dir), `url` one the job's side can download (a presigned URL)."""

    path: str = Field(description="relative to inputs/<name> ('' for a file input)")
    size: int
    source: str | None = None
    url: str | None = None


class StagedInput(BaseModel):
    """An input the engine has checked: the backend puts it at inputs/<name> before starting."""

    name: str
    kind: Literal["file", "directory"]
    files: list[StagedFile]


INPUTS_DIR = "inputs"


class OutputUpload(BaseModel):
    """How a job's side hands its output files to the site's object storage (a site whose
    files this server cannot read, `Backend.uploads_outputs`): POST each file as a form to
    `url` with `fields`, a `key` that starts with `key_prefix` (the file's path under output/
    after it), and the file last. The store refuses other keys, bigger files and late ones."""

    url: str
    fields: dict[str, str]
    key_prefix: str
    expires_at: float


class LaunchSpec(BaseModel):
    """Everything a backend needs to run one entry; scheduler details stay inside the backend."""

    entry_id: str
    event_id: str
    service: str
    kind: ServiceKind
    argv: list[str] = Field(description="command with every placeholder already filled")
    parameters: dict[str, Any]
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources
    health: HealthSpec | None = None
    restart_policy: str = "never"
    max_restarts: int = 0
    base_path: str = Field(description="URL prefix the proxy serves this entry under")
    image: str | None = None
    priority: Literal["normal", "urgent"] = Field(
        "normal", description="urgent: time-sensitive work (a scheduler may use a higher QoS)"
    )
    account: str | None = Field(
        None, description="the site account it runs as (ground.accounts); None: the server's"
    )
    inputs: list[StagedInput] = Field(default_factory=list)
    # A sweep element: one entry of a sweep (orchestrator.sweeps). A backend with a native array
    # runs the sweep's elements as one (ArrayBackend); others bound the sweep's running elements
    # to sweep_throttle.
    sweep_id: str | None = None
    sweep_index: int | None = None
    sweep_throttle: int | None = None
    reservation: str | None = Field(None, description="the event's Slurm reservation, if any")
    outputs: OutputUpload | None = Field(
        None, description="where the job hands its output files (uploads_outputs sites)"
    )


class Outcome(BaseModel):
    """How a finished process ended, as its wrapper recorded it."""

    exit_code: int | None = None
    signal: int | None = None
    finished_at: float | None = None


class LogChunk(BaseModel):
    data: str
    offset: int
    next_offset: int
    size: int


class ResultData(BaseModel):
    result: dict[str, Any] | None = Field(None, description="None too when it is over the cap")
    result_bytes: int = Field(0, description="size of the result file (0: none)")
    records: list[dict[str, Any]] = Field(default_factory=list)
    next_record: int = 0
    more_records: bool = Field(False, description="records after this page are waiting")
    artifacts: list[str] = Field(default_factory=list)


class ArtifactStat(BaseModel):
    """A file under the entry's output/ as the site sees it now."""

    path: str = Field(description="relative to output/, '/'-separated")
    size: int
    mtime: float
    sha256: str


class ArtifactChunk(BaseModel):
    """A byte range of one artifact; `size` is the whole file's, `next_offset == size` at EOF."""

    path: str
    data: bytes
    offset: int
    next_offset: int
    size: int
    mtime: float


@runtime_checkable
class Reporter(Protocol):
    """The engine's side of the conversation. Each call is persisted before it returns."""

    async def transition(
        self,
        entry_id: str,
        state: EntryState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        handle: Mapping[str, Any] | None = None,
        endpoint: str | None = None,
        restarts: int | None = None,
    ) -> None: ...

    async def log_grew(self, entry_id: str, size: int) -> None: ...

    async def stream_record(self, entry_id: str, index: int, record: dict[str, Any]) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """One site's backend. All methods are async and must not block the event loop.

    Optional class attributes (read with getattr): `stages_from_urls`, inputs reach the job
    by URL, not as server files; `uploads_outputs`, the job's output files stay out of this
    server's reach, so the engine gives its jobs an `OutputUpload` (LaunchSpec.outputs) where
    the storage makes one and keeps what they uploaded when they end."""

    name: str
    kind: str

    async def start(self, reporter: Reporter) -> None:
        """Connect; called once before anything else."""

    async def close(self) -> None:
        """Stop watching. Running work is left running (the server may be restarting)."""

    async def shutdown_all(self, timeout_s: float = 5.0) -> None:
        """Stop everything this backend runs (each entry reports its final state, bounded by
        timeout_s), then close. For tests and for an operator who wants nothing left behind."""

    async def release_event(self, event_id: str) -> None:
        """Called after an event has stopped or expired and its entries were asked to stop:
        free what the backend holds for the event as a whole (the kubernetes backend deletes
        the event's namespace; most backends hold nothing). Idempotent."""

    async def capabilities(self) -> Capabilities: ...

    async def status(self) -> tuple[SiteStatus, str | None]: ...

    async def estimate_wait(self, resources: Resources) -> float:
        """Seconds until an entry with these resources would start, best estimate."""

    async def submit(self, spec: LaunchSpec) -> None:
        """Queue or start the entry. Transitions arrive through the reporter, beginning with
        the first one after `pending`. Returns once the backend has taken responsibility."""

    async def cancel(self, entry_id: str, handle: Mapping[str, Any]) -> None:
        """Stop it; the final `cancelled` arrives through the reporter. Idempotent."""

    async def adopt(
        self, entry_id: str, state: EntryState, handle: Mapping[str, Any], spec: LaunchSpec
    ) -> None:
        """After a server restart: re-attach to an entry that was active, or report its true
        final state (reporting `failed` with a reason when the truth cannot be known)."""

    async def read_logs(
        self, entry_id: str, handle: Mapping[str, Any], offset: int, limit: int
    ) -> LogChunk: ...

    async def read_results(
        self,
        entry_id: str,
        handle: Mapping[str, Any],
        since_record: int,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> ResultData: ...

    async def list_artifacts(self, entry_id: str, handle: Mapping[str, Any]) -> list[ArtifactStat]:
        """The files under output/ that this server can read, with size and checksum (a site
        that keeps them elsewhere lists none here; read_results still names them)."""

    async def read_artifact(
        self, entry_id: str, handle: Mapping[str, Any], path: str, offset: int, limit: int
    ) -> ArtifactChunk:
        """At most `limit` bytes of output/`path` from `offset`. A path that leaves output/
        (.., absolute, a symlink out) is refused with InvalidInput naming `path`; a missing
        file is NotFound naming `path`."""


@runtime_checkable
class ReportsAccounts(Protocol):
    """A backend that can tell a user's limits and usage (Slurm: the association)."""

    async def account_usage(self, account: str) -> AccountUsage | None: ...


@runtime_checkable
class ArrayBackend(Protocol):
    """A backend that runs a sweep's elements as one native array (a Slurm job array)."""

    async def submit_array(self, specs: list[LaunchSpec], throttle: int | None) -> None:
        """Queue every element as one array (at most `throttle` running at once); each
        element's transitions arrive through the reporter as for `submit`."""


@runtime_checkable
class ExtendableBackend(Protocol):
    """A backend that can lengthen a running entry's time limit."""

    async def extend(self, entry_id: str, handle: Mapping[str, Any], walltime_s: int) -> None:
        """Make the entry's whole walltime `walltime_s`; NotSupported when the site cannot."""


class BackendFactory(Protocol):
    """What a backend kind is registered as (entry point group `sciorch.backends`): called with
    the site's name, its own options from config and the directory for entries' files."""

    def __call__(self, name: str, options: dict[str, Any], entries_dir: Path) -> Backend: ...


# A page of stream records holds at most this many records and bytes; a record over
# MAX_RECORD_BYTES is replaced by `omitted_record`, so no page, bus message or progress
# notification carries a record whole however long the job's line is.
PAGE_RECORDS = 1000
PAGE_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 * 1024
# One read of an artifact returns at most this many bytes; bigger files are read in ranges.
MAX_ARTIFACT_READ = 1 << 20
# Where a result over the cap is kept, in output/, so it is listed and can still be fetched.
OVERSIZE_RESULT = "sciorch-result.json"


def whole_utf8(raw: bytes) -> bytes:
    """`raw` without a UTF-8 character cut in two at its end (a range read of text hands back
    whole characters only; the next range starts at the cut)."""
    cut = len(raw)
    for back in range(1, min(4, cut) + 1):
        b = raw[cut - back]
        if b & 0xC0 == 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4
            if back < need:
                cut -= back
            break
        if b & 0x80 == 0:
            break
    return raw[:cut]


def omitted_record(size: int) -> dict[str, Any]:
    """What stands in for a stream record over MAX_RECORD_BYTES."""
    return {
        "omitted": True,
        "bytes": size,
        "reason": f"record is {size} bytes; records over {MAX_RECORD_BYTES} bytes are not kept",
    }


__all__ = [
    "INPUTS_DIR",
    "MAX_ARTIFACT_READ",
    "MAX_RECORD_BYTES",
    "OVERSIZE_RESULT",
    "PAGE_BYTES",
    "PAGE_RECORDS",
    "ArrayBackend",
    "ArtifactChunk",
    "ArtifactStat",
    "Backend",
    "BackendFactory",
    "ExtendableBackend",
    "HealthSpec",
    "LaunchSpec",
    "LogChunk",
    "Outcome",
    "OutputUpload",
    "Reporter",
    "ReportsAccounts",
    "ResultData",
    "StagedFile",
    "StagedInput",
    "omitted_record",
    "whole_utf8",
]
