"""`sciorch campaign ...`: people in the loop from a terminal. Each command is one MCP tool call
(pause_campaign, resume_campaign, update_campaign, add_points, reject_point, annotate_campaign,
export_campaign), to a running server with --url (the way to steer a campaign a server runs),
else to the server running on this home (sciorch.cli.link), else to this home's engine in
memory; so every action is authorised and recorded with who did it, exactly as when an agent
calls the tool."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sciorch.cli.app import app, fail, out
from sciorch.cli.calls import session

campaign_app = typer.Typer(
    help="Steer a campaign: pause, resume, budget, add or reject points, notes, export.",
    no_args_is_help=True,
)

Url = Annotated[
    str | None, typer.Option(help="a sciorch server's MCP endpoint, e.g. http://host:8765/mcp")
]
Token = Annotated[str | None, typer.Option(envvar="SCIORCH_TOKEN", help="bearer token for --url")]
Note = Annotated[str | None, typer.Option(help="why (kept with the action)")]


def call(ctx: typer.Context, url: str | None, token: str | None, tool: str, args: Any) -> Any:
    """One tool call; its error ends the command with the tool's own 'code: message' line."""
    return session(ctx, url, token, lambda call: call(tool, args))


def _summary(view: dict[str, Any]) -> None:
    p = view.get("progress") or {}
    flags = " (paused)" if view.get("paused") else ""
    out.print(
        f"{view.get('id')}: {view.get('state')}{flags}, {p.get('succeeded')} of "
        f"{p.get('budget')} measured, {p.get('queued', 0)} queued, {p.get('rejected', 0)} rejected"
    )


@campaign_app.command()
def pause(
    ctx: typer.Context, campaign_id: str, note: Note = None, url: Url = None, token: Token = None
) -> None:
    """Choose no new points until resumed (those in flight finish)."""
    _summary(call(ctx, url, token, "pause_campaign", {"campaign_id": campaign_id, "note": note}))


@campaign_app.command()
def resume(
    ctx: typer.Context, campaign_id: str, note: Note = None, url: Url = None, token: Token = None
) -> None:
    """Resume a paused campaign."""
    _summary(call(ctx, url, token, "resume_campaign", {"campaign_id": campaign_id, "note": note}))


@campaign_app.command()
def budget(
    ctx: typer.Context,
    campaign_id: str,
    evaluations: Annotated[int | None, typer.Option(help="new evaluation budget")] = None,
    wall_time: Annotated[str | None, typer.Option(help="new wall-time budget, e.g. 2h")] = None,
    target: Annotated[float | None, typer.Option(help="stop once the best reaches this")] = None,
    note: Note = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Change the budget or the target stop rule."""
    args: dict[str, Any] = {"campaign_id": campaign_id, "note": note}
    patch = {k: v for k, v in (("evaluations", evaluations), ("wall_time_s", wall_time)) if v}
    if patch:
        args["budget"] = patch
    if target is not None:
        args["stop"] = {"target": target}
    _summary(call(ctx, url, token, "update_campaign", args))


@campaign_app.command("add-point")
def add_point(
    ctx: typer.Context,
    campaign_id: str,
    point: Annotated[list[str], typer.Argument(help="name=value for every space parameter")],
    note: Note = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Queue a point to be measured next, e.g. `add-point cmp-.. x1=1.5 x2=3`."""
    values: dict[str, Any] = {}
    for item in point:
        name, sep, raw = item.partition("=")
        if not sep:
            fail(f"point: {item!r} is not name=value", "point")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw  # a categorical choice
    args = {"campaign_id": campaign_id, "points": [values], "note": note}
    _summary(call(ctx, url, token, "add_points", args))


@campaign_app.command()
def reject(
    ctx: typer.Context,
    campaign_id: str,
    point_id: str,
    note: Note = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Reject a suggested point: not measured, not proposed again."""
    args = {"campaign_id": campaign_id, "point_id": point_id, "note": note}
    _summary(call(ctx, url, token, "reject_point", args))


@campaign_app.command()
def annotate(
    ctx: typer.Context, campaign_id: str, text: str, url: Url = None, token: Token = None
) -> None:
    """Add a note to the campaign's record."""
    _summary(call(ctx, url, token, "annotate_campaign", {"campaign_id": campaign_id, "text": text}))


@campaign_app.command()
def export(
    ctx: typer.Context,
    campaign_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help=".csv or .parquet")],
    url: Url = None,
    token: Token = None,
) -> None:
    """Write the campaign's data (one row per evaluation) as CSV, or Parquet if pyarrow is
    installed."""
    from steering.export import PARQUET_EXTRA, parquet_available

    suffix = output.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        fail("output: must end in .csv or .parquet", "output")
    if suffix == ".parquet" and not parquet_available():
        fail(f"output: {PARQUET_EXTRA}; or write .csv", "output")
    res = call(
        ctx, url, token, "export_campaign", {"campaign_id": campaign_id, "max_rows": 100_000}
    )
    if suffix == ".csv":
        output.write_text(res["text"])
    else:
        from steering.export import typed, write_parquet

        data = list(csv.DictReader(io.StringIO(res["text"])))
        write_parquet(output, res["columns"], typed(res["columns"], data))
    cut = " (truncated)" if res["truncated"] else ""
    out.print(f"{res['rows']} rows -> {output}{cut}")


app.add_typer(campaign_app, name="campaign")
