"""A server in a child process, for tests and benchmarks alike: stdlib and httpx2 only, so a
benchmark's own child imports nothing of pytest."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2


def cli_env(home: Path, principal: str = "tester", **extra: str) -> dict[str, str]:
    """The environment of a `sciorch` child: this one's, less any SCIORCH_ or ANTHROPIC_ setting
    of the developer's own (the child must see only `home` and what the test sets), plain wide
    output and no update check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCIORCH_", "ANTHROPIC_"))}
    env.update(
        SCIORCH_HOME=str(home),
        SCIORCH_PRINCIPAL=principal,
        NO_COLOR="1",
        COLUMNS="200",
        FASTMCP_CHECK_FOR_UPDATES="off",
        **extra,
    )
    return env


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


# `python -c HIDE_PYARROW <sciorch args>`: the CLI as if pyarrow were not installed (an import
# of it fails, find_spec finds nothing), to test what an export says without the extra.
HIDE_PYARROW = (
    "import sys; sys.modules['pyarrow'] = None; sys.argv[0] = 'sciorch'; "
    "from sciorch.cli import main; main()"
)
