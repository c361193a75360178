"""HTTP uploads of inputs, resumable: the route for files too big for the upload_input tool.

    POST /uploads                {"name": "scan.h5", "size": 209715200}  -> 201, the upload
    PUT  /uploads/{id}           the bytes; `Content-Range: bytes a-b/size` for a chunk from a
                                 (without it, the whole file from 0)
    HEAD /uploads/{id}           `Upload-Offset`: the bytes received so far (resume there)
    GET  /uploads/{id}           the upload as JSON (uri once complete)

Bodies are streamed to the storage layer as they arrive (never held whole), and the upload's
state is in the store, so each request may reach any replica. Every request carries a bearer
token /mcp accepts with the submit scope; an upload is its sender's: another principal gets 404.
A PUT that does not start where the upload stands gets 409 with the right `Upload-Offset`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ground.errors import Conflict, InvalidInput, LimitExceeded, NotFound, SciorchError
from ground.models import Principal
from orchestrator.engine import Engine
from orchestrator.storage.uploads import Upload
from sciorch.web.artifacts import BearerReader

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_STATUS = {InvalidInput: 400, NotFound: 404, Conflict: 409, LimitExceeded: 413}


def _error(exc: SciorchError) -> JSONResponse:
    status = next((s for kind, s in _STATUS.items() if isinstance(exc, kind)), 400)
    resp = JSONResponse({"error": exc.text(), "field": exc.field}, status_code=status)
    if "offset" in exc.details:
        resp.headers["upload-offset"] = str(exc.details["offset"])
    return resp


class UploadRoutes:
    def __init__(self, engine: Engine, bearer: BearerReader | None) -> None:
        self.engine = engine
        self.bearer = bearer

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/uploads", self.create, methods=["POST"]),
            Route("/uploads/{upload_id}", self.one, methods=["GET", "HEAD", "PUT"]),
        ]

    def _view(self, up: Upload) -> dict[str, object]:
        return {
            **up.model_dump(exclude={"principal", "created_at"}),
            "uri": up.uri,
            "url": f"{self.engine.settings.public_url.rstrip('/')}/uploads/{up.id}",
        }

    async def _principal(self, request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        if self.bearer is None or not auth.lower().startswith("bearer "):
            return None
        return await self.bearer(auth[7:].strip())

    @staticmethod
    def _unauthorized() -> Response:
        resp = JSONResponse(
            {"error": "uploads need a bearer token with the submit scope"}, status_code=401
        )
        resp.headers["www-authenticate"] = 'Bearer realm="sciorch"'
        return resp

    async def create(self, request: Request) -> Response:
        principal = await self._principal(request)
        if principal is None:
            return self._unauthorized()
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(InvalidInput("the body must be JSON: {name, size}", field="body"))
        name, size = body.get("name"), body.get("size")
        if not isinstance(name, str):
            return _error(InvalidInput("name (a file name) is required", field="name"))
        if not isinstance(size, int) or isinstance(size, bool):
            return _error(InvalidInput("size (total bytes, an integer) is required", field="size"))
        try:
            up = await self.engine.uploads.create(principal, name, size)
        except SciorchError as exc:
            return _error(exc)
        view = self._view(up)
        return JSONResponse(view, status_code=201, headers={"location": str(view["url"])})

    async def one(self, request: Request) -> Response:
        principal = await self._principal(request)
        if principal is None:
            return self._unauthorized()
        upload_id = request.path_params["upload_id"]
        try:
            if request.method == "PUT":
                up = await self._put(request, principal, upload_id)
            else:
                up = await self.engine.uploads.get(principal, upload_id, "id")
        except SciorchError as exc:
            return _error(exc)
        headers = {"upload-offset": str(up.received), "upload-length": str(up.size)}
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return JSONResponse(self._view(up), headers=headers)

    async def _put(self, request: Request, principal: Principal, upload_id: str) -> Upload:
        header = request.headers.get("content-range")
        offset, length = 0, None
        if header:
            match = _CONTENT_RANGE.match(header.strip())
            if match is None:
                raise InvalidInput(
                    f"Content-Range must be 'bytes a-b/total', got {header!r}",
                    field="content-range",
                )
            first, last = int(match[1]), int(match[2])
            if last < first:
                raise InvalidInput("Content-Range ends before it starts", field="content-range")
            offset, length = first, last - first + 1

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in request.stream():
                    yield chunk
            except ClientDisconnect:
                return

        return await self.engine.uploads.append(principal, upload_id, offset, body(), length)
