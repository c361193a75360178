"""The per-entry service proxy: `/entries/<id>/...` (HTTP, any method, and WebSocket) forwarded to
the entry's upstream endpoint.

Access needs the entry's access token (the JWT of `Engine.access_token`), taken from, in order:
the `?token=` query parameter (a GET/HEAD then answers 303 to the same URL without it and sets the
`sciorch_entry_<id>` cookie, so a browser keeps access), that cookie, the `X-Sciorch-Entry-Token`
header, or `Authorization: Bearer <token>`. Every request is re-checked with
`Engine.authorize_proxy`, so revoking a share cuts access at once (open websockets excepted).

The caller's sciorch credentials never reach the service: the token parameter, the sciorch
cookies, `X-Sciorch-Entry-Token` and an `Authorization` header that carried the token are removed.
Bodies stream both ways.

Usage: `proxy = EntryProxy(get_engine)`, mount `proxy.routes()`, `await proxy.aclose()` on
shutdown (it owns one shared HTTP client, created on first use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus

import httpx
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ground.errors import NotAllowed, NotFound
from ground.models import Entry, EntryState
from orchestrator.engine import Engine

log = logging.getLogger("sciorch.proxy")

COOKIE_PREFIX = "sciorch_entry_"
TOKEN_HEADER = "x-sciorch-entry-token"
TOKEN_PARAM = "token"

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "trailers",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    }
)
_NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", TOKEN_HEADER}
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "content-length",
    }
)
_SERVING = (EntryState.RUNNING, EntryState.READY)
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Reads may take long (a slow computation, a server-sent event stream); the client going away
# ends them. Connecting must be quick: the upstream is a process the backend started.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=30.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
WS_OPEN_TIMEOUT = 10.0


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def cookie_name(entry_id: str) -> str:
    return COOKIE_PREFIX + entry_id


def _strip_param(query: str, name: str) -> str:
    """The raw query string without `name=...` parts, the others byte for byte."""
    kept = [
        part for part in query.split("&") if part and unquote_plus(part.split("=", 1)[0]) != name
    ]
    return "&".join(kept)


def _cookie_pairs(header: str) -> Iterable[tuple[str, str]]:
    for part in header.split(";"):
        part = part.strip()
        if part:
            name, _, _ = part.partition("=")
            yield name.strip(), part


def _bearer(value: str | None) -> str | None:
    if value:
        scheme, _, cred = value.strip().partition(" ")
        if scheme.lower() == "bearer" and cred.strip():
            return cred.strip()
    return None


def find_token(conn: HTTPConnection, entry_id: str) -> tuple[str | None, str | None]:
    """(token, where): where is 'query', 'cookie', 'header' or 'bearer'."""
    if tok := conn.query_params.get(TOKEN_PARAM):
        return tok, "query"
    if tok := conn.cookies.get(cookie_name(entry_id)):
        return tok, "cookie"
    if tok := conn.headers.get(TOKEN_HEADER):
        return tok, "header"
    if tok := _bearer(conn.headers.get("authorization")):
        return tok, "bearer"
    return None, None


def _forward_headers(
    conn: HTTPConnection, entry_id: str, token: str | None, drop: frozenset[str]
) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop ones and sciorch credentials, plus X-Forwarded-*."""
    listed = {t.strip().lower() for t in conn.headers.get("connection", "").split(",") if t.strip()}
    out: list[tuple[str, str]] = []
    cookies: list[str] = []
    prior_xff: list[str] = []
    for raw_name, raw_value in conn.headers.raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in drop or name in listed or name.startswith("x-forwarded-"):
            if name == "x-forwarded-for":
                prior_xff.append(value)
            continue
        if name == "cookie":
            cookies += [p for n, p in _cookie_pairs(value) if not n.startswith(COOKIE_PREFIX)]
            continue
        if name == "authorization" and token is not None and _bearer(value) == token:
            continue
        out.append((name, value))
    if cookies:
        out.append(("cookie", "; ".join(cookies)))
    client = conn.client.host if conn.client else None
    xff = ", ".join([*prior_xff, *([client] if client else [])])
    if xff:
        out.append(("x-forwarded-for", xff))
    scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
    out.append(("x-forwarded-proto", scheme))
    if host := conn.headers.get("host"):
        out.append(("x-forwarded-host", host))
    out.append(("x-forwarded-prefix", f"/entries/{entry_id}"))
    return out


class _ProxiedResponse(Response):
    """Streams the upstream body as it arrives and always closes the upstream response."""

    def __init__(self, upstream: httpx.Response, headers: list[tuple[bytes, bytes]]) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = headers

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            # Headers are sent already; all that is left is to end the body early.
            log.warning("upstream body of %s broke off: %r", self.upstream.request.url, exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if scope.get("method") != "HEAD":
                async for chunk in self._body():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away
            pass
        finally:
            await self.upstream.aclose()


class EntryProxy:
    """The proxy's state (one shared upstream HTTP client) and its Starlette routes."""

    def __init__(
        self,
        get_engine: Callable[[], Engine],
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self._get_engine = get_engine
        self._timeout = timeout
        self._limits = limits
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def asgi(self) -> _ASGI:
        """The HTTP side as a plain ASGI app (for routes that hand requests on to it)."""
        return _ASGI(self)

    def routes(self) -> list[BaseRoute]:
        return [
            # An ASGI endpoint (not a function) so that every HTTP method is accepted.
            Route("/entries/{entry_id}/{path:path}", endpoint=self.asgi, name="entry_proxy"),
            WebSocketRoute(
                "/entries/{entry_id}/{path:path}", endpoint=self.websocket, name="entry_proxy_ws"
            ),
        ]

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                limits=self._limits,
                follow_redirects=False,
                trust_env=False,  # never send an upstream on 127.0.0.1 through $HTTP_PROXY
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ shared steps

    async def _authorize(
        self, conn: HTTPConnection, entry_id: str
    ) -> tuple[Entry | None, str | None, str | None, JSONResponse | None]:
        """(entry, token, where, None) or (None, None, None, error response)."""
        if not _ENTRY_ID.match(entry_id):
            return None, None, None, _error(404, f"no entry {entry_id!r}")
        token, where = find_token(conn, entry_id)
        if token is None:
            resp = _error(
                401,
                f"entry {entry_id} needs its access token: open the access_url that "
                "launch_service/get_entry returned, or send 'Authorization: Bearer <token>'",
            )
            resp.headers["www-authenticate"] = 'Bearer realm="sciorch"'
            return None, None, None, resp
        try:
            entry = await self._get_engine().authorize_proxy(token, entry_id)
        except NotAllowed as exc:
            resp = _error(401, exc.message)
            resp.headers["www-authenticate"] = 'Bearer realm="sciorch", error="invalid_token"'
            if where == "cookie":
                resp.delete_cookie(cookie_name(entry_id), path=f"/entries/{entry_id}/")
            return None, None, None, resp
        except NotFound as exc:
            return None, None, None, _error(404, exc.message)
        if entry.state not in _SERVING or not entry.endpoint:
            if entry.state in _SERVING or not entry.state.terminal:
                why = f"entry {entry_id} is {entry.state.value}; it does not serve requests yet"
                resp = _error(503, why, state=entry.state.value)
                resp.headers["retry-after"] = "2"
            else:
                why = f"entry {entry_id} is {entry.state.value}"
                if entry.reason:
                    why += f" ({entry.reason})"
                resp = _error(503, why, state=entry.state.value)
            return None, None, None, resp
        return entry, token, where, None

    def _strip_prefix(self, entry: Entry) -> bool:
        try:
            return self._get_engine().catalogue.get(entry.service, entry.version).strip_prefix
        except Exception:  # the template left the catalogue; the default is to strip
            return True

    def _upstream_target(self, conn: HTTPConnection, entry: Entry) -> str:
        """Path and query to request upstream (the prefix stripped if the template says so)."""
        prefix = f"/entries/{entry.id}"
        raw = conn.scope.get("raw_path")
        path = raw.decode("latin-1") if isinstance(raw, bytes) else conn.url.path
        at = path.find(prefix + "/")
        path = path[at:] if at >= 0 else prefix + "/"
        if self._strip_prefix(entry):
            path = path[len(prefix) :]
        query = _strip_param(conn.scope.get("query_string", b"").decode("latin-1"), TOKEN_PARAM)
        return path + (f"?{query}" if query else "")

    def _rewrite_location(self, location: str, entry: Entry) -> str:
        """Keep the service's redirects inside its proxy prefix."""
        prefix = f"/entries/{entry.id}"
        endpoint = (entry.endpoint or "").rstrip("/")
        if endpoint and location.startswith(endpoint + "/"):
            location = location[len(endpoint) :]
        elif endpoint and location == endpoint:
            location = "/"
        if (
            self._strip_prefix(entry)
            and location.startswith("/")
            and not location.startswith("//")
            and not location.startswith(prefix + "/")
        ):
            location = prefix + location
        return location

    # ------------------------------------------------------------------ HTTP

    async def http(self, request: Request) -> Response:
        entry_id = request.path_params["entry_id"]
        entry, token, where, denied = await self._authorize(request, entry_id)
        if denied is not None:
            return denied
        assert entry is not None and entry.endpoint

        if where == "query" and request.method in ("GET", "HEAD"):
            # Trade the token in the URL (history, Referer, screenshots) for a cookie.
            raw = request.scope.get("raw_path")
            path = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
            query = _strip_param(request.scope.get("query_string", b"").decode("latin-1"), "token")
            resp = RedirectResponse(path + (f"?{query}" if query else ""), status_code=303)
            public = self._get_engine().settings.public_url
            secure = request.url.scheme == "https" or public.startswith("https:")
            resp.set_cookie(
                cookie_name(entry_id),
                token or "",
                path=f"/entries/{entry_id}/",
                httponly=True,
                samesite="lax",
                secure=secure,
            )
            resp.headers["cache-control"] = "no-store"
            resp.headers["referrer-policy"] = "no-referrer"
            return resp

        url = entry.endpoint.rstrip("/") + self._upstream_target(request, entry)
        headers = _forward_headers(request, entry_id, token, _NOT_FORWARDED)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_req = self.client.build_request(
            request.method,
            url,
            headers=headers,
            content=request.stream() if has_body else None,
        )
        try:
            upstream = await self.client.send(upstream_req, stream=True)
        except ClientDisconnect:
            return Response(status_code=400)
        except httpx.TimeoutException as exc:
            return _error(
                504,
                f"the service of entry {entry_id} did not answer in time ({type(exc).__name__})",
            )
        except httpx.HTTPError as exc:
            log.info("entry %s: upstream %s unreachable: %r", entry_id, entry.endpoint, exc)
            return _error(
                502,
                f"the service of entry {entry_id} is not reachable ({type(exc).__name__}); "
                "it may still be starting, or have stopped",
                state=entry.state.value,
            )

        out: list[tuple[bytes, bytes]] = []
        listed = {
            t.strip().lower()
            for t in upstream.headers.get("connection", "").split(",")
            if t.strip()
        }
        for raw_name, raw_value in upstream.headers.raw:
            name = raw_name.decode("latin-1").lower()
            if name in HOP_BY_HOP or name in listed:
                continue
            if name == "location":
                value = self._rewrite_location(raw_value.decode("latin-1"), entry)
                raw_value = value.encode("latin-1")
            out.append((name.encode("latin-1"), raw_value))
        return _ProxiedResponse(upstream, out)

    # ------------------------------------------------------------------ WebSocket

    async def websocket(self, websocket: WebSocket) -> None:
        entry_id = websocket.path_params["entry_id"]
        entry, token, _where, denied = await self._authorize(websocket, entry_id)
        if denied is not None:
            # Closing before accept answers the handshake with 403; the code says why.
            code = (
                4401 if denied.status_code == 401 else 4404 if denied.status_code == 404 else 1013
            )
            await websocket.close(code=code)
            return
        assert entry is not None and entry.endpoint

        base = entry.endpoint.rstrip("/")
        base = "ws" + base[4:] if base.startswith("http") else base
        url = base + self._upstream_target(websocket, entry)
        headers = _forward_headers(websocket, entry_id, token, _NOT_FORWARDED | _WS_HANDSHAKE)
        subprotocols = websocket.scope.get("subprotocols") or None
        try:
            upstream = await connect(
                url,
                additional_headers=headers,
                subprotocols=subprotocols,
                open_timeout=WS_OPEN_TIMEOUT,
                proxy=None,
                user_agent_header=None,
                max_size=None,
                ping_interval=None,  # the end points keep their own connection alive
                compression=None,
            )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if isinstance(exc, InvalidStatus):
                why = f"HTTP {exc.response.status_code}"
            else:
                why = type(exc).__name__
            log.info("websocket to entry %s: upstream refused (%s)", entry_id, why)
            await websocket.close(code=1014 if isinstance(exc, InvalidHandshake) else 1011)
            return

        async with upstream:
            await websocket.accept(subprotocol=upstream.subprotocol)
            await self._pump(websocket, upstream)

    @staticmethod
    async def _pump(websocket: WebSocket, upstream: ClientConnection) -> None:
        async def client_to_upstream() -> None:
            code, reason = 1000, ""
            try:
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        code = int(msg.get("code") or 1000)
                        reason = str(msg.get("reason") or "")
                        break
                    if msg.get("text") is not None:
                        await upstream.send(msg["text"])
                    elif msg.get("bytes") is not None:
                        await upstream.send(msg["bytes"])
            except WebSocketDisconnect as exc:
                code, reason = exc.code, exc.reason or ""
            except ConnectionClosed:
                return
            await upstream.close(code=_sendable(code), reason=reason)

        async def upstream_to_client() -> None:
            try:
                while True:
                    data = await upstream.recv()
                    if isinstance(data, str):
                        await websocket.send_text(data)
                    else:
                        await websocket.send_bytes(data)
            except ConnectionClosed as closed:
                rcvd = closed.rcvd
            except (WebSocketDisconnect, OSError, RuntimeError):
                return  # the client is gone; the other pump notices
            code = _sendable(rcvd.code) if rcvd else 1011
            if websocket.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await websocket.close(code=code, reason=rcvd.reason if rcvd else "")

        tasks = [
            asyncio.create_task(client_to_upstream()),
            asyncio.create_task(upstream_to_client()),
        ]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # Let the other direction finish its close handshake briefly, then stop it
            # (both may have ended together; asyncio.wait refuses an empty set).
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, Exception):
                log.warning("websocket pump of %s ended with %r", websocket.url.path, res)


class _ASGI:
    """A plain ASGI endpoint: Starlette then routes every HTTP method to it."""

    def __init__(self, proxy: EntryProxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.proxy.http(Request(scope, receive, send))
        await response(scope, receive, send)


def _sendable(code: int) -> int:
    """A close code that may go on the wire (1005, 1006 and 1015 may not)."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014):
        return code
    if 3000 <= code <= 4999:
        return code
    return 1000 if code in (1005, 1006) else 1011


def proxy_routes(get_engine: Callable[[], Engine]) -> tuple[list[BaseRoute], EntryProxy]:
    """The proxy's routes and the proxy itself (await `.aclose()` on shutdown)."""
    proxy = EntryProxy(get_engine)
    return proxy.routes(), proxy
