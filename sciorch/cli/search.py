"""`sciorch search`: the results catalogue (tools.search_results) as a table, JSON, or a CSV or
Parquet file of every matching row (page after page, through the same cursor the tool gives)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import tools
from ground.models import EntryState, Principal
from orchestrator.engine import Engine
from sciorch.cli.app import app, build, fail, out, run
from sciorch.cli.render import cell, fmt_json, fmt_time, result_summary
from steering.export import PARQUET_EXTRA, parquet_available, to_csv, write_parquet
from tools.models import ResultPage, SearchResultsInput


@app.command()
def search(
    ctx: typer.Context,
    query: Annotated[
        str, typer.Argument(help="e.g. 'surface = \"branin\" and value < 0.5'; empty: all")
    ] = "",
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    event: Annotated[str | None, typer.Option("--event", help="only this event")] = None,
    campaign: Annotated[str | None, typer.Option("--campaign", help="only this campaign")] = None,
    state: Annotated[
        list[EntryState] | None,
        typer.Option("--state", help="final state (repeat); default succeeded"),
    ] = None,
    since: Annotated[datetime | None, typer.Option(help="finished at or after")] = None,
    until: Annotated[datetime | None, typer.Option(help="finished before")] = None,
    sort: Annotated[str, typer.Option(help="finished_at, started_at, created_at or a field")] = (
        "finished_at"
    ),
    asc: Annotated[bool, typer.Option("--asc", help="ascending (default: descending)")] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="rows at most (default 50; all with --csv/--parquet)")
    ] = None,
    csv_file: Annotated[Path | None, typer.Option("--csv", help="write the rows as CSV")] = None,
    parquet_file: Annotated[
        Path | None, typer.Option("--parquet", help="write the rows as Parquet (needs pyarrow)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
) -> None:
    """Search finished entries by service, event, campaign, time and parameter/result fields."""
    if parquet_file is not None and not parquet_available():
        fail(f"parquet: {PARQUET_EXTRA}; or use --csv", "parquet")
    export = csv_file is not None or parquet_file is not None
    want = limit if limit is not None else (None if export else 50)
    args = dict(
        query=query,
        service=service,
        event_id=event,
        campaign_id=campaign,
        states=state or None,
        finished_after=since,
        finished_before=until,
        sort=sort,
        order="asc" if asc else "desc",
    )
    build(SearchResultsInput, **args)  # a bad option is refused before the engine opens

    async def go(engine: Engine, who: Principal) -> ResultPage:
        page = ResultPage(rows=[])
        cursor = None
        while want is None or len(page.rows) < want:
            size = 1000 if want is None else min(1000, want - len(page.rows))
            req = build(SearchResultsInput, **args, limit=size, cursor=cursor)
            got = await tools.search_results(engine, who, req)
            page.rows += got.rows
            cursor = page.next_cursor = got.next_cursor
            if cursor is None:
                break
        return page

    page = run(ctx, go)
    if export:
        cols, data = page.table()
        if csv_file is not None:
            csv_file.write_text(to_csv(cols, data))
            out.print(f"{len(data)} rows -> {csv_file}")
        if parquet_file is not None:
            write_parquet(parquet_file, cols, data)
            out.print(f"{len(data)} rows -> {parquet_file}")
        return
    if as_json:
        out.print_json(page.model_dump_json())
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("ENTRY", "SERVICE", "FINISHED", "CAMPAIGN", "PARAMETERS", "RESULT"):
        table.add_column(name, overflow="fold")
    for r in page.rows:
        where = f"{r.campaign_id}#{r.evaluation}" if r.campaign_id else ""
        table.add_row(
            cell(r.entry_id),
            cell(f"{r.service}@{r.version}"),
            cell(fmt_time(r.finished_at)),
            cell(where),
            cell(fmt_json(r.parameters)),
            cell(result_summary(r.result) or ""),
        )
    out.print(table)
    if page.next_cursor:
        out.print(f"more rows: --limit {len(page.rows) * 2} to see them", style="dim")
