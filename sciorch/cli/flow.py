"""`sciorch flow ...`: start, follow, list and cancel flow runs. Each command is MCP tool calls
(start_flow, get_flow_run, list_flow_runs, cancel_flow_run), to a running server with --url,
else to this home's engine in memory: then `flow run` drives the run in this process until it
ends (a run left behind resumes when `sciorch serve` next starts)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.spec import load_flow
from ground.errors import SciorchError
from sciorch.cli.app import app, fail, out, parse_params
from sciorch.cli.calls import Call, session
from sciorch.cli.render import cell, fmt_time

flow_app = typer.Typer(
    help="Flows: multi-step pipelines, their runs and triggers.", no_args_is_help=True
)
app.add_typer(flow_app, name="flow")

Url = Annotated[
    str | None, typer.Option(help="a sciorch server's MCP endpoint, e.g. http://host:8765/mcp")
]
Token = Annotated[str | None, typer.Option(envvar="SCIORCH_TOKEN", help="bearer token for --url")]
AsJson = Annotated[bool, typer.Option("--json", help="print the run as JSON")]


def show(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(view, default=str))
        return
    out.print(
        f"{view['run_id']}  {view['flow']}  {view['state']}"
        + (f": {view['reason']}" if view.get("reason") else "")
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("STEP", "STATE", "TRY", "ENTRY", "ENDED"):
        table.add_column(col, no_wrap=True)
    table.add_column("RESULT / ERROR", overflow="fold")
    for s in view["steps"]:
        what = s.get("error") or (json.dumps(s["result"]) if s.get("result") is not None else "")
        table.add_row(
            cell(s["key"]),
            cell(s["state"]),
            cell(s["attempt"] or ""),
            cell(s["entry_id"] or ""),
            cell((s.get("finished_at") or "")[:19].replace("T", " ")),
            cell(what[:200]),
        )
    out.print(table)
    if view.get("outputs"):
        out.print("outputs: " + json.dumps(view["outputs"]))


async def follow(call: Call, run_id: str) -> dict[str, Any]:
    while True:
        view = await call("get_flow_run", {"run_id": run_id})
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.2)


@flow_app.command("run")
def run_flow(
    ctx: typer.Context,
    flow: Annotated[str, typer.Argument(help="a flow file (.yaml, .toml), or a flow's name")],
    inputs: Annotated[
        list[str], typer.Option("--input", "-i", help="name=value (JSON or text)")
    ] = [],  # noqa: B006
    event: Annotated[str | None, typer.Option(help="the event its entries run in")] = None,
    wait: Annotated[bool, typer.Option(help="follow the run until it ends")] = True,
    key: Annotated[str | None, typer.Option(help="idempotency key")] = None,
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """Start a flow run (and, by default, follow it to its end). Exit 1 if it does not succeed."""
    args: dict[str, Any] = {"inputs": parse_params(inputs, None), "event_id": event}
    path = Path(flow)
    if path.suffix.lower() in (".yaml", ".yml", ".toml"):
        try:
            args["flow"] = load_flow(path).model_dump(mode="json")
        except SciorchError as exc:
            fail(exc.message, exc.field)
    else:
        args["flow"] = flow
    if key:
        args["idempotency_key"] = key

    async def body(call: Call) -> dict[str, Any]:
        view = await call("start_flow", args)
        return await follow(call, view["run_id"]) if wait else view

    view = session(ctx, url, token, body)
    show(view, as_json)
    if wait and view["state"] != "succeeded":
        raise typer.Exit(1)


@flow_app.command("get")
def get_run(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="run id")],
    as_json: AsJson = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """A run's state and each step's."""
    show(session(ctx, url, token, lambda call: call("get_flow_run", {"run_id": run_id})), as_json)


@flow_app.command("list")
def list_runs(
    ctx: typer.Context,
    flow: Annotated[str | None, typer.Option(help="only runs of this flow")] = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Flow runs you can see, newest first."""
    listing = session(ctx, url, token, lambda call: call("list_flow_runs", {"flow": flow}))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("RUN", "FLOW", "STATE", "STEPS", "CREATED", "REASON"):
        table.add_column(col, no_wrap=col != "REASON")
    for r in listing["runs"]:
        table.add_row(
            cell(r["run_id"]),
            cell(r["flow"]),
            cell(r["state"]),
            cell(f"{r['steps_done']}/{r['steps']}"),
            cell(fmt_time(_ts(r["created_at"]))),
            cell(r.get("reason") or ""),
        )
    out.print(table)


@flow_app.command("cancel")
def cancel_run(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="run id")],
    url: Url = None,
    token: Token = None,
) -> None:
    """Cancel a run (idempotent)."""
    view = session(ctx, url, token, lambda call: call("cancel_flow_run", {"run_id": run_id}))
    out.print(f"{view['run_id']}  {view['state']}")


def _ts(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value)
