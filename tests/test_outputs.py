"""Bounded outputs over real streamable HTTP: a result over max_result_bytes fails its job and
stays a file artifact, listings are summaries, stream records come back in pages with a cap on
each record, and the audit log keeps digests of big arguments and rotates. Jobs are real local
processes of a catalogue service of this module's own (`big-output`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from backends.base import (
    MAX_RECORD_BYTES,
    OVERSIZE_RESULT,
    PAGE_BYTES,
    ContractTail,
    WorkDir,
    omitted_record,
)
from ground.config import DEFAULT_MAX_RESULT_BYTES
from ground.models import Message
from tests.mcp_helpers import (
    HttpServer,
    run_http_server,
    script_catalogue,
    sdk_client,
    structured,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CURRENT = "2026-07-28"
AUDIT_MAX_BYTES = 4096

PAYLOAD = """\
import json, os
p = json.load(open(os.environ["SCIORCH_PARAMS"]))
with open(os.environ["SCIORCH_STREAM"], "w") as f:
    for i in range(p.get("records", 0)):
        pad = p.get("big_record_bytes", 0) if i == p.get("big_record_at", -1) else 1000
        f.write(json.dumps({"i": i, "pad": "s" * pad}) + "\\n")
with open(os.environ["SCIORCH_RESULT"], "w") as f:
    f.write(json.dumps({"value": 1.0, "blob": "r" * p.get("result_bytes", 0)}))
"""

PROPERTIES = {
    "result_bytes": {"type": "integer", "minimum": 0},
    "records": {"type": "integer", "minimum": 0},
    "big_record_at": {"type": "integer"},
    "big_record_bytes": {"type": "integer", "minimum": 0},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HttpServer]:
    root = tmp_path_factory.mktemp("outputs")
    cat = script_catalogue(root, "big-output", PAYLOAD, PROPERTIES)
    overrides = {"catalogue_dirs": [cat], "audit_max_bytes": AUDIT_MAX_BYTES, "audit_backups": 2}
    async with run_http_server(root / "home", settings=overrides) as server:
        yield server


async def run_job(client: Any, **parameters: Any) -> dict[str, Any]:
    job = structured(
        await client.call_tool("submit_job", {"service": "big-output", "parameters": parameters})
    )
    waited = await client.call_tool("wait_entry", {"entry_id": job["id"], "timeout_seconds": 60})
    return dict(structured(waited)["entry"])


def size(result: Any) -> int:
    return len(json.dumps(structured(result)))


async def test_a_result_over_the_cap_fails_the_job_and_is_kept_as_an_artifact(
    http: HttpServer,
) -> None:
    big = 2 * DEFAULT_MAX_RESULT_BYTES
    async with sdk_client(http.mcp_url, http.token("alice"), mode=CURRENT) as client:
        assert client.protocol_version == CURRENT
        entry = await run_job(client, result_bytes=big)
        assert entry["state"] == "failed", entry
        reason = entry["reason"]
        assert reason.startswith("result_too_large: result.json is "), reason
        written = int(reason.split("result.json is ")[1].split()[0])
        assert written > big
        assert f"max_result_bytes ({DEFAULT_MAX_RESULT_BYTES})" in reason
        assert OVERSIZE_RESULT in reason
        got = await client.call_tool("get_entry", {"entry_id": entry["id"]})
        assert structured(got)["result"] is None and size(got) < 20_000
        results = await client.call_tool("read_results", {"entry_id": entry["id"]})
        data = structured(results)
        assert data["result"] is None and OVERSIZE_RESULT in [a["path"] for a in data["artifacts"]]
        assert size(results) < 20_000
        resource = await client.read_resource(f"sciorch://entries/{entry['id']}/results")
        assert sum(len(getattr(c, "text", "") or "") for c in resource.contents) < 20_000
    # The user can still get it: the whole file, in the entry's output directory.
    kept = http.engine.settings.entries_dir / entry["id"] / "output" / OVERSIZE_RESULT
    assert kept.stat().st_size == written


async def test_list_entries_pages_are_summaries_without_big_results(http: HttpServer) -> None:
    under_cap = DEFAULT_MAX_RESULT_BYTES // 2
    # An older client too: the listing's schema and size do not depend on the protocol.
    async with sdk_client(http.mcp_url, http.token("bob"), mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        entry = await run_job(client, result_bytes=under_cap)
        small = await run_job(client, result_bytes=10)
        assert entry["state"] == small["state"] == "succeeded"
        full = structured(await client.call_tool("get_entry", {"entry_id": entry["id"]}))
        assert len(full["result"]["blob"]) == under_cap  # get_entry keeps the whole result
        page = await client.call_tool("list_entries", {"limit": 50})
        listed = {e["id"]: e for e in structured(page)["entries"]}
        assert size(page) < 10_000, size(page)
        assert listed[entry["id"]]["result"] is None
        assert listed[entry["id"]]["result_bytes"] > under_cap
        assert listed[small["id"]]["result"] == {"value": 1.0, "blob": "r" * 10}
        assert "transitions" not in listed[entry["id"]]


async def test_read_results_pages_a_large_stream_and_caps_each_record(http: HttpServer) -> None:
    records, big_at = 2500, 1200
    seen: list[Message] = []
    stop = http.engine.bus.add_listener(lambda m: seen.append(m) if m.kind == "stream" else None)
    try:
        async with sdk_client(http.mcp_url, http.token("carol"), mode=CURRENT) as client:
            entry = await run_job(
                client, records=records, big_record_at=big_at, big_record_bytes=5_000_000
            )
            assert entry["state"] == "succeeded", entry
            got: list[dict[str, Any]] = []
            since, pages = 0, 0
            while True:
                res = await client.call_tool(
                    "read_results", {"entry_id": entry["id"], "since_record": since}
                )
                data = structured(res)
                pages += 1
                assert len(data["records"]) <= 100 and size(res) < PAGE_BYTES + 20_000
                got += data["records"]
                assert data["next_record"] == since + len(data["records"])
                since = data["next_record"]
                if not data["more_records"]:
                    break
            assert pages >= records // 100 and len(got) == records
            assert [r["i"] for r in got if "i" in r] == [i for i in range(records) if i != big_at]
            marker = got[big_at]
            assert marker["omitted"] is True and marker["bytes"] > 5_000_000
            one = await client.call_tool(
                "read_results", {"entry_id": entry["id"], "since_record": 10, "limit": 7}
            )
            assert [r["i"] for r in structured(one)["records"]] == list(range(10, 17))
    finally:
        stop()
    mine = [m for m in seen if m.entry_id == entry["id"]]
    assert len(mine) == records  # every record was relayed, in order, none of them whole
    assert [m.record_index for m in mine] == list(range(records))
    assert all(len(json.dumps(m.record)) <= MAX_RECORD_BYTES for m in mine)
    assert mine[big_at].record is not None and mine[big_at].record["omitted"] is True


async def test_audit_log_keeps_digests_of_big_arguments_and_rotates(http: HttpServer) -> None:
    audit = http.engine.settings.logs_dir / "audit.jsonl"
    junk = "x" * 250_000
    async with sdk_client(http.mcp_url, http.token("dave"), mode=CURRENT) as client:
        for i in range(20):
            refused = await client.call_tool("create_event", {"name": f"n{i}", "junk": junk})
            assert refused.is_error
    files = sorted(audit.parent.glob("audit.jsonl*"))
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert sum(f.stat().st_size for f in files) <= 3 * AUDIT_MAX_BYTES
    assert all(f.stat().st_size <= AUDIT_MAX_BYTES for f in files)
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    mine = [r for r in lines if r["principal"] == "dave"]
    assert mine and all(r["outcome"] == "error" for r in mine)
    for rec in mine:
        assert rec["arguments"]["name"].startswith("n")  # small values stay as they are
        assert rec["arguments"]["junk"]["bytes"] == len(json.dumps(junk))
        assert len(rec["arguments"]["junk"]["sha256"]) == 64
    assert max(len(json.dumps(r)) for r in mine) < 2000


async def test_stream_readers_wait_for_a_half_written_line_and_never_hold_a_long_one(
    tmp_path: Path,
) -> None:
    wd = WorkDir(tmp_path)
    long_line = "y" * (3 * MAX_RECORD_BYTES)
    wd.stream.write_text('{"i": 0}\n' + long_line)  # the long line is still being written
    tail = ContractTail()
    assert [r for _, r in tail.news(wd)[1]] == [{"i": 0}]
    assert tail.next_records(wd) == []  # a half-written line waits, however long
    with wd.stream.open("a") as f:
        f.write('\n{"i": 2}\n')
    assert [(i, r) for i, r in tail.next_records(wd)] == [
        (1, omitted_record(len(long_line))),
        (2, {"i": 2}),
    ]
    adopted = ContractTail()
    adopted.skip_existing(wd)
    assert (adopted.stream_index, adopted.stream_offset) == (3, wd.stream.stat().st_size)
    page = wd.read_results(1)
    assert page.records == [omitted_record(len(long_line)), {"i": 2}]
    assert page.next_record == 3 and not page.more_records
