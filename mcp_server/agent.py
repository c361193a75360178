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

`connect(...)` opens the MCP client: in-process over an engine on $SCIORCH_HOME, or a remote
server (`http://host:8765/mcp`) with a bearer token.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import mcp.types as mcp_types
from anthropic import AsyncAnthropic, omit
from anthropic.lib.tools import BetaAsyncFunctionTool, ToolError, beta_async_tool
from anthropic.types.beta import BetaMessage, BetaToolUseBlock, BetaUsage
from fastmcp import Client
from fastmcp.client.auth import BearerAuth
from pydantic import BaseModel, ConfigDict, Field

from ground.config import Settings
from ground.errors import ERROR_META_KEY, SciorchError
from ground.models import Principal

DEFAULT_MODEL = "claude-sonnet-5-5"
MODEL_ENV = "SCIORCH_AGENT_MODEL"

# USD per million tokens (input, output): Anthropic's list prices for each model family when this
# was written (Opus 4.5 and later 5/25, Sonnet 3/15, Haiku 4.5 and later 1/5). A model is priced
# by the family named in its id; an id naming no known family (or a family priced differently
# later) uses UNKNOWN_MODEL_PRICE, the highest Claude list price, so that the cost cap errs on
# the side of stopping early. Cache writes cost 1.25x input, cache reads 0.1x input. Pass
# AgentConfig.price_per_mtok for exact figures.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "opus": (5.0, 25.0),
    "sonnet": (3.0, 15.0),
    "haiku": (1.0, 5.0),
}
UNKNOWN_MODEL_PRICE = (15.0, 75.0)
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1

# The tools dry-run offers: read-only ones whose name starts with one of these (list_services,
# list_sites, list_events, ...): enough to plan against the catalogue and the sites.
DISCOVERY_PREFIXES = ("list_",)
PLAYBOOK_TOOL = "get_playbook"
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

StoppedReason = Literal["done", "step_budget", "token_budget", "cost_budget", "refused"]
CallStatus = Literal["running", "ok", "error", "refused", "declined", "not_run"]
Confirm = Callable[[str, dict[str, Any]], bool | Awaitable[bool]]
OnEvent = Callable[[str, dict[str, Any]], None]


class AgentError(Exception):
    """A run that cannot start: an unknown prompt, a missing prompt argument, no token."""


def now() -> datetime:
    return datetime.now(UTC)


def price_for(model: str) -> tuple[float, float]:
    lowered = model.lower()
    for family, price in PRICES_PER_MTOK.items():
        if family in lowered:
            return price
    return UNKNOWN_MODEL_PRICE


# ================================================================================ models


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        default_factory=lambda: os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
        description=f"Claude model id (default ${MODEL_ENV}, else {DEFAULT_MODEL})",
    )
    max_steps: int = Field(30, ge=1, le=1000, description="model turns at most")
    max_tokens_total: int | None = Field(
        500_000, ge=1, description="input + output tokens over the run (None: no cap)"
    )
    max_cost_usd: float | None = Field(5.0, gt=0, description="estimated cost cap (None: no cap)")
    max_tokens_per_turn: int = Field(8192, ge=1, le=128_000, description="max_tokens per request")
    read_only: bool = False
    dry_run: bool = False
    yes: bool = Field(False, description="run destructive tools without asking")
    prompt: str | None = Field(None, description="render this MCP prompt as the playbook")
    transcript_path: Path | None = None
    system: str | None = Field(None, description="extra instructions after the built-in ones")
    tool_timeout_s: float = Field(900.0, gt=0, description="client timeout of one tool call")
    max_result_chars: int = Field(60_000, ge=1000, description="longer tool results are cut")
    price_per_mtok: tuple[float, float] | None = Field(
        None, description="(input, output) USD per million tokens; default from the model id"
    )
    threads: bool = Field(True, description="let the SDK use server-side message threads")

    def price(self) -> tuple[float, float]:
        return self.price_per_mtok or price_for(self.model)


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
        )

    @classmethod
    def of(cls, usage: BetaUsage) -> Usage:
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
            cache_read_input_tokens=usage.cache_read_input_tokens or 0,
        )

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens

    def cost_usd(self, price: tuple[float, float]) -> float:
        price_in, price_out = price
        tokens_in = (
            self.input_tokens
            + CACHE_WRITE_FACTOR * self.cache_creation_input_tokens
            + CACHE_READ_FACTOR * self.cache_read_input_tokens
        )
        return (tokens_in * price_in + self.output_tokens * price_out) / 1_000_000


class ToolCallRecord(BaseModel):
    step: int
    tool_use_id: str | None
    name: str
    arguments: dict[str, Any]
    status: CallStatus
    result: Any = None
    error: str | None = None
    error_data: dict[str, Any] | None = Field(
        None, description="a refused call's typed error as the server sent it: code, message, field"
    )
    progress: list[str] = Field(default_factory=list)
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None


class TurnRecord(BaseModel):
    step: int
    message_id: str
    at: datetime
    model: str
    stop_reason: str | None
    usage: Usage
    text: str
    tool_uses: list[dict[str, Any]]


class Evidence(BaseModel):
    """Ids and links seen in tool results: what the answer can be checked against."""

    entry_ids: list[str] = Field(default_factory=list)
    event_ids: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)


class AgentResult(BaseModel):
    goal: str
    answer: str
    stopped_reason: StoppedReason
    final_stop_reason: str | None
    steps: int
    tool_calls: list[ToolCallRecord]
    usage: Usage
    cost_usd: float
    model: str
    dry_run: bool
    prompt_used: str | None
    evidence: Evidence
    transcript_path: Path | None


class Transcript(BaseModel):
    """The audit record of one run, as written to `transcript_path`."""

    version: int = 1
    goal: str
    started_at: datetime
    finished_at: datetime | None = None
    config: dict[str, Any]
    server: dict[str, Any] = Field(default_factory=dict)
    tools_offered: list[str] = Field(default_factory=list)
    tools_withheld: dict[str, str] = Field(default_factory=dict)
    prompts_available: list[str] = Field(default_factory=list)
    prompt_used: dict[str, Any] | None = None
    system: str = ""
    first_message: str = ""
    turns: list[TurnRecord] = Field(default_factory=list)
    tool_calls: list[ToolCallRecord] = Field(default_factory=list)
    answer: str | None = None
    stopped_reason: StoppedReason | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    evidence: Evidence = Field(default_factory=Evidence)
    error: str | None = None

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)


# ================================================================================ tools


class McpTool(BaseModel):
    """One MCP tool as the agent sees it."""

    name: str
    api_name: str  # the name Claude sees (MCP names may hold characters the API refuses)
    description: str
    input_schema: dict[str, Any]
    read_only: bool
    destructive: bool


def describe_tools(tools: Sequence[mcp_types.Tool]) -> list[McpTool]:
    """MCP tools with their hints. Per the MCP specification an unannotated tool is neither
    read-only nor safe: destructiveHint defaults to true for tools that are not read-only."""
    out: list[McpTool] = []
    taken: set[str] = set()
    for tool in tools:
        ann = tool.annotations
        read_only = bool(ann and ann.read_only_hint)
        destructive = not read_only and (
            ann is None or ann.destructive_hint is None or bool(ann.destructive_hint)
        )
        api_name = tool.name if TOOL_NAME.match(tool.name) else _api_name(tool.name)
        while api_name in taken:
            api_name = f"{api_name[:120]}_{len(taken)}"
        taken.add(api_name)
        schema = dict(tool.input_schema or {})
        schema.setdefault("type", "object")
        out.append(
            McpTool(
                name=tool.name,
                api_name=api_name,
                description=(tool.description or tool.title or tool.name).strip(),
                input_schema=schema,
                read_only=read_only,
                destructive=destructive,
            )
        )
    return out


def _api_name(name: str) -> str:
    return (re.sub(r"[^a-zA-Z0-9_-]", "_", name) or "tool")[:128]


def select_tools(
    tools: Sequence[McpTool], config: AgentConfig
) -> tuple[list[McpTool], dict[str, str]]:
    """(offered, withheld name -> why) for the run's mode."""
    offered: list[McpTool] = []
    withheld: dict[str, str] = {}
    for tool in tools:
        if config.dry_run and not (tool.read_only and tool.name.startswith(DISCOVERY_PREFIXES)):
            withheld[tool.name] = "dry run: only read-only discovery tools"
        elif config.read_only and not tool.read_only:
            withheld[tool.name] = "read-only run: the tool may change state"
        else:
            offered.append(tool)
    return offered, withheld


def result_text(result: Any) -> str:
    """The text content of an MCP tool result, images and other blocks as placeholders."""
    parts = []
    for block in getattr(result, "content", None) or []:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    return "\n".join(parts)


def collect_evidence(value: Any, evidence: Evidence) -> None:
    """Entry and event ids and access links anywhere in a tool result."""

    def add(items: list[str], item: str) -> None:
        if item not in items:
            items.append(item)

    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                if key in ("id", "entry_id") and item.startswith("ent-"):
                    add(evidence.entry_ids, item)
                elif key in ("id", "event_id") and item.startswith("evt-"):
                    add(evidence.event_ids, item)
                elif key == "access_url" and item.startswith(("http://", "https://")):
                    add(evidence.urls, item)
                elif (
                    key == "url"
                    and item.startswith(("http://", "https://"))
                    and not value.get("access_url")
                ):
                    add(evidence.urls, item)
            else:
                collect_evidence(item, evidence)
    elif isinstance(value, list):
        for item in value:
            collect_evidence(item, evidence)


# ================================================================================ prompts

# When the goal reads like one of these playbooks (and the server offers it), it is rendered and
# put before the goal. Words are matched on the lower-cased goal.
PROMPT_HINTS: dict[str, tuple[tuple[str, ...], ...]] = {
    # every group must have a hit
    "diagnose_entry": (
        ("ent-",),
        ("why", "fail", "diagnos", "stuck", "pending", "expired", "crash", "broke", "error"),
    ),
    "run_gpu_service": (
        ("notebook", "gpu", "jupyter", "web app", "webapp", "dashboard"),
        ("launch", "start", "open", "run", "link", "give me", "spin up"),
    ),
    "steer_experiment": (
        ("maximi", "minimi", "optimi", "best setting", "find the setting", "closed-loop", "steer"),
    ),
}
ENTRY_ID_RE = re.compile(r"\bent-[0-9a-zA-Z]+\b")
BUDGET_RE = re.compile(
    r"\b(\d+)\s+(?:measurements?|points?|runs?|evaluations?|experiments?|jobs?|samples?|shots?)\b"
)
GPUS_RE = re.compile(r"\b(\d+)\s*(?:x\s*)?gpus?\b")
GPU_TYPE_RE = re.compile(r"\b(a100|h100|h200|gh200|v100|a40|l40s?|mi250x?|mi300x?)\b")


def prompt_arguments(prompt: mcp_types.Prompt, goal: str) -> dict[str, str]:
    """Values for a prompt's arguments read from the goal; what is not found is left out."""
    lowered = goal.lower()
    found: dict[str, str] = {}
    for arg in prompt.arguments or []:
        value: str | None = None
        if arg.name == "goal":
            value = goal
        elif arg.name == "entry_id":
            match = ENTRY_ID_RE.search(goal)
            value = match.group(0) if match else None
        elif arg.name == "budget":
            match = BUDGET_RE.search(lowered)
            value = match.group(1) if match else None
        elif arg.name == "gpus":
            match = GPUS_RE.search(lowered)
            value = match.group(1) if match else None
        elif arg.name == "gpu_type":
            match = GPU_TYPE_RE.search(lowered)
            value = match.group(1) if match else None
        if value is not None:
            found[arg.name] = value
    return found


def missing_arguments(prompt: mcp_types.Prompt, values: dict[str, str]) -> list[str]:
    return [a.name for a in prompt.arguments or [] if a.required and a.name not in values]


def choose_prompt(
    goal: str, prompts: Sequence[mcp_types.Prompt], wanted: str | None
) -> tuple[mcp_types.Prompt, dict[str, str]] | None:
    """The playbook for this goal: `wanted` (an error if unknown or its required arguments are
    not in the goal), else the first hinted prompt the goal matches and can fill."""
    by_name = {p.name: p for p in prompts}
    if wanted:
        prompt = by_name.get(wanted)
        if prompt is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise AgentError(f"unknown prompt {wanted!r}; the server offers: {known}")
        values = prompt_arguments(prompt, goal)
        missing = missing_arguments(prompt, values)
        if missing:
            raise AgentError(
                f"prompt {wanted!r} needs {', '.join(missing)}, which the goal does not name "
                "(e.g. put the entry id in the goal)"
            )
        return prompt, values
    lowered = goal.lower()
    for name, groups in PROMPT_HINTS.items():
        prompt = by_name.get(name)
        if prompt is None:
            continue
        if not all(any(word in lowered for word in group) for group in groups):
            continue
        values = prompt_arguments(prompt, goal)
        if not missing_arguments(prompt, values):
            return prompt, values
    return None


async def render_prompt(client: Client[Any], name: str, arguments: dict[str, str]) -> str:
    result = await client.get_prompt(name, arguments)
    parts = []
    for message in result.messages:
        text = getattr(message.content, "text", None)
        if isinstance(text, str):
            parts.append(text.strip())
    return "\n\n".join(parts)


async def list_prompts(client: Client[Any]) -> list[mcp_types.Prompt]:
    """The server's prompts; none when it offers no prompts capability."""
    try:
        return await client.list_prompts()
    except Exception:  # a server without prompts answers with a JSON-RPC error
        return []


# ================================================================================ system prompt

SYSTEM = """\
You are the sciorch operations agent. sciorch runs jobs and long-running services on scientific \
facilities; you act for the user only through the sciorch tools offered to you.

How to work:
- Discover before acting: read the catalogue (list_services) and the sites (list_sites) before \
you submit or launch, and use the parameter names and bounds the schemas give.
- Follow work to its end: after submit_job or launch_service, call wait_entry until the entry is \
finished (jobs) or ready (services); call it again when it returns timed_out=true.
- When a tool returns an error, read it: it names the failing field and what was expected. Fix \
the call and try again, or explain why you cannot. Do not repeat a failing call unchanged.
- Never invent ids, URLs or numbers: quote them from tool results.
- Tools that cancel or stop work need the user's confirmation. If the user declines, do not \
retry that call; carry on without it or explain what you would have done.
- Finish with a short answer for the user: what you did, what came out, and the evidence: entry \
ids, event ids, URLs (access_url) and the key results. Say plainly if the goal was not met."""

READ_ONLY_NOTE = """\
This run is READ-ONLY: only tools that change nothing are offered. Calls to any other tool are \
refused. If the goal needs changes, say which calls you would make."""

DRY_RUN_NOTE = """\
This is a DRY RUN: do not act. You may call the discovery tools offered to you to check what \
exists. Then answer with a plan: a numbered list of the tool calls you would make, in order, \
with their arguments, what you expect from each and how you would check the outcome. The tools \
you could use in a real run:"""


def build_system(
    config: AgentConfig,
    instructions: str | None,
    prompts: Sequence[mcp_types.Prompt],
    all_tools: Sequence[McpTool],
) -> str:
    parts = [SYSTEM]
    if instructions:
        parts.append("The sciorch server says:\n" + instructions.strip())
    if prompts:
        lines = [
            f"- {p.name}: {(p.description or '').strip()}"
            for p in sorted(prompts, key=lambda p: p.name)
        ]
        parts.append(
            "Playbooks (MCP prompts) you can fetch with the get_playbook tool when the goal "
            "matches one:\n" + "\n".join(lines)
        )
    if config.dry_run:
        lines = []
        for tool in all_tools:
            first = tool.description.split("\n")[0]
            if len(first) > 200:
                first = first[:200].rstrip() + "..."
            lines.append(f"- {tool.name}: {first}")
        parts.append(DRY_RUN_NOTE + "\n" + "\n".join(lines))
    elif config.read_only:
        parts.append(READ_ONLY_NOTE)
    if config.system:
        parts.append(config.system.strip())
    return "\n\n".join(parts)


def first_message(
    goal: str, playbook: str | None, playbook_name: str | None, config: AgentConfig
) -> str:
    parts = []
    if playbook:
        parts.append(f"Playbook ({playbook_name}):\n{playbook}")
    parts.append(f"Goal: {goal.strip()}")
    if config.dry_run:
        parts.append("Dry run: answer with the plan only.")
    return "\n\n".join(parts)


# ================================================================================ the run


class _Run:
    def __init__(
        self,
        goal: str,
        client: Client[Any],
        anthropic: AsyncAnthropic,
        config: AgentConfig,
        confirm: Confirm | None,
        on_event: OnEvent | None,
    ) -> None:
        self.goal = goal
        self.client = client
        self.anthropic = anthropic
        self.config = config
        self.confirm = confirm
        self.on_event = on_event
        self.step = 0
        self.usage = Usage()
        self.pending: deque[BetaToolUseBlock] = deque()
        self.offered: dict[str, McpTool] = {}
        self.prompts: dict[str, mcp_types.Prompt] = {}
        self.doc = Transcript(
            goal=goal,
            started_at=now(),
            config=json.loads(config.model_dump_json()),
        )

    # ---------------------------------------------------------------- bookkeeping

    def emit(self, kind: str, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    def save(self) -> None:
        self.doc.usage = self.usage
        self.doc.cost_usd = round(self.usage.cost_usd(self.config.price()), 6)
        self.doc.save(self.config.transcript_path)

    def claim(self, api_name: str) -> BetaToolUseBlock | None:
        """The tool_use block the runner is running now: the first pending one of that name (the
        runner runs a turn's calls one at a time, in order)."""
        for block in self.pending:
            if block.name == api_name:
                self.pending.remove(block)
                return block
        return None

    def record(
        self, api_name: str, name: str, arguments: dict[str, Any], status: CallStatus
    ) -> ToolCallRecord:
        block = self.claim(api_name)
        rec = ToolCallRecord(
            step=self.step,
            tool_use_id=block.id if block else None,
            name=name,
            arguments=arguments,
            status=status,
            started_at=now(),
        )
        self.doc.tool_calls.append(rec)
        return rec

    def finish_record(
        self,
        rec: ToolCallRecord,
        status: CallStatus,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        rec.status = status
        rec.result = result
        rec.error = error
        rec.finished_at = now()
        rec.duration_s = round((rec.finished_at - rec.started_at).total_seconds(), 3)
        if result is not None:
            collect_evidence(result, self.doc.evidence)
        self.save()
        self.emit("tool_result", record=rec)

    # ---------------------------------------------------------------- tool calls

    async def ask(self, name: str, arguments: dict[str, Any]) -> bool:
        if self.config.yes:
            return True
        if self.confirm is None:
            return False
        answer = self.confirm(name, arguments)
        if inspect.isawaitable(answer):
            answer = await answer
        return bool(answer)

    def timeout_for(self, arguments: dict[str, Any]) -> float:
        wait = arguments.get("timeout_seconds")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0:
            return max(self.config.tool_timeout_s, float(wait) + 60.0)
        return self.config.tool_timeout_s

    async def call_mcp(self, tool: McpTool, arguments: dict[str, Any]) -> str:
        rec = self.record(tool.api_name, tool.name, arguments, "running")
        self.save()
        self.emit("tool_call", record=rec)
        if tool.api_name not in self.offered:
            why = self.doc.tools_withheld.get(tool.name, "not offered in this run")
            self.finish_record(rec, "refused", error=why)
            raise ToolError(f"refused: {tool.name} is not available ({why})")
        if (self.config.read_only or self.config.dry_run) and not tool.read_only:
            self.finish_record(rec, "refused", error="read-only run")
            raise ToolError(f"refused: {tool.name} may change state and this run is read-only")
        if tool.destructive and not await self.ask(tool.name, arguments):
            self.finish_record(rec, "declined", error="the user declined")
            raise ToolError(
                f"the user declined to run {tool.name} with these arguments; it was not run. "
                "Do not retry it: carry on without it or explain what you would have done."
            )

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            text = message or (f"{progress}/{total}" if total else str(progress))
            rec.progress.append(text[:500])
            self.emit("progress", record=rec, message=text)

        rec.started_at = now()  # the call itself, not the time spent asking the user
        try:
            result = await self.client.call_tool(
                tool.name,
                arguments,
                raise_on_error=False,
                timeout=self.timeout_for(arguments),
                progress_handler=on_progress,
            )
        except Exception as exc:  # transport failure, timeout, protocol error: tell the model
            error = f"the call failed: {type(exc).__name__}: {exc}"
            self.finish_record(rec, "error", error=error)
            raise ToolError(error) from exc
        if result.is_error:
            data = SciorchError.from_dict((result.meta or {}).get(ERROR_META_KEY))
            error = result_text(result) or (data.text() if data else f"{tool.name} failed")
            rec.error_data = data.to_dict() if data else None
            self.finish_record(rec, "error", error=error)
            raise ToolError(error)
        payload: Any = result.structured_content
        if payload is None:
            payload = result_text(result)
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        if len(text) > self.config.max_result_chars:
            cut = self.config.max_result_chars
            text = (
                text[:cut]
                + f"\n[... cut: {len(text) - cut} more characters; ask for less, e.g. a later "
                "offset or a filter]"
            )
        self.finish_record(rec, "ok", result=payload)
        return text

    def mcp_tool(self, tool: McpTool) -> BetaAsyncFunctionTool[Any]:
        async def call(**arguments: Any) -> str:
            return await self.call_mcp(tool, arguments)

        call.__name__ = tool.api_name
        return beta_async_tool(
            call,
            name=tool.api_name,
            description=tool.description,
            input_schema=tool.input_schema,
        )

    def playbook_tool(self) -> BetaAsyncFunctionTool[Any]:
        names = sorted(self.prompts)

        async def get_playbook(name: str, arguments: dict[str, str] | None = None) -> str:
            args = {"name": name, "arguments": arguments or {}}
            rec = self.record(PLAYBOOK_TOOL, PLAYBOOK_TOOL, args, "running")
            self.emit("tool_call", record=rec)
            if name not in self.prompts:
                error = f"unknown playbook {name!r}; known: {', '.join(names)}"
                self.finish_record(rec, "error", error=error)
                raise ToolError(error)
            try:
                text = await render_prompt(self.client, name, dict(arguments or {}))
            except Exception as exc:
                error = f"could not render {name}: {exc}"
                self.finish_record(rec, "error", error=error)
                raise ToolError(error) from exc
            self.finish_record(rec, "ok", result=text)
            return text

        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": names, "description": "the playbook"},
                "arguments": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "its arguments (strings), as listed in the system prompt",
                },
            },
            "required": ["name"],
            "additionalProperties": False,
        }
        lines = []
        for prompt in (self.prompts[n] for n in names):
            args = ", ".join(f"{a.name}{'' if a.required else '?'}" for a in prompt.arguments or [])
            lines.append(f"{prompt.name}({args})")
        return beta_async_tool(
            get_playbook,
            name=PLAYBOOK_TOOL,
            description="Fetch a sciorch playbook (step-by-step instructions for a common goal) "
            "with its arguments filled in. Playbooks: " + "; ".join(lines) + ".",
            input_schema=schema,
        )

    # ---------------------------------------------------------------- the loop

    def turn_record(self, message: BetaMessage) -> TurnRecord:
        text = "\n".join(b.text for b in message.content if b.type == "text").strip()
        uses = [
            {"id": b.id, "name": b.name, "input": b.input}
            for b in message.content
            if b.type == "tool_use"
        ]
        return TurnRecord(
            step=self.step,
            message_id=message.id,
            at=now(),
            model=str(message.model),
            stop_reason=message.stop_reason,
            usage=Usage.of(message.usage),
            text=text,
            tool_uses=uses,
        )

    def over_budget(self) -> StoppedReason | None:
        if self.step >= self.config.max_steps:
            return "step_budget"
        cap = self.config.max_tokens_total
        if cap is not None and self.usage.total >= cap:
            return "token_budget"
        cost = self.usage.cost_usd(self.config.price())
        if self.config.max_cost_usd is not None and cost >= self.config.max_cost_usd:
            return "cost_budget"
        return None

    async def execute(self) -> AgentResult:
        config = self.config
        all_tools = describe_tools(await self.client.list_tools())
        offered, withheld = select_tools(all_tools, config)
        self.offered = {t.api_name: t for t in offered}
        prompts = await list_prompts(self.client)
        self.prompts = {p.name: p for p in prompts}
        chosen = choose_prompt(self.goal, prompts, config.prompt)
        playbook = None
        if chosen is not None:
            prompt, values = chosen
            playbook = await render_prompt(self.client, prompt.name, values)
            self.doc.prompt_used = {"name": prompt.name, "arguments": values}

        system = build_system(config, self.client.instructions, prompts, all_tools)
        user = first_message(self.goal, playbook, chosen[0].name if chosen else None, config)
        server = self.client.server_info
        self.doc.server = {
            "name": server.name if server else None,
            "version": server.version if server else None,
            "protocol": self.client.protocol_version,
        }
        self.doc.tools_offered = [t.name for t in offered]
        self.doc.tools_withheld = withheld
        self.doc.prompts_available = sorted(self.prompts)
        self.doc.system = system
        self.doc.first_message = user
        self.save()
        self.emit(
            "start",
            tools=self.doc.tools_offered,
            withheld=withheld,
            prompt=self.doc.prompt_used,
        )

        tools: list[BetaAsyncFunctionTool[Any]] = [self.mcp_tool(t) for t in offered]
        if self.prompts and PLAYBOOK_TOOL not in self.offered:
            tools.append(self.playbook_tool())
        runnable = {t.name for t in tools}

        runner = self.anthropic.beta.messages.tool_runner(
            model=config.model,
            max_tokens=config.max_tokens_per_turn,
            system=system,
            messages=[{"role": "user", "content": user}],
            tools=tools,
            max_iterations=config.max_steps,
            thread=omit if config.threads else False,
        )
        stopped: StoppedReason | None = None
        final: BetaMessage | None = None
        try:
            with warnings.catch_warnings():
                # A call to a tool that is not offered gets an error result from the runner
                # ("not found"); it is recorded below as refused, so the SDK's warning is noise.
                warnings.filterwarnings(
                    "ignore", message=r"Tool '.*' not found in tool runner", category=UserWarning
                )
                async for message in runner:
                    self.step += 1
                    final = message
                    turn = self.turn_record(message)
                    self.usage.add(turn.usage)
                    self.doc.turns.append(turn)
                    uses = [b for b in message.content if b.type == "tool_use"]
                    self.pending = deque(b for b in uses if b.name in runnable)
                    self.emit("turn", turn=turn)
                    if message.stop_reason == "tool_use" and uses:
                        reason = self.over_budget()
                        if reason is not None:
                            stopped = reason
                            for block in uses:
                                self.not_run(block, f"not run: {reason.replace('_', ' ')}")
                            self.save()
                            break
                        for block in uses:
                            if block.name not in runnable:
                                self.refuse_unknown(block)
                    self.save()
        finally:
            await runner.close()

        if stopped is None:
            stop_reason = final.stop_reason if final else None
            if stop_reason == "refusal":
                stopped = "refused"
            elif stop_reason in ("tool_use", "pause_turn"):
                stopped = "step_budget"  # the runner's max_iterations ended it
            else:
                stopped = "done"
        answer = ""
        if final is not None:
            answer = "\n".join(b.text for b in final.content if b.type == "text").strip()
        self.doc.answer = answer
        self.doc.stopped_reason = stopped
        self.doc.finished_at = now()
        self.save()
        result = AgentResult(
            goal=self.goal,
            answer=answer,
            stopped_reason=stopped,
            final_stop_reason=final.stop_reason if final else None,
            steps=self.step,
            tool_calls=list(self.doc.tool_calls),
            usage=self.usage,
            cost_usd=self.doc.cost_usd,
            model=config.model,
            dry_run=config.dry_run,
            prompt_used=(self.doc.prompt_used or {}).get("name"),
            evidence=self.doc.evidence,
            transcript_path=config.transcript_path,
        )
        self.emit("done", result=result)
        return result

    def not_run(self, block: BetaToolUseBlock, why: str) -> None:
        rec = ToolCallRecord(
            step=self.step,
            tool_use_id=block.id,
            name=self._mcp_name(block.name),
            arguments=dict(block.input) if isinstance(block.input, dict) else {},
            status="not_run",
            error=why,
            started_at=now(),
        )
        self.doc.tool_calls.append(rec)
        self.emit("tool_result", record=rec)

    def refuse_unknown(self, block: BetaToolUseBlock) -> None:
        name = self._mcp_name(block.name)
        why = self.doc.tools_withheld.get(name, "no such tool")
        rec = ToolCallRecord(
            step=self.step,
            tool_use_id=block.id,
            name=name,
            arguments=dict(block.input) if isinstance(block.input, dict) else {},
            status="refused",
            error=f"not offered: {why}",
            started_at=now(),
        )
        rec.finished_at = rec.started_at
        rec.duration_s = 0.0
        self.doc.tool_calls.append(rec)
        self.emit("tool_result", record=rec)

    def _mcp_name(self, api_name: str) -> str:
        tool = self.offered.get(api_name)
        return tool.name if tool else api_name


async def run_agent(
    goal: str,
    client: Client[Any],
    anthropic: AsyncAnthropic,
    config: AgentConfig | None = None,
    confirm: Confirm | None = None,
    on_event: OnEvent | None = None,
) -> AgentResult:
    """Let Claude work toward `goal` with the MCP tools of `client` (connected).

    `confirm(tool, arguments)` (sync or async) is asked before each destructive call unless
    `config.yes`; without it such calls are declined. `on_event(kind, data)` hears about the
    run as it goes: start, turn, tool_call, progress, tool_result, done. The transcript is
    written also when the run fails; the exception is raised again.
    """
    if not goal.strip():
        raise AgentError("the goal is empty")
    run = _Run(goal, client, anthropic, config or AgentConfig(), confirm, on_event)
    try:
        return await run.execute()
    except BaseException as exc:
        run.doc.error = f"{type(exc).__name__}: {exc}"
        run.doc.finished_at = now()
        with contextlib.suppress(Exception):
            run.save()
        raise


# ================================================================================ connections


@contextlib.asynccontextmanager
async def connect(
    *,
    url: str | None = None,
    token: str | None = None,
    settings: Settings | None = None,
    principal: Principal | None = None,
    read_only: bool = False,
) -> AsyncIterator[Client[Any]]:
    """A connected MCP client: to the server at `url` with a bearer `token`, or to an in-process
    server over an engine opened on `settings` (default: $SCIORCH_HOME), acting as `principal`
    (default: the local user). `read_only` makes the in-process server offer only read-only
    tools, so the run cannot change anything even through a mistake in the runner."""
    if url:
        if not token:
            raise AgentError(
                "a remote server needs a bearer token: pass --token or set $SCIORCH_TOKEN "
                "(on the server: sciorch token create --sub NAME --scopes submit)"
            )
        async with Client(url, auth=BearerAuth(token)) as client:
            yield client
        return

    from ground.config import default_home, load_settings
    from mcp_server.server import create_server, local_principal
    from orchestrator.engine import Engine

    engine = await Engine.open(settings or load_settings(default_home()))
    try:
        server = create_server(
            engine, principal=principal or local_principal(), read_only=read_only
        )
        async with Client(server) as client:
            yield client
    finally:
        await engine.close()


def default_transcript_path(home: Path, goal: str) -> Path:
    """$SCIORCH_HOME/agent/<UTC time>-<goal words>.json"""
    slug = "-".join(re.findall(r"[a-z0-9]+", goal.lower())[:6])[:48] or "run"
    stamp = now().strftime("%Y%m%dT%H%M%SZ")
    return home / "agent" / f"{stamp}-{slug}.json"
