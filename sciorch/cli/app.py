"""The typer app and the plumbing every command shares: the caller, one red line for a user error
(exit 2), opening the engine around a call, building tool inputs, -p key=value parameters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.text import Text

from ground.config import Settings, default_home, load_settings
from ground.errors import SciorchError, invalid_input
from ground.models import (
    Principal,
    ResourceRequest,
)
from orchestrator.engine import Engine

if TYPE_CHECKING:
    from sciorch.cli.link import Ops

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


def fail_validation(exc: ValidationError) -> NoReturn:
    err = invalid_input(exc)
    fail(err.message, err.field)


def settings_of(ctx: typer.Context, **overrides: Any) -> Settings:
    state: CliState = ctx.ensure_object(CliState) if ctx.obj is None else ctx.obj
    return load_settings(state.home, **overrides)


def run(
    ctx: typer.Context,
    fn: Callable[[Engine, Principal], Awaitable[T]],
    settings: Settings | None = None,
) -> T:
    """Open the engine, run `fn`, close the engine; typed errors become a red line, exit 2."""

    async def main() -> T:
        engine = await Engine.open(settings or settings_of(ctx))
        try:
            return await fn(engine, principal())
        finally:
            await engine.close()

    return _run_main(main)


def act(ctx: typer.Context, fn: Callable[[Ops], Awaitable[T]]) -> T:
    """Run `fn` on the server running on this home, or else on an engine opened here
    (sciorch.cli.link); typed errors become a red line, exit 2."""
    from sciorch.cli.link import open_ops

    async def main() -> T:
        async with open_ops(settings_of(ctx), principal()) as ops:
            return await fn(ops)

    return _run_main(main)


def _run_main(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return guard(lambda: asyncio.run(main()))
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        raise typer.Exit(130) from None


def guard(call: Callable[[], T]) -> T:
    try:
        return call()
    except SciorchError as exc:
        fail(exc.message, exc.field)
    except ValidationError as exc:
        fail_validation(exc)


def build(model: type[BaseModel], **data: Any) -> Any:
    """Build a tool input; invalid values end the command with the field named."""
    return guard(lambda: model.model_validate(data))


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
            fail_validation(exc)
        fail(str(exc), "resources")




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
