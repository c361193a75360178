"""Artifacts an agent can read, over real streamable HTTP with the official SDK client: a real
local job (a catalogue service of this module's own) writes a PNG, a CSV and a bigger binary
file; read_results lists them with uri, url, type, size and sha256; read_artifact shows the
PNG as image content and the CSV as text, and reads big files in ranges; the resource gives
text and blobs; paths cannot leave the output dir; another principal sees nothing; the HTTP
download streams with Range; `sciorch fetch` writes the files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from jsonschema import Draft202012Validator

from ground.contract import MAX_ARTIFACT_READ
from tests.mcp_helpers import (
    CURRENT,
    HttpServer,
    assert_tool_error,
    run_http_server,
    script_catalogue,
    sdk_client,
    structured,
    text_of,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSV = "x,y\n1,2.5\n2,3.5\n3,\u00e9t\u00e9\n"
BIG = 3 * MAX_ARTIFACT_READ // 2

PAYLOAD = """\
import json, os, struct, sys, time, zlib
p = json.load(open(os.environ["SCIORCH_PARAMS"]))
out = os.environ["SCIORCH_OUTPUT_DIR"]

def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

# A 4x4 red RGB PNG, written by hand (no imaging library needed in the job).
rows = b"".join(b"\\x00" + b"\\xff\\x00\\x00" * 4 for _ in range(4))
png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
os.makedirs(os.path.join(out, "plots"), exist_ok=True)
open(os.path.join(out, "plots", "red.png"), "wb").write(png)
open(os.path.join(out, "data.csv"), "w", encoding="utf-8").write(%(csv)r)
open(os.path.join(out, "big.bin"), "wb").write(bytes(range(256)) * (%(big)d // 256))
# A link out of the output dir: neither listed nor readable.
os.symlink(os.environ["SCIORCH_PARAMS"], os.path.join(out, "escape.json"))
with open(os.environ["SCIORCH_STREAM"], "a") as f:
    f.write(json.dumps({"step": 1}) + "\\n")
sys.stdout.flush()
time.sleep(p.get("hold_s", 0))
open(os.environ["SCIORCH_RESULT"], "w").write(json.dumps({"ok": True}))
""".replace("%(csv)r", repr(CSV)).replace("%(big)d", str(BIG))


def catalogue(root: Path) -> Path:
    return script_catalogue(
        root, "writes-files", PAYLOAD, {"hold_s": {"type": "number", "minimum": 0}}
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HttpServer]:
    root = tmp_path_factory.mktemp("artifacts")
    overrides = {"catalogue_dirs": [catalogue(root)]}
    async with run_http_server(root / "home", settings=overrides) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def job(http: HttpServer) -> dict[str, Any]:
    """alice's finished job, submitted and waited for over MCP."""
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        entry = structured(await client.call_tool("submit_job", {"service": "writes-files"}))
        waited = await client.call_tool("wait_entry", {"entry_id": entry["id"]})
        done = structured(waited)["entry"]
        assert done["state"] == "succeeded", done
        return dict(done)


def output_dir(http: HttpServer, entry_id: str) -> Path:
    return http.engine.settings.entries_dir / entry_id / "output"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_an_agent_sees_the_png_as_an_image_and_reads_the_csv(
    http: HttpServer, job: dict[str, Any]
) -> None:
    out = output_dir(http, job["id"])
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        assert client.protocol_version == CURRENT
        listed = structured(await client.call_tool("read_results", {"entry_id": job["id"]}))
        arts = {a["path"]: a for a in listed["artifacts"]}
        assert set(arts) == {"big.bin", "data.csv", "plots/red.png"}  # the link out is not
        png, csv = arts["plots/red.png"], arts["data.csv"]
        assert png["mime_type"] == "image/png" and csv["mime_type"] == "text/csv"
        assert png["uri"] == f"sciorch://entries/{job['id']}/artifacts/plots/red.png"
        assert png["url"] == f"{http.base}/entries/{job['id']}/artifacts/plots/red.png"
        for path, art in arts.items():
            assert art["size"] == (out / path).stat().st_size
            assert art["sha256"] == sha256(out / path)

        shown = await client.call_tool(
            "read_artifact", {"entry_id": job["id"], "path": "plots/red.png"}
        )
        assert not shown.is_error
        images = [c for c in shown.content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        data = base64.b64decode(images[0].data)
        assert data.startswith(PNG_SIGNATURE) and data == (out / "plots/red.png").read_bytes()
        meta = structured(shown)
        assert meta["encoding"] == "image" and meta["data"] is None and meta["eof"] is True
        published = {t.name: t.output_schema for t in (await client.list_tools()).tools}
        Draft202012Validator(published["read_artifact"]).validate(meta)
        Draft202012Validator(published["read_results"]).validate(listed)

        read = await client.call_tool("read_artifact", {"entry_id": job["id"], "path": "data.csv"})
        assert text_of(read) == CSV
        assert structured(read)["encoding"] == "text" and structured(read)["size"] == len(
            CSV.encode()
        )


async def test_big_artifacts_are_read_in_ranges(http: HttpServer, job: dict[str, Any]) -> None:
    want = (output_dir(http, job["id"]) / "big.bin").read_bytes()
    got = b""
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        offset, calls = 0, 0
        while True:
            res = structured(
                await client.call_tool(
                    "read_artifact", {"entry_id": job["id"], "path": "big.bin", "offset": offset}
                )
            )
            calls += 1
            assert res["encoding"] == "base64" and res["size"] == BIG
            chunk = base64.b64decode(res["data"])
            assert len(chunk) <= MAX_ARTIFACT_READ
            got += chunk
            offset = res["next_offset"]
            if res["eof"]:
                break
        assert calls == 2 and got == want
        over = await client.call_tool(
            "read_artifact",
            {"entry_id": job["id"], "path": "big.bin", "limit": MAX_ARTIFACT_READ + 1},
        )
        assert_tool_error(over, "invalid_input", "limit")


async def test_resources_give_text_and_blobs(http: HttpServer, job: dict[str, Any]) -> None:
    out = output_dir(http, job["id"])
    base = f"sciorch://entries/{job['id']}/artifacts/"
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        csv = (await client.read_resource(base + "data.csv")).contents
        assert len(csv) == 1 and csv[0].mime_type == "text/csv" and csv[0].text == CSV
        png = (await client.read_resource(base + "plots/red.png")).contents
        assert len(png) == 1 and png[0].mime_type == "image/png"
        assert base64.b64decode(png[0].blob) == (out / "plots/red.png").read_bytes()


async def test_paths_cannot_leave_the_output_dir(http: HttpServer, job: dict[str, Any]) -> None:
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        for path in ("../params.json", "/etc/passwd", "escape.json", "plots/../../log"):
            res = await client.call_tool("read_artifact", {"entry_id": job["id"], "path": path})
            text = assert_tool_error(res, "invalid_input", "path")
            assert "{" not in text  # not the params' contents
        missing = await client.call_tool(
            "read_artifact", {"entry_id": job["id"], "path": "nope.txt"}
        )
        assert_tool_error(missing, "not_found", "path")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {http.token('alice')}"}) as c:
        r = await c.get(f"{http.base}/entries/{job['id']}/artifacts/escape.json")
        assert r.status_code == 400 and r.json()["field"] == "path"


async def test_another_principal_reads_nothing(http: HttpServer, job: dict[str, Any]) -> None:
    await assert_bob_reads_nothing(http, job["id"])


async def assert_bob_reads_nothing(http: HttpServer, entry_id: str) -> None:
    """Bob (nothing shared) gets not_found from the tools and the resource, 404 over HTTP;
    no token or a forged one gets 401."""
    async with sdk_client(http.mcp_url, http.token("bob"), mode=CURRENT) as client:
        res = await client.call_tool("read_artifact", {"entry_id": entry_id, "path": "data.csv"})
        assert_tool_error(res, "not_found", "entry_id")
        res = await client.call_tool("read_results", {"entry_id": entry_id})
        assert_tool_error(res, "not_found", "entry_id")
        with pytest.raises(Exception, match="not_found"):
            await client.read_resource(f"sciorch://entries/{entry_id}/artifacts/data.csv")
    url = f"{http.base}/entries/{entry_id}/artifacts/data.csv"
    async with httpx.AsyncClient() as c:
        bob = await c.get(url, headers={"Authorization": f"Bearer {http.token('bob')}"})
        assert bob.status_code == 404 and CSV not in bob.text
        anonymous = await c.get(url)
        assert anonymous.status_code == 401
        forged = await c.get(url, headers={"Authorization": "Bearer not-a-token"})
        assert forged.status_code == 401


async def test_http_download_streams_with_range(http: HttpServer, job: dict[str, Any]) -> None:
    want = (output_dir(http, job["id"]) / "big.bin").read_bytes()
    url = f"{http.base}/entries/{job['id']}/artifacts/big.bin"
    auth = {"Authorization": f"Bearer {http.token('alice')}"}
    async with httpx.AsyncClient(headers=auth) as c:
        whole = await c.get(url)
        assert whole.status_code == 200 and whole.content == want
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-length"] == str(BIG)
        part = await c.get(url, headers={"Range": "bytes=1000-1048999"})
        assert part.status_code == 206 and part.content == want[1000:1049000]
        assert part.headers["content-range"] == f"bytes 1000-1048999/{BIG}"
        tail = await c.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == want[-10:]
        beyond = await c.get(url, headers={"Range": f"bytes={BIG}-"})
        assert beyond.status_code == 416
        png = await c.get(f"{http.base}/entries/{job['id']}/artifacts/plots/red.png")
        assert png.headers["content-type"] == "image/png"
        assert png.content.startswith(PNG_SIGNATURE)


async def test_artifacts_and_records_show_while_the_job_runs(http: HttpServer) -> None:
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        entry = structured(
            await client.call_tool(
                "submit_job", {"service": "writes-files", "parameters": {"hold_s": 60}}
            )
        )
        try:
            for _ in range(200):
                res = structured(await client.call_tool("read_results", {"entry_id": entry["id"]}))
                # The job writes its files at once; on a loaded machine they can show before
                # the backend's poll has moved the entry from provisioning to running.
                if res["state"] == "running" and res["records"] and len(res["artifacts"]) == 3:
                    break
                await asyncio.sleep(0.1)
            assert res["state"] == "running", res["state"]
            assert res["records"] == [{"step": 1}]
            read = await client.call_tool(
                "read_artifact", {"entry_id": entry["id"], "path": "data.csv"}
            )
            assert text_of(read) == CSV
        finally:
            await client.call_tool("cancel_entry", {"entry_id": entry["id"]})


async def test_sciorch_fetch_writes_the_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cat = catalogue(tmp_path)
    (home / "config.toml").write_text(f'catalogue_dirs = ["{cat}"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCIORCH_")}
    env.update(SCIORCH_HOME=str(home), SCIORCH_PRINCIPAL="tester", NO_COLOR="1")

    def sciorch_sync(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "sciorch.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stdout

    async def sciorch(*args: str) -> str:
        return await asyncio.to_thread(sciorch_sync, *args)

    entry_id = (await sciorch("submit", "writes-files", "--wait")).splitlines()[0].strip()
    out = home / "entries" / entry_id / "output"
    assert out.is_dir(), await sciorch("status", entry_id)
    dest = tmp_path / "got"
    printed = await sciorch("fetch", entry_id, "-o", str(dest))
    for path in ("big.bin", "data.csv", "plots/red.png"):
        assert sha256(dest / path) == sha256(out / path)
        assert sha256(out / path) in printed
    assert not (dest / "escape.json").exists()
    one = tmp_path / "one"
    await sciorch("fetch", entry_id, "plots/red.png", "-o", str(one))
    assert [p.name for p in one.rglob("*") if p.is_file()] == ["red.png"]
