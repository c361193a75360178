"""Entries: `submit`, `launch`, `status`, `logs`, `results`, `cancel`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.text import Text

import tools
from ground.models import (
    EntryState,
    Message,
    Principal,
)
from orchestrator.engine import Engine
from sciorch.cli.app import act, app, build, err, out, parse_params, resource_request
from sciorch.cli.link import Ops
from sciorch.cli.render import cell, entries_table, entry_detail, fmt_json, fmt_state
from tools.models import (
    EntryPage,
    EntryRef,
    EntrySummary,
    EntryView,
    LaunchServiceInput,
    ListEntriesInput,
    ReadLogsInput,
    ReadResultsInput,
    SubmitJobInput,
    WaitEntryInput,
    WaitResult,
)

ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "-p", "--param", help="parameter key=value (value parsed as JSON if it parses); repeat"
    ),
]
ParamsJsonOpt = Annotated[
    str | None, typer.Option("--params-json", help="parameters as one JSON object")
]
EventOpt = Annotated[
    str | None, typer.Option("--event", help="event id; default: your default event")
]
SiteOpt = Annotated[str | None, typer.Option("--site", help="site; default: the router picks")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", help="GPUs (overrides the template)")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU cores")]
MemoryOpt = Annotated[str | None, typer.Option("--memory", help="memory, e.g. 4Gi")]
WalltimeOpt = Annotated[str | None, typer.Option("--walltime", help="time limit, e.g. 01:00:00")]
UrgentOpt = Annotated[
    bool, typer.Option("--urgent", help="time-sensitive work (allowed by policy only)")
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", help="with --wait: give up after this many seconds")
]


async def wait_until_done(
    ops: Ops,
    entry_id: str,
    timeout_s: float | None,
    until: str = "auto",
    on_message: Callable[[Message], Awaitable[None]] | None = None,
) -> WaitResult:
    """tools.wait_entry in slices (a day here, minutes through a server) until the entry gets
    there or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        most = ops.wait_slice_s
        left = most if deadline is None else max(0.001, min(most, deadline - loop.time()))
        req = build(WaitEntryInput, entry_id=entry_id, timeout_seconds=left, until=until)
        res = await ops.call(tools.wait_entry, req, on_message)
        if not res.timed_out or (deadline is not None and loop.time() >= deadline):
            return res


async def print_record(msg: Message) -> None:
    if msg.kind == "stream" and msg.record is not None:
        err.print(cell(f"  record {msg.record_index}: {fmt_json(msg.record)}", "dim"))
    elif msg.kind == "transition" and msg.state is not None and not msg.state.terminal:
        err.print(cell(f"  {msg.state.value}" + (f": {msg.reason}" if msg.reason else ""), "dim"))


def report_wait(res: WaitResult, want: set[EntryState]) -> None:
    view = res.entry
    if res.timed_out:
        err.print(f"{view.id} is still {view.state.value} (timed out waiting)", style="yellow")
        raise typer.Exit(1)
    line = Text(f"{view.id} ")
    line.append_text(fmt_state(view.state))
    if view.reason:
        line.append(f": {view.reason}")
    err.print(line)
    if view.result is not None:
        out.print_json(json.dumps(view.result, default=str))
    if view.access_url:
        out.print(view.access_url)
    if view.state not in want:
        raise typer.Exit(1)


@app.command()
def submit(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="job service name, optionally name@version")],
    param: ParamOpt = None,
    params_json: ParamsJsonOpt = None,
    event: EventOpt = None,
    site: SiteOpt = None,
    gpus: GpusOpt = None,
    cpus: CpusOpt = None,
    memory: MemoryOpt = None,
    walltime: WalltimeOpt = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="the same key returns the same entry")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the end; exit 1 unless it succeeded")
    ] = False,
    timeout: TimeoutOpt = None,
    urgent: UrgentOpt = False,
) -> None:
    """Submit a job; prints the entry id (and with --wait its result)."""
    req = _request(
        SubmitJobInput, service, param, params_json, event, site, gpus, cpus, memory, walltime,
        idempotency_key=idempotency_key, priority="urgent" if urgent else "normal",
    )
    _start(ctx, tools.submit_job, req, wait, timeout, "auto", {EntryState.SUCCEEDED})


@app.command()
def launch(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="service name, optionally name@version")],
    param: ParamOpt = None,
    params_json: ParamsJsonOpt = None,
    event: EventOpt = None,
    site: SiteOpt = None,
    gpus: GpusOpt = None,
    cpus: CpusOpt = None,
    memory: MemoryOpt = None,
    walltime: WalltimeOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until it is ready; exit 1 if it ends instead")
    ] = False,
    timeout: TimeoutOpt = None,
    urgent: UrgentOpt = False,
) -> None:
    """Launch a long-running service; prints the entry id (and with --wait its URL)."""
    req = _request(
        LaunchServiceInput, service, param, params_json, event, site, gpus, cpus, memory, walltime,
        priority="urgent" if urgent else "normal",
    )
    if _start(ctx, tools.launch_service, req, wait, timeout, "ready", _UP) is False:
        err.print("the URL answers while `sciorch serve` runs on this home", style="dim")


_UP = {EntryState.READY, EntryState.RUNNING}
In = TypeVar("In", SubmitJobInput, LaunchServiceInput)


def _request(
    model: type[In],
    service: str,
    param: list[str] | None,
    params_json: str | None,
    event: str | None,
    site: str | None,
    gpus: int | None,
    cpus: float | None,
    memory: str | None,
    walltime: str | None,
    **extra: Any,
) -> In:
    req: In = build(
        model,
        service=service,
        parameters=parse_params(param or [], params_json),
        event_id=event,
        site=site,
        resources=resource_request(gpus, cpus, memory, walltime),
        **extra,
    )
    return req


def _start(
    ctx: typer.Context,
    start: Callable[[Engine, Principal, In], Awaitable[EntryView]],
    req: In,
    wait: bool,
    timeout: float | None,
    until: str,
    want: set[EntryState],
) -> bool | None:
    """Start the entry and print its id; with `wait`, wait until it gets `until` and report
    (exit 1 unless it ends in `want`). None unless it waited and got there; then whether a
    server was running it (so that its URL answers now)."""

    async def go(ops: Ops) -> tuple[WaitResult | None, bool]:
        view = await ops.call(start, req)
        out.print(view.id)
        if not wait:
            return None, ops.server_running
        res = await wait_until_done(ops, view.id, timeout, until, print_record)
        return res, ops.server_running

    res, served = act(ctx, go)
    if res is None:
        return None
    report_wait(res, want)
    return served


@app.command()
def status(
    ctx: typer.Context,
    entry_id: Annotated[str | None, typer.Argument(help="entry id; none: recent entries")] = None,
    event: Annotated[str | None, typer.Option("--event", help="only this event")] = None,
    limit: Annotated[int, typer.Option(help="how many recent entries", min=1)] = 20,
) -> None:
    """One entry in detail (with its transitions), or a table of your recent entries."""
    if entry_id is not None:
        ref = build(EntryRef, entry_id=entry_id)

        async def one(ops: Ops) -> EntryView:
            return await ops.call(tools.get_entry, ref)

        entry_detail(act(ctx, one))
        return

    async def recent(ops: Ops) -> list[EntrySummary]:
        # Pages come oldest first; keep the newest `limit`.
        kept: deque[EntrySummary] = deque(maxlen=limit)
        cursor = None
        while True:
            req = build(ListEntriesInput, event_id=event, limit=1000, cursor=cursor)
            page: EntryPage = await ops.call(tools.list_entries, req)
            kept.extend(page.entries)
            if not page.next_cursor:
                return list(kept)
            cursor = page.next_cursor

    entries = act(ctx, recent)
    if not entries:
        err.print("no entries yet; try `sciorch submit sim-instrument -p x1=1 --wait`")
        return
    out.print(entries_table(entries))


@app.command()
def logs(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="entry id")],
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="print new output until the entry finishes")
    ] = False,
) -> None:
    """Print an entry's log (stdout and stderr together)."""
    ref = build(EntryRef, entry_id=entry_id)

    def write(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    async def go(ops: Ops) -> None:
        await ops.call(tools.get_entry, ref)  # not found / not allowed before subscribing
        async with ops.log_changes(entry_id) as changed:
            offset = 0
            while True:
                chunk = await ops.call(
                    tools.read_logs,
                    build(ReadLogsInput, entry_id=entry_id, offset=offset, limit=1_048_576),
                )
                write(chunk.data)
                offset = chunk.next_offset
                if chunk.next_offset < chunk.size:
                    continue  # more already there
                if not follow or chunk.complete:
                    return
                await changed()

    act(ctx, go)


@app.command()
def results(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="entry id")],
    since_record: Annotated[int, typer.Option(help="skip this many stream records")] = 0,
) -> None:
    """Print an entry's result, stream records and artifacts as JSON."""
    req = build(ReadResultsInput, entry_id=entry_id, since_record=since_record)

    async def go(ops: Ops) -> str:
        return (await ops.call(tools.read_results, req)).model_dump_json(indent=2)

    out.print_json(act(ctx, go))


@app.command()
def cancel(ctx: typer.Context, entry_id: Annotated[str, typer.Argument(help="entry id")]) -> None:
    """Cancel an entry (idempotent)."""
    ref = build(EntryRef, entry_id=entry_id)

    async def go(ops: Ops) -> EntryView:
        return await ops.call(tools.cancel_entry, ref)

    view = act(ctx, go)
    line = Text(f"{view.id} ")
    line.append_text(fmt_state(view.state))
    out.print(line)
