"""`sciorch agent`: Claude reaches a goal with sciorch's MCP tools (see sciorch.agent)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sciorch.cli.app import CliState, app, err, fail, guard, out, principal, settings_of
from sciorch.cli.render import cell

AGENT_TOKEN_TTL_S = 3600  # a run's step and cost budgets end it well before


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

    from sciorch.agent import (
        AgentConfig,
        AgentError,
        AgentResult,
        connect,
        default_transcript_path,
        run_agent,
    )

    state: CliState = ctx.ensure_object(CliState) if ctx.obj is None else ctx.obj
    settings = None if url else guard(lambda: settings_of(ctx))
    if settings is not None:  # the server running on this home, if any (sciorch.cli.link)
        from sciorch.cli.link import server_here

        home_settings, who = settings, principal()
        limited = read_only or dry_run  # the server then refuses changes too
        here = guard(
            lambda: asyncio.run(server_here(home_settings, who, AGENT_TOKEN_TTL_S, limited))
        )
        if here is not None:
            url, token = here
            settings = None
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
    config = guard(lambda: AgentConfig.model_validate(fields))

    def show(kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            line = f"agent: {config.model}; {len(data['tools'])} tools offered"
            if data["withheld"]:
                mode = "dry run" if dry_run else "read-only"
                line += f", {len(data['withheld'])} withheld ({mode})"
            if data["prompt"]:
                line += f"; playbook {data['prompt']['name']}"
            err.print(cell(line), style="dim")
        elif kind == "turn":
            turn = data["turn"]
            if turn.tool_uses and turn.text:
                err.print(cell(f"[{turn.step}] {turn.text}"), style="dim")
        elif kind == "tool_call":
            rec = data["record"]
            args = json.dumps(rec.arguments, default=str)
            args = args if len(args) <= 160 else args[:157] + "..."
            err.print(cell(f"[{rec.step}] → {rec.name} {args}"))
        elif kind == "progress":
            err.print(cell(f"      … {data['message']}"), style="dim")
        elif kind == "tool_result":
            rec = data["record"]
            took = f" ({rec.duration_s:.1f} s)" if rec.duration_s else ""
            if rec.status == "ok":
                err.print(cell(f"      ✓ {rec.name}{took}"), style="green")
            else:
                why = " ".join((rec.error or "").split())
                why = why if len(why) <= 200 else why[:197] + "..."
                style = "red" if rec.status == "error" else "yellow"
                err.print(cell(f"      ✗ {rec.name} {rec.status}: {why}"), style=style)

    async def confirm(tool: str, arguments: dict[str, Any]) -> bool:
        shown = json.dumps(arguments, default=str)
        if not sys.stdin.isatty():
            err.print(
                cell(f"      no terminal to confirm {tool} {shown} on: declined (--yes allows it)"),
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
        result = guard(lambda: asyncio.run(main()))
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
        out.print(cell("plan (dry run, nothing was changed):"), style="bold")
    out.print(cell(result.answer or "(Claude gave no answer)"))
    ev = result.evidence
    if ev.entry_ids or ev.urls:
        shown_ids = ", ".join(ev.entry_ids[-10:])
        more = f" (+{len(ev.entry_ids) - 10} more)" if len(ev.entry_ids) > 10 else ""
        out.print(cell(f"entries: {shown_ids}{more}" if ev.entry_ids else ""), style="dim")
        for link in ev.urls[-5:]:
            out.print(cell(f"link: {link}"), style="dim")
    calls = len([c for c in result.tool_calls if c.status != "not_run"])
    err.print(
        cell(
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
