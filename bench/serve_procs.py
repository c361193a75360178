"""What the replica benches share: a PostgreSQL store in a fresh schema, and real `sciorch serve`
processes on it (one home directory for all, as replicas run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2

from bench.store import drop_schema, start_postgres

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def pg_store(base: str | None) -> AsyncIterator[str]:
    """A store URL in a fresh schema (the test server started if no URL is given)."""
    started = False
    if not base:
        base, started = await asyncio.to_thread(start_postgres)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        yield f"{base}{'&' if '?' in base else '?'}schema={schema}"
    finally:
        await drop_schema(base, schema)
        await drop_schema(base, f"{schema}_steering")
        if started:
            await asyncio.to_thread(
                subprocess.run, ["bash", str(ROOT / "scripts" / "postgres.sh"), "stop"], check=False
            )


class Replica:
    """One `sciorch serve --transport http` process (or `command`, with {port} filled in)."""

    def __init__(self, home: Path, store: str, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCIORCH_")}
        env.update(SCIORCH_HOME=str(home), SCIORCH_STORE=store)
        argv = [sys.executable, "-m", "sciorch.cli", "serve", "--host", "127.0.0.1",
                "--port", "{port}"]
        self.log = home / f"replica-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [a.replace("{port}", str(self.port)) for a in command or argv],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def healthy(self, timeout_s: float = 90) -> None:
        async with httpx2.AsyncClient(trust_env=False) as http:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"replica on port {self.port} exited: {self.proc.returncode}")
                with contextlib.suppress(httpx2.TransportError):
                    if (await http.get(self.base + "/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise SystemExit(f"replica on port {self.port} did not come up")

    def kill_9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def query(store: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    from orchestrator.database import split_schema

    dsn, schema = split_schema(store)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
