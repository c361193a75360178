"""A real OAuth 2.1 / OpenID Connect authorization server for the tests: django-oauth-toolkit
with OIDC on, two users (alice, bob), a pre-registered public client with PKCE, and RFC 9068
JWT access tokens whose `aud` is the RFC 8707 `resource` the client asked for. `serve.py`
prepares it in a directory and runs it on 127.0.0.1 (scripts/test.d/20-idp.sh starts it)."""

CLIENT_ID = "sciorch-test"
REDIRECT_URI = "http://127.0.0.1:33418/callback"
# The web hub's sign-in (any loopback port: RFC 8252, as django-oauth-toolkit allows).
HUB_REDIRECT_URI = "http://127.0.0.1/login/oidc/callback"
USERS = {"alice": "alice-idp-password", "bob": "bob-idp-password"}
