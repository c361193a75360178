# Sourced by scripts/test.sh: starts the test identity provider (tests/idp: django-oauth-toolkit
# with OpenID Connect, users alice and bob, JWT access tokens) on a free 127.0.0.1 port with its
# state in a temporary directory, and exports what tests/test_oauth.py reads: SCIORCH_IDP_URL
# (the issuer) and SCIORCH_IDP_STATE. It is stopped, and its directory removed, when test.sh
# exits. An IdP already answering at $SCIORCH_IDP_URL is used as it is. If it cannot start, it
# says so and goes on: the OAuth tests then skip (and fail under CI=true).
_idp_probe() {
  "$VENV/bin/python" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/.well-known/openid-configuration", timeout=2).read()' "$1" 2>/dev/null
}
if [ -n "${SCIORCH_IDP_URL:-}" ] && _idp_probe "$SCIORCH_IDP_URL"; then
  echo "20-idp: using the identity provider at $SCIORCH_IDP_URL"
else
  _idp_state=$(mktemp -d -t sciorch-idp.XXXXXX)
  _idp_port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$VENV/bin/python" -m tests.idp.serve --state "$_idp_state" --port "$_idp_port" >"$_idp_state/log" 2>&1 &
  _idp_pid=$!
  at_exit "kill $_idp_pid 2>/dev/null; wait $_idp_pid 2>/dev/null; rm -rf '$_idp_state'"
  for _ in $(seq 120); do
    _idp_probe "http://127.0.0.1:$_idp_port/o" && break
    kill -0 "$_idp_pid" 2>/dev/null || break
    sleep 0.5
  done
  if _idp_probe "http://127.0.0.1:$_idp_port/o"; then
    export SCIORCH_IDP_URL="http://127.0.0.1:$_idp_port/o" SCIORCH_IDP_STATE="$_idp_state"
    echo "20-idp: identity provider at $SCIORCH_IDP_URL (pid $_idp_pid)"
  else
    echo "20-idp: the test identity provider did not start; tests/test_oauth.py will skip (fail under CI=true):" >&2
    tail -20 "$_idp_state/log" >&2 || true
  fi
  unset _idp_state _idp_port _idp_pid
fi
unset -f _idp_probe
