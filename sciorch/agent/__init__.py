"""Claude drives sciorch: an agent runner over the MCP tools, with the anthropic SDK's tool runner.

`run_agent(goal, client, anthropic, config)` lists the MCP server's tools and prompts, offers the
tools to Claude as `beta_async_tool` wrappers whose calls go through the fastmcp client (so
task-capable tools such as wait_entry work, and progress is followed), and lets
`anthropic.beta.messages.tool_runner(...)` run the conversation until Claude answers.

Guard rails, all in `AgentConfig`:
- `max_steps`: how many model turns (Messages API requests) at most.
- `max_tokens_total` / `max_cost_usd`: checked after every turn from the reported usage; a run
  that crosses one stops before the tools of that turn run (so it may overshoot by one turn).
  Cost uses `PRICES_PER_MTOK` (below) unless `price_per_mtok` is given.
- `read_only`: only tools annotated readOnlyHint are offered; anything else is refused.
- `dry_run`: only the read-only discovery tools (list_*) are offered and Claude is asked for a
  plan, which becomes the answer; nothing is launched, submitted or cancelled.
- destructive tools (destructiveHint true, or unannotated tools that are not read-only, as the
  MCP specification says) run only after `confirm(tool, arguments)` says yes, unless `yes`.
- every model turn and tool call goes to a JSON transcript (`transcript_path`), rewritten after
  each step and at the end, also when the run fails.

The MCP client comes from `mcp_server.connect.connect(...)`: in-process over an engine on
$SCIORCH_HOME, or a remote server (`http://host:8765/mcp`) with a bearer token.

Modules: `models` (config, usage, records, transcript), `tools` (MCP tools offered to Claude),
`prompts` (playbooks and the system prompt), `run` (the run itself).
"""

from mcp_server.connect import connect
from sciorch.agent.models import (
    DEFAULT_MODEL,
    MODEL_ENV,
    PRICES_PER_MTOK,
    AgentConfig,
    AgentError,
    AgentResult,
    Evidence,
    ToolCallRecord,
    Transcript,
    TurnRecord,
    Usage,
    price_for,
)
from sciorch.agent.prompts import choose_prompt
from sciorch.agent.run import default_transcript_path, run_agent

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ENV",
    "PRICES_PER_MTOK",
    "AgentConfig",
    "AgentError",
    "AgentResult",
    "Evidence",
    "ToolCallRecord",
    "Transcript",
    "TurnRecord",
    "Usage",
    "choose_prompt",
    "connect",
    "default_transcript_path",
    "price_for",
    "run_agent",
]
