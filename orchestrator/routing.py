"""Routing: which site runs a request. Capabilities first (a GPU request never lands on a site
without GPUs), then the least estimated wait; an explicitly named site wins or fails clearly."""

from __future__ import annotations

from collections.abc import Mapping

from ground.contract import Backend
from ground.errors import InvalidInput, NoSiteAvailable
from ground.models import (
    Capabilities,
    Resources,
    ServiceKind,
    SiteStatus,
    format_duration,
)


def unmet(cap: Capabilities, res: Resources, kind: ServiceKind) -> list[str]:
    """Why a site with these capabilities can never run this request (empty: it can)."""
    why = []
    if kind not in cap.kinds:
        why.append(f"runs no {kind}s")
    if res.gpus > cap.gpus:
        why.append(f"needs {res.gpus} GPU(s), site has {cap.gpus}")
    if res.gpus and res.gpu_type and cap.gpu_types and res.gpu_type not in cap.gpu_types:
        why.append(f"needs GPU type {res.gpu_type!r}, site has {', '.join(cap.gpu_types)}")
    if res.gpus and res.gpu_type and not cap.gpu_types:
        why.append(f"needs GPU type {res.gpu_type!r}, site has no typed GPUs")
    if res.cpus > cap.cpus:
        why.append(f"needs {res.cpus:g} CPUs, site has {cap.cpus:g}")
    if res.memory_mb > cap.memory_mb:
        why.append(f"needs {res.memory_mb} MiB memory, site has {cap.memory_mb} MiB")
    if cap.max_walltime_s is not None and res.walltime_s > cap.max_walltime_s:
        why.append(
            f"needs walltime {format_duration(res.walltime_s)}, site allows "
            f"{format_duration(cap.max_walltime_s)}"
        )
    return why


async def choose_site(
    backends: Mapping[str, Backend],
    maintenance: Mapping[str, bool],
    resources: Resources,
    kind: ServiceKind,
    requested: str | None = None,
) -> str:
    if requested is not None and requested not in backends:
        raise InvalidInput(
            f"unknown site {requested!r}; sites: {', '.join(backends)}",
            field="site",
            known=list(backends),
        )
    candidates = [requested] if requested else list(backends)
    reasons: dict[str, str] = {}
    best: tuple[float, int, str] | None = None
    for order, name in enumerate(candidates):
        backend = backends[name]
        if maintenance.get(name):
            reasons[name] = "in maintenance"
            continue
        status, why = await backend.status()
        if status in (SiteStatus.DOWN, SiteStatus.MAINTENANCE):
            reasons[name] = f"{status.value}" + (f" ({why})" if why else "")
            continue
        problems = unmet(await backend.capabilities(), resources, kind)
        if problems:
            reasons[name] = "; ".join(problems)
            continue
        wait = await backend.estimate_wait(resources)
        if status is SiteStatus.DEGRADED:
            wait += 3600  # usable, but only when nothing healthy can take it
        key = (wait, order, name)
        if best is None or key < best:
            best = key
    if best is None:
        detail = "; ".join(f"{site}: {why}" for site, why in reasons.items())
        raise NoSiteAvailable(
            f"site {requested!r} cannot run this request: {detail}"
            if requested
            else f"no site can run this request: {detail}",
            field="site" if requested else "resources",
            reasons=reasons,
        )
    return best[2]
