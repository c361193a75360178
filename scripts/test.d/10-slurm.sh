# Sourced by scripts/test.sh: starts the single-node test Slurm (scripts/slurm-setup.sh installs
# and starts what is missing) and exports what tests/test_slurm.py reads (SLURM_CONF,
# SCIORCH_SLURM_REST_URL, SCIORCH_SLURM_USER, ...). A Slurm that this hook started is stopped
# when test.sh exits; one that was already running is left running. If Slurm cannot be started
# (no root, no apt), it says so and goes on: the Slurm tests then skip (and fail under CI=true).
_slurm_base=${SCIORCH_SLURM_BASE:-/var/lib/sciorch-slurm}
_slurm_was_up=0
if [ -f "$_slurm_base/env" ] && (. "$_slurm_base/env" && scontrol ping 2>/dev/null | grep UP >/dev/null); then
  _slurm_was_up=1
fi
if bash scripts/slurm-setup.sh; then
  # shellcheck source=/dev/null
  . "$_slurm_base/env"
  if [ "$_slurm_was_up" = 0 ]; then
    at_exit "echo 'test.sh: stopping the test Slurm'; bash '$PWD/scripts/slurm-stop.sh'"
  fi
  # Jobs submitted through slurmrestd run as $SCIORCH_SLURM_USER (slurmrestd refuses root): that
  # user must be able to run this venv's Python. Grant it search permission on the directories
  # above the interpreter and the checkout where it lacks it (an ACL for that user only).
  _slurm_can_run() {
    runuser -u "$SCIORCH_SLURM_USER" -- "$PWD/$VENV/bin/python" -c \
      'import orchestrator.payloads.http_app, orchestrator.payloads.sim_instrument' >/dev/null 2>&1
  }
  if [ "$(id -u)" = 0 ] && ! _slurm_can_run; then
    for _slurm_path in "$(readlink -f "$VENV/bin/python")" "$PWD/$VENV/bin/python" "$PWD/orchestrator"; do
      _slurm_dir=""
      # Top down: each directory is checked once its parents can be searched.
      IFS=/ read -ra _slurm_parts <<<"$(dirname "$_slurm_path")"
      for _slurm_part in "${_slurm_parts[@]}"; do
        [ -n "$_slurm_part" ] || continue
        _slurm_dir="$_slurm_dir/$_slurm_part"
        if ! runuser -u "$SCIORCH_SLURM_USER" -- test -x "$_slurm_dir" 2>/dev/null; then
          echo "10-slurm: letting $SCIORCH_SLURM_USER search $_slurm_dir (to run $VENV/bin/python)"
          setfacl -m "u:$SCIORCH_SLURM_USER:x" "$_slurm_dir" 2>/dev/null || chmod o+x "$_slurm_dir"
        fi
      done
    done
    unset _slurm_part _slurm_parts
    _slurm_can_run || echo "10-slurm: $SCIORCH_SLURM_USER still cannot run $VENV/bin/python; the slurmrestd tests will fail" >&2
    unset _slurm_path _slurm_dir
  fi
  unset -f _slurm_can_run
else
  echo "10-slurm: could not start the test Slurm; tests/test_slurm.py will skip (fail under CI=true)" >&2
fi
unset _slurm_base _slurm_was_up
