# Sourced by scripts/test.sh: starts a throwaway PostgreSQL 15 (scripts/postgres.sh installs and
# starts what is missing) and exports SCIORCH_TEST_POSTGRES, which the store tests read to run
# every store test against PostgreSQL as well as SQLite. A server that this hook started is
# stopped when test.sh exits; one that was already running is left running. If it cannot be
# started, it says so and goes on: the PostgreSQL cases then skip (and fail under CI=true).
_pg_was_up=0
_pg_base=${SCIORCH_PG_BASE:-${TMPDIR:-/tmp}/sciorch-pg-$(pwd | sha256sum | cut -c1-12)}
[ -f "$_pg_base/env" ] && [ -f "$_pg_base/data/postmaster.pid" ] && _pg_was_up=1
if _pg_env=$(bash scripts/postgres.sh start); then
  # shellcheck source=/dev/null
  . "$_pg_env"
  if [ "$_pg_was_up" = 0 ]; then
    at_exit "echo 'test.sh: stopping the test PostgreSQL'; bash '$PWD/scripts/postgres.sh' stop"
  fi
else
  echo "15-postgresql: could not start the test PostgreSQL; its store tests will skip (fail under CI=true)" >&2
fi
unset _pg_was_up _pg_base _pg_env
