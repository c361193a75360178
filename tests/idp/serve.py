"""Prepare the test identity provider in a state directory (once: signing key, database,
users, client) and serve it on 127.0.0.1:PORT until killed.

    python -m tests.idp.serve --state DIR --port PORT
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.idp import CLIENT_ID, HUB_REDIRECT_URI, REDIRECT_URI, USERS


def _write_once(path: Path, make: Callable[[], bytes]) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make())


def _rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def prepare(state: Path, port: int) -> None:
    state.mkdir(parents=True, exist_ok=True)
    _write_once(state / "django-secret", lambda: secrets.token_hex(32).encode())
    _write_once(state / "oidc-signing.pem", _rsa_pem)
    os.environ["SCIORCH_IDP_STATE"] = str(state)
    os.environ["SCIORCH_IDP_PORT"] = str(port)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.idp.settings"

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0, interactive=False)
    for name, password in USERS.items():
        user, _ = User.objects.get_or_create(username=name)
        user.set_password(password)
        user.save()
    Application.objects.update_or_create(
        client_id=CLIENT_ID,
        defaults={
            "name": "sciorch tests",
            "client_type": Application.CLIENT_PUBLIC,
            "authorization_grant_type": Application.GRANT_AUTHORIZATION_CODE,
            "redirect_uris": f"{REDIRECT_URI} {HUB_REDIRECT_URI}",
            "algorithm": Application.RS256_ALGORITHM,
            "skip_authorization": False,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    prepare(args.state, args.port)

    from django.core.servers.basehttp import run
    from django.core.wsgi import get_wsgi_application

    run("127.0.0.1", args.port, get_wsgi_application(), threading=True)


if __name__ == "__main__":
    main()
