"""The `sciorch` command: human mirrors of the typed tools, plus `serve` and `demo`.

Each command parses its arguments, builds the tool's pydantic input, opens the engine in this
process (it holds the lock on $SCIORCH_HOME while the command runs and re-adopts what earlier
commands started), calls the tool and renders the answer. No business logic lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import tools
from orchestrator.config import Settings, default_home, load_settings
from orchestrator.engine import Engine
from orchestrator.errors import SciorchError, invalid_input
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
    EntrySummary,
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
    err = invalid_input(exc)
    fail(err.message, err.field)


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
    from mcp_server.oauth import resource_server
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
                        auth=resource_server(engine.settings),
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

    async def recent(engine: Engine, who: Principal) -> list[EntrySummary]:
        # Pages come oldest first; keep the newest `limit`.
        kept: deque[EntrySummary] = deque(maxlen=limit)
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


# ================================================================================ steer, demo

DEMO_CAMPAIGN: dict[str, Any] = {
    "name": "demo: Branin on sim-instrument",
    "objective": {
        "service": "sim-instrument",
        "parameters": {"surface": "branin", "duration_s": 0.05, "records": 2, "noise_std": 0.01},
        "field": "value",
        "goal": "minimise",
        "reference": 0.397887,
    },
    "space": [
        {"name": "x1", "low": -5.0, "high": 10.0},
        {"name": "x2", "low": 0.0, "high": 15.0},
    ],
    "initial_design": {"count": 6, "method": "sobol"},
    "batch_size": 3,
    "budget": {"evaluations": 21, "wall_time_s": 300},
}


class _SteerProgress:
    """A live progress bar fed by the runner's updates (no polling)."""

    def __init__(self, title: str, budget: int, goal: str, enabled: bool) -> None:
        self.goal = goal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
            disable=not enabled,
        )
        self.task = self.progress.add_task(title, total=budget, status="starting")
        self.runner: Any = None

    def update(self, _campaign_id: str) -> None:
        r = self.runner
        if r is None or not r.evals:
            return
        evals = list(r.evals.values())
        done = sum(1 for e in evals if e.state.finished)
        running = sum(1 for e in evals if not e.state.finished)
        failed = sum(1 for e in evals if e.state.value == "failed")
        best = r.best()
        status = f"{running} in flight"
        if best is not None and best.value is not None:
            status = f"best {best.value:.6g}, " + status
        if failed:
            status += f", {failed} failed"
        self.progress.update(self.task, completed=done, status=status)


def _report(view: Any) -> None:
    """The campaign's outcome in a few lines."""
    from steering.models import CampaignView

    assert isinstance(view, CampaignView)
    p = view.progress
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("campaign", f"{view.id} ({view.name})"),
        ("state", f"{view.state.value}: {view.reason or ''}".rstrip(": ")),
        (
            "evaluations",
            f"{p.succeeded} measured, {p.failed} failed, {p.cancelled} cancelled of "
            f"{p.budget} (retries {p.retries}); batch {view.batch_size}, {view.acquisition}",
        ),
    ]
    if view.best is not None:
        point = ", ".join(f"{k}={_num(v)}" for k, v in view.best.point.items())
        line = f"{_num(view.best.value)} at {point} (evaluation {view.best.seq + 1}"
        line += f", entry {view.best.entry_id})" if view.best.entry_id else ")"
        rows.append(("best", line))
        if view.reference is not None:
            gap = view.best.value - view.reference
            rows.append(("known optimum", f"{_num(view.reference)} (gap {gap:.4g})"))
    post = view.posterior
    if post is not None:
        if post.predicted_best:
            pb = post.predicted_best
            point = ", ".join(f"{k}={_num(v)}" for k, v in pb["point"].items())
            rows.append(("GP predicts", f"{_num(pb['mean'])} ± {_num(pb['std'])} at {point}"))
        rows.append(("posterior std", f"max {_num(post.max_std)}, mean {_num(post.mean_std)}"))
    if view.decision_s_median is not None:
        rows.append(
            (
                "decision time",
                f"median {view.decision_s_median * 1000:.0f} ms, max "
                f"{(view.decision_s_max or 0) * 1000:.0f} ms",
            )
        )
    rows.append(("time", f"{p.elapsed_s:.1f} s"))
    if view.event_id:
        rows.append(("event", view.event_id))
    for path in view.plots:
        rows.append(("plot", path))
    for key, value in rows:
        grid.add_row(key, _t(value))
    out.print(grid)


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


async def _steer_local(
    engine: Engine,
    who: Principal,
    spec: Any,
    resume: str | None,
    plots: bool,
    progress: bool,
) -> Any:
    """Run (or resume) a campaign in this process: the runner drives this engine through an
    in-memory MCP client acting as `who`."""
    from steering.manager import manager_for

    manager = manager_for(engine, auto_resume=False)
    store = await manager.store()
    try:
        if resume is not None:
            rec = await store.get_campaign(resume)
            if rec is None or (rec.owner != who.id and not who.admin):
                raise SciorchError(f"no campaign {resume!r} of {who.id} here", field="resume")
            if rec.endpoint != "embedded":
                raise SciorchError(
                    f"campaign {resume} runs against {rec.endpoint}; resume it with --url",
                    field="resume",
                )
        else:
            await manager.validate(who, spec)
            rec = await manager.create(who, spec)
        if not rec.state.finished:
            bar = _SteerProgress(
                rec.name, rec.spec.budget.evaluations, rec.spec.objective.goal, progress
            )
            manager.listeners.append(bar.update)
            err.print(f"campaign {rec.id}: {rec.name}")
            with bar.progress:
                task = manager.launch(rec)
                bar.runner = manager.runners.get(rec.id)
                if bar.runner is not None:
                    bar.runner.plots = plots
                bar.update(rec.id)
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    err.print(
                        "interrupted; the campaign stays resumable: "
                        f"sciorch steer --resume {rec.id}",
                        style="yellow",
                    )
                    raise
                bar.update(rec.id)
        return await manager.get(who, rec.id, with_evals=False)
    finally:
        await manager.shutdown()


async def _steer_remote(
    home: Path,
    who: Principal,
    url: str,
    token: str | None,
    spec: Any,
    resume: str | None,
    plots: bool,
    progress: bool,
) -> Any:
    """Run a campaign here against a remote sciorch server (its MCP endpoint over HTTP); the
    campaign's record stays in this home."""
    from fastmcp import Client
    from fastmcp.client.auth import BearerAuth

    from steering.manager import build_view, campaign_dir, new_record
    from steering.runner import CampaignRunner
    from steering.store import CampaignStore

    store = await CampaignStore.open(home / "steering.db")
    try:
        if resume is not None:
            rec = await store.get_campaign(resume)
            if rec is None:
                raise SciorchError(f"no campaign {resume!r} in {home}", field="resume")
        else:
            rec = new_record(who, spec, url)
            await store.insert_campaign(rec)
        auth = BearerAuth(token) if token else None

        def client() -> Any:
            return Client(url, auth=auth)

        if not rec.state.finished:
            bar = _SteerProgress(
                rec.name, rec.spec.budget.evaluations, rec.spec.objective.goal, progress
            )
            runner = CampaignRunner(
                store, rec.id, client, campaign_dir(home, rec.id), on_update=bar.update,
                patience_s=300.0, plots=plots,
            )
            bar.runner = runner
            err.print(f"campaign {rec.id}: {rec.name} (against {url})")
            with bar.progress:
                try:
                    await runner.run()
                except asyncio.CancelledError:
                    err.print(
                        f"interrupted; the campaign stays resumable: sciorch steer --url {url} "
                        f"--resume {rec.id}",
                        style="yellow",
                    )
                    raise
        final = await store.get_campaign(rec.id)
        assert final is not None
        return build_view(final, await store.evaluations(rec.id), False, with_evals=False)
    finally:
        await store.close()


def _exit_for(view: Any) -> None:
    if view.state.value == "failed":
        fail(f"campaign {view.id} failed: {view.reason}", "campaign", code=1)


@app.command()
def steer(
    ctx: typer.Context,
    file: Annotated[
        Path | None, typer.Argument(help="campaign file (.toml, .yaml); see examples/")
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="resume this campaign id instead")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="a remote sciorch server's MCP endpoint, e.g. http://host:8765/mcp"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="SCIORCH_TOKEN", help="bearer token for --url ($SCIORCH_TOKEN)"),
    ] = None,
    plots: Annotated[bool, typer.Option(help="write PNG plots at the end")] = True,
    progress: Annotated[bool, typer.Option(help="show a live progress bar")] = True,
) -> None:
    """Run a closed-loop campaign: gpCAM chooses each measurement, sciorch's MCP tools run it.

    Locally (default) the campaign drives this home's engine; with --url it drives a remote
    server. Interrupted campaigns (Ctrl-C, a killed process) resume with --resume ID, reusing
    every finished evaluation and re-adopting those in flight. Plots go to
    <home>/campaigns/<id>/."""
    from steering.spec import load_spec

    if (file is None) == (resume is None):
        fail("give a campaign FILE, or --resume ID", "file")
    spec = _guard(lambda: load_spec(file)) if file is not None else None
    state: CliState = ctx.obj
    who = principal()
    try:
        if url is None:

            async def go(engine: Engine, me: Principal) -> Any:
                return await _steer_local(engine, me, spec, resume, plots, progress)

            view = run(ctx, go)
        else:
            home = state.home
            home.mkdir(parents=True, exist_ok=True)
            view = _guard(
                lambda: asyncio.run(
                    _steer_remote(home, who, url, token, spec, resume, plots, progress)
                )
            )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    _report(view)
    _exit_for(view)


@app.command()
def demo(
    ctx: typer.Context,
    evaluations: Annotated[
        int, typer.Option(help="measurements to spend", min=4, max=200)
    ] = 21,
    batch: Annotated[int, typer.Option(help="measurements in flight at once", min=1, max=8)] = 3,
    seed: Annotated[int, typer.Option(help="random seed of the campaign")] = 7,
    progress: Annotated[bool, typer.Option(help="show a live progress bar")] = True,
) -> None:
    """A real campaign with no configuration: gpCAM minimises the Branin function measured by
    the local simulated instrument (sim-instrument jobs, run through sciorch's own MCP tools),
    then reports the best point against the known optimum and writes plots."""
    from steering.spec import parse_spec

    data = json.loads(json.dumps(DEMO_CAMPAIGN))
    data["budget"]["evaluations"] = evaluations
    data["batch_size"] = batch
    data["seed"] = seed
    data["initial_design"]["count"] = min(6, max(2, evaluations // 3))
    spec = _guard(lambda: parse_spec(data, "demo"))

    async def go(engine: Engine, me: Principal) -> Any:
        return await _steer_local(engine, me, spec, None, True, progress)

    view = run(ctx, go)
    _report(view)
    _exit_for(view)
    if view.best is None or view.progress.succeeded < evaluations // 2:
        fail("the demo campaign measured too little; see `sciorch status`", "demo", code=1)


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


from mcp_server.cli_campaign import campaign_app  # noqa: E402  (it uses this module's plumbing)

app.add_typer(campaign_app, name="campaign")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
