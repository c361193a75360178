"""A service served under its entry's prefix (`strip_prefix: false`), as JupyterLab is: its health
check, readiness and redirects, through the real proxy, engine and local backend, launched with the
real MCP SDK client over streamable HTTP."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import httpx
import pytest

from ground.errors import InvalidInput
from orchestrator.catalogue import load_template
from tests.mcp_helpers import run_http_server, sdk_client, structured

# Answers only under its base path, as an app given its base URL does; its redirect is absolute
# (to its own host and port), as many apps write them.
APP = """\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, base = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    def answer(self, status, body, location=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == base + "api/status":
            self.answer(200, {"ok": True})
        elif self.path == base:
            self.answer(302, {}, location=f"http://127.0.0.1:{port}{base}home")
        elif self.path.startswith(base):
            self.answer(200, {"path": self.path})
        else:
            self.answer(404, {"error": "outside the base path"})


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def catalogue_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "catalogue"
    folder.mkdir()
    (folder / "based_app.py").write_text(APP)
    (folder / "based.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: based
            kind: service
            command: ["{{python}}", "{folder / 'based_app.py'}", "{{port}}", "{{base_path}}"]
            strip_prefix: false
            health:
              path: "{{base_path}}api/status"
              timeout_s: 10
            """
        )
    )
    return folder


async def test_health_and_redirects_under_the_base_path(
    tmp_path: Path, catalogue_dir: Path
) -> None:
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [catalogue_dir]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as client,
    ):
        started = time.monotonic()
        entry = structured(await client.call_tool("launch_service", {"service": "based"}))
        waited = structured(
            await client.call_tool("wait_entry", {"entry_id": entry["id"], "timeout_seconds": 30})
        )["entry"]
        # Without the placeholder the check polls /api/status, gets 404 and fails at timeout_s.
        assert waited["state"] == "ready", waited
        assert time.monotonic() - started < 8
        prefix = f"/entries/{entry['id']}/"
        async with httpx.AsyncClient(base_url=http.base, trust_env=False, timeout=20) as web:
            r = await web.get(waited["access_url"])  # trades the token for the cookie
            assert r.status_code == 303 and r.headers["location"] == prefix
            r = await web.get(prefix)
            assert r.status_code == 302
            # The absolute redirect to the upstream stays inside the proxy, prefix kept once.
            assert r.headers["location"] == prefix + "home"
            r = await web.get(r.headers["location"])
            assert r.status_code == 200 and r.json() == {"path": prefix + "home"}
            r = await web.get(prefix + "api/status")
            assert r.status_code == 200 and r.json() == {"ok": True}
        await client.call_tool("cancel_entry", {"entry_id": entry["id"]})


def test_health_path_placeholders_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'name: bad\nkind: service\ncommand: ["x"]\nhealth:\n  path: "{port}/health"\n'
    )
    with pytest.raises(InvalidInput) as caught:
        load_template(bad)
    assert caught.value.field == "health.path"
    assert "port" in caught.value.message and "base_path" in caught.value.message
