"""A scripted Anthropic Messages API: the test double for Claude.

It speaks the wire protocol the installed `anthropic` client speaks (POST /v1/messages, the
`message` response object with content blocks, stop_reason and usage, `invalid_request_error`
bodies, and the SDK's server-side message threads: `thread: {"type": "create"}` with the full
history, then `{"type": "continue", "previous_message_id": ...}` with only the new messages) and
replays scripted assistant turns. Every request is checked the way the real API would refuse it
(roles alternate, every tool_use is answered by a tool_result with its id in the next user
message, tool definitions are well formed) and recorded, so tests can assert what the model saw.

Use it in-process (`api.client()`: the real AsyncAnthropic over an httpx2 MockTransport) or over
real HTTP (`api.app()` is a Starlette app to serve with uvicorn; point ANTHROPIC_BASE_URL at it).

A script is a list of turns; each is a `Reply` or a function of the `Conversation` so far that
returns one (to use an entry id from an earlier tool result):

    api = ScriptedMessagesAPI([
        call("list_services"),
        call("submit_job", {"service": "sim-instrument"}),
        lambda c: call("wait_entry", {"entry_id": c.json("submit_job")["id"]}),
        lambda c: say(f"done: {c.json('submit_job')['id']}"),
    ])
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
from anthropic import AsyncAnthropic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

THREADS_BETA = "message-threads-2026-08-12"
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

Block = dict[str, Any]


@dataclass
class Reply:
    """One scripted assistant turn. stop_reason defaults to tool_use when it calls tools."""

    content: list[Block]
    stop_reason: str | None = None
    input_tokens: int = 1000
    output_tokens: int = 100


def text(value: str) -> Block:
    return {"type": "text", "text": value}


def tool_use(name: str, input: dict[str, Any] | None = None) -> Block:
    """A tool call; the API gives it its id when it is served."""
    return {"type": "tool_use", "name": name, "input": dict(input or {})}


def say(value: str, *, input_tokens: int = 1000, output_tokens: int = 100) -> Reply:
    """A final answer."""
    return Reply([text(value)], None, input_tokens, output_tokens)


def call(
    name: str,
    input: dict[str, Any] | None = None,
    *,
    note: str | None = None,
    input_tokens: int = 1000,
    output_tokens: int = 100,
) -> Reply:
    """One tool call, after an optional line of text."""
    blocks = [text(note)] if note else []
    return Reply([*blocks, tool_use(name, input)], None, input_tokens, output_tokens)


def calls(*uses: Block, note: str | None = None) -> Reply:
    """Several tool calls in one turn (parallel tool use)."""
    blocks = [text(note)] if note else []
    return Reply([*blocks, *uses])


Turn = Reply | Callable[["Conversation"], Reply]


@dataclass
class ToolResult:
    tool_use_id: str
    name: str
    input: dict[str, Any]
    content: str
    is_error: bool


@dataclass
class Conversation:
    """One request as the model sees it: the whole history (threads resolved), the system prompt
    and the tools offered."""

    body: dict[str, Any]
    headers: dict[str, str]
    system: str
    tools: list[dict[str, Any]]
    messages: list[dict[str, Any]]

    @property
    def tool_names(self) -> list[str]:
        return [t["name"] for t in self.tools]

    def tool(self, name: str) -> dict[str, Any]:
        return next(t for t in self.tools if t["name"] == name)

    @property
    def first_user_text(self) -> str:
        return block_text(self.messages[0]["content"])

    def results(self, name: str | None = None) -> list[ToolResult]:
        """Every tool result so far, paired with its call, oldest first."""
        uses: dict[str, Block] = {}
        out: list[ToolResult] = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                continue
            for block in content:
                if block.get("type") == "tool_use":
                    uses[block["id"]] = block
                elif block.get("type") == "tool_result":
                    use = uses[block["tool_use_id"]]
                    out.append(
                        ToolResult(
                            tool_use_id=block["tool_use_id"],
                            name=use["name"],
                            input=use.get("input") or {},
                            content=block_text(block.get("content")),
                            is_error=bool(block.get("is_error")),
                        )
                    )
        return [r for r in out if name is None or r.name == name]

    def last(self, name: str | None = None) -> ToolResult:
        found = self.results(name)
        assert found, f"no result of {name or 'any tool'} yet"
        return found[-1]

    def json(self, name: str) -> Any:
        """The last successful result of tool `name`, parsed."""
        ok = [r for r in self.results(name) if not r.is_error]
        assert ok, f"no successful result of {name} yet: {self.results(name)}"
        return json.loads(ok[-1].content)


def block_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(b.get("text", f"[{b.get('type')}]")) for b in content)


class ProtocolError(Exception):
    def __init__(self, message: str, status: int = 400, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class ScriptedMessagesAPI:
    def __init__(self, script: Sequence[Turn], *, model: str | None = None) -> None:
        self.script = list(script)
        self.model = model
        self.requests: list[Conversation] = []
        self.problems: list[str] = []
        self.served: list[dict[str, Any]] = []
        self._threads: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ transports

    def transport(self) -> httpx2.MockTransport:
        def handler(request: httpx2.Request) -> httpx2.Response:
            status, body = self.handle(
                request.method, request.url.path, dict(request.headers), request.content
            )
            return httpx2.Response(
                status, json=body, headers={"request-id": f"req_{len(self.requests)}"}
            )

        return httpx2.MockTransport(handler)

    def client(self, **kwargs: Any) -> AsyncAnthropic:
        """The real AsyncAnthropic client, talking to this API in-process."""
        return AsyncAnthropic(
            api_key="test-key",
            base_url="http://scripted-messages.test",
            http_client=httpx2.AsyncClient(transport=self.transport()),
            max_retries=0,
            **kwargs,
        )

    def app(self) -> Starlette:
        async def messages(request: Request) -> JSONResponse:
            status, body = self.handle(
                request.method, request.url.path, dict(request.headers), await request.body()
            )
            return JSONResponse(body, status_code=status)

        return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])

    # ------------------------------------------------------------------ the API

    @property
    def remaining(self) -> int:
        return len(self.script)

    def check(self) -> None:
        """No request was refused and the whole script was played."""
        assert not self.problems, self.problems
        assert not self.script, f"{len(self.script)} scripted turn(s) never requested"

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        try:
            if method != "POST" or path.rstrip("/") != "/v1/messages":
                raise ProtocolError(f"{method} {path}: not found", 404)
            conversation = self.parse(headers, raw)
            self.requests.append(conversation)
            return 200, self.reply(conversation)
        except ProtocolError as exc:
            self.problems.append(str(exc))
            error: dict[str, Any] = {
                "type": "not_found_error" if exc.status == 404 else "invalid_request_error",
                "message": str(exc),
            }
            if exc.error_code:
                error["details"] = {"error_code": exc.error_code}
            return exc.status, {"type": "error", "error": error}

    def parse(self, headers: dict[str, str], raw: bytes) -> Conversation:
        lowered = {k.lower(): v for k, v in headers.items()}
        if not lowered.get("x-api-key") and not lowered.get("authorization"):
            raise ProtocolError("x-api-key header is required", 401)
        if not lowered.get("anthropic-version"):
            raise ProtocolError("anthropic-version header is required")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"body is not JSON: {exc}") from exc
        for key in ("model", "max_tokens", "messages"):
            if key not in body:
                raise ProtocolError(f"{key}: field required")
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            raise ProtocolError("max_tokens: must be a positive integer")
        if self.model is not None and body["model"] != self.model:
            raise ProtocolError(f"model: expected {self.model!r}, got {body['model']!r}")

        thread = body.get("thread")
        betas = lowered.get("anthropic-beta", "")
        history: list[dict[str, Any]] = []
        if thread is None:
            system, tools = body.get("system", ""), body.get("tools", [])
        else:
            if THREADS_BETA not in betas:
                raise ProtocolError(f"thread needs the {THREADS_BETA} beta")
            if thread.get("type") == "create":
                system, tools = body.get("system", ""), body.get("tools", [])
            elif thread.get("type") == "continue":
                if "system" in body or "tools" in body:
                    raise ProtocolError("system and tools cannot be changed on a thread")
                stored = self._threads.get(thread.get("previous_message_id", ""))
                if stored is None:
                    raise ProtocolError("thread not found", 404, "thread_not_found")
                if stored.get("continued"):
                    raise ProtocolError("thread already continued", 409, "thread_already_continued")
                stored["continued"] = True
                system, tools, history = stored["system"], stored["tools"], list(stored["messages"])
            else:
                raise ProtocolError(f"thread.type: unknown {thread.get('type')!r}")
        messages = [*history, *body["messages"]]
        self.validate_tools(tools)
        self.validate_messages(messages)
        if isinstance(system, list):
            system = block_text(system)
        return Conversation(
            body=body, headers=lowered, system=system, tools=tools, messages=messages
        )

    def validate_tools(self, tools: list[dict[str, Any]]) -> None:
        seen: set[str] = set()
        for i, tool in enumerate(tools):
            name = tool.get("name")
            if not isinstance(name, str) or not TOOL_NAME.match(name):
                raise ProtocolError(f"tools.{i}.name: {name!r} does not match {TOOL_NAME.pattern}")
            if name in seen:
                raise ProtocolError(f"tools: tool names must be unique ({name})")
            seen.add(name)
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise ProtocolError(f"tools.{i}.input_schema: type must be 'object'")
            if "description" in tool and not isinstance(tool["description"], str):
                raise ProtocolError(f"tools.{i}.description: must be a string")

    def validate_messages(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            raise ProtocolError("messages: at least one message is required")
        issued = {u["id"] for s in self.served for u in s["content"] if u["type"] == "tool_use"}
        expected_results: list[str] | None = None
        for i, message in enumerate(messages):
            role = message.get("role")
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                raise ProtocolError(
                    f"messages.{i}.role: expected {want!r} (roles must alternate, user first), "
                    f"got {role!r}"
                )
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not blocks:
                raise ProtocolError(f"messages.{i}.content: must be a string or non-empty list")
            if role == "user":
                results = [b for b in blocks if b.get("type") == "tool_result"]
                ids = [b.get("tool_use_id") for b in results]
                if expected_results is not None:
                    if blocks[: len(expected_results)] != results[: len(expected_results)]:
                        raise ProtocolError(
                            f"messages.{i}: tool_result blocks must come first in the content"
                        )
                    if sorted(map(str, ids)) != sorted(expected_results):
                        raise ProtocolError(
                            f"messages.{i}: tool_use ids {expected_results} were not answered by "
                            f"tool_result blocks with those ids (got {ids})"
                        )
                elif results:
                    raise ProtocolError(
                        f"messages.{i}: tool_result blocks without a preceding tool_use"
                    )
                for b in results:
                    content_ = b.get("content")
                    if content_ is not None and not isinstance(content_, str | list):
                        raise ProtocolError(f"messages.{i}: tool_result content must be text")
                expected_results = None
            else:
                uses = [b for b in blocks if b.get("type") == "tool_use"]
                for b in uses:
                    if b.get("id") not in issued:
                        raise ProtocolError(
                            f"messages.{i}: tool_use id {b.get('id')} was never issued"
                        )
                expected_results = [b["id"] for b in uses] or None
        if messages[-1]["role"] != "user":
            raise ProtocolError("the last message must be from the user")

    def reply(self, conversation: Conversation) -> dict[str, Any]:
        if not self.script:
            raise ProtocolError(
                "the script has no more turns (the agent asked once too often)", 500
            )
        turn = self.script.pop(0)
        reply = turn(conversation) if callable(turn) else turn
        n = next(self._ids)
        content: list[Block] = []
        for k, block in enumerate(reply.content):
            block = dict(block)
            if block["type"] == "tool_use" and "id" not in block:
                block["id"] = f"toolu_{n:04d}{k:02d}scripted000000000000"
            content.append(block)
        has_tools = any(b["type"] == "tool_use" for b in content)
        message = {
            "id": f"msg_scripted_{n:04d}",
            "type": "message",
            "role": "assistant",
            "model": conversation.body["model"],
            "content": content,
            "stop_reason": reply.stop_reason or ("tool_use" if has_tools else "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        self.served.append(message)
        self._threads[message["id"]] = {
            "system": conversation.system,
            "tools": conversation.tools,
            "messages": [*conversation.messages, {"role": "assistant", "content": content}],
        }
        return message
