"""Flows: orchestration overhead per step, concurrency and back-pressure, on the local site with
a real store, against the same jobs chained by a bare engine loop (launch, wait, launch...)
measured in the same run.

    python bench/flows.py [--steps 11] [--seconds 5] [--concurrent 40] [--queued 1000]

Targets (issue 19): step end -> next step's job start <= 50 ms median; the whole flow's
overhead under 1 % of its runtime for 11 steps of 5 s; 40 concurrent runs of a 3-step flow
complete with nothing lost; 1,000 triggered runs queue without unbounded memory.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from flows.manager import FlowManager, flow_manager
from flows.models import RunState, StartFlowInput, TriggerKind, TriggerRecord
from flows.store import now
from ground.config import load_settings
from ground.models import EntryState, Principal
from orchestrator.engine import Engine

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
ME = Principal(id="bench")


def chain(name: str, steps: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(steps):
        out[f"s{i}"] = {
            "service": "sleep-job",
            "parameters": {"seconds": seconds},
            "needs": [f"s{i - 1}"] if i else [],
        }
    return {"name": name, "steps": out}


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def transitions(engine: Engine, entry_id: str) -> dict[str, float]:
    entry = await engine.get_entry(ME, entry_id)
    out = {"created": entry.created_at.timestamp()}
    for t in entry.transitions:
        out.setdefault(t.state.value, t.at.timestamp())
    return out


async def gaps(engine: Engine, entry_ids: list[str]) -> tuple[list[float], list[float], float]:
    """(end -> next submitted, end -> next running) per step pair, and the sum of job run
    times (running -> end)."""
    marks = [await transitions(engine, e) for e in entry_ids]
    to_submit, to_run, busy = [], [], 0.0
    for a, b in itertools.pairwise(marks):
        to_submit.append(b["created"] - a["succeeded"])
        to_run.append(b["running"] - a["succeeded"])
    for m in marks:
        busy += m["succeeded"] - m["running"]
    return to_submit, to_run, busy


async def bare_chain(engine: Engine, steps: int, seconds: float) -> tuple[list[str], float]:
    t = time.perf_counter()
    ids = []
    for _ in range(steps):
        entry = await engine.launch(ME, "sleep-job", {"seconds": seconds})
        done, _ = await engine.wait_entry(ME, entry.id, timeout_s=600)
        assert done.state == EntryState.SUCCEEDED, done.reason
        ids.append(entry.id)
    return ids, time.perf_counter() - t


async def wait_runs(mgr: FlowManager, run_ids: list[str], timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        views = [await mgr.view(r) for r in run_ids]
        if all(v.state.terminal for v in views) or time.monotonic() > deadline:
            return views
        await asyncio.sleep(0.1)


async def flow_chain(mgr: FlowManager, steps: int, seconds: float) -> tuple[list[str], float]:
    t = time.perf_counter()
    run = await mgr.start(ME, StartFlowInput(flow=chain("chain", steps, seconds)))
    (view,) = await wait_runs(mgr, [run.run_id], steps * (seconds + 30))
    assert view.state == RunState.SUCCEEDED, view.reason
    elapsed = time.perf_counter() - t
    by_key = {s.key: s.entry_id for s in view.steps}
    return [by_key[f"s{i}"] for i in range(steps)], elapsed


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "cat"
        cat.mkdir()
        (cat / "sleep-job.yaml").write_text(TEMPLATE)
        sites = [{"name": "local", "kind": "local", "cpus": 64, "memory_mb": 65536}]
        settings = load_settings(Path(tmp) / "home", catalogue_dirs=[cat], sites=sites)
        engine = await Engine.open(settings)
        mgr = flow_manager(engine)
        try:
            async with mgr.serving():
                await report_chain(engine, mgr, args)
                await report_concurrent(engine, mgr, args)
                await report_queue(engine, mgr, args)
        finally:
            await mgr.shutdown()
            for backend in engine.backends.values():
                await backend.shutdown_all()
            await engine.close()


async def report_chain(engine: Engine, mgr: FlowManager, args: argparse.Namespace) -> None:
    n, s = args.steps, args.seconds
    await bare_chain(engine, 2, 0.01)  # warm up
    base_ids, base_total = await bare_chain(engine, n, s)
    flow_ids, flow_total = await flow_chain(mgr, n, s)
    b_sub, b_run, b_busy = await gaps(engine, base_ids)
    f_sub, f_run, f_busy = await gaps(engine, flow_ids)
    med = statistics.median
    print(f"chain of {n} steps x {s:g} s job (local site)")
    print(
        f"  bare engine loop : end->next submitted median {med(b_sub) * 1e3:6.1f} ms, "
        f"end->next running median {med(b_run) * 1e3:6.1f} ms, total {base_total:7.2f} s"
    )
    print(
        f"  flow run         : end->next submitted median {med(f_sub) * 1e3:6.1f} ms, "
        f"end->next running median {med(f_run) * 1e3:6.1f} ms, total {flow_total:7.2f} s"
    )
    over = flow_total - f_busy
    share = over / flow_total * 100
    b_over = base_total - b_busy
    print(
        f"  flow overhead    : {over:6.2f} s of {flow_total:.2f} s = {share:.2f} % "
        f"(bare loop: {b_over:.2f} s = {b_over / base_total * 100:.2f} %)"
    )
    ok_step = med(f_sub) * 1e3 <= 50
    ok_share = share < 1.0
    print(
        f"  targets: step <= 50 ms {'PASS' if ok_step else 'FAIL'}; "
        f"overhead < 1 % {'PASS' if ok_share else 'FAIL'}"
    )


async def report_concurrent(engine: Engine, mgr: FlowManager, args: argparse.Namespace) -> None:
    k = args.concurrent
    t = time.perf_counter()
    runs = [await mgr.start(ME, StartFlowInput(flow=chain("three", 3, 0.2))) for _ in range(k)]
    views = await wait_runs(mgr, [r.run_id for r in runs], 600)
    elapsed = time.perf_counter() - t
    ok = [v for v in views if v.state == RunState.SUCCEEDED]
    entries = {s.entry_id for v in views for s in v.steps}
    print(
        f"{k} concurrent runs of a 3-step flow: {len(ok)}/{k} succeeded, "
        f"{len(entries)} jobs (expected {3 * k}) in {elapsed:.1f} s -> "
        f"{'PASS' if len(ok) == k and len(entries) == 3 * k else 'FAIL'}"
    )


async def report_queue(engine: Engine, mgr: FlowManager, args: argparse.Namespace) -> None:
    n = args.queued
    store = await mgr.store()
    event = await engine.event_to_submit_to(ME, None)
    trig = TriggerRecord(
        id="trg-bench",
        owner=ME.id,
        flow="slow",
        spec=_spec(chain("slow", 1, 30)),
        kind=TriggerKind.WEBHOOK,
        config={},
        event_id=event.id,
        max_concurrent=2,
        created_at=now(),
    )
    await store.insert_trigger(trig)
    before = rss_mb()
    t = time.perf_counter()
    for i in range(n):
        await mgr.fire(trig, {"kind": "webhook", "n": i}, f"d{i}")
    fired = time.perf_counter() - t
    after = rss_mb()
    queued = await store.count_runs(trig.id, RunState.QUEUED)
    running = await store.count_runs(trig.id, RunState.RUNNING)
    grow = after - before
    print(
        f"{n} triggered runs (max_concurrent 2): {running} running, {queued} queued in the "
        f"store; fired in {fired:.1f} s ({fired / n * 1e3:.1f} ms each); RSS {before:.0f} -> "
        f"{after:.0f} MB ({grow * 1024 / n:.1f} KB per queued run) -> "
        f"{'PASS' if queued == n - 2 and grow < 50 else 'FAIL'}"
    )
    for rec in await store.list_runs(trigger_id=trig.id, limit=n):
        if not rec.state.terminal:
            await mgr.cancel(ME, rec.id)


def _spec(flow: dict[str, Any]) -> dict[str, Any]:
    from flows.spec import parse_flow

    return parse_flow(flow).model_dump(mode="json")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrent", type=int, default=40)
    ap.add_argument("--queued", type=int, default=1000)
    asyncio.run(main(ap.parse_args()))
