"""Shared pieces of the MCP tests: the HTTP server (MCP at /mcp with bearer-token auth, the
per-entry proxy, /healthz) run by uvicorn in the test's event loop on a free port, tokens, the
official `mcp` SDK client over streamable HTTP, and checks on tool results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import jwt
import mcp
import pytest
import pytest_asyncio
import uvicorn
from fastmcp import FastMCP
from fastmcp_tasks import call_tool_task
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated

from mcp_server.auth import AUDIENCE, ISSUER, PRIVATE, create_token, verifier
from mcp_server.server import bearer_reader, create_server
from mcp_server.toolset import TOOLS
from mcp_server.transport import mcp_mount
from orchestrator.engine import Engine
from sciorch.web.app import create_http_app
from tests.conftest import make_settings, shutdown

os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

CURRENT = "2026-07-28"  # the MCP protocol version current clients negotiate

# The error codes tool errors start with ("code: message [field: x]").
ERROR_CODES = (
    "invalid_input",
    "invalid_parameters",
    "unknown_service",
    "not_found",
    "not_allowed",
    "account_not_mapped",
    "conflict",
    "limit_exceeded",
    "no_site",
    "invalid_transition",
    "backend_error",
    "rate_limited",
)
ERROR_LINE = re.compile(r"^(" + "|".join(ERROR_CODES) + r"): \S")
TRACEBACK_MARKS = ("Traceback (most recent call last)", 'File "', "site-packages", '.py", line')


CORE_TOOLS = {s.name for s in TOOLS}
CORE_READ_TOOLS = {s.name for s in TOOLS if s.read_only}

# A raw initialize request (a legacy protocol version) and the headers streamable HTTP wants.
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def core(names: Iterable[str]) -> set[str]:
    """The tools of the TOOLS table among `names`. Other tools (the steering ones) are
    registered by their own modules and tested there; these tests check them generically."""
    return {n for n in names if n in CORE_TOOLS}


def assert_only_read_only(tools: Iterable[Any]) -> None:
    """Every listed tool says it changes nothing (the read scope, the --read-only switch)."""
    for tool in tools:
        hints = tool.annotations
        assert hints is not None and hints.read_only_hint is True, tool.name


def text_of(result: Any) -> str:
    """All text content of a tool result (fastmcp or SDK CallToolResult)."""
    return "\n".join(getattr(c, "text", "") for c in result.content)


def structured(result: Any) -> dict[str, Any]:
    """Structured content of a tool result (fastmcp or SDK CallToolResult)."""
    data = getattr(result, "structured_content", None)
    assert isinstance(data, dict), f"no structured content: {result!r}"
    return data


async def submit_sim(client: Any, **parameters: Any) -> dict[str, Any]:
    """A sim-instrument job with these parameters, submitted through `client` (a FastMCP or an
    SDK client): the entry as submit_job returned it."""
    args = {"service": "sim-instrument", "parameters": parameters}
    return structured(await client.call_tool("submit_job", args))


async def wait_entry(client: Any, entry_id: str, timeout_s: float) -> dict[str, Any]:
    """wait_entry as a plain call: what it returned."""
    args = {"entry_id": entry_id, "timeout_seconds": timeout_s}
    return structured(await client.call_tool("wait_entry", args))


async def wait_task(client: Any, entry_id: str, timeout_s: float) -> Any:
    """wait_entry as a task: the task, running."""
    args = {"entry_id": entry_id, "timeout_seconds": timeout_s}
    return await call_tool_task(client, "wait_entry", args)


async def updates_until_succeeded(client: Any, sub: AsyncIterable[Any], base: str) -> list[str]:
    """As a listening client does: refetch the entry at `base` whenever it changes, until it has
    succeeded; the URIs of the updates heard, in order (each must be a ResourceUpdated)."""
    got: list[str] = []
    async for event in sub:
        assert isinstance(event, ResourceUpdated)
        got.append(event.uri)
        if event.uri == base:
            read = await client.read_resource(base)
            if json.loads(read.contents[0].text)["state"] == "succeeded":
                break
    return got


def assert_no_traceback(text: str) -> None:
    for mark in TRACEBACK_MARKS:
        assert mark not in text, f"error text leaks a traceback ({mark!r}): {text}"


def assert_tool_error(result: Any, *needles: str) -> str:
    """An isError result whose text is one clear 'code: message' line naming each needle."""
    assert result.is_error, f"expected an error, got {text_of(result)[:500]}"
    text = text_of(result)
    assert_no_traceback(text)
    assert ERROR_LINE.match(text), f"not a 'code: message' error: {text!r}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in error {text!r}"
    return text


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


def webhook_receiver(answer: Callable[[bytes, dict[bytes, bytes]], int]) -> Any:
    """An ASGI app, the far end of a webhook (served with serve_asgi): each request's whole
    body and headers go to `answer`, whose return value is the status sent back."""

    async def receive_post(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status = answer(body, dict(scope["headers"]))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return receive_post


def json_receiver(got: list[dict[str, Any]]) -> Any:
    """A webhook receiver that keeps the JSON body of each POST in `got` and answers 200."""

    def keep(body: bytes, headers: dict[bytes, bytes]) -> int:
        got.append(json.loads(body or b"{}"))
        return 200

    return webhook_receiver(keep)


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, sock: socket.socket) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on an already bound socket in this event loop; yields the
    base URL and stops the server (lifespan shutdown included) on exit."""
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        ws="websockets-sansio",
        proxy_headers=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        sock.close()


def script_catalogue(root: Path, name: str, script: str, properties: dict[str, Any]) -> Path:
    """root/catalogue, holding one job template, `name`: the Python `script` run with a closed
    set of parameters, `properties` (a JSON schema's)."""
    cat = root / "catalogue"
    cat.mkdir(parents=True, exist_ok=True)
    (cat / "payload.py").write_text(script)
    template = {
        "name": name,
        "kind": "job",
        "command": ["{python}", str(cat / "payload.py")],
        "parameters": {"type": "object", "additionalProperties": False, "properties": properties},
    }
    (cat / f"{name}.yaml").write_text(json.dumps(template))  # JSON is YAML
    return cat


def module_engine(name: str) -> Any:
    """An `eng` fixture: one engine, in a home of its own, for all the tests of a module."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def eng(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
        engine = await Engine.open(make_settings(tmp_path_factory.mktemp(name) / "home"))
        try:
            yield engine
        finally:
            await shutdown(engine)

    return eng


@dataclass
class RunningServer:
    """A running sciorch HTTP server over `engine`: MCP at `mcp_url`, the proxy and /healthz at
    `base`."""

    engine: Engine
    base: str

    @property
    def mcp_url(self) -> str:
        return self.base + "/mcp"


@dataclass
class HttpServer(RunningServer):
    """One that takes sciorch's own tokens, signed with the key in `keys_dir`."""

    mcp: FastMCP
    keys_dir: Path

    def token(self, sub: str, scopes: str = "read,submit", ttl_s: int = 600) -> str:
        return create_token(self.keys_dir, sub, scopes.split(","), ttl_s)

    def sign(self, key: bytes | None = None, **claims: Any) -> str:
        """A token for mallory, valid for ten minutes, with `claims` over those defaults (a None
        claim is left out), signed with `key` (the server's own by default): for tokens that
        create_token would refuse to make."""
        now = int(time.time())
        merged = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "mallory",
            "iat": now,
            "exp": now + 600,
            "scope": "read submit admin",
            **claims,
        }
        key = key or (self.keys_dir / PRIVATE).read_bytes()
        return jwt.encode({k: v for k, v in merged.items() if v is not None}, key, "RS256")


@contextlib.asynccontextmanager
async def run_http_server(
    home: Path,
    extra_mounts: dict[str, dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
    **server_args: Any,
) -> AsyncIterator[HttpServer]:
    """A real engine on `home` (with `settings` overrides), its MCP server with JWT auth mounted
    at /mcp next to the proxy, served on a free loopback port (entry URLs point at it).
    `extra_mounts` maps a path to the create_server arguments of another MCP server over the
    same engine, mounted there."""
    sock = free_socket()
    host, port = sock.getsockname()[:2]
    engine = await Engine.open(
        make_settings(home, public_url=f"http://{host}:{port}", **(settings or {}))
    )
    try:
        keys = engine.settings.keys_dir
        server = create_server(engine, auth=verifier(keys), **server_args)
        routes, lifespans = mcp_mount(server, engine.settings)
        for path, args in (extra_mounts or {}).items():
            extra = create_server(engine, auth=verifier(keys), **args)
            extra_routes, extra_lifespans = mcp_mount(extra, engine.settings, path)
            routes += extra_routes
            lifespans += extra_lifespans
        app = create_http_app(
            engine,
            extra_routes=routes,
            lifespans=lifespans,
            bearer=bearer_reader(server),
            uploader=bearer_reader(server, "submit"),
        )
        async with serve_asgi(app, sock) as base:
            yield HttpServer(engine=engine, mcp=server, base=base, keys_dir=keys)
    finally:
        await shutdown(engine)


@contextlib.asynccontextmanager
async def sdk_client(
    url: str, token: str | None = None, mode: str = "auto", **kwargs: Any
) -> AsyncIterator[mcp.Client]:
    """The official `mcp` SDK client over streamable HTTP, with a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(
        headers=headers, timeout=httpx2.Timeout(30, read=300)
    ) as http_client:
        transport = streamable_http_client(url, http_client=http_client)
        async with mcp.Client(transport, mode=mode, **kwargs) as client:
            yield client
