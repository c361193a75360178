"""The agent's done-when on the real Slurm: through MCP alone (streamable HTTP, the SDK
client), upload an input, run a job on Slurm that writes a PNG and a CSV (the CSV from the
input, staged into the job's directory on the shared filesystem), see the PNG as image content
and read the CSV as text; both are served from storage once the job has finished."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mcp_helpers import run_http_server, script_catalogue, sdk_client, structured, text_of
from tests.test_artifacts import PAYLOAD, PNG_SIGNATURE
from tests.test_slurm import cancel_jobs_under, slurm, slurm_site

pytestmark = pytest.mark.asyncio

__all__ = ["slurm"]  # the fixture, used by name

CSV = "x,y\n1,2.5\n2,4.0\n"
# The artifacts test's job (a PNG, a CSV, a big file), with its CSV replaced by the input.
STAGED = PAYLOAD + (
    '\nimport shutil\nshutil.copyfile(os.path.join(os.environ["SCIORCH_INPUTS"], "table"),'
    ' os.path.join(out, "data.csv"))\n'
)


@pytest.fixture
async def shared(slurm: None) -> AsyncIterator[Path]:
    path = Path(os.environ["SCIORCH_SLURM_SHARED_DIR"]) / f"test-{uuid.uuid4().hex[:10]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        cancel_jobs_under(path)


async def test_an_agent_runs_a_slurm_job_on_an_upload_and_reads_its_png_and_csv(
    shared: Path, tmp_path: Path
) -> None:
    # The job's user reads the payload: it lives on the shared filesystem too.
    cat = script_catalogue(shared, "plots", STAGED, {"hold_s": {"type": "number"}})
    template = json.loads((cat / "plots.yaml").read_text())
    template["inputs"] = [{"name": "table", "kind": "file", "max_bytes": 4096}]
    template["resources"] = {"cpus": 1, "memory": "64Mi", "walltime": 120}
    (cat / "plots.yaml").write_text(json.dumps(template))
    site = slurm_site("cluster", "cli", shared)
    settings = {"catalogue_dirs": [cat], "sites": [site]}
    async with run_http_server(tmp_path / "home", settings=settings) as http:
        async with sdk_client(http.mcp_url, http.token("alice"), mode="2026-07-28") as client:
            up = structured(
                await client.call_tool("upload_input", {"name": "t.csv", "content": CSV})
            )
            entry = structured(
                await client.call_tool(
                    "submit_job", {"service": "plots", "inputs": {"table": up["uri"]}}
                )
            )
            assert entry["site"] == "cluster"
            done = structured(
                await client.call_tool(
                    "wait_entry", {"entry_id": entry["id"], "timeout_seconds": 120}
                )
            )["entry"]
            assert done["state"] == "succeeded", done
            workdir = shared / entry["id"]
            assert (workdir / "inputs" / "table").read_text() == CSV  # staged on the shared fs
            assert await http.engine.archive.manifest(entry["id"]) is not None
            shown = await client.call_tool(
                "read_artifact", {"entry_id": entry["id"], "path": "plots/red.png"}
            )
            images = [c for c in shown.content if c.type == "image"]
            assert len(images) == 1 and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(PNG_SIGNATURE)
            read = await client.call_tool(
                "read_artifact", {"entry_id": entry["id"], "path": "data.csv"}
            )
            assert text_of(read) == CSV and structured(read)["encoding"] == "text"
