# The job wrapper inside a Kubernetes pod, run as: /bin/sh -c WRAPPER sciorch-job COMMAND [ARG...]
# A background `tail -f | while read` echoes each complete line of $SCIORCH_STREAM to the log as
# it is written ("@@sciorch:stream <index> <json>"). When the command ends the wrapper kills that
# tail (its pid comes through a file: no fifo, nothing that can block), waits for the reader to
# drain, replays every record once more with its index (the backend keeps the first copy of each
# index, so nothing is lost to the race at exit), then prints the result between
# result-begin/end markers, one artifact marker per file under $SCIORCH_OUTPUT_DIR and the exit
# status. POSIX sh, tail, find: busybox has them all.
# With an upload form (SCIORCH_UPLOAD_URL/_PREFIX and, from the entry's Secret, _FORM: the
# server's LaunchSpec.outputs), each file under $SCIORCH_OUTPUT_DIR is then POSTed to the site's
# object storage under the entry's prefix, with python3 where the image has it (streamed, any
# file name), else curl; the form is taken out of the environment before the command runs, and
# a failed upload fails a job that had succeeded. Links are not uploaded (find -type f).
# (This comment block is dropped when loaded, so the pod's command carries only the code.)
form=${SCIORCH_UPLOAD_FORM-}
unset SCIORCH_UPLOAD_FORM
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
up_py() {
  SCIORCH_UPLOAD_FORM=$form python3 - "$1" "$2" <<'PY'
import os, sys, urllib.request, uuid
rel, path = sys.argv[1], sys.argv[2]
fields = [("key", os.environ["SCIORCH_UPLOAD_PREFIX"] + rel)]
fields += [tuple(l.split("=", 1)) for l in os.environ["SCIORCH_UPLOAD_FORM"].splitlines() if "=" in l]
b = uuid.uuid4().hex
head = "".join(f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields)
head += f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n'
head = (head + "Content-Type: application/octet-stream\r\n\r\n").encode()
tail = f"\r\n--{b}--\r\n".encode()
def body():
    yield head
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
    yield tail
n = len(head) + os.path.getsize(path) + len(tail)
req = urllib.request.Request(os.environ["SCIORCH_UPLOAD_URL"], data=body(), method="POST")
req.add_header("Content-Type", f"multipart/form-data; boundary={b}")
req.add_header("Content-Length", str(n))
try:
    urllib.request.urlopen(req, timeout=300).read()
except Exception as e:
    print(f"sciorch: {e}", file=sys.stderr)
    sys.exit(1)
PY
}
up_curl() {
  p=$2
  set -- --form-string "key=$SCIORCH_UPLOAD_PREFIX$1"
  set -f; o=$IFS; IFS='
'
  for l in $form; do set -- "$@" --form-string "$l"; done
  IFS=$o; set +f
  curl -fsS --retry 3 -o /dev/null "$@" -F "file=@\"$p\"" "$SCIORCH_UPLOAD_URL"
}
if [ -n "$form" ]; then
  if command -v python3 >/dev/null 2>&1; then up=up_py; else up=up_curl; fi
  ( cd "$SCIORCH_OUTPUT_DIR" 2>/dev/null && find . -type f 2>/dev/null ) | {
    bad=0
    while IFS= read -r f; do
      r=${f#./}
      if ! "$up" "$r" "$SCIORCH_OUTPUT_DIR/$r" 2>&1; then
        printf 'sciorch: uploading output %s to storage failed\n' "$r"; bad=1
      fi
    done
    exit "$bad"
  } || { [ "$rc" -ne 0 ] || rc=1; }
fi
printf '@@sciorch:exit %d\n' "$rc"
exit "$rc"
