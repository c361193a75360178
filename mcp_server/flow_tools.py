"""The flows surface of the MCP server: `start_flow`, `get_flow_run`, `list_flow_runs`,
`cancel_flow_run`, `approve_flow_step`, the triggers (`create_trigger`, `list_triggers`,
`delete_trigger`) and the resource `sciorch://flow-runs/{run_id}`, which sends ResourceUpdated
as the run's steps start and end. The server's lifespan holds the manager's `serving()`:
runs left running resume and the triggers watch while the server runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastmcp import FastMCP

from flows.manager import FlowManager, flow_manager
from flows.models import (
    ApproveStepInput,
    CreateTriggerInput,
    FlowRunList,
    FlowRunView,
    ListFlowRunsInput,
    RunRef,
    StartFlowInput,
    TriggerList,
    TriggerRef,
    TriggerView,
)
from ground.models import Principal
from mcp_server.resources import RecordResource, WatchBus
from mcp_server.toolset import ToolSpec, hold_while_serving, register_tools
from orchestrator.engine import Engine
from steering.manager import CampaignManager


def flow_tools(manager: FlowManager) -> tuple[ToolSpec, ...]:
    async def start(engine: Engine, who: Principal, req: StartFlowInput) -> FlowRunView:
        return await manager.start(who, req)

    async def get(engine: Engine, who: Principal, req: RunRef) -> FlowRunView:
        return await manager.get(who, req.run_id)

    async def listing(engine: Engine, who: Principal, req: ListFlowRunsInput) -> FlowRunList:
        return await manager.list_runs(who, req)

    async def cancel(engine: Engine, who: Principal, req: RunRef) -> FlowRunView:
        return await manager.cancel(who, req.run_id)

    async def approve(engine: Engine, who: Principal, req: ApproveStepInput) -> FlowRunView:
        return await manager.approve(who, req)

    async def add_trigger(engine: Engine, who: Principal, req: CreateTriggerInput) -> TriggerView:
        return await manager.create_trigger(who, req)

    async def triggers(engine: Engine, who: Principal) -> TriggerList:
        return await manager.list_triggers(who)

    async def drop_trigger(engine: Engine, who: Principal, req: TriggerRef) -> TriggerView:
        return await manager.delete_trigger(who, req.trigger_id)

    return (
        ToolSpec(
            "start_flow",
            start,
            StartFlowInput,
            FlowRunView,
            "Start a flow: named steps (jobs, service launches, approvals, records) that run "
            "as soon as the steps they need have ended, with parameters from the flow's inputs "
            "and earlier steps' results ({steps.<name>.result.<field>}). Give flow (a name from "
            "the server's flow directories, or the flow itself as an object) and its inputs. "
            "Returns at once; follow it with get_flow_run or the resource "
            "sciorch://flow-runs/{run_id}. Give idempotency_key to make a retried call safe.",
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "get_flow_run",
            get,
            RunRef,
            FlowRunView,
            "One flow run: its state, inputs, outputs, and each step's state, attempt, entry, "
            "result or error.",
            "read",
            read_only=True,
            idempotent=True,
        ),
        ToolSpec(
            "list_flow_runs",
            listing,
            ListFlowRunsInput,
            FlowRunList,
            "Flow runs you can see (yours and those of events shared with you), newest first.",
            "read",
            read_only=True,
            idempotent=True,
        ),
        ToolSpec(
            "cancel_flow_run",
            cancel,
            RunRef,
            FlowRunView,
            "Cancel a flow run: its jobs in flight are cancelled and no further step runs. "
            "Needs the owner or an operator of its event. Idempotent.",
            "submit",
            read_only=False,
            destructive=True,
            idempotent=True,
        ),
        ToolSpec(
            "approve_flow_step",
            approve,
            ApproveStepInput,
            FlowRunView,
            "Answer an approval step of a flow run: approve=true lets the steps after it run, "
            "false fails it. Needs the owner or an operator of the run's event.",
            "submit",
            read_only=False,
            idempotent=True,
        ),
        ToolSpec(
            "create_trigger",
            add_trigger,
            CreateTriggerInput,
            TriggerView,
            "Start runs of a flow automatically, as you: kind=directory (a new file matching "
            "pattern in path, once it stopped changing for debounce_s: {trigger.path}), "
            "schedule (cron, UTC), webhook (POST to webhook_url, signed: header "
            "X-Sciorch-Signature: sha256=<HMAC-SHA256 of the body with secret>; secret is shown "
            "only now), flow_end (a run of source_flow ended). At most max_concurrent runs at "
            "once; the rest queue.",
            "submit",
            read_only=False,
        ),
        ToolSpec(
            "list_triggers",
            triggers,
            None,
            TriggerList,
            "Your active flow triggers.",
            "read",
            read_only=True,
            idempotent=True,
        ),
        ToolSpec(
            "delete_trigger",
            drop_trigger,
            TriggerRef,
            TriggerView,
            "Stop a trigger (runs it started are not affected). Idempotent.",
            "submit",
            read_only=False,
            destructive=True,
            idempotent=True,
        ),
    )


@dataclass
class FlowSurface:
    manager: FlowManager
    tools: list[ToolSpec]
    resource: RecordResource
    _followed: set[Any] = field(default_factory=set)

    async def visible(self, who: Principal, uri: str) -> bool | None:
        return await self.resource.visible(who, uri)

    def publish_to(self, sub_bus: WatchBus) -> None:
        self.resource.publish(self.manager.listeners, sub_bus)

    def follow_campaigns(self, campaigns: CampaignManager) -> None:
        """Campaign milestones for the campaign triggers (flows and steering know nothing of
        each other; the server joins them). Once per manager pair."""
        if campaigns in self._followed:
            return
        self._followed.add(campaigns)
        flows = self.manager
        pending: set[asyncio.Task[None]] = set()

        async def report(campaign_id: str) -> None:
            store = await campaigns.store()
            rec = await store.get_campaign(campaign_id)
            if rec is None:
                return
            done = sum(e.state == "succeeded" for e in await store.evaluations(campaign_id))
            flows.campaign_changed(campaign_id, rec.owner, rec.state.value, done)

        def heard(campaign_id: str) -> None:
            try:
                task = asyncio.get_running_loop().create_task(report(campaign_id))
            except RuntimeError:
                return
            pending.add(task)
            task.add_done_callback(pending.discard)

        campaigns.listeners.append(heard)


def register_flows(
    mcp: FastMCP,
    engine: Engine,
    principal_of: Callable[[], Principal],
    *,
    auth: bool = False,
    read_only: bool = False,
    disable_destructive: bool = False,
) -> FlowSurface:
    manager = flow_manager(engine)
    registered = register_tools(
        mcp,
        flow_tools(manager),
        engine,
        principal_of,
        auth=auth,
        read_only=read_only,
        disable_destructive=disable_destructive,
    )

    resource = RecordResource(
        "sciorch://flow-runs/{run_id}",
        "A flow run (as get_flow_run); updated as its steps progress",
        manager.get,
    )
    resource.register(mcp, principal_of)
    hold_while_serving(mcp, manager.serving)
    return FlowSurface(manager, registered, resource)
