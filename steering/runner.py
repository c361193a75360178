"""The closed loop: ask -> submit_job -> react to each result as it arrives -> tell -> ask again,
keeping `batch_size` evaluations in flight. It talks to sciorch only through MCP tools
(`create_event`, `list_services`, `submit_job`, `wait_entry`, `read_results`, `cancel_entry`),
so the same loop drives the embedded engine (in-memory client) or a remote server (HTTP).

Waiting is event-driven: one `wait_entry` call per evaluation in flight, as concurrent tasks
(the server holds each call until the entry finishes), and the loop wakes on the first to
return. GP work runs in a worker thread; hyperparameter training for n >= 100 runs in a child
process while the loop keeps deciding.

Persistence and resume (steering.store): an evaluation is written as `asked`, with its
idempotency key `<campaign>-<seq>-<attempt>`, before submit_job is called; the entry id is
written as soon as submit_job answers; the result when wait_entry returns. On start the runner
reads that back: finished evaluations are told to the GP; `submitted` ones are waited on again
(re-adopted by entry id); `asked` ones are submitted again with the same key, so if the first
submission did reach the server, submit_job returns that same entry instead of a second one.
Nothing is evaluated twice by accident, and nothing is dropped: a failed evaluation is retried
`retries` times with a new key, then recorded as failed (and kept out of future asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ground.errors import InvalidInput, SciorchError
from orchestrator.locks import try_lock
from steering.client import ToolFailed, Tools
from steering.models import (
    Attempt,
    CampaignRecord,
    CampaignState,
    EvalState,
    EvaluationRecord,
)
from steering.spec import CampaignSpec, SeedFrom
from steering.store import CampaignStore, now

log = logging.getLogger("sciorch.steering")

WAIT_SLICE_S = 3600.0  # one wait_entry call; a longer job is simply waited for again
SUMMARY_EVERY_S = 1.0
TRACE_MAX = 500  # posterior summaries kept for the campaign page's chart


class CampaignError(SciorchError):
    """The campaign cannot go on (recorded as failed)."""

    code = "campaign_failed"


def key_for(campaign_id: str, seq: int, attempt: int) -> str:
    return f"{campaign_id}-{seq}-{attempt}"


def check_service(spec: CampaignSpec, services: list[dict[str, Any]]) -> None:
    """The objective's service exists, is a job, and takes the space's and the fixed
    parameters (as far as its schema says)."""
    name, _, version = (spec.objective.service or "").partition("@")
    svc = next((s for s in services if s.get("name") == name), None)
    if svc is None:
        known = ", ".join(sorted(str(s.get("name")) for s in services))
        raise InvalidInput(
            f"objective.service: unknown service {name!r}; known: {known}",
            field="objective.service",
        )
    if version and version not in (svc.get("versions") or [svc.get("version")]):
        raise InvalidInput(
            f"objective.service: {name} has no version {version!r}; versions: "
            f"{', '.join(svc.get('versions') or [])}",
            field="objective.service",
        )
    if svc.get("kind") != "job":
        raise InvalidInput(
            f"objective.service: {name} is a {svc.get('kind')}, not a job; campaigns measure "
            "with jobs",
            field="objective.service",
        )
    schema = svc.get("parameters") or {}
    props = schema.get("properties") or {}
    if schema.get("additionalProperties") is False:
        for p in spec.space:
            if p.name not in props:
                raise InvalidInput(
                    f"space: {name} has no parameter {p.name!r}; its parameters: "
                    f"{', '.join(props)}",
                    field="space",
                )
        for key in spec.objective.parameters:
            if key not in props:
                raise InvalidInput(
                    f"objective.parameters: {name} has no parameter {key!r}; its parameters: "
                    f"{', '.join(props)}",
                    field="objective.parameters",
                )


def result_value(spec: CampaignSpec, result: dict[str, Any] | None) -> tuple[float, float | None]:
    """(value, noise variance or None) from a job's result; ValueError says what is wrong."""
    if not isinstance(result, dict):
        raise ValueError("the job wrote no result")
    node: Any = result
    for part in spec.objective.field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"the result has no field {spec.objective.field!r}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        raise ValueError(f"result field {spec.objective.field!r} is {node!r}, not a finite number")
    noise: float | None = None
    nf = spec.noise.field
    if nf and isinstance(result.get(nf), int | float) and not isinstance(result.get(nf), bool):
        v = float(result[nf])
        noise = v if math.isfinite(v) and v >= 0 else None
    if noise is None and spec.noise.variance is not None:
        noise = spec.noise.variance
    from steering.views import lookup, modelled_fields

    for extra in modelled_fields(spec):  # other objectives, constrained fields, cost
        if lookup(result, extra) is None:
            raise ValueError(f"the result has no finite number at field {extra!r}")
    return float(node), noise


class RunnerLock:
    """One runner per campaign, across processes (released by the OS if the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd, holder = try_lock(self.path)
        if fd is None:
            raise InvalidInput(
                f"campaign is already being run by process {holder}", field="campaign_id"
            )
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class CampaignRunner:
    def __init__(
        self,
        store: CampaignStore,
        campaign_id: str,
        make_client: Callable[[], Any] | None,
        workdir: Path,
        *,
        on_update: Callable[[str], None] | None = None,
        patience_s: float = 0.0,
        plots: bool = True,
    ) -> None:
        self.store = store
        self.id = campaign_id
        self.make_client = make_client
        self.workdir = workdir  # <home>/campaigns/<id>: lock, plots
        self.on_update = on_update
        self.patience_s = patience_s
        self.plots = plots
        self._stop = asyncio.Event()
        self._cancel_in_flight = True
        self.opt: Any = None
        self.evals: dict[int, EvaluationRecord] = {}
        self.waiters: dict[int, asyncio.Task[dict[str, Any]]] = {}
        self._summary_at = 0.0
        self._training: asyncio.Task[Any] | None = None
        self._training_job: Any = None
        self.exhausted = False
        self.paused = False
        self._poke = asyncio.Event()  # people changed something (steering.manager)
        self._seq = 0  # the next evaluation's seq (reserve_seqs hands some out)

    # ------------------------------------------------------------------ control

    def request_stop(self, cancel_in_flight: bool = True) -> None:
        self._cancel_in_flight = cancel_in_flight
        self._stop.set()

    def reserve_seqs(self, n: int) -> list[int]:
        """Sequence numbers for evaluations someone else inserts (add_points) while this runs."""
        first = self._seq
        self._seq += n
        return list(range(first, first + n))

    async def reload(self) -> None:
        """Take in what people changed in the store (written there first): the spec's budget
        and stop rules, pause, points added, points rejected (an evaluation in flight is
        cancelled)."""
        rec = await self.store.get_campaign(self.id)
        if rec is None or not hasattr(self, "rec"):
            return
        self.rec.spec, self.spec, self.paused = rec.spec, rec.spec, rec.paused
        for e in await self.store.evaluations(self.id):
            mine = self.evals.get(e.seq)
            if mine is None:
                self.evals[e.seq] = e
                self._seq = max(self._seq, e.seq + 1)
            elif e.state == EvalState.REJECTED and mine.state != EvalState.REJECTED:
                await self._drop_rejected(mine, e.reason)
        self._poke.set()

    async def _drop_rejected(self, e: EvaluationRecord, reason: str | None) -> None:
        e.state, e.reason = EvalState.REJECTED, reason
        await self._withdraw(e)

    async def _withdraw(self, e: EvaluationRecord) -> None:
        """Stop waiting on `e` and cancel its entry, where it is waited on (else nothing of it
        runs)."""
        task = self.waiters.pop(e.seq, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if e.entry_id:
            with contextlib.suppress(ToolFailed):
                await self.tools.call("cancel_entry", {"entry_id": e.entry_id})

    def _spent(self) -> int:
        return sum(1 for e in self.evals.values() if e.state.spends_budget and e.source != "seed")

    def _notify(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self.id)
            except Exception:  # a listener must not break the loop
                log.exception("campaign update listener failed")

    # ------------------------------------------------------------------ the loop

    async def run(self) -> CampaignRecord:
        lock = RunnerLock(self.workdir / "runner.lock")
        lock.acquire()
        try:
            if self.make_client is None:  # an external campaign calls no tools
                await self._guarded()
            else:
                async with Tools(self.make_client, self.patience_s) as tools:
                    self.tools = tools
                    await self._guarded()
        finally:
            lock.release()
        rec = await self.store.get_campaign(self.id)
        assert rec is not None
        return rec

    async def _guarded(self) -> None:
        try:
            await self._run()
        except (SciorchError, ToolFailed) as exc:
            await self._finish(CampaignState.FAILED, exc.message)
        finally:
            await self._shutdown_tasks()

    async def _shutdown_tasks(self) -> None:
        tasks: list[asyncio.Task[Any]] = list(self.waiters.values())
        if self._training is not None:
            tasks.append(self._training)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _run(self) -> None:
        rec = await self.store.get_campaign(self.id)
        if rec is None:
            raise InvalidInput(f"no campaign {self.id!r}", field="campaign_id")
        if rec.state.finished:
            return
        self.rec = rec
        spec = self.spec = rec.spec
        self.evals = {e.seq: e for e in await self.store.evaluations(self.id)}
        self._seq = max(self.evals, default=-1) + 1
        self.paused = rec.paused
        if rec.stop_requested:
            self.request_stop(True)
        if spec.seed_from is not None and not self.evals:
            await self._seed(spec.seed_from)
        await self._load_optimizer()

        services = await self.tools.call("list_services")
        check_service(spec, list(services.get("services") or []))
        if rec.event_id is None:
            event_id = spec.event_id
            if event_id is None:
                ev = await self.tools.call(
                    "create_event", {"name": f"campaign {rec.name} ({self.id})"[:200]}
                )
                event_id = str(ev["id"])
            await self.store.update_campaign(self.id, event_id=event_id)
            self.rec.event_id = event_id

        # Re-adopt what was in flight, resubmit what was asked but maybe never submitted.
        for e in sorted(self.evals.values(), key=lambda e: e.seq):
            if e.state == EvalState.SUBMITTED and e.entry_id:
                self._wait(e.seq, e.entry_id)
            elif e.state in (EvalState.ASKED, EvalState.SUBMITTED):
                await self._submit(e)
        self._notify()

        while True:
            # Cleared before the state is read, never in the wait: a poke that comes while this
            # iteration runs then wakes the wait below instead of being lost.
            self._poke.clear()
            deadline = self._deadline()  # each time: a person may have changed the budget
            if self._stop.is_set():
                await self._end(CampaignState.STOPPED, "stopped by request", self._cancel_in_flight)
                return
            if deadline is not None and time.time() >= deadline:
                await self._end(CampaignState.COMPLETED, "wall-time budget reached", True)
                return
            reached = await self._stop_rule()
            if reached:
                await self._end(CampaignState.COMPLETED, reached, True)
                return
            if not self.paused:
                await self._refill()
            if not self.waiters:
                if self.paused:
                    await self._wait_for_news(deadline)
                    continue
                if self._spent() >= self.spec.budget.evaluations:
                    await self._end(CampaignState.COMPLETED, "evaluation budget spent", False)
                else:
                    await self._end(CampaignState.COMPLETED, "search space exhausted", False)
                return
            await self._maybe_summary()
            await self._wait_for_news(deadline)

    async def _seed(self, seed: SeedFrom) -> None:
        """Record earlier results (search_results) as measured evaluations, before anything is
        asked: `_load_optimizer` tells them to the GP with the rest. Rows that are no point of
        this space, have no usable value, or repeat a point already seeded are left out."""
        from steering.external import check_point  # it imports this module

        args: dict[str, Any] = {
            "query": seed.query,
            "service": seed.service or (self.spec.objective.service or "").partition("@")[0],
            "campaign_id": seed.campaign_id,
            "event_id": seed.event_id,
        }
        rows: list[dict[str, Any]] = []
        cursor = None
        while len(rows) < seed.limit:
            size = min(1000, seed.limit - len(rows))
            page = await self.tools.call(
                "search_results", {**args, "limit": size, "cursor": cursor}
            )
            rows += page.get("rows") or []
            cursor = page.get("next_cursor")
            if not cursor:
                break
        seen: set[str] = set()
        fixed = self.spec.objective.parameters
        for row in rows:
            params = dict(row.get("parameters") or {})
            if any(params.get(k) != v for k, v in fixed.items()):
                continue  # measured under other fixed parameters
            try:
                point = check_point(
                    self.spec, {p.name: params.get(p.name) for p in self.spec.space}
                )
                value, noise = result_value(self.spec, row.get("result"))
            except (InvalidInput, ValueError):
                continue
            key = repr(sorted(point.items()))
            if key in seen:
                continue
            seen.add(key)
            seq = self.reserve_seqs(1)[0]
            e = EvaluationRecord(
                campaign_id=self.id,
                seq=seq,
                point=point,
                source="seed",
                state=EvalState.SUCCEEDED,
                idempotency_key=key_for(self.id, seq, 1),
                entry_id=str(row["entry_id"]),
                value=value,
                noise=noise,
                result=row.get("result"),
                reason=f"seeded from {row['entry_id']}",
                asked_at=now(),
                finished_at=now(),
            )
            await self.store.insert_evaluation(e)
            self.evals[seq] = e
        log.info("campaign %s: seeded with %d of %d results", self.id, len(seen), len(rows))

    async def _load_optimizer(self) -> None:
        """The GP told every measurement so far, and what is left of the initial design."""
        from steering.multi import make_optimizer  # gpCAM is imported when a campaign runs

        self.opt = make_optimizer(self.spec, self.rec.seed)
        self.opt.set_state(self.rec.gp_state)
        done = [e for e in self.evals.values() if e.state == EvalState.SUCCEEDED]
        if done:
            await asyncio.to_thread(
                self.opt.tell,
                [e.point for e in done],
                [float(e.value or 0.0) for e in done],
                [e.noise for e in done],
                [e.result for e in done],
            )
        design = await asyncio.to_thread(self._design)
        # Seeded results stand in for design points: with enough of them the GP asks first.
        used = sum(1 for e in self.evals.values() if e.source in ("design", "seed"))
        self.design_queue = design[used:]

    def _deadline(self) -> float | None:
        wall = self.spec.budget.wall_time_s
        if wall is None:
            return None
        return self.rec.created_at.timestamp() + wall

    def _design(self) -> list[dict[str, Any]]:
        import numpy as np

        n = self.spec.design_count
        u = self.opt.space.design(self.spec.initial_design, n, np.random.default_rng(self.rec.seed))
        return list(self.opt.space.decode(u))

    async def _wait_for_news(self, deadline: float | None, stop: bool = True) -> None:
        """Sleep until an evaluation finishes, training ends, a stop is asked or the deadline
        passes; then record and tell what finished."""
        stop_task = asyncio.ensure_future(self._stop.wait())
        poke_task = asyncio.ensure_future(self._poke.wait())
        tasks: set[asyncio.Future[Any]] = {*self.waiters.values()}
        if stop:
            tasks |= {stop_task, poke_task}
        if self._training is not None:
            tasks.add(self._training)
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop_task.cancel()
            poke_task.cancel()
        if self._training is not None and self._training in done:
            await self._training_done()
        finished = [seq for seq, t in self.waiters.items() if t in done]
        results = []
        for seq in finished:
            task = self.waiters.pop(seq)
            results.append((seq, task))
        told: list[EvaluationRecord] = []
        for seq, task in results:
            e = self.evals[seq]
            try:
                entry = task.result()
            except ToolFailed as exc:
                if exc.code == "not_found":  # the entry is gone (its record was deleted)
                    await self._failed_attempt(e, f"entry {e.entry_id} is gone: {exc.message}")
                    continue
                raise
            ok = await self._outcome(e, entry)
            if ok:
                told.append(e)
        if told:
            await asyncio.to_thread(
                self.opt.tell,
                [e.point for e in told],
                [float(e.value or 0.0) for e in told],
                [e.noise for e in told],
                [e.result for e in told],
            )
            self._notify()

    # ------------------------------------------------------------------ asking

    async def _refill(self) -> None:
        spec = self.spec
        want = min(spec.batch_size - len(self.waiters), spec.budget.evaluations - self._spent())
        if want <= 0 or self._stop.is_set():
            return
        queued = self._queued()[:want]
        for e in queued:  # a person's points go first
            e.state = EvalState.ASKED
            await self.store.update_evaluation(self.id, e.seq, state=e.state)
            await self._submit(e)
        want -= len(queued)
        if want <= 0:
            return
        if self.design_queue:
            points = self.design_queue[:want]
            self.design_queue = self.design_queue[want:]
            for p in points:
                await self._ask_and_submit(p, "design", None)
            return
        if self.opt.n < 2 and self.waiters:
            return  # the GP needs two values; results are on their way
        decision = await asyncio.to_thread(self._decide, want)
        if decision.points:
            per_point = decision.seconds / len(decision.points)
            for p in decision.points:
                await self._ask_and_submit(p, decision.source, per_point)
        else:
            self.exhausted = True
        await self._save_gp_state()
        if self._training_job is not None and self._training is None:
            # n >= 100: train in a child process; the loop goes on with the old hyperparameters
            self._training = asyncio.create_task(self._train(self._training_job))

    def _queued(self) -> list[EvaluationRecord]:
        return sorted(
            (e for e in self.evals.values() if e.state == EvalState.QUEUED), key=lambda e: e.seq
        )

    def _decide(self, k: int) -> Any:
        """Train if the schedule says so and it is cheap (n < 100), then ask: the decision."""
        started = time.perf_counter()
        from steering.optimizer import SYNC_TRAIN_BELOW

        job = self.opt.training_due()
        if job is not None:
            if job.n < SYNC_TRAIN_BELOW:
                self.opt.train_now(job)
                self._gp_state_dirty = True
            else:
                self._training_job = job
                self.opt.training = job
        pending = [
            e.point
            for e in self.evals.values()
            if e.state in (EvalState.ASKED, EvalState.SUBMITTED, EvalState.QUEUED)
        ]
        avoid = [e.point for e in self.evals.values() if e.state == EvalState.FAILED]
        rejected = [e.point for e in self.evals.values() if e.state == EvalState.REJECTED]
        decision = self.opt.ask(k, pending=pending, avoid=avoid, rejected=rejected)
        decision.seconds = time.perf_counter() - started
        return decision

    async def _ask_and_submit(
        self, point: dict[str, Any], source: str, decision_s: float | None
    ) -> None:
        seq = self.reserve_seqs(1)[0]
        e = EvaluationRecord(
            campaign_id=self.id,
            seq=seq,
            point=point,
            source="design" if source == "design" else "gp",
            state=EvalState.ASKED,
            attempt=1,
            idempotency_key=key_for(self.id, seq, 1),
            attempts=[Attempt(attempt=1, idempotency_key=key_for(self.id, seq, 1))],
            decision_s=decision_s,
            asked_at=now(),
        )
        self.evals[seq] = e
        await self.store.insert_evaluation(e)  # before the job exists
        await self._submit(e)

    async def _submit(self, e: EvaluationRecord) -> None:
        params = {**self.spec.objective.parameters, **e.point}
        args: dict[str, Any] = {
            "service": self.spec.objective.service,
            "parameters": params,
            "idempotency_key": e.idempotency_key,
            "event_id": self.rec.event_id,
        }
        if self.spec.site:
            args["site"] = self.spec.site
        if self.spec.objective.priority != "normal":
            args["priority"] = self.spec.objective.priority
        try:
            entry = await self.tools.call("submit_job", args)
        except ToolFailed as exc:
            if exc.code in (
                "invalid_parameters",
                "invalid_input",
                "unknown_service",
                "no_site",
                "limit_exceeded",
                "backend_error",
            ):
                # This point cannot be measured (or not now): count it as a failed attempt.
                await self._failed_attempt(e, f"submit_job refused: {exc.message}")
                return
            raise CampaignError(f"submit_job failed: {exc.message}") from exc
        e.entry_id = str(entry["id"])
        e.state = EvalState.SUBMITTED
        e.submitted_at = now()
        e.attempts[-1].entry_id = e.entry_id
        await self.store.update_evaluation(
            self.id,
            e.seq,
            entry_id=e.entry_id,
            state=e.state,
            submitted_at=e.submitted_at,
            attempts=e.attempts,
        )
        self._notify()
        self._wait(e.seq, e.entry_id)

    def _wait(self, seq: int, entry_id: str) -> None:
        self.waiters[seq] = asyncio.create_task(self._wait_entry(entry_id), name=f"wait-{entry_id}")

    async def _wait_entry(self, entry_id: str) -> dict[str, Any]:
        while True:
            res = await self.tools.call(
                "wait_entry",
                {"entry_id": entry_id, "timeout_seconds": WAIT_SLICE_S, "until": "finished"},
            )
            if not res.get("timed_out"):
                return dict(res["entry"])

    # ------------------------------------------------------------------ results

    async def _outcome(self, e: EvaluationRecord, entry: dict[str, Any]) -> bool:
        """Record a finished entry; True if it gave a value (told to the GP)."""
        state = entry.get("state")
        e.attempts[-1].state = state
        if state == "succeeded":
            result = entry.get("result")
            if result is None:
                res = await self.tools.call("read_results", {"entry_id": entry["id"]})
                result = res.get("result")
            try:
                value, noise = result_value(self.spec, result)
            except ValueError as exc:
                await self._failed_attempt(e, str(exc), result)
                return False
            e.state = EvalState.SUCCEEDED
            e.value, e.noise, e.result = value, noise, result
            e.finished_at = now()
            await self.store.update_evaluation(
                self.id,
                e.seq,
                state=e.state,
                value=value,
                noise=noise,
                result=result,
                finished_at=e.finished_at,
                attempts=e.attempts,
            )
            return True
        reason = f"entry {entry.get('id')} {state}"
        if entry.get("reason"):
            reason += f": {str(entry['reason']).strip().splitlines()[-1][:300]}"
        if state == "cancelled" and self._stop.is_set():
            await self._record_end(e, EvalState.CANCELLED, reason)
            return False
        await self._failed_attempt(e, reason)
        return False

    async def _failed_attempt(
        self, e: EvaluationRecord, reason: str, result: dict[str, Any] | None = None
    ) -> None:
        e.attempts[-1].reason = reason
        if e.attempt <= self.spec.retries and not self._stop.is_set():
            e.attempt += 1
            e.idempotency_key = key_for(self.id, e.seq, e.attempt)
            e.attempts.append(Attempt(attempt=e.attempt, idempotency_key=e.idempotency_key))
            e.state, e.entry_id, e.reason = EvalState.ASKED, None, reason
            await self.store.update_evaluation(
                self.id,
                e.seq,
                state=e.state,
                attempt=e.attempt,
                idempotency_key=e.idempotency_key,
                entry_id=None,
                attempts=e.attempts,
                reason=reason,
            )
            log.info("campaign %s: evaluation %d attempt %d: %s", self.id, e.seq, e.attempt, reason)
            await self._submit(e)
            return
        e.result = result
        await self._record_end(e, EvalState.FAILED, reason)

    async def _record_end(self, e: EvaluationRecord, state: EvalState, reason: str) -> None:
        e.state, e.reason, e.finished_at = state, reason, now()
        await self.store.update_evaluation(
            self.id,
            e.seq,
            state=state,
            reason=reason,
            result=e.result,
            finished_at=e.finished_at,
            attempts=e.attempts,
        )
        self._notify()

    # ------------------------------------------------------------------ training

    async def _train(self, job: Any) -> Any:
        from steering.training import train_in_child

        return await train_in_child(job)

    async def _training_done(self) -> None:
        task, job = self._training, self._training_job
        self._training, self._training_job = None, None
        assert task is not None
        try:
            hps = task.result()
        except Exception as exc:
            log.warning("campaign %s: background training failed: %s", self.id, exc)
            self.opt.training = None
            return
        await asyncio.to_thread(self.opt.apply, job, hps)
        self._gp_state_dirty = True
        await self._save_gp_state()
        self._notify()

    _gp_state_dirty = False

    async def _save_gp_state(self) -> None:
        if self._gp_state_dirty:
            self._gp_state_dirty = False
            await self.store.update_campaign(self.id, gp_state=self.opt.state())

    # ------------------------------------------------------------------ stopping

    def best(self) -> EvaluationRecord | None:
        goal = self.spec.objective.goal
        done = [e for e in self.evals.values() if e.state == EvalState.SUCCEEDED]
        if not done or goal == "explore":
            return None
        sign = 1.0 if goal == "maximise" else -1.0
        return max(done, key=lambda e: sign * float(e.value or 0.0))

    async def _stop_rule(self) -> str | None:
        stop = self.spec.stop
        if self.spec.budget.cost is not None:
            from steering.multi import spent_cost

            spent = spent_cost(self.spec, list(self.evals.values())) or 0.0
            if spent >= self.spec.budget.cost:
                return f"cost budget spent: {spent:.6g} >= {self.spec.budget.cost:g}"
        best = self.best()
        if stop.target is not None and best is not None and best.value is not None:
            if self.spec.objective.goal == "minimise" and best.value <= stop.target:
                return f"target reached: {best.value:.6g} <= {stop.target:g}"
            if self.spec.objective.goal == "maximise" and best.value >= stop.target:
                return f"target reached: {best.value:.6g} >= {stop.target:g}"
        if (
            stop.max_posterior_std is not None
            and not self.design_queue
            and self.opt.n >= max(2, self.spec.design_count)
        ):
            summary = await asyncio.to_thread(self.opt.summary)
            if summary is not None and summary["max_std"] <= stop.max_posterior_std:
                await self._store_summary(summary)
                return (
                    f"posterior std below {stop.max_posterior_std:g} everywhere "
                    f"(max {summary['max_std']:.4g})"
                )
        return None

    async def _maybe_summary(self, force: bool = False) -> None:
        if self.opt.n < 2:
            return
        if not force and time.monotonic() - self._summary_at < SUMMARY_EVERY_S:
            return
        summary = await asyncio.to_thread(self.opt.summary)
        await self._store_summary(summary)

    async def _store_summary(self, summary: dict[str, Any] | None) -> None:
        self._summary_at = time.monotonic()
        if summary is not None:
            summary = {**summary, "trace": self._traced(summary)}
            await self.store.update_campaign(self.id, posterior=summary)
            self._notify()

    def _traced(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """The predicted best (posterior mean and std there) after each summary, by the number
        of measurements: what the campaign page charts beside the values. Kept with the
        posterior, so a resumed campaign goes on with it; the newest TRACE_MAX only."""
        trace: list[dict[str, Any]] = list((self.rec.posterior or {}).get("trace") or [])
        best = summary.get("predicted_best")
        if best is not None:
            point = {"n": summary["n"], "mean": best["mean"], "std": best["std"]}
            if trace and trace[-1]["n"] == point["n"]:
                trace[-1] = point
            else:
                trace.append(point)
        trace = trace[-TRACE_MAX:]
        self.rec.posterior = {**summary, "trace": trace}
        return trace

    async def _end(self, state: CampaignState, reason: str, cancel: bool) -> None:
        """Finish: cancel (and record) or await what is in flight, then summary and plots."""
        if self.waiters:
            if cancel:
                for seq in list(self.waiters):
                    e = self.evals[seq]
                    await self._withdraw(e)
                    await self._record_end(e, EvalState.CANCELLED, f"cancelled: {reason}")
            else:
                while self.waiters:
                    await self._wait_for_news(None, stop=False)
        # asked but never submitted (a stop between the two), or queued: nothing runs
        for e in list(self.evals.values()):
            if e.state in (EvalState.ASKED, EvalState.QUEUED):
                await self._record_end(e, EvalState.CANCELLED, f"not measured: {reason}")
        await self._finish(state, reason)

    async def _finish(self, state: CampaignState, reason: str) -> None:
        await self.store.finish_campaign(self.id, state, reason)
        if self.opt is not None and self.opt.n >= 2:
            try:
                await self._maybe_summary(force=True)
            except Exception:
                log.exception("campaign %s: final posterior summary failed", self.id)
            if self.plots:
                try:
                    from steering.plots import write_plots

                    rec = await self.store.get_campaign(self.id)
                    assert rec is not None
                    evals = await self.store.evaluations(self.id)
                    paths = await asyncio.to_thread(write_plots, rec, evals, self.opt, self.workdir)
                    await self.store.update_campaign(self.id, plots=[str(p) for p in paths])
                except Exception:
                    log.exception("campaign %s: writing plots failed", self.id)
        self._notify()


def decision_stats(evals: list[EvaluationRecord]) -> tuple[float | None, float | None]:
    times = [e.decision_s for e in evals if e.decision_s is not None and e.source == "gp"]
    if not times:
        return None, None
    return statistics.median(times), max(times)
