"""sciorch as an OAuth 2.1 resource server for a facility identity provider (issue 13): a real
authorization server (tests/idp: django-oauth-toolkit with OIDC, started by
scripts/test.d/20-idp.sh) and the official MCP SDK client's OAuth support running the whole
flow headlessly. Without the IdP these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastmcp.server.auth.providers.jwt import RSAKeyPair
from jwcrypto import jwk

from ground.config import AuthConfig
from mcp_server.auth import create_token
from mcp_server.oauth import ResourceServer, TokenRefused, sciorch_scopes
from tests.mcp_helpers import free_socket, sdk_client, structured
from tests.oauth_helpers import (
    idp_issuer,
    idp_signing_key,
    idp_token,
    oauth_client,
    run_oauth_server,
)

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    },
}
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2026-07-28",
    "Mcp-Method": "tools/list",
}


async def post_mcp(url: str, token: str | None) -> httpx2.Response:
    headers = dict(HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # follow_redirects: POST /mcp is redirected (307) to the mount's /mcp/
    async with httpx2.AsyncClient(timeout=30, follow_redirects=True) as http:
        return await http.post(url, json=INIT, headers=headers)


def idp_kid() -> str:
    return str(jwk.JWK.from_pem(idp_signing_key()).thumbprint())


def signed(key: bytes | str, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "alice", "scope": "sciorch.read", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def test_protected_resource_metadata_names_the_idp(home: Path) -> None:
    async with run_oauth_server(home) as server:
        async with httpx2.AsyncClient(timeout=30) as http:
            for path in ("/.well-known/oauth-protected-resource/mcp",
                         "/.well-known/oauth-protected-resource"):
                response = await http.get(server.base + path)
                assert response.status_code == 200, path
                meta = response.json()
                assert meta["resource"] == server.mcp_url
                assert meta["authorization_servers"] == [idp_issuer()]
                assert meta["scopes_supported"] == ["sciorch.read", "sciorch.submit"]
                assert meta["bearer_methods_supported"] == ["header"]
        response = await post_mcp(server.mcp_url, None)
        assert response.status_code == 401
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        assert f'resource_metadata="{server.base}/.well-known/oauth-protected-resource/mcp"' in (
            challenge
        )


async def test_sdk_client_authorizes_at_the_idp_and_acts_as_its_user(home: Path) -> None:
    async with run_oauth_server(home) as server:
        async with oauth_client(server.mcp_url, "alice") as (alice, provider, storage):
            event = structured(await alice.call_tool("create_event", {"name": "alice-only"}))
            [issued] = storage.issued
            claims = jwt.decode(issued.access_token, options={"verify_signature": False})
            # RFC 8707: the IdP made the token for this server, because the client asked.
            assert claims["aud"] == server.mcp_url
            assert claims["iss"] == idp_issuer()
            assert claims["sub"] == "alice"
            assert issued.refresh_token

            # Refresh: once the client holds its token for expired, it uses the refresh token
            # (no login) and goes on with the new access token.
            provider.context.token_expiry_time = time.time() - 1
            listed = structured(await alice.call_tool("list_events", {}))
            assert event["id"] in [e["id"] for e in listed["events"]]
            assert len(storage.issued) == 2
            assert storage.issued[1].access_token != issued.access_token

        async with oauth_client(server.mcp_url, "bob") as (bob, _, _):
            listed = structured(await bob.call_tool("list_events", {}))
            assert event["id"] not in [e["id"] for e in listed["events"]]
        alice_events = await server.engine.list_events(_principal("alice"))
        assert [e.id for e in alice_events if e.name == "alice-only"] == [event["id"]]


def _principal(who: str) -> Any:
    from ground.models import Principal

    return Principal(id=who)


async def test_refused_tokens_get_401_with_the_reason(home: Path) -> None:
    async with run_oauth_server(home) as server:
        issuer, key, kid = idp_issuer(), idp_signing_key(), idp_kid()
        good = signed(key, kid, iss=issuer, aud=server.mcp_url)
        ok = await post_mcp(server.mcp_url, good)
        assert ok.status_code == 200, ok.text
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        stranger_pem = stranger.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cases = {
            "token is for audience 'http://127.0.0.1:9/elsewhere/mcp'": await idp_token(
                "http://127.0.0.1:9/elsewhere/mcp"
            ),
            "token expired": signed(
                key, kid, iss=issuer, aud=server.mcp_url, exp=int(time.time()) - 120
            ),
            "signing key 'rotated-away' is not among the keys of issuer": signed(
                stranger_pem, "rotated-away", iss=issuer, aud=server.mcp_url
            ),
            "issuer 'http://127.0.0.1:9/o' is not accepted": signed(
                key, kid, iss="http://127.0.0.1:9/o", aud=server.mcp_url
            ),
            "token signature does not verify": signed(
                stranger_pem, kid, iss=issuer, aud=server.mcp_url
            ),
        }
        for reason, token in cases.items():
            response = await post_mcp(server.mcp_url, token)
            assert response.status_code == 401, reason
            challenge = response.headers["www-authenticate"]
            assert 'error="invalid_token"' in challenge, challenge
            assert f'error_description="{reason}' in challenge, challenge
            assert "resource_metadata=" in challenge
            assert reason in response.json()["error_description"]


async def test_an_unknown_kid_fetches_the_keys_again_once() -> None:
    issuer = idp_issuer()
    audience = "http://127.0.0.1:9/mcp"
    server = ResourceServer(
        resource_url=audience,
        config=AuthConfig(issuers=[issuer]),
        keys_dir=None,
        refresh_min_interval_s=0,
    )
    keys = server.issuers[issuer]
    key, kid = idp_signing_key(), idp_kid()
    access = await server.check(signed(key, kid, iss=issuer, aud=audience, sub="bob"))
    assert (access.subject, access.scopes, keys.fetches) == ("bob", ["read"], 1)
    await server.check(signed(key, kid, iss=issuer, aud=audience, sub="alice"))
    assert keys.fetches == 1  # cached
    other = RSAKeyPair.generate().private_key.get_secret_value()
    with pytest.raises(TokenRefused, match="'new-kid' is not among the keys"):
        await server.check(signed(other, "new-kid", iss=issuer, aud=audience))
    assert keys.fetches == 2  # refreshed once for the unknown kid, then refused


async def test_self_minted_tokens_are_still_accepted_next_to_the_idp(home: Path) -> None:
    async with run_oauth_server(home) as server:
        token = create_token(server.engine.settings.keys_dir, "carol", ["submit"], 600)
        async with sdk_client(server.mcp_url, token) as carol:
            event = structured(await carol.call_tool("create_event", {"name": "carol's"}))
        assert event["owner"] == "carol"
    async with run_oauth_server(home, self_minted=False) as server:
        response = await post_mcp(server.mcp_url, token)
        assert response.status_code == 401
        assert "issuer 'sciorch' is not accepted" in response.headers["www-authenticate"]


def test_scopes_and_groups_map_to_sciorch_scopes() -> None:
    config = AuthConfig(
        issuers=["https://idp.example.org"],
        scopes={"read": "api://sciorch/read", "submit": "api://sciorch/submit"},
        groups={"admin": ["facility-staff"]},
        groups_claim="roles",
    )
    assert sciorch_scopes({"scope": "api://sciorch/read openid"}, config) == ["read"]
    assert sciorch_scopes({"scp": ["api://sciorch/submit"]}, config) == ["submit"]
    assert sciorch_scopes({"roles": ["facility-staff"]}, config) == ["admin"]
    assert sciorch_scopes({"scope": "sciorch.admin", "groups": ["facility-staff"]}, config) == []
    # the default: read and submit by scope, admin by nothing until configured
    assert sciorch_scopes({"scope": "sciorch.read sciorch.submit sciorch.admin"},
                          AuthConfig()) == ["read", "submit"]


def test_sciorch_serve_with_an_idp_configured(tmp_path: Path) -> None:
    issuer = idp_issuer()
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[auth]\nissuers = ["{issuer}"]\n')
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "SCIORCH_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sciorch.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        meta = None
        for _ in range(120):
            try:
                r = httpx2.get(base + "/.well-known/oauth-protected-resource/mcp", timeout=2)
                meta = r.json()
                break
            except httpx2.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.25)
        assert meta is not None
        assert meta["resource"] == base + "/mcp"
        assert meta["authorization_servers"] == [issuer]
        r = httpx2.post(
            base + "/mcp", json=INIT, headers=HEADERS, timeout=10, follow_redirects=True
        )
        assert r.status_code == 401
        assert "resource_metadata=" in r.headers["www-authenticate"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


