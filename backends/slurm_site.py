"""What a Slurm site looks like to the router: nodes and partitions (cached for
`status_ttl_s`), the queue (fetched in the background, at most every `queue_ttl_s`), and from
them the site's status, capabilities, the wait estimate and hints for a rejected job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from backends.slurm_states import ACTIVE_STATES, PENDING_STATES
from backends.slurm_transport import (
    JobInfo,
    NodeInfo,
    PartitionInfo,
    SlurmAuthError,
    SlurmError,
    SlurmTransport,
    SlurmUnavailable,
)
from ground.models import Capabilities, Resources, SiteStatus, format_duration

log = logging.getLogger("sciorch.backends.slurm")


@dataclass
class View:
    """What the site looked like at `at` (for status, capabilities and the wait estimate)."""

    at: float = 0.0
    error: str | None = None
    nodes: list[NodeInfo] = field(default_factory=list)
    partitions: list[PartitionInfo] = field(default_factory=list)
    jobs: list[JobInfo] | None = None
    jobs_at: float = 0.0


class SlurmSite:
    """The cached view of one Slurm site and what the router asks of it."""

    def __init__(
        self,
        name: str,
        transport: SlurmTransport,
        *,
        partition: str | None,
        status_ttl_s: float,
        queue_ttl_s: float,
        rest_url: str,
    ) -> None:
        self.name = name
        self.transport = transport
        self.partition_name = partition
        self.status_ttl_s = status_ttl_s
        self.queue_ttl_s = queue_ttl_s
        self.rest_url = rest_url
        self.view = View()
        self._lock = asyncio.Lock()
        self._queue_task: asyncio.Task[None] | None = None
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        if self._queue_task is not None:
            self._queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_task

    async def capabilities(self) -> Capabilities:
        with contextlib.suppress(SlurmError):
            await self.refresh()
        view = self.view
        part = self.partition(view)
        nodes = self.partition_nodes(view, part)
        usable = [n for n in nodes if n.usable]
        return Capabilities(
            cpus=float(max((n.cpus for n in nodes), default=0)),
            memory_mb=max((n.memory_mb for n in nodes), default=0),
            gpus=max((n.gpus for n in nodes), default=0),
            gpu_types=sorted({t for n in nodes for t in n.gpu_types}),
            max_walltime_s=part.max_time_s if part is not None else None,
            gpus_total=sum(n.gpus for n in usable) if view.error is None else None,
            gpus_free=(
                sum(max(0, n.gpus - n.gpus_used) for n in usable) if view.error is None else None
            ),
        )

    async def status(self, poll_error: str | None) -> tuple[SiteStatus, str | None]:
        """The site's state from nodes and partition; `poll_error`: why following jobs fails."""
        try:
            await self.refresh()
        except SlurmError:
            pass
        view = self.view
        if view.error is not None:
            return SiteStatus.DOWN, view.error
        part = self.partition(view)
        if part is None:
            want = self.partition_name or "(default)"
            return SiteStatus.DOWN, f"partition {want} does not exist on this cluster"
        if not part.up:
            return SiteStatus.DOWN, f"partition {part.name} is down"
        nodes = self.partition_nodes(view, part)
        bad = [n for n in nodes if not n.usable]
        if not nodes:
            return SiteStatus.DOWN, f"partition {part.name} has no nodes"
        if len(bad) == len(nodes):
            # Slurm refuses new jobs outright ("Required node not available").
            return SiteStatus.DOWN, f"no node can take jobs: {node_problems(bad)}"
        if bad:
            return SiteStatus.DEGRADED, f"some nodes are out: {node_problems(bad)}"
        if poll_error is not None:
            return SiteStatus.DEGRADED, poll_error
        return SiteStatus.UP, None

    async def estimate_wait(self, resources: Resources) -> float:
        """Seconds until an entry with these needs would start: 0 when a node has room now;
        else when running jobs free enough (at their time limits) or when the jobs already
        waiting are expected to start (Slurm's backfill estimates), whichever is later."""
        try:
            await self.refresh()
        except SlurmError:
            return float("inf")
        view = self.view
        part = self.partition(view)
        nodes = [n for n in self.partition_nodes(view, part) if n.usable]
        if part is None or not nodes:
            return float("inf")
        need_cpus = max(1, math.ceil(resources.cpus))
        need_mem, need_gpus = resources.memory_mb, resources.gpus

        def fits(cpus: int, mem: int, gpus: int) -> bool:
            return cpus >= need_cpus and mem >= need_mem and gpus >= need_gpus

        if not any(fits(n.cpus, n.memory_mb, n.gpus) for n in nodes):
            return float("inf")
        free = {
            n.name: [n.cpus - n.alloc_cpus, n.memory_mb - n.alloc_memory_mb, n.gpus - n.gpus_used]
            for n in nodes
        }
        if any(fits(*f) for f in free.values()):
            return 0.0  # room now (backfill starts it even with others waiting for more)
        self.refresh_queue_soon()  # the queue matters only now (and is costly to list)
        jobs = [j for j in view.jobs or [] if j.partition in (None, part.name)]
        pending = [j for j in jobs if j.state in PENDING_STATES]
        now = time.time()
        # Running jobs end at their time limit at the latest: give their resources back in order.
        t_fit = None
        running = sorted(
            (j for j in jobs if j.state in ACTIVE_STATES and j.node in free),
            key=lambda j: j.end_time or now,
        )
        for j in running:
            assert j.node is not None
            f = free[j.node]
            f[0] += j.cpus
            f[1] += j.memory_mb
            f[2] += j.gpus
            if fits(*f):
                t_fit = max(now, j.end_time or now)
                break
        starts = [j.start_time for j in pending if j.start_time]
        t_queue = max(starts) if starts else None
        candidates = [t for t in (t_fit, t_queue) if t is not None]
        if not candidates:
            return float(part.max_time_s or 3600)
        return max(0.0, max(candidates) - now)

    def rejection_hint(self, res: Resources, message: str) -> str:
        low = message.lower()
        part = self.partition(self.view)
        nodes = self.partition_nodes(self.view, part)
        if "node configuration is not available" in low and nodes:
            most_gpus = max(n.gpus for n in nodes)
            most_cpus = max(n.cpus for n in nodes)
            most_mem = max(n.memory_mb for n in nodes)
            asked = f"{math.ceil(res.cpus)} CPUs, {res.memory_mb} MiB, {res.gpus} GPU(s)" + (
                f" of type {res.gpu_type}" if res.gpu_type else ""
            )
            return (
                f" (asked for {asked}; the largest node in partition "
                f"{part.name if part else '?'} has {most_cpus} CPUs, {most_mem} MiB, "
                f"{most_gpus} GPU(s))"
            )
        if "time limit" in low and part is not None and part.max_time_s:
            return (
                f" (asked for {format_duration(res.walltime_s)}; partition {part.name} allows "
                f"{format_duration(part.max_time_s)})"
            )
        return ""

    async def refresh(self, *, force: bool = False) -> None:
        """Ping Slurm and learn nodes and partitions, at most every status_ttl_s; errors land
        in the view (status() reports them) and are raised."""
        async with self._lock:
            now = time.time()
            view = self.view
            ttl = self.status_ttl_s
            stale = force or now - view.at >= ttl
            if stale:
                try:
                    await self.transport.ping()
                    nodes = await self.transport.nodes()
                    parts = await self.transport.partitions()
                except SlurmError as exc:
                    view.at = now
                    view.error = self.describe_error(exc)
                    raise
                self.view = view = View(
                    at=now,
                    nodes=nodes,
                    partitions=parts,
                    jobs=view.jobs,
                    jobs_at=view.jobs_at,
                )
            elif view.error is not None:
                raise SlurmUnavailable(view.error)

    def refresh_queue_soon(self) -> None:
        """The queue (every job of the partition) costs slurmctld more than anything else we
        ask: fetch it in the background, at most every queue_ttl_s; estimates use the latest."""
        now = time.time()
        fresh = now - self.view.jobs_at < self.queue_ttl_s
        if self._queue_task is not None or fresh or self.closed:
            return

        async def fetch() -> None:
            try:
                jobs = await self.transport.jobs(None)
                self.view.jobs, self.view.jobs_at = jobs, time.time()
            except SlurmError as exc:
                log.debug("slurm site %s: queue snapshot failed: %s", self.name, exc)
                self.view.jobs_at = time.time()
            finally:
                self._queue_task = None

        self._queue_task = asyncio.get_running_loop().create_task(fetch())

    def describe_error(self, exc: SlurmError) -> str:
        where = (
            f"slurmrestd at {self.rest_url}"
            if self.transport.name == "rest"
            else "the Slurm commands"
        )
        if isinstance(exc, SlurmAuthError):
            return f"{where} refused sciorch's credentials: {exc.message}"
        if isinstance(exc, SlurmUnavailable):
            return f"Slurm cannot be reached through {where}: {exc.message}"
        return f"Slurm error through {where}: {exc.message}"

    def partition(self, view: View) -> PartitionInfo | None:
        want = self.partition_name
        for p in view.partitions:
            if (want is not None and p.name == want) or (want is None and p.default):
                return p
        if want is None and view.partitions:
            return view.partitions[0]
        return None

    @staticmethod
    def partition_nodes(view: View, part: PartitionInfo | None) -> list[NodeInfo]:
        if part is None:
            return []
        names = set(part.nodes)
        return [n for n in view.nodes if n.name in names or part.name in n.partitions]


def node_problems(nodes: list[NodeInfo]) -> str:
    parts = []
    for n in nodes[:5]:
        flags = "+".join(sorted(n.flags))
        what = n.state + (f"+{flags.lower()}" if flags else "")
        parts.append(f"node {n.name} is {what}" + (f" ({n.reason})" if n.reason else ""))
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return "; ".join(parts) + more


__all__ = ["SlurmSite", "View", "node_problems"]
