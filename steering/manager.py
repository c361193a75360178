"""Campaigns inside the server: `start_campaign` starts a runner as a background task of the
server process, acting as the calling principal through an in-memory MCP client connected to a
server instance built for that principal (so every job it submits is authorised, audited and
rate-limited like any other call of theirs).

A runner is a task of its own, started in a fresh context: nothing of the request that started
it (its HTTP request, access token, fastmcp request context, all contextvars) reaches the
in-memory servers it calls. The in-memory server of a principal is shared by their runners and
kept running by a task of its own (`_ServerHold`) from the first runner to the last.

Campaigns still running when the server stops stay `running` in the store and are resumed when
it starts again (when its MCP lifespan begins: `sciorch serve` over HTTP or stdio), each by its
own runner, which re-adopts what was in flight (see steering.runner). With several replicas on
one PostgreSQL store, a campaign runs where its lease is held (steering.leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ground.errors import InvalidInput, NotAllowed, NotFound
from ground.models import ROLE_RANK, Principal, Role
from steering.external import ExternalRunner, check_point, seq_of
from steering.leases import CampaignLeases
from steering.models import (
    ActionRecord,
    ActionView,
    AskResult,
    Attempt,
    BestView,
    CampaignList,
    CampaignRecord,
    CampaignState,
    CampaignView,
    EvalState,
    EvaluationRecord,
    EvaluationView,
    PosteriorView,
    ProgressView,
    TellCampaignInput,
    TellResult,
)
from steering.runner import CampaignRunner, check_service, decision_stats, key_for
from steering.spec import CampaignSpec, parse_spec
from steering.store import CampaignStore, now
from steering.views import objectives_view, reported_fields

if TYPE_CHECKING:
    from fastmcp import Client

    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.steering")

_MANAGERS: weakref.WeakKeyDictionary[Any, CampaignManager] = weakref.WeakKeyDictionary()


# A client acting as the given principal (not connected yet): how a runner reaches the tools.
# Handed in by the MCP layer (mcp_server.connect.CampaignClients); steering never builds a server.
Clients = Callable[[Principal], "Client[Any]"]


def manager_for(
    engine: Engine, clients: Clients, *, auto_resume: bool | None = None
) -> CampaignManager:
    """The one manager of an engine (created on first use, with the first `clients` given)."""
    mgr = _MANAGERS.get(engine)
    if mgr is None:
        mgr = CampaignManager(
            engine, clients, auto_resume=True if auto_resume is None else auto_resume
        )
        _MANAGERS[engine] = mgr
    elif auto_resume is not None:
        mgr.auto_resume = auto_resume
    return mgr


def owner_of(rec: CampaignRecord) -> Principal:
    """Whom a campaign's work runs as: its owner, with the claims it started it with."""
    return Principal(id=rec.owner, admin=rec.admin, claims=tuple(rec.owner_claims))


def new_campaign_id() -> str:
    return f"cmp-{secrets.token_hex(6)}"


def campaign_dir(home: Path, campaign_id: str) -> Path:
    return home / "campaigns" / campaign_id


def default_name(spec: CampaignSpec) -> str:
    obj = spec.objective
    surface = obj.parameters.get("surface")
    what = f"{obj.service or 'external'}" + (f" {surface}" if isinstance(surface, str) else "")
    return spec.name or f"{what}: {obj.goal} {obj.field}"


def new_record(principal: Principal, spec: CampaignSpec, endpoint: str) -> CampaignRecord:
    """A new campaign's record, running from now, with its seed drawn if the spec has none."""
    at = now()
    return CampaignRecord(
        id=new_campaign_id(),
        name=default_name(spec),
        owner=principal.id,
        admin=principal.admin,
        owner_claims=list(principal.claims),
        spec=spec,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**31),
        state=CampaignState.RUNNING,
        endpoint=endpoint,
        created_at=at,
        updated_at=at,
    )


def build_view(
    rec: CampaignRecord,
    evals: list[EvaluationRecord],
    active: bool,
    with_evals: bool = True,
    actions: list[ActionRecord] | None = None,
) -> CampaignView:
    spec = rec.spec
    goal = spec.objective.goal
    ok = [e for e in evals if e.state == EvalState.SUCCEEDED and e.value is not None]
    best = None
    if ok and goal != "explore":
        sign = 1.0 if goal == "maximise" else -1.0
        b = max(ok, key=lambda e: sign * float(e.value or 0.0))
        best = BestView(seq=b.seq, point=b.point, value=float(b.value or 0.0), entry_id=b.entry_id)
    end = rec.finished_at or now()
    median, worst = decision_stats(evals)
    posterior = PosteriorView.model_validate(rec.posterior) if rec.posterior else None
    return CampaignView(
        id=rec.id,
        name=rec.name,
        owner=rec.owner,
        state=rec.state,
        reason=rec.reason,
        active=active,
        paused=rec.paused,
        kind=spec.objective.kind,
        service=spec.objective.service,
        goal=goal,
        field=spec.objective.field,
        acquisition=spec.acquisition_name,
        batch_size=spec.batch_size,
        event_id=rec.event_id,
        site=spec.site,
        endpoint=rec.endpoint,
        seed=rec.seed,
        created_at=rec.created_at,
        finished_at=rec.finished_at,
        progress=ProgressView(
            budget=spec.budget.evaluations,
            done=sum(
                1
                for e in evals
                if e.state in (EvalState.SUCCEEDED, EvalState.FAILED, EvalState.CANCELLED)
            ),
            succeeded=len(ok),
            failed=sum(1 for e in evals if e.state == EvalState.FAILED),
            cancelled=sum(1 for e in evals if e.state == EvalState.CANCELLED),
            in_flight=sum(1 for e in evals if e.state in (EvalState.ASKED, EvalState.SUBMITTED)),
            queued=sum(1 for e in evals if e.state == EvalState.QUEUED),
            rejected=sum(1 for e in evals if e.state == EvalState.REJECTED),
            retries=sum(max(0, e.attempt - 1) for e in evals),
            elapsed_s=(end - rec.created_at).total_seconds(),
            wall_time_s=spec.budget.wall_time_s,
        ),
        best=best,
        reference=spec.objective.reference,
        posterior=posterior,
        decision_s_median=median,
        decision_s_max=worst,
        plots=rec.plots,
        spec=spec,
        evaluations=[EvaluationView.of(e, reported_fields(spec)) for e in evals]
        if with_evals
        else None,
        actions=None
        if actions is None
        else [
            ActionView(at=a.at, principal=a.principal, action=a.action, arguments=a.arguments)
            for a in actions
        ],
        **objectives_view(spec, evals),
    )


def _action(
    campaign_id: str, principal: Principal, action: str, arguments: dict[str, Any]
) -> ActionRecord:
    return ActionRecord(
        id=f"act-{secrets.token_hex(8)}",
        campaign_id=campaign_id,
        at=now(),
        principal=principal.id,
        action=action,
        arguments={k: v for k, v in arguments.items() if v is not None},
    )


class _ServerHold:
    """Keeps one in-memory server running (its MCP lifespan, with the Docket queue and worker
    that run its task tools such as wait_entry) while campaigns use it.

    fastmcp runs a server's lifespan in the first client that connects and ends it when that
    client disconnects, however many others are still connected: two runners of one principal
    sharing a server lost the second one's wait_entry tasks ("Task <id> not found") when the
    first finished. So the lifespan belongs to a task of its own, in a fresh context, from the
    first user to the last; a later hold of the same server starts once this one has ended."""

    def __init__(self, client: Callable[[], Client[Any]], after: asyncio.Task[None] | None) -> None:
        self.users = 0
        self.released = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(
            self._hold(client, after), name="campaign-server", context=contextvars.Context()
        )

    async def _hold(
        self, client: Callable[[], Client[Any]], after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await asyncio.wait({after})  # the previous lifespan has been torn down
        try:
            async with client():
                self.ready.set_result(None)
                await self._release.wait()
        except asyncio.CancelledError:
            if not self.ready.done():
                self.ready.cancel()
            raise
        except Exception as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            raise

    def release(self) -> None:
        self.released = True
        self._release.set()


class CampaignManager:
    def __init__(self, engine: Engine, clients: Clients, *, auto_resume: bool = True) -> None:
        self.engine = engine
        self.clients = clients
        self.home = engine.settings.home
        self.auto_resume = auto_resume
        self._store: CampaignStore | None = None
        self._store_lock = asyncio.Lock()
        self.runners: dict[str, CampaignRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.listeners: list[Callable[[str], None]] = []
        self._holds: dict[tuple[str, bool], _ServerHold] = {}
        self._serving = 0
        self.leases = CampaignLeases(self, engine.replicas) if engine.replicas else None

    @property
    def db_path(self) -> Path | str:
        """steering.db in home, or the engine's PostgreSQL store (a schema of its own there)."""
        return self.engine.settings.store_url or self.home / "steering.db"

    async def store(self) -> CampaignStore:
        async with self._store_lock:
            if self._store is None:
                self._store = await CampaignStore.open(self.db_path)
            return self._store

    # ------------------------------------------------------------------ MCP plumbing

    def client_factory(self, principal: Principal) -> Callable[[], Client[Any]]:
        return lambda: self.clients(principal)

    @contextlib.asynccontextmanager
    async def using_server(self, principal: Principal) -> AsyncIterator[None]:
        """The principal's in-memory server, kept running until the last user is done."""
        key = (principal.id, principal.admin)
        hold = self._holds.get(key)
        if hold is None or hold.released or hold.task.done():
            hold = _ServerHold(
                self.client_factory(principal), after=hold.task if hold is not None else None
            )
            self._holds[key] = hold
        hold.users += 1
        try:
            await asyncio.shield(hold.ready)  # a cancelled waiter must not cancel the others'
            yield
        finally:
            hold.users -= 1
            if hold.users == 0:
                hold.release()

    def notify(self, campaign_id: str) -> None:
        self.notify_local(campaign_id)
        if self.leases is not None:
            self.leases.updated(campaign_id)

    def notify_local(self, campaign_id: str) -> None:
        for listener in tuple(self.listeners):
            try:
                listener(campaign_id)
            except Exception:
                log.exception("campaign listener failed")

    # ------------------------------------------------------------------ authorisation

    async def _visible(self, principal: Principal, campaign_id: str) -> CampaignRecord:
        store = await self.store()
        rec = await store.get_campaign(campaign_id)
        if rec is not None and (principal.admin or rec.owner == principal.id):
            return rec
        if rec is not None and rec.event_id and rec.endpoint == "embedded":
            event = await self.engine.store.get_event(rec.event_id)
            if event is not None and event.role_of(principal) is not None:
                return rec
        raise NotFound(
            f"no campaign {campaign_id!r} visible to {principal.id}", field="campaign_id"
        )

    async def _operable(
        self, principal: Principal, rec: CampaignRecord, what: str = "stop it"
    ) -> None:
        if principal.admin or rec.owner == principal.id:
            return
        event = await self.engine.store.get_event(rec.event_id) if rec.event_id else None
        role = event.role_of(principal) if event else None
        if role is None or ROLE_RANK[role] < ROLE_RANK[Role.OPERATOR]:
            raise NotAllowed(
                f"{principal.id} may view campaign {rec.id} but not {what}; that needs the "
                "owner or an operator of its event",
                field="campaign_id",
            )

    # ------------------------------------------------------------------ operations

    async def validate(self, principal: Principal, spec: CampaignSpec) -> None:
        """Refuse at start what would fail every evaluation."""
        if not spec.objective.external:
            check_service(spec, [s.model_dump() for s in self.engine.list_services()])
        if spec.event_id is not None:
            # Its jobs are submitted to this event: the caller must be allowed to submit there.
            await self.engine.event_to_submit_to(principal, spec.event_id)
        if spec.site is not None and spec.site not in self.engine.backends:
            raise InvalidInput(
                f"site: unknown site {spec.site!r}; sites: {', '.join(self.engine.backends)}",
                field="site",
            )

    async def create(
        self, principal: Principal, spec: CampaignSpec, endpoint: str = "embedded"
    ) -> CampaignRecord:
        store = await self.store()
        rec = new_record(principal, spec, endpoint)
        await store.insert_campaign(rec)
        return rec

    async def start(self, principal: Principal, spec: CampaignSpec) -> CampaignView:
        """Validate, record and start a campaign in the background."""
        await self.validate(principal, spec)
        rec = await self.create(principal, spec)
        store = await self.store()
        await store.insert_action(_action(rec.id, principal, "start", {}))
        if self.leases is not None:
            await self.leases.take(rec.id)
        self.launch(rec)
        return await self.get(principal, rec.id, with_evals=False)

    def launch(self, rec: CampaignRecord) -> asyncio.Task[None]:
        """Run (or resume) an embedded campaign as a background task of this process."""
        task = self.tasks.get(rec.id)
        if task is not None and not task.done():
            return task
        runner: CampaignRunner
        if rec.spec.objective.external:
            runner = ExternalRunner(
                self._store_or_fail(),
                rec.id,
                campaign_dir(self.home, rec.id),
                on_update=self.notify,
            )
        else:
            runner = CampaignRunner(
                self._store_or_fail(),
                rec.id,
                self.client_factory(owner_of(rec)),
                campaign_dir(self.home, rec.id),
                on_update=self.notify,
            )
        self.runners[rec.id] = runner
        # A fresh context: the runner must not inherit the request that started it (the servers
        # it calls read the HTTP request and the access token from contextvars).
        task = asyncio.create_task(
            self._run(runner, owner_of(rec)),
            name=f"campaign-{rec.id}",
            context=contextvars.Context(),
        )
        self.tasks[rec.id] = task
        return task

    def _store_or_fail(self) -> CampaignStore:
        assert self._store is not None, "store() first"
        return self._store

    async def _run(self, runner: CampaignRunner, principal: Principal) -> None:
        try:
            if isinstance(runner, ExternalRunner):  # no jobs: no server of its own
                await runner.run()
            else:
                async with self.using_server(principal):
                    await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Left `running`: the next start resumes it; the reason says what happened.
            log.exception("campaign %s interrupted", runner.id)
            with contextlib.suppress(Exception):
                store = await self.store()
                await store.update_campaign(runner.id, reason=f"interrupted: {exc}"[:500])
        finally:
            self.runners.pop(runner.id, None)
            self.tasks.pop(runner.id, None)
            self.notify(runner.id)
            if self.leases is not None:
                with contextlib.suppress(Exception):
                    await self.leases.finished(runner.id)

    async def get(
        self, principal: Principal, campaign_id: str, with_evals: bool = True
    ) -> CampaignView:
        rec = await self._visible(principal, campaign_id)
        store = await self.store()
        evals = await store.evaluations(rec.id)
        actions = await store.actions(rec.id)
        return build_view(rec, evals, rec.id in self.runners, with_evals, actions)

    async def list_campaigns(
        self, principal: Principal, include_finished: bool = True
    ) -> CampaignList:
        store = await self.store()
        states = None if include_finished else [CampaignState.RUNNING]
        recs = await store.list_campaigns(None if principal.admin else principal.id, states)
        out = []
        for rec in recs:
            evals = await store.evaluations(rec.id)
            out.append(build_view(rec, evals, rec.id in self.runners, with_evals=False))
        return CampaignList(campaigns=out)

    async def stop(
        self, principal: Principal, campaign_id: str, cancel_in_flight: bool = True
    ) -> CampaignView:
        """Stop a campaign (idempotent). Its runner cancels (or lets finish) what is in flight
        and records everything; a campaign with no runner here is closed directly."""
        rec = await self._visible(principal, campaign_id)
        await self._operable(principal, rec)
        if rec.state.finished:
            return await self.get(principal, campaign_id)
        store = await self.store()
        await store.insert_action(
            _action(rec.id, principal, "stop", {"cancel_in_flight": cancel_in_flight})
        )
        await store.update_campaign(rec.id, stop_requested=True)
        runner = self.runners.get(rec.id)
        task = self.tasks.get(rec.id)
        if runner is not None and task is not None:
            runner.request_stop(cancel_in_flight)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
        elif self.leases is not None and await self.leases.run_elsewhere(rec.id):
            await self.leases.stop_elsewhere(rec.id, cancel_in_flight)
        else:
            await self._close_dormant(rec, cancel_in_flight)
        return await self.get(principal, campaign_id)

    async def _close_dormant(self, rec: CampaignRecord, cancel_in_flight: bool) -> None:
        store = await self.store()
        if rec.endpoint != "embedded":
            # Its runner talks to another server: record the stop; that runner ends it.
            return
        evals = await store.evaluations(rec.id)
        principal = owner_of(rec)
        async with self.using_server(principal), self.clients(principal) as client:
            for e in evals:
                if e.state.finished:
                    continue
                if e.entry_id and cancel_in_flight:
                    with contextlib.suppress(Exception):
                        await client.call_tool("cancel_entry", {"entry_id": e.entry_id})
                await store.update_evaluation(
                    rec.id,
                    e.seq,
                    state=EvalState.CANCELLED,
                    reason="stopped by request",
                    finished_at=now(),
                )
        await store.finish_campaign(rec.id, CampaignState.STOPPED, "stopped by request")
        self.notify(rec.id)

    async def wait(self, campaign_id: str) -> None:
        task = self.tasks.get(campaign_id)
        if task is not None:
            await asyncio.shield(task)

    # ------------------------------------------------------------------ ask / tell

    async def _external(self, principal: Principal, campaign_id: str) -> ExternalRunner | None:
        """The runner of an external campaign (started here if it is not running: a campaign
        is served by the server whose store holds it); None once the campaign has ended."""
        rec = await self._visible(principal, campaign_id)
        await self._operable(principal, rec, "measure for it")
        if not rec.spec.objective.external:
            raise InvalidInput(
                f"campaign_id: {rec.id} measures with the service {rec.spec.objective.service}; "
                "sciorch asks and tells itself (ask_campaign is for objective.kind = external)",
                field="campaign_id",
            )
        if rec.state.finished:
            return None
        if rec.endpoint != "embedded":
            raise InvalidInput(
                f"campaign_id: {rec.id} is run against {rec.endpoint}", field="campaign_id"
            )
        await self.store()
        if self.leases is not None:
            await self.leases.serve_here(rec.id)
        self.launch(rec)
        runner = self.runners.get(rec.id)
        if not isinstance(runner, ExternalRunner):
            return None
        await asyncio.wait_for(runner.ready.wait(), 60)
        return None if runner.ended else runner

    async def ask(
        self, principal: Principal, campaign_id: str, n: int, ask_key: str | None = None
    ) -> AskResult:
        runner = await self._external(principal, campaign_id)
        if runner is not None:
            return await runner.ask(n, ask_key)
        store = await self.store()
        rec = await self._visible(principal, campaign_id)
        evals = await store.evaluations(rec.id)
        return AskResult(
            campaign_id=rec.id,
            points=[],
            state=rec.state,
            done=True,
            told=sum(1 for e in evals if e.state == EvalState.SUCCEEDED),
            pending=0,
            budget=rec.spec.budget.evaluations,
            paused=rec.paused,
            reason=f"the campaign has ended: {rec.reason or rec.state.value}",
        )

    async def tell(self, principal: Principal, req: TellCampaignInput) -> TellResult:
        runner = await self._external(principal, req.campaign_id)
        if runner is not None:
            return await runner.tell(req)
        # Ended: a retried tell of a recorded point still gets its answer.
        store = await self.store()
        rec = await self._visible(principal, req.campaign_id)
        evals = await store.evaluations(rec.id)
        e = next((x for x in evals if req.tell_key and x.tell_key == req.tell_key), None)
        if e is None and req.point_id is not None:
            seq = seq_of(rec.id, req.point_id)
            e = next((x for x in evals if x.seq == seq and x.state == EvalState.SUCCEEDED), None)
        if e is None:
            raise InvalidInput(
                f"campaign_id: campaign {rec.id} has ended ({rec.state.value}); it records no "
                "more measurements",
                field="campaign_id",
            )
        view = build_view(rec, evals, False, with_evals=False)
        return TellResult(
            campaign_id=rec.id,
            point_id=e.point_id,
            seq=e.seq,
            recorded=False,
            value=e.value,
            state=rec.state,
            done=True,
            told=view.progress.succeeded,
            budget=view.progress.budget,
            best=view.best,
        )

    # ------------------------------------------------------------------ people in the loop

    async def _act(
        self, principal: Principal, campaign_id: str, action: str, arguments: dict[str, Any]
    ) -> CampaignRecord:
        """Check the caller may steer the campaign, and record what they do (before doing it)."""
        rec = await self._visible(principal, campaign_id)
        await self._operable(principal, rec, f"{action.replace('_', ' ')} it")
        if rec.state.finished and action != "annotate":
            raise InvalidInput(
                f"campaign_id: campaign {rec.id} has ended ({rec.state.value})",
                field="campaign_id",
            )
        store = await self.store()
        await store.insert_action(_action(rec.id, principal, action, arguments))
        return rec

    async def _changed(self, campaign_id: str) -> None:
        runner = self.runners.get(campaign_id)
        if runner is not None:
            if isinstance(runner, ExternalRunner):
                async with runner.lock:
                    await runner.reload()
            else:
                await runner.reload()
        self.notify(campaign_id)

    async def pause(
        self, principal: Principal, campaign_id: str, paused: bool, note: str | None = None
    ) -> CampaignView:
        rec = await self._act(
            principal, campaign_id, "pause" if paused else "resume", {"note": note}
        )
        store = await self.store()
        await store.update_campaign(rec.id, paused=paused)
        await self._changed(rec.id)
        return await self.get(principal, rec.id, with_evals=False)

    async def update(
        self,
        principal: Principal,
        campaign_id: str,
        budget: dict[str, Any] | None,
        stop: dict[str, Any] | None,
        note: str | None = None,
    ) -> CampaignView:
        rec = await self._visible(principal, campaign_id)
        data = rec.spec.model_dump(exclude_none=True)
        if budget:
            data["budget"] = {**data.get("budget", {}), **budget}
        if stop:
            data["stop"] = {**data.get("stop", {}), **stop}
        for section in ("budget", "stop"):  # an explicit null clears a field
            data[section] = {k: v for k, v in data.get(section, {}).items() if v is not None}
        spec = parse_spec(data)
        await self._act(
            principal, campaign_id, "update", {"budget": budget, "stop": stop, "note": note}
        )
        store = await self.store()
        await store.update_campaign(rec.id, spec=spec)
        await self._changed(rec.id)
        return await self.get(principal, rec.id, with_evals=False)

    async def add_points(
        self,
        principal: Principal,
        campaign_id: str,
        points: list[dict[str, Any]],
        note: str | None = None,
    ) -> CampaignView:
        rec = await self._visible(principal, campaign_id)
        checked = [check_point(rec.spec, p, f"points.{i}") for i, p in enumerate(points)]
        await self._act(principal, campaign_id, "add_points", {"points": checked, "note": note})
        store = await self.store()
        runner = self.runners.get(rec.id)
        first = await store.next_seq(rec.id)
        seqs = runner.reserve_seqs(len(checked)) if runner is not None else None
        for i, point in enumerate(checked):
            seq = seqs[i] if seqs is not None else first + i
            key = key_for(rec.id, seq, 1)
            await store.insert_evaluation(
                EvaluationRecord(
                    campaign_id=rec.id,
                    seq=seq,
                    point=point,
                    source="added",
                    state=EvalState.QUEUED,
                    idempotency_key=key,
                    attempts=[Attempt(attempt=1, idempotency_key=key)],
                    reason=f"added by {principal.id}",
                    asked_at=now(),
                )
            )
        await self._changed(rec.id)
        return await self.get(principal, rec.id, with_evals=False)

    async def reject(
        self, principal: Principal, campaign_id: str, pid: str, note: str | None = None
    ) -> CampaignView:
        """Keep a point out: not measured (cancelled if in flight), not told to the GP, and its
        neighbourhood not proposed again."""
        rec = await self._visible(principal, campaign_id)
        # before anything else: rejecting a rejected point changes nothing, but a viewer
        # is told no all the same
        await self._operable(principal, rec, "reject its points")
        seq = seq_of(rec.id, pid)
        store = await self.store()
        e = next((x for x in await store.evaluations(rec.id) if x.seq == seq), None)
        if e is None:
            raise NotFound(f"point_id: campaign {rec.id} has no point {pid!r}", field="point_id")
        if e.state == EvalState.SUCCEEDED:
            raise InvalidInput(
                f"point_id: {pid} is already measured; its value stays in the campaign",
                field="point_id",
            )
        if e.state != EvalState.REJECTED:
            await self._act(principal, campaign_id, "reject", {"point_id": pid, "note": note})
            reason = f"rejected by {principal.id}" + (f": {note}" if note else "")
            await store.update_evaluation(
                rec.id, seq, state=EvalState.REJECTED, reason=reason, finished_at=now()
            )
            await self._changed(rec.id)
        return await self.get(principal, rec.id, with_evals=False)

    async def annotate(self, principal: Principal, campaign_id: str, text: str) -> CampaignView:
        rec = await self._act(principal, campaign_id, "annotate", {"text": text})
        self.notify(rec.id)
        return await self.get(principal, rec.id, with_evals=False)

    async def export(
        self, principal: Principal, campaign_id: str, max_rows: int
    ) -> tuple[CampaignRecord, list[EvaluationRecord]]:
        rec = await self._visible(principal, campaign_id)
        store = await self.store()
        return rec, await store.evaluations(rec.id)

    # ------------------------------------------------------------------ server lifetime

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Held while a server over this engine runs (its MCP lifespan). The first resumes the
        campaigns left running (if auto_resume); the last to stop pauses the runners."""
        self._serving += 1
        if self._serving == 1 and self.auto_resume:
            try:
                resumed = await self.resume_all()
                if resumed:
                    log.info("resumed campaigns: %s", ", ".join(resumed))
            except Exception:
                log.exception("resuming campaigns failed")
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                await self.shutdown()

    async def resume_all(self) -> list[str]:
        """Start a runner for every embedded campaign left running (server start); with
        replicas, for those whose leases this replica takes (now or when they come free)."""
        if self.leases is not None:
            await self.store()
            return await self.leases.resume()
        store = await self.store()
        recs = await store.list_campaigns(states=[CampaignState.RUNNING], endpoint="embedded")
        started = []
        for rec in recs:
            if rec.id not in self.tasks:
                log.info("resuming campaign %s (%s)", rec.id, rec.name)
                self.launch(rec)
                started.append(rec.id)
        return started

    async def shutdown(self) -> None:
        """Stop the runners (their campaigns stay `running`, to be resumed) and the store."""
        if self.leases is not None:
            self.leases.pause()
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self.tasks.clear()
        self.runners.clear()
        holds = list(self._holds.values())
        for hold in holds:
            hold.release()
        for hold in holds:
            with contextlib.suppress(BaseException):
                await hold.task
        self._holds.clear()
        if self._store is not None:
            await self._store.close()
            self._store = None
