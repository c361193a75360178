#!/usr/bin/env bash
# A real PostgreSQL 15 server for the tests and the store benchmark, in a data directory of its
# own (not Debian's cluster), listening on 127.0.0.1 only.
#
#   bash scripts/postgres.sh start   install what is missing, start the server if it is not up
#   bash scripts/postgres.sh stop    stop it (the data directory stays, so a restart is quick)
#
# Idempotent: a server that answers is left alone. Everything lives under $SCIORCH_PG_BASE
# (default: a directory in /tmp named after this checkout, so two checkouts never share one):
# data/, the socket, the log, and env, which exports SCIORCH_TEST_POSTGRES (the URL of an empty
# database `sciorch` owned by role `sciorch`; tests make a fresh schema in it each). As root the
# server runs as the `postgres` user (initdb refuses root); otherwise as the caller.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE=${SCIORCH_PG_BASE:-${TMPDIR:-/tmp}/sciorch-pg-$(pwd | sha256sum | cut -c1-12)}
BIN=${SCIORCH_PG_BIN:-/usr/lib/postgresql/15/bin}
DATA=$BASE/data
APT_LOG=${TMPDIR:-/tmp}/sciorch-postgres-apt.log

say() { echo "postgres: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

as_owner() { # run a command as the user that owns the server
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

up() { [ -f "$BASE/env" ] && [ -f "$DATA/postmaster.pid" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

install_packages() {
  [ -x "$BIN/initdb" ] && return 0
  [ "$(id -u)" = 0 ] || die "PostgreSQL 15 is not installed ($BIN) and installing it needs root"
  say "installing postgresql"
  # Package scripts must not start Debian's own cluster (no init system here).
  local policy=/usr/sbin/policy-rc.d saved=""
  if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  local ok=1
  if ! apt-get install -y -q --no-install-recommends postgresql >"$APT_LOG" 2>&1; then
    apt-get update -q >"$APT_LOG" 2>&1 && apt-get install -y -q --no-install-recommends \
      postgresql >"$APT_LOG" 2>&1 || ok=0
  fi
  if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
  [ "$ok" = 1 ] || die "apt-get install postgresql failed (see $APT_LOG)"
}

start() {
  if up; then return 0; fi
  install_packages
  mkdir -p "$BASE"
  [ "$(id -u)" = 0 ] && chown postgres: "$BASE"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    # trust on 127.0.0.1 and the private socket only: a throwaway server for tests.
    as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-sync >"$BASE/initdb.log" 2>&1 \
      || die "initdb failed (see $BASE/initdb.log)"
  fi
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # fsync off: the tests' data is thrown away, and a commit then costs what it costs in memory.
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 30 start -o \
    "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$BASE -c fsync=off -c max_connections=200" \
    >/dev/null || die "the server did not start (see $BASE/server.log)"
  local psql=("$BIN/psql" -h "$BASE" -p "$port" -U postgres -d postgres -qtAX -v ON_ERROR_STOP=1)
  if [ "$(as_owner "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'sciorch'")" != 1 ]; then
    as_owner "${psql[@]}" -c "CREATE ROLE sciorch LOGIN" -c "CREATE DATABASE sciorch OWNER sciorch"
  fi
  echo "export SCIORCH_TEST_POSTGRES=postgresql://sciorch@127.0.0.1:$port/sciorch" >"$BASE/env"
  say "up on 127.0.0.1:$port (data in $DATA)"
}

stop() {
  if [ -f "$DATA/postmaster.pid" ]; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -f "$BASE/env"
}

case "${1:-start}" in
  start) start; echo "$BASE/env" ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
