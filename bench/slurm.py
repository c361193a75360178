"""The Slurm backend against the real test cluster (scripts/slurm-setup.sh): how soon an entry
is `succeeded` after Slurm records the job's end, and how many submissions per second go
through sciorch compared with plain `sbatch`, in the same run.

    python bench/slurm.py [--jobs 15] [--submissions 100] [--modes rest,cli,callback,poll]

Run it after `bash scripts/slurm-setup.sh` (as root), which starts the cluster.

Completion latency = the entry's `succeeded` time - the time Slurm recorded the end. Slurm's
EndTime has one-second resolution, so the end is taken from slurmctld's log line
`_job_complete: JobId=N done` (millisecond stamps) when the log is readable, else from EndTime.
Modes: rest / cli (the push is the file watch), callback (slurmrestd, no file watch: the
wrapper's HTTP poke), poll (slurmrestd, no push at all: polling every 0.5 s, for comparison).
Target: completion noticed within 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ground.config import load_settings
from ground.models import EntryState, Principal
from orchestrator.engine import Engine

TARGET_S = 1.0
BASE = Path(os.environ.get("SCIORCH_SLURM_BASE", "/var/lib/sciorch-slurm"))
TEMPLATE = """
name: quick
kind: job
description: writes a result and ends
command: ["sh", "-c", "echo '{{\\"ok\\": true}}' > \\"$SCIORCH_RESULT\\""]
resources: {cpus: 1, memory: 64Mi, walltime: 60}
"""
MODES: dict[str, dict[str, Any]] = {
    "rest": {"transport": "rest"},
    "cli": {"transport": "cli"},
    "callback": {"transport": "rest", "watch": False, "callback_listen": "127.0.0.1:0"},
    "poll": {"transport": "rest", "watch": False},
}


def load_env() -> None:
    env_file = BASE / "env"
    if "SCIORCH_SLURM_REST_URL" not in os.environ and env_file.exists():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if sep:
                os.environ.setdefault(key.strip(), value.strip())
    missing = [
        v for v in ("SCIORCH_SLURM_REST_URL", "SCIORCH_SLURM_USER", "SCIORCH_SLURM_SHARED_DIR")
        if not os.environ.get(v)
    ]
    if missing or shutil.which("sbatch") is None:
        sys.exit(f"no test Slurm here ({', '.join(missing) or 'sbatch missing'}): run "
                 "`bash scripts/slurm-setup.sh` as root first")


def slurm_end_times(job_ids: list[str]) -> dict[str, tuple[float, str]]:
    """job id -> (epoch of Slurm's end record, where it came from)."""
    out: dict[str, tuple[float, str]] = {}
    log = BASE / "log" / "slurmctld.log"
    wanted = set(job_ids)
    if log.exists():
        pattern = re.compile(r"^\[([0-9T:.-]+)\] _job_complete: JobId=(\d+) done")
        with log.open(errors="replace") as f:
            for line in f:
                m = pattern.match(line)
                if m and m.group(2) in wanted:
                    out[m.group(2)] = (datetime.fromisoformat(m.group(1)).timestamp(), "log")
    rest = [j for j in job_ids if j not in out]
    if rest:
        res = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", ",".join(rest), "-o", "%i|%e"],
            capture_output=True, text=True, env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
            check=False,
        )
        for line in res.stdout.splitlines():
            jid, _, end = line.partition("|")
            if end.strip().isdigit():
                out[jid] = (float(end) + 0.5, "EndTime")  # mid-second: 1 s resolution
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def open_engine(tmp: Path, name: str, shared: Path, opts: dict[str, Any]) -> Engine:
    site = {
        "name": "cluster",
        "kind": "slurm",
        "rest_url": os.environ["SCIORCH_SLURM_REST_URL"],
        "user": os.environ["SCIORCH_SLURM_USER"],
        "shared_dir": str(shared),
        "poll_interval_s": 0.5,
        **opts,
    }
    cat = tmp / "cat"
    cat.mkdir(exist_ok=True)
    (cat / "quick.yaml").write_text(TEMPLATE)
    settings = load_settings(tmp / f"home-{name}", catalogue_dirs=[cat], sites=[site])
    return await Engine.open(settings)


async def latency(mode: str, jobs: int, tmp: Path, shared: Path) -> list[float]:
    engine = await open_engine(tmp, mode, shared, MODES[mode])
    me = Principal(id="bench")
    finished: dict[str, float] = {}
    try:
        for _ in range(jobs):
            entry = await engine.launch(me, "quick")
            done, timed_out = await engine.wait_entry(me, entry.id, timeout_s=60)
            if timed_out or done.state != EntryState.SUCCEEDED or done.finished_at is None:
                raise SystemExit(f"{mode}: entry {entry.id} ended {done.state}: {done.reason}")
            finished[done.handle["job_id"]] = done.finished_at.timestamp()
    finally:
        await engine.close()
    ends = slurm_end_times(list(finished))
    sources = {src for _, src in ends.values()}
    lat = [finished[j] - ends[j][0] for j in finished if j in ends]
    print(
        f"  {mode:9s} n={len(lat):3d}  median {statistics.median(lat) * 1000:7.1f} ms  "
        f"p90 {pct(lat, 90) * 1000:7.1f} ms  max {max(lat) * 1000:7.1f} ms  "
        f"(Slurm end from {'/'.join(sorted(sources))})"
    )
    return lat


async def submissions(n: int, tmp: Path, shared: Path, mode: str, parallel: int) -> float:
    """Launches per second, `parallel` in flight at a time (1: one after the other)."""
    engine = await open_engine(tmp, f"{mode}-{parallel}", shared, MODES[mode])
    me = Principal(id="bench")
    try:
        await engine.list_sites()  # site facts cached, as on a running server
        sem = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with sem:
                await engine.launch(me, "quick")

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - t
        for _ in range(600):  # let them finish before the next measurement
            if all(e.state.terminal for e in (await engine.list_entries(me, limit=1000))[0]):
                break
            await asyncio.sleep(0.1)
    finally:
        await engine.close()
    return n / elapsed


def plain_sbatch(n: int, workdir: Path) -> float:
    t = time.perf_counter()
    ids = []
    for _ in range(n):
        res = subprocess.run(
            ["sbatch", "--parsable", f"--chdir={workdir}", "--output=/dev/null", "--mem=64M",
             "--time=1", "--wrap", "true"],
            capture_output=True, text=True, check=True,
        )
        ids.append(res.stdout.strip())
    return n / (time.perf_counter() - t)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=15, help="jobs per latency mode")
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument("--modes", default="rest,cli,callback,poll")
    args = parser.parse_args()
    load_env()
    shared = Path(os.environ["SCIORCH_SLURM_SHARED_DIR"]) / f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        try:
            print(f"completion latency: entry succeeded - Slurm's end record ({args.jobs} jobs, "
                  "one at a time)")
            results = {}
            for mode in args.modes.split(","):
                results[mode] = await latency(mode, args.jobs, tmp, shared)
            print(f"\nsubmissions per second ({args.submissions} jobs)")
            plain = plain_sbatch(args.submissions, tmp)
            print(f"  plain sbatch, one after the other         {plain:7.1f} /s")
            for mode in ("rest", "cli"):
                for parallel in (1, 8):
                    rate = await submissions(args.submissions, tmp, shared, mode, parallel)
                    how = "one after the other" if parallel == 1 else f"{parallel} in flight"
                    print(f"  sciorch ({mode:4s}), {how:21s} {rate:7.1f} /s  "
                          f"({rate / plain:.2f}x sbatch)")
        finally:
            shutil.rmtree(shared, ignore_errors=True)
    pushed = [v for m in ("rest", "cli", "callback") for v in results.get(m, [])]
    if pushed:
        p90 = pct(pushed, 90)
        verdict = "OK" if p90 < TARGET_S else "OVER TARGET"
        print(f"\npush modes p90 {p90 * 1000:.0f} ms; target < {TARGET_S * 1000:.0f} ms: {verdict}")


if __name__ == "__main__":
    asyncio.run(main())
