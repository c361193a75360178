"""GET /entries/{entry_id}/artifacts/{path}: an entry's output files over HTTP, streamed a
chunk at a time (never held whole), with single byte ranges (`Range: bytes=a-b`).

Access as for the entry elsewhere: a bearer token /mcp accepts (read scope) or the entry's
access token (as the proxy takes it: ?token=, cookie, header, bearer); the holder must be
allowed to see the entry, else 404. A service entry's URL space is its own: for services
this path goes to the service through the proxy, and their files are read over MCP or the CLI.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ground.contract import MAX_ARTIFACT_READ
from ground.errors import InvalidInput, NotAllowed, NotFound, SciorchError
from ground.models import Principal
from orchestrator.engine import Engine
from orchestrator.storage.artifacts import ReadRange
from sciorch.web.proxy import find_token
from tools.models import mime_type_of

BearerReader = Callable[[str], Awaitable[Principal | None]]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Unsatisfiable(Exception):
    pass


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range, None to send the whole file (no
    header, or one this does not serve: several ranges, another unit)."""
    match = _RANGE.match(header.strip()) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise Unsatisfiable
        return max(0, size - n), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        raise Unsatisfiable
    return start, end


def _error(status: int, exc: SciorchError | str) -> JSONResponse:
    if isinstance(exc, str):
        return JSONResponse({"error": exc}, status_code=status)
    return JSONResponse({"error": exc.text(), "field": exc.field}, status_code=status)


class ArtifactDownloads:
    """The endpoint; `fallback` (the proxy) answers for service entries."""

    def __init__(self, engine: Engine, bearer: BearerReader | None, fallback: ASGIApp) -> None:
        self.engine = engine
        self.bearer = bearer
        self.fallback = fallback

    def routes(self) -> list[BaseRoute]:
        return [Route("/entries/{entry_id}/artifacts/{path:path}", endpoint=self)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        entry_id = request.path_params["entry_id"]
        found = await self.engine.store.get_entry(entry_id, transitions=False)
        if found is not None and found.kind == "service":
            await self.fallback(scope, receive, send)
            return
        response = await self.download(request, entry_id, request.path_params["path"])
        await response(scope, receive, send)

    async def _principal(self, request: Request, entry_id: str) -> Principal | None:
        token, where = find_token(request, entry_id)
        if token is None:
            return None
        try:
            return self.engine.entry_token_principal(token, entry_id)
        except NotAllowed:
            pass
        if where == "bearer" and self.bearer is not None:
            return await self.bearer(token)
        return None

    async def download(self, request: Request, entry_id: str, path: str) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "artifacts are read with GET or HEAD")
        principal = await self._principal(request, entry_id)
        if principal is None:
            resp = _error(401, f"reading entry {entry_id}'s artifacts needs a bearer token")
            resp.headers["www-authenticate"] = 'Bearer realm="sciorch"'
            return resp
        try:
            _, read = await self.engine.artifact_reader(principal, entry_id)
            head = await read(path, 0, 1)
        except InvalidInput as exc:
            return _error(400, exc)
        except NotFound as exc:
            return _error(404, exc)
        size = head.size
        headers = {
            "accept-ranges": "bytes",
            "content-type": mime_type_of(path),
            # A job's HTML or SVG must not run as a page of sciorch's origin.
            "content-security-policy": "sandbox",
            "x-content-type-options": "nosniff",
        }
        try:
            wanted = byte_range(request.headers.get("range"), size)
        except Unsatisfiable:
            headers["content-range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        start, end = wanted or (0, size)
        headers["content-length"] = str(end - start)
        status = 200
        if wanted is not None:
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return StreamingResponse(self._chunks(read, path, start, end), status, headers)

    @staticmethod
    async def _chunks(read: ReadRange, path: str, start: int, end: int) -> AsyncIterator[bytes]:
        # The size was fixed when the response began: a file that grows meanwhile is sent as
        # it was, one that shrinks ends early (the client sees a short body). Each chunk is
        # awaited only once the previous one was sent (StreamingResponse awaits the send, which
        # waits for the transport to drain): a slow reader holds one chunk, not the file.
        offset = start
        while offset < end:
            chunk = await read(path, offset, min(MAX_ARTIFACT_READ, end - offset))
            if not chunk.data:
                return
            yield chunk.data
            offset = chunk.next_offset
