"""The HTTP endpoint as an OAuth 2.1 resource server (the MCP authorization spec): it accepts
access tokens issued for it (RFC 8707 audience) by the facility's identity provider, checked
against the issuer's keys found by OIDC discovery, and publishes Protected Resource Metadata
(RFC 9728) naming that provider, so that a remote assistant needs only the server's URL.
Tokens from `sciorch token create` are accepted too (the embedded default, and alongside an
IdP unless `[auth] self_minted = false`).

A refused token gets 401 with `error="invalid_token", error_description="<why>"`; a request
without one gets 401 with `resource_metadata` (where to start the OAuth flow)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastmcp.server.auth import AccessToken, AuthProvider
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from pydantic import AnyHttpUrl
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ground.config import AuthConfig, Role, Settings
from mcp_server.auth import AUDIENCE, ISSUER, SCOPES, VerifiedTokens, ensure_keys

# Asymmetric only: an HS* token would be checked against a shared secret nobody configured.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
# Clock skew allowed between the issuer and this server.
LEEWAY_S = 10
# An unknown kid refetches the issuer's keys (they rotate), but at most this often: otherwise
# a stream of made-up kids would have the server hammer the IdP.
REFRESH_MIN_INTERVAL_S = 10.0
FETCH_TIMEOUT_S = 10.0
MCP_PATH = "/mcp"
ROLES: tuple[Role, ...] = get_args(Role)


class TokenRefused(AuthenticationError):
    """A bearer token that is not accepted; the message says why (it goes to the client)."""


class IssuerKeys:
    """One issuer's signing keys: its JWKS, found through OIDC discovery (RFC 8414 metadata as
    a fallback), kept for `cache_s`, and fetched again when a token names a kid not in it."""

    def __init__(
        self, issuer: str, cache_s: float, refresh_min_interval_s: float = REFRESH_MIN_INTERVAL_S
    ) -> None:
        self.issuer = issuer
        self.cache_s = cache_s
        self.refresh_min_interval_s = refresh_min_interval_s
        self.fetches = 0  # JWKS documents fetched (tests and the bench read it)
        self._jwks_uri: str | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._last_try = -math.inf
        self._lock = asyncio.Lock()

    def _cached(self, kid: str | None) -> jwt.PyJWK | None:
        if time.monotonic() - self._fetched_at >= self.cache_s:
            return None
        if kid is None:  # allowed only when there is no choice to make
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def key(self, kid: str | None) -> jwt.PyJWK:
        key = self._cached(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._cached(kid)  # another request may have refreshed meanwhile
            if key is not None:
                return key
            if time.monotonic() - self._last_try >= self.refresh_min_interval_s:
                self._last_try = time.monotonic()
                await self._fetch()
                key = self._cached(kid)
        if key is None:
            raise TokenRefused(f"signing key {kid!r} is not among the keys of issuer {self.issuer}")
        return key

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as http:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover(http)
                response = await http.get(self._jwks_uri)
                response.raise_for_status()
                jwks = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            # Known keys stay usable until they expire; only new kids wait for the IdP.
            why = f"the keys of issuer {self.issuer} could not be fetched: {exc}"
            raise TokenRefused(why) from exc
        self.fetches += 1
        self._keys = {k.key_id: k for k in jwks.keys if k.key_id is not None}
        if not self._keys and len(jwks.keys) == 1:
            self._keys = {"": jwks.keys[0]}
        self._fetched_at = time.monotonic()

    async def _discover(self, http: httpx.AsyncClient) -> str:
        base = self.issuer.rstrip("/")
        parts = urlsplit(base)
        candidates = [
            f"{base}/.well-known/openid-configuration",
            f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
        ]
        for url in candidates:
            response = await http.get(url)
            if response.status_code != 200:
                continue
            meta = response.json()
            if meta.get("issuer") != self.issuer:  # RFC 8414 section 3.3, OIDC discovery 4.3
                raise ValueError(f"{url} names issuer {meta.get('issuer')!r}")
            if isinstance(meta.get("jwks_uri"), str):
                return str(meta["jwks_uri"])
        raise ValueError(f"no metadata with a jwks_uri at {' or '.join(candidates)}")


def _claim_set(value: Any) -> set[str]:
    """A claim that is a space-separated string (OAuth `scope`) or a list (`scp`, groups)."""
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list):
        return {str(v) for v in value}
    return set()


def sciorch_scopes(claims: dict[str, Any], config: AuthConfig) -> list[str]:
    """The sciorch scopes an IdP token grants: through its scopes (`scope` or `scp`) or
    through its groups, as `[auth] scopes` and `[auth] groups` map them."""
    granted = _claim_set(claims.get("scope")) | _claim_set(claims.get("scp"))
    groups = _claim_set(claims.get(config.groups_claim))
    return [
        s
        for s in ROLES
        if (s in config.scopes and config.scopes[s] in granted)
        or groups & set(config.groups.get(s, []))
    ]


def _decode(token: str, key: Any, issuer: str, audience: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=ALGORITHMS,
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenRefused("token expired") from None
    except jwt.InvalidAudienceError:
        aud = jwt.decode(token, options={"verify_signature": False}).get("aud")
        raise TokenRefused(f"token is for audience {aud!r}, not this server ({audience})") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRefused(f"token has no {exc.claim} claim") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("token signature does not verify") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRefused(f"token not accepted: {exc}") from None
    return claims


class ResourceServer(AuthProvider):
    """Bearer-token auth for the HTTP MCP endpoint: self-minted tokens and/or the tokens of
    the configured issuers, each checked for signature, issuer, audience and expiry. A token
    that passed is remembered until it expires (clients send the same one every request)."""

    def __init__(
        self,
        *,
        resource_url: str,
        config: AuthConfig,
        keys_dir: Path | None,
        refresh_min_interval_s: float = REFRESH_MIN_INTERVAL_S,
    ) -> None:
        super().__init__(base_url=resource_url)
        self.resource_url = resource_url
        self.config = config
        self.audience = config.audience or resource_url
        self.issuers = {
            iss: IssuerKeys(iss, config.jwks_cache_s, refresh_min_interval_s)
            for iss in config.issuers
        }
        self._self_minted_key: Any = None
        if keys_dir is not None and (config.self_minted or not config.issuers):
            # loaded once: PyJWT given PEM bytes parses them on every call
            self._self_minted_key = load_pem_public_key(ensure_keys(keys_dir)[1])
        self._verified = VerifiedTokens()

    # ---- verification ---------------------------------------------------------------------

    async def check(self, token: str) -> AccessToken:
        """The token's access, or TokenRefused saying why not."""
        known = self._verified.get(token)
        if known is not None:
            return known
        access = await self._verify(token)
        self._verified.keep(token, access)
        return access

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            return await self.check(token)
        except TokenRefused:
            return None

    async def _verify(self, token: str) -> AccessToken:
        try:  # which key to check it with: read before it is verified
            peek = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise TokenRefused("not a JWT") from None
        header, iss = peek["header"], peek["payload"].get("iss")
        if iss == ISSUER and self._self_minted_key is not None:
            claims = _decode(token, self._self_minted_key, ISSUER, AUDIENCE)
            scopes = sorted(_claim_set(claims.get("scope")) & set(SCOPES))
            return self._access(token, claims, str(claims.get("sub") or ""), scopes)
        keys = self.issuers.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise TokenRefused(f"issuer {iss!r} is not accepted here")
        kid = header.get("kid")
        key = await keys.key(kid if isinstance(kid, str) else None)
        claims = _decode(token, key, keys.issuer, self.audience)
        who = claims.get(self.config.principal_claim)
        if not isinstance(who, str) or not who:
            raise TokenRefused(f"token has no {self.config.principal_claim} claim")
        return self._access(token, claims, who, sciorch_scopes(claims, self.config))

    @staticmethod
    def _access(token: str, claims: dict[str, Any], who: str, scopes: list[str]) -> AccessToken:
        if not who:
            raise TokenRefused("token has no sub claim")
        client = claims.get("client_id") or claims.get("azp") or who
        return AccessToken(
            token=token,
            client_id=str(client),
            scopes=scopes,
            expires_at=int(claims["exp"]),
            subject=who,
            claims=claims,
        )

    # ---- HTTP ------------------------------------------------------------------------------

    @property
    def scopes_supported(self) -> list[str]:
        """The IdP scopes that map to sciorch's, for clients to ask for (RFC 9728)."""
        return [self.config.scopes[s] for s in ROLES if s in self.config.scopes]

    def _get_resource_url(self, path: str | None = None) -> AnyHttpUrl | None:
        # Mounted at /mcp, the MCP app sees its own path as "/": the resource is still /mcp.
        return AnyHttpUrl(self.resource_url)

    @property
    def resource_metadata_url(self) -> str:
        return str(build_resource_metadata_url(AnyHttpUrl(self.resource_url)))

    def get_routes(self, mcp_path: str | None = None) -> list[Route]:
        """The metadata route, so that the MCP app's 401 names it (served at the root by
        `well_known_routes`, which is where clients look)."""
        return self.well_known_routes()[:1]

    def well_known_routes(self) -> list[Route]:
        """RFC 9728 metadata at the path-suffixed URL for /mcp and at the root one; none when
        no issuer is configured (self-minted tokens come from no authorization server)."""
        if not self.issuers:
            return []
        routes = create_protected_resource_routes(
            resource_url=AnyHttpUrl(self.resource_url),
            authorization_servers=[AnyHttpUrl(i) for i in self.issuers],
            scopes_supported=self.scopes_supported or None,
            resource_name="sciorch",
        )
        root = [
            Route("/.well-known/oauth-protected-resource", r.endpoint, methods=r.methods)
            for r in routes
            if isinstance(r, Route)
        ]
        return [*routes, *root]

    def get_middleware(self) -> list[Middleware]:
        return [
            Middleware(AuthenticationMiddleware, backend=_Backend(self), on_error=self._refusal),
            Middleware(AuthContextMiddleware),
        ]

    def _refusal(self, conn: HTTPConnection, exc: AuthenticationError) -> Response:
        why = str(exc).replace("\\", "/").replace('"', "'")
        challenge = (
            f'Bearer error="invalid_token", error_description="{why}", '
            f'resource_metadata="{self.resource_metadata_url}"'
        )
        return JSONResponse(
            {"error": "invalid_token", "error_description": why},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )


class _Backend(AuthenticationBackend):
    """Like the SDK's BearerAuthBackend, but a refused token raises with its reason (the
    middleware turns that into the 401) instead of passing as anonymous."""

    def __init__(self, server: ResourceServer) -> None:
        self.server = server

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, Any] | None:
        header = conn.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None  # no token: RequireAuthMiddleware answers 401 with resource_metadata
        access = await self.server.check(header[7:].strip())
        return AuthCredentials(access.scopes), AuthenticatedUser(access)


def resource_server(settings: Settings) -> ResourceServer:
    """The auth `sciorch serve` uses: its resource is public_url + /mcp."""
    return ResourceServer(
        resource_url=settings.public_url.rstrip("/") + MCP_PATH,
        config=settings.auth,
        keys_dir=settings.keys_dir,
    )
