"""The steering surface of the MCP server: tools `start_campaign`, `get_campaign`,
`list_campaigns`, `stop_campaign` (schemas generated from their pydantic models, like every
other tool) and the resource `sciorch://campaigns/{campaign_id}`, which sends ResourceUpdated
as evaluations are asked, submitted and finished.

`register_steering` is called once by `create_server`. The server's MCP lifespan resumes the
campaigns left running (when it starts) and pauses them (when it stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastmcp import FastMCP
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from ground.errors import SciorchError
from ground.models import Principal
from mcp_server.connect import CampaignClients
from mcp_server.toolset import ToolSpec, refused_read, register_tools
from orchestrator.engine import Engine
from steering.manager import CampaignManager, manager_for
from steering.models import (
    CampaignList,
    CampaignView,
    GetCampaignInput,
    ListCampaignsInput,
    StartCampaignInput,
    StopCampaignInput,
)
from steering.spec import parse_spec

log = logging.getLogger("sciorch.steering")

CAMPAIGN = "sciorch://campaigns/{campaign_id}"
_CAMPAIGN_URI = re.compile(r"^sciorch://campaigns/([^/]+)$")


def campaign_uri(campaign_id: str) -> str:
    return CAMPAIGN.format(campaign_id=campaign_id)


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
    )


@dataclass
class SteeringSurface:
    """What `register_steering` added, and its hooks into the server's subscriptions."""

    manager: CampaignManager
    tools: list[ToolSpec]
    principal_of: Callable[[], Principal]
    internal: bool

    async def visible(self, who: Principal, uri: str) -> bool | None:
        """For subscriptions/listen: may `who` watch this campaign URI (None: not a campaign
        URI)."""
        match = _CAMPAIGN_URI.match(uri)
        if match is None:
            return None
        try:
            await self.manager.get(who, match.group(1), with_evals=False)
        except SciorchError:
            return False
        return True

    def publish_to(self, sub_bus: SubscriptionBus) -> None:
        """Send ResourceUpdated for a campaign's URI whenever it changes."""
        if self.internal:
            return
        pending: set[asyncio.Task[None]] = set()

        def forward(campaign_id: str) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            update = ResourceUpdated(uri=campaign_uri(campaign_id))
            task = loop.create_task(sub_bus.publish(update))
            pending.add(task)
            task.add_done_callback(pending.discard)

        self.manager.listeners.append(forward)


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

    @mcp.resource(
        CAMPAIGN,
        mime_type="application/json",
        description="A campaign (as get_campaign); updated as its evaluations progress",
    )
    async def campaign_resource(campaign_id: str) -> str:
        try:
            view = await manager.get(principal_of(), campaign_id)
        except SciorchError as exc:
            raise refused_read(exc) from exc
        return view.model_dump_json()

    surface = SteeringSurface(manager, registered, principal_of, internal)
    if internal:
        return surface

    inner = mcp._lifespan

    @contextlib.asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[Any]:
        async with inner(server) as state, manager.serving():
            yield state

    mcp._lifespan = lifespan
    return surface
