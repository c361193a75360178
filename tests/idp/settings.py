"""Django settings of the test identity provider. Everything variable comes from the
environment that serve.py sets: the state directory, the port, the token lifetime."""

from __future__ import annotations

import os
from pathlib import Path

STATE = Path(os.environ["SCIORCH_IDP_STATE"])
PORT = int(os.environ["SCIORCH_IDP_PORT"])
ISSUER = f"http://127.0.0.1:{PORT}/o"

SECRET_KEY = (STATE / "django-secret").read_text().strip()
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "tests.idp.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": STATE / "idp.sqlite3"}}
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "oauth2_provider",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).parent / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
STATIC_URL = "/static/"
LOGIN_URL = "/accounts/login/"
# Fast password hashing: the users' passwords are test fixtures, and PBKDF2 at full strength
# costs a second of CPU per login on a loaded machine.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    "OIDC_ENABLED": True,
    "OIDC_ISS_ENDPOINT": ISSUER,
    "OIDC_RSA_PRIVATE_KEY": (STATE / "oidc-signing.pem").read_text(),
    "PKCE_REQUIRED": True,
    "SCOPES": {
        "openid": "OpenID Connect",
        "sciorch.read": "Read sciorch entries",
        "sciorch.submit": "Submit work to sciorch",
    },
    "DEFAULT_SCOPES": ["sciorch.read"],
    "ACCESS_TOKEN_GENERATOR": "tests.idp.tokens.jwt_access_token",
    "REFRESH_TOKEN_GENERATOR": "oauthlib.oauth2.rfc6749.tokens.random_token_generator",
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("SCIORCH_IDP_TOKEN_TTL_S", "300")),
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
}
