"""The MCP server over real streamable HTTP: uvicorn on a free loopback port in the test's event
loop (MCP at /mcp with JWT bearer auth, the per-entry proxy and /healthz in the same app), the
official `mcp` SDK client, the fastmcp client, `sciorch token create` and the npm MCP Inspector
CLI. One server serves the whole module."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastmcp import Client
from fastmcp.server.middleware import Middleware
from mcp.shared.exceptions import MCPError

from ground.models import Principal
from tests.mcp_helpers import (
    CORE_READ_TOOLS,
    CORE_TOOLS,
    INITIALIZE,
    MCP_HEADERS,
    HttpServer,
    assert_no_traceback,
    assert_only_read_only,
    assert_tool_error,
    core,
    run_http_server,
    sdk_client,
    structured,
    submit_sim,
    text_of,
    updates_until_succeeded,
    wait_entry,
    wait_task,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
ALL_TOOLS = CORE_TOOLS
READ_TOOLS = CORE_READ_TOOLS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HttpServer]:
    home = tmp_path_factory.mktemp("mcp-http") / "home"
    limited = {"/mcp-limited": {"rate_per_second": 0.2, "rate_burst": 6}}
    async with run_http_server(home, extra_mounts=limited) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice_job(http: HttpServer) -> dict[str, Any]:
    """A job of alice's that ran to completion."""
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        job = await submit_sim(client, duration_s=0.2, records=2)
        done = await wait_entry(client, job["id"], 30)
    assert done["entry"]["state"] == "succeeded"
    return dict(done["entry"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice_service(http: HttpServer) -> AsyncIterator[dict[str, Any]]:
    """alice's http-app service, ready; cancelled at the end of the module."""
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        launched = structured(
            await client.call_tool(
                "launch_service", {"service": "http-app", "parameters": {"greeting": "hi alice"}}
            )
        )
        waited = structured(
            await client.call_tool(
                "wait_entry", {"entry_id": launched["id"], "timeout_seconds": 60}
            )
        )
    assert waited["entry"]["state"] == "ready", waited
    yield dict(waited["entry"])
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        await client.call_tool("cancel_entry", {"entry_id": launched["id"]})


# ------------------------------------------------------------------ clients over HTTP


async def test_sdk_client_over_http_lists_and_calls_tools(
    http: HttpServer, alice_job: dict[str, Any]
) -> None:
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        assert client.protocol_version == "2026-07-28"
        tools = (await client.list_tools()).tools
        assert core(t.name for t in tools) == ALL_TOOLS
        assert all(t.output_schema for t in tools)
        services = structured(await client.call_tool("list_services", {}))["services"]
        assert {s["name"] for s in services} >= {"sim-instrument", "http-app"}
        entry = structured(await client.call_tool("get_entry", {"entry_id": alice_job["id"]}))
        assert entry["state"] == "succeeded" and entry["submitted_by"] == "alice"
        logs = structured(
            await client.call_tool("read_logs", {"entry_id": alice_job["id"], "limit": 10})
        )
        assert logs["next_offset"] == 10 and logs["complete"] is False
        templates = (await client.list_resource_templates()).resource_templates
        assert {t.uri_template for t in templates} >= {
            "sciorch://entries/{entry_id}",
            "sciorch://entries/{entry_id}/log",
            "sciorch://entries/{entry_id}/results",
        }
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert prompts == {"run_gpu_service", "steer_experiment", "diagnose_entry"}
    async with httpx2.AsyncClient() as raw:
        health = (await raw.get(http.base + "/healthz")).json()
    assert health["ok"] is True and health["sites"][0]["name"] == "local"


class _ListToolsCounter(Middleware):
    def __init__(self) -> None:
        self.calls = 0

    async def on_list_tools(self, context: Any, call_next: Any) -> Any:
        self.calls += 1
        return await call_next(context)


async def test_a_tool_call_over_http_does_not_list_every_tool(
    http: HttpServer, alice_job: dict[str, Any]
) -> None:
    """The 2026-07-28 transport checks Mcp-Param headers against the tool's input schema; the
    server hands it the schema directly instead of running a whole tools/list per call."""
    counter = _ListToolsCounter()
    http.mcp.add_middleware(counter)
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        await client.list_tools()
        listed = counter.calls
        for _ in range(5):
            result = await client.call_tool("get_entry", {"entry_id": alice_job["id"]})
            assert not result.is_error
    assert listed >= 1 and counter.calls == listed


async def test_fastmcp_client_runs_wait_entry_as_a_task_over_http(http: HttpServer) -> None:
    """The task runs in the server's worker, still as the caller (the token goes with it)."""
    async with Client(http.mcp_url, auth=http.token("bob")) as client:
        job = await submit_sim(client, duration_s=1.0, records=3)
        task = await wait_task(client, job["id"], 30)
        seen: set[str] = set()
        while (status := await task.status()).status not in ("completed", "failed"):
            if status.status_message:
                seen.add(status.status_message)
            await asyncio.sleep(0.02)
        assert status.status == "completed", status
        entry = structured(await task.result())["entry"]
        assert entry["state"] == "succeeded" and entry["submitted_by"] == "bob"
        assert any(s.startswith("record ") for s in seen), seen


async def test_legacy_protocol_client_gets_progress_notifications(http: HttpServer) -> None:
    """mode='legacy' makes the SDK client speak the initialize handshake (2025-11-25): no tasks
    there, so wait_entry is a plain call that reports progress."""
    async with sdk_client(http.mcp_url, http.token("alice"), mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        job = await submit_sim(client, duration_s=1.0, records=3)
        updates: list[tuple[float, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append((progress, message))

        result = await client.call_tool(
            "wait_entry",
            {"entry_id": job["id"], "timeout_seconds": 30},
            progress_callback=on_progress,
        )
    assert structured(result)["entry"]["state"] == "succeeded"
    messages = [m or "" for _, m in updates]
    records = [m for m in messages if m.startswith("record ")]
    assert [r.split(":")[0] for r in records] == ["record 0", "record 1", "record 2"], messages
    assert "partial_value" in records[0]
    assert messages[-1] == "state: succeeded", messages
    assert [d for d, _ in updates] == sorted(d for d, _ in updates)  # increasing


async def test_listen_over_http_gets_resource_updated(http: HttpServer) -> None:
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        job = await submit_sim(client, duration_s=0.6, records=2)
        base = f"sciorch://entries/{job['id']}"
        async with client.listen(resource_subscriptions=[base, base + "/results"]) as sub:
            got = await asyncio.wait_for(updates_until_succeeded(client, sub, base), 20)
        assert base in got and base + "/log" not in got  # only what was asked for


async def test_service_flow_access_url_answers_through_the_proxy(
    http: HttpServer, alice_service: dict[str, Any]
) -> None:
    url, access_url = alice_service["url"], alice_service["access_url"]
    assert url == f"{http.base}/entries/{alice_service['id']}/"
    assert access_url.startswith(url + "?token=")
    async with httpx2.AsyncClient(follow_redirects=True) as browser:
        page = await browser.get(access_url)
        assert page.status_code == 200, page.text
        assert "hi alice" in page.text and alice_service["id"] in page.text
        assert "token=" not in str(page.url)  # traded for a cookie
        health = await browser.get(url + "health")
        assert health.json() == {"ok": True}
    async with httpx2.AsyncClient() as stranger:
        assert (await stranger.get(url)).status_code == 401


# ------------------------------------------------------------------ auth


async def test_requests_without_a_valid_token_get_401(http: HttpServer) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    now = int(time.time())
    cases = {
        "no token": None,
        "garbage": "Bearer not.a.jwt",
        "not bearer": "Basic " + "YWxpY2U6cHc=",
        "expired": "Bearer " + http.sign(iat=now - 7200, exp=now - 3600),
        "wrong audience": "Bearer " + http.sign(aud="someone-else"),
        "wrong issuer": "Bearer " + http.sign(iss="evil"),
        "other signing key": "Bearer " + http.sign(key=other_key),
        "no expiry": "Bearer " + http.sign(exp=None),
    }
    async with httpx2.AsyncClient() as raw:
        for why, auth in cases.items():
            headers = dict(MCP_HEADERS)
            if auth:
                headers["authorization"] = auth
            resp = await raw.post(http.mcp_url + "/", json=INITIALIZE, headers=headers)
            assert resp.status_code == 401, (why, resp.status_code, resp.text)
            assert resp.headers["www-authenticate"].lower().startswith("bearer"), why
            assert_no_traceback(resp.text)
        # A good token on the same request passes.
        headers = {**MCP_HEADERS, "authorization": "Bearer " + http.token("alice")}
        resp = await raw.post(http.mcp_url + "/", json=INITIALIZE, headers=headers)
        assert resp.status_code == 200, resp.text
    with pytest.raises(Exception):  # noqa: B017 - the SDK client fails to connect at all
        async with sdk_client(http.mcp_url, None):
            pass


async def test_a_token_that_worked_is_refused_once_it_has_expired(http: HttpServer) -> None:
    """The server remembers verified tokens; it must still stop honouring them at `exp`."""
    token = http.sign(sub="brief", exp=int(time.time()) + 2)
    headers = {**MCP_HEADERS, "authorization": "Bearer " + token}
    async with httpx2.AsyncClient() as raw:
        for _ in range(3):  # verified once, then from memory
            resp = await raw.post(http.mcp_url + "/", json=INITIALIZE, headers=headers)
            assert resp.status_code == 200, resp.text
        await asyncio.sleep(max(0.0, int(time.time()) + 3 - time.time()))
        resp = await raw.post(http.mcp_url + "/", json=INITIALIZE, headers=headers)
        assert resp.status_code == 401, resp.text


async def test_read_only_token_sees_no_mutating_tools_and_cannot_call_them(
    http: HttpServer, alice_job: dict[str, Any]
) -> None:
    async with sdk_client(http.mcp_url, http.token("alice", "read")) as client:
        tools = (await client.list_tools()).tools
        assert core(t.name for t in tools) == READ_TOOLS
        assert_only_read_only(tools)
        before = structured(await client.call_tool("list_entries", {"limit": 1000}))["entries"]
        for name, args in [
            ("submit_job", {"service": "sim-instrument"}),
            ("cancel_entry", {"entry_id": alice_job["id"]}),
            ("create_event", {}),
        ]:
            result = await client.call_tool(name, args)
            assert result.is_error, name
            assert_no_traceback(text_of(result))
        after = structured(await client.call_tool("list_entries", {"limit": 1000}))["entries"]
        assert len(after) == len(before)
        entry = structured(await client.call_tool("get_entry", {"entry_id": alice_job["id"]}))
        assert entry["state"] == "succeeded"


async def test_admin_token_sees_every_tool_and_everyones_entries(
    http: HttpServer, alice_job: dict[str, Any]
) -> None:
    async with sdk_client(http.mcp_url, http.token("bob")) as bob:
        bobs = await submit_sim(bob, duration_s=0)
        assert core(t.name for t in (await bob.list_tools()).tools) == ALL_TOOLS
    async with sdk_client(http.mcp_url, http.token("root-admin", "admin")) as admin:
        assert core(t.name for t in (await admin.list_tools()).tools) == ALL_TOOLS
        listed = structured(await admin.call_tool("list_entries", {"limit": 1000}))["entries"]
        owners = {e["submitted_by"] for e in listed}
        assert {"alice", "bob"} <= owners
        entry = structured(await admin.call_tool("get_entry", {"entry_id": alice_job["id"]}))
        assert entry["submitted_by"] == "alice"
        waited = await wait_entry(admin, bobs["id"], 30)
        assert waited["entry"]["state"] == "succeeded"


async def test_two_principals_cannot_see_each_others_entries_logs_events_or_urls(
    http: HttpServer, alice_job: dict[str, Any], alice_service: dict[str, Any]
) -> None:
    async with sdk_client(http.mcp_url, http.token("alice")) as alice:
        alice_events = structured(await alice.call_tool("list_events", {}))["events"]
    async with sdk_client(http.mcp_url, http.token("bob")) as bob:
        for name, args in [
            ("get_entry", {"entry_id": alice_job["id"]}),
            ("read_logs", {"entry_id": alice_job["id"]}),
            ("read_results", {"entry_id": alice_job["id"]}),
            ("wait_entry", {"entry_id": alice_job["id"]}),
            ("cancel_entry", {"entry_id": alice_service["id"]}),
            ("get_entry", {"entry_id": alice_service["id"]}),
        ]:
            text = assert_tool_error(await bob.call_tool(name, args), "not_found", "entry_id")
            assert "visible to bob" in text and "alice" not in text
        for event in alice_events:
            result = await bob.call_tool("list_entries", {"event_id": event["id"]})
            assert_tool_error(result, "not_found", "event_id")
            result = await bob.call_tool("stop_event", {"event_id": event["id"]})
            assert_tool_error(result, "not_found", "event_id")
        bob_events = structured(await bob.call_tool("list_events", {}))["events"]
        assert not {e["id"] for e in bob_events} & {e["id"] for e in alice_events}
        listed = structured(await bob.call_tool("list_entries", {"limit": 1000}))["entries"]
        assert all(e["submitted_by"] == "bob" for e in listed)
        assert alice_service["access_url"] not in json.dumps(listed)
        for suffix in ("", "/log", "/results"):
            with pytest.raises(MCPError) as info:
                await bob.read_resource(f"sciorch://entries/{alice_job['id']}{suffix}")
            assert "not_found" in str(info.value)
        async with bob.listen(
            resource_subscriptions=[f"sciorch://entries/{alice_service['id']}"]
        ) as sub:
            assert sub.honored is not None and not sub.honored.resource_subscriptions
    # The service URL: a token bob could hold (his own, for alice's entry) gets nowhere, nor
    # does alice's token for another entry.
    url = alice_service["url"]
    bobs_token = http.engine.access_token(Principal(id="bob"), alice_service["id"])
    other_entry = http.engine.access_token(Principal(id="alice"), alice_job["id"])
    async with httpx2.AsyncClient() as raw:
        resp = await raw.get(url, headers={"authorization": f"Bearer {bobs_token}"})
        assert resp.status_code in (401, 404) and "hi alice" not in resp.text
        resp = await raw.get(url, params={"token": other_entry})
        assert resp.status_code == 401 and "hi alice" not in resp.text
        resp = await raw.get(url, params={"token": "garbage"})
        assert resp.status_code == 401


async def test_rate_limit_is_per_principal_with_a_clear_error(http: HttpServer) -> None:
    limited = http.base + "/mcp-limited"
    errors: list[MCPError] = []
    async with sdk_client(limited, http.token("carol")) as carol:
        for _ in range(8):
            try:
                await carol.call_tool("list_sites", {})
            except MCPError as exc:
                errors.append(exc)
    assert errors, "the rate limit was never reached"
    for error in errors:
        text = str(error)
        assert text.startswith("rate_limited: ") and "carol" in text, text
        assert_no_traceback(text)
        # When to retry, in the text and the error's data: at 0.2 calls per second a token
        # comes back within 5 s.
        wait = error.data["retry_after_s"]
        assert 0 < wait <= 5 and f"retry after {wait:g} s" in text, (wait, text)
    async with sdk_client(limited, http.token("dave")) as dave:  # another principal: fine
        result = await dave.call_tool("list_sites", {})
        assert not result.is_error


async def test_bad_input_over_http_gets_clear_errors_and_the_server_keeps_answering(
    http: HttpServer,
) -> None:
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        huge = await client.call_tool("get_entry", {"entry_id": "x" * (300 * 1024)})
        assert_tool_error(huge, "invalid_input", "bytes")
        wrong = await client.call_tool("read_logs", {"entry_id": "ent-0", "offset": "zero"})
        assert_tool_error(wrong, "invalid_input", "offset")
        missing = await client.call_tool("wait_entry", {})
        assert_tool_error(missing, "invalid_input", "entry_id")
        unknown = await client.call_tool("get_entry", {"entry_id": "ent-000000000000"})
        assert_tool_error(unknown, "not_found", "entry_id")
        no_tool = await client.call_tool("no_such_tool", {})
        assert no_tool.is_error and "Unknown tool" in text_of(no_tool)
        assert core(t.name for t in (await client.list_tools()).tools) == ALL_TOOLS
    headers = {**MCP_HEADERS, "authorization": "Bearer " + http.token("alice")}
    async with httpx2.AsyncClient() as raw:
        for body in (b"{not json", b"[]", b'{"jsonrpc": "2.0"}', b"\xff\xfe"):
            resp = await raw.post(http.mcp_url + "/", content=body, headers=headers)
            assert 400 <= resp.status_code < 500, (body, resp.status_code)
            assert_no_traceback(resp.text)
    async with sdk_client(http.mcp_url, http.token("alice")) as client:
        assert (await client.list_tools()).tools


# ------------------------------------------------------------------ CLI and third-party client


async def _run(*argv: str, cwd: Path | None = None, limit_s: float = 60) -> tuple[int, str, str]:
    """A subprocess run without blocking the event loop the server lives on."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "FASTMCP_CHECK_FOR_UPDATES": "off", "NO_COLOR": "1"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def test_token_create_prints_a_token_that_works(http: HttpServer) -> None:
    home = str(http.engine.settings.home)
    cli = [sys.executable, "-m", "sciorch.cli", "--home", home, "token", "create"]
    rc, out, err = await _run(*cli, "--sub", "erin", "--scopes", "read", "--ttl", "10m")
    assert rc == 0, err
    token = out.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "erin" and claims["scope"] == "read"
    assert 590 <= claims["exp"] - claims["iat"] <= 600
    async with sdk_client(http.mcp_url, token) as client:
        tools = (await client.list_tools()).tools
        assert core(t.name for t in tools) == READ_TOOLS
        assert_only_read_only(tools)
        page = structured(await client.call_tool("list_entries", {}))
        assert page["entries"] == []
    rc, out, err = await _run(*cli, "--sub", "erin", "--scopes", "read,root")
    assert rc == 2 and "scopes" in err and "root" in err and "Traceback" not in err


def inspector_cli() -> str | None:
    """The npm Inspector CLI that scripts/test.d/05-npm-tools.sh installs."""
    candidates = [
        os.environ.get("SCIORCH_INSPECTOR_CLI", ""),
        str(ROOT / ".npm-tools/node_modules/.bin/mcp-inspector-cli"),
    ]
    for path in candidates:
        if path and Path(path).exists():
            return str(Path(path).resolve())
    return None


def need_inspector() -> str:
    cli = inspector_cli()
    node = shutil.which("node")
    if cli and node:
        return cli
    why = (
        "the npm MCP Inspector CLI is not installed (run scripts/test.d/05-npm-tools.sh, "
        "which needs node and npm)"
        if node
        else "node is not installed, so the npm MCP Inspector CLI cannot run"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI: {why}")
    pytest.skip(why)


async def test_npm_inspector_cli_lists_and_calls_tools(
    http: HttpServer, alice_job: dict[str, Any]
) -> None:
    cli = need_inspector()
    # The CLI finds its own package.json relative to the working directory: run it from its
    # build folder.
    cwd = Path(cli).parent
    auth = ["--header", f"Authorization: Bearer {http.token('alice')}"]
    base = ["node", cli, "--cli", http.mcp_url, "--transport", "http", *auth]

    def payload(out: str) -> Any:
        return json.loads(out[out.index("{") :])

    rc, out, err = await _run(*base, "--method", "tools/list", cwd=cwd)
    assert rc == 0, out + err
    listed = payload(out)["tools"]
    assert core(t["name"] for t in listed) == ALL_TOOLS
    assert all(t.get("outputSchema") for t in listed)

    rc, out, err = await _run(
        *base, "--method", "tools/call", "--tool-name", "list_services", cwd=cwd
    )
    assert rc == 0, out + err
    answer = payload(out)
    assert not answer.get("isError")
    assert {s["name"] for s in answer["structuredContent"]["services"]} >= {"sim-instrument"}

    rc, out, err = await _run(
        *base,
        "--method", "tools/call",
        "--tool-name", "get_entry",
        "--tool-arg", f"entry_id={alice_job['id']}",
        cwd=cwd,
    )  # fmt: skip
    assert rc == 0, out + err
    assert payload(out)["structuredContent"]["state"] == "succeeded"

    # Without the token the Inspector cannot connect at all.
    rc, out, err = await _run(
        "node", cli, "--cli", http.mcp_url, "--transport", "http", "--method", "tools/list",
        cwd=cwd,
    )  # fmt: skip
    assert rc != 0
