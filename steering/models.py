"""Campaign records (as stored) and the views the tools return."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ground.errors import FieldValueError
from ground.models import Bool, Int, Number, OptInt, OptNumber
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
    QUEUED = "queued"  # added by a person (add_points): measured before the GP's next choice
    REJECTED = "rejected"  # a person refused it (reject_point): kept out of the GP and of asks
    RELEASED = "released"  # external: its lease passed untold; it went back to the pool

    @property
    def finished(self) -> bool:
        return self in (
            EvalState.SUCCEEDED,
            EvalState.FAILED,
            EvalState.CANCELLED,
            EvalState.REJECTED,
            EvalState.RELEASED,
        )

    @property
    def spends_budget(self) -> bool:
        """Counts against budget.evaluations (queued, rejected and released points do not)."""
        return self not in (EvalState.QUEUED, EvalState.REJECTED, EvalState.RELEASED)


Source = Literal["design", "gp", "added", "external", "seed"]


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
    source: Source
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
    lease_until: datetime | None = None  # external: back to the pool after this, untold
    ask_key: str | None = None  # the ask_campaign call that chose it (a retried ask repeats)
    tell_key: str | None = None  # the tell_campaign call that recorded it

    @property
    def point_id(self) -> str:
        return point_id(self.campaign_id, self.seq)


def point_id(campaign_id: str, seq: int) -> str:
    return f"{campaign_id}-p{seq}"


class CampaignRecord(BaseModel):
    id: str
    name: str
    owner: str
    admin: bool = False
    # The owner's token claims, so its jobs map to the same site accounts (ground.accounts).
    owner_claims: list[tuple[str, str]] = Field(default_factory=list)
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
    paused: bool = False
    gp_state: dict[str, Any] = Field(default_factory=dict)
    posterior: dict[str, Any] | None = None
    plots: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------ views


class ActionRecord(BaseModel):
    id: str
    campaign_id: str
    at: datetime
    principal: str
    action: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ActionView(BaseModel):
    at: datetime
    principal: str = Field(description="who did it")
    action: str
    arguments: dict[str, Any]


class EvaluationView(BaseModel):
    seq: int
    point_id: str
    point: dict[str, Any]
    source: Source
    state: EvalState
    value: float | None
    noise_variance: float | None
    entry_id: str | None
    attempts: int
    reason: str | None
    decision_s: float | None = Field(None, description="time the GP took to choose this point")
    asked_at: datetime
    finished_at: datetime | None
    values: dict[str, float | None] | None = Field(
        None,
        description="several objectives, constraints, cost: each modelled result field's value",
    )

    @classmethod
    def of(cls, e: EvaluationRecord, fields: list[str] | None = None) -> EvaluationView:
        from steering.views import lookup

        return cls(
            values={f: lookup(e.result, f) for f in fields} if fields else None,
            seq=e.seq,
            point_id=e.point_id,
            point=e.point,
            source=e.source,
            state=e.state,
            value=e.value,
            noise_variance=e.noise,
            entry_id=e.entry_id,
            attempts=e.attempt,
            reason=e.reason,
            decision_s=e.decision_s,
            asked_at=e.asked_at,
            finished_at=e.finished_at,
        )


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
    in_flight: int = Field(description="asked or submitted, not yet measured")
    queued: int = Field(0, description="added by a person, to be measured next")
    rejected: int = Field(0, description="refused by a person, never proposed again")
    retries: int = Field(description="resubmissions after failed attempts")
    elapsed_s: float
    wall_time_s: float | None


class PosteriorPoint(BaseModel):
    n: int = Field(description="measurements the GP was conditioned on")
    mean: float = Field(description="posterior mean at the predicted best")
    std: float = Field(description="posterior std there")


class PosteriorView(BaseModel):
    n: int = Field(description="measurements the GP is conditioned on")
    max_std: float = Field(description="largest posterior std over the space (result units)")
    mean_std: float
    predicted_best: dict[str, Any] | None = Field(
        None, description="where the posterior mean is best: point, mean, std"
    )
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="kernel (two-scale: a trend plus fine ripples), signal variance (GP "
        "units), length scales (parameter units), fine_signal_variance and "
        "fine_length_fraction (of each parameter's range) for the ripples",
    )
    trained_at_n: int
    training: bool = Field(description="a hyperparameter training is running in the background")
    noise: str
    output_warp: str | None = None
    trace: list[PosteriorPoint] = Field(
        default_factory=list,
        description="the predicted best after each summary, oldest first (at most 500)",
    )


class CampaignView(BaseModel):
    id: str
    name: str
    owner: str
    state: CampaignState
    reason: str | None
    active: bool = Field(description="a runner in this server is working on it now")
    paused: bool = Field(False, description="no new points are chosen until resume_campaign")
    kind: str = Field("service", description="service (sciorch runs jobs) or external")
    service: str | None
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
    actions: list[ActionView] | None = Field(
        None,
        description="what people did (pause, budget, points, rejections, notes), oldest "
        "first (omitted in lists)",
    )
    front: FrontView | None = Field(
        None, description="several objectives: the Pareto front of the feasible measurements"
    )
    cost_spent: float | None = Field(
        None, description="with `cost`: what the finished evaluations cost (budget.cost units)"
    )


class FrontPoint(BaseModel):
    seq: int
    point: dict[str, Any]
    values: dict[str, float] = Field(description="the objectives' measured values")


class FrontView(BaseModel):
    points: list[FrontPoint] = Field(description="non-dominated, by the first objective")
    hypervolume: float = Field(description="dominated up to the reference point")
    reference_point: list[float] | None = Field(
        None, description="per objective, in result units (given, or worst seen + 10 % range)"
    )
    feasible: int = Field(description="measurements with every objective and constraint met")


class CampaignList(BaseModel):
    campaigns: list[CampaignView]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CampaignRef(_In):
    campaign_id: str = Field(
        min_length=1, max_length=64, description="campaign id, e.g. 'cmp-1a2b3c4d5e6f'"
    )


class GetCampaignInput(CampaignRef):
    evaluations: Bool = Field(True, description="include every evaluation")


class ListCampaignsInput(_In):
    include_finished: Bool = Field(True, description="also list finished campaigns")


class StopCampaignInput(CampaignRef):
    cancel_in_flight: Bool = Field(
        True, description="cancel the evaluations still running (they are recorded as cancelled)"
    )


class StartCampaignInput(CampaignFields):
    """The campaign itself: the tool's arguments are the spec's sections (the checks across
    sections run in the tool, so their errors name their field too)."""


# ------------------------------------------------------------------------------ ask / tell


class AskCampaignInput(CampaignRef):
    n: Int = Field(1, ge=1, le=64, description="how many points to suggest")
    ask_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the same key again (a retried call) returns the same points, not new ones",
    )


class AskedPoint(BaseModel):
    point_id: str = Field(description="give it to tell_campaign with the measured value")
    point: dict[str, Any]
    source: Source
    lease_until: datetime | None = Field(
        None, description="untold by then, the point goes back to the pool"
    )


class AskResult(BaseModel):
    campaign_id: str
    points: list[AskedPoint]
    state: CampaignState
    done: bool = Field(description="the campaign has ended: measure nothing more")
    told: int = Field(description="measurements recorded (against the budget)")
    pending: int = Field(description="asked points not yet told")
    budget: int
    paused: bool
    reason: str | None = Field(None, description="why fewer points than asked for, if so")


class TellCampaignInput(CampaignRef):
    point_id: str | None = Field(
        None, min_length=1, max_length=96, description="the id ask_campaign gave the point"
    )
    point: dict[str, Any] | None = Field(
        None, description="or the point itself (one the campaign never suggested, too)"
    )
    value: Number = Field(description="the measured value of the objective's field")
    noise_variance: OptNumber = Field(None, ge=0, description="the measurement's noise variance")
    tell_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="a retried tell with the same key is recorded once",
    )
    data: dict[str, Any] | None = Field(None, description="other readings kept with the point")

    @model_validator(mode="after")
    def _one(self) -> TellCampaignInput:
        if (self.point_id is None) == (self.point is None):
            raise FieldValueError(
                "point_id", "give point_id (from ask_campaign) or point, one of them"
            )
        return self


class TellResult(BaseModel):
    campaign_id: str
    point_id: str
    seq: int
    recorded: bool = Field(description="false: this point was already told; the first stands")
    value: float | None
    state: CampaignState
    done: bool
    told: int
    budget: int
    best: BestView | None


# ------------------------------------------------------------------------------ people


class BudgetPatch(_In):
    evaluations: OptInt = Field(None, ge=1, le=100_000)
    wall_time_s: OptNumber | str = Field(None, description="seconds, or '2h', '30m'; null: none")


class StopPatch(_In):
    target: OptNumber = None
    max_posterior_std: OptNumber = Field(None, gt=0)


class PauseCampaignInput(CampaignRef):
    note: str | None = Field(None, max_length=2000, description="why (kept with the action)")


class UpdateCampaignInput(CampaignRef):
    budget: BudgetPatch | None = Field(None, description="fields given replace the budget's")
    stop: StopPatch | None = Field(None, description="fields given replace the stop rules'")
    note: str | None = Field(None, max_length=2000)


class AddPointsInput(CampaignRef):
    points: list[dict[str, Any]] = Field(
        min_length=1, max_length=100, description="points of the space, measured next in order"
    )
    note: str | None = Field(None, max_length=2000)


class RejectPointInput(CampaignRef):
    point_id: str = Field(min_length=1, max_length=96, description="a point id (get_campaign)")
    note: str | None = Field(None, max_length=2000, description="why")


class AnnotateCampaignInput(CampaignRef):
    text: str = Field(min_length=1, max_length=4000)


class ExportCampaignInput(CampaignRef):
    max_rows: Int = Field(10_000, ge=1, le=100_000, description="rows at most (oldest first)")


class ExportResult(BaseModel):
    campaign_id: str
    format: Literal["csv"] = "csv"
    columns: list[str]
    rows: int
    truncated: bool
    text: str
