"""Per-call cost of bearer-token verification: access tokens of a facility IdP (the test IdP,
tests/idp, its keys found by OIDC discovery and its JWKS cached) against today's self-minted
tokens (`sciorch token create`), in the same run.

    python bench/auth.py [--n 300]

Each kind is measured twice: "first sight" (a token not seen before: signature, issuer,
audience, expiry checked; every call a new token) and "again" (the token a client sends with
every request, remembered once verified). Uses $SCIORCH_IDP_URL / $SCIORCH_IDP_STATE when set
(scripts/test.d/20-idp.sh), else starts the test IdP itself in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
from jwcrypto import jwk

from ground.config import AuthConfig
from mcp_server.auth import create_token, verifier
from mcp_server.oauth import ResourceServer

AUDIENCE = "http://127.0.0.1:8765/mcp"


@contextlib.contextmanager
def test_idp() -> Iterator[tuple[str, Path]]:
    if os.environ.get("SCIORCH_IDP_URL") and os.environ.get("SCIORCH_IDP_STATE"):
        yield os.environ["SCIORCH_IDP_URL"], Path(os.environ["SCIORCH_IDP_STATE"])
        return
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        root = Path(__file__).resolve().parent.parent
        cmd = [sys.executable, "-m", "tests.idp.serve", "--state", tmp, "--port", str(port)]
        proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.DEVNULL)
        issuer = f"http://127.0.0.1:{port}/o"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration").read()
                    break
                except OSError:
                    time.sleep(0.25)
            yield issuer, Path(tmp)
        finally:
            proc.terminate()
            proc.wait()


def idp_tokens(issuer: str, state: Path, n: int) -> list[str]:
    """Tokens as the IdP makes them (tests/idp/tokens.py): its key, its kid."""
    pem = (state / "oidc-signing.pem").read_bytes()
    kid = jwk.JWK.from_pem(pem).thumbprint()
    now = int(time.time())
    return [
        jwt.encode(
            {"iss": issuer, "sub": "alice", "aud": AUDIENCE, "scope": "sciorch.read",
             "iat": now, "exp": now + 3600, "jti": secrets.token_hex(8)},
            pem,
            algorithm="RS256",
            headers={"kid": kid, "typ": "at+jwt"},
        )
        for _ in range(n)
    ]


async def per_call_us(check: Callable[[str], Awaitable[Any]], tokens: list[str]) -> float:
    samples = []
    for token in tokens:
        t = time.perf_counter()
        result = await check(token)
        samples.append(time.perf_counter() - t)
        assert result is not None
    return statistics.median(samples) * 1e6


async def main(n: int) -> None:
    with test_idp() as (issuer, state), tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        server = ResourceServer(
            resource_url=AUDIENCE, config=AuthConfig(issuers=[issuer]), keys_dir=keys
        )
        today = verifier(keys)
        minted = [create_token(keys, "alice", ["read"], 3600) for _ in range(n)]
        from_idp = idp_tokens(issuer, state, n)
        t = time.perf_counter()
        await server.check(from_idp[0])  # discovery + JWKS fetch, once
        first_fetch_ms = (time.perf_counter() - t) * 1e3

        rows = [
            ("self-minted, today's verifier", today.verify_token, minted),
            ("self-minted, resource server", server.check, minted),
            ("IdP JWT (JWKS cached)", server.check, from_idp[1:]),
        ]
        print(f"{n} tokens each; median per call, microseconds")
        print(f"{'':34} {'first sight':>12} {'again':>8}")
        for name, check, tokens in rows:
            first = await per_call_us(check, tokens)
            again = await per_call_us(check, tokens[-1:] * len(tokens))
            print(f"{name:34} {first:12.0f} {again:8.1f}")
        fetches = server.issuers[issuer].fetches
        print(f"IdP discovery + first JWKS fetch: {first_fetch_ms:.1f} ms; JWKS fetches: {fetches}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    asyncio.run(main(parser.parse_args().n))
