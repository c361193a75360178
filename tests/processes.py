"""A server in a child process, for tests and benchmarks alike: stdlib and httpx2 only, so a
benchmark's own child imports nothing of pytest."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx2


@contextlib.contextmanager
def serving(
    argv: list[str], base: str, *, what: str = "the server", **popen: Any
) -> Iterator[subprocess.Popen[str]]:
    """`argv` started, yielded once `base`/healthz answers 200 (within a minute), stopped after
    (terminated, killed if it lingers). Raises RuntimeError with what it printed (where its
    stdout is a pipe) if it exits or does not answer in time."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, text=True, **popen)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            if child.poll() is not None or time.monotonic() > deadline:
                out = child.stdout.read() if child.poll() is not None and child.stdout else ""
                raise RuntimeError(f"{what} did not start: {out}")
            time.sleep(0.1)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
