"""Inputs and outputs of the typed operations. These are the schemas agents see over MCP, so
field descriptions are written for them."""

from __future__ import annotations

import json
import mimetypes
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ground.compose import EntryGroup, group_of
from ground.contract import MAX_ARTIFACT_READ, ArtifactStat
from ground.errors import InvalidInput
from ground.models import (
    Entry,
    EntryState,
    Event,
    EventState,
    Int,
    Number,
    OptInt,
    OptNumber,
    ResourceRequest,
    Resources,
    ServiceKind,
    ServiceSummary,
    Site,
    Transition,
)

MAX_PARAMETERS_BYTES = 64 * 1024

EntryId = Field(
    description="entry id as returned by submit_job/launch_service, e.g. 'ent-1a2b3c4d5e6f'",
    min_length=1,
    max_length=64,
)
EventIdField = Field(description="event id, e.g. 'evt-1a2b3c4d5e6f'", min_length=1, max_length=64)


Priority = Literal["normal", "urgent"]
PriorityField: Any = Field(
    "normal",
    description="urgent: time-sensitive work, run ahead of normal work (a higher QoS on Slurm); "
    "allowed by policy only",
)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ inputs


class NoInput(_In):
    pass


class CreateEventInput(_In):
    name: str | None = Field(None, max_length=200, description="a label for the allocation")
    site: str | None = Field(
        None, min_length=1, max_length=64, description="pin all entries of this event to a site"
    )
    ttl_seconds: OptInt = Field(
        None, gt=0, le=366 * 86400, description="lifetime; entries are stopped when it ends"
    )
    retention_days: OptNumber = Field(
        None, gt=0, description="how long its jobs' artifacts are kept (default: for ever)"
    )
    reservation: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="a Slurm reservation the event's entries on Slurm run in",
    )
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://",
        description="warnings (walltime, TTL) are POSTed here, signed with webhook_secret",
    )
    webhook_secret: str | None = Field(
        None, min_length=16, max_length=200, description="HMAC-SHA256 key for the webhook"
    )


class EventRef(_In):
    event_id: str = EventIdField


class ShareEventInput(_In):
    event_id: str = EventIdField
    principal: str = Field(min_length=1, max_length=200, description="who to share with")
    role: Literal["viewer", "operator", "none"] = Field(
        "viewer", description="viewer reads; operator also launches and cancels; none revokes"
    )


class _LaunchInput(_In):
    service: str = Field(
        min_length=1, max_length=128, description="catalogue name, optionally name@version"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="values for the service's parameter schema"
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="event to launch into; default: your default event",
    )
    site: str | None = Field(
        None, min_length=1, max_length=64, description="run on this site; default: the router picks"
    )
    resources: ResourceRequest | None = Field(
        None, description="override the template's resources (cpus, memory_mb, gpus, ...)"
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="files for the template's declared inputs, name -> URI: an upload "
        "(sciorch://uploads/<id> from upload_input), another entry's artifact "
        "(sciorch://entries/<id>/artifacts/<path>, a trailing / for a directory) or an object "
        "in the server's store (s3://bucket/key); the job finds them under $SCIORCH_INPUTS/<name>",
    )
    priority: Priority = PriorityField

    @field_validator("parameters")
    @classmethod
    def _size(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v, default=str)) > MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters must be at most {MAX_PARAMETERS_BYTES} bytes as JSON")
        return v


class LaunchServiceInput(_LaunchInput):
    pass


class SubmitJobInput(_LaunchInput):
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="the same key returns the same entry instead of submitting twice",
    )


class EntryRef(_In):
    entry_id: str = EntryId


class ListEntriesInput(_In):
    event_id: str | None = Field(
        None, min_length=1, max_length=64, description="only entries of this event"
    )
    states: list[EntryState] | None = Field(
        None, max_length=8, description="only entries in one of these states"
    )
    service: str | None = Field(None, max_length=128, description="only this catalogue service")
    limit: Int = Field(50, ge=1, le=1000, description="entries per page at most")
    cursor: str | None = Field(None, max_length=512, description="next_cursor of the last page")


class WaitEntryInput(_In):
    entry_id: str = EntryId
    timeout_seconds: Number = Field(
        60, gt=0, le=86400, description="wait at most this long; then timed_out=true"
    )
    until: Literal["auto", "started", "ready", "finished"] = Field(
        "auto", description="auto: ready for services, finished for jobs; started: running"
    )


class ReadLogsInput(_In):
    entry_id: str = EntryId
    offset: Int = Field(0, ge=0, le=2**53, description="byte offset; pass next_offset to continue")
    limit: Int = Field(65536, ge=1, le=1_048_576, description="bytes at most")


class ReadResultsInput(_In):
    entry_id: str = EntryId
    since_record: Int = Field(
        0,
        ge=0,
        le=2**31,
        description="skip this many intermediate records; pass next_record to continue",
    )
    limit: Int = Field(100, ge=1, le=1000, description="records per page at most")


class ReadArtifactInput(_In):
    entry_id: str = EntryId
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="the artifact's path as read_results lists it (relative to the output dir)",
    )
    offset: Int = Field(0, ge=0, le=2**53, description="byte offset; pass next_offset to continue")
    limit: Int = Field(
        MAX_ARTIFACT_READ,
        ge=1,
        le=MAX_ARTIFACT_READ,
        description=f"bytes at most (at most {MAX_ARTIFACT_READ})",
    )


# ------------------------------------------------------------------ outputs


class _EntryFields(BaseModel):
    """What an entry view and an entry in a listing both show."""

    id: str
    event_id: str
    service: str
    version: str
    kind: ServiceKind
    site: str
    state: EntryState
    reason: str | None
    submitted_by: str
    parameters: dict[str, Any]
    resources: Resources
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    url: str | None = Field(None, description="the service's URL (needs access_url's token)")
    access_url: str | None = Field(None, description="URL with your access token; keep private")
    restarts: int
    group: EntryGroup | None = Field(
        None, description="its place in a composed service's group (null: launched alone)"
    )


class GroupMember(BaseModel):
    component: str
    index: int
    role: str = Field(description="main, before (a sidecar) or after (started once main is up)")
    entry_id: str
    state: EntryState
    reason: str | None
    url: str | None = Field(None, description="a service member's URL (get_entry for access)")

    @classmethod
    def of(cls, entry: Entry) -> GroupMember:
        group = group_of(entry.handle)
        assert group is not None
        return cls(
            component=group.component,
            index=group.index,
            role=group.role,
            entry_id=entry.id,
            state=entry.state,
            reason=entry.reason,
            url=entry.url,
        )


class EntryView(_EntryFields):
    result: dict[str, Any] | None
    backend_handle: dict[str, Any] = Field(default_factory=dict)
    transitions: list[Transition]
    members: list[GroupMember] = Field(
        default_factory=list, description="every entry of its group, itself included"
    )

    @classmethod
    def of(
        cls, entry: Entry, access_token: str | None = None, members: list[Entry] | None = None
    ) -> EntryView:
        data = entry.model_dump(exclude={"endpoint", "handle", "updated_at", "idempotency_key"})
        access_url = None
        if entry.url and access_token and not entry.state.terminal:
            access_url = f"{entry.url}?token={access_token}"
        return cls(
            **data,
            backend_handle=entry.handle,
            access_url=access_url,
            group=group_of(entry.handle),
            members=[GroupMember.of(m) for m in members or []],
        )


SUMMARY_RESULT_BYTES = 1024


class EntrySummary(_EntryFields):
    """An entry in a listing: no transitions or backend handle, and its result only when it
    is small (get_entry or read_results give the whole)."""

    result: dict[str, Any] | None = Field(
        description=f"the result when it is at most {SUMMARY_RESULT_BYTES} bytes as JSON"
    )
    result_bytes: int = Field(0, description="size of the result as JSON (0: none yet)")

    @classmethod
    def of(cls, view: EntryView) -> EntrySummary:
        data = view.model_dump(exclude={"result", "backend_handle", "transitions", "members"})
        size = len(json.dumps(view.result, default=str)) if view.result is not None else 0
        small = view.result if size <= SUMMARY_RESULT_BYTES else None
        return cls(**data, result=small, result_bytes=size)


class EntryPage(BaseModel):
    entries: list[EntrySummary]
    next_cursor: str | None = None


class WaitResult(BaseModel):
    entry: EntryView
    timed_out: bool = Field(description="true if the timeout passed before the entry got there")


class LogsChunk(BaseModel):
    entry_id: str
    data: str
    offset: int
    next_offset: int
    size: int
    complete: bool = Field(description="the entry has finished and every byte has been read")


# Types read as text although they are not text/*.
_TEXT_TYPES = frozenset(
    {"application/json", "application/xml", "application/x-ndjson", "application/yaml"}
)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def mime_type_of(path: str) -> str:
    guessed = mimetypes.guess_type(path, strict=False)[0]
    if guessed is None and path.endswith((".jsonl", ".ndjson")):
        return "application/x-ndjson"
    return guessed or "application/octet-stream"


def is_text(mime_type: str) -> bool:
    return (
        mime_type.startswith("text/")
        or mime_type in _TEXT_TYPES
        or mime_type.endswith(("+json", "+xml"))
    )


def artifact_uri(entry_id: str, path: str) -> str:
    return f"sciorch://entries/{entry_id}/artifacts/{quote(path, safe='/')}"


def artifact_url(public_url: str, entry_id: str, path: str) -> str:
    return f"{public_url.rstrip('/')}/entries/{entry_id}/artifacts/{quote(path, safe='/')}"


class ArtifactView(BaseModel):
    path: str = Field(description="relative to the entry's output dir; read_artifact's path")
    uri: str = Field(description="the MCP resource with the file's contents")
    url: str = Field(description="HTTP download (bearer token as for /mcp; Range supported)")
    mime_type: str
    size: int | None = Field(description="bytes; null when the file stays on the site")
    sha256: str | None = Field(description="hex digest; null when the file stays on the site")

    @classmethod
    def of(
        cls, entry_id: str, public_url: str, path: str, stat: ArtifactStat | None
    ) -> ArtifactView:
        return cls(
            path=path,
            uri=artifact_uri(entry_id, path),
            url=artifact_url(public_url, entry_id, path),
            mime_type=mime_type_of(path),
            size=stat.size if stat else None,
            sha256=stat.sha256 if stat else None,
        )


class ArtifactContent(BaseModel):
    entry_id: str
    path: str
    uri: str
    mime_type: str
    size: int = Field(description="the whole file's size in bytes")
    offset: int
    next_offset: int = Field(description="offset for the next range; equals size at the end")
    eof: bool = Field(description="this range reaches the end of the file")
    encoding: Literal["text", "base64", "image"] = Field(
        description="text: data is the text; base64: data is the bytes in base64; image: the "
        "whole image comes as image content next to this (data is null)"
    )
    data: str | None = None


class Results(BaseModel):
    entry_id: str
    state: EntryState
    result: dict[str, Any] | None = Field(
        description="the final result; null until there is one, or when it was over the cap"
    )
    records: list[dict[str, Any]] = Field(
        description="a page of intermediate records; one over the record cap is replaced by "
        "{omitted: true, bytes, reason}"
    )
    next_record: int = Field(description="since_record for the next page")
    more_records: bool = Field(
        False, description="more records follow now: call again with since_record=next_record"
    )
    artifacts: list[ArtifactView] = Field(
        description="files in the entry's output dir (read_artifact, the uri or the url)"
    )


class EventView(BaseModel):
    id: str
    name: str
    owner: str
    site: str | None
    state: EventState
    created_at: datetime
    expires_at: datetime | None
    stopped_at: datetime | None
    shares: dict[str, str]
    default: bool
    reservation: str | None = None
    webhook_url: str | None = None

    @classmethod
    def of(cls, event: Event) -> EventView:
        return cls.model_validate(event.model_dump())


class EventList(BaseModel):
    events: list[EventView]


class ServiceList(BaseModel):
    services: list[ServiceSummary]


class SiteList(BaseModel):
    sites: list[Site]


# ------------------------------------------------------------------ results catalogue


def _iso_time(v: Any) -> Any:
    # pydantic would take a number as Unix time; a time here is ISO 8601, as it reads.
    if isinstance(v, int | float):
        raise ValueError("expected an ISO 8601 time such as 2026-06-01T12:00:00Z")
    return v


# In the type, not a model validator: the MCP tool validates each argument by its type.
IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]


class SearchResultsInput(_In):
    query: str = Field(
        "",
        max_length=4000,
        description='filter on parameter and result fields, e.g. surface = "branin" and '
        "value < 0.5; fields: parameters.x, result.x, or a bare x (the result's, else the "
        "parameter); = != < <= > >=, and, or, not, parentheses; values: numbers, quoted "
        "strings, true, false, null. Empty: every result",
    )
    service: str | None = Field(None, max_length=128, description="only this service")
    event_id: str | None = Field(None, min_length=1, max_length=64, description="only this event")
    campaign_id: str | None = Field(
        None, min_length=1, max_length=64, description="only evaluations of this campaign"
    )
    states: list[EntryState] | None = Field(
        None, min_length=1, max_length=8, description="final states (default: succeeded only)"
    )
    finished_after: IsoTime | None = Field(None, description="finished at or after (ISO 8601)")
    finished_before: IsoTime | None = Field(None, description="finished before (ISO 8601)")
    sort: str = Field(
        "finished_at",
        min_length=1,
        max_length=200,
        description="finished_at, started_at, created_at, or a numeric field such as value "
        "or result.loss (rows without a number there come last)",
    )
    order: Literal["asc", "desc"] = Field("desc", description="sort direction")
    limit: Int = Field(50, ge=1, le=1000, description="rows per page at most")
    cursor: str | None = Field(None, max_length=1024, description="next_cursor of the last page")
    format: Literal["rows", "csv"] = Field(
        "rows", description="csv: the page also comes as CSV text in `csv`, ready to save"
    )


class ResultRowView(BaseModel):
    entry_id: str
    event_id: str
    service: str
    version: str
    state: EntryState
    site: str
    submitted_by: str
    account: str | None = Field(description="the site account it ran as, where recorded")
    campaign_id: str | None = Field(description="the campaign that submitted it, if one did")
    evaluation: int | None = Field(description="the campaign's evaluation sequence number")
    template_sha256: str | None = Field(description="checksum of the service template")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime
    parameters: dict[str, Any]
    result: dict[str, Any] | None
    artifacts: list[ArtifactView]


RESULT_COLUMNS = [
    "entry_id", "service", "version", "state", "site", "event_id", "campaign_id", "evaluation",
    "submitted_by", "account", "template_sha256", "created_at", "started_at", "finished_at",
]  # fmt: skip


class ResultPage(BaseModel):
    rows: list[ResultRowView]
    next_cursor: str | None = Field(None, description="pass as cursor for the next page")
    csv: str | None = Field(None, description="the page as CSV (format=csv)")

    def table(self) -> tuple[list[str], list[dict[str, Any]]]:
        """The rows flat, for CSV and Parquet: the provenance columns, one `parameters.<k>`
        and one `result.<k>` column per key any row has, then the artifacts as JSON."""
        params = sorted({k for r in self.rows for k in r.parameters})
        results = sorted({k for r in self.rows for k in (r.result or {})})
        cols = [
            *RESULT_COLUMNS,
            *(f"parameters.{k}" for k in params),
            *(f"result.{k}" for k in results),
            "artifacts",
        ]
        out = []
        for r in self.rows:
            row: dict[str, Any] = r.model_dump(mode="json", include=set(RESULT_COLUMNS))
            row.update((f"parameters.{k}", r.parameters.get(k)) for k in params)
            row.update((f"result.{k}", (r.result or {}).get(k)) for k in results)
            row["artifacts"] = [a.model_dump(mode="json") for a in r.artifacts] or None
            out.append(row)
        return cols, out


# ------------------------------------------------------------------ stream data plane


class StreamAccessInput(_In):
    entry_id: str = EntryId
    ttl_seconds: Int = Field(600, ge=10, le=86400, description="the credential's lifetime")


class StreamAccess(BaseModel):
    entry_id: str
    plane: Literal["redis", "control"] = Field(
        description="redis: read the stream from Redis with this credential; control: no data "
        "plane is configured, records come through wait_entry and read_results"
    )
    host: str | None = None
    port: int | None = None
    stream: str | None = Field(None, description="the Redis stream key (XREAD, XRANGE)")
    username: str | None = None
    password: str | None = Field(None, description="keep private; it reads this stream only")
    url: str | None = Field(None, description="redis:// URL with the credential")
    expires_at: datetime | None = None


# ------------------------------------------------------------------ inputs (uploads)

# Bytes one upload_input call may carry; bigger files go over HTTP (POST /uploads). As base64
# they stay under the MCP server's cap on a call's arguments (256 KiB).
MAX_TOOL_UPLOAD = 128 << 10


class UploadInput(_In):
    name: str = Field(min_length=1, max_length=200, description="file name, e.g. 'sample.csv'")
    content: str = Field(description="the file's content: text, or base64 (see encoding)")
    encoding: Literal["text", "base64"] = Field(
        "text", description="text: content is the file as UTF-8; base64: its bytes, encoded"
    )

    def data(self) -> bytes:
        import base64
        import binascii

        if self.encoding == "text":
            try:
                data = self.content.encode()
            except UnicodeEncodeError as exc:
                raise InvalidInput(f"not valid text: {exc.reason}", field="content") from exc
        else:
            try:
                data = base64.b64decode(self.content, validate=True)
            except (binascii.Error, ValueError) as exc:  # ValueError: not even ASCII
                raise InvalidInput(f"not base64: {exc}", field="content") from exc
        if len(data) > MAX_TOOL_UPLOAD:
            raise InvalidInput(
                f"{len(data)} bytes; upload_input takes at most {MAX_TOOL_UPLOAD}: send bigger "
                "files over HTTP (POST /uploads, then PUT the bytes)",
                field="content",
            )
        return data


class UploadView(BaseModel):
    id: str
    uri: str = Field(description="pass it as an input: inputs={name: uri}")
    name: str
    size: int
    received: int = Field(description="bytes received so far (HTTP uploads)")
    complete: bool
    sha256: str | None = None
