"""Who a browser is: a session cookie signed by this server (HMAC-SHA256 with a key kept in
$SCIORCH_HOME/keys, so every replica sharing the home accepts it), holding the principal, its
scopes, a CSRF token and an expiry. The cookie is HttpOnly, SameSite=Lax and, when the hub is
reached over https, Secure. Nothing about a session is stored server-side except the key:
signing is what makes it unforgeable, the expiry what bounds it.

CSRF: every form carries the session's token (a signed-out login form the token of a short
pre-login cookie) and every POST is refused unless the form's token matches, compared in
constant time. SameSite=Lax alone would stop most cross-site posts; the token stops the rest
(and same-site subdomains)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ground.models import Principal

COOKIE = "sciorch_hub"
LOGIN_COOKIE = "sciorch_hub_login"
KEY_FILE = "hub-session.key"
SESSION_MAX_S = 12 * 3600
LOGIN_MAX_S = 600


class Session(BaseModel):
    sub: str
    admin: bool = False
    scopes: list[str]
    csrf: str
    exp: int

    @property
    def principal(self) -> Principal:
        return Principal(id=self.sub, admin=self.admin)

    def may(self, scope: str) -> bool:
        implied = {"read": {"read", "submit", "admin"}, "submit": {"submit", "admin"}}
        return bool(implied.get(scope, {scope}) & set(self.scopes))


def session_key(keys_dir: Path) -> bytes:
    """The signing key, made once (mode 0600) and never replaced while a file is there."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    path = keys_dir / KEY_FILE
    if not path.exists():
        tmp = keys_dir / f".{KEY_FILE}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # another process may have just made one: keep theirs
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_bytes()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signed, expiring JSON values for cookies; `purpose` keeps one kind from passing as
    another (a login cookie is no session)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}.{body}".encode(), hashlib.sha256).digest())

    def sign(self, purpose: str, data: dict[str, object]) -> str:
        body = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{body}.{self._mac(purpose, body)}"

    def unsign(self, purpose: str, value: str | None) -> dict[str, object] | None:
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        try:
            data = json.loads(_unb64(body))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int):
            return None
        return data if data["exp"] > time.time() else None


class Sessions:
    def __init__(self, keys_dir: Path) -> None:
        self.signer = Signer(session_key(keys_dir))

    def read(self, request: Request) -> Session | None:
        data = self.signer.unsign("session", request.cookies.get(COOKIE))
        if data is None:
            return None
        try:
            return Session.model_validate(data)
        except ValidationError:
            return None

    def start(
        self,
        response: Response,
        request: Request,
        principal: Principal,
        scopes: list[str],
        expires_at: float | None = None,
    ) -> Session:
        """Sign `principal` in on `response`: never longer than SESSION_MAX_S, nor past the
        expiry of the credential it was made from."""
        exp = int(time.time()) + SESSION_MAX_S
        if expires_at is not None:
            exp = min(exp, int(expires_at))
        session = Session(
            sub=principal.id,
            admin=principal.admin,
            scopes=sorted(scopes),
            csrf=secrets.token_urlsafe(24),
            exp=exp,
        )
        value = self.signer.sign("session", session.model_dump())
        _set(response, request, COOKIE, value, exp - int(time.time()))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return session

    @staticmethod
    def end(response: Response) -> None:
        response.delete_cookie(COOKIE, path="/")

    # ---- the signed-out side: the login form's CSRF token, the OIDC state -----------------

    def login_state(self, request: Request) -> dict[str, object]:
        return self.signer.unsign("login", request.cookies.get(LOGIN_COOKIE)) or {}

    def set_login_state(
        self, response: Response, request: Request, data: dict[str, object]
    ) -> None:
        data = {**data, "exp": int(time.time()) + LOGIN_MAX_S}
        _set(response, request, LOGIN_COOKIE, self.signer.sign("login", data), LOGIN_MAX_S)


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _set(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max(max_age, 0),
        path="/",
        httponly=True,
        secure=secure(request),
        samesite="lax",  # Strict would drop the session on the IdP's redirect back
    )


def csrf_ok(expected: str | None, given: object) -> bool:
    return (
        isinstance(expected, str)
        and isinstance(given, str)
        and bool(expected)
        and hmac.compare_digest(expected, given)
    )
