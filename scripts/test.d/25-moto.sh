# Sourced by scripts/test.sh: moto's standalone S3 server, the stand-in for an S3 store in the
# storage and inputs tests (no S3 server installs here). It lives in a venv of its own: moto
# needs botocore, which pins python-dateutil<3, and the kubernetes client in sciorch's venv
# needs >=3; the tests speak to it over HTTP only (sciorch's client is obstore). Idempotent:
# installs only when missing. Exports SCIORCH_MOTO_SERVER (the moto_server command); the tests
# start it on 127.0.0.1 on a free port and stop it.
_moto_venv=${SCIORCH_MOTO_VENV:-$PWD/.venv-moto}
if [ ! -x "$_moto_venv/bin/moto_server" ]; then
  echo "25-moto: installing moto[server]==5.2.5 into $_moto_venv"
  "${PYTHON:-python3}" -m venv "$_moto_venv" &&
    "$_moto_venv/bin/python" -m pip install -q "moto[server]==5.2.5" ||
    echo "25-moto: could not install moto; the S3 tests will skip (fail under CI=true)" >&2
fi
[ -x "$_moto_venv/bin/moto_server" ] && export SCIORCH_MOTO_SERVER="$_moto_venv/bin/moto_server"
unset _moto_venv
