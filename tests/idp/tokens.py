"""RFC 9068 JWT access tokens for django-oauth-toolkit (its own are opaque strings): signed
with the OIDC key under the kid its JWKS publishes, `aud` the RFC 8707 `resource` of the token
request (else SCIORCH_IDP_AUDIENCE), and the user's Django groups in `groups`."""

from __future__ import annotations

import os
import secrets
import time
from functools import cache
from typing import Any

import jwt
from jwcrypto import jwk
from oauth2_provider.settings import oauth2_settings


@cache
def _signing_key() -> tuple[str, str]:
    pem = oauth2_settings.OIDC_RSA_PRIVATE_KEY
    return pem, jwk.JWK.from_pem(pem.encode()).thumbprint()


def jwt_access_token(request: Any) -> str:
    pem, kid = _signing_key()
    user = request.user
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": oauth2_settings.OIDC_ISS_ENDPOINT,
        "sub": user.get_username(),
        "aud": request.resource or os.environ.get("SCIORCH_IDP_AUDIENCE", ""),
        "client_id": request.client_id or request.client.client_id,
        "scope": " ".join(request.scopes or []),
        "groups": sorted(g.name for g in user.groups.all()),
        "iat": now,
        "exp": now + int(request.expires_in or oauth2_settings.ACCESS_TOKEN_EXPIRE_SECONDS),
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})
