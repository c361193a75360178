"""The `sciorch` command: human mirrors of the typed tools, plus `serve` and `demo`.

Each command parses its arguments, builds the tool's pydantic input, opens the engine in this
process (it holds the lock on $SCIORCH_HOME while the command runs and re-adopts what earlier
commands started), calls the tool and renders the answer. No business logic lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import parse_qs, urlsplit

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import tools
from orchestrator.config import Settings, default_home, load_settings
from orchestrator.engine import Engine
from orchestrator.errors import SciorchError
from orchestrator.models import (
    EntryState,
    Message,
    Principal,
    ResourceRequest,
    Resources,
    format_duration,
    parse_duration_s,
)
from tools.models import (
    CreateEventInput,
    EntryPage,
    EntryRef,
    EntryView,
    EventRef,
    EventView,
    LaunchServiceInput,
    ListEntriesInput,
    ReadLogsInput,
    ReadResultsInput,
    ShareEventInput,
    SubmitJobInput,
    WaitEntryInput,
    WaitResult,
)

T = TypeVar("T")

app = typer.Typer(
    name="sciorch",
    help="sciorch: run jobs and services on scientific facilities, for people and agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


# ================================================================================ plumbing


@dataclass
class CliState:
    home: Path


def principal() -> Principal:
    """The caller: the local user, or $SCIORCH_PRINCIPAL."""
    from mcp_server.server import local_principal

    return local_principal()


def fail(message: str, field: str | None = None, code: int = 2) -> NoReturn:
    line = " ".join(message.split())
    if field and not line.startswith(field):
        line = f"{line} (field: {field})"
    err.print(Text(f"error: {line}", style="red"))
    raise typer.Exit(code)


def _fail_validation(exc: ValidationError) -> NoReturn:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or None
    fail(f"{loc + ': ' if loc else ''}{first['msg']}", loc)


def _settings(ctx: typer.Context, **overrides: Any) -> Settings:
    state: CliState = ctx.ensure_object(CliState) if ctx.obj is None else ctx.obj
    return load_settings(state.home, **overrides)


def run(
    ctx: typer.Context,
    fn: Callable[[Engine, Principal], Awaitable[T]],
    settings: Settings | None = None,
) -> T:
    """Open the engine, run `fn`, close the engine; typed errors become a red line, exit 2."""

    async def main() -> T:
        engine = await Engine.open(settings or _settings(ctx))
        try:
            return await fn(engine, principal())
        finally:
            await engine.close()

    try:
        return _guard(lambda: asyncio.run(main()))
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(130) from None


def _guard(call: Callable[[], T]) -> T:
    try:
        return call()
    except SciorchError as exc:
        fail(exc.message, exc.field)
    except ValidationError as exc:
        _fail_validation(exc)


def build(model: type[BaseModel], **data: Any) -> Any:
    """Build a tool input; invalid values end the command with the field named."""
    return _guard(lambda: model.model_validate(data))


def parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    """--params-json first, then each -p key=value (values are JSON when they parse)."""
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            fail(f"--params-json is not valid JSON: {exc}", "parameters")
        if not isinstance(loaded, dict):
            fail("--params-json must be a JSON object", "parameters")
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"-p {pair!r}: expected key=value", "parameters")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def resource_request(
    gpus: int | None, cpus: float | None, memory: str | None, walltime: str | None
) -> ResourceRequest | None:
    data: dict[str, Any] = {}
    if gpus is not None:
        data["gpus"] = gpus
    if cpus is not None:
        data["cpus"] = cpus
    if memory is not None:
        data["memory"] = memory
    if walltime is not None:
        data["walltime"] = walltime
    if not data:
        return None
    try:
        return ResourceRequest.model_validate(data)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            _fail_validation(exc)
        fail(str(exc), "resources")


# ================================================================================ rendering


def _t(value: Any, style: str = "") -> Text:
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
    return _t(state.value, STATE_STYLE.get(state, ""))


def fmt_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def entry_duration(view: EntryView) -> str:
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


def entries_table(entries: list[EntryView]) -> Table:
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
            _t(e.id),
            _t(e.service),
            fmt_state(e.state),
            _t(e.site),
            _t(e.event_id),
            _t(fmt_time(e.created_at)),
            _t(entry_duration(e)),
            _t(extra),
        )
    return table


def entry_detail(view: EntryView) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Text]] = [
        ("entry", _t(view.id)),
        ("service", _t(f"{view.service} {view.version} ({view.kind})")),
        ("state", fmt_state(view.state)),
        ("event", _t(view.event_id)),
        ("site", _t(view.site)),
        ("submitted by", _t(view.submitted_by)),
        ("parameters", _t(fmt_json(view.parameters))),
        ("resources", _t(fmt_resources(view.resources))),
        ("created", _t(fmt_time(view.created_at))),
    ]
    if view.started_at:
        rows.append(("started", _t(fmt_time(view.started_at))))
    if view.finished_at:
        rows.append(("finished", _t(f"{fmt_time(view.finished_at)} ({entry_duration(view)})")))
    if view.reason:
        rows.append(("reason", _t(view.reason)))
    if view.exit_code is not None:
        rows.append(("exit code", _t(view.exit_code)))
    if view.restarts:
        rows.append(("restarts", _t(view.restarts)))
    if view.url:
        rows.append(("url", _t(view.url)))
    if view.access_url:
        rows.append(("access url", _t(view.access_url)))
    if view.result is not None:
        rows.append(("result", _t(fmt_json(view.result))))
    if view.backend_handle:
        rows.append(("handle", _t(fmt_json(view.backend_handle))))
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
            table.add_row(_t(fmt_time(tr.at)), fmt_state(tr.state), _t(tr.reason))
        out.print()
        out.print(table)


def event_line(view: EventView) -> str:
    shares = ", ".join(f"{p}={r}" for p, r in sorted(view.shares.items())) or "not shared"
    return f"{view.id} ({view.name}) {view.state.value}; owner {view.owner}; {shares}"


# ================================================================================ root


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="sciorch home (database, logs, config.toml); default $SCIORCH_HOME or ~/.sciorch",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = CliState(home=(home or default_home()).expanduser())


# ================================================================================ serve


@app.command()
def serve(
    ctx: typer.Context,
    transport: Annotated[str, typer.Option(help="stdio or http", case_sensitive=False)] = "http",
    host: Annotated[str | None, typer.Option(help="address to listen on [config: host]")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on [config: port]")] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="offer only tools that change nothing")
    ] = False,
    disable_destructive: Annotated[
        bool,
        typer.Option("--disable-destructive", help="leave out tools that stop or cancel work"),
    ] = False,
) -> None:
    """Run the MCP server. http (default 127.0.0.1): MCP at /mcp with bearer-token auth (see
    `sciorch token create`), the per-entry service proxy and /healthz. stdio: MCP over
    stdin/stdout as the local user (for chat assistants that spawn it)."""
    from mcp_server.auth import verifier
    from mcp_server.server import create_server

    transport = transport.lower()
    if transport not in ("http", "stdio"):
        fail(f"unknown transport {transport!r}; use stdio or http", "transport")
    settings = _guard(lambda: _settings(ctx))
    if transport == "stdio":

        async def stdio() -> None:
            engine = await Engine.open(settings)
            try:
                server = create_server(
                    engine,
                    principal=principal(),
                    read_only=read_only,
                    disable_destructive=disable_destructive,
                )
                await server.run_stdio_async(show_banner=False)
            finally:
                await engine.close()

        with contextlib.suppress(KeyboardInterrupt):
            _guard(lambda: asyncio.run(stdio()))
        return

    from mcp_server.http_app import serve_http

    keys = settings.keys_dir
    shown = f"http://{host or settings.host}:{settings.port if port is None else port}"
    err.print(f"sciorch: serving {settings.home} on {shown} (MCP at /mcp; Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        _guard(
            lambda: asyncio.run(
                serve_http(
                    settings,
                    host,
                    port,
                    mcp_factory=lambda engine: create_server(
                        engine,
                        auth=verifier(keys),
                        read_only=read_only,
                        disable_destructive=disable_destructive,
                    ),
                )
            )
        )


token_app = typer.Typer(help="Bearer tokens for the HTTP MCP endpoint.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    sub: Annotated[str, typer.Option(help="the principal the token speaks for")],
    scopes: Annotated[str, typer.Option(help="comma list of read, submit, admin")] = "read",
    ttl: Annotated[str, typer.Option(help="lifetime, e.g. 3600, 30m, 1h, 7d")] = "1h",
) -> None:
    """Print one signed token on stdout (signed by this home's key, made on first use)."""
    from mcp_server.auth import create_token, parse_scopes

    settings = _guard(lambda: _settings(ctx))
    try:
        seconds = parse_duration_s(ttl)
    except ValueError as exc:
        fail(str(exc), "ttl")
    token = _guard(lambda: create_token(settings.keys_dir, sub, parse_scopes(scopes), seconds))
    print(token)


# ================================================================================ catalogue


@app.command()
def services(ctx: typer.Context) -> None:
    """List the services in the catalogue."""
    listing = run(ctx, tools.list_services)
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
            _t(svc.name),
            _t(version),
            _t(svc.kind),
            _t(fmt_resources(svc.resources)),
            _t(params),
            _t(desc),
        )
    out.print(table)


@app.command()
def sites(ctx: typer.Context) -> None:
    """List the configured sites with their status and capabilities."""
    listing = run(ctx, tools.list_sites)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("SITE", "KIND", "STATUS", "CPUS", "MEMORY", "GPUS", "MAX WALLTIME", "WAIT"):
        table.add_column(col, no_wrap=True)
    table.add_column("ACTIVE", justify="right")
    table.add_column("NOTE", overflow="fold")
    for site in listing.sites:
        caps = site.capabilities
        gpus = str(caps.gpus) + (f" ({', '.join(caps.gpu_types)})" if caps.gpu_types else "")
        table.add_row(
            _t(site.name),
            _t(site.kind),
            _t(site.status.value, "green" if site.status.value == "up" else "yellow"),
            _t(f"{caps.cpus:g}"),
            _t(f"{caps.memory_mb} MiB"),
            _t(gpus),
            _t(format_duration(caps.max_walltime_s) if caps.max_walltime_s else "-"),
            _t(f"{site.estimated_wait_s:.0f}s" if site.estimated_wait_s is not None else "?"),
            _t(site.active_entries),
            _t(site.status_reason),
        )
    out.print(table)


# ================================================================================ submit, launch

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
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", help="with --wait: give up after this many seconds")
]


async def wait_until_done(
    engine: Engine,
    who: Principal,
    entry_id: str,
    timeout_s: float | None,
    until: str = "auto",
    on_message: Callable[[Message], Awaitable[None]] | None = None,
) -> WaitResult:
    """tools.wait_entry in slices of at most a day until the entry gets there or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        left = 86400.0 if deadline is None else max(0.001, min(86400.0, deadline - loop.time()))
        req = build(WaitEntryInput, entry_id=entry_id, timeout_seconds=left, until=until)
        res = await tools.wait_entry(engine, who, req, on_message)
        if not res.timed_out or (deadline is not None and loop.time() >= deadline):
            return res


async def _print_record(msg: Message) -> None:
    if msg.kind == "stream" and msg.record is not None:
        err.print(_t(f"  record {msg.record_index}: {fmt_json(msg.record)}", "dim"))
    elif msg.kind == "transition" and msg.state is not None and not msg.state.terminal:
        err.print(_t(f"  {msg.state.value}" + (f": {msg.reason}" if msg.reason else ""), "dim"))


def _report_wait(res: WaitResult, want: set[EntryState]) -> None:
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
) -> None:
    """Submit a job; prints the entry id (and with --wait its result)."""
    req = build(
        SubmitJobInput,
        service=service,
        parameters=parse_params(param or [], params_json),
        event_id=event,
        site=site,
        resources=resource_request(gpus, cpus, memory, walltime),
        idempotency_key=idempotency_key,
    )

    async def go(engine: Engine, who: Principal) -> WaitResult | None:
        view = await tools.submit_job(engine, who, req)
        out.print(view.id)
        if not wait:
            return None
        return await wait_until_done(engine, who, view.id, timeout, on_message=_print_record)

    res = run(ctx, go)
    if res is not None:
        _report_wait(res, {EntryState.SUCCEEDED})


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
) -> None:
    """Launch a long-running service; prints the entry id (and with --wait its URL)."""
    req = build(
        LaunchServiceInput,
        service=service,
        parameters=parse_params(param or [], params_json),
        event_id=event,
        site=site,
        resources=resource_request(gpus, cpus, memory, walltime),
    )

    async def go(engine: Engine, who: Principal) -> WaitResult | None:
        view = await tools.launch_service(engine, who, req)
        out.print(view.id)
        if not wait:
            return None
        return await wait_until_done(engine, who, view.id, timeout, "ready", _print_record)

    res = run(ctx, go)
    if res is not None:
        _report_wait(res, {EntryState.READY, EntryState.RUNNING})
        err.print("the URL answers while `sciorch serve` runs on this home", style="dim")


# ================================================================================ entries


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

        async def one(engine: Engine, who: Principal) -> EntryView:
            return await tools.get_entry(engine, who, ref)

        entry_detail(run(ctx, one))
        return

    async def recent(engine: Engine, who: Principal) -> list[EntryView]:
        # Pages come oldest first; keep the newest `limit`.
        kept: deque[EntryView] = deque(maxlen=limit)
        cursor = None
        while True:
            page: EntryPage = await tools.list_entries(
                engine, who, build(ListEntriesInput, event_id=event, limit=1000, cursor=cursor)
            )
            kept.extend(page.entries)
            if not page.next_cursor:
                return list(kept)
            cursor = page.next_cursor

    entries = run(ctx, recent)
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

    async def go(engine: Engine, who: Principal) -> None:
        await tools.get_entry(engine, who, ref)  # not found / not allowed before subscribing
        wanted = ("log", "transition")
        async with engine.bus.subscribe(
            lambda m: m.entry_id == entry_id and m.kind in wanted
        ) as sub:
            offset = 0
            while True:
                chunk = await tools.read_logs(
                    engine,
                    who,
                    build(ReadLogsInput, entry_id=entry_id, offset=offset, limit=1_048_576),
                )
                write(chunk.data)
                offset = chunk.next_offset
                if chunk.next_offset < chunk.size:
                    continue  # more already there
                if not follow or chunk.complete:
                    return
                # Pushed by the engine; the timeout is only a bounded fallback.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.get(), timeout=2.0)
                while not sub.queue.empty():
                    sub.queue.get_nowait()

    run(ctx, go)


@app.command()
def results(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="entry id")],
    since_record: Annotated[int, typer.Option(help="skip this many stream records")] = 0,
) -> None:
    """Print an entry's result, stream records and artifacts as JSON."""
    req = build(ReadResultsInput, entry_id=entry_id, since_record=since_record)

    async def go(engine: Engine, who: Principal) -> str:
        return (await tools.read_results(engine, who, req)).model_dump_json(indent=2)

    out.print_json(run(ctx, go))


@app.command()
def cancel(ctx: typer.Context, entry_id: Annotated[str, typer.Argument(help="entry id")]) -> None:
    """Cancel an entry (idempotent)."""
    ref = build(EntryRef, entry_id=entry_id)

    async def go(engine: Engine, who: Principal) -> EntryView:
        return await tools.cancel_entry(engine, who, ref)

    view = run(ctx, go)
    line = Text(f"{view.id} ")
    line.append_text(fmt_state(view.state))
    out.print(line)


# ================================================================================ events


@app.command()
def events(ctx: typer.Context) -> None:
    """List your active events (allocations)."""
    listing = run(ctx, tools.list_events)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("EVENT", "NAME", "STATE", "OWNER", "SITE", "CREATED", "EXPIRES"):
        table.add_column(col, no_wrap=True)
    table.add_column("SHARED WITH", overflow="fold")
    for ev in listing.events:
        table.add_row(
            _t(ev.id),
            _t(ev.name + (" (default)" if ev.default else "")),
            _t(ev.state.value),
            _t(ev.owner),
            _t(ev.site or "any"),
            _t(fmt_time(ev.created_at)),
            _t(fmt_time(ev.expires_at) or "never"),
            _t(", ".join(f"{p} ({r})" for p, r in sorted(ev.shares.items()))),
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

    async def go(engine: Engine, who: Principal) -> EventView:
        return await tools.create_event(engine, who, req)

    out.print(run(ctx, go).id)


@app.command("stop-event")
def stop_event(
    ctx: typer.Context, event_id: Annotated[str, typer.Argument(help="event id")]
) -> None:
    """Stop an event and every entry in it (idempotent)."""
    ref = build(EventRef, event_id=event_id)

    async def go(engine: Engine, who: Principal) -> EventView:
        return await stop_event_and_wait(engine, who, ref)

    out.print(_t(event_line(run(ctx, go))))


async def stop_event_and_wait(
    engine: Engine, who: Principal, ref: EventRef, timeout_s: float = 30
) -> EventView:
    """tools.stop_event, then wait until its entries have ended: this process is about to exit,
    and an entry whose stop is still under way would be found by the next one, without the
    knowledge that it was stopped on purpose."""
    active = [s for s in EntryState if not s.terminal]
    page = await tools.list_entries(
        engine, who, build(ListEntriesInput, event_id=ref.event_id, states=active, limit=1000)
    )
    view = await tools.stop_event(engine, who, ref)
    await asyncio.gather(
        *(wait_until_done(engine, who, e.id, timeout_s, "finished") for e in page.entries)
    )
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

    async def go(engine: Engine, who: Principal) -> EventView:
        return await tools.share_event(engine, who, req)

    out.print(_t(event_line(run(ctx, go))))


# ================================================================================ demo


def demo_points(n: int) -> list[tuple[float, float]]:
    """Distinct points on Branin: its three minimisers, then a Halton sequence over the domain."""
    points = [(-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)]

    def halton(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    i = 1
    while len(points) < n:
        points.append((round(-5 + 15 * halton(i, 2), 4), round(15 * halton(i, 3), 4)))
        i += 1
    return points[:n]


def _bind(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


class _Server:
    """The HTTP app served in the background of this process (the demo holds the engine)."""

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        import uvicorn

        from mcp_server.http_app import create_http_app

        config = uvicorn.Config(
            create_http_app(engine),
            log_level="warning",
            lifespan="on",
            access_log=False,
            ws="websockets-sansio",
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        # Leave Ctrl-C to asyncio.run, which cancels the demo so its finally-blocks run.
        self.server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
        self.sock = sock
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise SciorchError("the HTTP app stopped while starting", field="port")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, timeout=10)
        self.sock.close()


async def _fetch_page(url: str) -> tuple[int, str]:
    """GET the access URL as a browser would: the proxy trades ?token= for a cookie (the header
    carries the token too, for when the cookie is marked secure and this is plain HTTP)."""
    import httpx

    token = parse_qs(urlsplit(url).query).get("token", [""])[0]
    async with httpx.AsyncClient(follow_redirects=True, timeout=10) as client:
        resp = await client.get(url, headers={"X-Sciorch-Entry-Token": token})
    text = resp.text
    m = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.S | re.I) or re.search(
        r"<title[^>]*>(.*?)</title>", text, re.S | re.I
    )
    excerpt = re.sub(r"<[^>]+>", "", m.group(1) if m else text)
    excerpt = " ".join(excerpt.split())
    return resp.status_code, excerpt[:120]


@dataclass
class DemoOutcome:
    jobs: list[EntryView]
    service: EntryView
    page_status: int
    page_excerpt: str
    fetched_url: str
    event_id: str
    kept: bool


async def _demo(
    engine: Engine, who: Principal, n_jobs: int, keep: bool, sock: socket.socket, local: str
) -> DemoOutcome:
    server = _Server(engine, sock)
    await server.start()
    event = await tools.create_event(engine, who, build(CreateEventInput, name="demo"))
    try:
        err.print(f"demo event {event.id}: launching http-app and {n_jobs} sim-instrument jobs")
        svc = await tools.launch_service(
            engine,
            who,
            build(
                LaunchServiceInput,
                service="http-app",
                parameters={"greeting": "hello from the sciorch demo"},
                event_id=event.id,
            ),
        )
        submitted = []
        for i, (x1, x2) in enumerate(demo_points(n_jobs)):
            params = {
                "surface": "branin",
                "x1": x1,
                "x2": x2,
                "duration_s": round(0.5 + 0.25 * (i % 5), 2),
                "records": 3,
                "noise_std": 0.01,
                "seed": i,
            }
            req = build(
                SubmitJobInput, service="sim-instrument", parameters=params, event_id=event.id
            )
            submitted.append(await tools.submit_job(engine, who, req))

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        ) as progress:
            task = progress.add_task("measuring Branin", total=n_jobs)

            async def one(view: EntryView) -> EntryView:
                res = await wait_until_done(engine, who, view.id, 120)
                progress.advance(task)
                return res.entry

            finished = await asyncio.gather(*(one(v) for v in submitted))

        ready = await wait_until_done(engine, who, svc.id, 60, "ready")
        if ready.entry.state != EntryState.READY:
            raise SciorchError(
                f"http-app did not become ready: {ready.entry.state.value}"
                + (f" ({ready.entry.reason})" if ready.entry.reason else ""),
                field="http-app",
            )
        access = ready.entry.access_url or ""
        fetched = local + access.removeprefix(engine.settings.public_url.rstrip("/"))
        status_code, excerpt = await _fetch_page(fetched)
        return DemoOutcome(
            jobs=list(finished),
            service=ready.entry,
            page_status=status_code,
            page_excerpt=excerpt,
            fetched_url=fetched,
            event_id=event.id,
            kept=keep,
        )
    finally:
        if not keep:
            with contextlib.suppress(SciorchError):
                await stop_event_and_wait(engine, who, build(EventRef, event_id=event.id))
        await server.stop()


@app.command()
def demo(
    ctx: typer.Context,
    jobs: Annotated[int, typer.Option(help="sim-instrument jobs to run", min=1, max=50)] = 6,
    keep: Annotated[
        bool, typer.Option("--keep", help="leave the demo event (and http-app) running")
    ] = False,
    port: Annotated[
        int | None,
        typer.Option(
            help="port for the HTTP app during the demo; default: the configured one "
            "if free, else any free port; 0: any free port"
        ),
    ] = None,
) -> None:
    """Run a short demo: a service behind the proxy and a few jobs on the Branin surface."""
    settings = _guard(lambda: _settings(ctx))
    host, configured = settings.host, settings.port
    want = settings.port if port is None else port
    sock = _bind(host, want) if want else None
    if sock is None:
        if port:  # asked for explicitly
            fail(f"port {port} on {host} is in use", "port")
        sock = _bind(host, 0)
        assert sock is not None
    bound = int(sock.getsockname()[1])
    local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound}"
    if bound != settings.port:
        settings = settings.model_copy(update={"port": bound, "public_url": local})

    async def go(engine: Engine, who: Principal) -> DemoOutcome:
        return await _demo(engine, who, jobs, keep, sock, local)

    try:
        outcome = run(ctx, go, settings)
    finally:
        sock.close()

    table = Table(
        title="sim-instrument on Branin (minimum 0.397887)",
        title_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold",
    )
    table.add_column("ENTRY", no_wrap=True)
    table.add_column("x1", justify="right")
    table.add_column("x2", justify="right")
    table.add_column("STATE")
    table.add_column("VALUE", justify="right")
    table.add_column("TRUE VALUE", justify="right")
    for e in outcome.jobs:
        r = e.result or {}
        value = r.get("value")
        true_value = r.get("true_value")
        table.add_row(
            _t(e.id),
            _t(f"{e.parameters.get('x1'):.4g}"),
            _t(f"{e.parameters.get('x2'):.4g}"),
            fmt_state(e.state),
            _t(f"{value:.6g}" if isinstance(value, int | float) else (e.reason or "")),
            _t(f"{true_value:.6g}" if isinstance(true_value, int | float) else ""),
        )
    out.print(table)
    out.print()
    path = urlsplit(outcome.fetched_url).path
    out.print(
        _t(
            f"http-app {outcome.service.id} is ready; GET {path} through the proxy -> "
            f"{outcome.page_status} {outcome.page_excerpt!r}"
        )
    )
    out.print(_t(f"service URL (with your access token): {outcome.service.access_url}"))
    if outcome.kept:
        out.print(
            _t(
                f"kept event {outcome.event_id}; the URL answers while `sciorch serve"
                f"{' --port ' + str(bound) if bound != configured else ''}` runs; "
                f"`sciorch stop-event {outcome.event_id}` ends it"
            ),
            style="dim",
        )
    else:
        out.print(
            _t(
                f"stopped event {outcome.event_id} (the URL answered during the demo; "
                "use --keep to leave it running)"
            ),
            style="dim",
        )
    failed = [e for e in outcome.jobs if e.state != EntryState.SUCCEEDED]
    if outcome.page_status != 200 or failed:
        fail(
            f"{len(failed)} job(s) did not succeed; proxy answered {outcome.page_status}",
            "demo",
            code=1,
        )


# ================================================================================ agent


@app.command()
def agent(
    ctx: typer.Context,
    goal: Annotated[str, typer.Argument(help="what you want done, in plain words")],
    url: Annotated[
        str | None,
        typer.Option(help="a remote sciorch MCP endpoint, e.g. http://host:8765/mcp"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="SCIORCH_TOKEN", help="bearer token for --url"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar="SCIORCH_AGENT_MODEL",
            help="Claude model id (default: claude-sonnet-5-5)",
            show_default=False,
        ),
    ] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="model turns at most")] = 30,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="input + output tokens over the whole run")
    ] = 500_000,
    max_cost: Annotated[
        float, typer.Option(min=0.0, help="estimated cost cap in USD at list prices (0: none)")
    ] = 5.0,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="offer only tools that change nothing")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="change nothing: print Claude's plan")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="run cancel/stop tools without asking")
    ] = False,
    prompt: Annotated[
        str | None,
        typer.Option(help="use this MCP prompt as the playbook (default: matched to the goal)"),
    ] = None,
    transcript: Annotated[
        Path | None,
        typer.Option(help="where the JSON transcript goes (default: under $SCIORCH_HOME/agent/)"),
    ] = None,
) -> None:
    """Let Claude reach a goal with sciorch's MCP tools: it discovers the tools, calls them,
    follows progress and answers with what it did and the evidence (entry ids, URLs, results).
    Works in-process on this home, or with a remote server (--url, --token). Cancel and stop
    calls are confirmed first unless --yes. Every tool call and result is saved as JSON.
    Needs ANTHROPIC_API_KEY."""
    import os

    if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
        fail(
            "sciorch agent needs an Anthropic API key: set ANTHROPIC_API_KEY "
            "(export ANTHROPIC_API_KEY=sk-ant-...; keys at https://console.anthropic.com/)"
        )
    if not goal.strip():
        fail("the goal is empty: say what you want done", "goal")
    if url and not token:
        fail(
            "--url needs a bearer token: pass --token or set SCIORCH_TOKEN "
            "(on the server: sciorch token create --sub NAME --scopes submit)",
            "token",
        )

    import anthropic
    import click

    from mcp_server.agent import (
        AgentConfig,
        AgentError,
        AgentResult,
        connect,
        default_transcript_path,
        run_agent,
    )

    state: CliState = ctx.ensure_object(CliState) if ctx.obj is None else ctx.obj
    settings = None if url else _guard(lambda: _settings(ctx))
    fields: dict[str, Any] = {
        "max_steps": max_steps,
        "max_tokens_total": max_tokens,
        "max_cost_usd": max_cost if max_cost > 0 else None,
        "read_only": read_only,
        "dry_run": dry_run,
        "yes": yes,
        "prompt": prompt,
        "transcript_path": (transcript or default_transcript_path(state.home, goal)).expanduser(),
    }
    if model:
        fields["model"] = model
    config = _guard(lambda: AgentConfig.model_validate(fields))

    def show(kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            line = f"agent: {config.model}; {len(data['tools'])} tools offered"
            if data["withheld"]:
                mode = "dry run" if dry_run else "read-only"
                line += f", {len(data['withheld'])} withheld ({mode})"
            if data["prompt"]:
                line += f"; playbook {data['prompt']['name']}"
            err.print(_t(line), style="dim")
        elif kind == "turn":
            turn = data["turn"]
            if turn.tool_uses and turn.text:
                err.print(_t(f"[{turn.step}] {turn.text}"), style="dim")
        elif kind == "tool_call":
            rec = data["record"]
            args = json.dumps(rec.arguments, default=str)
            args = args if len(args) <= 160 else args[:157] + "..."
            err.print(_t(f"[{rec.step}] → {rec.name} {args}"))
        elif kind == "progress":
            err.print(_t(f"      … {data['message']}"), style="dim")
        elif kind == "tool_result":
            rec = data["record"]
            took = f" ({rec.duration_s:.1f} s)" if rec.duration_s else ""
            if rec.status == "ok":
                err.print(_t(f"      ✓ {rec.name}{took}"), style="green")
            else:
                why = " ".join((rec.error or "").split())
                why = why if len(why) <= 200 else why[:197] + "..."
                style = "red" if rec.status == "error" else "yellow"
                err.print(_t(f"      ✗ {rec.name} {rec.status}: {why}"), style=style)

    async def confirm(tool: str, arguments: dict[str, Any]) -> bool:
        shown = json.dumps(arguments, default=str)
        if not sys.stdin.isatty():
            err.print(
                _t(f"      no terminal to confirm {tool} {shown} on: declined (--yes allows it)"),
                style="yellow",
            )
            return False
        try:
            return bool(
                await asyncio.to_thread(
                    typer.confirm, f"Claude wants to run {tool} {shown}. Allow?", default=False
                )
            )
        except click.exceptions.Abort:
            return False

    async def main() -> AgentResult:
        claude = anthropic.AsyncAnthropic()
        try:
            async with connect(
                url=url, token=token, settings=settings, read_only=read_only or dry_run
            ) as client:
                return await run_agent(goal, client, claude, config, confirm=confirm, on_event=show)
        finally:
            await claude.close()

    try:
        result = _guard(lambda: asyncio.run(main()))
    except KeyboardInterrupt:
        err.print(f"interrupted; transcript: {config.transcript_path}", style="yellow")
        raise typer.Exit(130) from None
    except AgentError as exc:
        fail(str(exc))
    except anthropic.AuthenticationError as exc:
        fail(f"the Anthropic API refused the key in ANTHROPIC_API_KEY: {exc.message}")
    except anthropic.APIError as exc:
        fail(
            f"the Anthropic API failed: {exc.message} (transcript: {config.transcript_path})",
            code=1,
        )
    except Exception as exc:  # the MCP server unreachable, refusing the token, ...
        where = url or "the local engine"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        fail(f"the agent failed talking to {where}: {detail}", code=1)

    if result.dry_run:
        out.print(_t("plan (dry run, nothing was changed):"), style="bold")
    out.print(_t(result.answer or "(Claude gave no answer)"))
    ev = result.evidence
    if ev.entry_ids or ev.urls:
        shown_ids = ", ".join(ev.entry_ids[-10:])
        more = f" (+{len(ev.entry_ids) - 10} more)" if len(ev.entry_ids) > 10 else ""
        out.print(_t(f"entries: {shown_ids}{more}" if ev.entry_ids else ""), style="dim")
        for link in ev.urls[-5:]:
            out.print(_t(f"link: {link}"), style="dim")
    calls = len([c for c in result.tool_calls if c.status != "not_run"])
    err.print(
        _t(
            f"{result.stopped_reason.replace('_', ' ')}: {result.steps} steps, {calls} tool calls, "
            f"{result.usage.total:,} tokens, ~${result.cost_usd:.2f}; "
            f"transcript {result.transcript_path}"
        ),
        style="dim",
    )
    if result.stopped_reason != "done":
        limits = {
            "step_budget": f"the step budget ({max_steps}) ran out",
            "token_budget": f"the token budget ({max_tokens:,}) ran out",
            "cost_budget": f"the cost budget (${max_cost:.2f}) ran out",
            "refused": "Claude declined the request",
        }
        fail(f"{limits[result.stopped_reason]} before the goal was reached", code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
