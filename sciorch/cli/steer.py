"""`sciorch steer` (a campaign here, or against a remote server with --url) and `sciorch demo`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ground.errors import SciorchError
from ground.models import (
    Principal,
)
from orchestrator.engine import Engine
from sciorch.cli.app import CliState, app, err, fail, guard, out, principal, run, settings_of
from sciorch.cli.render import cell

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
        grid.add_row(key, cell(value))
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
    from mcp_server.steering_tools import campaign_manager

    manager = campaign_manager(engine, auto_resume=False)
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
    from mcp_server.connect import remote
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
        def client() -> Any:
            return remote(url, token)

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


def _server_here(ctx: typer.Context) -> tuple[str, str] | None:
    """(MCP URL, a token) of the server running on this home, if one answers: a campaign
    started here then drives it (sciorch.cli.link), its record kept in this home as with --url.
    The token lasts as long as a campaign may (its calls are spread over that time)."""
    from sciorch.cli.link import server_here

    settings = settings_of(ctx)
    return guard(lambda: asyncio.run(server_here(settings, principal(), CAMPAIGN_TOKEN_TTL_S)))


CAMPAIGN_TOKEN_TTL_S = 24 * 3600


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
    spec = guard(lambda: load_spec(file)) if file is not None else None
    state: CliState = ctx.obj
    who = principal()
    if url is None and (here := _server_here(ctx)) is not None:
        url, token = here
    try:
        if url is None:

            async def go(engine: Engine, me: Principal) -> Any:
                return await _steer_local(engine, me, spec, resume, plots, progress)

            view = run(ctx, go)
        else:
            home = state.home
            home.mkdir(parents=True, exist_ok=True)
            view = guard(
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
    spec = guard(lambda: parse_spec(data, "demo"))

    async def go(engine: Engine, me: Principal) -> Any:
        return await _steer_local(engine, me, spec, None, True, progress)

    here = _server_here(ctx)
    if here is None:
        view = run(ctx, go)
    else:
        home: Path = ctx.obj.home
        view = guard(
            lambda: asyncio.run(
                _steer_remote(home, principal(), here[0], here[1], spec, None, True, progress)
            )
        )
    _report(view)
    _exit_for(view)
    if view.best is None or view.progress.succeeded < evaluations // 2:
        fail("the demo campaign measured too little; see `sciorch status`", "demo", code=1)
