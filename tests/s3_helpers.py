"""A real S3 API over HTTP for the tests: moto's standalone server (`moto_server`, in a venv
of its own that scripts/test.d/25-moto.sh makes), run as its own process on 127.0.0.1 on a
free port; sciorch speaks to it with its real client (obstore). No S3 server installs here
(see notes/platform.md); moto speaks the S3 wire protocol. Without it the tests skip, except
under CI=true, where they fail."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.mcp_helpers import free_socket

BUCKET = "sciorch-test"
KEYS = {"access_key_id": "testing", "secret_access_key": "testing"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def put(self, key: str, data: bytes, bucket: str = BUCKET) -> None:
        """An object written from outside sciorch (a facility's own upload, say)."""
        httpx.put(f"{self.endpoint}/{bucket}/{key}", content=data, timeout=30).raise_for_status()

    def storage(self, bucket: str = BUCKET, prefix: str = "sciorch/") -> dict[str, Any]:
        """A [storage] table for this server, the bucket made."""
        httpx.put(f"{self.endpoint}/{bucket}", timeout=30)  # 409 when it exists: fine
        return {
            "kind": "s3",
            "endpoint": self.endpoint,
            "bucket": bucket,
            "prefix": prefix,
            **KEYS,
        }


def moto_command() -> str:
    default = Path(__file__).resolve().parents[1] / ".venv-moto" / "bin" / "moto_server"
    cmd = os.environ.get("SCIORCH_MOTO_SERVER") or str(default)
    if not Path(cmd).is_file():
        why = f"no moto_server at {cmd} (scripts/test.d/25-moto.sh installs it)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return cmd


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Server]:
    cmd = moto_command()
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, **{"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}
    proc = subprocess.Popen(
        [cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
