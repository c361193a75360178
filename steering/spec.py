"""The campaign declaration: what to measure, over which space, how to choose, when to stop.

A campaign is a TOML or YAML file (or the arguments of the `start_campaign` tool) validated by
`CampaignSpec`. Errors name the failing field as a dotted path (`space.1.high`,
`budget.evaluations`), whichever way the campaign arrives.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ground.documents import read_document
from ground.errors import InvalidInput, invalid_input
from ground.models import MAX_DURATION_S, Bool, Int, Number, OptInt, OptNumber, parse_duration_s
from orchestrator.results_query import parse_query

Goal = Literal["minimise", "maximise", "explore"]

# gpCAM 8.6's acquisition functions for single-task GPs, by their gpCAM names.
ACQUISITIONS = (
    "expected improvement",
    "probability of improvement",
    "noisy expected improvement",
    "knowledge gradient",
    "lcb",
    "ucb",
    "minimum",
    "maximum",
    "variance",
    "gradient",
    "target probability",
    "total correlation",
    "relative information entropy",
    "relative information entropy set",
)
# Criteria that score a whole set: the batch is chosen jointly by gpCAM (greedy selection over a
# candidate list). They measure information, not progress, so they serve goal = explore.
SET_ACQUISITIONS = frozenset(
    {"total correlation", "relative information entropy", "relative information entropy set"}
)
ALIASES = {
    "ei": "expected improvement",
    "pi": "probability of improvement",
    "nei": "noisy expected improvement",
    "kg": "knowledge gradient",
    "tc": "total correlation",
    "std": "variance",
}
_GOAL_ALIASES = {
    "minimise": "minimise",
    "minimize": "minimise",
    "min": "minimise",
    "maximise": "maximise",
    "maximize": "maximise",
    "max": "maximise",
    "explore": "explore",
}
NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Strict):
    """What one evaluation is: a job of `service` with `parameters` plus the point's values; or,
    with kind = external, a measurement made elsewhere (an instrument's own control system) that
    asks for points with `ask_campaign` and reports them with `tell_campaign`."""

    kind: Literal["service", "external"] = Field(
        "service",
        description="service: sciorch runs each evaluation as a job; external: the points are "
        "asked and told over MCP (ask_campaign, tell_campaign). Default: external when no "
        "service is given",
    )
    service: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="catalogue job to run, optionally name@version (kind = service)",
    )
    ask_timeout_s: Number = Field(
        600.0,
        gt=0,
        le=MAX_DURATION_S,
        description="external: an asked point not told within this long goes back to the pool",
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="fixed parameters sent with every evaluation"
    )
    priority: Literal["normal", "urgent"] = Field(
        "normal", description="urgent: each evaluation is submitted as urgent work (by policy)"
    )
    field: str = Field(
        "value",
        min_length=1,
        max_length=200,
        description="result field to optimise; dotted for nested fields, e.g. 'metrics.snr'",
    )
    goal: Goal = Field(
        "minimise", description="minimise or maximise the field, or explore (reduce uncertainty)"
    )
    reference: OptNumber = Field(
        None, description="known optimum, only for reports (e.g. 0.397887 for Branin)"
    )
    warp: Literal["auto", "log", "none"] = Field(
        "auto",
        description="compress bad values logarithmically before the GP sees them: auto "
        "chooses by marginal likelihood at each training",
    )

    @field_validator("goal", mode="before")
    @classmethod
    def _goal(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in _GOAL_ALIASES:
            return _GOAL_ALIASES[v.strip().lower()]
        return v

    @field_validator("ask_timeout_s", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return parse_duration_s(v) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data and data.get("service") is None:
            return {**data, "kind": "external"}
        return data

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if self.kind == "service" and self.service is None:
            raise ValueError("a service objective names its job: service = 'name[@version]'")
        if self.kind == "external":
            if self.service is not None:
                raise ValueError("an external objective is measured elsewhere: drop service")
            if self.parameters:
                raise ValueError("parameters: fixed job parameters need kind = 'service'")
        return self

    @property
    def external(self) -> bool:
        return self.kind == "external"


class Parameter(_Strict):
    """One dimension of the search space; its name is the job parameter it sets."""

    name: str = Field(pattern=NAME, description="the job parameter this dimension sets")
    type: Literal["continuous", "integer", "categorical"] = "continuous"
    low: OptNumber = Field(None, description="lower bound (continuous, integer)")
    high: OptNumber = Field(None, description="upper bound (continuous, integer)")
    choices: list[str | int | float | bool] | None = Field(
        None, description="the values of a categorical parameter"
    )
    log: Bool = Field(False, description="search on a log scale (bounds must be > 0)")

    @model_validator(mode="after")
    def _check(self) -> Parameter:
        if self.type == "categorical":
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes choices, not low/high")
            if self.log:
                raise ValueError("log applies to continuous and integer parameters")
            if not self.choices or len(self.choices) < 2:
                raise ValueError("a categorical parameter needs at least 2 choices")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError("choices must be distinct")
            return self
        if self.choices is not None:
            raise ValueError(f"choices apply to categorical parameters, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "integer" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an integer parameter needs whole-number low and high")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


class InitialDesign(_Strict):
    count: OptInt = Field(
        None, ge=1, le=10_000, description="space-filling points before the GP decides"
    )
    method: Literal["sobol", "lhs", "random"] = Field(
        "sobol", description="scrambled Sobol or Latin hypercube (scipy.stats.qmc), or random"
    )


class Budget(_Strict):
    evaluations: Int = Field(30, ge=1, le=100_000, description="points to evaluate at most")
    wall_time_s: OptNumber = Field(
        None,
        gt=0,
        le=MAX_DURATION_S,
        description="stop after this long from the start ('2h', '30m' accepted)",
    )
    cost: OptNumber = Field(
        None, gt=0, description="stop once the evaluations' cost (see `cost`) reaches this"
    )

    @field_validator("wall_time_s", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_duration_s(v)
        return v


class Stop(_Strict):
    target: OptNumber = Field(
        None, description="stop once the best value reaches this (<= for minimise, >= maximise)"
    )
    max_posterior_std: OptNumber = Field(
        None, gt=0, description="stop once the GP's largest posterior std over the space is below"
    )


class Noise(_Strict):
    """Measurement noise: per result (`field`), a known `variance`, or learned by the GP."""

    field: str | None = Field(
        "noise_variance", description="result field holding each measurement's noise variance"
    )
    variance: OptNumber = Field(
        None, ge=0, description="known noise variance, used where the result does not say"
    )
    learn: Bool = Field(False, description="learn one noise level with the hyperparameters")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str) and data.strip().lower() == "learn":
            return {"learn": True, "field": None}
        if isinstance(data, int | float) and not isinstance(data, bool):
            return {"variance": data, "field": None}
        return data


class Plot(_Strict):
    dims: list[str] | None = Field(
        None,
        min_length=1,
        max_length=2,
        description="the space parameters the posterior plot shows (default: the first two)",
    )


class SeedFrom(_Strict):
    """Earlier results that count as known data before the first suggestion (search_results'
    filters): each row whose parameters are a point of the space and whose result has the
    objective's field is told to the GP as measured; nothing of it runs again."""

    query: str = Field(
        "",
        max_length=4000,
        description='search_results query on parameter/result fields, e.g. surface = "branin"',
    )
    service: str | None = Field(
        None, min_length=1, max_length=128, description="default: the objective's service"
    )
    campaign_id: str | None = Field(
        None, min_length=1, max_length=64, description="only the evaluations of this campaign"
    )
    event_id: str | None = Field(None, min_length=1, max_length=64, description="only this event")
    limit: Int = Field(500, ge=1, le=10_000, description="rows at most (the newest first)")

    @field_validator("query")
    @classmethod
    def _parses(cls, v: str) -> str:
        try:
            parse_query(v, "query")
        except InvalidInput as exc:
            raise ValueError(exc.message.removeprefix("query: ")) from None
        return v


class ObjectiveField(_Strict):
    """One of several objectives: a result field, its direction, and optionally its coordinate
    of the hypervolume reference point (the worst value still worth anything)."""

    field: str = Field(min_length=1, max_length=200, description="result field, dotted if nested")
    goal: Literal["minimise", "maximise"] = "minimise"
    reference_point: OptNumber = Field(
        None,
        description="hypervolume reference (default: the worst value seen plus 10 % of the range)",
    )

    @field_validator("goal", mode="before")
    @classmethod
    def _goal(cls, v: Any) -> Any:
        name = _GOAL_ALIASES.get(v.strip().lower()) if isinstance(v, str) else None
        return name if name in ("minimise", "maximise") else v


class Cost(_Strict):
    """The cost of an evaluation: a result field (e.g. measured seconds), plus a movement model:
    `overhead` + the distance travelled along each parameter from the previous point times its
    `per_unit` cost (motors moving one after another; `simultaneous`: the slowest counts)."""

    field: str | None = Field(
        None, min_length=1, max_length=200, description="result field holding the cost"
    )
    per_unit: dict[str, Number] = Field(
        default_factory=dict, description="cost per unit of travel, by space parameter"
    )
    overhead: Number = Field(0.0, ge=0, description="fixed cost of every evaluation")
    simultaneous: Bool = Field(False, description="parameters move at once: the slowest counts")

    @model_validator(mode="after")
    def _some(self) -> Cost:
        if self.field is None and not self.per_unit and self.overhead == 0:
            raise ValueError("cost: give a field, per_unit travel costs or an overhead")
        if any(v < 0 for v in self.per_unit.values()):
            raise ValueError("cost.per_unit: costs must be >= 0")
        return self


class CampaignFields(_Strict):
    """The sections of a campaign, each validated on its own (the start_campaign tool's input);
    `CampaignSpec` adds the checks across sections."""

    name: str | None = Field(None, max_length=200, description="a label")
    objective: Objective
    space: list[Parameter] = Field(min_length=1, max_length=32)
    initial_design: InitialDesign = Field(default_factory=InitialDesign)
    acquisition: str | None = Field(
        None,
        description="gpCAM acquisition function; default expected improvement (variance "
        "for explore). For minimise use lcb, not ucb.",
    )
    acquisition_args: dict[str, Number] = Field(
        default_factory=dict, description="e.g. {a, b} for 'target probability' (result units)"
    )
    batch_size: Int = Field(1, ge=1, le=64, description="evaluations kept in flight at once")
    budget: Budget = Field(default_factory=Budget)
    stop: Stop = Field(default_factory=Stop)
    noise: Noise = Field(default_factory=Noise)
    seed: OptInt = Field(None, ge=0, le=2**32 - 1, description="default: chosen at start")
    site: str | None = Field(
        None, min_length=1, max_length=64, description="run evaluations on this site"
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="event to run in; default: a new event per campaign",
    )
    retries: Int = Field(2, ge=0, le=10, description="resubmissions of a failed evaluation")
    plot: Plot = Field(default_factory=Plot)
    seed_from: SeedFrom | None = Field(
        None, description="seed the GP with earlier results found by this search"
    )
    objectives: list[ObjectiveField] | None = Field(
        None,
        min_length=2,
        max_length=3,
        description="several result fields to balance (replaces objective.field and goal): "
        "the campaign keeps their Pareto front and chooses by expected hypervolume improvement",
    )
    constraints: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="inequalities: on parameters ('x1 + x2 <= 1.5', never proposed where "
        "violated) or on one result field ('value_b <= 3', modelled by its own GP)",
    )
    feasibility: Literal["learn", "off"] = Field(
        "learn",
        description="learn where evaluations fail (a GP classifier on failed and succeeded "
        "points) and stop proposing there",
    )
    cost: Cost | None = Field(None, description="what an evaluation costs; choose per unit cost")

    @field_validator("acquisition", mode="before")
    @classmethod
    def _acq(cls, v: Any) -> Any:
        if isinstance(v, str):
            name = " ".join(v.strip().lower().replace("_", " ").replace("-", " ").split())
            name = ALIASES.get(name, name)
            if name not in ACQUISITIONS:
                raise ValueError(
                    f"unknown acquisition {v!r}; gpCAM's are: {', '.join(ACQUISITIONS)}"
                )
            return name
        return v


class CampaignSpec(CampaignFields):
    """A closed-loop campaign: gpCAM chooses each next point, sciorch's tools measure it."""

    @model_validator(mode="after")
    def _check(self) -> CampaignSpec:
        names = [p.name for p in self.space]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"space: parameter names must be distinct; repeated: {dupes}")
        fixed = sorted(set(names) & set(self.objective.parameters))
        if fixed:
            raise ValueError(
                f"objective.parameters: fixes {fixed}, which the space searches; drop one"
            )
        goal = self.objective.goal
        acq = self.acquisition_name
        wrong = {"minimise": ("ucb", "maximum"), "maximise": ("lcb", "minimum")}
        if goal in wrong and acq in wrong[goal]:
            good = {"ucb": "lcb", "lcb": "ucb", "maximum": "minimum", "minimum": "maximum"}[acq]
            raise ValueError(
                f"acquisition: {acq!r} chases the opposite of goal={goal}; use {good!r}"
            )
        if acq in SET_ACQUISITIONS and goal != "explore":
            raise ValueError(
                f"acquisition: {acq!r} measures information, not progress; use it with "
                "goal = 'explore', or expected improvement to optimise"
            )
        if acq == "target probability":
            a, b = self.acquisition_args.get("a"), self.acquisition_args.get("b")
            if a is None or b is None or not a < b:
                raise ValueError("acquisition_args: 'target probability' needs a < b")
        if self.plot.dims:
            unknown = [d for d in self.plot.dims if d not in names]
            if unknown:
                raise ValueError(f"plot.dims: {unknown} are not space parameters {names}")
            if len(set(self.plot.dims)) != len(self.plot.dims):
                raise ValueError("plot.dims: must be distinct")
        if self.stop.target is not None and goal == "explore":
            raise ValueError("stop.target: needs goal = minimise or maximise")
        if self.seed_from is not None and self.objective.external:
            raise ValueError(
                "seed_from: seeds campaigns whose jobs sciorch runs, not external ones"
            )
        _check_extensions(self)
        return self

    @property
    def acquisition_name(self) -> str:
        if self.acquisition is not None:
            return self.acquisition
        return "variance" if self.objective.goal == "explore" else "expected improvement"

    @property
    def design_count(self) -> int:
        """Initial design size: as given, else 2 per dimension plus 2 (at least 5), and never
        more than half the budget (but at least 2 points, which the GP needs)."""
        if self.initial_design.count is not None:
            return min(self.initial_design.count, self.budget.evaluations)
        default = max(5, 2 * len(self.space) + 2)
        return max(min(default, self.budget.evaluations // 2), min(2, self.budget.evaluations))


# ------------------------------------------------------------------------------ objectives,
# constraints, cost


def _check_extensions(spec: CampaignSpec) -> None:
    from steering.constraints import split_constraints

    names = [p.name for p in spec.space]
    if spec.objectives is not None:
        if spec.objective.goal == "explore":
            raise ValueError("objectives: several objectives are optimised, not explored")
        if spec.acquisition is not None:
            raise ValueError(
                "acquisition: several objectives are chosen by expected hypervolume improvement"
            )
        if spec.stop.target is not None:
            raise ValueError("stop.target: applies to one objective; drop it with objectives")
        fields = [o.field for o in spec.objectives]
        if len(set(fields)) != len(fields):
            raise ValueError("objectives: the fields must be distinct")
        # objective.field/goal describe the first objective (best, plots, a tell's `value`)
        spec.objective.field, spec.objective.goal = fields[0], spec.objectives[0].goal
    try:
        split_constraints(spec.constraints, {p.name: p.type for p in spec.space})
    except InvalidInput as exc:
        raise ValueError(exc.message) from None
    if spec.cost is not None:
        unknown = sorted(set(spec.cost.per_unit) - set(names))
        if unknown:
            raise ValueError(f"cost.per_unit: {unknown} are not space parameters {names}")
        cats = [
            p.name for p in spec.space if p.type == "categorical" and p.name in spec.cost.per_unit
        ]
        if cats:
            raise ValueError(f"cost.per_unit: {cats} are categorical; travel needs numbers")
    if spec.budget.cost is not None and spec.cost is None:
        raise ValueError("budget.cost: say what an evaluation costs in `cost`")
    if spec.constraints:
        from steering.space import Space

        space = Space(spec.space, spec.constraints)
        if not len(space.feasible(space.sobol(4096, _rng(spec)))):
            raise ValueError("constraints: no point of the space satisfies them all")


def _rng(spec: CampaignSpec) -> Any:
    import numpy as np

    return np.random.default_rng(0 if spec.seed is None else spec.seed)


# ------------------------------------------------------------------------------ loading


def parse_spec(data: Any, source: str | None = None) -> CampaignSpec:
    if not isinstance(data, dict):
        raise InvalidInput(
            f"{source + ': ' if source else ''}a campaign is a table/mapping with objective, "
            "space, budget, ...",
            field="campaign",
        )
    try:
        return CampaignSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc, where=source) from None


def load_spec(path: Path) -> CampaignSpec:
    """Read a campaign from a .toml, .yaml or .yml file."""
    return parse_spec(read_document(path, "campaign"), str(path))
