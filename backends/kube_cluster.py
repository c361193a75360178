"""What a Kubernetes site looks like to the router: its nodes (allocatable cpu, memory and GPUs,
and which GPU type a node's labels mean) and the cluster's pending pods, refreshed in the
background at most every `refresh_s`; from them capabilities, what can never fit and the wait
estimate. The backend's watches also tell it when the API server is (un)reachable."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from backends.kube_api import KubeApi, KubeApiError, KubeUnreachable
from backends.kube_manifests import KubernetesOptions
from backends.kube_status import dig, is_true, name_of, parse_quantity
from backends.supervisor import walltime_over_limit
from ground.models import Capabilities, Resources

log = logging.getLogger("sciorch.backends.kubernetes")

# What one pod can get when the nodes cannot be listed: generous guesses.
_UNKNOWN_CPUS = 64.0
_UNKNOWN_MEMORY_MB = 256 * 1024


@dataclass(frozen=True)
class Node:
    name: str
    cpus: float
    memory_mb: int
    gpus: int
    gpu_type: str | None
    ready: bool


@dataclass(frozen=True)
class Running:
    """What the wait estimate needs of an entry that holds (or waits for) cluster resources."""

    resources: Resources
    started_at: float | None
    waiting: bool


class ClusterFacts:
    """The cached facts of one cluster, for one site's options."""

    def __init__(self, site: str, options: KubernetesOptions) -> None:
        self.site = site
        self.options = options
        self.nodes: list[Node] | None = None
        self.nodes_note: str | None = None
        self.pending_pods: int | None = None
        self.gpus_held: dict[str, int] | None = None  # node -> GPUs its bound pods request
        self.unreachable: str | None = None
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    def tasks(self) -> list[asyncio.Task[None]]:
        return [self._refreshing] if self._refreshing is not None else []

    def maybe_refresh(self, api: KubeApi | None) -> None:
        """Refresh in the background when the facts are older than refresh_s."""
        if api is None:
            return
        stale = time.monotonic() - self._refreshed > self.options.refresh_s
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh(api))

    async def refresh(self, api: KubeApi) -> None:
        try:
            await self._refresh_once(api)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("site %s: reading the cluster's nodes failed", self.site)

    async def _refresh_once(self, api: KubeApi) -> None:
        self._refreshed = time.monotonic()
        try:
            nodes, _ = await api.list("Node")
            self.nodes = [self._node(n) for n in nodes]
            self.nodes_note = None
        except KubeApiError as exc:
            self.nodes_note = f"cannot list nodes ({exc.status} {exc.reason})"
        except KubeUnreachable as exc:
            self.unreachable = f"API server unreachable: {exc.message}"
            return
        self.unreachable = None
        try:
            # The pods that hold (or wait for) node resources: what `kubectl describe node`
            # counts as allocated is the requests of the non-terminated pods bound to it.
            pods, _ = await api.list(
                "Pod", None, field_selector="status.phase!=Succeeded,status.phase!=Failed"
            )
            self.pending_pods = sum(1 for p in pods if dig(p, "status", "phase") == "Pending")
            self.gpus_held = self._gpus_held(pods)
        except (KubeApiError, KubeUnreachable):
            self.pending_pods = None
            self.gpus_held = None

    def _gpus_held(self, pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
        """GPUs requested by the pods bound to each node (a GPU request, an extended
        resource, defaults to its limit when only the limit is set)."""
        held: dict[str, int] = {}
        key = self.options.gpu_resource
        for pod in pods:
            node = dig(pod, "spec", "nodeName")
            if not node:
                continue
            for c in dig(pod, "spec", "containers") or []:
                res = (c.get("resources") or {}) if isinstance(c, Mapping) else {}
                want = (res.get("requests") or {}).get(key, (res.get("limits") or {}).get(key))
                held[node] = held.get(node, 0) + math.ceil(parse_quantity(want))
        return held

    def _node(self, n: Mapping[str, Any]) -> Node:
        alloc = dig(n, "status", "allocatable") or {}
        labels = dig(n, "metadata", "labels") or {}
        gpu_type = next(
            (
                t
                for t, sel in self.options.gpu_node_selectors.items()
                if sel and all(labels.get(k) == v for k, v in sel.items())
            ),
            None,
        )
        return Node(
            name=name_of(n),
            cpus=parse_quantity(alloc.get("cpu")),
            memory_mb=int(parse_quantity(alloc.get("memory")) / (1024 * 1024)),
            gpus=math.floor(parse_quantity(alloc.get(self.options.gpu_resource))),
            gpu_type=gpu_type,
            ready=is_true(n, "Ready") and not dig(n, "spec", "unschedulable"),
        )

    def _ready(self) -> list[Node]:
        return [n for n in self.nodes or [] if n.ready]

    # ------------------------------------------------------------------ router facts

    def capabilities(self) -> Capabilities:
        o = self.options
        # What one pod can get: the largest Ready node (unknown: generous guesses).
        nodes = self._ready()
        cpus = max((n.cpus for n in nodes), default=_UNKNOWN_CPUS)
        memory = max((n.memory_mb for n in nodes), default=_UNKNOWN_MEMORY_MB)
        gpus = max((n.gpus for n in nodes), default=0)
        types = o.gpu_types if o.gpu_types is not None else sorted(o.gpu_node_selectors)
        return Capabilities(
            cpus=o.cpus if o.cpus is not None else cpus,
            memory_mb=o.memory_mb if o.memory_mb is not None else memory,
            gpus=o.gpus if o.gpus is not None else gpus,
            gpu_types=list(types),
            max_walltime_s=o.max_walltime_s,
            gpus_total=sum(n.gpus for n in nodes) if self.nodes is not None else None,
            gpus_free=(
                sum(max(0, n.gpus - self.gpus_held.get(n.name, 0)) for n in nodes)
                if self.nodes is not None and self.gpus_held is not None
                else None
            ),
        )

    def no_node_ready(self) -> bool:
        return bool(self.nodes) and not self._ready()

    def never_fits(self, res: Resources) -> tuple[str, str] | None:
        """(field, why) when this site can never run an entry with these resources."""
        o = self.options
        if res.gpus and res.gpu_type:
            if res.gpu_type not in o.gpu_node_selectors:
                have = ", ".join(sorted(o.gpu_node_selectors)) or "none configured"
                return (
                    "resources.gpu_type",
                    f"has no node selector for GPU type {res.gpu_type!r} "
                    f"(gpu_node_selectors: {have})",
                )
        nodes = self._ready()
        most_gpus = o.gpus if o.gpus is not None else max((n.gpus for n in nodes), default=0)
        if res.gpus and (nodes or o.gpus is not None) and res.gpus > most_gpus:
            return "resources.gpus", f"needs {res.gpus} GPUs; the largest node has {most_gpus}"
        return walltime_over_limit(res.walltime_s, o.max_walltime_s)

    def estimate_wait(self, resources: Resources, active: Iterable[Running]) -> float:
        """Pending pods times `pending_pod_wait_s`, plus the shortest remaining walltime of the
        site's running entries when the request does not fit beside them."""
        if self.never_fits(resources) is not None:
            return float("inf")
        held = list(active)
        ours = sum(1 for a in held if a.waiting)
        pending = max(ours, self.pending_pods or 0)
        wait = pending * self.options.pending_pod_wait_s
        caps = self.capabilities()
        nodes = self._ready()
        total_cpus = sum(n.cpus for n in nodes) if nodes else caps.cpus
        total_mem = sum(n.memory_mb for n in nodes) if nodes else caps.memory_mb
        total_gpus = sum(n.gpus for n in nodes) if nodes else caps.gpus
        used = [a.resources for a in held]
        fits = (
            resources.cpus <= total_cpus - sum(r.cpus for r in used) + 1e-9
            and resources.memory_mb <= total_mem - sum(r.memory_mb for r in used)
            and resources.gpus <= total_gpus - sum(r.gpus for r in used)
        )
        if not fits:
            now = time.time()
            left = [
                max(0.0, a.started_at + a.resources.walltime_s - now)
                for a in held
                if a.started_at is not None
            ]
            wait += min(left) if left else self.options.pending_pod_wait_s
        return wait


__all__ = ["ClusterFacts", "Node", "Running"]
