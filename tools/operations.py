"""The typed operations: plain async functions, pydantic in and out. The MCP server, the CLI and
tests call these; they know nothing of MCP or of backends."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from ground.contract import whole_utf8
from ground.errors import InvalidInput
from ground.models import Entry, EntryState, Message, Principal, Role, ServiceKind
from orchestrator import deadlines
from orchestrator.accounts import with_accounts
from orchestrator.engine import Engine
from orchestrator.results import TIME_SORTS, ResultSearch
from orchestrator.results_query import parse_field, parse_query
from tools.models import (
    IMAGE_TYPES,
    ArtifactContent,
    ArtifactView,
    CreateEventInput,
    EntryPage,
    EntryRef,
    EntrySummary,
    EntryView,
    EventList,
    EventRef,
    EventView,
    LaunchServiceInput,
    ListEntriesInput,
    LogsChunk,
    ReadArtifactInput,
    ReadLogsInput,
    ReadResultsInput,
    ResultPage,
    ResultRowView,
    Results,
    SearchResultsInput,
    ServiceList,
    ShareEventInput,
    SiteList,
    StreamAccess,
    StreamAccessInput,
    SubmitJobInput,
    UploadInput,
    UploadView,
    WaitEntryInput,
    WaitResult,
    artifact_uri,
    is_text,
    mime_type_of,
)

OnMessage = Callable[[Message], Awaitable[None]]


def _view(engine: Engine, principal: Principal, entry: Entry) -> EntryView:
    token = engine.access_token(principal, entry.id) if entry.url else None
    return EntryView.of(entry, token)


async def _full_view(engine: Engine, principal: Principal, entry: Entry) -> EntryView:
    """The view with the entry's group members (the caller may see the entry, so its event)."""
    token = engine.access_token(principal, entry.id) if entry.url else None
    return EntryView.of(entry, token, await engine.groups.members(entry))


async def list_services(engine: Engine, principal: Principal) -> ServiceList:
    return ServiceList(services=engine.list_services())


async def list_sites(engine: Engine, principal: Principal) -> SiteList:
    return SiteList(sites=await with_accounts(engine, principal, await engine.list_sites()))


async def create_event(engine: Engine, principal: Principal, req: CreateEventInput) -> EventView:
    if (req.webhook_url is None) != (req.webhook_secret is None):
        raise InvalidInput("webhook_url and webhook_secret go together", field="webhook_secret")
    event = await engine.create_event(
        principal,
        req.name,
        req.site,
        req.ttl_seconds,
        retention_days=req.retention_days,
        reservation=req.reservation,
        webhook_url=req.webhook_url,
    )
    if req.webhook_secret is not None:
        await deadlines.set_webhook_secret(engine, event.id, req.webhook_secret)
    return EventView.of(event)


async def list_events(engine: Engine, principal: Principal) -> EventList:
    return EventList(events=[EventView.of(e) for e in await engine.list_events(principal)])


async def stop_event(engine: Engine, principal: Principal, req: EventRef) -> EventView:
    return EventView.of(await engine.stop_event(principal, req.event_id))


async def share_event(engine: Engine, principal: Principal, req: ShareEventInput) -> EventView:
    role = None if req.role == "none" else Role(req.role)
    return EventView.of(await engine.share_event(principal, req.event_id, req.principal, role))


async def launch_service(
    engine: Engine, principal: Principal, req: LaunchServiceInput
) -> EntryView:
    return await _launch(engine, principal, req, "service")


async def submit_job(engine: Engine, principal: Principal, req: SubmitJobInput) -> EntryView:
    return await _launch(engine, principal, req, "job", req.idempotency_key)


async def _launch(
    engine: Engine,
    principal: Principal,
    req: LaunchServiceInput | SubmitJobInput,
    kind: ServiceKind,
    idempotency_key: str | None = None,
) -> EntryView:
    entry = await engine.launch(
        principal,
        req.service,
        req.parameters,
        event_id=req.event_id,
        site=req.site,
        resources=req.resources,
        idempotency_key=idempotency_key,
        kind=kind,
        inputs=req.inputs,
        priority=req.priority,
    )
    return await _full_view(engine, principal, entry)


async def get_entry(engine: Engine, principal: Principal, req: EntryRef) -> EntryView:
    return await _full_view(engine, principal, await engine.get_entry(principal, req.entry_id))


async def list_entries(engine: Engine, principal: Principal, req: ListEntriesInput) -> EntryPage:
    entries, cursor = await engine.list_entries(
        principal, req.event_id, req.states, req.service, req.limit, req.cursor
    )
    return EntryPage(
        entries=[EntrySummary.of(_view(engine, principal, e)) for e in entries],
        next_cursor=cursor,
    )


async def wait_entry(
    engine: Engine, principal: Principal, req: WaitEntryInput, on_message: OnMessage | None = None
) -> WaitResult:
    entry, timed_out = await engine.wait_entry(
        principal, req.entry_id, req.timeout_seconds, on_message, req.until
    )
    return WaitResult(entry=await _full_view(engine, principal, entry), timed_out=timed_out)


async def read_logs(engine: Engine, principal: Principal, req: ReadLogsInput) -> LogsChunk:
    chunk = await engine.read_logs(principal, req.entry_id, req.offset, req.limit)
    entry = await engine.get_entry(principal, req.entry_id)
    return LogsChunk(
        entry_id=req.entry_id,
        data=chunk.data,
        offset=chunk.offset,
        next_offset=chunk.next_offset,
        size=chunk.size,
        complete=entry.state.terminal and chunk.next_offset >= chunk.size,
    )


async def read_results(engine: Engine, principal: Principal, req: ReadResultsInput) -> Results:
    entry, data = await engine.read_results(principal, req.entry_id, req.since_record, req.limit)
    return Results(
        entry_id=entry.id,
        state=entry.state,
        result=data.result,
        records=data.records,
        next_record=data.next_record,
        more_records=data.more_records,
        artifacts=await _artifacts(engine, principal, entry.id, data.artifacts),
    )


async def _artifacts(
    engine: Engine, principal: Principal, entry_id: str, names: list[str]
) -> list[ArtifactView]:
    """The files this server can read, with size and checksum, then those only named by the
    site (a Kubernetes volume's, for instance)."""
    stats = {s.path: s for s in await engine.list_artifacts(principal, entry_id)}
    url = engine.settings.public_url
    paths = sorted(stats.keys() | set(names))
    return [ArtifactView.of(entry_id, url, p, stats.get(p)) for p in paths]


async def read_artifact(
    engine: Engine, principal: Principal, req: ReadArtifactInput
) -> ArtifactContent:
    _, chunk = await engine.read_artifact(principal, req.entry_id, req.path, req.offset, req.limit)
    mime = mime_type_of(req.path)
    eof = chunk.next_offset >= chunk.size
    raw = chunk.data
    if is_text(mime):
        raw = raw if eof else whole_utf8(raw)
        encoding, data = "text", raw.decode("utf-8", errors="replace")
    else:
        data = base64.b64encode(raw).decode("ascii")
        # An image a model can look at is a whole one; a range of it is only bytes.
        whole = chunk.offset == 0 and eof
        encoding = "image" if mime in IMAGE_TYPES and whole else "base64"
    next_offset = chunk.offset + len(raw)
    return ArtifactContent(
        entry_id=req.entry_id,
        path=req.path,
        uri=artifact_uri(req.entry_id, req.path),
        mime_type=mime,
        size=chunk.size,
        offset=chunk.offset,
        next_offset=next_offset,
        eof=next_offset >= chunk.size,
        encoding=encoding,
        data=data,
    )


async def cancel_entry(engine: Engine, principal: Principal, req: EntryRef) -> EntryView:
    return _view(engine, principal, await engine.cancel(principal, req.entry_id))


async def search_results(
    engine: Engine, principal: Principal, req: SearchResultsInput
) -> ResultPage:
    """A page of the results catalogue: only entries of events the caller may see."""
    if req.event_id is not None:
        await engine.get_event(principal, req.event_id)  # refuses an event not visible
    search = ResultSearch(
        where=parse_query(req.query, "query"),
        service=req.service,
        event_id=req.event_id,
        campaign_id=req.campaign_id,
        states=[s.value for s in req.states or [EntryState.SUCCEEDED]],
        finished_after=req.finished_after,
        finished_before=req.finished_before,
        sort=req.sort if req.sort in TIME_SORTS else parse_field(req.sort, "sort"),
        descending=req.order == "desc",
        limit=req.limit,
        cursor=req.cursor,
    )
    rows, cursor = await engine.results.search(None if principal.admin else principal.id, search)
    url = engine.settings.public_url
    return ResultPage(
        rows=[
            ResultRowView(
                **{k: v for k, v in vars(r).items() if k != "artifacts"},
                artifacts=[ArtifactView.of(r.entry_id, url, a.path, a) for a in r.artifacts],
            )
            for r in rows
        ],
        next_cursor=cursor,
    )


async def stream_access(
    engine: Engine, principal: Principal, req: StreamAccessInput
) -> StreamAccess:
    """Where the entry's stream records are, and a credential that may only read them."""
    entry = await engine.get_entry(principal, req.entry_id)
    if engine.data_plane is None:
        return StreamAccess(entry_id=entry.id, plane="control")
    grant = await engine.data_plane.grant(entry.id, "reader", req.ttl_seconds)
    return StreamAccess(
        entry_id=entry.id,
        plane="redis",
        host=grant.host,
        port=grant.port,
        stream=grant.stream,
        username=grant.username,
        password=grant.password,
        url=grant.url(),
        expires_at=datetime.fromtimestamp(grant.expires_at, UTC),
    )


async def upload_input(engine: Engine, principal: Principal, req: UploadInput) -> UploadView:
    up = await engine.uploads.put_small(principal, req.name, req.data())
    return UploadView(**up.model_dump(include=set(UploadView.model_fields) - {"uri"}), uri=up.uri)
