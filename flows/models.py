"""What flows keep and what their tools take and return."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from ground.models import Bool, Int


class RunState(StrEnum):
    QUEUED = "queued"  # waiting for its trigger's concurrency limit
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"  # an approval step waiting for a person
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # a step after a failed one, or one of a cancelled run
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (
            StepState.SUCCEEDED,
            StepState.FAILED,
            StepState.SKIPPED,
            StepState.CANCELLED,
        )


class RunRecord(BaseModel):
    id: str
    flow: str
    spec: dict[str, Any]
    owner: str
    # The owner's token claims, so that its steps map to the same site accounts (ground.accounts)
    owner_claims: list[tuple[str, str]] = Field(default_factory=list)
    event_id: str
    inputs: dict[str, Any]
    trigger_info: dict[str, Any] | None = None
    trigger_id: str | None = None
    state: RunState
    reason: str | None = None
    outputs: dict[str, Any] | None = None
    idempotency_key: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime


class StepRecord(BaseModel):
    run_id: str
    key: str = Field(description="the step's name, or name[i] for the i-th item of a for_each")
    step: str
    item_index: int | None = None
    item: Any = None
    state: StepState
    attempt: int = 0
    entry_id: str | None = None
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


EndState = Literal["succeeded", "failed", "cancelled"]


class TriggerKind(StrEnum):
    DIRECTORY = "directory"
    SCHEDULE = "schedule"
    WEBHOOK = "webhook"
    FLOW_END = "flow_end"
    CAMPAIGN = "campaign"


class TriggerRecord(BaseModel):
    id: str
    owner: str
    owner_claims: list[tuple[str, str]] = Field(default_factory=list)
    flow: str
    spec: dict[str, Any]
    kind: TriggerKind
    config: dict[str, Any]
    event_id: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    max_concurrent: int = 4
    secret: str | None = None
    active: bool = True
    created_at: datetime
    cursor: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- tool I/O


FlowRef = Annotated[
    str | dict[str, Any],
    Field(
        description="a flow's name (a file in the server's flow directories), or the flow "
        "itself: an object with the fields of a flow file (name, inputs, steps, outputs)"
    ),
]


class StartFlowInput(BaseModel):
    flow: FlowRef
    inputs: dict[str, Any] = Field(default_factory=dict, description="the flow's inputs")
    event_id: str | None = Field(None, description="where its entries run; default: yours")
    idempotency_key: str | None = Field(
        None, max_length=200, description="a retried start with the same key returns the run"
    )


class RunRef(BaseModel):
    run_id: str


class ListFlowRunsInput(BaseModel):
    flow: str | None = None
    states: list[RunState] | None = None
    limit: Int = Field(50, ge=1, le=500)


class ApproveStepInput(BaseModel):
    run_id: str
    step: str = Field(description="the approval step's name")
    approve: Bool = True
    note: str | None = Field(None, max_length=2000)


class StepView(BaseModel):
    key: str
    step: str
    kind: str
    state: StepState
    attempt: int
    entry_id: str | None
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class FlowRunView(BaseModel):
    run_id: str
    flow: str
    state: RunState
    reason: str | None
    event_id: str
    owner: str
    inputs: dict[str, Any]
    trigger: dict[str, Any] | None
    outputs: dict[str, Any] | None
    steps: list[StepView]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class FlowRunSummary(BaseModel):
    run_id: str
    flow: str
    state: RunState
    reason: str | None
    steps_done: int
    steps: int
    created_at: datetime
    finished_at: datetime | None


class FlowRunList(BaseModel):
    runs: list[FlowRunSummary]


class CreateTriggerInput(BaseModel):
    flow: FlowRef
    kind: TriggerKind
    path: str | None = Field(None, description="directory: the directory to watch")
    pattern: str = Field("*", description="directory: which new files (fnmatch)")
    debounce_s: float = Field(
        2.0, ge=0.1, le=3600, description="directory: a file is complete once unchanged this long"
    )
    cron: str | None = Field(None, description="schedule: when, in cron syntax (UTC)")
    source_flow: str | None = Field(None, description="flow_end: the flow whose runs' end fires")
    on_states: list[EndState] = Field(
        default_factory=lambda: list[EndState](["succeeded"]),
        description="flow_end: which endings fire",
    )
    campaign_id: str | None = Field(
        None, description="campaign: only this campaign of yours (default: any of yours)"
    )
    every: Int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="campaign: fire each time this many more evaluations end",
    )
    inputs: dict[str, Any] = Field(default_factory=dict, description="inputs of every run")
    event_id: str | None = None
    max_concurrent: Int = Field(4, ge=1, le=256, description="runs of this trigger at once")


class TriggerView(BaseModel):
    trigger_id: str
    flow: str
    kind: TriggerKind
    config: dict[str, Any]
    event_id: str
    max_concurrent: int
    active: bool
    created_at: datetime
    webhook_url: str | None = Field(None, description="webhook: where to POST")
    secret: str | None = Field(
        None, description="webhook: the HMAC-SHA256 key, shown once at creation"
    )


class TriggerList(BaseModel):
    triggers: list[TriggerView]


class TriggerRef(BaseModel):
    trigger_id: str
