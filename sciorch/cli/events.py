"""Events: `events`, `create-event`, `stop-event`, `share`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

import tools
from ground.models import (
    EntryState,
)
from sciorch.cli.app import act, app, build, out
from sciorch.cli.entries import wait_until_done
from sciorch.cli.link import Ops
from sciorch.cli.render import cell, event_line, fmt_time
from tools.models import (
    CreateEventInput,
    EventRef,
    EventView,
    ListEntriesInput,
    ShareEventInput,
)


@app.command()
def events(ctx: typer.Context) -> None:
    """List your active events (allocations)."""
    listing = act(ctx, lambda ops: ops.call(tools.list_events))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("EVENT", "NAME", "STATE", "OWNER", "SITE", "CREATED", "EXPIRES"):
        table.add_column(col, no_wrap=True)
    table.add_column("SHARED WITH", overflow="fold")
    for ev in listing.events:
        table.add_row(
            cell(ev.id),
            cell(ev.name + (" (default)" if ev.default else "")),
            cell(ev.state.value),
            cell(ev.owner),
            cell(ev.site or "any"),
            cell(fmt_time(ev.created_at)),
            cell(fmt_time(ev.expires_at) or "never"),
            cell(", ".join(f"{p} ({r})" for p, r in sorted(ev.shares.items()))),
        )
    out.print(table)


@app.command("create-event")
def create_event(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="a label")] = None,
    site: Annotated[str | None, typer.Option(help="pin its entries to a site")] = None,
    ttl: Annotated[int | None, typer.Option(help="lifetime in seconds")] = None,
) -> None:
    """Create an event (an allocation); prints its id."""
    req = build(CreateEventInput, name=name, site=site, ttl_seconds=ttl)

    async def go(ops: Ops) -> EventView:
        return await ops.call(tools.create_event, req)

    out.print(act(ctx, go).id)


@app.command("stop-event")
def stop_event(
    ctx: typer.Context, event_id: Annotated[str, typer.Argument(help="event id")]
) -> None:
    """Stop an event and every entry in it (idempotent)."""
    ref = build(EventRef, event_id=event_id)

    async def go(ops: Ops) -> EventView:
        return await stop_event_and_wait(ops, ref)

    out.print(cell(event_line(act(ctx, go))))


async def stop_event_and_wait(ops: Ops, ref: EventRef, timeout_s: float = 30) -> EventView:
    """tools.stop_event, then wait until its entries have ended: this process is about to exit,
    and an entry whose stop is still under way would be found by the next one, without the
    knowledge that it was stopped on purpose."""
    active = [s for s in EntryState if not s.terminal]
    req = build(ListEntriesInput, event_id=ref.event_id, states=active, limit=1000)
    page = await ops.call(tools.list_entries, req)
    view = await ops.call(tools.stop_event, ref)
    await asyncio.gather(*(wait_until_done(ops, e.id, timeout_s, "finished") for e in page.entries))
    return view


@app.command()
def share(
    ctx: typer.Context,
    event_id: Annotated[str, typer.Argument(help="event id")],
    with_principal: Annotated[str, typer.Argument(metavar="PRINCIPAL", help="who to share with")],
    role: Annotated[str, typer.Option(help="viewer, operator, or none to revoke")] = "viewer",
) -> None:
    """Share an event with another principal (or revoke with --role none)."""
    req = build(ShareEventInput, event_id=event_id, principal=with_principal, role=role)

    async def go(ops: Ops) -> EventView:
        return await ops.call(tools.share_event, req)

    out.print(cell(event_line(act(ctx, go))))
