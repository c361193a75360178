"""The flows of one engine: starting, resuming, cancelling and approving runs, and the triggers
that start them. One manager per engine (`flow_manager`); the MCP server's lifespan holds
`serving()`, which resumes the runs left running and starts the triggers.

Who may do what follows the run's event: a run is visible to every principal of its event,
cancelled or approved by its owner or an operator of the event.

Back-pressure: a trigger's runs beyond its `max_concurrent` wait in the store as `queued`
rows, not in memory, and start oldest first as running ones end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from flows.leases import APPROVED, CANCEL, LEASE, START, TRIGGERS, UPDATED, FlowLeases
from flows.models import (
    ApproveStepInput,
    CreateTriggerInput,
    FlowRunList,
    FlowRunSummary,
    FlowRunView,
    ListFlowRunsInput,
    RunRecord,
    RunState,
    StartFlowInput,
    StepState,
    StepView,
    TriggerKind,
    TriggerList,
    TriggerRecord,
    TriggerView,
)
from flows.runner import FlowRunner
from flows.spec import FLOW_NAME, FlowSpec, load_flow, parse_flow
from flows.store import FlowStore, now
from flows.triggers import TriggerWatch, check_trigger
from ground.errors import Conflict, InvalidInput, NotFound
from ground.models import Principal, Role
from orchestrator.engine import Engine

log = logging.getLogger("sciorch.flows")

_MANAGERS: weakref.WeakKeyDictionary[Engine, FlowManager] = weakref.WeakKeyDictionary()
FLOW_SUFFIXES = (".yaml", ".yml", ".toml")


def flow_manager(engine: Engine, *, auto_resume: bool | None = None) -> FlowManager:
    """The one manager of an engine. `auto_resume=False` (the CLI's in-memory server): serving
    neither resumes the runs left running nor starts triggers; a server does both."""
    mgr = _MANAGERS.get(engine)
    if mgr is None:
        mgr = _MANAGERS[engine] = FlowManager(engine)
        engine.closers.append(mgr.shutdown)  # its store must not outlive the engine's
    if auto_resume is not None:
        mgr.auto_resume = auto_resume
    return mgr


def new_run_id() -> str:
    return f"run-{secrets.token_hex(6)}"


class FlowManager:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._store: FlowStore | None = None
        self._store_lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.runners: dict[str, FlowRunner] = {}
        self.listeners: list[Callable[[str], None]] = []
        self.approvals: dict[tuple[str, str], asyncio.Event] = {}
        self._serving = 0
        self._triggers: Any = None  # flows.triggers.TriggerWatch while serving
        self.auto_resume = True
        self._queue_lock = asyncio.Lock()
        self._cancelling: dict[str, str] = {}  # run id -> who asked, while it is cancelled
        self.leases = FlowLeases(self, engine.replicas) if engine.replicas else None

    @property
    def flow_dirs(self) -> list[Path]:
        settings = self.engine.settings
        return [*settings.flow_dirs, settings.home / "flows"]

    async def store(self) -> FlowStore:
        async with self._store_lock:
            if self._store is None:
                settings = self.engine.settings
                self._store = await FlowStore.open(settings.store_url or settings.home / "flows.db")
            return self._store

    def notify(self, run_id: str) -> None:
        self.notify_local(run_id)
        if self.leases is not None:
            self.leases.signal(UPDATED, id=run_id)

    def notify_local(self, run_id: str) -> None:
        for listener in tuple(self.listeners):
            listener(run_id)

    @property
    def drives_here(self) -> bool:
        """Whether this replica drives the runs (always, without replicas)."""
        return self.leases is None or self.leases.here

    # ------------------------------------------------------------------ definitions

    def flow_named(self, name: str) -> FlowSpec:
        # A name, not a path: nothing outside the flow directories can be read through it.
        if not re.fullmatch(FLOW_NAME, name):
            raise InvalidInput(
                f"flow {name[:80]!r} is not a flow's name (lower-case letters, digits, - and _) "
                "nor an object",
                field="flow",
            )
        for folder in self.flow_dirs:
            for suffix in FLOW_SUFFIXES:
                path = folder / f"{name}{suffix}"
                if path.is_file():
                    return load_flow(path)
        where = ", ".join(str(d) for d in self.flow_dirs)
        raise NotFound(f"no flow named {name!r} in {where}", field="flow")

    def list_flows(self) -> list[FlowSpec]:
        found: dict[str, FlowSpec] = {}
        for folder in self.flow_dirs:
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.suffix in FLOW_SUFFIXES and path.stem not in found:
                        with contextlib.suppress(InvalidInput):
                            found[path.stem] = load_flow(path)
        return list(found.values())

    def definition(self, flow: str | dict[str, Any]) -> FlowSpec:
        """A flow by name, or the flow given whole (its errors name `flow.<field>`)."""
        if isinstance(flow, str):
            return self.flow_named(flow)
        try:
            return parse_flow(flow)
        except InvalidInput as exc:
            exc.field = f"flow.{exc.field}" if exc.field else "flow"
            raise

    # ------------------------------------------------------------------ runs

    async def start(self, who: Principal, req: StartFlowInput) -> FlowRunView:
        spec = self.definition(req.flow)
        inputs = spec.resolve_inputs(req.inputs)
        event = await self.engine.event_to_submit_to(who, req.event_id)
        rec = await self._insert(who, spec, event.id, inputs, None, None, req.idempotency_key)
        if rec.state == RunState.RUNNING:
            if self.drives_here:
                self.launch(rec)
            else:
                assert self.leases is not None
                self.leases.signal(START, id=rec.id)
        return await self.view(rec.id)

    async def start_signalled(self, run_id: str) -> None:
        """A run started or queued through another replica: drive it here."""
        store = await self.store()
        rec = await store.get_run(run_id)
        if rec is None:
            return
        if rec.state == RunState.RUNNING:
            self.launch(rec)
        elif rec.state == RunState.QUEUED and rec.trigger_id is not None:
            trigger = await store.get_trigger(rec.trigger_id)
            if trigger is not None:
                await self.start_queued(trigger)

    async def _insert(
        self,
        owner: Principal,
        spec: FlowSpec,
        event_id: str,
        inputs: dict[str, Any],
        trigger: TriggerRecord | None,
        info: dict[str, Any] | None,
        key: str | None,
    ) -> RunRecord:
        at = now()
        store = await self.store()
        rec = RunRecord(
            id=new_run_id(),
            flow=spec.name,
            spec=spec.model_dump(mode="json"),
            owner=owner.id,
            owner_claims=list(owner.claims),
            event_id=event_id,
            inputs=inputs,
            trigger_info=info,
            trigger_id=trigger.id if trigger else None,
            state=RunState.QUEUED if trigger else RunState.RUNNING,
            idempotency_key=key,
            created_at=at,
            started_at=None if trigger else at,
            updated_at=at,
        )
        got = await store.insert_run(rec)
        if got.id == rec.id:
            self.notify(rec.id)
        return got

    def launch(self, rec: RunRecord) -> None:
        if rec.id in self.tasks or rec.state.terminal:
            return

        async def go() -> None:
            store = await self.store()
            runner = FlowRunner(self.engine, store, rec, self.notify, self.approvals)
            self.runners[rec.id] = runner
            try:
                await runner.drive()
            except asyncio.CancelledError:
                if rec.id in self._cancelling:
                    await runner.cancel(f"cancelled by {self._cancelling[rec.id]}")
                raise
            except Exception as exc:
                log.exception("run %s failed in the runner", rec.id)
                await store.finish_run(rec.id, RunState.FAILED, f"runner error: {exc}")
                self.notify(rec.id)
            finally:
                self.runners.pop(rec.id, None)
                self._cancelling.pop(rec.id, None)
                for k in [k for k in self.approvals if k[0] == rec.id]:
                    del self.approvals[k]

        task = asyncio.create_task(go(), name=f"flow-run {rec.id}")
        self.tasks[rec.id] = task
        task.add_done_callback(lambda _t: self._ended(rec))

    def _ended(self, rec: RunRecord) -> None:
        self.tasks.pop(rec.id, None)
        if self._serving and self._triggers is not None:
            self._triggers.run_ended(rec)

    async def _visible(self, who: Principal, run_id: str, need: Role = Role.VIEWER) -> RunRecord:
        store = await self.store()
        rec = await store.get_run(run_id)
        if rec is None:
            raise NotFound(f"no flow run {run_id!r} visible to {who.id}", field="run_id")
        if rec.owner == who.id or who.admin:
            return rec
        try:
            event = await self.engine.get_event(who, rec.event_id)
        except NotFound:
            raise NotFound(f"no flow run {run_id!r} visible to {who.id}", field="run_id") from None
        role = event.role_of(who)
        if need != Role.VIEWER and role not in (Role.OPERATOR, Role.OWNER):
            raise NotFound(
                f"{who.id} is {role.value if role else 'nobody'} on event {rec.event_id}; "
                f"this needs {need.value}",
                field="run_id",
            )
        return rec

    async def get(self, who: Principal, run_id: str) -> FlowRunView:
        await self._visible(who, run_id)
        return await self.view(run_id)

    async def view(self, run_id: str) -> FlowRunView:
        store = await self.store()
        rec = await store.get_run(run_id)
        assert rec is not None
        spec = FlowSpec.model_validate(rec.spec)
        rows = await store.steps(run_id)
        steps = [
            StepView(
                key=r.key,
                step=r.step,
                kind=spec.steps[r.step].kind,
                state=r.state,
                attempt=r.attempt,
                entry_id=r.entry_id,
                result=r.result,
                error=r.error,
                started_at=r.started_at,
                finished_at=r.finished_at,
            )
            for r in rows
        ]
        # Steps not reached: pending while the run goes on, skipped once it has ended.
        reached = {r.step for r in rows}
        later = StepState.SKIPPED if rec.state.terminal else StepState.PENDING
        steps += [
            StepView(key=name, step=name, kind=step.kind, state=later, attempt=0, entry_id=None)
            for name, step in spec.steps.items()
            if name not in reached
        ]
        return FlowRunView(
            run_id=rec.id,
            flow=rec.flow,
            state=rec.state,
            reason=rec.reason,
            event_id=rec.event_id,
            owner=rec.owner,
            inputs=rec.inputs,
            trigger=rec.trigger_info,
            outputs=rec.outputs,
            steps=steps,
            created_at=rec.created_at,
            started_at=rec.started_at,
            finished_at=rec.finished_at,
        )

    async def list_runs(self, who: Principal, req: ListFlowRunsInput) -> FlowRunList:
        store = await self.store()
        events = [e.id for e in await self.engine.list_events(who, include_inactive=True)]
        recs = await store.list_runs(
            owners=None if who.admin else [who.id],
            event_ids=None if who.admin else events,
            flow=req.flow,
            states=req.states,
            limit=req.limit,
        )
        out = []
        for rec in recs:
            rows = await store.steps(rec.id)
            unreached = set(FlowSpec.model_validate(rec.spec).steps) - {r.step for r in rows}
            out.append(
                FlowRunSummary(
                    run_id=rec.id,
                    flow=rec.flow,
                    state=rec.state,
                    reason=rec.reason,
                    steps_done=sum(r.state.terminal for r in rows),
                    steps=len(rows) + len(unreached),
                    created_at=rec.created_at,
                    finished_at=rec.finished_at,
                )
            )
        return FlowRunList(runs=out)

    async def cancel(self, who: Principal, run_id: str) -> FlowRunView:
        """Cancel a run: its jobs in flight are cancelled, its steps not run. Idempotent."""
        rec = await self._visible(who, run_id, Role.OPERATOR)
        if rec.state.terminal:
            return await self.view(run_id)
        if run_id in self.tasks:
            await self.cancel_here(run_id, who.id)
        elif rec.state == RunState.RUNNING and not self.drives_here:
            assert self.leases is not None
            self.leases.signal(CANCEL, id=run_id, by=who.id)
            await self.leases.until_ended(run_id)
        else:  # queued, or left running by a runner that is gone
            store = await self.store()
            await store.finish_run(run_id, RunState.CANCELLED, f"cancelled by {who.id}")
            self.notify(run_id)
        return await self.view(run_id)

    async def cancel_here(self, run_id: str, by: str) -> None:
        task = self.tasks.get(run_id)
        if task is None:
            return
        self._cancelling[run_id] = by
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def approve(self, who: Principal, req: ApproveStepInput) -> FlowRunView:
        rec = await self._visible(who, req.run_id, Role.OPERATOR)
        store = await self.store()
        row = next((r for r in await store.steps(rec.id) if r.key == req.step), None)
        if row is None or FlowSpec.model_validate(rec.spec).steps[row.step].kind != "approval":
            raise NotFound(f"run {rec.id} has no approval step {req.step!r} yet", field="step")
        if row.state.terminal:
            approved = row.state == StepState.SUCCEEDED
            if approved != req.approve:
                raise Conflict(
                    f"step {req.step} was already {'approved' if approved else 'refused'}",
                    field="approve",
                )
            return await self.view(rec.id)
        result = {"approved": req.approve, "by": who.id, "note": req.note}
        await store.update_step(
            rec.id,
            req.step,
            state=StepState.SUCCEEDED if req.approve else StepState.FAILED,
            result=result,
            error=None
            if req.approve
            else f"refused by {who.id}" + (f": {req.note}" if req.note else ""),
            finished_at=now(),
        )
        await self.wake_approval(rec.id, req.step)
        if self.leases is not None:
            self.leases.signal(APPROVED, id=rec.id, step=req.step)
        self.notify(rec.id)
        return await self.view(rec.id)

    async def wake_approval(self, run_id: str, step: str) -> None:
        wake = self.approvals.get((run_id, step))
        if wake is not None:
            wake.set()

    # ------------------------------------------------------------------ triggers

    async def create_trigger(self, who: Principal, req: CreateTriggerInput) -> TriggerView:
        spec = self.definition(req.flow)
        spec.resolve_inputs(req.inputs)  # what every run gets must already be valid
        config = check_trigger(req)
        event = await self.engine.event_to_submit_to(who, req.event_id)
        rec = TriggerRecord(
            id=f"trg-{secrets.token_hex(6)}",
            owner=who.id,
            owner_claims=list(who.claims),
            flow=spec.name,
            spec=spec.model_dump(mode="json"),
            kind=req.kind,
            config=config,
            event_id=event.id,
            inputs=req.inputs,
            max_concurrent=req.max_concurrent,
            secret=secrets.token_urlsafe(32) if req.kind == TriggerKind.WEBHOOK else None,
            created_at=now(),
            cursor={"since": now().timestamp()},
        )
        store = await self.store()
        await store.insert_trigger(rec)
        self._triggers_changed(rec.id)
        return self.trigger_view(rec, show_secret=True)

    def _triggers_changed(self, trigger_id: str) -> None:
        if self._triggers is not None:
            self._triggers.spawn(self.reload_trigger(trigger_id))
        elif self.leases is not None:
            self.leases.signal(TRIGGERS, id=trigger_id)

    async def reload_trigger(self, trigger_id: str) -> None:
        """Watch the trigger as the store has it now (added, or deleted)."""
        if self._triggers is None:
            return
        store = await self.store()
        rec = await store.get_trigger(trigger_id)
        if rec is not None and rec.active:
            self._triggers.add(rec)
        else:
            self._triggers.remove(trigger_id)

    def trigger_view(self, rec: TriggerRecord, show_secret: bool = False) -> TriggerView:
        url = None
        if rec.kind == TriggerKind.WEBHOOK:
            url = self.engine.settings.public_url.rstrip("/") + f"/flows/hooks/{rec.id}"
        return TriggerView(
            trigger_id=rec.id,
            flow=rec.flow,
            kind=rec.kind,
            config=rec.config,
            event_id=rec.event_id,
            max_concurrent=rec.max_concurrent,
            active=rec.active,
            created_at=rec.created_at,
            webhook_url=url,
            secret=rec.secret if show_secret else None,
        )

    async def list_triggers(self, who: Principal) -> TriggerList:
        store = await self.store()
        recs = await store.list_triggers(None if who.admin else who.id)
        return TriggerList(triggers=[self.trigger_view(r) for r in recs])

    async def delete_trigger(self, who: Principal, trigger_id: str) -> TriggerView:
        """Stop a trigger; its queued runs stay queued until cancelled. Idempotent."""
        store = await self.store()
        rec = await store.get_trigger(trigger_id)
        if rec is None or (rec.owner != who.id and not who.admin):
            raise NotFound(f"no trigger {trigger_id!r} of {who.id}", field="trigger_id")
        await store.update_trigger(trigger_id, active=False)
        self._triggers_changed(trigger_id)
        return self.trigger_view(rec.model_copy(update={"active": False}))

    async def fire(self, trigger: TriggerRecord, info: dict[str, Any], key: str) -> RunRecord:
        """Queue one run of `trigger` (once per `key`: a file, a tick, a delivery) and start
        what its concurrency limit allows."""
        spec = FlowSpec.model_validate(trigger.spec)
        rec = await self._insert(
            Principal(id=trigger.owner, claims=tuple(trigger.owner_claims)),
            spec,
            trigger.event_id,
            spec.resolve_inputs(trigger.inputs),
            trigger,
            info,
            f"trigger:{trigger.id}:{key}",
        )
        if self.drives_here:
            await self.start_queued(trigger)
        else:
            assert self.leases is not None
            self.leases.signal(START, id=rec.id)
        return rec

    def campaign_changed(self, campaign_id: str, owner: str, state: str, evaluations: int) -> None:
        """What the campaigns' manager reports (wired by the server): campaign triggers fire
        where the runs are driven."""
        if self._triggers is not None:
            self._triggers.spawn(
                self._triggers.campaign_progress(campaign_id, owner, state, evaluations)
            )

    async def start_queued(self, trigger: TriggerRecord) -> None:
        # One at a time, and each run marked running before the next count: two ends at once
        # must not both start the same free slot's run.
        async with self._queue_lock:
            store = await self.store()
            running = await store.count_runs(trigger.id, RunState.RUNNING)
            room = trigger.max_concurrent - running
            if room <= 0:
                return
            for rec in await store.oldest_queued(trigger.id, room):
                at = now()
                await store.update_run(rec.id, state=RunState.RUNNING, started_at=at)
                self.launch(rec.model_copy(update={"state": RunState.RUNNING, "started_at": at}))

    # ------------------------------------------------------------------ serving

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Held while a server over this engine runs: the first resumes the runs left running
        and starts the triggers; the last to stop stops them (runs stay `running`)."""
        self._serving += 1
        if self._serving == 1 and self.auto_resume:
            try:
                if self.leases is not None:
                    await self.leases.serve()
                else:
                    await self.drive_here()
            except Exception:
                log.exception("resuming flows failed")
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                await self.shutdown()

    async def drive_here(self) -> None:
        """Resume the runs left running, start the queued ones the limits allow, watch the
        triggers (at a server's start, or when this replica gains the `flows` lease)."""
        store = await self.store()
        for rec in await store.list_runs(states=[RunState.RUNNING], limit=100_000):
            log.info("resuming flow run %s (%s)", rec.id, rec.flow)
            self.launch(rec)
        self._triggers = TriggerWatch(self)
        await self._triggers.start()

    async def stop_here(self) -> None:
        """Stop driving (the lease went to another replica, or the server stops): the runs
        stay `running` in the store, for whoever drives next."""
        if self._triggers is not None:
            await self._triggers.stop()
            self._triggers = None
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        await self.stop_here()
        if self.leases is not None and self.leases.here:
            await self.leases.keeper.release(LEASE)  # the next replica need not wait it out
        if self._store is not None:
            await self._store.close()
            self._store = None
