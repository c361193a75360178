"""The `sciorch` command: human mirrors of the typed tools, plus `serve`, `steer`, `demo`,
`agent` and `flow`.

Each command parses its arguments, builds the tool's pydantic input, calls the tool and renders
the answer: on the `sciorch serve` running on $SCIORCH_HOME if there is one (as an MCP tool
call), else on an engine opened in this process (it holds the lock on $SCIORCH_HOME while the
command runs and re-adopts what earlier commands started); see `link`. No business logic lives
here.
`app` holds the plumbing every command shares, `render` the tables; each other module is one
area of commands, registered on `app` when imported here."""

# Each area registers its commands on `app` when imported: in this order `sciorch --help` lists
# them.
# isort: off
from sciorch.cli.app import app
from sciorch.cli import serve, catalogue, entries, sweeps, fetch, events, steer, agent, campaign
from sciorch.cli import flow, search

# isort: on

__all__ = [
    "agent",
    "app",
    "campaign",
    "catalogue",
    "entries",
    "events",
    "fetch",
    "flow",
    "main",
    "search",
    "serve",
    "steer",
    "sweeps",
]


def main() -> None:
    app()

