"""Rendering: tables and detail views of entries, events and resources (rich, never markup)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from ground.models import (
    EntryState,
    Resources,
    format_duration,
)
from sciorch.cli.app import out
from tools.models import (
    EntrySummary,
    EntryView,
    EventView,
)


def cell(value: Any, style: str = "") -> Text:
    """A table cell that is never parsed as rich markup."""
    return Text("" if value is None else str(value), style=style)


def fmt_time(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def fmt_resources(res: Resources) -> str:
    parts = [f"{res.cpus:g} cpu", f"{res.memory_mb} MiB"]
    if res.gpus:
        parts.append(f"{res.gpus} gpu" + (f" ({res.gpu_type})" if res.gpu_type else ""))
    parts.append(format_duration(res.walltime_s))
    return ", ".join(parts)


STATE_STYLE = {
    EntryState.PENDING: "yellow",
    EntryState.PROVISIONING: "yellow",
    EntryState.RUNNING: "cyan",
    EntryState.READY: "green",
    EntryState.SUCCEEDED: "green",
    EntryState.FAILED: "red",
    EntryState.CANCELLED: "magenta",
    EntryState.EXPIRED: "magenta",
}


def fmt_state(state: EntryState) -> Text:
    return cell(state.value, STATE_STYLE.get(state, ""))


def fmt_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def entry_duration(view: EntryView | EntrySummary) -> str:
    if view.started_at is None:
        return ""
    end = view.finished_at or datetime.now(view.started_at.tzinfo)
    return f"{(end - view.started_at).total_seconds():.1f}s"


def result_summary(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    if "value" in result and isinstance(result["value"], int | float):
        return f"value={result['value']:.6g}"
    text = fmt_json(result)
    return text if len(text) <= 60 else text[:57] + "..."


def entries_table(entries: list[EntrySummary]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("ENTRY", no_wrap=True)
    table.add_column("SERVICE", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("SITE", no_wrap=True)
    table.add_column("EVENT", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("TIME", justify="right", no_wrap=True)
    table.add_column("RESULT / REASON", overflow="fold")
    for e in entries:
        extra = result_summary(e.result) or (e.reason or "").strip().split("\n")[0]
        table.add_row(
            cell(e.id),
            cell(e.service),
            fmt_state(e.state),
            cell(e.site),
            cell(e.event_id),
            cell(fmt_time(e.created_at)),
            cell(entry_duration(e)),
            cell(extra),
        )
    return table


def entry_detail(view: EntryView) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Text]] = [
        ("entry", cell(view.id)),
        ("service", cell(f"{view.service} {view.version} ({view.kind})")),
        ("state", fmt_state(view.state)),
        ("event", cell(view.event_id)),
        ("site", cell(view.site)),
        ("submitted by", cell(view.submitted_by)),
        ("parameters", cell(fmt_json(view.parameters))),
        ("resources", cell(fmt_resources(view.resources))),
        ("created", cell(fmt_time(view.created_at))),
    ]
    if view.started_at:
        rows.append(("started", cell(fmt_time(view.started_at))))
    if view.finished_at:
        rows.append(("finished", cell(f"{fmt_time(view.finished_at)} ({entry_duration(view)})")))
    if view.reason:
        rows.append(("reason", cell(view.reason)))
    if view.exit_code is not None:
        rows.append(("exit code", cell(view.exit_code)))
    if view.restarts:
        rows.append(("restarts", cell(view.restarts)))
    if view.url:
        rows.append(("url", cell(view.url)))
    if view.access_url:
        rows.append(("access url", cell(view.access_url)))
    if view.result is not None:
        rows.append(("result", cell(fmt_json(view.result))))
    if view.backend_handle:
        rows.append(("handle", cell(fmt_json(view.backend_handle))))
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)
    if view.transitions:
        table = Table(
            title="transitions", title_justify="left", box=None, pad_edge=False, header_style="bold"
        )
        table.add_column("AT", no_wrap=True)
        table.add_column("STATE", no_wrap=True)
        table.add_column("REASON", overflow="fold")
        for tr in view.transitions:
            table.add_row(cell(fmt_time(tr.at)), fmt_state(tr.state), cell(tr.reason))
        out.print()
        out.print(table)


def event_line(view: EventView) -> str:
    shares = ", ".join(f"{p}={r}" for p, r in sorted(view.shares.items())) or "not shared"
    return f"{view.id} ({view.name}) {view.state.value}; owner {view.owner}; {shares}"
