"""The run: the tool runner's loop with budgets, confirmations and the transcript."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import mcp.types as mcp_types
from anthropic import AsyncAnthropic, omit
from anthropic.lib.tools import BetaAsyncFunctionTool, ToolError, beta_async_tool
from anthropic.types.beta import BetaMessage, BetaToolUseBlock
from fastmcp import Client

from ground.errors import ERROR_META_KEY, SciorchError
from sciorch.agent.models import (
    PLAYBOOK_TOOL,
    AgentConfig,
    AgentError,
    AgentResult,
    CallStatus,
    Confirm,
    OnEvent,
    StoppedReason,
    ToolCallRecord,
    Transcript,
    TurnRecord,
    Usage,
    now,
)
from sciorch.agent.prompts import (
    build_system,
    choose_prompt,
    first_message,
    list_prompts,
    render_prompt,
)
from sciorch.agent.tools import McpTool, collect_evidence, describe_tools, result_text, select_tools


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


def default_transcript_path(home: Path, goal: str) -> Path:
    """$SCIORCH_HOME/agent/<UTC time>-<goal words>.json"""
    slug = "-".join(re.findall(r"[a-z0-9]+", goal.lower())[:6])[:48] or "run"
    stamp = now().strftime("%Y%m%dT%H%M%SZ")
    return home / "agent" / f"{stamp}-{slug}.json"
