#!/bin/bash
# sciorch sweep @SWEEP_ID@, written by the Slurm backend: one job array, one element per entry.
# Element N reads line N+1 of @DIR@/elements (its entry's directory), takes that entry's
# environment from env.sh there and runs the entry's own job.sh, its output in the entry's log.
dir=@DIR_Q@
wd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$dir/elements")
if [ -z "$wd" ] || [ ! -f "$wd/job.sh" ]; then
  echo "sciorch: no element $SLURM_ARRAY_TASK_ID in $dir/elements" >&2
  exit 1
fi
set -a
. "$wd/env.sh"
set +a
cd "$wd" || exit 1
exec bash "$wd/job.sh" >>"$wd/log" 2>&1 </dev/null
