"""The local backend's resources and queue: what this machine has (cpus, memory, whole GPUs,
real or virtual), what is free, and the FIFO queue with backfill that decides which waiting
entry starts next. It knows entries only as allocations (resources, GPUs, a deadline), never
their processes."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from backends.supervisor import walltime_over_limit
from ground.models import Resources

log = logging.getLogger("sciorch.backends.local")

_EPS = 1e-9


class Allocation(Protocol):
    """What the pool needs to know about an entry."""

    gpus: list[int]
    allocated: bool

    @property
    def resources(self) -> Resources: ...

    def deadline(self, now: float) -> float:
        """When it gives its resources back at the latest (its walltime's end)."""
        ...

    @property
    def group(self) -> tuple[str, int] | None:
        """(name, n): at most n entries of this group hold resources at once (a sweep's
        throttle); None: no such bound."""
        ...


A = TypeVar("A", bound=Allocation)


@dataclass
class Pool:
    cpus: float
    memory_mb: int
    gpus: set[int]

    def copy(self) -> Pool:
        return Pool(self.cpus, self.memory_mb, set(self.gpus))

    def take(self, res: Resources, gpus: list[int]) -> None:
        self.cpus -= res.cpus
        self.memory_mb -= res.memory_mb
        self.gpus -= set(gpus)

    def give(self, res: Resources, gpus: list[int]) -> None:
        self.cpus += res.cpus
        self.memory_mb += res.memory_mb
        self.gpus |= set(gpus)


class ResourcePool(Generic[A]):
    """The machine's resources, what is free now and the entries waiting for them."""

    def __init__(
        self,
        cpus: float | None,
        memory_mb: int | None,
        gpu_names: dict[int, str],
        max_walltime_s: int | None,
    ) -> None:
        self.total_cpus = cpus if cpus is not None else cpu_count()
        self.total_memory_mb = memory_mb if memory_mb is not None else total_memory_mb()
        self.gpu_names = gpu_names  # index -> type name ("" for an unnamed virtual GPU)
        self.max_walltime_s = max_walltime_s
        self.free = self.full()
        self.queue: list[A] = []

    def set_gpus(self, gpu_names: dict[int, str]) -> None:
        self.gpu_names = gpu_names
        self.free = self.full()

    def reset(self) -> None:
        self.free = self.full()
        self.queue.clear()

    @property
    def gpu_types(self) -> list[str]:
        return sorted({n for n in self.gpu_names.values() if n})

    def full(self) -> Pool:
        return Pool(self.total_cpus, self.total_memory_mb, set(self.gpu_names))

    # ------------------------------------------------------------------ fitting

    def gpu_matches(self, index: int, gpu_type: str | None) -> bool:
        if not gpu_type:
            return True
        name = self.gpu_names.get(index, "").lower()
        want = gpu_type.lower()
        return bool(name) and (want == name or want in name)

    def fit(self, pool: Pool, res: Resources) -> list[int] | None:
        """GPU indices to assign if `res` fits in `pool` (an empty list without GPUs)."""
        if res.cpus > pool.cpus + _EPS or res.memory_mb > pool.memory_mb:
            return None
        if not res.gpus:
            return []
        cand = sorted(i for i in pool.gpus if self.gpu_matches(i, res.gpu_type))
        return cand[: res.gpus] if len(cand) >= res.gpus else None

    def never_fits(self, res: Resources) -> tuple[str, str] | None:
        """(field, why) when this site can never run an entry with these resources."""
        if res.gpus:
            matching = [i for i in self.gpu_names if self.gpu_matches(i, res.gpu_type)]
            if res.gpu_type and not matching:
                have = ", ".join(self.gpu_types) or "none"
                return (
                    "resources.gpu_type",
                    f"has no GPUs of type {res.gpu_type!r} (types here: {have})",
                )
            if len(matching) < res.gpus:
                return (
                    "resources.gpus",
                    f"needs {res.gpus} GPUs but the site has {len(matching)}",
                )
        if res.cpus > self.total_cpus + _EPS:
            return "resources.cpus", f"needs {res.cpus:g} CPUs but the site has {self.total_cpus:g}"
        if res.memory_mb > self.total_memory_mb:
            return (
                "resources.memory_mb",
                f"needs {res.memory_mb} MiB but the site has {self.total_memory_mb} MiB",
            )
        return walltime_over_limit(res.walltime_s, self.max_walltime_s)

    # ------------------------------------------------------------------ holding

    def take(self, a: A, gpus: list[int]) -> None:
        a.allocated = True
        a.gpus = gpus
        self.free.take(a.resources, gpus)

    def give(self, a: A) -> bool:
        """Give an entry's resources back; False when it held none."""
        if not a.allocated:
            return False
        a.allocated = False
        self.free.give(a.resources, a.gpus)
        return True

    # ------------------------------------------------------------------ the queue

    def schedule(self, holding: Iterable[A]) -> list[tuple[A, list[int]]]:
        """The queued entries to start now, with their GPUs, in FIFO order. Later entries may
        jump ahead (backfill) only if they do not delay the first blocked entry: they end
        before it could start anyway, or fit in what will be left over when it starts.
        `holding`: the entries that hold resources now."""
        if not self.queue:
            return []
        now = time.time()
        free = self.free.copy()
        shadow_t: float | None = None
        shadow_extra: Pool | None = None
        start: list[tuple[A, list[int]]] = []
        held = list(holding)
        in_group = Counter(e.group[0] for e in held if e.allocated and e.group)
        for e in list(self.queue):
            if e.group and in_group[e.group[0]] >= e.group[1]:
                continue  # its sweep's throttle: it waits without holding up the others
            gpus = self.fit(free, e.resources)
            if gpus is None:
                if shadow_t is None:
                    shadow_t, shadow_extra = self._shadow(free, e, held, now)
                continue
            if (
                shadow_t is not None
                and shadow_extra is not None
                and now + e.resources.walltime_s > shadow_t
            ):
                # It would still hold resources when the blocked entry can start: only if
                # they are left over then.
                spare = self.fit(shadow_extra, e.resources)
                if spare is None:
                    continue
                shadow_extra.take(e.resources, spare)
            free.take(e.resources, gpus)
            start.append((e, gpus))
            if e.group:
                in_group[e.group[0]] += 1
        return start

    def _shadow(self, free: Pool, blocked: A, holding: list[A], now: float) -> tuple[float, Pool]:
        """When the blocked entry could start (running entries ending at their walltime) and
        what would be left over then."""
        pool = free.copy()
        for r in sorted((e for e in holding if e.allocated), key=lambda x: x.deadline(now)):
            pool.give(r.resources, r.gpus)
            gpus = self.fit(pool, blocked.resources)
            if gpus is not None:
                pool.take(blocked.resources, gpus)
                return r.deadline(now), pool
        return float("inf"), pool

    def estimate_wait(self, resources: Resources, holding: Iterable[A]) -> float:
        """Seconds until an entry with these resources would start if submitted now: a FIFO
        simulation assuming that running and queued entries use their whole walltime."""
        if self.never_fits(resources) is not None:
            return float("inf")
        now = time.time()
        # (deadline, resources, gpus) of everything holding or going to hold resources
        allocs: list[tuple[float, Resources, list[int]]] = [
            (e.deadline(now), e.resources, e.gpus) for e in holding if e.allocated
        ]
        t = now
        start = now
        for res in [*(q.resources for q in self.queue[:1000]), resources]:
            times = [t, *sorted(d for d, _, _ in allocs if d > t)]
            start = times[-1]
            gpus: list[int] = []
            for c in times:
                pool = self.full()
                for d, r, g in allocs:
                    if d > c:
                        pool.take(r, g)
                fit = self.fit(pool, res)
                if fit is not None:
                    start, gpus = c, fit
                    break
            allocs.append((start + res.walltime_s, res, gpus))
            t = start
        return max(0.0, start - now)

    def queue_reason(self, e: A) -> str:
        """Why a queued entry waits."""
        res = e.resources
        missing = []
        if res.gpus:
            matching = [i for i in self.gpu_names if self.gpu_matches(i, res.gpu_type)]
            free = [i for i in matching if i in self.free.gpus]
            if len(free) < res.gpus:
                busy = len(matching) - len(free)
                kind = f" {res.gpu_type}" if res.gpu_type else ""
                missing.append(
                    f"needs {res.gpus}{kind} GPU{'s' if res.gpus != 1 else ''}, "
                    f"{len(free)} free ({busy} busy)"
                )
        if res.cpus > self.free.cpus + _EPS:
            missing.append(f"needs {res.cpus:g} CPUs, {max(0.0, self.free.cpus):g} free")
        if res.memory_mb > self.free.memory_mb:
            missing.append(
                f"needs {res.memory_mb} MiB memory, {max(0, self.free.memory_mb)} MiB free"
            )
        ahead = self.queue.index(e) if e in self.queue else 0
        if missing:
            return "waiting for resources: " + "; ".join(missing)
        return f"waiting behind {ahead} earlier entr{'y' if ahead == 1 else 'ies'} in the queue"


# ----------------------------------------------------------------------------- the machine


def total_memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024


def cpu_count() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


async def detect_gpus(site: str) -> dict[int, str]:
    """The real GPUs (index -> name), from nvidia-smi; none without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "--query-gpu=index,name",
            "--format=csv,noheader",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except (OSError, TimeoutError) as exc:
        log.warning("nvidia-smi failed: %s; no GPUs on site %s", exc, site)
        return {}
    gpus: dict[int, str] = {}
    for line in out.decode(errors="replace").splitlines():
        index, _, name = line.partition(",")
        if index.strip().isdigit():
            gpus[int(index)] = name.strip()
    return gpus


__all__ = ["Allocation", "Pool", "ResourcePool", "cpu_count", "detect_gpus", "total_memory_mb"]
