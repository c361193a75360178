"""Typed operations for sweeps and time: submit_sweep, get_sweep, wait_sweep, cancel_sweep,
extend_entry (the engine side: orchestrator.sweeps, orchestrator.deadlines)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from ground.models import EntryState, Message, Number, OptInt, Principal, ResourceRequest
from orchestrator import deadlines, sweeps
from orchestrator.engine import Engine
from tools.models import (
    MAX_PARAMETERS_BYTES,
    SUMMARY_RESULT_BYTES,
    EntryId,
    EntryView,
    Priority,
    PriorityField,
    _In,
)
from tools.operations import _view

SweepIdField = Field(description="sweep id, e.g. 'swp-1a2b3c4d5e6f'", min_length=1, max_length=64)
OnMessage = Callable[[Message], Awaitable[None]]


class SubmitSweepInput(_In):
    service: str = Field(
        min_length=1, max_length=128, description="job service name, optionally name@version"
    )
    parameter_sets: list[dict[str, Any]] | None = Field(
        None,
        min_length=1,
        max_length=sweeps.MAX_ELEMENTS,
        description="one parameter object per element (or give grid)",
    )
    grid: dict[str, list[Any]] | None = Field(
        None, description="every combination of these values, the last key varying fastest"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="parameters common to every element"
    )
    throttle: OptInt = Field(None, ge=1, le=10000, description="at most this many run at once")
    event_id: str | None = Field(
        None, min_length=1, max_length=64, description="event to run in; default: your default"
    )
    site: str | None = Field(
        None, min_length=1, max_length=64, description="run on this site; default: the router"
    )
    resources: ResourceRequest | None = Field(
        None, description="override the template's resources for every element"
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="the same key returns the same sweep instead of submitting twice",
    )
    priority: Priority = PriorityField

    @field_validator("parameter_sets", "grid")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is not None and len(json.dumps(v, default=str)) > 16 * MAX_PARAMETERS_BYTES:
            raise ValueError(f"at most {16 * MAX_PARAMETERS_BYTES} bytes as JSON")
        return v


class SweepRef(_In):
    sweep_id: str = SweepIdField


class WaitSweepInput(_In):
    sweep_id: str = SweepIdField
    timeout_seconds: Number = Field(60, gt=0, le=86400, description="wait at most this long")


class ExtendEntryInput(_In):
    entry_id: str = EntryId
    walltime_seconds: int = Field(
        gt=0, le=366 * 86400, description="the entry's new whole walltime (from its start)"
    )


class SweepElement(BaseModel):
    index: int
    entry_id: str
    state: EntryState
    reason: str | None
    parameters: dict[str, Any]
    exit_code: int | None
    result: dict[str, Any] | None = Field(
        description=f"the result when at most {SUMMARY_RESULT_BYTES} bytes (read_results: all)"
    )
    job_id: str | None = Field(None, description="the site's id (Slurm: <array id>_<index>)")


class SweepView(BaseModel):
    id: str
    event_id: str
    service: str
    site: str
    size: int
    throttle: int | None
    created_at: datetime
    counts: dict[str, int] = Field(description="elements per state")
    done: bool = Field(description="every element has finished")
    elements: list[SweepElement]

    @classmethod
    def of(cls, sweep: sweeps.Sweep) -> SweepView:
        elements = []
        for i, e in enumerate(sweep.entries):
            small = e.result is not None and len(json.dumps(e.result)) <= SUMMARY_RESULT_BYTES
            elements.append(
                SweepElement(
                    index=i,
                    entry_id=e.id,
                    state=e.state,
                    reason=e.reason,
                    parameters=e.parameters,
                    exit_code=e.exit_code,
                    result=e.result if small else None,
                    job_id=str(e.handle["job_id"]) if e.handle.get("job_id") else None,
                )
            )
        return cls(
            id=sweep.id,
            event_id=sweep.event_id,
            service=sweep.service,
            site=sweep.site,
            size=len(sweep.entries),
            throttle=sweep.throttle,
            created_at=sweep.created_at,
            counts=sweep.counts,
            done=sweep.done,
            elements=elements,
        )


class SweepWaitResult(BaseModel):
    sweep: SweepView
    timed_out: bool


async def submit_sweep(engine: Engine, principal: Principal, req: SubmitSweepInput) -> SweepView:
    sweep = await sweeps.submit_sweep(
        engine,
        principal,
        req.service,
        req.parameter_sets,
        req.grid,
        base=req.parameters,
        event_id=req.event_id,
        site=req.site,
        resources=req.resources,
        throttle=req.throttle,
        idempotency_key=req.idempotency_key,
        priority=req.priority,
    )
    return SweepView.of(sweep)


async def get_sweep(engine: Engine, principal: Principal, req: SweepRef) -> SweepView:
    return SweepView.of(await sweeps.get_sweep(engine, principal, req.sweep_id))


async def wait_sweep(
    engine: Engine, principal: Principal, req: WaitSweepInput, on_message: OnMessage | None = None
) -> SweepWaitResult:
    sweep, timed_out = await sweeps.wait_sweep(engine, principal, req.sweep_id, req.timeout_seconds)
    return SweepWaitResult(sweep=SweepView.of(sweep), timed_out=timed_out)


async def cancel_sweep(engine: Engine, principal: Principal, req: SweepRef) -> SweepView:
    return SweepView.of(await sweeps.cancel_sweep(engine, principal, req.sweep_id))


async def extend_entry(engine: Engine, principal: Principal, req: ExtendEntryInput) -> EntryView:
    entry = await deadlines.extend_entry(engine, principal, req.entry_id, req.walltime_seconds)
    return _view(engine, principal, entry)
