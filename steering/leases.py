"""Campaigns among replicas on one PostgreSQL store: each running campaign is run by the one
replica that holds its lease `campaign:<id>` (orchestrator.leases).

The replica that starts a campaign takes its lease. Every serving replica wants the leases of
the campaigns left running, so when the runner's replica dies another one takes the lease
over (after its deadline) and resumes the campaign, re-adopting what was in flight by entry id
and resubmitting what was only asked with the same idempotency key (steering.runner), so no
evaluation is lost or run twice. A finished campaign's lease is released; an interrupted one's
is kept while its replica lives (as on one server: it resumes at the next start).

Updates and stops cross replicas as bus signals: a campaign's update reaches the listeners of
every replica, and a stop asked of a replica that does not run the campaign goes to the one
that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from ground.errors import Conflict
from orchestrator.leases import Want
from steering.models import CampaignState

if TYPE_CHECKING:
    from orchestrator.replicas import Replicas
    from steering.manager import CampaignManager

UPDATED = "campaign"
STOP = "campaign-stop"


def lease_name(campaign_id: str) -> str:
    return f"campaign:{campaign_id}"


class CampaignLeases:
    def __init__(self, manager: CampaignManager, replicas: Replicas) -> None:
        self.manager = manager
        self.keeper = replicas.keeper
        self.bus = replicas.bus
        self.resuming = False  # wanting the campaigns left running: while serving
        self.bus.on_signal(UPDATED, lambda d: manager.notify_local(str(d["id"])))
        self.bus.on_signal(STOP, self._stop_here)
        self.keeper.add_source(self._wanted)

    def _want(self, campaign_id: str) -> Want:
        async def gain() -> None:
            if not self.resuming:  # a campaign started here is launched by its start
                return
            store = await self.manager.store()
            rec = await store.get_campaign(campaign_id)
            if rec is not None and rec.state == CampaignState.RUNNING:
                self.manager.launch(rec)

        async def loss() -> None:
            task = self.manager.tasks.get(campaign_id)
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        return Want(gain, loss)

    async def _wanted(self) -> dict[str, Want]:
        if not self.resuming:
            return {}
        store = await self.manager.store()
        recs = await store.list_campaigns(states=[CampaignState.RUNNING], endpoint="embedded")
        return {lease_name(r.id): self._want(r.id) for r in recs}

    async def take(self, campaign_id: str) -> bool:
        """The lease of a campaign just created here (nobody else can hold it yet)."""
        want = self._want(campaign_id)
        return await self.keeper.acquire(lease_name(campaign_id), want.on_gain, want.on_loss)

    async def serve_here(self, campaign_id: str) -> None:
        """Before this replica starts a runner on demand (an external campaign's ask or tell):
        its lease, or a refusal naming the replica that runs it (two runners would each hand
        out points from their own optimizer)."""
        if campaign_id in self.manager.tasks or await self.take(campaign_id):
            return
        holder = await self.keeper.holder(lease_name(campaign_id)) or "another replica"
        raise Conflict(
            f"campaign_id: {campaign_id} is run by the replica {holder}; send its ask and tell "
            f"calls there, or again once that replica has stopped",
            field="campaign_id",
        )

    async def resume(self) -> list[str]:
        """Start wanting the campaigns left running; those whose leases are free start now."""
        self.resuming = True
        before = set(self.manager.tasks)
        await self.keeper.tick()
        await self.keeper.wait_gained()
        return sorted(set(self.manager.tasks) - before)

    def pause(self) -> None:
        self.resuming = False

    async def finished(self, campaign_id: str) -> None:
        store = await self.manager.store()
        rec = await store.get_campaign(campaign_id)
        if rec is None or rec.state.finished:
            await self.keeper.release(lease_name(campaign_id))

    def updated(self, campaign_id: str) -> None:
        self.bus.signal(UPDATED, {"id": campaign_id})

    async def run_elsewhere(self, campaign_id: str) -> bool:
        holder = await self.keeper.holder(lease_name(campaign_id))
        return holder is not None and holder != self.keeper.owner

    async def stop_elsewhere(self, campaign_id: str, cancel_in_flight: bool) -> None:
        """Ask the replica that runs it to stop it, and wait (bounded) until it has."""
        self.bus.signal(STOP, {"id": campaign_id, "cancel": cancel_in_flight})
        store = await self.manager.store()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rec = await store.get_campaign(campaign_id)
            if rec is None or rec.state.finished:
                return
            await asyncio.sleep(0.1)

    def _stop_here(self, data: dict[str, object]) -> None:
        runner = self.manager.runners.get(str(data["id"]))
        if runner is not None:
            runner.request_stop(bool(data.get("cancel", True)))
