"""Campaigns measured elsewhere (`objective.kind = "external"`): an instrument's own control
system (a Bluesky plan, a LabVIEW loop, a person) asks sciorch for points and tells it what it
measured, over MCP (`ask_campaign`, `tell_campaign`). sciorch runs no job.

The runner is the service runner's loop without submission (same optimizer, training schedule,
budget, stop rules, summaries and plots), made of two calls instead:

- ask(n): the points a person queued first (add_points), then the initial design, then the GP's
  choice (off the event loop). Each is stored as an evaluation in state `asked` with a lease
  (`objective.ask_timeout_s`) before it is returned; untold when the lease passes, it is
  `released` back to the pool (the GP may choose that region again). An ask with a key
  (`ask_key`) answered before returns the same points, so a client that lost the answer to a
  crashed server asks again without using up the budget.
- tell(point_id | point, value): records the measurement (state `succeeded`) and tells the GP.
  Idempotent by point id and by the client's `tell_key`: a point told twice is recorded once
  (the first value stands). A point the campaign never suggested is recorded with source
  `external`. The campaign completes once `budget.evaluations` measurements are told (or a stop
  rule holds); an asked point still out then is recorded as cancelled.

One lock serialises ask, tell and the loop's own work: the optimizer is not thread-safe, and an
evaluation is written to the store before anyone hears of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from ground.errors import InvalidInput, NotFound
from steering.models import (
    AskedPoint,
    AskResult,
    Attempt,
    BestView,
    CampaignState,
    EvalState,
    EvaluationRecord,
    Source,
    TellCampaignInput,
    TellResult,
    point_id,
)
from steering.runner import CampaignRunner, key_for
from steering.spec import CampaignSpec
from steering.store import CampaignStore, now

POINT_TOL = 1e-9  # relative: a told point is "the asked one" when it matches this closely


def check_point(spec: CampaignSpec, point: dict[str, Any], where: str = "point") -> dict[str, Any]:
    """A point of the space, every parameter given and in range; errors name the field."""
    names = [p.name for p in spec.space]
    extra = sorted(set(point) - set(names))
    if extra:
        raise InvalidInput(f"{where}: {extra} are not parameters of the space {names}", field=where)
    out: dict[str, Any] = {}
    for p in spec.space:
        field = f"{where}.{p.name}"
        if p.name not in point:
            raise InvalidInput(f"{field}: missing; the space has {names}", field=field)
        v = point[p.name]
        if p.type == "categorical":
            if v not in (p.choices or []):
                raise InvalidInput(f"{field}: {v!r} is not one of {p.choices}", field=field)
            out[p.name] = v
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InvalidInput(f"{field}: {v!r} is not a finite number", field=field)
        assert p.low is not None and p.high is not None
        if not p.low <= v <= p.high:
            raise InvalidInput(f"{field}: {v} is outside [{p.low}, {p.high}]", field=field)
        if p.type == "integer" and v != int(v):
            raise InvalidInput(f"{field}: {v} is not a whole number", field=field)
        out[p.name] = int(v) if p.type == "integer" else float(v)
    return out


def seq_of(campaign_id: str, pid: str) -> int:
    prefix = f"{campaign_id}-p"
    tail = pid[len(prefix) :] if pid.startswith(prefix) else ""
    if not tail.isdigit():
        raise NotFound(
            f"point_id: {pid!r} is not a point of campaign {campaign_id} (ids look like {prefix}0)",
            field="point_id",
        )
    return int(tail)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, int | float) and isinstance(w, int | float):
            if not math.isclose(float(v), float(w), rel_tol=POINT_TOL, abs_tol=POINT_TOL):
                return False
        elif v != w:
            return False
    return True


def best_view(e: EvaluationRecord | None) -> BestView | None:
    if e is None or e.value is None:
        return None
    return BestView(seq=e.seq, point=e.point, value=float(e.value), entry_id=e.entry_id)


class ExternalRunner(CampaignRunner):
    def __init__(
        self,
        store: CampaignStore,
        campaign_id: str,
        workdir: Path,
        *,
        on_update: Callable[[str], None] | None = None,
        plots: bool = True,
    ) -> None:
        super().__init__(store, campaign_id, None, workdir, on_update=on_update, plots=plots)
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()  # loaded: ask and tell may be served
        self.ended = False
        self.final = CampaignState.RUNNING

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            rec = await self.store.get_campaign(self.id)
            if rec is None or rec.state.finished:
                self.ended = True
                return
            self.rec, self.spec, self.paused = rec, rec.spec, rec.paused
            self.evals = {e.seq: e for e in await self.store.evaluations(self.id)}
            self._seq = max(self.evals, default=-1) + 1
            if rec.stop_requested:
                self.request_stop(True)
            await self._load_optimizer()
        finally:
            self.ready.set()
        self._notify()
        while True:
            async with self.lock:
                self._poke.clear()  # before the state is read (see CampaignRunner.run)
                if self.ended:
                    return
                ending = await self._ending()
                if ending is not None:
                    await self._close(*ending)
                    return
                await self._release_expired()
                await self._maybe_summary()
            await self._wait_for_news(self._next_wake())

    async def _ending(self) -> tuple[CampaignState, str] | None:
        if self._stop.is_set():
            return CampaignState.STOPPED, "stopped by request"
        deadline = self._deadline()
        if deadline is not None and time.time() >= deadline:
            return CampaignState.COMPLETED, "wall-time budget reached"
        if self._told() >= self.spec.budget.evaluations:
            return CampaignState.COMPLETED, "evaluation budget spent"
        reached = await self._stop_rule()
        if reached:
            return CampaignState.COMPLETED, reached
        if self.exhausted and not self._pending():
            return CampaignState.COMPLETED, "search space exhausted"
        return None

    async def _close(self, state: CampaignState, reason: str) -> None:
        self.ended, self.final = True, state
        await self._end(state, reason, True)

    async def _training_done(self) -> None:
        async with self.lock:  # applying hyperparameters rebuilds the GP an ask may be using
            await super()._training_done()

    def _next_wake(self) -> float | None:
        """The wall-time deadline or the first lease to pass, whichever comes first."""
        times = [e.lease_until.timestamp() for e in self._pending() if e.lease_until]
        deadline = self._deadline()
        if deadline is not None:
            times.append(deadline)
        return min(times) if times else None

    def _told(self) -> int:
        return sum(1 for e in self.evals.values() if e.state == EvalState.SUCCEEDED)

    def _pending(self) -> list[EvaluationRecord]:
        return [e for e in self.evals.values() if e.state == EvalState.ASKED]

    async def _release_expired(self) -> None:
        at = now()
        for e in self._pending():
            if e.lease_until is not None and e.lease_until <= at:
                e.state, e.reason = EvalState.RELEASED, "not told before its lease passed"
                await self.store.update_evaluation(self.id, e.seq, state=e.state, reason=e.reason)

    def _result(self, points: list[EvaluationRecord], reason: str | None) -> AskResult:
        return AskResult(
            campaign_id=self.id,
            points=[
                AskedPoint(
                    point_id=e.point_id, point=e.point, source=e.source, lease_until=e.lease_until
                )
                for e in points
            ],
            state=self.final,
            done=self.ended,
            told=self._told(),
            pending=len(self._pending()),
            budget=self.spec.budget.evaluations,
            paused=self.paused,
            reason=reason,
        )

    # ------------------------------------------------------------------ ask

    async def ask(self, n: int, ask_key: str | None = None) -> AskResult:
        async with self.lock:
            if ask_key is not None:
                before = [e for e in self.evals.values() if e.ask_key == ask_key]
                if before:
                    return self._result(sorted(before, key=lambda e: e.seq), None)
            if self.ended:
                return self._result([], "the campaign has ended")
            if self.paused:
                return self._result([], "the campaign is paused (resume_campaign)")
            await self._release_expired()
            room = self.spec.budget.evaluations - self._spent()
            k = min(n, room)
            if k <= 0:
                return self._result(
                    [], f"the budget is taken by {len(self._pending())} points asked, not told"
                )
            lease = now() + timedelta(seconds=self.spec.objective.ask_timeout_s)
            chosen: list[EvaluationRecord] = []
            for e in self._queued()[:k]:  # a person's points go first
                e.state, e.lease_until, e.ask_key, e.asked_at = (
                    EvalState.ASKED,
                    lease,
                    ask_key,
                    now(),
                )
                await self.store.update_evaluation(
                    self.id,
                    e.seq,
                    state=e.state,
                    lease_until=lease,
                    ask_key=ask_key,
                    asked_at=e.asked_at,
                )
                chosen.append(e)
            while self.design_queue and len(chosen) < k:
                point = self.design_queue.pop(0)
                chosen.append(await self._insert(point, "design", None, lease, ask_key))
            want = k - len(chosen)
            if want > 0:  # the points just chosen are pending: the GP keeps away from them
                decision = await asyncio.to_thread(self._decide, want)
                if not decision.points:
                    self.exhausted = True
                per = decision.seconds / max(1, len(decision.points))
                src: Source = "design" if decision.source == "design" else "gp"
                for point in decision.points:
                    chosen.append(await self._insert(point, src, per, lease, ask_key))
                await self._save_gp_state()
                if self._training_job is not None and self._training is None:
                    # n >= 100: trained in a child process; asks go on with the old ones
                    self._training = asyncio.create_task(self._train(self._training_job))
            self._notify()
            self._poke.set()  # the loop re-plans its next wake-up (the new leases)
            reason = None if len(chosen) == n else self._short(n, len(chosen))
            return self._result(chosen, reason)

    def _short(self, n: int, got: int) -> str:
        if self.exhausted:
            return "the search space is exhausted"
        return f"{got} of {n}: the budget has room for no more"

    async def _insert(
        self,
        point: dict[str, Any],
        source: Source,
        decision_s: float | None,
        lease: Any,
        ask_key: str | None,
        state: EvalState = EvalState.ASKED,
    ) -> EvaluationRecord:
        seq = self.reserve_seqs(1)[0]
        key = key_for(self.id, seq, 1)
        e = EvaluationRecord(
            campaign_id=self.id,
            seq=seq,
            point=point,
            source=source,
            state=state,
            idempotency_key=key,
            attempts=[Attempt(attempt=1, idempotency_key=key)],
            decision_s=decision_s,
            asked_at=now(),
            lease_until=lease,
            ask_key=ask_key,
        )
        self.evals[seq] = e
        await self.store.insert_evaluation(e)
        return e

    # ------------------------------------------------------------------ tell

    async def tell(self, req: TellCampaignInput) -> TellResult:
        async with self.lock:
            e = self._told_before(req)
            if e is not None:
                return self._told_result(e, recorded=False)
            if self.ended:
                raise InvalidInput(
                    f"campaign_id: campaign {self.id} has ended; it records no more measurements",
                    field="campaign_id",
                )
            if req.point_id is not None:
                e = self.evals.get(seq_of(self.id, req.point_id))
                if e is None:
                    raise NotFound(
                        f"point_id: campaign {self.id} has no point {req.point_id!r}",
                        field="point_id",
                    )
                if e.state == EvalState.REJECTED:
                    raise InvalidInput(
                        f"point_id: {req.point_id} was rejected ({e.reason or 'by a person'}); "
                        "it is kept out of the campaign",
                        field="point_id",
                    )
            else:
                assert req.point is not None
                point = check_point(self.spec, req.point)
                e = next(
                    (x for x in self._pending() if _same(x.point, point)), None
                ) or await self._insert(point, "external", None, None, None, EvalState.QUEUED)
            noise = req.noise_variance
            if noise is None:
                noise = self.spec.noise.variance
            e.state, e.value, e.noise, e.result = EvalState.SUCCEEDED, req.value, noise, req.data
            e.tell_key, e.finished_at, e.reason = req.tell_key, now(), None
            await self.store.update_evaluation(
                self.id,
                e.seq,
                state=e.state,
                value=e.value,
                noise=noise,
                result=e.result,
                tell_key=e.tell_key,
                finished_at=e.finished_at,
                reason=None,
            )
            await asyncio.to_thread(
                self.opt.tell, [e.point], [float(req.value)], [noise], [req.data]
            )
            ending = await self._ending()
            if ending is not None:
                await self._close(*ending)
            self._notify()
            self._poke.set()
            return self._told_result(e, recorded=True)

    def _told_before(self, req: TellCampaignInput) -> EvaluationRecord | None:
        if req.tell_key is not None:
            e = next((x for x in self.evals.values() if x.tell_key == req.tell_key), None)
            if e is not None:
                return e
        if req.point_id is not None:
            e = self.evals.get(seq_of(self.id, req.point_id))
            if e is not None and e.state == EvalState.SUCCEEDED:
                return e
        return None

    def _told_result(self, e: EvaluationRecord, recorded: bool) -> TellResult:
        return TellResult(
            campaign_id=self.id,
            point_id=point_id(self.id, e.seq),
            seq=e.seq,
            recorded=recorded,
            value=e.value,
            state=self.final,
            done=self.ended,
            told=self._told(),
            budget=self.spec.budget.evaluations,
            best=best_view(self.best()),
        )
