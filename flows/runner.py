"""One flow run, driven to its end: steps start as soon as the steps they need have ended, each
through the engine's typed operations (no polling: the engine's bus says when an entry ends).

Restart rule: a step's row (state, attempt) is written before its job is submitted, and the job
is submitted with the idempotency key `flow:<run>:<step key>:<attempt>`. A runner resumed after
a crash finds each step where it was: one with an entry id waits for that entry (which the
engine re-adopted), one without submits again with the same key, which returns the entry if the
first submission had reached the engine. So no step's job runs twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from flows.expr import Missing, render
from flows.models import RunRecord, RunState, StepRecord, StepState
from flows.spec import FlowSpec, StepSpec
from flows.store import FlowStore, now
from ground.errors import SciorchError, invalid_input
from ground.models import EntryState, Principal
from orchestrator.engine import Engine
from tools.models import SearchResultsInput
from tools.operations import search_results

log = logging.getLogger("sciorch.flows")


class StepFailed(Exception):
    """A step's attempt ended without success; `retry` says whether another may help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def step_key(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


class FlowRunner:
    def __init__(
        self,
        engine: Engine,
        store: FlowStore,
        run: RunRecord,
        notify: Callable[[str], None],
        approvals: dict[tuple[str, str], asyncio.Event],
    ) -> None:
        self.engine = engine
        self.store = store
        self.run_id = run.id
        self.run = run
        self.spec = FlowSpec.model_validate(run.spec)
        self.principal = Principal(id=run.owner, claims=tuple(run.owner_claims))
        self.notify = notify
        self.approvals = approvals
        self.rows: dict[str, StepRecord] = {}
        self.services: list[str] = []  # service entries launched by this run, stopped at its end

    # ------------------------------------------------------------------ the run

    async def drive(self) -> None:
        run = self.run
        if run.state == RunState.QUEUED:
            await self.store.update_run(run.id, state=RunState.RUNNING, started_at=now())
            self.notify(run.id)
        self.rows = {r.key: r for r in await self.store.steps(run.id)}
        tasks: dict[str, asyncio.Task[None]] = {}
        failure: str | None = None
        try:
            while True:
                if failure is None:
                    failure = await self._expand()
                for key, row in self.rows.items():
                    if failure is not None or len(tasks) >= self.spec.max_parallel:
                        break
                    if not row.state.terminal and key not in tasks:
                        tasks[key] = asyncio.create_task(self._execute(key), name=key)
                if not tasks:
                    break
                done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
                for key in [k for k, t in tasks.items() if t in done]:
                    tasks.pop(key).result()  # an unexpected error ends the runner loudly
                    row = self.rows[key]
                    step = self.spec.steps[row.step]
                    if row.state == StepState.FAILED and step.on_failure == "fail":
                        failure = failure or f"step {key} failed: {row.error}"
                if failure is not None and tasks:
                    for t in tasks.values():
                        t.cancel()
                    await asyncio.gather(*tasks.values(), return_exceptions=True)
                    tasks.clear()
                    await self._cancel_in_flight("run failed")
            if failure is not None:
                await self._skip_rest("run failed")
                await self._finish(RunState.FAILED, failure)
                return
            try:
                outputs = render(self.spec.outputs, self.context())
            except Missing as exc:
                await self._finish(RunState.FAILED, f"outputs: {exc}")
                return
            await self._finish(RunState.SUCCEEDED, None, outputs)
        except asyncio.CancelledError:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise

    async def cancel(self, reason: str) -> None:
        """Called after this runner's task was cancelled, for a run that is to end now."""
        await self._cancel_in_flight(reason)
        await self._skip_rest(reason, StepState.CANCELLED)
        await self._finish(RunState.CANCELLED, reason)

    async def _finish(self, state: RunState, reason: str | None, outputs: Any = None) -> None:
        for entry_id in self.services:
            try:
                await self.engine.cancel(self.principal, entry_id)
            except SciorchError as exc:
                log.warning("run %s: stopping service %s: %s", self.run_id, entry_id, exc)
        await self.store.finish_run(self.run_id, state, reason, outputs)
        self.notify(self.run_id)

    async def _cancel_in_flight(self, reason: str) -> None:
        for key, row in self.rows.items():
            if row.state in (StepState.RUNNING, StepState.WAITING):
                if row.entry_id is not None:
                    try:
                        await self.engine.cancel(self.principal, row.entry_id)
                    except SciorchError as exc:
                        log.warning("run %s: cancelling %s: %s", self.run_id, key, exc)
                await self._set(key, state=StepState.CANCELLED, error=reason, finished_at=now())

    async def _skip_rest(self, reason: str, state: StepState = StepState.SKIPPED) -> None:
        for key, row in self.rows.items():
            if not row.state.terminal:
                await self._set(key, state=state, error=reason, finished_at=now())

    # ------------------------------------------------------------------ steps

    def context(self, row: StepRecord | None = None) -> dict[str, Any]:
        steps: dict[str, Any] = {}
        for name, spec in self.spec.steps.items():
            rows = [r for r in self.rows.values() if r.step == name]
            if not rows:
                continue
            if spec.for_each is None:
                r = rows[0]
                view: dict[str, Any] = {"state": r.state.value, "entry_id": r.entry_id}
                if r.state == StepState.SUCCEEDED:
                    view["result"] = r.result
            else:
                items = sorted((r for r in rows if r.item_index is not None), key=_index)
                view = {
                    "state": _overall(rows),
                    "entry_ids": [r.entry_id for r in items],
                    "items": [r.item for r in items],
                }
                if all(r.state == StepState.SUCCEEDED for r in rows):
                    view["result"] = [r.result for r in items]
            steps[name] = view
        ctx: dict[str, Any] = {
            "inputs": self.run.inputs,
            "trigger": self.run.trigger_info or {},
            "run": {"id": self.run_id, "event_id": self.run.event_id, "flow": self.spec.name},
            "steps": steps,
        }
        if row is not None and row.item_index is not None:
            ctx["item"] = row.item
            ctx["index"] = row.item_index
        return ctx

    async def _expand(self) -> str | None:
        """Write the rows of every step whose needs have all ended (once each). Returns the
        run's failure when a step failed already here (its for_each named no list)."""
        failure = None
        expanded = {r.step for r in self.rows.values()}
        for name, step in self.spec.steps.items():
            if name in expanded:
                continue
            needs = [r for r in self.rows.values() if r.step in step.needs]
            if len({r.step for r in needs}) < len(step.needs):
                continue  # a need not expanded yet
            if not all(r.state.terminal for r in needs):
                continue
            if step.for_each is None:
                await self._add(
                    StepRecord(run_id=self.run_id, key=name, step=name, state=StepState.PENDING)
                )
                continue
            error = None
            try:
                items = render("{" + step.for_each.strip().strip("{}") + "}", self.context())
            except Missing as exc:
                error = f"for_each: {exc}"
            else:
                if not isinstance(items, list):
                    error = f"for_each must name a list, got {type(items).__name__}"
            if error is not None:
                await self._add(
                    StepRecord(
                        run_id=self.run_id,
                        key=name,
                        step=name,
                        state=StepState.FAILED,
                        error=error,
                        finished_at=now(),
                    )
                )
                if step.on_failure == "fail":
                    failure = failure or f"step {name} failed: {error}"
                continue
            for i, item in enumerate(items):
                await self._add(
                    StepRecord(
                        run_id=self.run_id,
                        key=step_key(name, i),
                        step=name,
                        item_index=i,
                        item=item,
                        state=StepState.PENDING,
                    )
                )
            if not items:  # nothing to fan out over: the step is done, with no results
                await self._add(
                    StepRecord(
                        run_id=self.run_id,
                        key=name,
                        step=name,
                        state=StepState.SUCCEEDED,
                        result=[],
                        finished_at=now(),
                    )
                )
        return failure

    async def _add(self, row: StepRecord) -> None:
        await self.store.insert_step(row)
        self.rows[row.key] = row
        self.notify(self.run_id)

    async def _set(self, key: str, **fields: Any) -> None:
        await self.store.update_step(self.run_id, key, **fields)
        self.rows[key] = self.rows[key].model_copy(update=fields)
        self.notify(self.run_id)

    async def _execute(self, key: str) -> None:
        row = self.rows[key]
        step = self.spec.steps[row.step]
        if step.kind == "record":
            try:
                values = render(step.values, self.context(row))
            except Missing as exc:
                await self._set(key, state=StepState.FAILED, error=str(exc), finished_at=now())
                return
            await self._set(
                key, state=StepState.SUCCEEDED, result=values, started_at=now(), finished_at=now()
            )
            return
        if step.kind == "approval":
            await self._approval(key, row)
            return
        if step.kind == "search":
            await self._search(key, row, step)
            return
        attempts = step.retries + 1
        attempt = max(row.attempt, 1)
        while True:
            try:
                result = await self._attempt(key, step, attempt)
            except StepFailed as exc:
                error = str(exc)
                if exc.retry and attempt < attempts:
                    log.info("run %s: %s attempt %d failed: %s", self.run_id, key, attempt, error)
                    await self._set(key, error=error)
                    await asyncio.sleep(step.retry_delay_s * 2 ** (attempt - 1))
                    attempt += 1
                    continue
                tried = f" (after {attempt} attempts)" if attempt > 1 else ""
                await self._set(key, state=StepState.FAILED, error=error + tried, finished_at=now())
                return
            await self._set(
                key, state=StepState.SUCCEEDED, result=result, error=None, finished_at=now()
            )
            return

    async def _attempt(self, key: str, step: StepSpec, attempt: int) -> Any:
        row = self.rows[key]
        if row.entry_id is None or row.attempt != attempt:
            try:
                params = render(step.parameters, self.context(row))
                inputs = render(step.inputs, self.context(row))
            except Missing as exc:
                raise StepFailed(f"parameters: {exc}", retry=False) from None
            await self._set(
                key, state=StepState.RUNNING, attempt=attempt, entry_id=None, started_at=now()
            )
            service, _, version = (step.service or "").partition("@")
            try:
                entry = await self.engine.launch(
                    self.principal,
                    service,
                    params,
                    event_id=self.run.event_id,
                    site=step.site,
                    idempotency_key=f"flow:{self.run_id}:{key}:{attempt}",
                    kind=step.kind,
                    version=version or None,
                    priority=step.priority,
                    inputs=inputs or None,
                )
            except SciorchError as exc:
                # Refused before anything ran (bad parameters, no site): retrying cannot help
                # unless it is the site that is missing.
                raise StepFailed(exc.text(), retry=exc.code == "no_site") from None
            await self._set(key, entry_id=entry.id)
            if step.kind == "service":
                self.services.append(entry.id)
        entry_id = self.rows[key].entry_id
        assert entry_id is not None
        timeout = step.timeout_s
        started = self.rows[key].started_at
        if timeout is not None and started is not None:
            timeout = max(0.0, timeout - (now() - started).total_seconds())
        entry, timed_out = await self.engine.wait_entry(self.principal, entry_id, timeout)
        if timed_out:
            await self.engine.cancel(self.principal, entry_id)
            raise StepFailed(f"timed out after {step.timeout_s:g} s (entry {entry_id})")
        if step.kind == "service" and entry.state == EntryState.READY:
            return {"entry_id": entry.id, "url": entry.url, "endpoint": entry.endpoint}
        if entry.state == EntryState.SUCCEEDED:
            return entry.result
        why = entry.reason or entry.state.value
        raise StepFailed(f"entry {entry.id} {entry.state.value}: {why}")

    async def _search(self, key: str, row: StepRecord, step: StepSpec) -> None:
        """A catalogue step: the rows of a search_results query, as the run's owner sees them
        (the result is {"rows": [...], "count": n})."""
        await self._set(key, state=StepState.RUNNING, attempt=1, started_at=now())
        try:
            query = render(step.query or "", self.context(row))
            filters = render(step.search, self.context(row))
            req = SearchResultsInput.model_validate({**filters, "query": query})
            page = await search_results(self.engine, self.principal, req)
        except Missing as exc:
            await self._set(key, state=StepState.FAILED, error=str(exc), finished_at=now())
            return
        except ValidationError as exc:
            err = invalid_input(exc)
            await self._set(key, state=StepState.FAILED, error=err.text(), finished_at=now())
            return
        except SciorchError as exc:
            await self._set(key, state=StepState.FAILED, error=exc.text(), finished_at=now())
            return
        rows = [r.model_dump(mode="json") for r in page.rows]
        await self._set(
            key,
            state=StepState.SUCCEEDED,
            result={"rows": rows, "count": len(rows)},
            finished_at=now(),
        )

    async def _approval(self, key: str, row: StepRecord) -> None:
        if row.state != StepState.WAITING:
            await self._set(key, state=StepState.WAITING, started_at=now())
        wake = self.approvals.setdefault((self.run_id, key), asyncio.Event())
        while True:
            fresh = next((r for r in await self.store.steps(self.run_id) if r.key == key), None)
            if fresh is not None and fresh.state.terminal:
                self.rows[key] = fresh
                self.notify(self.run_id)
                return
            await wake.wait()
            wake.clear()


def _index(row: StepRecord) -> int:
    return row.item_index if row.item_index is not None else -1


def _overall(rows: list[StepRecord]) -> str:
    states = {r.state for r in rows}
    if states == {StepState.SUCCEEDED}:
        return "succeeded"
    if StepState.FAILED in states:
        return "failed"
    if all(s.terminal for s in states):
        return "ended"
    return "running"
