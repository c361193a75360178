"""Throughput over HTTP with one and two replicas behind one address, in the same run.

    python bench/replicas.py [--clients 8] [--seconds 5] [--rounds 3] [--postgres URL]

Two server processes on one PostgreSQL store and one home, each what `sciorch serve` runs
(serve_http: the engine, /mcp with JWT auth, the proxy) with the per-principal rate limit
raised, as bench/tool_latency.py runs it. In front of them, in this process, a round-robin
TCP proxy: each new client connection goes to the next replica of the active set. Each round
measures --clients concurrent MCP SDK client sessions (streamable HTTP, current protocol, each
its own principal and connection) calling get_entry for --seconds, first with one replica
active behind the address (the baseline; the other idles, still renewing its leases and
listening), then with both. Reported: calls/s, the replicas' CPU per call (both processes,
idle one included) and this process's share (clients and proxy). The machine has 2 cores:
with clients, proxy, PostgreSQL and two servers on them, a second replica buys no cores; the
figure shows what the replicas cost, not what a bigger machine would gain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

from bench.serve_procs import Replica, free_port, pg_store
from bench.tool_latency import cpu_seconds, http_client
from ground.config import load_settings
from mcp_server.auth import create_token, ensure_keys

TOOL_LATENCY = Path(__file__).resolve().parent / "tool_latency.py"


class RoundRobin:
    """A TCP proxy: each accepted connection is piped to the next backend port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.backends: list[int] = []
        self._next: itertools.cycle[int] | None = None
        self.server: asyncio.Server | None = None

    def use(self, ports: list[int]) -> None:
        self.backends = ports
        self._next = itertools.cycle(ports)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._next is not None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self._next))
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def measure(
    url: str, keys: Path, clients: int, seconds: float, entry_id: str, pids: list[int]
) -> tuple[float, float, float]:
    """(calls/s, replicas' CPU ms per call, this process's CPU % of a core)."""
    counts = [0] * clients
    start = asyncio.Event()
    stop_at = 0.0

    async def worker(i: int, ready: asyncio.Event) -> None:
        token = create_token(keys, f"client-{i}", ["read"], 3600)
        async with http_client(url, token, "sdk") as call:
            await call("get_entry", {"entry_id": entry_id})
            ready.set()
            await start.wait()
            while time.perf_counter() < stop_at:
                result = await call("get_entry", {"entry_id": entry_id})
                if result.is_error:
                    raise SystemExit(f"get_entry failed: {result.content}")
                counts[i] += 1

    readies = [asyncio.Event() for _ in range(clients)]
    tasks = [asyncio.create_task(worker(i, readies[i])) for i in range(clients)]
    await asyncio.gather(*(r.wait() for r in readies))
    cpu0 = sum(cpu_seconds(p) for p in pids)
    mine0 = time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    total = sum(counts)
    server_cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    return total / elapsed, server_cpu / total * 1000, (time.process_time() - mine0) / elapsed * 100


async def run(clients: int, seconds: float, rounds: int, base: str | None) -> None:
    async with pg_store(base) as store:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            keys = load_settings(home).keys_dir
            ensure_keys(keys)  # made once, before the replicas read them
            command = [sys.executable, str(TOOL_LATENCY), "--serve", str(home), "--port", "{port}"]
            replicas = [Replica(home, store, command) for _ in range(2)]
            proxy = RoundRobin()
            try:
                for r in replicas:
                    await r.healthy()
                await proxy.start()
                url = f"http://127.0.0.1:{proxy.port}/mcp"
                proxy.use([replicas[0].port])
                token = create_token(keys, "bench", ["submit"], 3600)
                async with http_client(url, token, "sdk") as call:
                    job = (
                        await call(
                            "submit_job",
                            {"service": "sim-instrument", "parameters": {"duration_s": 0}},
                        )
                    ).structured_content
                    await call("wait_entry", {"entry_id": job["id"], "timeout_seconds": 30})
                    for i in range(clients):
                        await call(
                            "share_event", {"event_id": job["event_id"], "principal": f"client-{i}"}
                        )
                pids = [r.pid for r in replicas]
                print(
                    f"throughput over HTTP: {clients} concurrent SDK clients, get_entry, "
                    f"{seconds:g} s per run, {rounds} rounds, round-robin proxy in front"
                )
                results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
                for i in range(rounds):
                    for n in (1, 2):
                        proxy.use([r.port for r in replicas[:n]])
                        res = await measure(url, keys, clients, seconds, job["id"], pids)
                        results[n].append(res)
                        print(
                            f"  round {i + 1}, {n} replica{'s' if n > 1 else ' '}: "
                            f"{res[0]:6.0f} calls/s, replicas' CPU {res[1]:5.2f} ms/call, "
                            f"clients + proxy {res[2]:3.0f}% of a core"
                        )
            finally:
                await proxy.close()
                for r in replicas:
                    r.stop()
    print("\nmedians of the rounds:")
    for n, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"  {n} replica{'s' if n > 1 else ' '}: {rate:6.0f} calls/s, {cpu:5.2f} ms CPU/call")
    one = statistics.median(r[0] for r in results[1])
    two = statistics.median(r[0] for r in results[2])
    print(f"  2 replicas / 1 replica: {two / one:.2f}x calls/s on {os.cpu_count()} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postgres", default=os.environ.get("SCIORCH_TEST_POSTGRES"))
    args = ap.parse_args()
    print(f"sciorch replicas: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    asyncio.run(run(args.clients, args.seconds, args.rounds, args.postgres))


if __name__ == "__main__":
    main()
