"""Artifacts of a job on Kubernetes, over real streamable HTTP with the official SDK client: the
job's pod (the emulator's kubelet runs its real container command: the wrapper and the payload
of tests/test_artifacts.py) writes a PNG and a CSV into its own output dir, uploads them to the
site's S3 storage (moto's server over HTTP) with the POST form from its entry's Secret, and the
agent reads the PNG as an image and the CSV as text from storage; nothing reaches the server's
own disk. Another principal reads nothing. The form allows keys under the entry's prefix only.

moto 5.2.5 does not check POST policies (its `_bucket_response_post` stores any key it is
given), so the refusal of a key outside the prefix cannot come from it: the test checks the
signed policy itself, condition by condition as S3 evaluates them, and the signing against
botocore's signature of a known policy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from backends.kube_manifests import JOB_WRAPPER
from ground.contract import OutputUpload
from tests.fakes.kube_emulator import KubeEmulator
from tests.mcp_helpers import (
    CURRENT,
    HttpServer,
    free_socket,
    run_http_server,
    sdk_client,
    structured,
    text_of,
)
from tests.s3_helpers import BUCKET, S3Server, moto_s3
from tests.test_artifacts import CSV, PNG_SIGNATURE, assert_bob_reads_nothing, catalogue

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRETS: dict[str, dict[str, Any]] = {}  # each entry's upload Secret, as its pod saw it


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emu() -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as e:
        e.add_node("node-1", cpu="16", memory="64Gi")
        yield e
        assert e.invalid == [], "the backend sent objects the server rejected"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, emu: KubeEmulator
) -> AsyncIterator[HttpServer]:
    root = tmp_path_factory.mktemp("kube-artifacts")
    overrides = {
        "catalogue_dirs": [catalogue(root)],
        "sites": [{"name": "spin", "kind": "kubernetes", "host": emu.url}],
        "storage": s3.storage(),
    }
    async with run_http_server(root / "home", settings=overrides) as server:
        try:
            yield server
        finally:
            await server.engine.backends["spin"].shutdown_all()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def job(http: HttpServer, emu: KubeEmulator) -> dict[str, Any]:
    """alice's finished job on the Kubernetes site, submitted and waited for over MCP; the
    test plays the Job controller (a pod from the Job's template) and the kubelet runs it."""
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        entry = structured(await client.call_tool("submit_job", {"service": "writes-files"}))
        assert entry["site"] == "spin"
        ns = "sciorch-" + entry["event_id"]
        await emu.wait_object("jobs", ns, entry["id"], within=30)
        pod = emu.create_pod(ns, "jobs", entry["id"])
        secret = emu.get("secrets", ns, entry["id"] + "-upload")
        assert secret is not None
        SECRETS[entry["id"]] = secret
        kubelet = emu.start_kubelet(ns, pod)
        waited = await client.call_tool("wait_entry", {"entry_id": entry["id"]})
        done = structured(waited)["entry"]
        code = await asyncio.wait_for(kubelet, 30)
        assert code == 0, bytes(emu.logs[(ns, pod)].data).decode()[-3000:]
        assert done["state"] == "succeeded", done
        return dict(done)


def upload_form(emu: KubeEmulator, entry: dict[str, Any]) -> dict[str, str]:
    """The form lines the pod got from its entry's Secret (deleted once the job ended: the
    emulator keeps the history of each object)."""
    ns, name = "sciorch-" + entry["event_id"], entry["id"] + "-upload"
    assert emu.get("secrets", ns, name) is None
    secret = SECRETS[entry["id"]]
    assert secret["type"] == "Opaque"
    lines = base64.b64decode(secret["data"]["form"]).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


async def test_an_agent_sees_the_pods_png_as_an_image_and_reads_its_csv(
    http: HttpServer, job: dict[str, Any]
) -> None:
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        assert client.protocol_version == CURRENT
        listed = structured(await client.call_tool("read_results", {"entry_id": job["id"]}))
        arts = {a["path"]: a for a in listed["artifacts"]}
        assert set(arts) == {"big.bin", "data.csv", "plots/red.png"}  # the link out is not
        assert arts["plots/red.png"]["mime_type"] == "image/png"
        assert arts["plots/red.png"]["uri"] == (
            f"sciorch://entries/{job['id']}/artifacts/plots/red.png"
        )

        shown = await client.call_tool(
            "read_artifact", {"entry_id": job["id"], "path": "plots/red.png"}
        )
        assert not shown.is_error
        images = [c for c in shown.content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        png = base64.b64decode(images[0].data)
        assert png.startswith(PNG_SIGNATURE)
        assert hashlib.sha256(png).hexdigest() == arts["plots/red.png"]["sha256"]

        read = await client.call_tool("read_artifact", {"entry_id": job["id"], "path": "data.csv"})
        assert text_of(read) == CSV
        assert arts["data.csv"]["sha256"] == hashlib.sha256(CSV.encode()).hexdigest()

        resource = await client.read_resource(f"sciorch://entries/{job['id']}/artifacts/data.csv")
        assert resource.contents[0].text == CSV  # type: ignore[union-attr]

    # The bytes came from the bucket, where the pod put them, not from the server's disk.
    store = http.engine.storage
    assert store.kind == "s3"
    key = f"sciorch/artifacts/{job['id']}/data.csv"
    assert await store.read(key, 0, 1 << 20) == CSV.encode()
    out = http.engine.settings.entries_dir / job["id"] / "output"
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    url = f"{http.base}/entries/{job['id']}/artifacts/plots/red.png"
    auth = {"Authorization": f"Bearer {http.token('alice')}"}
    async with httpx.AsyncClient() as c:
        r = await c.get(url, headers=auth)
        assert r.status_code == 200 and r.content == png


async def test_another_principal_reads_none_of_them(http: HttpServer, job: dict[str, Any]) -> None:
    await assert_bob_reads_nothing(http, job["id"])


def s3_allows(fields: dict[str, str], bucket: str, key: str, size: int, at: float) -> bool:
    """Whether S3 would take this POST: every condition of the policy met (AWS's rules for
    exact matches, starts-with and content-length-range), before the expiration."""
    from datetime import datetime

    policy = json.loads(base64.b64decode(fields["policy"]))
    if datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00")).timestamp() <= at:
        return False
    form = {**fields, "key": key, "bucket": bucket}
    for cond in policy["conditions"]:
        if isinstance(cond, dict):
            ((name, want),) = cond.items()
            if form.get(name) != want:
                return False
        elif cond[0] == "starts-with":
            if not form.get(cond[1].lstrip("$"), "").startswith(cond[2]):
                return False
        elif cond[0] == "content-length-range":
            if not cond[1] <= size <= cond[2]:
                return False
        elif cond[0] == "eq" and form.get(cond[1].lstrip("$")) != cond[2]:
            return False
    return True


async def test_the_upload_form_reaches_only_its_entrys_prefix(
    http: HttpServer, job: dict[str, Any], emu: KubeEmulator
) -> None:
    import time

    fields = upload_form(emu, job)
    k8s_job = emu.get("jobs", "sciorch-" + job["event_id"], job["id"])
    assert k8s_job is not None
    env = k8s_job["spec"]["template"]["spec"]["containers"][0]["env"]
    plain = {e["name"]: e.get("value") for e in env}
    prefix = f"sciorch/artifacts/{job['id']}/"
    assert plain["SCIORCH_UPLOAD_PREFIX"] == prefix
    # The credential itself is in the Secret only, not in the pod spec.
    assert plain["SCIORCH_UPLOAD_FORM"] is None
    assert fields["x-amz-signature"] not in json.dumps(k8s_job)
    now = time.time()
    cap = http.engine.settings.storage.max_upload_bytes
    assert s3_allows(fields, BUCKET, prefix + "more/late.txt", 10, now)
    other = "ent-000000000000"
    for key in (
        f"sciorch/artifacts/{other}/data.csv",  # another entry's
        f"sciorch/manifests/{job['id']}.json",  # the server's own records
        "sciorch/uploads/upl-1/data",
        f"sciorch/artifacts/{job['id']}",  # the prefix without its slash
    ):
        assert not s3_allows(fields, BUCKET, key, 10, now), key
    assert not s3_allows(fields, "another-bucket", prefix + "x", 10, now)
    assert not s3_allows(fields, BUCKET, prefix + "x", cap + 1, now)
    assert not s3_allows(fields, BUCKET, prefix + "x", 10, now + 8 * 86400)


async def test_the_policy_is_signed_as_botocore_signs_it() -> None:
    """A known answer: botocore 1.44.8's generate_presigned_post (AWS's documented example
    keys, 2026-12-02, us-east-1) signed this policy so."""
    from orchestrator.storage.post_policy import signature

    policy = (
        "eyJleHBpcmF0aW9uIjogIjIwMjYtMTItMDJUMDI6NDc6MDBaIiwgImNvbmRpdGlvbnMiOiBbWyJzdGFydHMtd2l0"
        "aCIsICIka2V5IiwgInNjaW9yY2gvYXJ0aWZhY3RzL2VudC0xLyJdLCBbImNvbnRlbnQtbGVuZ3RoLXJhbmdlIiwg"
        "MCwgMTAwXSwgeyJidWNrZXQiOiAic2Npb3JjaC10ZXN0In0sIFsic3RhcnRzLXdpdGgiLCAiJGtleSIsICJzY2lv"
        "cmNoL2FydGlmYWN0cy9lbnQtMS8iXSwgeyJ4LWFtei1hbGdvcml0aG0iOiAiQVdTNC1ITUFDLVNIQTI1NiJ9LCB7"
        "IngtYW16LWNyZWRlbnRpYWwiOiAiQUtJREVYQU1QTEUvMjAyNjEyMDIvdXMtZWFzdC0xL3MzL2F3czRfcmVxdWVz"
        "dCJ9LCB7IngtYW16LWRhdGUiOiAiMjAyNjEyMDJUMDI0NjAwWiJ9XX0="
    )
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    assert signature(policy, secret, "20261202", "us-east-1") == (
        "1ee1070196719d3be04ca26f029a38d755a2f2c30f4cf9d273483c6bc3786f60"
    )
    assert signature(policy, secret, "20261203", "us-east-1") != signature(
        policy, secret, "20261202", "us-east-1"
    )


def run_wrapper(tmp: Path, form: OutputUpload, path_dirs: str) -> subprocess.CompletedProcess[str]:
    """The pod's wrapper under /bin/sh, as the container runs it, with this upload form."""
    work = tmp / "pod"
    work.mkdir()
    env = {
        "PATH": path_dirs,
        "SCIORCH_WORKDIR": str(work),
        "SCIORCH_RESULT": str(work / "result.json"),
        "SCIORCH_STREAM": str(work / "stream.jsonl"),
        "SCIORCH_OUTPUT_DIR": str(work / "output"),
        "SCIORCH_UPLOAD_URL": form.url,
        "SCIORCH_UPLOAD_PREFIX": form.key_prefix,
        "SCIORCH_UPLOAD_FORM": "".join(f"{k}={v}\n" for k, v in form.fields.items()),
    }
    payload = (
        'test -z "$SCIORCH_UPLOAD_FORM" || exit 9; '  # the form is not the payload's
        'mkdir -p "$SCIORCH_OUTPUT_DIR/d"; printf x,y > "$SCIORCH_OUTPUT_DIR/d/a b.csv"'
    )
    return subprocess.run(
        ["/bin/sh", "-c", JOB_WRAPPER, "sciorch-job", "sh", "-c", payload],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
    )


def tools_without_python(tmp: Path) -> str:
    """A PATH with what the wrapper needs and curl, but no python3 (an image like curl's)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "rm", "tail", "sleep", "cat", "find", "curl", "test"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


async def test_without_python_the_wrapper_uploads_with_curl(
    tmp_path: Path, s3: S3Server, http: HttpServer
) -> None:
    store = http.engine.storage
    prefix = "sciorch/artifacts/ent-curl00000001/"
    form = store.upload_form(prefix, 600, 1 << 20)
    assert form is not None
    done = run_wrapper(tmp_path, form, tools_without_python(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert await store.read(prefix + "d/a b.csv", 0, 100) == b"x,y"


async def test_an_upload_that_fails_fails_the_job(tmp_path: Path, http: HttpServer) -> None:
    form = http.engine.storage.upload_form("sciorch/artifacts/ent-fail00000001/", 600, 1 << 20)
    assert form is not None
    closed = free_socket()  # bound, never listening: the storage cannot be reached
    port = closed.getsockname()[1]
    try:
        form = form.model_copy(update={"url": f"http://127.0.0.1:{port}/{BUCKET}"})
        done = run_wrapper(tmp_path, form, os.environ["PATH"])
    finally:
        closed.close()
    assert done.returncode == 1, done.stdout
    assert "sciorch: uploading output d/a b.csv to storage failed" in done.stdout
    assert "@@sciorch:exit 1" in done.stdout
