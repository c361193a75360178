"""Sweeps: `sweep` (one job template over a grid or a list of parameter sets), `sweep-status`,
`sweep-cancel`; and `extend` (more walltime for a running entry)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ground.models import EntryState, Principal
from orchestrator.engine import Engine
from sciorch.cli.app import app, build, err, fail, out, parse_params, resource_request, run
from sciorch.cli.entries import (
    CpusOpt,
    EventOpt,
    GpusOpt,
    MemoryOpt,
    ParamOpt,
    ParamsJsonOpt,
    SiteOpt,
    TimeoutOpt,
    UrgentOpt,
    WalltimeOpt,
)
from sciorch.cli.render import fmt_state
from tools import sweeps as sw
from tools.models import EntryView


def _grid(pairs: list[str]) -> dict[str, list[Any]]:
    """-g key=v1,v2,v3 (each value JSON when it parses)."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key:
            fail(f"--grid {pair!r}: expected key=value1,value2,...", "grid")
        grid[key] = [_value(v) for v in values.split(",")]
    return grid


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _show(view: sw.SweepView) -> None:
    table = Table("index", "entry", "state", "job", "result")
    for e in view.elements:
        result = json.dumps(e.result) if e.result is not None else ""
        table.add_row(str(e.index), e.entry_id, fmt_state(e.state), e.job_id or "", result)
    out.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(view.counts.items()))
    err.print(f"{view.id}: {view.size} elements on {view.site} ({counts})")


@app.command()
def sweep(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="job service name, optionally name@version")],
    grid: Annotated[
        list[str] | None,
        typer.Option("-g", "--grid", help="key=v1,v2,... one grid axis; repeat for more"),
    ] = None,
    sets_json: Annotated[
        str | None, typer.Option("--sets-json", help="a JSON list of parameter objects")
    ] = None,
    param: ParamOpt = None,
    params_json: ParamsJsonOpt = None,
    throttle: Annotated[int | None, typer.Option(help="at most this many at once", min=1)] = None,
    event: EventOpt = None,
    site: SiteOpt = None,
    gpus: GpusOpt = None,
    cpus: CpusOpt = None,
    memory: MemoryOpt = None,
    walltime: WalltimeOpt = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="the same key returns the same sweep")
    ] = None,
    urgent: UrgentOpt = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for every element; exit 1 unless all succeeded")
    ] = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Run a job over a grid (-g) or a list (--sets-json) of parameter sets; prints the sweep id
    (and with --wait each element's state and result)."""
    sets = None
    if sets_json is not None:
        try:
            sets = json.loads(sets_json)
        except json.JSONDecodeError as exc:
            fail(f"--sets-json is not valid JSON: {exc}", "parameter_sets")
    req = build(
        sw.SubmitSweepInput,
        service=service,
        parameter_sets=sets,
        grid=_grid(grid) if grid else None,
        parameters=parse_params(param or [], params_json),
        throttle=throttle,
        event_id=event,
        site=site,
        resources=resource_request(gpus, cpus, memory, walltime),
        idempotency_key=idempotency_key,
        priority="urgent" if urgent else "normal",
    )

    async def go(engine: Engine, who: Principal) -> sw.SweepView:
        view = await sw.submit_sweep(engine, who, req)
        out.print(view.id)
        if not wait:
            return view
        left = build(sw.WaitSweepInput, sweep_id=view.id, timeout_seconds=timeout or 86400)
        res = await sw.wait_sweep(engine, who, left)
        return res.sweep

    view = run(ctx, go)
    if wait:
        _show(view)
        if view.counts.get(EntryState.SUCCEEDED.value, 0) != view.size:
            raise typer.Exit(1)


@app.command("sweep-status")
def sweep_status(
    ctx: typer.Context, sweep_id: Annotated[str, typer.Argument(help="sweep id")]
) -> None:
    """A sweep's elements: state, Slurm job id, result."""
    ref = build(sw.SweepRef, sweep_id=sweep_id)

    async def go(engine: Engine, who: Principal) -> sw.SweepView:
        return await sw.get_sweep(engine, who, ref)

    _show(run(ctx, go))


@app.command("sweep-cancel")
def sweep_cancel(
    ctx: typer.Context, sweep_id: Annotated[str, typer.Argument(help="sweep id")]
) -> None:
    """Cancel every element of a sweep still queued or running."""
    ref = build(sw.SweepRef, sweep_id=sweep_id)

    async def go(engine: Engine, who: Principal) -> sw.SweepView:
        return await sw.cancel_sweep(engine, who, ref)

    _show(run(ctx, go))


@app.command()
def extend(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="entry id")],
    walltime: Annotated[str, typer.Argument(help="the new whole walltime, e.g. 02:00:00")],
) -> None:
    """Give a running entry more walltime where its site allows it (Slurm)."""
    res = resource_request(None, None, None, walltime)
    seconds = int(res.walltime_s or 0) if res is not None else 0
    req = build(sw.ExtendEntryInput, entry_id=entry_id, walltime_seconds=seconds)

    async def go(engine: Engine, who: Principal) -> EntryView:
        return await sw.extend_entry(engine, who, req)

    view = run(ctx, go)
    err.print(f"{view.id}: walltime now {view.resources.walltime_s} s")
