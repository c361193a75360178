# The job wrapper inside a Kubernetes pod, run as: /bin/sh -c WRAPPER sciorch-job COMMAND [ARG...]
# A background `tail -f | while read` echoes each complete line of $SCIORCH_STREAM to the log as
# it is written ("@@sciorch:stream <index> <json>"). When the command ends the wrapper kills that
# tail (its pid comes through a file: no fifo, nothing that can block), waits for the reader to
# drain, replays every record once more with its index (the backend keeps the first copy of each
# index, so nothing is lost to the race at exit), then prints the result between
# result-begin/end markers, one artifact marker per file under $SCIORCH_OUTPUT_DIR and the exit
# status. POSIX sh, tail, find: busybox has them all. (This comment block is dropped when loaded,
# so the pod's command carries only the code.)
mkdir -p "$SCIORCH_OUTPUT_DIR" 2>/dev/null
: >>"$SCIORCH_STREAM"
pf="$SCIORCH_WORKDIR/.sciorch-tail.pid"
rm -f "$pf"
sh -c 'echo $$ >"$1"; exec tail -n +1 -f "$2" 2>/dev/null' sh "$pf" "$SCIORCH_STREAM" | {
  i=0
  while IFS= read -r l; do printf '@@sciorch:stream %d %s\n' "$i" "$l"; i=$((i+1)); done
} &
r=$!
"$@"
rc=$?
n=0
while [ ! -s "$pf" ] && [ "$n" -lt 100 ]; do sleep 0.05 2>/dev/null || sleep 1; n=$((n+1)); done
if [ -s "$pf" ]; then kill "$(cat "$pf")" 2>/dev/null; wait "$r" 2>/dev/null; fi
kill "$r" 2>/dev/null
rm -f "$pf"
i=0
while IFS= read -r l; do
  printf '@@sciorch:stream %d %s\n' "$i" "$l"
  i=$((i+1))
done <"$SCIORCH_STREAM"
if [ -s "$SCIORCH_RESULT" ]; then
  printf '@@sciorch:result-begin\n'
  cat "$SCIORCH_RESULT"
  printf '\n@@sciorch:result-end\n'
fi
( cd "$SCIORCH_OUTPUT_DIR" 2>/dev/null && find . -type f 2>/dev/null ) | while IFS= read -r f; do
  printf '@@sciorch:artifact %s\n' "${f#./}"
done
printf '@@sciorch:exit %d\n' "$rc"
exit "$rc"
