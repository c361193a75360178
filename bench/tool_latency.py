"""MCP tool latency and HTTP throughput: `get_entry` against a bare fastmcp echo tool registered
on the same server instance, measured in the same run.

    python bench/tool_latency.py [--calls 400] [--rounds 3] [--clients 8] [--seconds 5]
                                 [--client sdk|fastmcp]

1. In memory: the fastmcp Client on `create_server(engine)`; echo and get_entry calls
   interleaved, median and p90 of each, in --rounds rounds. Then the same on the server alone
   (FastMCP.call_tool: middleware and tool, no client), to show what is the server's.
2. Over streamable HTTP: what `sciorch serve` runs (serve_http: MCP at /mcp with JWT auth, the
   proxy, /healthz) in a child process on a free loopback port, so server and clients each get
   a core of their own; median and p90 again, one client, --rounds rounds.
3. Throughput over HTTP: --clients concurrent client sessions (each its own principal) calling
   get_entry, then echo, for --seconds seconds; --rounds rounds; calls per second, and the
   server process's CPU time per call.

Targets: get_entry median <= 1.5x echo median (in memory and over HTTP; the verdict takes the
median of the rounds' ratios); >= 300 get_entry calls per second over HTTP on 2 cores (the
verdict takes the best round: on a shared machine other tenants only ever slow a round down,
so the fastest is the closest to what the server can do; every round is printed). The
per-principal rate limit is raised for the run (the default, 50/s with bursts of 200, would
cap each client); the HTTP clients send bearer tokens, so both tools pay the same token check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

import httpx2
import mcp
from fastmcp import Client, FastMCP
from mcp.client.streamable_http import streamable_http_client

from ground.config import load_settings
from ground.models import Principal
from mcp_server.auth import create_token, ensure_keys, verifier
from mcp_server.server import create_server
from orchestrator.engine import Engine
from sciorch.web.app import serve_http
from tests.processes import serving

RATIO_TARGET = 1.5
THROUGHPUT_TARGET = 300.0
ME = Principal(id="bench")

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


def bench_server(engine: Engine, **kwargs: Any) -> FastMCP:
    """sciorch's MCP server, plus the bare echo tool to compare with."""
    server = create_server(engine, rate_per_second=1e6, rate_burst=1_000_000, **kwargs)

    @server.tool(name="echo")
    async def echo(text: str) -> str:
        return text

    return server


def settings_for(home: Path, port: int | None = None) -> Any:
    extra: dict[str, Any] = {"sites": [{"name": "local", "kind": "local", "cpus": 4}]}
    if port is not None:
        extra["public_url"] = f"http://127.0.0.1:{port}"
    return load_settings(home, **extra)


def stats(samples: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]


async def interleaved(call: Call, entry_id: str, n: int, warmup: int) -> dict[str, list[float]]:
    """n calls of each tool, alternating, after a warm-up."""
    cases = {"echo": ("echo", {"text": "ping"}), "get_entry": ("get_entry", {"entry_id": entry_id})}
    for _ in range(warmup):
        for name, args in cases.values():
            await call(name, args)
    out: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, float] = {k: 0.0 for k in cases}
    for _ in range(n):
        for key, (name, args) in cases.items():
            c, t = time.process_time(), time.perf_counter()
            result = await call(name, args)
            out[key].append(time.perf_counter() - t)
            cpu[key] += time.process_time() - c
            if getattr(result, "is_error", False):
                raise SystemExit(f"{name} failed: {result.content}")
    for key in cases:  # CPU time of this process (all threads) per call, as a last sample
        out[key + ":cpu"] = [cpu[key] / n]
    return out


def report(title: str, rounds: list[dict[str, list[float]]], cpu_note: str) -> float:
    """Print each round; return the median of the rounds' get_entry/echo ratios."""
    note = f"; CPU: {cpu_note}" if cpu_note else ""
    print(f"\n{title} ({len(rounds[0]['echo'])} calls of each per round{note})")
    ratios = []
    for i, samples in enumerate(rounds, 1):
        echo_med, echo_p90 = stats(samples["echo"])
        get_med, get_p90 = stats(samples["get_entry"])
        echo_cpu, get_cpu = samples["echo:cpu"][0] * 1000, samples["get_entry:cpu"][0] * 1000
        ratios.append(get_med / echo_med)
        print(
            f"  round {i}: echo median {echo_med:6.3f} ms p90 {echo_p90:6.3f} ms CPU "
            f"{echo_cpu:6.3f} ms | get_entry median {get_med:6.3f} ms p90 {get_p90:6.3f} ms "
            f"CPU {get_cpu:6.3f} ms | {ratios[-1]:.2f}x (CPU {get_cpu / echo_cpu:.2f}x)"
        )
    ratio = statistics.median(ratios)
    verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
    print(
        f"  get_entry / echo (median of the rounds) = {ratio:.2f}x  "
        f"(target <= {RATIO_TARGET}x: {verdict})"
    )
    return ratio


async def rounds_of(call: Call, entry_id: str, calls: int, warmup: int, rounds: int) -> Any:
    return [await interleaved(call, entry_id, calls, warmup if not i else 0) for i in range(rounds)]


# ------------------------------------------------------------------ in memory


async def in_memory(calls: int, warmup: int, rounds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        engine = await Engine.open(settings_for(Path(tmp) / "home"))
        try:
            server = bench_server(engine, principal=ME)
            async with Client(server) as client:
                job = await client.call_tool(
                    "submit_job",
                    {"service": "sim-instrument", "parameters": {"duration_s": 0, "records": 2}},
                )
                entry_id = job.structured_content["id"]
                await client.call_tool("wait_entry", {"entry_id": entry_id})

                async def call(name: str, args: dict[str, Any]) -> Any:
                    return await client.call_tool(name, args, raise_on_error=False)

                samples = await rounds_of(call, entry_id, calls, warmup, rounds)

                async def direct(name: str, args: dict[str, Any]) -> Any:
                    return await server.call_tool(name, args)

                server_side = await rounds_of(direct, entry_id, calls, warmup, rounds)
        finally:
            await engine.close()
    ratio = report("in memory (fastmcp Client)", samples, "client and server")
    report("server side only (FastMCP.call_tool: middleware and tool, no client)", server_side, "")
    return ratio


# ------------------------------------------------------------------ the HTTP server (child)


async def serve(home: Path, port: int) -> None:
    """Child process: what `sciorch serve --transport http` runs (serve_http: the engine, the
    proxy and /mcp with JWT auth), with the bench server (sciorch's plus echo) at /mcp."""
    await serve_http(
        settings_for(home, port),
        "127.0.0.1",
        port,
        log_level="warning",
        mcp_factory=lambda engine: bench_server(engine, auth=verifier(engine.settings.keys_dir)),
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_server(home: Path, command: Callable[[int], list[str]] | None = None) -> Any:
    """The HTTP server in a child process on a free port: this file's --serve, or the
    `command` for that port; yields (base URL, pid) once /healthz answers."""
    ensure_keys(settings_for(home).keys_dir)  # made once, before the child reads them
    port = free_port()
    own = [sys.executable, __file__, "--serve", str(home), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with serving(command(port) if command else own, base, what="the HTTP server") as child:
        yield base, child.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def http_client(url: str, token: str, kind: str) -> AsyncIterator[Call]:
    """One client session over streamable HTTP: the `mcp` SDK's or fastmcp's."""
    if kind == "fastmcp":
        async with Client(url, auth=token) as fclient:

            async def fcall(name: str, args: dict[str, Any]) -> Any:
                return await fclient.call_tool(name, args, raise_on_error=False)

            yield fcall
        return
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as hc:
        async with mcp.Client(streamable_http_client(url, http_client=hc)) as sclient:

            async def scall(name: str, args: dict[str, Any]) -> Any:
                return await sclient.call_tool(name, args)

            yield scall


async def over_http(
    calls: int, warmup: int, rounds: int, clients: int, seconds: float, kind: str
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        keys = settings_for(home).keys_dir
        with http_server(home) as (base, pid):
            url = base + "/mcp"
            async with http_client(url, create_token(keys, "bench", ["submit"], 3600), kind) as c:
                job = await c(
                    "submit_job",
                    {"service": "sim-instrument", "parameters": {"duration_s": 0, "records": 2}},
                )
                entry_id = job.structured_content["id"]
                await c("wait_entry", {"entry_id": entry_id})
                samples = await rounds_of(c, entry_id, calls, warmup, rounds)
            ratio = report(
                f"over streamable HTTP ({kind} client, one session)", samples, "client only"
            )
            # The entry is shared with every client principal, so each may read it.
            async with http_client(url, create_token(keys, "bench", ["submit"], 3600), kind) as c:
                event_id = (await c("get_entry", {"entry_id": entry_id})).structured_content[
                    "event_id"
                ]
                for i in range(clients):
                    await c("share_event", {"event_id": event_id, "principal": f"client-{i}"})
            print(
                f"\nthroughput over HTTP: {clients} concurrent {kind} clients, {seconds:g} s "
                f"per tool, {rounds} rounds"
            )
            rates: dict[str, list[float]] = {"get_entry": [], "echo": []}
            for i in range(rounds):
                print(f"  round {i + 1}:")
                for name, args in (
                    ("get_entry", {"entry_id": entry_id}),
                    ("echo", {"text": "ping"}),
                ):
                    rates[name].append(
                        await throughput(url, keys, kind, clients, seconds, name, args, pid)
                    )
    get_rate = max(rates["get_entry"])
    verdict = "ok" if get_rate >= THROUGHPUT_TARGET else "MISSED"
    print(
        f"  get_entry: best round {get_rate:.0f} calls/s, median "
        f"{statistics.median(rates['get_entry']):.0f} (echo: best {max(rates['echo']):.0f}, "
        f"median {statistics.median(rates['echo']):.0f}); target >= "
        f"{THROUGHPUT_TARGET:.0f} for the best round: {verdict}"
    )
    return ratio, get_rate


async def throughput(
    url: str,
    keys: Path,
    kind: str,
    clients: int,
    seconds: float,
    name: str,
    args: dict[str, Any],
    pid: int,
) -> float:
    counts = [0] * clients
    errors = [0] * clients
    start = asyncio.Event()
    stop_at = 0.0

    async def worker(i: int, ready: asyncio.Event) -> None:
        token = create_token(keys, f"client-{i}", ["read"], 3600)
        async with http_client(url, token, kind) as call:
            await call(name, args)  # connected and warm
            ready.set()
            await start.wait()
            while time.perf_counter() < stop_at:
                result = await call(name, args)
                if result.is_error:
                    errors[i] += 1
                else:
                    counts[i] += 1

    readies = [asyncio.Event() for _ in range(clients)]
    tasks = [asyncio.create_task(worker(i, readies[i])) for i in range(clients)]
    await asyncio.gather(*(r.wait() for r in readies))
    cpu0, mine0 = cpu_seconds(pid), time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    server_cpu = cpu_seconds(pid) - cpu0
    client_cpu = time.process_time() - mine0
    total = sum(counts)
    rate = total / elapsed
    per_call = server_cpu / total * 1000 if total else float("nan")
    print(
        f"    {name:9s}: {total} calls in {elapsed:.2f} s = {rate:.0f} calls/s "
        f"(errors {sum(errors)}; server CPU {server_cpu:.2f} s = {per_call:.2f} ms/call, "
        f"{server_cpu / elapsed * 100:.0f}% of a core; clients' process "
        f"{client_cpu / elapsed * 100:.0f}% of a core)"
    )
    if sum(errors):
        raise SystemExit(f"{name}: {sum(errors)} calls failed")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="calls of each tool per latency run")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each measurement")
    ap.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    ap.add_argument("--client", choices=("sdk", "fastmcp"), default="sdk", help="HTTP client")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve, args.port))
        return
    print(f"sciorch tool latency: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    mem_ratio = asyncio.run(in_memory(args.calls, args.warmup, args.rounds))
    http_ratio, rate = asyncio.run(
        over_http(args.calls, args.warmup, args.rounds, args.clients, args.seconds, args.client)
    )
    ok = max(mem_ratio, http_ratio) <= RATIO_TARGET and rate >= THROUGHPUT_TARGET
    print(
        f"\nsummary: get_entry/echo {mem_ratio:.2f}x in memory, {http_ratio:.2f}x over HTTP; "
        f"{rate:.0f} get_entry calls/s over HTTP (best round) -> "
        f"{'all targets met' if ok else 'TARGET MISSED'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
