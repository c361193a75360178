"""Per-step overhead of running a chain of jobs through the engine (local backend, real store)
against the same commands run by a bare subprocess loop, in the same run.

    python bench/overhead.py [--steps 50] [--seconds 0.05]

Target: <= 20 ms per step (the Globus Flows anchor is ~4 s per step).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ground.config import load_settings
from ground.models import EntryState, Principal
from orchestrator.engine import Engine

TARGET_MS = 20.0
TEMPLATE = """
name: sleep-job
kind: job
description: sleeps, then writes a result
command: ["sh", "-c", "sleep {seconds}; echo '{{\\"value\\": 1}}' > \\"$SCIORCH_RESULT\\""]
parameters:
  type: object
  properties: {seconds: {type: number, default: 0.05}}
  additionalProperties: false
"""


def bare(steps: int, seconds: float) -> list[float]:
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        with tempfile.NamedTemporaryFile() as f:
            subprocess.run(
                ["sh", "-c", f"sleep {seconds}; echo '{{\"value\": 1}}' > {f.name}"], check=True
            )
        out.append(time.perf_counter() - t)
    return out


async def through_engine(steps: int, seconds: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "cat"
        cat.mkdir()
        (cat / "sleep-job.yaml").write_text(TEMPLATE)
        settings = load_settings(Path(tmp) / "home", catalogue_dirs=[cat])
        engine = await Engine.open(settings)
        me = Principal(id="bench")
        out = []
        try:
            for _ in range(steps):
                t = time.perf_counter()
                entry = await engine.launch(me, "sleep-job", {"seconds": seconds})
                done, _ = await engine.wait_entry(me, entry.id, timeout_s=60)
                out.append(time.perf_counter() - t)
                if done.state != EntryState.SUCCEEDED or done.result != {"value": 1}:
                    raise SystemExit(f"step failed: {done.state} {done.reason}")
        finally:
            await engine.close()
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=0.05)
    args = ap.parse_args()
    bare(3, args.seconds)  # warm the page cache
    base = bare(args.steps, args.seconds)
    eng = asyncio.run(through_engine(args.steps, args.seconds))
    b, e = statistics.median(base), statistics.median(eng)
    over_ms = (e - b) * 1000
    mean_ms = (sum(eng) - sum(base)) / args.steps * 1000
    print(f"steps: {args.steps} x {args.seconds * 1000:.0f} ms job")
    print(f"bare subprocess loop : median {b * 1000:7.1f} ms/step  total {sum(base):6.2f} s")
    print(f"through the engine   : median {e * 1000:7.1f} ms/step  total {sum(eng):6.2f} s")
    print(
        f"overhead per step    : median {over_ms:7.1f} ms  mean {mean_ms:7.1f} ms  "
        f"(target <= {TARGET_MS:.0f} ms) -> {'PASS' if over_ms <= TARGET_MS else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
