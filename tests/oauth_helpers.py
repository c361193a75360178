"""The OAuth side of the tests: the test identity provider that scripts/test.d/20-idp.sh runs
(tests/idp), a person logging in at it done headlessly with httpx (login form, consent form,
the redirect carrying the code), the official SDK client's OAuthClientProvider wired to that,
and a sciorch HTTP server whose [auth] names the IdP."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx2
import mcp
import pytest
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from mcp_server.oauth import ResourceServer, resource_server
from mcp_server.server import create_server
from mcp_server.transport import mcp_mount
from orchestrator.engine import Engine
from sciorch.web.app import create_http_app
from tests.conftest import make_settings, shutdown
from tests.idp import CLIENT_ID, REDIRECT_URI, USERS
from tests.mcp_helpers import RunningServer, free_socket, serve_asgi

MISSING = (
    "no test identity provider: run the tests through scripts/test.sh "
    "(scripts/test.d/20-idp.sh starts it and sets SCIORCH_IDP_URL)"
)


def idp_issuer() -> str:
    """The test IdP's issuer URL; skip without it, but fail under CI=true."""
    url = os.environ.get("SCIORCH_IDP_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {MISSING}")
        pytest.skip(MISSING)
    return url


def idp_signing_key() -> bytes:
    """The IdP's own private key (to make tokens it would have made, e.g. expired ones)."""
    return (Path(os.environ["SCIORCH_IDP_STATE"]) / "oidc-signing.pem").read_bytes()


class _Forms(HTMLParser):
    """The forms of a page: action and the inputs that have a name and a value."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, str]] = {}
        self._current: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = self.forms.setdefault(a.get("id", ""), {})
        elif tag == "input" and self._current is not None and a.get("name"):
            if a.get("type") == "hidden":
                self._current[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


async def log_in(authorize_url: str, user: str) -> AuthorizationCodeResult:
    """What a person does in the browser: open the authorization URL, log in at the IdP's form,
    press Authorize on its consent page; the redirect to the client carries the code."""
    async with httpx2.AsyncClient(follow_redirects=False, timeout=30) as http:
        response = await http.get(authorize_url)
        for _ in range(10):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if location.startswith(REDIRECT_URI):
                    query = parse_qs(urlsplit(location).query)
                    if "error" in query:
                        raise AssertionError(f"the IdP refused: {query}")
                    return AuthorizationCodeResult(
                        code=query["code"][0],
                        state=query.get("state", [None])[0],
                        iss=query.get("iss", [None])[0],
                    )
                response = await http.get(location)
                continue
            assert response.status_code == 200, (response.status_code, response.text[:500])
            parser = _Forms()
            parser.feed(response.text)
            if "login" in parser.forms:
                fields = {**parser.forms["login"], "username": user, "password": USERS[user]}
            elif "authorizationForm" in parser.forms:
                fields = {**parser.forms["authorizationForm"], "allow": "Authorize"}
            else:
                raise AssertionError(f"unexpected IdP page: {response.text[:500]}")
            response = await http.post(str(response.url), data=fields)
    raise AssertionError("the IdP never redirected back to the client")


@dataclass
class MemoryStorage:
    """The SDK's TokenStorage, in memory, with the pre-registered client; keeps every token
    set it was given (a refresh adds one)."""

    client: OAuthClientInformationFull | None
    issued: list[OAuthToken] = field(default_factory=list)

    async def get_tokens(self) -> OAuthToken | None:
        return self.issued[-1] if self.issued else None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.issued.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def oauth_provider(mcp_url: str, user: str) -> tuple[OAuthClientProvider, MemoryStorage]:
    """The SDK's OAuth client for `mcp_url`, using the client pre-registered at the IdP and a
    headless `user` at the login and consent pages."""
    storage = MemoryStorage(
        OAuthClientInformationFull(
            client_id=CLIENT_ID,
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
        )
    )
    codes: list[AuthorizationCodeResult] = []

    async def redirect(url: str) -> None:
        codes.append(await log_in(url, user))

    async def callback() -> AuthorizationCodeResult:
        return codes.pop()

    provider = OAuthClientProvider(
        server_url=mcp_url,
        client_metadata=OAuthClientMetadata(
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
            client_name="sciorch tests",
            grant_types=["authorization_code", "refresh_token"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=redirect,
        callback_handler=callback,
    )
    return provider, storage


@contextlib.asynccontextmanager
async def oauth_client(
    mcp_url: str, user: str
) -> AsyncIterator[tuple[mcp.Client, OAuthClientProvider, MemoryStorage]]:
    """The official SDK client over streamable HTTP (current protocol), authorizing as `user`
    the standard way: 401, metadata discovery, authorization code with PKCE, token."""
    provider, storage = oauth_provider(mcp_url, user)
    async with httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30, read=300)) as http:
        async with mcp.Client(streamable_http_client(mcp_url, http_client=http)) as client:
            yield client, provider, storage


async def idp_token(resource: str, user: str = "alice", scope: str = "sciorch.read") -> str:
    """An access token from the IdP for `resource`, by the authorization code flow with PKCE
    done by hand (to ask for a resource no sciorch server names)."""
    issuer = idp_issuer()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": secrets.token_urlsafe(8),
        "code_challenge": challenge.rstrip(b"=").decode(),
        "code_challenge_method": "S256",
        "resource": resource,
    }
    code = await log_in(f"{issuer}/authorize/?{urlencode(query)}", user)
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{issuer}/token/",
            data={
                "grant_type": "authorization_code",
                "code": code.code,
                "redirect_uri": REDIRECT_URI,
                "client_id": CLIENT_ID,
                "code_verifier": verifier,
                "resource": resource,
            },
        )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@dataclass
class OAuthServer(RunningServer):
    """One that takes the identity provider's tokens."""

    auth: ResourceServer


@contextlib.asynccontextmanager
async def run_oauth_server(
    home: Path, settings: dict[str, Any] | None = None, **auth: Any
) -> AsyncIterator[OAuthServer]:
    """A real engine and its HTTP app on a free loopback port, with the auth `sciorch serve`
    builds from settings: [auth] issuers = the test IdP, plus `auth` (and other `settings`)."""
    sock = free_socket()
    host, port = sock.getsockname()[:2]
    config = {"issuers": [idp_issuer()], **auth}
    engine = await Engine.open(
        make_settings(home, public_url=f"http://{host}:{port}", auth=config, **(settings or {}))
    )
    try:
        server_auth = resource_server(engine.settings)
        routes, lifespans = mcp_mount(create_server(engine, auth=server_auth), engine.settings)
        app = create_http_app(engine, extra_routes=routes, lifespans=lifespans)
        async with serve_asgi(app, sock) as base:
            yield OAuthServer(engine=engine, auth=server_auth, base=base)
    finally:
        await shutdown(engine)
