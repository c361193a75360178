"""A resumable upload continued through another replica: two real `sciorch serve`, each with a
home (and disk) of its own, on one PostgreSQL store and one S3 (moto's standalone server, the
real obstore client). The first half goes to replica A, the rest to replica B; a job then
reads the input byte for byte; bob can neither resume, see nor use alice's upload."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ground.config import load_settings
from mcp_server.auth import create_token, ensure_keys
from tests.conftest import postgres_schema
from tests.mcp_helpers import (
    assert_tool_error,
    free_socket,
    script_catalogue,
    sdk_client,
    structured,
)
from tests.s3_helpers import moto_s3
from tests.test_inputs import PAYLOAD
from tests.test_replicas import _start
from tests.test_steering import _healthy, _kill_9

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


@pytest.fixture
async def pg_url(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    async with postgres_schema(monkeypatch) as url:
        yield url


def _port() -> int:
    with free_socket() as sock:
        return int(sock.getsockname()[1])


def _home(path: Path, catalogue: Path, storage: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in storage.items())
    (path / "config.toml").write_text(
        f"catalogue_dirs = [{json.dumps(str(catalogue))}]\n\n[storage]\n{table}\n"
    )
    return path


@pytest.mark.timeout(300)
async def test_an_upload_begun_on_one_replica_is_finished_on_another_and_read_by_a_job(
    tmp_path: Path, pg_url: str
) -> None:
    cat = script_catalogue(tmp_path, "reads-inputs", PAYLOAD, {})
    template = json.loads((cat / "reads-inputs.yaml").read_text())
    template["inputs"] = [
        {"name": "data", "kind": "file", "required": True, "max_bytes": 64 * MIB},
        {"name": "refs", "kind": "directory", "required": False},
    ]
    (cat / "reads-inputs.yaml").write_text(json.dumps(template))
    # Over one S3 part (8 MiB): the half on B goes multipart, and the join reads parts back.
    data = os.urandom(10 * MIB + 7)
    half = len(data) // 2
    with moto_s3() as s3:
        storage = s3.storage(prefix="replicas/")
        home_a = _home(tmp_path / "a", cat, storage)
        home_b = _home(tmp_path / "b", cat, storage)
        # One identity for both (as replicas behind one address share their signing key).
        keys_a = load_settings(home_a).keys_dir
        ensure_keys(keys_a)
        shutil.copytree(keys_a, load_settings(home_b).keys_dir, dirs_exist_ok=True)
        alice = {
            "authorization": f"Bearer {create_token(keys_a, 'alice', ['read', 'submit'], 600)}"
        }
        bob_token = create_token(keys_a, "bob", ["read", "submit"], 600)
        bob = {"authorization": f"Bearer {bob_token}"}
        pa, pb = _port(), _port()
        a = _start(home_a, pa, pg_url)
        b: subprocess.Popen[bytes] | None = None
        try:
            on_a, on_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
            await _healthy(a, on_a)
            b = _start(home_b, pb, pg_url)
            await _healthy(b, on_b)
            async with httpx.AsyncClient(timeout=60) as web:
                made = await web.post(
                    on_a + "/uploads", json={"name": "scan.bin", "size": len(data)}, headers=alice
                )
                assert made.status_code == 201, made.text
                upload_id = made.json()["id"]
                first = await web.put(
                    f"{on_a}/uploads/{upload_id}",
                    content=data[:half],
                    headers={**alice, "content-range": f"bytes 0-{half - 1}/{len(data)}"},
                )
                assert first.status_code == 200 and first.json()["received"] == half, first.text
                # B knows where it stands: the state is in the store, not on A's disk.
                head = await web.head(f"{on_b}/uploads/{upload_id}", headers=alice)
                assert head.status_code == 200 and head.headers["upload-offset"] == str(half)
                rest = {"content-range": f"bytes {half}-{len(data) - 1}/{len(data)}"}
                # bob can neither see nor resume it, on either replica.
                for base in (on_a, on_b):
                    assert (
                        await web.head(f"{base}/uploads/{upload_id}", headers=bob)
                    ).status_code == 404
                    stolen = await web.put(
                        f"{base}/uploads/{upload_id}", content=data[half:], headers={**bob, **rest}
                    )
                    assert stolen.status_code == 404, stolen.text
                # A range from the wrong place, on B: 409 with where to resume.
                wrong = await web.put(
                    f"{on_b}/uploads/{upload_id}",
                    content=b"xx",
                    headers={**alice, "content-range": f"bytes 0-1/{len(data)}"},
                )
                assert wrong.status_code == 409 and wrong.headers["upload-offset"] == str(half)
                done = await web.put(
                    f"{on_b}/uploads/{upload_id}", content=data[half:], headers={**alice, **rest}
                )
                assert done.status_code == 200, done.text
                up = done.json()
                assert up["complete"] and up["received"] == len(data)
                # B got only the second half: the hash was made from the stored object.
                assert up["sha256"] == hashlib.sha256(data).hexdigest()
                seen = await web.get(f"{on_a}/uploads/{upload_id}", headers=alice)
                assert seen.json()["complete"] and seen.json()["sha256"] == up["sha256"]
            for home in (home_a, home_b):
                assert not (home / "uploads").exists()  # no partial state on a replica's disk

            async with sdk_client(on_b + "/mcp", alice["authorization"][7:]) as client:
                entry = structured(
                    await client.call_tool(
                        "submit_job", {"service": "reads-inputs", "inputs": {"data": up["uri"]}}
                    )
                )
                waited = structured(
                    await client.call_tool(
                        "wait_entry", {"entry_id": entry["id"], "timeout_seconds": 120}
                    )
                )["entry"]
                assert waited["state"] == "succeeded", waited
                assert waited["result"]["size"] == len(data)
                assert waited["result"]["sha256"] == hashlib.sha256(data).hexdigest()
            async with sdk_client(on_a + "/mcp", bob_token) as client:
                refused = await client.call_tool(
                    "submit_job", {"service": "reads-inputs", "inputs": {"data": up["uri"]}}
                )
                assert_tool_error(refused, "not_found", "[field: inputs.data]")
        finally:
            if b is not None:
                _kill_9(b)
            _kill_9(a)
