"""The engine: one entry state machine for every backend, authorisation by principal, routing,
reconciliation at start-up, event lifetimes. On a PostgreSQL store several engines (replicas)
may run at once; orchestrator.replicas decides which one drives each site.

Backends report through the `Reporter` methods (`transition`, `log_grew`, `stream_record`); a
transition is written to the store before it is published on the bus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt

from ground.accounts import account_for
from ground.compose import Member
from ground.config import Settings, load_settings
from ground.contract import (
    MAX_ARTIFACT_READ,
    MAX_RECORD_BYTES,
    OVERSIZE_RESULT,
    PAGE_RECORDS,
    ArtifactChunk,
    ArtifactStat,
    Backend,
    HealthSpec,
    LaunchSpec,
    LogChunk,
    ResultData,
    omitted_record,
)
from ground.errors import (
    Conflict,
    InvalidInput,
    LimitExceeded,
    NotAllowed,
    NotFound,
    SciorchError,
    reason_line,
)
from ground.models import (
    ACTIVE_STATES,
    ROLE_RANK,
    Entry,
    EntryState,
    Event,
    EventState,
    Message,
    Principal,
    ResourceRequest,
    Resources,
    Role,
    Service,
    ServiceSummary,
    Site,
    SiteStatus,
    can_transition,
)
from orchestrator.accounts import sites_for
from orchestrator.bus import Bus
from orchestrator.catalogue import Catalogue, resources_for, validate_parameters
from orchestrator.database import IntegrityError
from orchestrator.dataplane import RedisPlane
from orchestrator.deadlines import Warner
from orchestrator.groups import EXPORTS, HELD, Groups, held
from orchestrator.inputs import drop_staging, resolve_inputs, stage_inputs
from orchestrator.locks import try_lock
from orchestrator.registry import create_backend
from orchestrator.replicas import Replicas, new_replica_id, open_bus
from orchestrator.results import ResultsIndex
from orchestrator.routing import choose_site
from orchestrator.storage import open_store
from orchestrator.storage.artifacts import ArtifactArchive, ReadRange, upload_ttl_s
from orchestrator.storage.uploads import Uploads
from orchestrator.store import Store, now

log = logging.getLogger("sciorch.engine")

OnMessage = Callable[[Message], Awaitable[None]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _result_size(data: ResultData) -> int:
    """The result's size: its file's, or (a backend that does not say) its JSON's."""
    if data.result_bytes or data.result is None:
        return data.result_bytes
    return len(json.dumps(data.result, default=str))


def _membership(member: Member, entry_id: str) -> dict[str, Any]:
    group = member.group
    if not group.main_entry_id:  # the main member: its own id
        group = group.model_copy(update={"main_entry_id": entry_id})
    return group.model_dump()


class _Blank(dict[str, str]):
    """format_map values: unknown placeholders stay as they are for the backend to fill."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill_command(
    service: Service, params: Mapping[str, Any], values: Mapping[str, str]
) -> list[str]:
    mapping = _Blank({k: str(v) for k, v in params.items()})
    mapping.update(values)
    return [arg.format_map(mapping) for arg in service.command]


def public_origin(public_url: str) -> str:
    """scheme://host[:port] of the public URL: what a browser sends as Origin to the proxy."""
    parts = urlsplit(public_url)
    return f"{parts.scheme}://{parts.netloc}"


def health_spec(service: Service, base_path: str, entry_id: str) -> HealthSpec | None:
    """The health check with its path placeholders filled: a service that is not served with its
    prefix stripped answers its health check under the prefix too."""
    if service.health is None:
        return None
    path = service.health.path.format(base_path=base_path, entry_id=entry_id)
    # '{base_path}/health' reads naturally but base_path ends with '/' already.
    path = path.replace(base_path + "/", base_path, 1)
    return HealthSpec.model_validate({**service.health.model_dump(), "path": path})


# The key that signs entries' access tokens, made on first start in <home>/keys (replicas share
# it, so a URL one of them hands out is honoured by the others).
ENTRY_TOKEN_KEY = "entry-tokens.key"


def _signing_key(folder: Path) -> bytes:
    path = folder / ENTRY_TOKEN_KEY
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        try:
            tmp.rename(path) if not path.exists() else tmp.unlink()
        except FileNotFoundError:
            pass
    return path.read_bytes()


def _own_home(home: Path) -> int:
    """One engine process drives the backends of a home at a time: two would both adopt (and
    could both start) the same queued entries. The lock dies with the process, kill -9 included."""
    fd, holder = try_lock(home / "engine.lock")
    if fd is None:
        raise Conflict(
            f"another sciorch process (pid {holder}) is running on {home}; stop it, or talk to "
            "it through its MCP endpoint, or use another SCIORCH_HOME",
            field="SCIORCH_HOME",
        )
    return fd


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        catalogue: Catalogue,
        backends: dict[str, Backend],
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalogue = catalogue
        self.backends = backends
        self.bus = bus or Bus()
        self._key = _signing_key(settings.keys_dir)
        self._locks: dict[str, asyncio.Lock] = {}
        self._expiry_task: asyncio.Task[None] | None = None
        self._expiry_wake = asyncio.Event()
        self._started = False
        # What layers above close with the engine (a flow manager's store): run first, newest
        # first, so that nothing of theirs outlives it.
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self._lock_fd: int | None = None
        self.replicas: Replicas | None = None
        self.groups = Groups(self)
        self.results = ResultsIndex(store.database)
        self.data_plane = (
            RedisPlane(settings.data_plane, settings.data_plane_host)
            if settings.data_plane
            else None
        )
        self.storage = open_store(settings)
        self.archive = ArtifactArchive(self.storage, settings.storage.retention_days)
        self.uploads = Uploads(self.storage, store.database, settings.storage.max_upload_bytes)
        self.warner: Warner | None = None

    # ================================================================ lifecycle

    @classmethod
    async def open(cls, settings: Settings | None = None) -> Engine:
        settings = settings or load_settings()
        # On SQLite this process owns the home. On PostgreSQL replicas share it and leases in
        # the store say who drives what (orchestrator.replicas).
        lock_fd = None if settings.store_url else _own_home(settings.home)
        bus: Bus | None = None
        store: Store | None = None
        try:
            catalogue = Catalogue.load(settings.catalogue_dirs)
            backends = {s.name: create_backend(s, settings) for s in settings.sites}
            store = await Store.open(settings.store_url or settings.db_path)
            if settings.store_url:
                bus = await open_bus(settings.store_url, new_replica_id())
        except BaseException:
            if store is not None:
                await store.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        engine = cls(settings, store, catalogue, backends, bus)
        engine._lock_fd = lock_fd
        await engine.start()
        return engine

    async def start(self) -> None:
        for backend in self.backends.values():
            await backend.start(self)
        if self.settings.store_url:
            self.replicas = await Replicas.start(self)
        else:
            await self.reconcile()
            self._expiry_task = asyncio.create_task(self.expiry_loop(), name="sciorch-expiry")
            self.warner = Warner(self)
            self.warner.start()
        await self.groups.start()
        self._started = True

    async def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("closing %r with the engine failed", closer)
        self.closers.clear()
        if self.warner is not None:
            await self.warner.close()
        await self.groups.close()
        if self.replicas is not None:
            await self.replicas.close()
        if self._expiry_task:
            self._expiry_task.cancel()
            try:
                await self._expiry_task
            except asyncio.CancelledError:
                pass
        for backend in self.backends.values():
            await backend.close()
        if self.replicas is not None:
            await self.replicas.release()
        await self.bus.close()
        if self.data_plane is not None:
            await self.data_plane.close()
        await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def reconcile(self) -> None:
        """Entries that were active when the server stopped: re-adopt or record the truth."""
        for entry in await self.store.list_entries(states=ACTIVE_STATES, limit=1_000_000):
            backend = self.backends.get(entry.site)
            if backend is None:
                await self.transition(
                    entry.id,
                    EntryState.FAILED,
                    reason=f"site {entry.site!r} is no longer configured; state unknown",
                )
                continue
            await self.readopt(entry)

    async def readopt(self, entry: Entry) -> None:
        """Hand an active entry of a configured site back to its backend (after a restart, or
        a takeover from a dead replica), carrying through a stop asked for meanwhile."""
        backend = self.backends[entry.site]
        raw = await self.store.get_spec(entry.id)
        if held(raw):
            return  # a group member no backend has yet: its group starts it (groups.py)
        spec = LaunchSpec.model_validate(raw)
        try:
            await backend.adopt(entry.id, entry.state, entry.handle, spec)
            if await self.store.stop_request(entry.id) is not None:
                # A stop asked for before the restart is carried through now.
                await backend.cancel(entry.id, entry.handle)
        except Exception as exc:
            log.exception("adopting %s failed", entry.id)
            await self.transition(
                entry.id, EntryState.FAILED, reason=f"could not re-adopt after restart: {exc}"
            )

    # ================================================================ reporter (backends call)

    def _lock(self, entry_id: str) -> asyncio.Lock:
        lock = self._locks.get(entry_id)
        if lock is None:
            lock = self._locks[entry_id] = asyncio.Lock()
        return lock

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
    ) -> None:
        if reason is not None:
            reason = reason_line(reason)
        async with self._lock(entry_id):
            entry = await self.store.get_entry(entry_id, transitions=False)
            if entry is None:
                log.warning("transition for unknown entry %s ignored", entry_id)
                return
            fields: dict[str, Any] = {}
            if handle is not None:
                fields["handle"] = {**entry.handle, **handle}
            if endpoint is not None:
                fields["endpoint"] = endpoint
            if restarts is not None:
                fields["restarts"] = restarts
            if exit_code is not None:
                fields["exit_code"] = exit_code
            if state == entry.state:
                # Same state, new facts (a new handle, a changed pending reason).
                if reason is not None:
                    fields["reason"] = reason
                await self.store.update_entry_fields(entry_id, fields)
                return
            if not can_transition(entry.state, state):
                log.warning(
                    "entry %s: %s -> %s is not a transition; ignored", entry_id, entry.state, state
                )
                return
            if state in (EntryState.CANCELLED, EntryState.FAILED):
                # A stop was asked for: the backend saw a kill, the caller asked for this.
                requested = await self.store.stop_request(entry_id)
                if requested is not None:
                    state, reason = requested
            at = now()
            if state in (EntryState.RUNNING,) and entry.started_at is None:
                fields["started_at"] = at
            if state.terminal:
                fields["finished_at"] = at
                backend = self.backends.get(entry.site)
                if backend is not None and entry.kind == "job":
                    cap = self.settings.max_result_bytes
                    try:
                        data = await backend.read_results(
                            entry_id, fields.get("handle", entry.handle), 0, cap
                        )
                        size = _result_size(data)
                        if size > cap:
                            why = (
                                f"result_too_large: result.json is {size} bytes, over "
                                f"max_result_bytes ({cap}); not stored, kept as the artifact "
                                f"{OVERSIZE_RESULT}"
                            )
                            if state == EntryState.SUCCEEDED:
                                state, reason = EntryState.FAILED, why
                            else:
                                reason = f"{reason}; {why}" if reason else why
                        elif data.result is not None:
                            fields["result"] = data.result
                    except Exception as exc:  # the transition matters more than the result
                        log.warning("entry %s: reading results failed: %s", entry_id, exc)
            if state.terminal and entry.kind == "job":
                # Before the store says it ended: whoever reads it finished finds its files.
                await self._keep_artifacts(entry, fields.get("handle", entry.handle))
            await self.store.apply_transition(entry_id, state, at, reason, fields)
            if state.terminal:
                self._locks.pop(entry_id, None)
        if state.terminal:  # in the catalogue before anyone hears it finished
            await self.results.index_finished(self, entry_id)
        self.bus.publish(
            Message(
                kind="transition",
                entry_id=entry_id,
                event_id=entry.event_id,
                state=state,
                reason=reason,
                at=at,
            )
        )

    async def _keep_artifacts(self, entry: Entry, handle: Mapping[str, Any]) -> None:
        """Copy a finished job's artifacts into storage before its end is recorded, so whoever
        sees it finished can read them there (the work dir still serves on failure)."""
        await asyncio.to_thread(drop_staging, self, entry.id)
        backend = self.backends.get(entry.site)
        if backend is None:
            return
        try:
            # Only a site whose jobs upload their own outputs was given an OutputUpload; the
            # stored spec is read for those alone (every job ends here).
            if getattr(backend, "uploads_outputs", False):
                raw = await self.store.get_spec(entry.id)
                if raw.get("outputs"):  # the job uploaded them itself (LaunchSpec.outputs)
                    await self.archive.keep_uploaded(entry.id, entry.event_id)
                    return
            stats = await backend.list_artifacts(entry.id, handle)

            async def read(path: str, offset: int, limit: int) -> ArtifactChunk:
                return await backend.read_artifact(entry.id, handle, path, offset, limit)

            await self.archive.keep(entry.id, entry.event_id, stats, read)
        except Exception as exc:
            log.warning("entry %s: keeping its artifacts in storage failed: %s", entry.id, exc)

    async def log_grew(self, entry_id: str, size: int) -> None:
        self.bus.publish(Message(kind="log", entry_id=entry_id, log_size=size, at=now()))

    async def stream_record(self, entry_id: str, index: int, record: dict[str, Any]) -> None:
        # The files' readers cap records already; this holds for any backend's source.
        size = len(json.dumps(record, default=str))
        if size > MAX_RECORD_BYTES:
            record = omitted_record(size)
        self.bus.publish(
            Message(kind="stream", entry_id=entry_id, record_index=index, record=record, at=now())
        )

    # ================================================================ authorisation

    async def _event_for(self, principal: Principal, event_id: str, need: Role) -> Event:
        event = await self.store.get_event(event_id)
        role = event.role_of(principal) if event else None
        if event is None or role is None:
            # The same answer for "does not exist" and "not yours": ids of others stay secret.
            raise NotFound(f"no event {event_id!r} visible to {principal.id}", field="event_id")
        if ROLE_RANK[role] < ROLE_RANK[need]:
            raise NotAllowed(
                f"{principal.id} is {role.value} on event {event_id}; this needs {need.value}",
                field="event_id",
            )
        return event

    async def _entry_for(
        self, principal: Principal, entry_id: str, need: Role = Role.VIEWER
    ) -> tuple[Entry, Event]:
        entry = await self.store.get_entry(entry_id)
        if entry is None:
            raise NotFound(f"no entry {entry_id!r} visible to {principal.id}", field="entry_id")
        try:
            event = await self._event_for(principal, entry.event_id, need)
        except NotFound:
            raise NotFound(
                f"no entry {entry_id!r} visible to {principal.id}", field="entry_id"
            ) from None
        return entry, event

    # ================================================================ services and sites

    def list_services(self) -> list[ServiceSummary]:
        return self.catalogue.summaries()

    def get_service(self, name: str, version: str | None = None) -> Service:
        return self.catalogue.get(name, version)

    async def list_sites(self) -> list[Site]:
        out = []
        active = await self.store.list_entries(states=ACTIVE_STATES, limit=1_000_000)
        for name, backend in self.backends.items():
            cfg = self.settings.site(name)
            status, why = await backend.status()
            if cfg is not None and cfg.maintenance:
                status, why = SiteStatus.MAINTENANCE, "marked in maintenance by configuration"
            caps = await backend.capabilities()
            out.append(
                Site(
                    name=name,
                    kind=backend.kind,
                    status=status,
                    status_reason=why,
                    capabilities=caps,
                    estimated_wait_s=await backend.estimate_wait(Resources()),
                    active_entries=sum(1 for e in active if e.site == name),
                )
            )
        return out

    # ================================================================ events

    async def create_event(
        self,
        principal: Principal,
        name: str | None = None,
        site: str | None = None,
        ttl_s: int | None = None,
        *,
        default: bool = False,
        retention_days: float | None = None,
        reservation: str | None = None,
        webhook_url: str | None = None,
    ) -> Event:
        if site is not None and site not in self.backends:
            raise InvalidInput(
                f"unknown site {site!r}; sites: {', '.join(self.backends)}", field="site"
            )
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidInput("ttl_seconds must be positive", field="ttl_seconds")
        if retention_days is not None and retention_days <= 0:
            raise InvalidInput("retention_days must be positive", field="retention_days")
        ttl = ttl_s if ttl_s is not None else self.settings.event_ttl_s
        at = now()
        event = Event(
            id=new_id("evt"),
            name=name or ("default" if default else f"event-{at:%Y%m%d-%H%M%S}"),
            owner=principal.id,
            site=site,
            created_at=at,
            expires_at=at + timedelta(seconds=ttl) if ttl else None,
            default=default,
            reservation=reservation,
            webhook_url=webhook_url,
        )
        await self.store.insert_event(event)
        if retention_days is not None:  # kept with the artifacts it governs
            await self.archive.set_retention(event.id, retention_days)
        if event.expires_at:
            self._expiry_wake.set()
        self.bus.publish(Message(kind="event", event_id=event.id, at=at))
        return event

    async def get_event(self, principal: Principal, event_id: str) -> Event:
        return await self._event_for(principal, event_id, Role.VIEWER)

    async def list_events(
        self, principal: Principal, include_inactive: bool = False
    ) -> list[Event]:
        return await self.store.list_events(
            None if principal.admin else principal.id, include_inactive
        )

    async def _default_event(self, principal: Principal) -> Event:
        event = await self.store.default_event(principal.id)
        if event is not None:
            return event
        try:
            return await self.create_event(principal, default=True)
        except IntegrityError:  # created concurrently by another call
            event = await self.store.default_event(principal.id)
            assert event is not None
            return event

    async def stop_event(self, principal: Principal, event_id: str) -> Event:
        """Stop every entry of the event and close it. Idempotent."""
        event = await self._event_for(principal, event_id, Role.OWNER)
        if event.state == EventState.ACTIVE:
            await self._end_event(
                event, EventState.STOPPED, EntryState.CANCELLED, "event stopped", wait_s=10.0
            )
        return await self._event_for(principal, event_id, Role.VIEWER)

    async def _end_event(
        self,
        event: Event,
        state: EventState,
        entry_state: EntryState,
        reason: str,
        wait_s: float = 0.0,
    ) -> None:
        await self.store.set_event_state(event.id, state, now())
        entries = await self.store.list_entries(
            event_ids=[event.id], states=ACTIVE_STATES, limit=1_000_000
        )
        await self._stop_entries(entries, entry_state, reason, wait_s)
        for name, backend in self.backends.items():
            try:
                await backend.release_event(event.id)
            except Exception as exc:
                log.warning("site %s: releasing event %s failed: %s", name, event.id, exc)
        self.bus.publish(Message(kind="event", event_id=event.id, at=now()))

    async def share_event(
        self, principal: Principal, event_id: str, with_principal: str, role: Role | None
    ) -> Event:
        """Grant `role` (viewer or operator) to another principal, or revoke with None.
        Idempotent: granting the role it already has changes nothing. A stopped or expired
        event can no longer be shared (revoking still works)."""
        event = await self._event_for(principal, event_id, Role.OWNER)
        if role == Role.OWNER:
            raise InvalidInput("role must be viewer or operator", field="role")
        if role is not None and event.state != EventState.ACTIVE:
            raise Conflict(
                f"event {event_id!r} is {event.state.value}; only an active event can be shared",
                field="event_id",
            )
        if with_principal == event.owner:
            raise InvalidInput("the owner already has every right", field="principal")
        await self.store.set_share(event_id, with_principal, role)
        return await self._event_for(principal, event_id, Role.VIEWER)

    async def event_to_submit_to(self, principal: Principal, event_id: str | None) -> Event:
        """The event new work of `principal` goes to (their default one without `event_id`):
        active, and theirs or shared with them as operator; else a typed error on event_id."""
        event = (
            await self._event_for(principal, event_id, Role.OPERATOR)
            if event_id
            else await self._default_event(principal)
        )
        if event.state != EventState.ACTIVE:
            raise Conflict(
                f"event {event.id} is {event.state.value}; new work needs an active event",
                field="event_id",
            )
        return event

    def wake_expiry(self) -> None:
        self._expiry_wake.set()

    async def expiry_loop(self) -> None:
        swept = 0.0
        while True:
            self._expiry_wake.clear()
            if (t := asyncio.get_running_loop().time()) - swept >= 3600:
                swept = t
                try:
                    await self.archive.sweep()
                except Exception as exc:
                    log.warning("sweeping expired artifacts failed: %s", exc)
            nxt = await self.store.next_expiry()
            delay = 3600.0 if nxt is None else (nxt[1] - now()).total_seconds()
            if nxt is not None and delay <= 0:
                event = await self.store.get_event(nxt[0])
                if event is not None:
                    await self._end_event(
                        event, EventState.EXPIRED, EntryState.EXPIRED, "event lifetime ended"
                    )
                continue
            try:
                await asyncio.wait_for(self._expiry_wake.wait(), timeout=min(delay, 3600.0))
            except TimeoutError:
                pass

    # ================================================================ entries

    async def launch(
        self,
        principal: Principal,
        service: str,
        parameters: dict[str, Any] | None = None,
        *,
        event_id: str | None = None,
        site: str | None = None,
        resources: ResourceRequest | None = None,
        idempotency_key: str | None = None,
        kind: str | None = None,
        version: str | None = None,
        priority: Literal["normal", "urgent"] = "normal",
        member: Member | None = None,
        inputs: Mapping[str, str] | None = None,
    ) -> Entry:
        """Validate, route, record and hand the entry to a backend. `priority="urgent"` marks
        time-sensitive work (a Slurm site submits it with its urgent QoS). A composed service
        launches its group (orchestrator.groups), whose members come back here as `member`.
        `inputs` (name -> URI, see orchestrator.inputs) are checked before anything is
        recorded."""
        self.check_priority(principal, priority)
        svc = self.catalogue.get(service, version)
        if kind is not None and svc.kind != kind:
            hint = "launch_service" if svc.kind == "service" else "submit_job"
            raise InvalidInput(
                f"{svc.name} is a {svc.kind}, not a {kind}; use {hint}", field="service"
            )
        params = validate_parameters(svc, parameters)
        if svc.components and member is None:
            if idempotency_key is not None:
                raise InvalidInput(
                    f"{svc.name} is a composed service; idempotency_key is not taken for it",
                    field="idempotency_key",
                )
            return await self.groups.launch(
                principal,
                svc,
                params,
                event_id=event_id,
                site=site,
                resources=resources,
                priority=priority,
            )
        res = (resources or ResourceRequest()).apply_to(resources_for(svc, params))
        event = await self.event_to_submit_to(principal, event_id)
        resolved = await resolve_inputs(self, principal, svc, inputs or {})
        request_hash = hashlib.sha256(
            json.dumps(
                [svc.ref, params, event.id, site, res.model_dump()]
                + ([priority] if priority != "normal" else [])
                + ([dict(inputs)] if inputs else []),
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        if idempotency_key is not None:
            found = await self.store.find_idempotent(principal.id, idempotency_key)
            if found is not None:
                if found[1] != request_hash:
                    raise Conflict(
                        f"idempotency_key {idempotency_key!r} was already used for a different "
                        "request",
                        field="idempotency_key",
                    )
                return (await self._entry_for(principal, found[0]))[0]
        if svc.limits.max_concurrent is not None:
            active = await self.store.count_active(principal.id, svc.name)
            if active >= svc.limits.max_concurrent:
                raise LimitExceeded(
                    f"{principal.id} already has {active} active {svc.name} entries; the limit "
                    f"is {svc.limits.max_concurrent}",
                    field="service",
                )
        maintenance = {s.name: s.maintenance for s in self.settings.sites}
        requested = site or event.site
        # Sites that would refuse the principal (no account there) are not routed to; a site
        # asked for by name refuses with AccountNotMapped.
        routable = self.backends if requested else sites_for(self, principal)
        chosen = await choose_site(routable, maintenance, res, svc.kind, requested)
        entry, spec = await self.new_entry(
            principal,
            svc,
            params,
            res,
            event,
            chosen,
            priority,
            idempotency_key,
            member=member,
            resolved=resolved,
        )
        entry_id = entry.id
        stored = spec.model_dump(mode="json")
        if exports := {**svc.exports, **(member.exports if member else {})}:
            stored[EXPORTS] = exports
        if member is not None and member.hold:
            stored[HELD] = True
        try:
            await self.store.insert_entry(entry, stored, request_hash)
        except IntegrityError:
            # The same idempotency key raced in from a concurrent call.
            if idempotency_key is None:
                raise
            found = await self.store.find_idempotent(principal.id, idempotency_key)
            assert found is not None
            return (await self._entry_for(principal, found[0]))[0]
        self.bus.publish(
            Message(
                kind="transition",
                entry_id=entry_id,
                event_id=event.id,
                state=EntryState.PENDING,
                at=entry.created_at,
            )
        )
        if member is not None and member.hold:
            pass  # its group starts it (orchestrator.groups)
        elif self.replicas is not None and not self.replicas.owns(chosen):
            # Another replica drives this site (or will, once it takes the site over).
            self.replicas.hand_over(entry_id)
        else:
            await self.submit_to_backend(chosen, spec)
        return await self.get_entry(principal, entry_id)

    def check_priority(self, principal: Principal, priority: str) -> None:
        """Urgent work is a policy: admins, holders of the sciorch.urgent scope and the
        principals of the urgent_principals setting may ask for it."""
        allowed = self.settings.urgent_principals
        if priority != "urgent" or principal.admin or principal.urgent:
            return
        if "*" in allowed or principal.id in allowed:
            return
        raise NotAllowed(
            f"{principal.id} may not ask for urgent work: it needs the sciorch.urgent scope or "
            "a place in the urgent_principals setting; submit with priority normal",
            field="priority",
        )

    async def new_entry(
        self,
        principal: Principal,
        svc: Service,
        params: dict[str, Any],
        res: Resources,
        event: Event,
        chosen: str,
        priority: Literal["normal", "urgent"] = "normal",
        idempotency_key: str | None = None,
        *,
        member: Member | None = None,
        resolved: Any = None,
        **spec_extra: Any,
    ) -> tuple[Entry, LaunchSpec]:
        """The record and the launch spec of a new entry (not yet stored): its account on the
        chosen site, a group member's environment, its staged inputs (`resolved`, from
        orchestrator.inputs); `spec_extra` sets more LaunchSpec fields (a sweep element's)."""
        account = self.account_for(chosen, principal)
        entry_id = new_id("ent")
        base_path = f"/entries/{entry_id}/"
        argv = fill_command(
            svc,
            params,
            {
                "python": sys.executable,
                "entry_id": entry_id,
                "base_path": base_path,
                "public_origin": public_origin(self.settings.public_url),
            },
        )
        env = dict(svc.env)
        env.update(await self.groups.event_env(event.id))
        if member is not None:
            env.update(member.env)
        if self.settings.allow_root_services:
            env["SCIORCH_ALLOW_ROOT"] = "1"
        if self.data_plane is not None:  # the job's own credential: XADD to its stream only
            grant = await self.data_plane.grant(
                entry_id, "writer", (res.walltime_s or 86400) + 3600
            )
            env.update(SCIORCH_REDIS_URL=grant.url(), SCIORCH_REDIS_STREAM=grant.stream)
        spec = LaunchSpec(
            entry_id=entry_id,
            event_id=event.id,
            service=svc.name,
            kind=svc.kind,
            argv=argv,
            parameters=params,
            env=env,
            resources=res,
            health=health_spec(svc, base_path, entry_id),
            restart_policy=svc.restart.policy,
            max_restarts=svc.restart.max_restarts,
            base_path=base_path,
            image=svc.image,
            priority=priority,
            account=account,
            reservation=event.reservation,
            **spec_extra,
        )
        if svc.kind == "job" and getattr(self.backends[chosen], "uploads_outputs", False):
            spec.outputs = self.archive.upload_grant(
                entry_id, upload_ttl_s(res.walltime_s), self.settings.storage.max_upload_bytes
            )
        if resolved:
            urls_only = bool(getattr(self.backends[chosen], "stages_from_urls", False))
            spec.inputs = await stage_inputs(self, principal, entry_id, resolved, urls_only)
        at = now()
        entry = Entry(
            id=entry_id,
            event_id=event.id,
            service=svc.name,
            version=svc.version,
            kind=svc.kind,
            site=chosen,
            submitted_by=principal.id,
            state=EntryState.PENDING,
            reason=member.reason if member else None,
            parameters=params,
            resources=res,
            created_at=at,
            updated_at=at,
            url=self.settings.public_url.rstrip("/") + base_path if svc.kind == "service" else None,
            idempotency_key=idempotency_key,
            handle={
                **({"account": account} if account else {}),
                **({"group": _membership(member, entry_id)} if member else {}),
            },
        )
        return entry, spec

    async def submit_to_backend(self, site: str, spec: LaunchSpec) -> None:
        """Give a recorded entry to its site's backend (once); a refusal fails the entry."""
        if self.replicas is not None and not self.replicas.claim(site, spec.entry_id):
            return
        try:
            await self.backends[site].submit(spec)
        except SciorchError as exc:
            await self.transition(spec.entry_id, EntryState.FAILED, reason=exc.message)
            raise
        except Exception as exc:
            await self.transition(spec.entry_id, EntryState.FAILED, reason=f"backend error: {exc}")
            raise

    def account_for(self, site: str, principal: Principal) -> str | None:
        """The account `principal`'s work runs as on `site` (None: the server's user); raises
        AccountNotMapped where the site requires one and has none for the principal."""
        cfg = self.settings.site(site)
        return account_for(cfg.accounts if cfg else None, site, principal)

    def access_token(self, principal: Principal, entry_id: str) -> str:
        exp = now() + timedelta(seconds=self.settings.entry_token_ttl_s)
        return jwt.encode(
            {"sub": principal.id, "ent": entry_id, "exp": exp, "adm": principal.admin},
            self._key,
            algorithm="HS256",
        )

    def entry_token_principal(self, token: str, entry_id: str) -> Principal:
        """Who an entry's access token was issued to, if it is valid and for this entry."""
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"])
        except jwt.PyJWTError as exc:
            raise NotAllowed(f"entry token rejected: {exc}") from exc
        if claims.get("ent") != entry_id:
            raise NotAllowed("entry token is for another entry")
        return Principal(id=str(claims["sub"]), admin=bool(claims.get("adm")))

    async def authorize_proxy(self, token: str, entry_id: str) -> Entry:
        """The proxy's check: a valid token for this entry whose holder may still see it."""
        principal = self.entry_token_principal(token, entry_id)
        entry, _event = await self._entry_for(principal, entry_id, Role.VIEWER)
        return entry

    async def get_entry(self, principal: Principal, entry_id: str) -> Entry:
        entry, _ = await self._entry_for(principal, entry_id)
        return entry

    async def list_entries(
        self,
        principal: Principal,
        event_id: str | None = None,
        states: list[EntryState] | None = None,
        service: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Entry], str | None]:
        if not 1 <= limit <= 1000:
            raise InvalidInput("limit must be between 1 and 1000", field="limit")
        if event_id is not None:
            event_ids = [(await self._event_for(principal, event_id, Role.VIEWER)).id]
        else:
            event_ids = [
                e.id
                for e in await self.store.list_events(
                    None if principal.admin else principal.id, include_inactive=True
                )
            ]
        after = None
        if cursor:
            try:
                created, eid = json.loads(bytes.fromhex(cursor))
                after = (datetime.fromisoformat(str(created)).isoformat(), str(eid))
            except (ValueError, TypeError) as exc:
                raise InvalidInput("cursor is not one this server issued", field="cursor") from exc
        page = await self.store.list_entries(
            event_ids=event_ids, states=states, service=service, limit=limit + 1, after=after
        )
        nxt = None
        if len(page) > limit:
            page = page[:limit]
            last = page[-1]
            nxt = json.dumps([last.created_at.isoformat(), last.id]).encode().hex()
        return page, nxt

    async def wait_entry(
        self,
        principal: Principal,
        entry_id: str,
        timeout_s: float | None = None,
        on_message: OnMessage | None = None,
        until: str = "auto",
    ) -> tuple[Entry, bool]:
        """Wait until the entry is finished (jobs) or ready/finished (services, `until=auto`).
        Returns (entry, timed_out). `on_message` gets transitions and stream records."""
        if until not in ("auto", "started", "ready", "finished"):
            raise InvalidInput("until must be auto, started, ready or finished", field="until")
        entry, _ = await self._entry_for(principal, entry_id)

        def done(state: EntryState, kind: str) -> bool:
            if state.terminal:
                return True
            if until == "started":
                return state in (EntryState.RUNNING, EntryState.READY)
            wants_ready = until == "ready" or (until == "auto" and kind == "service")
            return wants_ready and state == EntryState.READY

        async with self.bus.subscribe(lambda m: m.entry_id == entry_id) as sub:
            entry = await self.get_entry(principal, entry_id)  # after subscribing: no gap
            if done(entry.state, entry.kind):
                return entry, False
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return await self.get_entry(principal, entry_id), True
                recheck = self.bus.recheck_s
                if recheck is not None and (remaining is None or remaining > recheck):
                    remaining = recheck
                try:
                    msg = await asyncio.wait_for(sub.get(), timeout=remaining)
                except TimeoutError:
                    # The deadline, or (a bus across replicas) a message that may have been
                    # lost while it reconnected: the store says.
                    current = await self.get_entry(principal, entry_id)
                    if done(current.state, current.kind):
                        return current, False
                    if deadline is not None and loop.time() >= deadline:
                        return current, True
                    continue
                if on_message is not None and msg.kind in ("transition", "stream"):
                    await on_message(msg)
                if (
                    msg.kind == "transition"
                    and msg.state is not None
                    and done(msg.state, entry.kind)
                ):
                    return await self.get_entry(principal, entry_id), False

    async def read_logs(
        self, principal: Principal, entry_id: str, offset: int = 0, limit: int = 65536
    ) -> LogChunk:
        if offset < 0:
            raise InvalidInput("offset must be >= 0", field="offset")
        if not 1 <= limit <= 1_048_576:
            raise InvalidInput("limit must be between 1 and 1048576 bytes", field="limit")
        entry, _ = await self._entry_for(principal, entry_id)
        return await self.backends[entry.site].read_logs(entry.id, entry.handle, offset, limit)

    async def read_results(
        self, principal: Principal, entry_id: str, since_record: int = 0, limit: int = 100
    ) -> tuple[Entry, ResultData]:
        """The result and a page of at most `limit` stream records from `since_record` on."""
        if since_record < 0:
            raise InvalidInput("since_record must be >= 0", field="since_record")
        if not 1 <= limit <= PAGE_RECORDS:
            raise InvalidInput(f"limit must be between 1 and {PAGE_RECORDS}", field="limit")
        entry, _ = await self._entry_for(principal, entry_id)
        backend = self.backends.get(entry.site)
        cap = self.settings.max_result_bytes
        data = (
            await backend.read_results(entry.id, entry.handle, since_record, cap)
            if backend
            else ResultData()
        )
        if entry.result is not None or _result_size(data) > cap:
            data.result = entry.result
        if len(data.records) > limit:
            data.records = data.records[:limit]
            data.more_records = True
        data.next_record = since_record + len(data.records)
        return entry, data

    async def list_artifacts(self, principal: Principal, entry_id: str) -> list[ArtifactStat]:
        """The entry's files under output/ that this server can read, with size and sha256."""
        entry, _ = await self._entry_for(principal, entry_id)
        if entry.state.terminal and (kept := await self.archive.manifest(entry.id)) is not None:
            return kept.artifacts
        backend = self.backends.get(entry.site)
        return await backend.list_artifacts(entry.id, entry.handle) if backend else []

    async def read_artifact(
        self,
        principal: Principal,
        entry_id: str,
        path: str,
        offset: int = 0,
        limit: int = MAX_ARTIFACT_READ,
    ) -> tuple[Entry, ArtifactChunk]:
        """At most `limit` bytes of the artifact `path` from `offset` (pass next_offset on)."""
        entry, read = await self.artifact_reader(principal, entry_id)
        return entry, await read(path, offset, limit)

    async def artifact_reader(self, principal: Principal, entry_id: str) -> tuple[Entry, ReadRange]:
        """The entry and a reader of its artifacts' ranges, access checked once: a download
        reads hundreds of ranges and must not ask the store again for each (on PostgreSQL,
        where nothing is cached, that was two queries a MiB)."""
        entry, _ = await self._entry_for(principal, entry_id)

        async def read(path: str, offset: int, limit: int) -> ArtifactChunk:
            if offset < 0:
                raise InvalidInput("offset must be >= 0", field="offset")
            if not 1 <= limit <= MAX_ARTIFACT_READ:
                raise InvalidInput(
                    f"limit must be between 1 and {MAX_ARTIFACT_READ} bytes", field="limit"
                )
            if entry.state.terminal and (kept := await self.archive.manifest(entry.id)):
                if kept.has(path):
                    return await self.archive.read(kept, path, offset, limit)
                # Not kept: the site says why (a path out of output/, a link out, no such file).
            backend = self.backends.get(entry.site)
            if backend is None:
                raise NotFound(f"site {entry.site!r} of entry {entry.id} is gone", field="path")
            return await backend.read_artifact(entry.id, entry.handle, path, offset, limit)

        return entry, read

    async def cancel(self, principal: Principal, entry_id: str, wait_s: float = 10.0) -> Entry:
        """Cancel an entry. Idempotent: a finished entry is returned unchanged."""
        entry, _ = await self._entry_for(principal, entry_id, Role.OPERATOR)
        if entry.state.terminal:
            return entry
        await self._stop_entries(
            [entry], EntryState.CANCELLED, "cancelled by " + principal.id, wait_s
        )
        return await self.get_entry(principal, entry_id)

    async def stop_entries(
        self, entries: list[Entry], final: EntryState, reason: str, wait_s: float = 0.0
    ) -> None:
        await self._stop_entries(entries, final, reason, wait_s)

    async def cancel_entries(
        self, principal: Principal, entries: list[Entry], wait_s: float = 10.0
    ) -> None:
        """Cancel several entries at once (a sweep's), each checked for operator rights."""
        for entry in entries:
            await self._entry_for(principal, entry.id, Role.OPERATOR)
        active = [e for e in entries if not e.state.terminal]
        reason = "cancelled by " + principal.id
        await self._stop_entries(active, EntryState.CANCELLED, reason, wait_s)

    async def _stop_entries(
        self, entries: list[Entry], final: EntryState, reason: str, wait_s: float
    ) -> None:
        """Ask the backends to stop these entries, then wait (bounded) until they have ended,
        so the caller sees the final states. The stop goes on in the backend past wait_s."""
        pending = {e.id for e in entries}
        async with self.bus.subscribe(
            lambda m: m.kind == "transition" and m.entry_id in pending
        ) as sub:
            await asyncio.gather(*(self._stop_entry(e, final, reason) for e in entries))
            try:
                async with asyncio.timeout(wait_s):
                    while pending:
                        for eid in list(pending):
                            current = await self.store.get_entry(eid, transitions=False)
                            if current is None or current.state.terminal:
                                pending.discard(eid)
                        if pending:
                            await sub.get()
            except TimeoutError:
                pass

    async def _stop_entry(self, entry: Entry, final: EntryState, reason: str) -> None:
        # Backends only know "cancelled"; the store remembers what this stop really is (and
        # why), so a server restarting mid-stop still records it truthfully.
        await self.store.request_stop(entry.id, final, reason)
        backend = self.backends.get(entry.site)
        if entry.state == EntryState.PENDING and held(await self.store.get_spec(entry.id)):
            backend = None  # a held group member: no backend has it yet
        if backend is None:
            await self.transition(entry.id, final, reason=reason)
            return
        if self.replicas is not None and not self.replicas.owns(entry.site):
            # Its site's owner stops it; with none alive, the next owner finds the request.
            self.replicas.ask_stop(entry.id)
            return
        await backend.cancel(entry.id, entry.handle)
