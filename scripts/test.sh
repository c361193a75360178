#!/usr/bin/env bash
# The whole test suite, from a fresh clone: creates .venv if missing, installs sciorch with its
# test extras (again only when pyproject.toml changed), then runs ruff, mypy, lint-imports and
# pytest.
# Idempotent. Extra arguments go to pytest:  bash scripts/test.sh -k cli -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export FASTMCP_CHECK_FOR_UPDATES=off
export PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
  echo "test.sh: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv --clear "$VENV"
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp="$VENV/.sciorch-test-install"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "test.sh: installing sciorch[test] into $VENV"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" >"$stamp"
fi

# ---- prerequisites beyond Python -------------------------------------------------------------
# Each scripts/test.d/*.sh is sourced here, in name order, before the checks run (Slurm,
# PostgreSQL, the test identity provider, the npm tools). They may export variables the tests
# read, and register what to stop at exit with `at_exit COMMAND`: one EXIT trap runs them all,
# newest first (chaining traps by rewriting `trap -p` breaks on quotes).
_at_exit=()
at_exit() { _at_exit=("$1" "${_at_exit[@]}"); }
_run_at_exit() {
  local cmd
  for cmd in "${_at_exit[@]}"; do eval "$cmd" || true; done
}
trap _run_at_exit EXIT
for hook in scripts/test.d/*.sh; do
  [ -e "$hook" ] || continue
  echo "test.sh: $hook"
  # shellcheck source=/dev/null
  source "$hook"
done

# ---- checks: all of them run; the script fails if any failed ---------------------------------
failed=()
echo "test.sh: ruff check ."
"$VENV/bin/ruff" check . || failed+=(ruff)
echo "test.sh: mypy"
"$VENV/bin/mypy" || failed+=(mypy)
echo "test.sh: lint-imports (the layering contracts in pyproject.toml)"
"$VENV/bin/lint-imports" --no-cache || failed+=(lint-imports)
echo "test.sh: pytest -q $*"
"$VENV/bin/pytest" -q "$@" || failed+=(pytest)

if [ ${#failed[@]} -ne 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all checks passed"
