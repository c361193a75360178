#!/usr/bin/env bash
# Stop the test Slurm that scripts/slurm-setup.sh started, by pid file, in dependency order.
#
#   bash scripts/slurm-stop.sh                 everything (slurmrestd ... munged)
#   bash scripts/slurm-stop.sh slurmctld       one daemon (the tests restart slurmctld this way)
#
# Each daemon gets SIGTERM, then SIGKILL after 10 s. Jobs still running are killed with slurmd.
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

stop() {
  local name=$1 file pid i
  file=$(pidfile "$name")
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$file"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm-stop: $name (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Dependency order, whatever order the arguments came in.
for name in "${ALL[@]}"; do
  for w in "${want[@]}"; do
    if [ "$w" = "$name" ]; then stop "$name"; fi
  done
done
for w in "${want[@]}"; do
  case " ${ALL[*]} " in *" $w "*) ;; *) echo "slurm-stop: unknown daemon $w (known: ${ALL[*]})" >&2; exit 2 ;; esac
done
