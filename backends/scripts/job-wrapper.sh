# The job wrapper of the local backend (and any backend whose job sees a POSIX shell), run as:
#   /bin/sh -c "$(cat job-wrapper.sh)" sciorch-job WORKDIR COMMAND [ARG...]
# It shares the command's process group and traps TERM/INT/HUP (a trap with an action is not
# inherited by the command), so signalling the group stops the command while the wrapper lives
# on to record the exit status in WORKDIR/exit.json. (This comment block is dropped when loaded.)
wd=$1
shift
trap ':' TERM INT HUP
"$@" >>"$wd/log" 2>&1 </dev/null
rc=$?
PATH=/usr/local/bin:/usr/bin:/bin:$PATH
if [ "$rc" -gt 128 ]; then sig=$((rc - 128)); else sig=null; fi
t=$(date +%s.%N 2>/dev/null)
case $t in ''|*[!0-9.]*) t=$(date +%s 2>/dev/null || echo null) ;; esac
printf '{"exit_code": %d, "signal": %s, "finished_at": %s}\n' "$rc" "$sig" "$t" \
  >"$wd/exit.json.tmp" && mv -f "$wd/exit.json.tmp" "$wd/exit.json"
exit "$rc"
