#!/usr/bin/env bash
# Stop the test Slurm that scripts/slurm-setup.sh started, by pid file, in dependency order.
#
#   bash scripts/slurm-stop.sh                 everything (slurmrestd ... munged)
#   bash scripts/slurm-stop.sh slurmctld       one daemon (the tests restart slurmctld this way)
#
# Each daemon gets SIGTERM, then SIGKILL after 10 s (daemons that do not depend on each other
# stop together). Jobs still running are killed with slurmd.
# Configuration, state and the database stay, so the next setup is quick.
set -euo pipefail

BASE=${SCIORCH_SLURM_BASE:-/var/lib/sciorch-slurm}
ALL=(slurmrestd slurmd slurmctld slurmdbd mariadbd munged)
want=("$@")
[ ${#want[@]} -ne 0 ] || want=("${ALL[@]}")

pidfile() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;
    *) echo "$BASE/run/$1.pid" ;;
  esac
}

term() { # term NAME: SIGTERM the daemon; print its pid if it runs
  local file pid
  file=$(pidfile "$1")
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    echo "$pid"
  else
    rm -f "$file"
  fi
}

stop_group() { # stop_group NAME...: SIGTERM them together, wait (SIGKILL after 10 s)
  local name pid pids=() i alive
  for name in "$@"; do
    pid=$(term "$name")
    [ -z "$pid" ] || pids+=("$pid")
  done
  if [ ${#pids[@]} -ne 0 ]; then
    for ((i = 0; i < 100; i++)); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 1 ] || break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        echo "slurm-stop: pid $pid ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  for name in "$@"; do rm -f "$(pidfile "$name")"; done
}

for w in "${want[@]}"; do
  case " ${ALL[*]} " in *" $w "*) ;; *) echo "slurm-stop: unknown daemon $w (known: ${ALL[*]})" >&2; exit 2 ;; esac
done
wanted() { local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
# Dependency order, whatever order the arguments came in; daemons in one group stop together.
for group in "slurmrestd slurmd" "slurmctld" "slurmdbd" "mariadbd munged"; do
  names=()
  for name in $group; do wanted "$name" && names+=("$name"); done
  [ ${#names[@]} -eq 0 ] || stop_group "${names[@]}"
done
