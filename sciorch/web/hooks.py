"""POST /flows/hooks/{trigger_id}: a webhook delivery that starts a run of the trigger's flow,
as the principal who created the trigger. Authenticated by the body's HMAC-SHA256 signature
with the trigger's secret (header X-Sciorch-Signature: sha256=<hex>), not by a bearer token: the
senders are instruments and other services, which hold the secret and nothing else."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flows.manager import flow_manager
from flows.triggers import DELIVERY_HEADER, SIGNATURE_HEADER, deliver_webhook
from ground.errors import NotAllowed, NotFound, SciorchError
from orchestrator.engine import Engine

MAX_BODY = 1 << 20


def hook_routes(engine: Engine) -> list[BaseRoute]:
    async def deliver(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            return JSONResponse({"error": f"the body is over {MAX_BODY} bytes"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse(
                    {"error": f"the body is over {MAX_BODY} bytes"}, status_code=413
                )
        try:
            run = await deliver_webhook(
                flow_manager(engine),
                request.path_params["trigger_id"],
                body,
                request.headers.get(SIGNATURE_HEADER),
                request.headers.get(DELIVERY_HEADER),
            )
        except SciorchError as exc:
            status = (
                404 if isinstance(exc, NotFound) else 401 if isinstance(exc, NotAllowed) else 400
            )
            return JSONResponse({"error": exc.text(), "field": exc.field}, status_code=status)
        return JSONResponse({"run_id": run.id, "state": run.state.value}, status_code=202)

    return [Route("/flows/hooks/{trigger_id}", deliver, methods=["POST"])]
