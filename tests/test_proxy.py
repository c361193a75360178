"""The per-entry proxy, end to end: the real HTTP app served by uvicorn on a free port, the real
engine and local backend, the real `http-app` service, a real httpx client and websockets client.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import tools
from ground.config import load_settings
from ground.models import EntryState
from orchestrator.engine import Engine
from sciorch.web.app import create_http_app, public_url_for, settings_for_listen
from sciorch.web.proxy import COOKIE_PREFIX, _strip_param
from tests.conftest import ALICE, BOB, make_settings, shutdown
from tests.mcp_helpers import free_socket, serve_asgi
from tools.models import (
    CreateEventInput,
    EntryRef,
    EntryView,
    LaunchServiceInput,
    ShareEventInput,
)

# One server, one engine and one service for the module: the tests share its event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = httpx.Timeout(20.0)
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    engine: Engine
    base: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    home: Path = tmp_path_factory.mktemp("proxy") / "home"
    engine = await Engine.open(make_settings(home, public_url=base))
    try:
        async with serve_asgi(create_http_app(engine), sock):
            yield Served(engine, base)
    finally:
        await shutdown(engine)


async def launch(served: Served, event_id: str | None = None) -> EntryView:
    view = await tools.launch_service(
        served.engine, ALICE, LaunchServiceInput(service="http-app", event_id=event_id)
    )
    entry, timed_out = await served.engine.wait_entry(ALICE, view.id, timeout_s=30)
    assert not timed_out and entry.state == EntryState.READY, (entry.state, entry.reason)
    view = await tools.get_entry(served.engine, ALICE, EntryRef(entry_id=view.id))
    assert view.access_url and view.url == f"{served.base}/entries/{view.id}/"
    return view


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def entry(served: Served) -> EntryView:
    return await launch(served)


def client(served: Served, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.base, timeout=TIMEOUT, trust_env=False, **kw)  # type: ignore[arg-type]


def token_of(view: EntryView) -> str:
    assert view.access_url
    return view.access_url.split("?token=", 1)[1]


def assert_no_credentials(echo: dict, token: str) -> None:
    headers = echo["headers"]
    assert "authorization" not in headers
    assert "x-sciorch-entry-token" not in headers
    assert COOKIE_PREFIX not in headers.get("cookie", "")
    assert "token" not in echo["query"]
    for value in headers.values():
        assert token not in value


# ------------------------------------------------------------------ the tests


@module_loop
async def test_healthz(served: Served) -> None:
    async with client(served) as c:
        r = await c.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True
    assert [s["name"] for s in body["sites"]] == ["local"]


@module_loop
async def test_access_url_sets_cookie_and_cookie_alone_works(
    served: Served, entry: EntryView
) -> None:
    token = token_of(entry)
    prefix = f"/entries/{entry.id}/"
    async with client(served) as c:
        # The token in the URL is traded for a cookie, other query parameters are kept.
        r = await c.get(f"{entry.access_url}&a=1&b=x%20y")
        assert r.status_code == 303
        assert r.headers["location"] == f"{prefix}?a=1&b=x%20y"
        set_cookie = r.headers["set-cookie"]
        assert set_cookie.startswith(f"{COOKIE_PREFIX}{entry.id}={token}")
        assert "HttpOnly" in set_cookie
        assert "samesite=lax" in set_cookie.lower()
        assert f"Path={prefix}" in set_cookie
        c.cookies.clear()

        # A browser-like run: follow the redirect, land on the service's page.
        r = await c.get(entry.access_url, follow_redirects=True)
        assert r.status_code == 200, r.text
        assert "token=" not in str(r.url)
        assert entry.id in r.text and "hello" in r.text
        assert c.cookies.get(f"{COOKIE_PREFIX}{entry.id}") == token

        # The cookie alone is enough; the service never sees it, other cookies pass.
        c.cookies.set("theirs", "keep-me", domain="127.0.0.1", path="/")
        r = await c.get(f"{prefix}echo", params={"q": "1"})
        assert r.status_code == 200, r.text
        echo = r.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo"  # strip_prefix: the service sees its own paths
    assert echo["query"] == {"q": ["1"]}
    assert echo["headers"]["cookie"] == "theirs=keep-me"
    assert echo["headers"]["x-forwarded-prefix"] == f"/entries/{entry.id}"
    assert echo["headers"]["x-forwarded-proto"] == "http"
    assert echo["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert echo["headers"]["x-forwarded-host"] == served.base.removeprefix("http://")
    assert_no_credentials(echo, token)


@module_loop
async def test_header_and_bearer_tokens(served: Served, entry: EntryView) -> None:
    token = token_of(entry)
    async with client(served) as c:
        for headers in (
            {"Authorization": f"Bearer {token}"},
            {"X-Sciorch-Entry-Token": token},
        ):
            r = await c.get(f"/entries/{entry.id}/echo", headers=headers)
            assert r.status_code == 200, r.text
            assert_no_credentials(r.json(), token)
        # A token in the query of a non-GET request is used, not redirected, and not forwarded.
        r = await c.post(f"/entries/{entry.id}/echo?token={token}&keep=1", content=b"abc")
        assert r.status_code == 200, r.text
        assert r.json()["body"] == "abc"
        assert r.json()["query"] == {"keep": ["1"]}
        assert_no_credentials(r.json(), token)
        # Another scheme in Authorization is the service's business and passes through.
        r = await c.get(
            f"/entries/{entry.id}/echo",
            headers={"X-Sciorch-Entry-Token": token, "Authorization": "Basic dTpw"},
        )
        assert r.json()["headers"]["authorization"] == "Basic dTpw"


@module_loop
async def test_refusals(served: Served, entry: EntryView) -> None:
    async with client(served) as c:
        r = await c.get(f"/entries/{entry.id}/echo")
        assert r.status_code == 401
        assert "access token" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")

        r = await c.get(f"/entries/{entry.id}/echo", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "error" in r.json()

        # A stale cookie is refused and cleared.
        c.cookies.set(f"{COOKIE_PREFIX}{entry.id}", "stale", domain="127.0.0.1")
        r = await c.get(f"/entries/{entry.id}/echo")
        assert r.status_code == 401
        assert f"{COOKIE_PREFIX}{entry.id}=" in r.headers["set-cookie"]
        c.cookies.clear()

        # A token for another entry does not open this one.
        other = served.engine.access_token(ALICE, "ent-000000000000")
        r = await c.get(f"/entries/{entry.id}/echo", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 401
        r = await c.get("/entries/ent-000000000000/", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404

        # No trailing slash: redirected into the entry's prefix, token kept.
        r = await c.get(f"/entries/{entry.id}?token={token_of(entry)}")
        assert r.status_code in (307, 308)
        assert r.headers["location"].endswith(f"/entries/{entry.id}/?token={token_of(entry)}")


@module_loop
async def test_sharing_grants_and_revoking_cuts_access(served: Served) -> None:
    event = await tools.create_event(served.engine, ALICE, CreateEventInput(name="shared"))
    view = await launch(served, event.id)
    bob = served.engine.access_token(BOB, view.id)
    url = f"/entries/{view.id}/echo"
    async with client(served, headers={"Authorization": f"Bearer {bob}"}) as c:
        r = await c.get(url)
        assert r.status_code == 404, r.text  # bob cannot see it: it does not exist for him
        await tools.share_event(
            served.engine, ALICE, ShareEventInput(event_id=event.id, principal="bob")
        )
        r = await c.get(url)
        assert r.status_code == 200, r.text
        assert_no_credentials(r.json(), bob)
        await tools.share_event(
            served.engine,
            ALICE,
            ShareEventInput(event_id=event.id, principal="bob", role="none"),
        )
        r = await c.get(url)
        assert r.status_code == 404
    await tools.cancel_entry(served.engine, ALICE, EntryRef(entry_id=view.id))


@module_loop
async def test_request_bodies_stream_through(served: Served, entry: EntryView) -> None:
    token = token_of(entry)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f"chunk{i};".encode()

    async with client(served, headers={"Authorization": f"Bearer {token}"}) as c:
        r = await c.post(f"/entries/{entry.id}/echo", json={"x": 1, "y": [1, 2]})
        assert r.status_code == 200, r.text
        assert r.json()["json"] == {"x": 1, "y": [1, 2]}
        assert r.json()["method"] == "POST"

        r = await c.put(f"/entries/{entry.id}/echo", content=chunks())
        assert r.status_code == 200, r.text
        assert r.json()["body"] == "".join(f"chunk{i};" for i in range(50))
        assert r.json()["method"] == "PUT"

        big = b"z" * (3 * 1024 * 1024)
        r = await c.post(f"/entries/{entry.id}/echo", content=big)
        assert r.status_code == 200
        assert len(r.json()["body"]) == len(big)

        r = await c.head(f"/entries/{entry.id}/health")
        assert r.status_code == 200 and r.content == b""
        r = await c.get(f"/entries/{entry.id}/no-such-page")
        assert r.status_code == 404  # the service's own 404 passes through


@module_loop
async def test_websocket_echo(served: Served, entry: EntryView) -> None:
    token = token_of(entry)
    ws_base = served.base.replace("http://", "ws://")
    for kw in (
        {"uri": f"{ws_base}/entries/{entry.id}/ws?token={token}"},
        {
            "uri": f"{ws_base}/entries/{entry.id}/ws",
            "additional_headers": {"Authorization": f"Bearer {token}"},
        },
        {
            "uri": f"{ws_base}/entries/{entry.id}/ws",
            "additional_headers": {"Cookie": f"{COOKIE_PREFIX}{entry.id}={token}"},
        },
    ):
        async with asyncio.timeout(15), connect(**kw, proxy=None) as ws:  # type: ignore[arg-type]
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
            for i in range(20):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(20)] == [f"m{i}" for i in range(20)]
            await ws.close(code=1000)
        assert ws.close_code == 1000

    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(15), connect(f"{ws_base}/entries/{entry.id}/ws", proxy=None):
            pass
    assert info.value.response.status_code == 403


@module_loop
async def test_cancelled_entry_answers_503(served: Served) -> None:
    view = await launch(served)
    token = token_of(view)
    ws_base = served.base.replace("http://", "ws://")
    async with client(served, headers={"Authorization": f"Bearer {token}"}) as c:
        assert (await c.get(f"/entries/{view.id}/health")).status_code == 200
        # An open websocket is closed when the service goes away.
        async with (
            asyncio.timeout(20),
            connect(f"{ws_base}/entries/{view.id}/ws?token={token}", proxy=None) as ws,
        ):
            await ws.send("before")
            assert await ws.recv() == "before"
            done = await tools.cancel_entry(served.engine, ALICE, EntryRef(entry_id=view.id))
            assert done.state == EntryState.CANCELLED
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        r = await c.get(f"/entries/{view.id}/health")
        assert r.status_code == 503
        assert r.json()["state"] == "cancelled"
        assert "cancelled" in r.json()["error"]


@module_loop
async def test_unreachable_upstream_is_502(served: Served, entry: EntryView) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    real = (await served.engine.get_entry(ALICE, entry.id)).endpoint
    # The backend's own report path is not what is under test; point the entry elsewhere.
    await served.engine.store.update_entry_fields(entry.id, {"endpoint": dead})
    try:
        async with client(served, headers={"Authorization": f"Bearer {token_of(entry)}"}) as c:
            r = await c.get(f"/entries/{entry.id}/echo")
        assert r.status_code == 502
        assert "not reachable" in r.json()["error"]
        assert dead not in r.text  # the internal address stays internal
        ws_url = (
            f"{served.base.replace('http', 'ws')}/entries/{entry.id}/ws?token={token_of(entry)}"
        )
        with pytest.raises(InvalidStatus):
            async with asyncio.timeout(15), connect(ws_url, proxy=None):
                pass
    finally:
        await served.engine.store.update_entry_fields(entry.id, {"endpoint": real})


# ------------------------------------------------------------------ small parts


def test_strip_param_keeps_the_rest_verbatim() -> None:
    assert _strip_param("token=a&x=1&token=b&y=%20z&tok=2", "token") == "x=1&y=%20z&tok=2"
    assert _strip_param("", "token") == ""
    assert _strip_param("to%6Ben=a&k", "token") == "k"


def test_public_url_follows_the_listen_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCIORCH_PUBLIC_URL", raising=False)
    monkeypatch.delenv("SCIORCH_CONFIG", raising=False)
    settings = load_settings(tmp_path / "a")
    assert settings_for_listen(settings, "127.0.0.1", 8765).public_url == "http://127.0.0.1:8765"
    assert settings_for_listen(settings, "127.0.0.1", 9001).public_url == "http://127.0.0.1:9001"
    configured = load_settings(tmp_path / "b", public_url="https://sciorch.example.org")
    assert (
        settings_for_listen(configured, "0.0.0.0", 9001).public_url == "https://sciorch.example.org"
    )
    monkeypatch.setenv("SCIORCH_PUBLIC_URL", "https://env.example.org")
    from_env = load_settings(tmp_path / "c")
    assert settings_for_listen(from_env, "127.0.0.1", 9001).public_url == "https://env.example.org"
    assert public_url_for("::1", 8000) == "http://[::1]:8000"


SERVE = """
import asyncio, logging, sys
from pathlib import Path
from sciorch.web.app import serve_http
from tests.conftest import make_settings
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
asyncio.run(serve_http(make_settings(Path(sys.argv[1])), "127.0.0.1", int(sys.argv[2])))
"""


async def test_serve_http_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE,
        str(tmp_path / "home"),
        str(port),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20), httpx.AsyncClient(trust_env=False) as c:
            while True:
                assert proc.returncode is None, "server exited early"
                with contextlib.suppress(httpx.TransportError):
                    r = await c.get(f"http://127.0.0.1:{port}/healthz")
                    break
                await asyncio.sleep(0.05)
        assert r.json()["ok"] is True
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert f"public URL http://127.0.0.1:{port}" in text  # follows the port it listens on
    assert "engine closed" in text, text
