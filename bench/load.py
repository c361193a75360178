"""Load over HTTP: many concurrent MCP clients of several principals calling a mix of tools on a
real `sciorch serve` (child process, its default per-principal rate limit in force).

    python bench/load.py [--clients 50] [--calls 100] [--principals 5] [--baseline-calls 150]

1. Baseline, in the same run and on the same server: one client alone makes --baseline-calls
   calls of the mix, one after another: p50/p99 and calls per second.
2. Load: --clients clients (spread over --principals principals, each client its own session
   and bearer token) make --calls calls each of the same mix at once. A refusal by the rate
   limit is counted and retried after the retry_after_s it names; anything else that fails is
   an error. Each client submits one short job among its calls.
3. Every submitted job is then waited for: it must be in a final state.

The mix per client, in turn: get_entry (x4 in 10), list_entries, list_services, list_sites,
read_results, read_logs, list_events; submit_job once.

Targets: 0 errors besides rate-limit refusals; every submitted job final; the server's CPU
time per call under load <= 1.5x the baseline's (concurrency must not add work per call; CPU
time, not calls per second, because on a shared machine other tenants set the wall clock: in
the first run here the server got 29% of a core); p99 under load <= 5x p50 under load (no
client starved). Exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

from mcp.shared.exceptions import MCPError

from bench.tool_latency import Call, cpu_seconds, http_client, http_server
from ground.config import load_settings
from ground.models import TERMINAL_STATES
from mcp_server.auth import create_token

TAIL_TARGET = 5.0  # p99 / p50 under load
CPU_TARGET = 1.5  # server CPU per call, load / baseline
MIX = (
    "get_entry",
    "list_entries",
    "get_entry",
    "list_services",
    "read_results",
    "get_entry",
    "list_sites",
    "read_logs",
    "get_entry",
    "list_events",
)
JOB = {"service": "sim-instrument", "parameters": {"duration_s": 0, "records": 1}}
CONFIG = '[[sites]]\nname = "local"\nkind = "local"\ncpus = 4\n'


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    refusals: int = 0
    errors: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


def arguments(name: str, entry_id: str) -> dict[str, Any]:
    if name == "submit_job":
        return JOB
    if name in ("get_entry", "read_results", "read_logs"):
        return {"entry_id": entry_id}
    if name == "list_entries":
        return {"limit": 20}
    return {}


async def call_once(call: Call, name: str, args: dict[str, Any], tally: Tally) -> Any:
    """One call, retried after the wait a rate-limit refusal names; None if it failed."""
    while True:
        started = time.perf_counter()
        try:
            result = await call(name, args)
        except MCPError as exc:
            wait = (exc.data or {}).get("retry_after_s") if isinstance(exc.data, dict) else None
            if str(exc).startswith("rate_limited") and isinstance(wait, int | float):
                tally.refusals += 1
                await asyncio.sleep(wait)
                continue
            tally.errors.append(f"{name}: {exc}")
            return None
        except Exception as exc:  # transport: connection refused, reset, timed out
            tally.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            return None
        tally.latencies.append(time.perf_counter() - started)
        if result.is_error:
            text = " ".join(getattr(c, "text", "") for c in result.content)
            tally.errors.append(f"{name}: {text[:300]}")
            return None
        return result


async def client_run(
    call: Call, calls: int, entry_id: str, submit_at: int | None, tally: Tally
) -> None:
    for i in range(calls):
        name = "submit_job" if i == submit_at else MIX[i % len(MIX)]
        result = await call_once(call, name, arguments(name, entry_id), tally)
        if name == "submit_job" and result is not None:
            entry_id = result.structured_content["id"]  # read its own job from here on
            tally.jobs.append(entry_id)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


async def seed_job(url: str, token: str) -> str:
    """A finished job of this principal's, for the reading tools to read."""
    async with http_client(url, token, "sdk") as call:
        job = (await call("submit_job", JOB)).structured_content
        await call("wait_entry", {"entry_id": job["id"], "timeout_seconds": 60})
    return str(job["id"])


async def run(clients: int, calls: int, principals: int, baseline_calls: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(CONFIG)
        keys = load_settings(home).keys_dir

        def token(sub: str) -> str:
            return create_token(keys, sub, ["read", "submit"], 3600)

        def serve(port: int) -> list[str]:
            cli = [sys.executable, "-m", "sciorch.cli", "--home", str(home)]
            return [*cli, "serve", "--port", str(port)]

        with http_server(home, serve) as (base, pid):
            url = base + "/mcp"
            who = [f"load-{p}" for p in range(principals)]
            owner = [who[i % principals] for i in range(clients)]  # of each client
            subs = [*who, "baseline"]
            seeds = dict(
                zip(
                    subs,
                    await asyncio.gather(*(seed_job(url, token(w)) for w in subs)),
                    strict=True,
                )
            )

            # 1. baseline: one client alone
            base_tally = Tally()
            async with http_client(url, token("baseline"), "sdk") as call:
                await call("list_sites", {})  # connected and warm
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                await client_run(call, baseline_calls, seeds["baseline"], None, base_tally)
                base_elapsed = time.perf_counter() - t0
                base_cpu = (cpu_seconds(pid) - cpu0) / len(base_tally.latencies)
            base_rate = len(base_tally.latencies) / base_elapsed
            b50, b99 = percentiles(base_tally.latencies)
            print(
                f"baseline, one client: {len(base_tally.latencies)} calls in {base_elapsed:.1f} s "
                f"= {base_rate:.0f} calls/s; p50 {b50:.1f} ms, p99 {b99:.1f} ms; server CPU "
                f"{base_cpu * 1000:.2f} ms/call; refusals {base_tally.refusals}, errors "
                f"{len(base_tally.errors)}"
            )

            # 2. load: every client at once, after all have connected
            tallies = [Tally() for _ in range(clients)]
            start = asyncio.Event()

            async def worker(i: int, ready: asyncio.Event) -> None:
                async with http_client(url, token(owner[i]), "sdk") as call:
                    await call("list_sites", {})
                    ready.set()
                    await start.wait()
                    submit_at = (7 * i + 3) % calls
                    await client_run(call, calls, seeds[owner[i]], submit_at, tallies[i])

            readies = [asyncio.Event() for _ in range(clients)]
            tasks = [asyncio.create_task(worker(i, readies[i])) for i in range(clients)]
            await asyncio.gather(*(r.wait() for r in readies))
            cpu0, mine0 = cpu_seconds(pid), time.process_time()
            t0 = time.perf_counter()
            start.set()
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
            server_cpu, client_cpu = cpu_seconds(pid) - cpu0, time.process_time() - mine0

            latencies = [x for t in tallies for x in t.latencies]
            errors = [e for t in tallies for e in t.errors]
            refusals = sum(t.refusals for t in tallies)
            jobs = [j for t in tallies for j in t.jobs]
            rate = len(latencies) / elapsed
            p50, p99 = percentiles(latencies)
            print(
                f"load, {clients} clients x {calls} calls, {principals} principals: "
                f"{len(latencies)} calls in {elapsed:.1f} s = {rate:.0f} calls/s; p50 "
                f"{p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1000:.0f} ms; "
                f"rate-limit refusals {refusals} (retried); errors {len(errors)}; server CPU "
                f"{server_cpu / len(latencies) * 1000:.2f} ms/call, "
                f"{server_cpu / elapsed * 100:.0f}% of a core, clients' "
                f"{client_cpu / elapsed * 100:.0f}%"
            )
            for line in errors[:10]:
                print(f"  error: {line}")

            # 3. every submitted job final (each in its principal's default event: waited
            # for by its owner)
            async def states_of(sub: str, job_ids: list[str]) -> list[str]:
                async with http_client(url, token(sub), "sdk") as call:
                    args = [{"entry_id": j, "timeout_seconds": 120} for j in job_ids]
                    return [
                        (await call("wait_entry", a)).structured_content["entry"]["state"]
                        for a in args
                    ]

            t0 = time.perf_counter()
            owned = {
                w: [j for i, t in enumerate(tallies) for j in t.jobs if owner[i] == w] for w in who
            }
            states = Counter(
                s
                for got in await asyncio.gather(*(states_of(w, js) for w, js in owned.items()))
                for s in got
            )
            final = sum(n for s, n in states.items() if s in TERMINAL_STATES)
            print(
                f"jobs: {len(jobs)} submitted (of {clients}), {final} final "
                f"({dict(states)}), waited {time.perf_counter() - t0:.1f} s"
            )

    cpu_ratio, tail = server_cpu / len(latencies) / base_cpu, p99 / p50
    checks = [
        ("0 errors besides rate-limit refusals", not errors and not base_tally.errors),
        (
            f"every client's job submitted and final ({final}/{clients})",
            final == len(jobs) == clients,
        ),
        (
            f"server CPU per call under load <= {CPU_TARGET:g}x baseline ({cpu_ratio:.2f}x; "
            f"calls/s {rate / base_rate:.2f}x)",
            cpu_ratio <= CPU_TARGET,
        ),
        (f"p99 <= {TAIL_TARGET:g}x p50 under load ({tail:.1f}x)", tail <= TAIL_TARGET),
    ]
    for what, ok in checks:
        print(f"  {'ok    ' if ok else 'MISSED'} {what}")
    return all(ok for _, ok in checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--calls", type=int, default=100, help="calls per client")
    ap.add_argument("--principals", type=int, default=5)
    ap.add_argument("--baseline-calls", type=int, default=150)
    args = ap.parse_args()
    print(f"sciorch load: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    ok = asyncio.run(run(args.clients, args.calls, args.principals, args.baseline_calls))
    print("summary: " + ("all targets met" if ok else "TARGET MISSED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
