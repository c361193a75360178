"""`sciorch services` and `sciorch sites`."""

from __future__ import annotations

import typer
from rich.table import Table

import tools
from ground.models import (
    format_duration,
)
from sciorch.cli.app import act, app, out
from sciorch.cli.render import cell, fmt_resources


@app.command()
def services(ctx: typer.Context) -> None:
    """List the services in the catalogue."""
    listing = act(ctx, lambda ops: ops.call(tools.list_services))
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("SERVICE", no_wrap=True)
    table.add_column("VERSION", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("RESOURCES", no_wrap=True)
    table.add_column("PARAMETERS", overflow="fold")
    table.add_column("DESCRIPTION", overflow="fold", ratio=1)
    for svc in listing.services:
        params = ", ".join((svc.parameters.get("properties") or {}).keys())
        desc = svc.description.split(". ")[0].rstrip(".")
        version = svc.version + (f" (+{len(svc.versions) - 1})" if len(svc.versions) > 1 else "")
        table.add_row(
            cell(svc.name),
            cell(version),
            cell(svc.kind),
            cell(fmt_resources(svc.resources)),
            cell(params),
            cell(desc),
        )
    out.print(table)


@app.command()
def sites(ctx: typer.Context) -> None:
    """List the configured sites with their status and capabilities."""
    listing = act(ctx, lambda ops: ops.call(tools.list_sites))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("SITE", "KIND", "STATUS", "CPUS", "MEMORY", "GPUS", "MAX WALLTIME", "WAIT"):
        table.add_column(col, no_wrap=True)
    table.add_column("ACTIVE", justify="right")
    table.add_column("NOTE", overflow="fold")
    for site in listing.sites:
        caps = site.capabilities
        gpus = str(caps.gpus) + (f" ({', '.join(caps.gpu_types)})" if caps.gpu_types else "")
        table.add_row(
            cell(site.name),
            cell(site.kind),
            cell(site.status.value, "green" if site.status.value == "up" else "yellow"),
            cell(f"{caps.cpus:g}"),
            cell(f"{caps.memory_mb} MiB"),
            cell(gpus),
            cell(format_duration(caps.max_walltime_s) if caps.max_walltime_s else "-"),
            cell(f"{site.estimated_wait_s:.0f}s" if site.estimated_wait_s is not None else "?"),
            cell(site.active_entries),
            cell(site.status_reason),
        )
    out.print(table)
