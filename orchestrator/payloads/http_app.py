"""A tiny HTTP service for tests and demos: starlette served by uvicorn on 127.0.0.1:<port>.

GET  /health  {"ok": true}
GET  /        a small HTML page with the entry id, the greeting and the request path
GET  /echo    JSON of the request: method, path, query, headers (so proxy tests can check that
              no credentials were forwarded)
POST /echo    the same, plus "body" (text) and "json" (when the body is JSON)
WS   /ws      echoes text (and binary) messages

Parameters ($SCIORCH_PARAMS): greeting (string), crash_after_s (number or null: exit with code 1
after this many seconds, to test restarts).

Run: python -m orchestrator.payloads.http_app --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def load_params() -> dict[str, Any]:
    p = os.environ.get("SCIORCH_PARAMS")
    if not p:
        return {}
    try:
        data = json.loads(Path(p).read_text() or "{}")
    except (OSError, ValueError) as exc:
        print(f"[http-app] cannot read parameters: {exc}", file=sys.stderr, flush=True)
        return {}
    return data if isinstance(data, dict) else {}


def describe(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.url.path,
        "root_path": request.scope.get("root_path", ""),
        "query": {k: request.query_params.getlist(k) for k in request.query_params},
        "headers": {k: v for k, v in request.headers.items()},
        "entry_id": os.environ.get("SCIORCH_ENTRY_ID"),
    }


def create_app(params: dict[str, Any] | None = None) -> Starlette:
    params = load_params() if params is None else params
    greeting = str(params.get("greeting") or "hello")
    crash_after = params.get("crash_after_s")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def index(request: Request) -> Response:
        entry = html.escape(os.environ.get("SCIORCH_ENTRY_ID") or "(none)")
        path = html.escape(request.url.path)
        return HTMLResponse(
            "<!doctype html><html><head><title>sciorch http-app</title></head><body>"
            f"<h1>{html.escape(greeting)}</h1>"
            f'<p>entry <code id="entry">{entry}</code></p>'
            f'<p>path <code id="path">{path}</code></p>'
            "</body></html>"
        )

    async def echo(request: Request) -> Response:
        out = describe(request)
        if request.method != "GET":
            body = await request.body()
            out["body"] = body.decode("utf-8", errors="replace")
            if "json" in request.headers.get("content-type", ""):
                with contextlib.suppress(ValueError):
                    out["json"] = json.loads(body or b"null")
        return JSONResponse(out)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await websocket.send_text(msg["text"])
                elif msg.get("bytes") is not None:
                    await websocket.send_bytes(msg["bytes"])
        except WebSocketDisconnect:
            return

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = None
        if crash_after is not None:

            async def crash() -> None:
                await asyncio.sleep(float(crash_after))
                print(f"[http-app] crashing on purpose after {crash_after}s", flush=True)
                os._exit(1)

            task = asyncio.create_task(crash())
        yield
        if task is not None:
            task.cancel()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/", index),
            Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            WebSocketRoute("/ws", ws),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sciorch demo HTTP service")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    import uvicorn

    app = create_app()
    print(f"[http-app] serving on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
