"""Flows among replicas on one PostgreSQL store: one replica, the holder of the lease `flows`
(orchestrator.leases), drives every run and watches every trigger; when it dies another takes the
lease over (after its deadline) and resumes the runs where the store says they are, which the
runner's restart rule makes exact (flows.runner).

Any replica answers the tools. What must happen where the runs are driven goes there as a bus
signal: a run started or queued elsewhere, a cancel, an approval, a trigger created or deleted.
A run's updates go the other way, to the listeners (resource subscriptions) of every replica.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.manager import FlowManager
    from orchestrator.replicas import Replicas

LEASE = "flows"
START = "flow-start"  # {"id": run}: drive it (or start its trigger's queue)
CANCEL = "flow-cancel"  # {"id": run, "by": principal}
APPROVED = "flow-approved"  # {"id": run, "step": key}
TRIGGERS = "flow-triggers"  # {"id": trigger}: added or removed, read it again
UPDATED = "flow-updated"  # {"id": run}


class FlowLeases:
    def __init__(self, manager: FlowManager, replicas: Replicas) -> None:
        self.manager = manager
        self.keeper = replicas.keeper
        self.bus = replicas.bus
        on = self.bus.on_signal
        on(START, lambda d: self._here(manager.start_signalled(str(d["id"]))))
        on(CANCEL, lambda d: self._here(manager.cancel_here(str(d["id"]), str(d["by"]))))
        on(APPROVED, lambda d: self._here(manager.wake_approval(str(d["id"]), str(d["step"]))))
        on(TRIGGERS, lambda d: self._here(manager.reload_trigger(str(d["id"]))))
        on(UPDATED, lambda d: manager.notify_local(str(d["id"])))
        self._bg: set[asyncio.Task[Any]] = set()

    @property
    def here(self) -> bool:
        return self.keeper.holds(LEASE)

    def _here(self, work: Any) -> None:
        """Run a signalled action where the runs are driven (and drop it elsewhere)."""
        if not self.here:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def serve(self) -> None:
        """Want the lease from now on; if it is free, drive the flows here at once."""
        self.keeper.want(LEASE, self.manager.drive_here, self.manager.stop_here)
        await self.keeper.tick()
        await self.keeper.wait_gained()

    def signal(self, topic: str, **data: Any) -> None:
        self.bus.signal(topic, data)

    async def until_ended(self, run_id: str, timeout_s: float = 30.0) -> None:
        """Wait (bounded) until the run has ended: a cancel signalled to the holder took
        effect. Woken by the run's updates, which the holder signals to every replica."""
        heard = asyncio.Event()

        def listener(ident: str) -> None:
            if ident == run_id:
                heard.set()

        self.manager.listeners.append(listener)
        store = await self.manager.store()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    rec = await store.get_run(run_id)
                    if rec is None or rec.state.terminal:
                        return
                    await heard.wait()
                    heard.clear()
        except TimeoutError:
            return
        finally:
            self.manager.listeners.remove(listener)
