"""Campaign records (as stored) and the views the tools return."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steering.spec import CampaignFields, CampaignSpec


class CampaignState(StrEnum):
    RUNNING = "running"  # a runner works on it, or will when its process starts again
    COMPLETED = "completed"  # budget spent, target reached, uncertainty low or space exhausted
    STOPPED = "stopped"  # stop_campaign
    FAILED = "failed"  # could not go on (service gone, event stopped, ...)

    @property
    def finished(self) -> bool:
        return self is not CampaignState.RUNNING


class EvalState(StrEnum):
    ASKED = "asked"  # chosen and stored; submission may or may not have happened
    SUBMITTED = "submitted"  # the entry id is known
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # every attempt failed, or the result had no usable value
    CANCELLED = "cancelled"  # stopped with the campaign

    @property
    def finished(self) -> bool:
        return self in (EvalState.SUCCEEDED, EvalState.FAILED, EvalState.CANCELLED)


class Attempt(BaseModel):
    attempt: int
    idempotency_key: str
    entry_id: str | None = None
    state: str | None = None
    reason: str | None = None


class EvaluationRecord(BaseModel):
    campaign_id: str
    seq: int
    point: dict[str, Any]
    source: Literal["design", "gp"]
    state: EvalState
    attempt: int = 1
    idempotency_key: str
    entry_id: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    value: float | None = None
    noise: float | None = None
    result: dict[str, Any] | None = None
    reason: str | None = None
    decision_s: float | None = None
    asked_at: datetime
    submitted_at: datetime | None = None
    finished_at: datetime | None = None


class CampaignRecord(BaseModel):
    id: str
    name: str
    owner: str
    admin: bool = False
    spec: CampaignSpec
    seed: int
    state: CampaignState
    reason: str | None = None
    endpoint: str = Field("embedded", description="embedded, or the URL of a remote server")
    event_id: str | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    stop_requested: bool = False
    gp_state: dict[str, Any] = Field(default_factory=dict)
    posterior: dict[str, Any] | None = None
    plots: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------ views


class EvaluationView(BaseModel):
    seq: int
    point: dict[str, Any]
    source: Literal["design", "gp"]
    state: EvalState
    value: float | None
    noise_variance: float | None
    entry_id: str | None
    attempts: int
    reason: str | None
    decision_s: float | None = Field(None, description="time the GP took to choose this point")
    asked_at: datetime
    finished_at: datetime | None


class BestView(BaseModel):
    seq: int
    point: dict[str, Any]
    value: float
    entry_id: str | None


class ProgressView(BaseModel):
    budget: int
    done: int = Field(description="evaluations finished (succeeded, failed or cancelled)")
    succeeded: int
    failed: int
    cancelled: int
    in_flight: int
    retries: int = Field(description="resubmissions after failed attempts")
    elapsed_s: float
    wall_time_s: float | None


class PosteriorView(BaseModel):
    n: int = Field(description="measurements the GP is conditioned on")
    max_std: float = Field(description="largest posterior std over the space (result units)")
    mean_std: float
    predicted_best: dict[str, Any] | None = Field(
        None, description="where the posterior mean is best: point, mean, std"
    )
    hyperparameters: dict[str, Any] | None = Field(
        None, description="signal variance (GP units), length scales (parameter units)"
    )
    trained_at_n: int
    training: bool = Field(description="a hyperparameter training is running in the background")
    noise: str
    output_warp: str | None = None


class CampaignView(BaseModel):
    id: str
    name: str
    owner: str
    state: CampaignState
    reason: str | None
    active: bool = Field(description="a runner in this server is working on it now")
    service: str
    goal: str
    field: str
    acquisition: str
    batch_size: int
    event_id: str | None
    site: str | None
    endpoint: str
    seed: int
    created_at: datetime
    finished_at: datetime | None
    progress: ProgressView
    best: BestView | None
    reference: float | None = Field(None, description="the known optimum, if the spec gave one")
    posterior: PosteriorView | None
    decision_s_median: float | None
    decision_s_max: float | None
    plots: list[str]
    spec: CampaignSpec
    evaluations: list[EvaluationView] | None = Field(
        None, description="every evaluation, oldest first (omitted in lists)"
    )


class CampaignList(BaseModel):
    campaigns: list[CampaignView]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CampaignRef(_In):
    campaign_id: str = Field(
        min_length=1, max_length=64, description="campaign id, e.g. 'cmp-1a2b3c4d5e6f'"
    )


class GetCampaignInput(CampaignRef):
    evaluations: bool = Field(True, description="include every evaluation")


class ListCampaignsInput(_In):
    include_finished: bool = Field(True, description="also list finished campaigns")


class StopCampaignInput(CampaignRef):
    cancel_in_flight: bool = Field(
        True, description="cancel the evaluations still running (they are recorded as cancelled)"
    )


class StartCampaignInput(CampaignFields):
    """The campaign itself: the tool's arguments are the spec's sections (the checks across
    sections run in the tool, so their errors name their field too)."""
