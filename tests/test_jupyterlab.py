"""The built-in `jupyterlab` template end to end: the real JupyterLab 4.6 (the `jupyter` extra)
launched with the real MCP SDK client over streamable HTTP, served by the real local backend under
its entry's prefix, and used as a browser would through sciorch's proxy: the lab page, the REST
API with Jupyter's XSRF cookie and Origin check, and a kernel's websocket running a cell.

The server runs as root here (as in CI), so these tests enable `allow_root_services`; one test
checks that without it the lab refuses to start as root."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from orchestrator.payloads.jupyter import jupyter_argv
from sciorch.web.proxy import cookie_name
from tests.mcp_helpers import run_http_server, sdk_client, structured


@pytest.fixture(autouse=True)
def _jupyterlab_installed() -> None:
    if importlib.util.find_spec("jupyterlab") is None:
        why = 'JupyterLab is not installed (pip install -e ".[test]" brings the jupyter extra)'
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)


def _message(session: str, code: str) -> dict[str, Any]:
    """A Jupyter messaging protocol (5.3) execute_request on the shell channel."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "session": session,
            "username": "sciorch-test",
            "msg_type": "execute_request",
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "channel": "shell",
        "buffers": [],
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    }


async def _run_cell(ws: ClientConnection, session: str, code: str) -> str:
    """Execute `code` in the kernel; its stdout once the kernel is idle again."""
    request = _message(session, code)
    await ws.send(json.dumps(request))
    out: list[str] = []
    async with asyncio.timeout(60):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != request["header"]["msg_id"]:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError(f"the cell failed: {msg['content']}")
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)


async def test_jupyterlab_through_the_proxy_runs_a_notebook_cell(tmp_path: Path) -> None:
    settings = {"allow_root_services": True}
    async with (
        run_http_server(tmp_path / "home", settings=settings) as http,
        sdk_client(http.mcp_url, http.token("alice")) as client,
    ):
        services = structured(await client.call_tool("list_services", {}))["services"]
        assert "jupyterlab" in {s["name"] for s in services}
        started = time.monotonic()
        launched = structured(
            await client.call_tool(
                "launch_service",
                {"service": "jupyterlab", "parameters": {"gpus": 1, "gpu_type": "virtual"}},
            )
        )
        waited = structured(
            await client.call_tool(
                "wait_entry", {"entry_id": launched["id"], "timeout_seconds": 150}
            )
        )["entry"]
        ready_s = time.monotonic() - started
        assert waited["state"] == "ready", waited
        print(f"\njupyterlab: {ready_s:.1f} s from launch_service to ready")
        assert waited["resources"]["gpus"] == 1 and waited["resources"]["gpu_type"] == "virtual"

        entry_id = waited["id"]
        prefix = f"/entries/{entry_id}/"
        origin = http.base  # what a browser on sciorch's pages sends
        token = waited["access_url"].split("?token=", 1)[1]
        async with httpx.AsyncClient(
            base_url=http.base, trust_env=False, timeout=30, headers={"Origin": origin}
        ) as web:
            r = await web.get(waited["access_url"])
            assert r.status_code == 303 and r.headers["location"] == prefix
            r = await web.get(prefix)  # JupyterLab's own redirect, kept under the prefix
            assert r.status_code == 302 and r.headers["location"].startswith(prefix + "lab")
            r = await web.get(prefix + "lab")
            assert r.status_code == 200 and "JupyterLab" in r.text
            xsrf = web.cookies.get("_xsrf")
            assert xsrf, "JupyterLab set no XSRF cookie through the proxy"

            # Jupyter's XSRF protection still holds behind the proxy...
            r = await web.post(prefix + "api/kernels", json={"name": "python3"})
            assert r.status_code == 403, r.text
            # ...and passes with the cookie's token in the header, as JupyterLab's page sends it.
            r = await web.post(
                prefix + "api/kernels", json={"name": "python3"}, headers={"X-XSRFToken": xsrf}
            )
            assert r.status_code == 201, r.text
            kernel_id = r.json()["id"]

            session = uuid.uuid4().hex
            ws_url = "ws" + http.base[4:] + f"{prefix}api/kernels/{kernel_id}/channels"
            cookies = f"{cookie_name(entry_id)}={token}; _xsrf={xsrf}"
            async with connect(
                f"{ws_url}?session_id={session}",
                origin=Origin(origin),
                additional_headers={"Cookie": cookies},
                open_timeout=30,
            ) as ws:
                assert await _run_cell(ws, session, "print(6*7)") == "42\n"
                code = "import os; print(os.getcwd()); print(os.environ['CUDA_VISIBLE_DEVICES'])"
                where = await _run_cell(ws, session, code)
            cwd, gpus = where.split()
            assert Path(cwd).name == entry_id  # the lab's root is the entry's work directory
            assert len(gpus.split(",")) == 1

            r = await web.delete(
                f"{prefix}api/kernels/{kernel_id}", headers={"X-XSRFToken": xsrf}
            )
            assert r.status_code == 204, r.text
        async with httpx.AsyncClient(base_url=http.base, trust_env=False, timeout=30) as anon:
            r = await anon.get(prefix + "api/status")  # no token: sciorch guards the URL
            assert r.status_code == 401
        await client.call_tool("cancel_entry", {"entry_id": entry_id})
        done = structured(
            await client.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 30})
        )["entry"]
        assert done["state"] == "cancelled", done


async def test_jupyterlab_refuses_root_unless_the_site_allows_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("checks what happens as root; this test runs as another account")
    async with (
        run_http_server(tmp_path / "home") as http,
        sdk_client(http.mcp_url, http.token("alice")) as client,
    ):
        launched = structured(await client.call_tool("launch_service", {"service": "jupyterlab"}))
        done = structured(
            await client.call_tool(
                "wait_entry", {"entry_id": launched["id"], "timeout_seconds": 60}
            )
        )["entry"]
    assert done["state"] == "failed", done
    assert "refusing to start JupyterLab as root" in (done["reason"] or ""), done["reason"]


def test_the_launcher_adds_allow_root_only_as_root_with_consent() -> None:
    opts = ["--no-browser", "--ServerApp.port=1"]
    as_user = jupyter_argv(opts, euid=1000, allow_root=True)
    assert as_user is not None and as_user[1:] == ["-m", "jupyterlab", *opts]
    assert jupyter_argv(opts, euid=0, allow_root=False) is None
    as_root = jupyter_argv(opts, euid=0, allow_root=True)
    assert as_root is not None and as_root[-1] == "--allow-root"
