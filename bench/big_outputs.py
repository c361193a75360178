"""Server memory and answer sizes for a job with big outputs, against a small-output job
measured in the same run.

    python bench/big_outputs.py [--result-mb 50] [--stream-mb 50] [--record-kb 10]

A real `sciorch serve` (HTTP, JWT auth) runs in a child process on a free loopback port with a
catalogue service of its own, `big-output`, whose job writes a result.json of --result-mb and a
stream.jsonl of --stream-mb in records of --record-kb. Through the official `mcp` SDK client
over streamable HTTP, for the small job (baseline) then the big one: submit, wait, get_entry,
read_results (paged through with since_record until a page is empty), list_entries and the
results resource. The server's resident memory (VmRSS from /proc) is sampled every 20 ms
before, during and after each phase; printed: RSS before, peak and after (and after a pause,
as the server keeps it), and the bytes of every answer.

Measured here (2 shared cores), the big case: before the caps, the job succeeded with its
50 MB result stored; RSS 126 MB before, 1147 MB peak, 469 MB after; get_entry 50 MB,
read_results 100 MB, list_entries 50 MB, the results resource 100 MB. With them: the job fails
with result_too_large (the file kept as the artifact sciorch-result.json); RSS 126 MB before,
151-185 MB peak, 148-175 MB after; get_entry and list_entries 1 KB, each read_results page and
the resource 1 MB (51 pages for the 5000 records). The baseline job: 124 -> 126 MB both times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

import httpx2
import mcp
from mcp.client.streamable_http import streamable_http_client

from ground.config import load_settings
from mcp_server.auth import create_token, ensure_keys
from tests.processes import serving

SERVICE = """\
name: big-output
kind: job
command: ["{python}", "%s", "--payload"]
parameters:
  type: object
  properties:
    result_bytes: {type: integer, minimum: 0}
    stream_bytes: {type: integer, minimum: 0}
    record_bytes: {type: integer, minimum: 1}
resources:
  cpus: 0.25
"""


def payload() -> None:
    """The job: a result of result_bytes and a stream of stream_bytes, as JSON."""
    params = json.loads(Path(os.environ["SCIORCH_PARAMS"]).read_text())
    record = params.get("record_bytes", 1024)
    with open(os.environ["SCIORCH_STREAM"], "w") as f:
        for i in range(max(1, params.get("stream_bytes", 0) // record)):
            f.write(json.dumps({"i": i, "pad": "s" * record}) + "\n")
    with open(os.environ["SCIORCH_RESULT"], "w") as f:
        f.write(json.dumps({"value": 1.0, "blob": "r" * params.get("result_bytes", 0)}))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """The child's RSS every 20 ms in a thread; `peak` since the last `reset`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_mb(self.pid))

    def reset(self) -> float:
        now = rss_mb(self.pid)
        self.peak = now
        return now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sciorch_serve(home: Path, port: int) -> Iterator[int]:
    cli = Path(sys.executable).with_name("sciorch")
    serve = [str(cli), "--home", str(home), "serve", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with serving(serve, base, what="sciorch serve", stdout=subprocess.DEVNULL) as child:
        yield child.pid


@contextlib.asynccontextmanager
async def client(url: str, token: str) -> AsyncIterator[mcp.Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60, read=600)) as hc:
        async with mcp.Client(streamable_http_client(url, http_client=hc)) as c:
            yield c


def size_of(result: Any) -> int:
    """Bytes of an answer as the client got it (structured content, else the text)."""
    if getattr(result, "structured_content", None) is not None:
        return len(json.dumps(result.structured_content))
    contents = getattr(result, "contents", None) or getattr(result, "content", [])
    return sum(len(getattr(c, "text", "") or "") for c in contents)


async def phase(c: mcp.Client, sampler: Sampler, name: str, params: dict[str, Any]) -> None:
    before = sampler.reset()
    sizes: dict[str, int] = {}
    job = await c.call_tool("submit_job", {"service": "big-output", "parameters": params})
    entry_id = job.structured_content["id"]
    waited = await c.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 300})
    entry = waited.structured_content["entry"]
    sizes["get_entry"] = size_of(await c.call_tool("get_entry", {"entry_id": entry_id}))
    since, pages, records, total = 0, 0, 0, 0
    while True:
        page = await c.call_tool("read_results", {"entry_id": entry_id, "since_record": since})
        got = page.structured_content
        pages += 1
        total += size_of(page)
        if pages == 1:
            sizes["read_results (first page)"] = size_of(page)
        if not got["records"] or got["next_record"] <= since:
            break
        records += len(got["records"])
        since = got["next_record"]
    sizes[f"read_results (all {pages} pages, {records} records)"] = total
    sizes["list_entries"] = size_of(await c.call_tool("list_entries", {"limit": 50}))
    uri = f"sciorch://entries/{entry_id}/results"
    sizes["results resource"] = size_of(await c.read_resource(uri))
    peak = sampler.peak
    after = rss_mb(sampler.pid)
    await asyncio.sleep(3)
    settled = rss_mb(sampler.pid)
    why = f" ({entry['reason']})" if entry["reason"] else ""
    print(f"\n{name}: entry {entry['state']}{why}")
    print(f"  server RSS  before {before:7.1f} MB  peak {peak:7.1f} MB  after {after:7.1f} MB"
          f"  after 3 s {settled:7.1f} MB")
    for call, n in sizes.items():
        print(f"  {call:<44} {n / 1e6:10.3f} MB")


def prepare(tmp: Path, name: str = "big-output", template: str = "") -> tuple[Path, str]:
    """A home whose catalogue has `name` (`big-output` by default), and a token for it."""
    home = tmp / "home"
    cat = tmp / "catalogue"
    cat.mkdir()
    (cat / f"{name}.yaml").write_text(template or SERVICE % Path(__file__).resolve())
    home.mkdir()
    (home / "config.toml").write_text(f"catalogue_dirs = [{json.dumps(str(cat))}]\n")
    settings = load_settings(home)
    ensure_keys(settings.keys_dir)
    return home, create_token(settings.keys_dir, "bench", ["read", "submit"], 3600)


async def main(args: argparse.Namespace) -> None:
    mb = 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        home, token = prepare(Path(tmp))
        port = free_port()
        with sciorch_serve(home, port) as pid:
            sampler = Sampler(pid)
            try:
                async with client(f"http://127.0.0.1:{port}/mcp", token) as c:
                    small = {"result_bytes": 1000, "stream_bytes": 10_000, "record_bytes": 1000}
                    await phase(c, sampler, "baseline (1 KB result, 10 KB stream)", small)
                    big = {
                        "result_bytes": int(args.result_mb * mb),
                        "stream_bytes": int(args.stream_mb * mb),
                        "record_bytes": int(args.record_kb * 1000),
                    }
                    await phase(
                        c,
                        sampler,
                        f"big ({args.result_mb:g} MB result, {args.stream_mb:g} MB stream "
                        f"in {args.record_kb:g} KB records)",
                        big,
                    )
            finally:
                sampler.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--payload"]:
        payload()
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result-mb", type=float, default=50)
    parser.add_argument("--stream-mb", type=float, default=50)
    parser.add_argument("--record-kb", type=float, default=10)
    asyncio.run(main(parser.parse_args()))
