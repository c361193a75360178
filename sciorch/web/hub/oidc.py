"""Signing in at the facility's identity provider: OpenID Connect authorization code with PKCE
(S256) against the first `[auth] issuers` entry, as the public client `[auth] hub_client_id`.
The hub asks for an access token for its own MCP resource (RFC 8707 `resource`, so the `aud`
is the one /mcp checks) and then checks it exactly as /mcp would, with the same ResourceServer:
the browser is trusted for no more than an MCP client holding that token would be. The state,
nonce and code verifier travel in the signed, short-lived pre-login cookie."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import urlencode

import httpx

from ground.config import Settings
from ground.errors import NotAllowed

CALLBACK = "/login/oidc/callback"
TIMEOUT_S = 10.0


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OIDCLogin:
    def __init__(self, settings: Settings) -> None:
        self.issuer = settings.auth.issuers[0]
        self.client_id = settings.auth.hub_client_id or ""
        base = settings.public_url.rstrip("/")
        self.redirect_uri = base + CALLBACK
        self.resource = settings.auth.audience or base + "/mcp"
        self.scopes = ["openid", *(settings.auth.scopes[s] for s in sorted(settings.auth.scopes))]
        self._meta: dict[str, Any] | None = None

    async def _metadata(self) -> dict[str, Any]:
        if self._meta is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
                response = await http.get(url)
                response.raise_for_status()
                meta = response.json()
            if meta.get("issuer") != self.issuer:
                raise NotAllowed(f"{url} names issuer {meta.get('issuer')!r}", field="issuer")
            self._meta = meta
        return self._meta

    async def start(self) -> tuple[str, dict[str, object]]:
        """The IdP URL to send the browser to, and what the callback must find again."""
        meta = await self._metadata()
        state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
            "state": state,
            "nonce": secrets.token_urlsafe(16),
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
            "resource": self.resource,
        }
        url = f"{meta['authorization_endpoint']}?{urlencode(query)}"
        return url, {"state": state, "verifier": verifier}

    async def finish(self, code: str, state: str, kept: dict[str, object]) -> str:
        """The access token the code is exchanged for (checked by the caller)."""
        if not kept.get("state") or not secrets.compare_digest(str(kept["state"]), state):
            raise NotAllowed("the sign-in's state does not match: start again", field="state")
        meta = await self._metadata()
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            response = await http.post(
                meta["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.redirect_uri,
                    "client_id": self.client_id,
                    "code_verifier": str(kept.get("verifier", "")),
                    "resource": self.resource,
                },
            )
        if response.status_code != 200:
            raise NotAllowed(
                f"the identity provider refused the code: {response.text[:200]}", field="code"
            )
        token = response.json().get("access_token")
        if not isinstance(token, str):
            raise NotAllowed("the identity provider returned no access token", field="code")
        return token
