"""Inputs staged into a job's work dir: templates declare them; callers give an upload (the
MCP tool for small files, resumable HTTP for big ones), another entry's artifact or an object
in the configured S3 store (moto's standalone server, the real boto3 client); bad inputs are
refused before anything runs, naming `inputs.<name>`; another principal can use none of
alice's uploads or artifacts. The server is real, over streamable HTTP with the SDK client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from backends.kube_manifests import KubernetesOptions, build_manifests, check_bundle
from ground.contract import LaunchSpec, StagedFile, StagedInput
from ground.errors import InvalidInput, LimitExceeded, NotFound
from ground.models import Resources
from orchestrator.engine import Engine
from tests.conftest import ALICE, make_settings, shutdown
from tests.mcp_helpers import (
    CURRENT,
    HttpServer,
    assert_tool_error,
    run_http_server,
    script_catalogue,
    sdk_client,
    structured,
)
from tests.s3_helpers import BUCKET, S3Server, moto_s3

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = 1 << 20

PAYLOAD = """
import hashlib, json, os, shutil
inp = os.environ["SCIORCH_INPUTS"]
data = open(os.path.join(inp, "data"), "rb").read()
refs = os.path.join(inp, "refs")
files = sorted(
    os.path.relpath(os.path.join(d, f), refs) for d, _, fs in os.walk(refs) for f in fs
) if os.path.isdir(refs) else None
out = os.environ["SCIORCH_OUTPUT_DIR"]
shutil.copyfile(os.path.join(inp, "data"), os.path.join(out, "copy.bin"))
os.makedirs(os.path.join(out, "set"), exist_ok=True)
for n in ("one.txt", "two.txt"):
    open(os.path.join(out, "set", n), "w").write(n)
json.dump({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "refs": files},
          open(os.environ["SCIORCH_RESULT"], "w"))
"""


def catalogue(root: Path) -> Path:
    cat = script_catalogue(root, "reads-inputs", PAYLOAD, {})
    template = json.loads((cat / "reads-inputs.yaml").read_text())
    template["inputs"] = [
        {"name": "data", "kind": "file", "required": True, "max_bytes": LIMIT},
        {"name": "refs", "kind": "directory", "required": False},
    ]
    (cat / "reads-inputs.yaml").write_text(json.dumps(template))
    return cat


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ over MCP, S3 storage


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> AsyncIterator[HttpServer]:
    root = tmp_path_factory.mktemp("inputs")
    overrides = {"catalogue_dirs": [catalogue(root)], "storage": s3.storage()}
    async with run_http_server(root / "home", settings=overrides) as server:
        yield server


async def run_job(client: Any, inputs: dict[str, str]) -> dict[str, Any]:
    entry = structured(
        await client.call_tool("submit_job", {"service": "reads-inputs", "inputs": inputs})
    )
    done = structured(await client.call_tool("wait_entry", {"entry_id": entry["id"]}))["entry"]
    assert done["state"] == "succeeded", done
    return dict(done)


async def test_an_upload_an_artifact_and_an_object_url_reach_the_job(
    http: HttpServer, s3: S3Server
) -> None:
    payload = os.urandom(5000)
    s3.put("raw/scan.bin", payload)
    for i in range(2):
        s3.put(f"raw/set/f{i}.txt", b"x")
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert (
            "upload_input" in tools and "inputs" in tools["submit_job"].input_schema["properties"]
        )
        listed = structured(await client.call_tool("list_services", {}))
        svc = next(s for s in listed["services"] if s["name"] == "reads-inputs")
        assert [i["name"] for i in svc["inputs"]] == ["data", "refs"]

        up = structured(
            await client.call_tool(
                "upload_input",
                {
                    "name": "d.bin",
                    "content": base64.b64encode(payload).decode(),
                    "encoding": "base64",
                },
            )
        )
        assert up["complete"] and up["size"] == 5000 and up["sha256"] == sha(payload)
        first = await run_job(client, {"data": up["uri"]})
        assert first["result"] == {"sha256": sha(payload), "size": 5000, "refs": None}

        # Another entry's artifacts: a file, and a directory of them.
        art = f"sciorch://entries/{first['id']}/artifacts/"
        second = await run_job(client, {"data": art + "copy.bin", "refs": art + "set/"})
        assert second["result"] == {
            "sha256": sha(payload),
            "size": 5000,
            "refs": ["one.txt", "two.txt"],
        }
        # Objects in the configured store.
        third = await run_job(
            client, {"data": f"s3://{BUCKET}/raw/scan.bin", "refs": f"s3://{BUCKET}/raw/set/"}
        )
        assert third["result"] == {
            "sha256": sha(payload),
            "size": 5000,
            "refs": ["f0.txt", "f1.txt"],
        }

    async with sdk_client(http.mcp_url, http.token("bob"), mode=CURRENT) as client:
        for ref in (up["uri"], art + "copy.bin"):
            refused = await client.call_tool(
                "submit_job", {"service": "reads-inputs", "inputs": {"data": ref}}
            )
            assert_tool_error(refused, "not_found", "[field: inputs.data]")
        # bob's list is empty: nothing ran for him.
        page = structured(await client.call_tool("list_entries", {}))
        assert page["entries"] == []


async def test_the_upload_tool_refuses_files_over_its_cap(http: HttpServer) -> None:
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        big = base64.b64encode(b"\0" * ((128 << 10) + 1)).decode()
        args = {"name": "x", "content": big, "encoding": "base64"}
        refused = await client.call_tool("upload_input", args)
        assert_tool_error(refused, "invalid_input", "POST /uploads", "[field: content]")
        refused = await client.call_tool("upload_input", {"name": "../x", "content": "a"})
        assert_tool_error(refused, "invalid_input", "[field: name]")


async def test_a_big_upload_goes_over_http_in_resumable_chunks(http: HttpServer) -> None:
    data = os.urandom(3 * (1 << 20) + 11)
    alice = {"authorization": f"Bearer {http.token('alice')}"}
    bob = {"authorization": f"Bearer {http.token('bob')}"}
    async with httpx.AsyncClient(base_url=http.base, timeout=30) as web:
        assert (await web.post("/uploads", json={"name": "a.bin", "size": 1})).status_code == 401
        reader = {"authorization": f"Bearer {http.token('alice', 'read')}"}
        assert (
            await web.post("/uploads", json={"name": "a", "size": 1}, headers=reader)
        ).status_code == 401
        made = await web.post(
            "/uploads", json={"name": "big.bin", "size": len(data)}, headers=alice
        )
        assert made.status_code == 201, made.text
        url = made.json()["url"]
        half = len(data) // 2
        put = await web.put(
            url,
            content=data[:half],
            headers={**alice, "content-range": f"bytes 0-{half - 1}/{len(data)}"},
        )
        assert put.status_code == 200 and put.json()["received"] == half
        head = await web.head(url, headers=alice)
        assert head.headers["upload-offset"] == str(half)
        # A chunk from the wrong place: 409, with where to resume.
        wrong = await web.put(
            url, content=b"xx", headers={**alice, "content-range": f"bytes 5-6/{len(data)}"}
        )
        assert wrong.status_code == 409 and wrong.headers["upload-offset"] == str(half)
        # bob can neither see nor write it.
        assert (await web.head(url, headers=bob)).status_code == 404
        stolen = await web.put(
            url,
            content=data[half:],
            headers={**bob, "content-range": f"bytes {half}-{len(data) - 1}/{len(data)}"},
        )
        assert stolen.status_code == 404
        rest = await web.put(
            url,
            content=data[half:],
            headers={**alice, "content-range": f"bytes {half}-{len(data) - 1}/{len(data)}"},
        )
        assert rest.status_code == 200 and rest.json()["complete"], rest.text
        assert rest.json()["sha256"] == sha(data)
        uri = rest.json()["uri"]
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        refused = await client.call_tool(
            "submit_job", {"service": "reads-inputs", "inputs": {"data": uri}}
        )
        # 3 MiB is over the template's max_bytes (1 MiB): refused before anything runs.
        assert_tool_error(refused, "limit_exceeded", "[field: inputs.data]")


# ------------------------------------------------------------------ the engine, local storage


@pytest_asyncio.fixture(loop_scope="module")
async def eng(tmp_path: Path) -> AsyncIterator[Engine]:
    engine = await Engine.open(
        make_settings(tmp_path / "home", catalogue_dirs=[catalogue(tmp_path)])
    )
    try:
        yield engine
    finally:
        await shutdown(engine)


async def test_on_local_storage_an_upload_is_copied_into_the_work_dir(eng: Engine) -> None:
    up = await eng.uploads.put_small(ALICE, "d.txt", b"hello")
    entry = await eng.launch(ALICE, "reads-inputs", inputs={"data": up.uri})
    done, _ = await eng.wait_entry(ALICE, entry.id, timeout_s=30)
    assert done.result == {"sha256": sha(b"hello"), "size": 5, "refs": None}, done.reason
    staged = eng.settings.entries_dir / entry.id / "inputs" / "data"
    assert staged.read_bytes() == b"hello" and not staged.is_symlink()


@pytest.mark.parametrize(
    ("inputs", "error", "field", "needle"),
    [
        ({}, InvalidInput, "inputs.data", "required"),
        ({"data": "UP", "extra": "UP"}, InvalidInput, "inputs.extra", "declares no input"),
        ({"data": "sciorch://uploads/upl-0000000000000000"}, NotFound, "inputs.data", "no upload"),
        ({"data": "BIG"}, LimitExceeded, "inputs.data", "allows 1048576"),
        ({"data": "UP", "refs": "UP"}, InvalidInput, "inputs.refs", "a directory input"),
        ({"data": "s3://bucket/key"}, InvalidInput, "inputs.data", 'kind = "s3"'),
        ({"data": "file:///etc/passwd"}, InvalidInput, "inputs.data", "an input is"),
        ({"data": "sciorch://entries/ent-nope/artifacts/x"}, NotFound, "inputs.data", "ent-nope"),
    ],
)
async def test_bad_inputs_are_refused_before_anything_runs(
    eng: Engine, inputs: dict[str, str], error: type[Exception], field: str, needle: str
) -> None:
    small = await eng.uploads.put_small(ALICE, "s.txt", b"x")
    big = await eng.uploads.put_small(ALICE, "b.bin", b"\0" * (LIMIT + 1))
    given = {k: {"UP": small.uri, "BIG": big.uri}.get(v, v) for k, v in inputs.items()}
    with pytest.raises(error) as exc:
        await eng.launch(ALICE, "reads-inputs", inputs=given)
    assert exc.value.field == field and needle in str(exc.value), exc.value  # type: ignore[attr-defined]
    entries, _ = await eng.list_entries(ALICE)
    assert entries == []


async def test_a_work_dir_name_that_escapes_is_refused_where_it_is_staged(tmp_path: Path) -> None:
    from backends.base import WorkDir

    src = tmp_path / "src"
    src.write_text("x")
    bad = StagedInput(
        name="refs",
        kind="directory",
        files=[StagedFile(path="../../etc/x", size=1, source=str(src))],
    )
    with pytest.raises(InvalidInput) as exc:
        WorkDir(tmp_path / "wd").prepare({}, [bad])
    assert exc.value.field == "inputs.refs"
    assert not (tmp_path / "etc").exists()


async def test_on_kubernetes_an_init_container_downloads_the_inputs() -> None:
    spec = LaunchSpec(
        entry_id="ent-0123456789ab",
        event_id="evt-0123456789ab",
        service="reads-inputs",
        kind="job",
        argv=["python3", "payload.py"],
        parameters={},
        resources=Resources(),
        base_path="/entries/ent-0123456789ab/",
        inputs=[
            StagedInput(
                name="data",
                kind="file",
                files=[StagedFile(path="", size=5, url="http://s3.example/b/k?X-Amz-Signature=1")],
            ),
            StagedInput(
                name="refs",
                kind="directory",
                files=[StagedFile(path="a/b.txt", size=1, url="http://s3.example/b/k2?sig=2")],
            ),
        ],
    )
    opts = KubernetesOptions()
    objs = build_manifests(spec, opts, "k8s")
    assert check_bundle(objs) == []
    job = next(o for o in objs if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == opts.input_image
    assert init["command"][4:] == [
        "/sciorch/inputs/data",
        "http://s3.example/b/k?X-Amz-Signature=1",
        "/sciorch/inputs/refs/a/b.txt",
        "http://s3.example/b/k2?sig=2",
    ]
    assert init["volumeMounts"] == [{"name": "work", "mountPath": "/sciorch"}]
    main = pod["containers"][0]
    assert {"name": "SCIORCH_INPUTS", "value": "/sciorch/inputs"} in main["env"]
    import kubernetes_validate

    kubernetes_validate.validate(job, "1.33", strict=True)
