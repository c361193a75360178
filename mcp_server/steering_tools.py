"""The steering surface of the MCP server: tools `start_campaign`, `get_campaign`,
`list_campaigns`, `stop_campaign`; `ask_campaign` and `tell_campaign` for campaigns measured
elsewhere (steering.external); the people-in-the-loop tools `pause_campaign`, `resume_campaign`,
`update_campaign`, `add_points`, `reject_point`, `annotate_campaign` (each recorded with who
did it); `export_campaign` (schemas generated from their pydantic models, like every
other tool) and the resource `sciorch://campaigns/{campaign_id}`, which sends ResourceUpdated
as evaluations are asked, submitted and finished.

`register_steering` is called once by `create_server`. The server's MCP lifespan resumes the
campaigns left running (when it starts) and pauses them (when it stops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastmcp import FastMCP

from ground.models import Principal
from mcp_server.connect import CampaignClients
from mcp_server.resources import RecordResource, WatchBus
from mcp_server.toolset import ToolSpec, hold_while_serving, register_tools
from orchestrator.engine import Engine
from steering import export as table
from steering.manager import CampaignManager, manager_for
from steering.models import (
    AddPointsInput,
    AnnotateCampaignInput,
    AskCampaignInput,
    AskResult,
    CampaignList,
    CampaignView,
    ExportCampaignInput,
    ExportResult,
    GetCampaignInput,
    ListCampaignsInput,
    PauseCampaignInput,
    RejectPointInput,
    StartCampaignInput,
    StopCampaignInput,
    TellCampaignInput,
    TellResult,
    UpdateCampaignInput,
)
from steering.spec import parse_spec

log = logging.getLogger("sciorch.steering")


def steering_tools(manager: CampaignManager) -> tuple[ToolSpec, ...]:
    async def start(engine: Engine, who: Principal, req: StartCampaignInput) -> CampaignView:
        spec = parse_spec(req.model_dump())
        return await manager.start(who, spec)

    async def get(engine: Engine, who: Principal, req: GetCampaignInput) -> CampaignView:
        return await manager.get(who, req.campaign_id, req.evaluations)

    async def listing(engine: Engine, who: Principal, req: ListCampaignsInput) -> CampaignList:
        return await manager.list_campaigns(who, req.include_finished)

    async def stop(engine: Engine, who: Principal, req: StopCampaignInput) -> CampaignView:
        return await manager.stop(who, req.campaign_id, req.cancel_in_flight)

    async def ask(engine: Engine, who: Principal, req: AskCampaignInput) -> AskResult:
        return await manager.ask(who, req.campaign_id, req.n, req.ask_key)

    async def tell(engine: Engine, who: Principal, req: TellCampaignInput) -> TellResult:
        return await manager.tell(who, req)

    async def pause(engine: Engine, who: Principal, req: PauseCampaignInput) -> CampaignView:
        return await manager.pause(who, req.campaign_id, True, req.note)

    async def resume(engine: Engine, who: Principal, req: PauseCampaignInput) -> CampaignView:
        return await manager.pause(who, req.campaign_id, False, req.note)

    async def update(engine: Engine, who: Principal, req: UpdateCampaignInput) -> CampaignView:
        budget = req.budget.model_dump(exclude_unset=True) if req.budget else None
        stop = req.stop.model_dump(exclude_unset=True) if req.stop else None
        return await manager.update(who, req.campaign_id, budget, stop, req.note)

    async def add(engine: Engine, who: Principal, req: AddPointsInput) -> CampaignView:
        return await manager.add_points(who, req.campaign_id, req.points, req.note)

    async def reject(engine: Engine, who: Principal, req: RejectPointInput) -> CampaignView:
        return await manager.reject(who, req.campaign_id, req.point_id, req.note)

    async def annotate(engine: Engine, who: Principal, req: AnnotateCampaignInput) -> CampaignView:
        return await manager.annotate(who, req.campaign_id, req.text)

    async def export(engine: Engine, who: Principal, req: ExportCampaignInput) -> ExportResult:
        rec, evals = await manager.export(who, req.campaign_id, req.max_rows)
        cols = table.columns(rec)
        data = table.rows(rec, evals)
        return ExportResult(
            campaign_id=rec.id,
            columns=cols,
            rows=min(len(data), req.max_rows),
            truncated=len(data) > req.max_rows,
            text=table.to_csv(cols, data[: req.max_rows]),
        )

    steer = "Needs the owner or an operator of the campaign's event; recorded with who did it."
    return (
        ToolSpec(
            "start_campaign",
            start,
            StartCampaignInput,
            CampaignView,
            "Start a closed-loop campaign: a Gaussian process (gpCAM) chooses each next "
            "measurement and sciorch runs it as a job, keeping batch_size in flight, until the "
            "budget is spent or a stop rule holds. Give the objective (a job service, fixed "
            "parameters, the result field, goal minimise | maximise | explore), the space "
            "(named parameters: continuous or integer with low/high, or categorical with "
            "choices), and optionally initial_design, acquisition (gpCAM's names; default "
            "expected improvement), batch_size, budget {evaluations, wall_time_s}, stop "
            "{target, max_posterior_std}, noise, seed, site, retries. Returns at once; follow "
            "it with get_campaign or the resource sciorch://campaigns/{id}.",
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "get_campaign",
            get,
            GetCampaignInput,
            CampaignView,
            "One campaign: state, progress against the budget, best point and value so far, "
            "every evaluation (point, value, entry id, attempts), the GP posterior summary "
            "(largest posterior std, predicted best, hyperparameters) and plot paths once done.",
            "read",
            read_only=True,
            idempotent=True,
        ),
        ToolSpec(
            "list_campaigns",
            listing,
            ListCampaignsInput,
            CampaignList,
            "List your campaigns (running and finished) with progress and best value.",
            "read",
            read_only=True,
            idempotent=True,
        ),
        ToolSpec(
            "stop_campaign",
            stop,
            StopCampaignInput,
            CampaignView,
            "Stop a campaign: no new evaluations; those in flight are cancelled (or, with "
            "cancel_in_flight=false, allowed to finish) and recorded. Idempotent.",
            "submit",
            read_only=False,
            destructive=True,
            idempotent=True,
        ),
        ToolSpec(
            "ask_campaign",
            ask,
            AskCampaignInput,
            AskResult,
            "For a campaign measured elsewhere (objective.kind = external: your instrument, "
            "your plan): the next n points to measure, each with a point_id. Measure them and "
            "report each with tell_campaign; a point not told within objective.ask_timeout_s "
            "goes back to the pool. Give ask_key to make a retried call return the same points. "
            "done=true: the campaign has ended, measure nothing more.",
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "tell_campaign",
            tell,
            TellCampaignInput,
            TellResult,
            "Record a measurement of an external campaign: point_id (from ask_campaign) or the "
            "point itself (any point of the space, suggested or not), the value, optionally its "
            "noise_variance and other readings (data). A point told twice is recorded once "
            "(the first value stands; give tell_key to make retries safe). Returns progress, "
            "best so far and done.",
            "submit",
            read_only=False,
            idempotent=True,
        ),
        ToolSpec(
            "pause_campaign",
            pause,
            PauseCampaignInput,
            CampaignView,
            "Pause a campaign: no new points are chosen (measurements in flight finish and are "
            "recorded) until resume_campaign. " + steer,
            "submit",
            read_only=False,
            idempotent=True,
        ),
        ToolSpec(
            "resume_campaign",
            resume,
            PauseCampaignInput,
            CampaignView,
            "Resume a paused campaign. " + steer,
            "submit",
            read_only=False,
            idempotent=True,
        ),
        ToolSpec(
            "update_campaign",
            update,
            UpdateCampaignInput,
            CampaignView,
            "Change a running campaign's budget {evaluations, wall_time_s} or stop rules "
            "{target, max_posterior_std}; fields given replace the old ones (null clears). "
            + steer,
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "add_points",
            add,
            AddPointsInput,
            CampaignView,
            "Queue points of the space to be measured next, before the GP's own choices (for "
            "an external campaign, ask_campaign returns them first). " + steer,
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "reject_point",
            reject,
            RejectPointInput,
            CampaignView,
            "Reject a suggested point by its point_id: it is not measured (cancelled if in "
            "flight), not used by the GP, and neither it nor its close neighbourhood is "
            "proposed again. A measured point cannot be rejected. " + steer,
            "submit",
            read_only=False,
            destructive=True,
            idempotent=True,
        ),
        ToolSpec(
            "annotate_campaign",
            annotate,
            AnnotateCampaignInput,
            CampaignView,
            "Add a note to a campaign's record (shown in get_campaign's actions). " + steer,
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "export_campaign",
            export,
            ExportCampaignInput,
            ExportResult,
            "A campaign's data as CSV text: one row per evaluation (point_id, source, state, "
            "one column per parameter, value, noise variance, entry, times), oldest first, at "
            "most max_rows. `sciorch campaign export` also writes Parquet.",
            "read",
            read_only=True,
            idempotent=True,
        ),
    )


@dataclass
class SteeringSurface:
    """What `register_steering` added, and its hooks into the server's subscriptions."""

    manager: CampaignManager
    tools: list[ToolSpec]
    principal_of: Callable[[], Principal]
    internal: bool
    resource: RecordResource

    async def visible(self, who: Principal, uri: str) -> bool | None:
        return await self.resource.visible(who, uri)

    def publish_to(self, sub_bus: WatchBus) -> None:
        if not self.internal:
            self.resource.publish(self.manager.listeners, sub_bus)


def campaign_manager(engine: Engine, *, auto_resume: bool | None = None) -> CampaignManager:
    """The engine's campaign manager, its runners reaching the tools through in-process
    servers built for each campaign's owner."""
    return manager_for(engine, CampaignClients(engine), auto_resume=auto_resume)


def register_steering(
    mcp: FastMCP,
    engine: Engine,
    principal_of: Callable[[], Principal],
    *,
    auth: bool = False,
    read_only: bool = False,
    disable_destructive: bool = False,
    internal: bool = False,
) -> SteeringSurface:
    """Add the steering tools and the campaign resource to `mcp`, and the lifespan hook that
    resumes running campaigns when the server starts and pauses them when it stops (not on a
    campaign runner's own server: `internal`)."""
    manager = campaign_manager(engine)
    registered = register_tools(
        mcp,
        steering_tools(manager),
        engine,
        principal_of,
        auth=auth,
        read_only=read_only,
        disable_destructive=disable_destructive,
    )

    async def seen(who: Principal, campaign_id: str) -> object:
        return await manager.get(who, campaign_id, with_evals=False)

    resource = RecordResource(
        "sciorch://campaigns/{campaign_id}",
        "A campaign (as get_campaign); updated as its evaluations progress",
        manager.get,
        seen,
    )
    resource.register(mcp, principal_of)

    surface = SteeringSurface(manager, registered, principal_of, internal, resource)
    if internal:
        return surface

    hold_while_serving(mcp, manager.serving)
    return surface
