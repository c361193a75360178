"""Bearer tokens for the HTTP transport: an RSA key pair the server makes on first start (in
$SCIORCH_HOME/keys), tokens signed with it (`sciorch token create`), and the verifier that checks
issuer, audience, expiry and signature. Scopes: read, submit, admin."""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastmcp.server.auth import AccessToken
from fastmcp.server.auth.providers.jwt import JWTVerifier
from starlette.authentication import AuthenticationError
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from ground.errors import InvalidInput

ISSUER = "sciorch"
AUDIENCE = "sciorch-mcp"
SCOPES = ("read", "submit", "admin", "sciorch.urgent")
PRIVATE = "mcp-signing.pem"
PUBLIC = "mcp-signing.pub.pem"


def ensure_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """(private PEM, public PEM), generated once; the private key file is mode 0600."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    priv, pub = keys_dir / PRIVATE, keys_dir / PUBLIC
    if not priv.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = keys_dir / f".{PRIVATE}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, priv)  # atomic, and never replaces a key another process just made
        except FileExistsError:
            pass
        tmp.unlink()
    private_pem = priv.read_bytes()
    if not pub.exists():
        loaded = serialization.load_pem_private_key(private_pem, password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        pub.write_bytes(
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private_pem, pub.read_bytes()


def parse_scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise InvalidInput(
            f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}", field="scopes"
        )
    if not scopes:
        raise InvalidInput("at least one scope is needed", field="scopes")
    return scopes


def create_token(keys_dir: Path, sub: str, scopes: list[str], ttl_s: int) -> str:
    if not sub.strip() or len(sub) > MAX_SUB_CHARS:
        raise InvalidInput(f"sub must be 1 to {MAX_SUB_CHARS} characters", field="sub")
    if ttl_s <= 0:
        raise InvalidInput("ttl must be positive", field="ttl")
    private_pem, _ = ensure_keys(keys_dir)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": now + ttl_s,
        "scope": " ".join(scopes),
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, private_pem, algorithm="RS256")


VERIFIED_TOKENS_KEPT = 1024


class VerifiedTokens:
    """Tokens already verified, honoured from memory until they expire (the most recently
    used VERIFIED_TOKENS_KEPT of them): both verifiers check a token once, not every request."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, AccessToken] = OrderedDict()

    def get(self, token: str) -> AccessToken | None:
        known = self._kept.get(token)
        if known is not None:
            if known.expires_at is not None and known.expires_at > time.time():
                self._kept.move_to_end(token)
                return known
            del self._kept[token]
        return None

    def keep(self, token: str, access: AccessToken) -> None:
        self._kept[token] = access
        if len(self._kept) > VERIFIED_TOKENS_KEPT:
            self._kept.popitem(last=False)
CLOCK_SKEW_S = 30
MAX_SUB_CHARS = 200  # Principal.id


class TokenRefused(AuthenticationError):
    """A token that is signed and current but names no usable principal, or is not valid
    yet: refused with 401 and the reason (fastmcp's verifier checks neither)."""


def claims_problem(claims: dict[str, Any]) -> str | None:
    """Why a verified token's claims cannot be honoured, or None."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        return "the token names no principal: its 'sub' claim is missing or empty"
    if len(sub) > MAX_SUB_CHARS:
        return f"the token's 'sub' is longer than {MAX_SUB_CHARS} characters"
    nbf = claims.get("nbf")
    if nbf is not None:
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            return "the token's 'nbf' claim is not a time"
        if nbf > time.time() + CLOCK_SKEW_S:
            return "the token is not valid yet: its 'nbf' is in the future"
    return None


def _refused(conn: HTTPConnection, exc: Exception) -> Response:
    reason = str(exc).replace('"', "'")
    return JSONResponse(
        {"error": "invalid_token", "error_description": reason},
        status_code=401,
        headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'},
    )


class _ExpiringJWTVerifier(JWTVerifier):
    """JWTVerifier checks `exp` only when a token has one; ours must have one.

    A client sends the same token with every request, and checking it (joserfc imports the
    PEM key and verifies the RS256 signature each time) is about a tenth of a get_entry over
    HTTP: a verified token is remembered, and honoured from memory until it expires. The key
    does not change while the server runs, and tokens are not revocable before `exp` anyway.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._verified = VerifiedTokens()

    async def load_access_token(self, token: str) -> AccessToken | None:
        known = self._verified.get(token)
        if known is not None:
            return known
        access = await super().load_access_token(token)
        if access is None or access.expires_at is None:
            return None
        problem = claims_problem(access.claims)
        if problem is not None:
            self.logger.info("Bearer token refused: %s", problem)
            raise TokenRefused(problem)
        self._verified.keep(token, access)
        return access

    def get_middleware(self) -> list[Middleware]:
        # starlette answers an AuthenticationError with a plain 400: a refused token is a 401.
        return [
            Middleware(m.cls, *m.args, **{**m.kwargs, "on_error": _refused})
            if m.cls is AuthenticationMiddleware
            else m
            for m in super().get_middleware()
        ]


def verifier(keys_dir: Path) -> JWTVerifier:
    _, public_pem = ensure_keys(keys_dir)
    return _ExpiringJWTVerifier(
        public_key=public_pem.decode(), issuer=ISSUER, audience=AUDIENCE, algorithm="RS256"
    )
