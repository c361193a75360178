#!/bin/bash
# sciorch entry @ENTRY_ID@ (@SERVICE@), written by the Slurm backend. The job contract's files are
# in @WD@; the command's output goes to its log (Slurm's --output).
wd=@WD_Q@
walltime=@WALLTIME@
trap ':' TERM INT HUP
rm -f "$wd/exit.json" "$wd/started.json"
sciorch_now() {
  local t
  t=$(date +%s.%N 2>/dev/null)
  case $t in '' | *[!0-9.]*) t=$(date +%s) ;; esac
  echo "$t"
}
sciorch_write() { printf '%s\n' "$2" >"$wd/$1.tmp" && mv -f "$wd/$1.tmp" "$wd/$1"; }
sciorch_notify() {
  [ -n "${SCIORCH_CALLBACK_HOST:-}" ] || return 0
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "POST %s HTTP/1.0\r\nHost: %s\r\nContent-Length: 0\r\n\r\n" "$2" "$0" >&3
    head -c 12 <&3 >/dev/null' "$SCIORCH_CALLBACK_HOST" "$SCIORCH_CALLBACK_PORT" \
    "$SCIORCH_CALLBACK_PATH/$1" 2>/dev/null || true
}
sciorch_free_port() {
  local used=" " f local_addr p i
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ local_addr _; do
      case $local_addr in *:*) used="$used$((16#${local_addr##*:})) " ;; esac
    done < <(tail -n +2 "$f")
  done
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    case $used in *" $p "*) continue ;; esac
    echo "$p"
    return 0
  done
  return 1
}
port=null
if [ @SERVICE_FLAG@ = 1 ]; then
  port=$(sciorch_free_port) || { echo "sciorch: no free TCP port on $(hostname)" >&2; exit 1; }
  export PORT=$port SCIORCH_PORT=$port
fi
host=$(hostname -s 2>/dev/null || hostname)
job_id=${SLURM_JOB_ID:-}
# An element of a job array is known to sciorch as <array id>_<index>.
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
printf -v info '{"job_id": "%s", "host": "%s", "port": %s, "started_at": %s}' \
  "$job_id" "$host" "$port" "$(sciorch_now)"
sciorch_write started.json "$info"
sciorch_notify started
start=$(date +%s)
timeout -k 10 "$walltime" @COMMAND@ </dev/null
rc=$?
expired=false
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  [ $(($(date +%s) - start)) -ge $((walltime - 1)) ] && expired=true
fi
if [ "$rc" -gt 128 ] && [ "$expired" = false ]; then sig=$((rc - 128)); else sig=null; fi
printf -v info '{"exit_code": %d, "signal": %s, "finished_at": %s, "expired": %s}' \
  "$rc" "$sig" "$(sciorch_now)" "$expired"
sciorch_write exit.json "$info"
sciorch_notify exited
exit "$rc"
