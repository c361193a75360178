"""The hub's pages: server-rendered Jinja2 templates over the typed operations (tools.operations
and the campaign tools' own functions), the same calls the MCP tools make, as the signed-in
principal. Every page needs a session (else 303 to /login); every stream and POST too (else
401 / 403); every POST needs the session's CSRF token. Errors are the operations' typed errors,
shown beside the field they name."""

from __future__ import annotations

import gzip
import logging
import secrets
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from fastmcp.server.auth import AuthProvider
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ground.errors import InvalidInput, NotAllowed, NotFound, SciorchError
from ground.models import EntryState, Principal
from mcp_server.server import local_principal, token_principal
from mcp_server.steering_tools import campaign_manager, steering_tools
from mcp_server.toolset import ToolSpec
from orchestrator.engine import Engine
from sciorch.web.artifacts import ArtifactDownloads
from sciorch.web.hub import forms, live, steer
from sciorch.web.hub.oidc import CALLBACK, OIDCLogin
from sciorch.web.hub.sessions import Session, Sessions, csrf_ok
from steering.models import CampaignView
from tools import operations as ops
from tools.models import (
    CreateEventInput,
    EntryRef,
    EventRef,
    LaunchServiceInput,
    ListEntriesInput,
    ReadLogsInput,
    ReadResultsInput,
    ShareEventInput,
    SubmitJobInput,
)

log = logging.getLogger("sciorch.hub")

HERE = Path(__file__).parent
ENTRIES_PAGE = 1000
GZIP_MIN = 1400
CAMPAIGN_EXAMPLE = """\
name = "branin from the hub"
batch_size = 2
seed = 7

[objective]
service = "sim-instrument"
parameters = { surface = "branin", duration_s = 0.2, records = 1 }
field = "value"
goal = "minimise"
reference = 0.397887

[[space]]
name = "x1"
low = -5.0
high = 10.0

[[space]]
name = "x2"
low = 0.0
high = 15.0

[initial_design]
count = 4

[budget]
evaluations = 10
"""

Handler = Callable[[Request, Session], Awaitable[Response]]


async def _no_fallback(scope: Any, receive: Any, send: Any) -> None:
    raise NotImplementedError("the hub reads artifacts itself")


class _Downloads(ArtifactDownloads):
    """The artifact endpoint's streaming and ranges, for the session's principal."""

    def __init__(self, engine: Engine, who: Principal) -> None:
        super().__init__(engine, None, fallback=_no_fallback)
        self.who = who

    async def _principal(self, request: Request, entry_id: str) -> Principal | None:
        return self.who


class Hub:
    def __init__(self, engine: Engine, auth: AuthProvider | None) -> None:
        self.engine = engine
        self.auth = auth
        settings = engine.settings
        self.sessions = Sessions(settings.keys_dir)
        self.oidc = (
            OIDCLogin(settings) if settings.auth.issuers and settings.auth.hub_client_id else None
        )
        # The embedded default (no identity provider): the local user signs in with a
        # one-time link `sciorch serve` prints; each use prints the next one.
        self.once: str | None = None if settings.auth.issuers else secrets.token_urlsafe(24)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._campaigns: dict[str, ToolSpec] | None = None

    # ---- wiring ----------------------------------------------------------------------------

    def login_link(self) -> str | None:
        if self.once is None:
            return None
        return f"{self.engine.settings.public_url.rstrip('/')}/login/once?code={self.once}"

    def banner(self) -> list[str]:
        link = self.login_link()
        base = self.engine.settings.public_url.rstrip("/")
        if link is None:
            how = "your identity provider or a token" if self.oidc else "a token"
            return [f"sciorch: the web hub is at {base}/ (sign in with {how})"]
        return [f"sciorch: open the web hub (signs you in once): {link}"]

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route("/", page(self.catalogue), methods=["GET"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/login/once", self.login_once, methods=["GET"]),
            Route("/login/oidc", self.login_oidc, methods=["GET"]),
            Route(CALLBACK, self.login_oidc_callback, methods=["GET"]),
            Route("/logout", page(self.logout, write=True), methods=["POST"]),
            Route("/hub/launch/{service}", page(self.launch_form), methods=["GET"]),
            Route("/hub/launch/{service}", page(self.launch, write=True), methods=["POST"]),
            Route("/hub/events", page(self.events), methods=["GET"]),
            Route("/hub/events", page(self.create_event, write=True), methods=["POST"]),
            Route(
                "/hub/events/{event_id}/{action:str}",
                page(self.event_action, write=True),
                methods=["POST"],
            ),
            Route("/hub/entries", page(self.entries), methods=["GET"]),
            Route("/hub/entries/{entry_id}", page(self.entry), methods=["GET"]),
            Route(
                "/hub/entries/{entry_id}/cancel", page(self.cancel, write=True), methods=["POST"]
            ),
            Route(
                "/hub/entries/{entry_id}/files/{path:path}",
                page(self.artifact, api=True),
                methods=["GET"],
            ),
            Route("/hub/live/entries", page(self.live_entries, api=True), methods=["GET"]),
            Route("/hub/campaigns", page(self.campaigns), methods=["GET"]),
            Route("/hub/campaigns", page(self.start_campaign, write=True), methods=["POST"]),
            Route("/hub/campaigns/{campaign_id}", page(self.campaign), methods=["GET"]),
            Route(
                "/hub/campaigns/{campaign_id}/{action:str}",
                page(self.campaign_action, write=True),
                methods=["POST"],
            ),
            Route(
                "/hub/live/campaigns/{campaign_id}",
                page(self.live_campaign, api=True),
                methods=["GET"],
            ),
            Route("/hub/sites", page(self.sites), methods=["GET"]),
            # Vendored scripts and styles only: public, like the login page that uses them.
            Mount("/hub/static", StaticFiles(directory=HERE / "static"), name="hub_static"),
        ]

    def _page(self, handler: Handler, *, write: bool = False, api: bool = False) -> Any:
        async def endpoint(request: Request) -> Response:
            session = self.sessions.read(request)
            if session is None:
                if write or api:
                    return Response("sign in first", status_code=401, media_type="text/plain")
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            if write:
                form = await request.form()
                if not csrf_ok(session.csrf, form.get("csrf")):
                    return Response(
                        "missing or wrong CSRF token", status_code=403, media_type="text/plain"
                    )
                if not session.may("submit") and handler != self.logout:
                    return self.render(
                        request,
                        session,
                        "error.html",
                        {"error": "your sign-in may only read"},
                        status=403,
                    )
            try:
                return await handler(request, session)
            except NotFound as exc:
                return self.render(request, session, "error.html", {"error": exc.text()}, 404)
            except NotAllowed as exc:
                return self.render(request, session, "error.html", {"error": exc.text()}, 403)

        return endpoint

    def render(
        self,
        request: Request,
        session: Session | None,
        name: str,
        context: dict[str, Any],
        status: int = 200,
    ) -> Response:
        body = self.templates.get_template(name).render(
            session=session, path=request.url.path, **context
        )
        raw = body.encode()
        headers = {
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            "referrer-policy": "same-origin",
            "x-frame-options": "DENY",
        }
        if len(raw) >= GZIP_MIN and "gzip" in request.headers.get("accept-encoding", ""):
            raw = gzip.compress(raw, compresslevel=6)
            headers["content-encoding"] = "gzip"
            headers["vary"] = "accept-encoding"
        return Response(raw, status, headers=headers, media_type="text/html; charset=utf-8")

    # ---- signing in ------------------------------------------------------------------------

    def _next(self, request: Request, given: object = None) -> str:
        target = given if isinstance(given, str) else request.query_params.get("next", "/")
        parts = urlsplit(target)
        # only a path on this server: never an open redirect
        if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
            return "/"
        return target

    async def login(self, request: Request) -> Response:
        error = None
        state = self.sessions.login_state(request)
        if request.method == "POST":
            form = await request.form()
            if not csrf_ok(str(state.get("csrf", "")), form.get("csrf")):
                return Response("missing or wrong CSRF token", 403, media_type="text/plain")
            token = str(form.get("token", "")).strip()
            access = None
            if self.auth is not None and token:
                try:
                    access = await self.auth.verify_token(token)
                except Exception:  # a refused token is no sign-in
                    access = None
            if access is not None and {"read", "submit", "admin"} & set(access.scopes):
                response = RedirectResponse(self._next(request, form.get("next")), 303)
                self.sessions.start(
                    response, request, token_principal(access), access.scopes, access.expires_at
                )
                return response
            error = (
                "that token is not accepted here (expired, for another server, or no read scope)"
                if self.auth is not None
                else "this server takes no tokens"
            )
        csrf = str(state.get("csrf") or secrets.token_urlsafe(24))
        page = self.render(
            request,
            None,
            "login.html",
            {
                "csrf": csrf,
                "next": self._next(request),
                "error": error,
                "oidc": self.oidc is not None,
                "once": self.once is not None,
                "tokens": self.auth is not None,
            },
            status=401 if error else 200,
        )
        self.sessions.set_login_state(page, request, {**state, "csrf": csrf})
        return page

    async def login_once(self, request: Request) -> Response:
        code = request.query_params.get("code", "")
        if self.once is None or not csrf_ok(self.once, code):
            return Response("that sign-in link is not valid (any more)", 403)
        self.once = secrets.token_urlsafe(24)
        print(f"sciorch: the next web hub sign-in link: {self.login_link()}", file=sys.stderr)
        response = RedirectResponse(self._next(request), 303)
        self.sessions.start(response, request, local_principal(), ["read", "submit"])
        return response

    async def login_oidc(self, request: Request) -> Response:
        if self.oidc is None:
            return Response("no identity provider is configured", 404)
        url, kept = await self.oidc.start()
        response = RedirectResponse(url, 303)
        self.sessions.set_login_state(response, request, {**kept, "next": self._next(request)})
        return response

    async def login_oidc_callback(self, request: Request) -> Response:
        if self.oidc is None or self.auth is None:
            return Response("no identity provider is configured", 404)
        kept = self.sessions.login_state(request)
        q = request.query_params
        try:
            if "error" in q:
                raise NotAllowed(f"the identity provider said: {q['error']}", field="code")
            token = await self.oidc.finish(q.get("code", ""), q.get("state", ""), kept)
            access = await self.auth.verify_token(token)
            if access is None:
                raise NotAllowed("the identity provider's token is not accepted here")
        except SciorchError as exc:
            return self.render(request, None, "error.html", {"error": exc.text()}, 403)
        response = RedirectResponse(self._next(request, kept.get("next")), 303)
        self.sessions.start(
            response, request, token_principal(access), access.scopes, access.expires_at
        )
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        response = RedirectResponse("/login", 303)
        self.sessions.end(response)
        return response

    # ---- catalogue and launching -----------------------------------------------------------

    async def catalogue(self, request: Request, session: Session) -> Response:
        services = await ops.list_services(self.engine, session.principal)
        return self.render(request, session, "catalogue.html", {"services": services.services})

    async def _service(self, name: str, who: Principal) -> Any:
        listing = await ops.list_services(self.engine, who)
        for s in listing.services:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in listing.services)
        raise NotFound(f"no service {name!r}; known: {known}", field="service")

    async def _launch_page(
        self,
        request: Request,
        session: Session,
        service: Any,
        values: dict[str, Any] | None = None,
        error: SciorchError | None = None,
        chosen: dict[str, str] | None = None,
    ) -> Response:
        fields = forms.fields_for(service.parameters, values)
        named = forms.field_of(error.field) if error else None
        for f in fields:
            if f.name == named and error is not None:
                f.error = error.message
        events = await ops.list_events(self.engine, session.principal)
        sites = await ops.list_sites(self.engine, session.principal)
        other = None
        if error is not None and named not in {f.name for f in fields}:
            other = error
        return self.render(
            request,
            session,
            "launch.html",
            {
                "service": service,
                "fields": fields,
                "events": [e for e in events.events if e.state.value == "active"],
                "sites": sites.sites,
                "error": other,
                "chosen": chosen or {},
            },
            status=400 if error else 200,
        )

    async def launch_form(self, request: Request, session: Session) -> Response:
        service = await self._service(request.path_params["service"], session.principal)
        chosen = {"event_id": request.query_params.get("event", "")}
        return await self._launch_page(request, session, service, chosen=chosen)

    async def launch(self, request: Request, session: Session) -> Response:
        service = await self._service(request.path_params["service"], session.principal)
        form = {k: str(v) for k, v in (await request.form()).items()}
        chosen = {k: form.get(k, "") for k in ("event_id", "site", "version")}
        try:
            params = forms.parameters_from(service.parameters, form)
            name = service.name
            if chosen["version"] and chosen["version"] != service.version:
                name = f"{service.name}@{chosen['version']}"
            common: dict[str, Any] = {
                "service": name,
                "parameters": params,
                "event_id": chosen["event_id"] or None,
                "site": chosen["site"] or None,
            }
            if service.kind == "service":
                view = await ops.launch_service(
                    self.engine, session.principal, LaunchServiceInput.model_validate(common)
                )
            else:
                view = await ops.submit_job(
                    self.engine, session.principal, SubmitJobInput.model_validate(common)
                )
        except SciorchError as exc:
            values = {k.removeprefix(forms.PREFIX): v for k, v in form.items()}
            return await self._launch_page(request, session, service, values, exc, chosen)
        return RedirectResponse(f"/hub/entries/{view.id}", 303)

    # ---- events ----------------------------------------------------------------------------

    async def events(
        self, request: Request, session: Session, error: SciorchError | None = None
    ) -> Response:
        events = await ops.list_events(self.engine, session.principal)
        sites = await ops.list_sites(self.engine, session.principal)
        return self.render(
            request,
            session,
            "events.html",
            {"events": events.events, "sites": sites.sites, "error": error},
            status=400 if error else 200,
        )

    async def create_event(self, request: Request, session: Session) -> Response:
        form = await request.form()
        try:
            ttl = str(form.get("ttl_seconds", "")).strip()
            req = CreateEventInput.model_validate(
                {
                    "name": str(form.get("name", "")).strip() or None,
                    "site": str(form.get("site", "")) or None,
                    "ttl_seconds": int(ttl) if ttl else None,
                }
            )
            await ops.create_event(self.engine, session.principal, req)
        except ValueError as exc:
            return await self.events(request, session, _typed(exc, "ttl_seconds"))
        except SciorchError as exc:
            return await self.events(request, session, exc)
        return RedirectResponse("/hub/events", 303)

    async def event_action(self, request: Request, session: Session) -> Response:
        event_id, action = request.path_params["event_id"], request.path_params["action"]
        form = await request.form()
        try:
            if action == "share":
                req = ShareEventInput.model_validate(
                    {
                        "event_id": event_id,
                        "principal": str(form.get("principal", "")).strip(),
                        "role": str(form.get("role", "viewer")),
                    }
                )
                await ops.share_event(self.engine, session.principal, req)
            elif action == "stop":
                await ops.stop_event(self.engine, session.principal, EventRef(event_id=event_id))
            else:
                raise NotFound(f"no event action {action!r}; known: share, stop", field="action")
        except ValueError as exc:
            return await self.events(request, session, _typed(exc, "principal"))
        except (InvalidInput, NotAllowed) as exc:
            return await self.events(request, session, exc)
        return RedirectResponse("/hub/events", 303)

    # ---- entries ---------------------------------------------------------------------------

    async def entries(self, request: Request, session: Session) -> Response:
        event_id = request.query_params.get("event") or None
        cursor = request.query_params.get("cursor") or None
        try:
            page = await ops.list_entries(
                self.engine,
                session.principal,
                ListEntriesInput(event_id=event_id, cursor=cursor, limit=ENTRIES_PAGE),
            )
        except InvalidInput as exc:
            return self.render(request, session, "error.html", {"error": exc.text()}, 400)
        return self.render(
            request,
            session,
            "entries.html",
            {
                "entries": page.entries,
                "next_cursor": page.next_cursor,
                "event_id": event_id,
                "last_page": page.next_cursor is None,
            },
        )

    async def entry(self, request: Request, session: Session) -> Response:
        entry_id = request.path_params["entry_id"]
        who = session.principal
        view = await ops.get_entry(self.engine, who, EntryRef(entry_id=entry_id))
        results = await ops.read_results(self.engine, who, ReadResultsInput(entry_id=entry_id))
        logs = await ops.read_logs(self.engine, who, ReadLogsInput(entry_id=entry_id))
        return self.render(
            request,
            session,
            "entry.html",
            {"entry": view, "results": results, "logs": logs, "final": view.state.terminal},
        )

    async def cancel(self, request: Request, session: Session) -> Response:
        entry_id = request.path_params["entry_id"]
        await ops.cancel_entry(self.engine, session.principal, EntryRef(entry_id=entry_id))
        return RedirectResponse(f"/hub/entries/{entry_id}", 303)

    async def artifact(self, request: Request, session: Session) -> Response:
        downloads = _Downloads(self.engine, session.principal)
        p = request.path_params
        return await downloads.download(request, p["entry_id"], p["path"])

    async def live_entries(self, request: Request, session: Session) -> Response:
        q = request.query_params
        log_from = q.get("log")
        try:
            offset = int(log_from) if log_from is not None else None
        except ValueError:
            return Response("log: a byte offset", 400, media_type="text/plain")
        stream = live.entry_stream(
            self.engine, session.principal, q.get("event"), q.get("entry"), offset
        )
        return _event_stream(stream)

    # ---- campaigns -------------------------------------------------------------------------

    @property
    def campaign_tools(self) -> dict[str, ToolSpec]:
        if self._campaigns is None:
            manager = campaign_manager(self.engine)
            self._campaigns = {t.name: t for t in steering_tools(manager)}
        return self._campaigns

    async def _campaign_call(self, name: str, who: Principal, args: dict[str, Any]) -> Any:
        spec = self.campaign_tools[name]
        try:
            assert spec.input is not None
            req = spec.input.model_validate(args)
        except ValueError as exc:
            raise _typed(exc, "campaign") from None
        return await spec.op(self.engine, who, req)

    async def campaigns(
        self,
        request: Request,
        session: Session,
        error: SciorchError | None = None,
        text: str = CAMPAIGN_EXAMPLE,
    ) -> Response:
        listing = await self._campaign_call("list_campaigns", session.principal, {})
        return self.render(
            request,
            session,
            "campaigns.html",
            {"campaigns": listing.campaigns, "error": error, "spec_text": text},
            status=400 if error else 200,
        )

    async def start_campaign(self, request: Request, session: Session) -> Response:
        text = str((await request.form()).get("spec", ""))
        try:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise InvalidInput(f"not TOML: {exc}", field="spec") from None
            view = await self._campaign_call("start_campaign", session.principal, data)
        except SciorchError as exc:
            return await self.campaigns(request, session, exc, text)
        return RedirectResponse(f"/hub/campaigns/{view.id}", 303)

    async def campaign(
        self,
        request: Request,
        session: Session,
        failed: tuple[str, SciorchError] | None = None,
        form: dict[str, str] | None = None,
    ) -> Response:
        who = session.principal
        cid = request.path_params["campaign_id"]
        view = await self._campaign_call("get_campaign", who, {"campaign_id": cid})
        events = await ops.list_events(self.engine, who)
        action, error = failed if failed is not None else ("", None)
        given = {k.removeprefix(forms.PREFIX): v for k, v in (form or {}).items()}
        beside = steer.beside(action, error)
        point_error = error if action == "points" and beside else None
        fields = steer.point_fields(view.spec, given if action == "points" else None, point_error)
        return self.render(
            request,
            session,
            "campaign.html",
            {
                "c": view,
                "may_steer": steer.may_steer(who, view, events.events),
                "point_fields": fields,
                "pending": steer.pending(view),
                "failed": action,
                "error": error,
                "beside": beside,  # else the page shows it, above the forms
                "form": form or {},
            },
            status=400 if error else 200,
        )

    async def campaign_action(self, request: Request, session: Session) -> Response:
        cid, action = request.path_params["campaign_id"], request.path_params["action"]
        if action not in steer.ACTIONS:
            known = ", ".join(steer.ACTIONS)
            raise NotFound(f"no campaign action {action!r}; known: {known}", field="action")
        form = {k: str(v) for k, v in (await request.form()).items()}
        note = form.get("note", "").strip() or None
        args: dict[str, Any] = {"campaign_id": cid}
        try:
            if action == "points":
                view = await self._campaign_call(
                    "get_campaign", session.principal, {"campaign_id": cid, "evaluations": False}
                )
                args |= {"points": [steer.point_from(view.spec, form)], "note": note}
            elif action == "reject":
                args |= {"point_id": form.get("point_id", ""), "note": note}
            elif action == "annotate":
                args["text"] = form.get("text", "").strip()
            elif action == "budget":
                budget: dict[str, Any] = (
                    {"evaluations": int(form["evaluations"])} if form.get("evaluations") else {}
                )
                if form.get("wall_time", "").strip():  # '2h', '90m', '01:30:00' or seconds
                    budget["wall_time_s"] = form["wall_time"].strip()
                args |= {"budget": budget, "note": note}
            await self._campaign_call(steer.ACTIONS[action], session.principal, args)
        except ValueError as exc:  # an evaluations field that is no whole number
            return await self.campaign(
                request, session, (action, _typed(exc, "budget.evaluations")), form
            )
        except (InvalidInput, NotFound) as exc:
            if isinstance(exc, NotFound) and exc.field == "campaign_id":
                raise  # a 404, as for a page that is not there
            return await self.campaign(request, session, (action, exc), form)
        return RedirectResponse(f"/hub/campaigns/{cid}", 303)

    async def live_campaign(self, request: Request, session: Session) -> Response:
        cid = request.path_params["campaign_id"]
        who = session.principal

        async def view() -> dict[str, Any]:
            c: CampaignView = await self._campaign_call("get_campaign", who, {"campaign_id": cid})
            return chart_data(c)

        manager = campaign_manager(self.engine)
        return _event_stream(live.campaign_stream(manager.listeners, cid, view))

    # ---- sites -----------------------------------------------------------------------------

    async def sites(self, request: Request, session: Session) -> Response:
        sites = await ops.list_sites(self.engine, session.principal)
        return self.render(request, session, "sites.html", {"sites": sites.sites})


def chart_data(c: CampaignView) -> dict[str, Any]:
    """What the campaign page's chart and table need: each finished evaluation's value and
    the best so far, in the order they were asked."""
    points = []
    best: float | None = None
    sign = -1.0 if c.goal == "maximise" else 1.0
    for e in c.evaluations or []:
        if e.value is not None:
            best = e.value if best is None or sign * e.value < sign * best else best
        points.append(
            {
                "seq": e.seq,
                "point": e.point,
                "state": e.state,
                "value": e.value,
                "best": best if e.value is not None else None,
                "entry_id": e.entry_id,
                "point_id": e.point_id,
                "source": e.source,
                "reason": e.reason,
            }
        )
    return {
        "id": c.id,
        "state": c.state,
        "paused": c.paused,
        "progress": c.progress.model_dump(mode="json"),
        "best": c.best.model_dump(mode="json") if c.best else None,
        "posterior": c.posterior.model_dump(mode="json") if c.posterior else None,
        "reference": c.reference,
        "points": points,
        "actions": [
            {"at": a.at.isoformat(), "principal": a.principal, "action": a.action, **_said(a)}
            for a in c.actions or []
        ],
    }


def _said(a: Any) -> dict[str, Any]:
    """An action's words for the page: a note's text, or what changed."""
    args = a.arguments or {}
    text = args.get("text") or args.get("note")
    detail = {k: v for k, v in args.items() if k not in ("text", "note") and v is not None}
    return {"text": text, "detail": detail}


def _typed(exc: ValueError, field: str) -> InvalidInput:
    from pydantic import ValidationError

    from ground.errors import invalid_input

    if isinstance(exc, ValidationError):
        return invalid_input(exc)
    return InvalidInput(f"{field}: {exc}", field=field)


def _event_stream(body: Any) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


__all__ = ["EntryState", "Hub"]
