"""Stream records, the two paths end to end: the control plane (a job's $SCIORCH_STREAM JSON
lines, read by the local backend, published on the bus, delivered to a wait_entry caller) and
the Redis Streams data plane (the job XADDs to its entry's stream, the client XREADs it with
the credential stream_access gave).

    SCIORCH_TEST_REDIS=redis://default:pw@127.0.0.1:port/0 python bench/dataplane.py [--records N]

Each record carries the wall time it was written; latency is receive time minus that (one
machine, one clock). Records/s is records over the time from the first write to the last
receipt. The job writes as fast as it can, so this is each path's ceiling on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

import tools
from ground.config import load_settings
from ground.models import Principal
from orchestrator.engine import Engine
from tools.models import ReadLogsInput, StreamAccessInput, SubmitJobInput

JOBS = {
    "lines": """
        import json, os, time
        n = json.load(open(os.environ["SCIORCH_PARAMS"]))["n"]
        with open(os.environ["SCIORCH_STREAM"], "a", buffering=1) as f:
            for i in range(n):
                f.write(json.dumps({"i": i, "t": time.time()}) + "\\n")
    """,
    "redis": """
        import json, os, time
        import redis
        n = json.load(open(os.environ["SCIORCH_PARAMS"]))["n"]
        r = redis.Redis.from_url(os.environ["SCIORCH_REDIS_URL"])
        key = os.environ["SCIORCH_REDIS_STREAM"]
        time.sleep(0.5)  # the reader is attached by then
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(key, {"i": i, "t": time.time()})
            if i % 100 == 99:
                pipe.execute()
        pipe.execute()
    """,
}
ME = Principal(id="bench")


def catalogue(root: Path) -> Path:
    cat = root / "catalogue"
    cat.mkdir()
    for name, script in JOBS.items():
        (cat / f"job_{name}.py").write_text(textwrap.dedent(script))
        template = {
            "name": f"burst-{name}",
            "kind": "job",
            "command": ["{python}", str(cat / f"job_{name}.py")],
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
        }
        (cat / f"burst-{name}.yaml").write_text(json.dumps(template))
    return cat


def figures(label: str, n: int, sent: list[float], got: list[float]) -> None:
    lat = sorted((g - s) * 1000 for s, g in zip(sent, got, strict=True))
    span = max(got) - min(sent)
    print(
        f"{label:28} {len(got):7d}/{n:<7d} {len(got) / span:10.0f} "
        f"{statistics.median(lat):9.2f} {lat[int(len(lat) * 0.99) - 1]:9.2f} {lat[-1]:9.2f}"
    )


async def control(engine: Engine, n: int) -> None:
    """Every record as the bus delivers it to a subscriber (what wait_entry relays; it returns
    at the entry's end, and the records still in flight then are read with read_results)."""
    sent: list[float] = []
    got: list[float] = []
    async with engine.bus.subscribe(lambda m: m.kind == "stream") as sub:
        req = SubmitJobInput(service="burst-lines", parameters={"n": n})
        await tools.submit_job(engine, ME, req)
        while len(got) < n:
            try:
                msg = await asyncio.wait_for(sub.get(), timeout=10)
            except TimeoutError:
                break
            if msg.record is not None and "t" in msg.record:
                got.append(time.time())
                sent.append(float(msg.record["t"]))
        dropped = sub.dropped
    figures("control plane (bus relay)", n, sent, got)
    if dropped:
        print(f"  the bus dropped {dropped} records this subscriber did not take in time")


async def data_plane(engine: Engine, n: int) -> None:
    view = await tools.submit_job(
        engine, ME, SubmitJobInput(service="burst-redis", parameters={"n": n})
    )
    access = await tools.stream_access(engine, ME, StreamAccessInput(entry_id=view.id))
    assert access.url and access.stream
    r: Any = aioredis.from_url(access.url, decode_responses=True, socket_timeout=30)
    sent: list[float] = []
    got: list[float] = []
    last = "0"
    deadline = time.monotonic() + 120
    while len(got) < n and time.monotonic() < deadline:
        batch = await r.xread({access.stream: last}, count=10_000, block=1000)
        if not batch:
            continue
        now = time.time()
        for rid, fields in batch[0][1]:
            last = rid
            sent.append(float(fields["t"]))
            got.append(now)
    await r.aclose()
    if not got:
        entry = await engine.get_entry(ME, view.id)
        logs = await tools.read_logs(engine, ME, ReadLogsInput(entry_id=view.id))
        sys.exit(f"no records from {view.id} ({entry.state.value}: {entry.reason}): {logs.data}")
    figures("data plane (Redis XREAD)", n, sent, got)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    args = ap.parse_args()
    url = os.environ.get("SCIORCH_TEST_REDIS")
    if not url:
        sys.exit("set SCIORCH_TEST_REDIS (scripts/test.d/25-redis.sh starts one)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = load_settings(root / "home", catalogue_dirs=[catalogue(root)], data_plane=url)
        engine = await Engine.open(settings)
        try:
            print(f"{'path':28} {'records':>15} {'records/s':>10} {'p50 ms':>9} "
                  f"{'p99 ms':>9} {'max ms':>9}")  # fmt: skip
            await control(engine, args.records)
            await data_plane(engine, args.records)
        finally:
            for backend in engine.backends.values():
                await backend.shutdown_all()
            await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
