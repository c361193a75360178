"""The HTTP edge of `sciorch serve`, run as a real subprocess on a free loopback port: /mcp
answered in place (no redirect), Host and Origin checked before the bearer token (DNS
rebinding), connections that never finish a request head cut off, and the MCP conformance
suite (npm @modelcontextprotocol/conformance) run against it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import mcp
import pytest
from mcp.client.streamable_http import streamable_http_client

from tests.mcp_helpers import (
    INITIALIZE,
    MCP_HEADERS,
    free_socket,
    submit_sim,
    wait_entry,
)
from tests.processes import serving

ROOT = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT_S = 2.0
LAB_ORIGIN = "https://notebooks.lab.example.org"
LAB_HOST = "sciorch.lab.example.org"
EVIL = "evil.example.com"
CONFIG = f"""
allowed_origins = ["{LAB_ORIGIN}"]
allowed_hosts = ["{LAB_HOST}"]
http_header_timeout_s = {HEADER_TIMEOUT_S}

[[sites]]
name = "local"
kind = "local"
cpus = 4
"""


@dataclass
class Served:
    base: str
    port: int
    token: str


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIORCH_")}
    env.update(SCIORCH_HOME=str(home), FASTMCP_CHECK_FOR_UPDATES="off", NO_COLOR="1")
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("edge") / "home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    cli = [sys.executable, "-m", "sciorch.cli", "--home", str(home)]
    made = subprocess.run(
        [*cli, "token", "create", "--sub", "edge", "--scopes", "read,submit"],
        env=_env(home), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    with free_socket() as sock:  # a free port; closed so that the server can bind it
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    serve = [*cli, "serve", "--port", str(port)]
    with serving(
        serve, base, what="sciorch serve", env=_env(home), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ):  # fmt: skip
        yield Served(base=base, port=port, token=made.stdout.strip())


def _post(served: Served, path: str = "/mcp", token: bool = True, **headers: str) -> Any:
    auth = {"authorization": f"Bearer {served.token}"} if token else {}
    return httpx2.post(
        served.base + path,
        json=INITIALIZE,
        headers={**MCP_HEADERS, **auth, **headers},
        timeout=10,
        follow_redirects=False,
    )


# ------------------------------------------------------------------ /mcp in place


async def test_mcp_is_answered_at_mcp_without_a_redirect(served: Served) -> None:
    resp = _post(served)
    assert resp.status_code == 200, (resp.status_code, resp.headers)
    assert "location" not in resp.headers
    # A foreign Host is never echoed back in a Location, with or without a token.
    for token in (False, True):
        resp = _post(served, token=token, host=EVIL)
        assert "location" not in resp.headers and resp.status_code == 421, resp.headers
    # The old address, with a slash, is answered in place too, and checked the same way.
    resp = _post(served, "/mcp/")
    assert resp.status_code == 200 and "location" not in resp.headers, resp.headers
    assert _post(served, "/mcp/", host=EVIL).status_code == 421

    # The SDK client pays no redirect, and a stream longer than the header deadline (a job
    # waited for) is not cut off by it.
    statuses: list[int] = []

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {served.token}"},
        timeout=httpx2.Timeout(30, read=120),
        event_hooks={"response": [record]},
    ) as http_client:
        transport = streamable_http_client(served.base + "/mcp", http_client=http_client)
        async with mcp.Client(transport) as client:
            job = await submit_sim(client, duration_s=3, records=2)
            done = await wait_entry(client, job["id"], 60)
    assert done["entry"]["state"] == "succeeded", done
    assert statuses and all(200 <= s < 300 for s in statuses), statuses


# ------------------------------------------------------------------ Host and Origin


def test_foreign_origin_is_refused_before_the_token_is_looked_at(served: Served) -> None:
    for token in (False, True):
        for origin in (f"http://{EVIL}", f"http://{EVIL}:{served.port}", "null"):
            resp = _post(served, token=token, origin=origin)
            assert resp.status_code == 403, (origin, resp.status_code)
            assert "Origin" in resp.text, resp.text
    for origin in (
        LAB_ORIGIN,  # configured
        served.base,  # the server's own (public_url)
        f"http://localhost:{served.port}",
        "http://localhost:5173",  # a page served from this machine
    ):
        assert _post(served, origin=origin).status_code == 200, origin
    assert _post(served).status_code == 200  # no Origin: not a browser
    assert _post(served, token=False, origin=LAB_ORIGIN).status_code == 401


def test_foreign_host_is_refused(served: Served) -> None:
    assert _post(served, host=EVIL).status_code == 421
    assert _post(served, host=f"{EVIL}:{served.port}", origin=f"http://{EVIL}").status_code == 421
    assert _post(served, host=LAB_HOST).status_code == 200  # configured
    assert _post(served, host=f"localhost:{served.port}").status_code == 200
    assert _post(served, host=LAB_HOST, token=False).status_code == 401


# ------------------------------------------------------------------ slow and idle clients


def _closed_after(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Send `trickle` a byte every 0.25 s (over and over) until the server closes the
    connection; (seconds it took, what the server sent). Fails after limit_s."""
    started = time.monotonic()
    sock.settimeout(0.25)
    got = b""
    i = 0
    while time.monotonic() - started < limit_s:
        if trickle:
            try:
                sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
            except OSError:  # reset: closed
                return time.monotonic() - started, got
            i += 1
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started, got
        if not chunk:
            return time.monotonic() - started, got
        got += chunk
    pytest.fail(f"the server kept the connection open for {limit_s} s (got {got!r})")


def test_slow_and_idle_connections_are_cut_off(served: Served) -> None:
    limit = HEADER_TIMEOUT_S + 4
    with socket.create_connection(("127.0.0.1", served.port)) as idle:
        took, got = _closed_after(idle, limit)
        assert took >= HEADER_TIMEOUT_S - 0.5 and got == b"", (took, got)
    with socket.create_connection(("127.0.0.1", served.port)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        took, got = _closed_after(slow, limit, trickle=b"X-Slow-Header: abcdefghijklmnop")
        assert took >= HEADER_TIMEOUT_S - 0.5, took
        assert got.startswith(b"HTTP/1.1 408"), got
    # A client that keeps its connection and sends whole requests is not affected.
    with socket.create_connection(("127.0.0.1", served.port)) as ok:
        ok.settimeout(10)
        for _ in range(3):
            ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):  # the whole response: its body is one JSON object
                chunk = ok.recv(4096)
                assert chunk, f"closed after {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
            time.sleep(HEADER_TIMEOUT_S * 0.75)


# ------------------------------------------------------------------ the conformance suite

# Server scenarios of @modelcontextprotocol/conformance 0.1.11 that any MCP server must pass.
APPLICABLE = {
    "server-initialize",
    "ping",
    "logging-set-level",
    "tools-list",
    "resources-list",
    "prompts-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
}
# The others test the reference "everything" server's fixtures, which sciorch does not have
# (and must not grow just to pass them).
EVERYTHING_TOOL = "calls a test_* tool of the reference server"
NOT_APPLICABLE = {
    "completion-complete": "completes an argument of the reference server's test prompt",
    "tools-call-simple-text": EVERYTHING_TOOL + " (passes only because the unknown tool's "
    "error is text)",
    "tools-call-image": EVERYTHING_TOOL,
    "tools-call-audio": EVERYTHING_TOOL,
    "tools-call-embedded-resource": EVERYTHING_TOOL,
    "tools-call-mixed-content": EVERYTHING_TOOL,
    "tools-call-with-logging": EVERYTHING_TOOL,
    "tools-call-error": EVERYTHING_TOOL + " (passes only because the tool is unknown)",
    "tools-call-with-progress": EVERYTHING_TOOL,
    "tools-call-sampling": EVERYTHING_TOOL + " that asks the client to sample",
    "tools-call-elicitation": EVERYTHING_TOOL + " that elicits",
    "elicitation-sep1034-defaults": EVERYTHING_TOOL + " that elicits",
    "elicitation-sep1330-enums": EVERYTHING_TOOL + " that elicits",
    "resources-read-text": "reads the reference server's test://static-text",
    "resources-read-binary": "reads the reference server's test://static-binary",
    "resources-templates-read": "reads the reference server's test://template/{id}/data",
    "resources-subscribe": "subscribes to a test:// resource with resources/subscribe; sciorch "
    "offers updates through subscriptions/listen (protocol 2026-07-28)",
    "resources-unsubscribe": "as resources-subscribe",
    "prompts-get-simple": "gets the reference server's test_simple_prompt",
    "prompts-get-with-args": "gets the reference server's test_prompt_with_arguments",
    "prompts-get-embedded-resource": "gets the reference server's test prompt",
    "prompts-get-with-image": "gets the reference server's test prompt",
}
RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT[\d-]+Z$")


def need_conformance() -> str:
    """The conformance CLI that scripts/test.d/05-npm-tools.sh installs."""
    for path in (
        os.environ.get("SCIORCH_CONFORMANCE_CLI", ""),
        str(ROOT / ".npm-tools/node_modules/.bin/conformance"),
    ):
        if path and Path(path).exists() and shutil.which("node"):
            return path
    why = (
        "the npm MCP conformance CLI is not installed (run scripts/test.d/05-npm-tools.sh, "
        "which needs node and npm)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI: {why}")
    pytest.skip(why)


def run_conformance(served: Served, tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """The conformance CLI's server scenarios against `served`, with its token; the checks
    of each applicable scenario, none failed."""
    cli = need_conformance()
    # The CLI has no option for request headers: a preload gives every request it makes the
    # bearer token. The URL must name localhost for the DNS rebinding scenario.
    env = {
        **_env(tmp_path),
        "SCIORCH_BEARER_TOKEN": served.token,
        "NODE_OPTIONS": f"--require {ROOT / 'tests' / 'npm_bearer.cjs'}",
    }
    url = f"http://localhost:{served.port}/mcp"
    proc = subprocess.run(
        ["node", cli, "server", "--url", url, "-o", str(tmp_path / "results")],
        env=env, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {}
    for checks in (tmp_path / "results").glob("*/checks.json"):
        match = RESULT_DIR.match(checks.parent.name)
        assert match, checks
        results[match["scenario"]] = json.loads(checks.read_text())
    assert results, proc.stdout + proc.stderr
    # A scenario a later version adds must be looked at: applicable, or not and why.
    assert set(results) <= APPLICABLE | set(NOT_APPLICABLE), set(results) - APPLICABLE
    assert set(results) >= APPLICABLE, APPLICABLE - set(results)
    failed = {
        name: [(c["id"], c.get("errorMessage")) for c in checks if c["status"] == "FAILURE"]
        for name, checks in results.items()
        if name in APPLICABLE
    }
    assert not any(failed.values()), {k: v for k, v in failed.items() if v}
    return results


def test_conformance_server_scenarios(served: Served, tmp_path: Path) -> None:
    results = run_conformance(served, tmp_path)
    assert {c["id"] for c in results["dns-rebinding-protection"]} == {
        "localhost-host-rebinding-rejected",
        "localhost-host-valid-accepted",
    }


def test_conformance_server_scenarios_with_a_facility_idp(tmp_path: Path) -> None:
    """The same scenarios against a `sciorch serve` configured with the test identity provider
    ([auth] issuers), called with an access token that provider issued for it (audience: the
    server's /mcp, RFC 8707), as a remote assistant would."""
    import asyncio

    from tests.oauth_helpers import idp_issuer, idp_token

    issuer = idp_issuer()
    home = tmp_path / "home"
    home.mkdir()
    with free_socket() as sock:
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    auth = f'[auth]\nissuers = ["{issuer}"]\n\n[[sites]]'
    config = f'public_url = "{base}"\n' + CONFIG.replace("[[sites]]", auth)
    (home / "config.toml").write_text(config)
    token = asyncio.run(idp_token(base + "/mcp", "alice", "sciorch.read sciorch.submit"))
    cli = [sys.executable, "-m", "sciorch.cli", "--home", str(home)]
    serve = [*cli, "serve", "--port", str(port)]
    with serving(
        serve, base, what="sciorch serve", env=_env(home), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ):  # fmt: skip
        unauthenticated = httpx2.post(base + "/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert unauthenticated.status_code == 401
        assert "resource_metadata=" in unauthenticated.headers["www-authenticate"]
        meta = httpx2.get(base + "/.well-known/oauth-protected-resource/mcp").json()
        assert meta["authorization_servers"] == [issuer]
        results = run_conformance(Served(base=base, port=port, token=token), tmp_path)
    assert set(results) >= APPLICABLE
