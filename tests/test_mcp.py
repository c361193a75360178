"""The MCP server in memory: the fastmcp Client (and the official `mcp` SDK client in-process)
against `create_server` over one real engine (local backend, real processes, real SQLite).

One engine and one client per principal serve the whole module (module-scoped event loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import mcp
import pytest
import pytest_asyncio
from fastmcp import Client, FastMCP
from fastmcp_tasks import call_tool_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from ground.models import EntryState, Principal, Resources
from mcp_server.server import create_server
from mcp_server.toolset import TOOLS, ToolSpec, published_output_schema
from orchestrator.engine import Engine
from tests.conftest import ALICE, BOB
from tests.mcp_helpers import (
    assert_no_traceback,
    assert_tool_error,
    core,
    module_engine,
    structured,
    submit_sim,
    text_of,
    updates_until_succeeded,
    wait_task,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPECS = {s.name: s for s in TOOLS}
FAST_JOB = {"duration_s": 0.3, "records": 2, "seed": 1}


# ------------------------------------------------------------------ fixtures


eng = module_engine("mcp")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice_server(eng: Engine) -> FastMCP:
    return create_server(eng, principal=ALICE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice(alice_server: FastMCP) -> AsyncIterator[Client[Any]]:
    async with Client(alice_server) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bob(eng: Engine) -> AsyncIterator[Client[Any]]:
    async with Client(create_server(eng, principal=BOB)) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz(eng: Engine) -> AsyncIterator[Client[Any]]:
    """A principal of its own for the property-based tests, with a rate limit they never hit."""
    server = create_server(eng, principal=Principal(id="fuzzer"), rate_per_second=100_000)
    async with Client(server) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def finished_job(alice: Client[Any]) -> dict[str, Any]:
    """An entry of alice's that ran to completion (sim-instrument, 3 records)."""
    submitted = await alice.call_tool(
        "submit_job",
        {"service": "sim-instrument", "parameters": {**FAST_JOB, "records": 3}},
    )
    entry_id = structured(submitted)["id"]
    waited = await alice.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 30})
    entry = structured(waited)["entry"]
    assert entry["state"] == "succeeded", entry
    return dict(entry)


async def still_answers(client: Client[Any]) -> None:
    """The server keeps serving after whatever went before."""
    names = {t.name for t in await client.list_tools()}
    assert "get_entry" in names
    result = await client.call_tool("list_services", {})
    assert structured(result)["services"]


# ------------------------------------------------------------------ schemas and annotations


def _required(model: Any) -> set[str]:
    return {n for n, f in model.model_fields.items() if f.is_required()} if model else set()


async def test_every_tool_has_input_and_output_schema_and_truthful_annotations(
    alice: Client[Any],
) -> None:
    listed = await alice.list_tools()
    tools = {t.name: t for t in listed}
    assert [n for n in tools if n in SPECS] == [s.name for s in TOOLS]
    for tool in listed:  # every tool, the table's and any other module's
        assert tool.description, tool.name
        assert tool.input_schema.get("type") == "object", tool.name
        assert tool.output_schema and tool.output_schema.get("type") == "object", tool.name
        hints = tool.annotations
        assert hints is not None, tool.name
        assert None not in (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint)
        assert not (hints.read_only_hint and hints.destructive_hint), tool.name
    for spec in TOOLS:
        tool = tools[spec.name]
        assert tool.description and len(tool.description) > 30, spec.name
        # Input: exactly the input model's fields, the same required ones, nothing else allowed.
        schema = tool.input_schema
        assert schema["type"] == "object", spec.name
        fields = set(spec.input.model_fields) if spec.input else set()
        assert set(schema.get("properties", {})) == fields, spec.name
        assert set(schema.get("required", [])) == _required(spec.input), spec.name
        if spec.input is not None:
            assert schema.get("additionalProperties") is False, spec.name
            for name, prop in schema["properties"].items():
                assert prop.get("description"), f"{spec.name}.{name} has no description"
        # Output: the output model's schema.
        out = tool.output_schema
        assert out and out.get("type") == "object", spec.name
        assert set(out["properties"]) == set(spec.output.model_fields), spec.name
        # Annotations say what the table says.
        ann = tool.annotations
        assert ann is not None, spec.name
        assert ann.read_only_hint is spec.read_only, spec.name
        assert ann.destructive_hint is spec.destructive, spec.name
        assert ann.idempotent_hint is spec.idempotent, spec.name
        assert ann.open_world_hint is False, spec.name
    # ... and the table is truthful: reads change nothing, only stops are destructive.
    read_only = {s.name for s in TOOLS if s.read_only}
    assert read_only == {
        "list_services",
        "list_sites",
        "list_events",
        "get_entry",
        "list_entries",
        "wait_entry",
        "read_logs",
        "read_results",
        "read_artifact",
        "search_results",
        "stream_access",
        "get_sweep",
        "wait_sweep",
    }
    destructive = {s.name for s in TOOLS if s.destructive}
    assert destructive == {"stop_event", "cancel_entry", "cancel_sweep"}
    # stream_access hands out a new credential per call.
    assert {s.name for s in TOOLS if not s.idempotent} == {
        "create_event",
        "launch_service",
        "stream_access",
        "upload_input",
    }
    assert not any(s.read_only and s.destructive for s in TOOLS)


async def test_every_result_validates_against_its_output_schema(
    alice: Client[Any], finished_job: dict[str, Any]
) -> None:
    entry_id = finished_job["id"]
    calls: dict[str, dict[str, Any]] = {
        "list_services": {},
        "list_sites": {},
        "list_events": {},
        "get_entry": {"entry_id": entry_id},
        "list_entries": {"limit": 5},
        "read_logs": {"entry_id": entry_id},
        "read_results": {"entry_id": entry_id},
        "wait_entry": {"entry_id": entry_id},
        "search_results": {"query": "value > -1e9", "format": "csv"},
        "stream_access": {"entry_id": entry_id},
    }
    published = {t.name: t.output_schema for t in await alice.list_tools()}
    for name, args in calls.items():
        result = await alice.call_tool(name, args)
        SPECS[name].output.model_validate(structured(result))
        Draft202012Validator(published[name]).validate(structured(result))


class _Optionals(BaseModel):
    state: EntryState | None
    at: datetime | None
    n: int | None = Field(None, ge=0)
    kind: Literal["job", "service"] | None = None
    tags: dict[str, Any] | None = None
    res: Resources | None = None


async def test_published_output_schema_accepts_and_refuses_what_pydantics_does() -> None:
    original = _Optionals.model_json_schema()
    compact = published_output_schema(original)
    assert compact is not None and "$ref" not in json.dumps(compact)
    assert "anyOf" not in json.dumps(compact)
    assert compact["properties"]["kind"]["enum"] == ["job", "service", None]
    a, b = Draft202012Validator(original), Draft202012Validator(compact)
    base = {"state": None, "at": None}
    for change in (
        {},
        {"state": "running"},
        {"state": "nonsense"},
        {"state": 3},
        {"at": "2026-01-01T00:00:00Z"},
        {"at": 5},
        {"n": None},
        {"n": 2},
        {"n": -1},
        {"n": "2"},
        {"kind": None},
        {"kind": "job"},
        {"kind": "other"},
        {"tags": None},
        {"tags": {"a": 1}},
        {"tags": [1]},
        {"res": None},
        {"res": {"cpus": 2}},
        {"res": {"cpus": -2}},
    ):
        instance = base | change
        assert a.is_valid(instance) == b.is_valid(instance), change


# ------------------------------------------------------------------ flows


async def test_job_flow_submit_wait_results_logs_get(alice: Client[Any]) -> None:
    submitted = structured(
        await alice.call_tool(
            "submit_job",
            {"service": "sim-instrument", "parameters": {"x1": 1, "x2": 2.5, **FAST_JOB}},
        )
    )
    entry_id = submitted["id"]
    assert re.fullmatch(r"ent-[0-9a-f]+", entry_id)
    assert submitted["service"] == "sim-instrument" and submitted["kind"] == "job"
    assert submitted["submitted_by"] == "alice"

    waited = structured(
        await alice.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 30})
    )
    assert waited["timed_out"] is False
    assert waited["entry"]["state"] == "succeeded"

    results = structured(await alice.call_tool("read_results", {"entry_id": entry_id}))
    assert results["state"] == "succeeded"
    assert results["result"]["point"] == {"x1": 1.0, "x2": 2.5}
    assert isinstance(results["result"]["value"], float)
    assert len(results["records"]) == 2 and results["next_record"] == 2
    later = structured(
        await alice.call_tool("read_results", {"entry_id": entry_id, "since_record": 1})
    )
    assert later["records"] == results["records"][1:]

    whole = structured(await alice.call_tool("read_logs", {"entry_id": entry_id}))
    assert whole["complete"] is True and whole["size"] == len(whole["data"].encode())
    assert "[sim-instrument]" in whole["data"]
    pieces, offset = [], 0
    while True:
        chunk = structured(
            await alice.call_tool(
                "read_logs", {"entry_id": entry_id, "offset": offset, "limit": 40}
            )
        )
        assert chunk["offset"] == offset and len(chunk["data"].encode()) <= 40
        pieces.append(chunk["data"])
        offset = chunk["next_offset"]
        if chunk["complete"]:
            break
    assert "".join(pieces) == whole["data"] and len(pieces) > 2

    entry = structured(await alice.call_tool("get_entry", {"entry_id": entry_id}))
    assert [t["state"] for t in entry["transitions"]] == [
        "pending",
        "provisioning",
        "running",
        "succeeded",
    ]
    assert entry["exit_code"] == 0 and entry["result"] == results["result"]
    assert entry["started_at"] and entry["finished_at"]


async def test_submit_job_idempotency_key_returns_the_same_entry(alice: Client[Any]) -> None:
    args = {
        "service": "sim-instrument",
        "parameters": {**FAST_JOB, "x1": 3},
        "idempotency_key": "retry-me-1",
    }
    first = structured(await alice.call_tool("submit_job", args))
    again = structured(await alice.call_tool("submit_job", args))
    assert again["id"] == first["id"]
    other = await alice.call_tool(
        "submit_job",
        {**args, "parameters": {**FAST_JOB, "x1": 4}},
        raise_on_error=False,
    )
    assert_tool_error(other, "conflict", "idempotency_key")
    await alice.call_tool("wait_entry", {"entry_id": first["id"], "timeout_seconds": 30})


async def test_list_entries_pages_through_an_event(alice: Client[Any]) -> None:
    event = structured(await alice.call_tool("create_event", {"name": "paging"}))
    ids = []
    for i in range(5):
        entry = structured(
            await alice.call_tool(
                "submit_job",
                {
                    "service": "sim-instrument",
                    "event_id": event["id"],
                    "parameters": {"duration_s": 0, "records": 0, "x1": i},
                },
            )
        )
        ids.append(entry["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        args: dict[str, Any] = {"event_id": event["id"], "limit": 2}
        if cursor:
            args["cursor"] = cursor
        page = structured(await alice.call_tool("list_entries", args))
        pages += 1
        assert len(page["entries"]) <= 2
        seen += [e["id"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids and pages == 3  # oldest first, each once
    only_jobs = structured(
        await alice.call_tool(
            "list_entries", {"event_id": event["id"], "service": "http-app", "limit": 10}
        )
    )
    assert only_jobs["entries"] == []
    bad = await alice.call_tool("list_entries", {"cursor": "zz-not-a-cursor"}, raise_on_error=False)
    assert_tool_error(bad, "invalid_input", "cursor")
    for entry_id in ids:
        await alice.call_tool("wait_entry", {"entry_id": entry_id, "timeout_seconds": 30})
    await alice.call_tool("stop_event", {"event_id": event["id"]})


async def _watch_task(task: Any, seen: list[str]) -> Any:
    """Poll a task's status until it ends, collecting each distinct status message."""
    while True:
        status = await task.status()
        if status.status_message and (not seen or seen[-1] != status.status_message):
            seen.append(status.status_message)
        if status.status in ("completed", "failed", "cancelled"):
            return status
        await asyncio.sleep(0.02)


async def test_wait_entry_task_status_carries_records_and_transitions(
    alice: Client[Any],
) -> None:
    # Intermediate records: a job streaming 4 records over 1.2 s.
    job = await submit_sim(alice, duration_s=1.2, records=4)
    task = await wait_task(alice, job["id"], 30)
    seen: list[str] = []
    final = await _watch_task(task, seen)
    assert final.status == "completed"
    records = [s for s in seen if s.startswith("record ")]
    assert len(records) >= 2, seen
    assert "partial_value" in records[0]
    result = await task.result()
    assert structured(result)["entry"]["state"] == "succeeded"

    # State transitions: wait on a service until it has finished, so `ready` passes by as a
    # status message; then cancel it, which ends the wait.
    service = structured(await alice.call_tool("launch_service", {"service": "http-app"}))
    task = await call_tool_task(
        alice,
        "wait_entry",
        {"entry_id": service["id"], "timeout_seconds": 60, "until": "finished"},
    )
    seen = []
    watcher = asyncio.create_task(_watch_task(task, seen))
    for _ in range(1500):
        if "state: ready" in seen or watcher.done():
            break
        await asyncio.sleep(0.02)
    assert "state: ready" in seen, seen
    cancelled = structured(await alice.call_tool("cancel_entry", {"entry_id": service["id"]}))
    assert cancelled["state"] == "cancelled"
    final = await asyncio.wait_for(watcher, 30)
    assert final.status == "completed"
    assert structured(await task.result())["entry"]["state"] == "cancelled"


async def test_wait_entry_as_a_task_can_be_cancelled(alice: Client[Any], eng: Engine) -> None:
    job = await submit_sim(alice, duration_s=30)
    before = eng.bus.subscribers
    task = await wait_task(alice, job["id"], 60)
    await task.wait(state="working", timeout=10)
    for _ in range(200):  # the wait has subscribed to the entry's messages
        if eng.bus.subscribers > before:
            break
        await asyncio.sleep(0.01)
    assert eng.bus.subscribers > before
    await task.cancel()
    status = await task.wait(timeout=10)
    assert status.status == "cancelled"
    for _ in range(200):  # ... and the server-side wait really stopped
        if eng.bus.subscribers == before:
            break
        await asyncio.sleep(0.01)
    assert eng.bus.subscribers == before
    # Cancelling the wait does not cancel the entry; cancel_entry does.
    entry = structured(await alice.call_tool("get_entry", {"entry_id": job["id"]}))
    assert entry["state"] == "running"
    entry = structured(await alice.call_tool("cancel_entry", {"entry_id": job["id"]}))
    assert entry["state"] == "cancelled"
    again = structured(await alice.call_tool("cancel_entry", {"entry_id": job["id"]}))
    assert again["state"] == "cancelled"  # idempotent


async def test_task_runs_as_the_principal_that_called(eng: Engine) -> None:
    """Two servers in one process (as in-process steering loops make them): a tool run as a
    task acts as its own server's principal, never as the other's."""
    servers = {who: create_server(eng, principal=Principal(id=who)) for who in ("xavier", "yvonne")}
    async with Client(servers["xavier"]) as x, Client(servers["yvonne"]) as y:
        for client, who in ((x, "xavier"), (y, "yvonne"), (y, "yvonne"), (x, "xavier")):
            job = await submit_sim(client, duration_s=0, records=0)
            task = await wait_task(client, job["id"], 30)
            entry = structured(await task.result())["entry"]
            assert entry["submitted_by"] == who and entry["state"] == "succeeded"


# ------------------------------------------------------------------ resources and prompts


async def test_entry_resources_read(alice: Client[Any], finished_job: dict[str, Any]) -> None:
    templates = {t.uri_template for t in await alice.list_resource_templates()}
    assert templates >= {
        "sciorch://entries/{entry_id}",
        "sciorch://entries/{entry_id}/log",
        "sciorch://entries/{entry_id}/results",
    }
    base = f"sciorch://entries/{finished_job['id']}"
    entry = json.loads((await alice.read_resource(base))[0].text)  # type: ignore[union-attr]
    assert entry["id"] == finished_job["id"] and entry["state"] == "succeeded"
    log = (await alice.read_resource(base + "/log"))[0].text  # type: ignore[union-attr]
    assert "[sim-instrument]" in log
    results = json.loads((await alice.read_resource(base + "/results"))[0].text)  # type: ignore[union-attr]
    assert results["result"] == finished_job["result"] and len(results["records"]) == 3
    with pytest.raises(Exception) as info:
        await alice.read_resource("sciorch://entries/ent-000000000000")
    assert "not_found" in str(info.value)
    assert_no_traceback(str(info.value))


async def test_listen_gets_resource_updated_when_the_entry_changes(
    alice: Client[Any], alice_server: FastMCP
) -> None:
    job = await submit_sim(alice, duration_s=0.5, records=2)
    base = f"sciorch://entries/{job['id']}"
    uris = [base, base + "/log", base + "/results"]
    async with mcp.Client(alice_server._mcp_server) as sdk:  # the SDK client, in-process
        async with sdk.listen(resource_subscriptions=uris) as sub:
            assert sub.honored is not None
            assert set(sub.honored.resource_subscriptions or []) == set(uris)
            got = set(await asyncio.wait_for(updates_until_succeeded(sdk, sub, base), 20))
    assert got <= set(uris) and base + "/results" in got


async def test_revoking_a_share_silences_an_open_listen_stream(
    alice: Client[Any], alice_server: FastMCP, eng: Engine
) -> None:
    event = structured(await alice.call_tool("create_event", {"name": "watched"}))
    await alice.call_tool("share_event", {"event_id": event["id"], "principal": BOB.id})
    job = structured(
        await alice.call_tool(
            "submit_job",
            {
                "service": "sim-instrument",
                "event_id": event["id"],
                # long enough to be still running after the revoke on a loaded machine
                "parameters": {"duration_s": 6, "records": 12},
            },
        )
    )
    uris = [f"sciorch://entries/{job['id']}{tail}" for tail in ("", "/log", "/results")]
    heard: dict[str, list[str]] = {"alice": [], "bob": []}

    async def listen(server: FastMCP, who: str, ready: asyncio.Event) -> None:
        async with mcp.Client(server._mcp_server) as sdk:
            async with sdk.listen(resource_subscriptions=uris) as sub:
                assert set(sub.honored.resource_subscriptions or []) == set(uris)  # type: ignore[union-attr]
                ready.set()
                async for update in sub:
                    heard[who].append(update.uri)  # type: ignore[union-attr]

    ready = {"alice": asyncio.Event(), "bob": asyncio.Event()}
    streams = [
        asyncio.create_task(listen(alice_server, "alice", ready["alice"])),
        asyncio.create_task(listen(create_server(eng, principal=BOB), "bob", ready["bob"])),
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready.values())), 10)
        for _ in range(100):  # bob hears the job while the event is shared with him
            if heard["bob"]:
                break
            await asyncio.sleep(0.05)
        assert heard["bob"], "bob heard nothing while the event was shared"
        await alice.call_tool(
            "share_event", {"event_id": event["id"], "principal": BOB.id, "role": "none"}
        )
        await asyncio.sleep(0.1)  # what was already on its way
        bob_before, alice_before = len(heard["bob"]), len(heard["alice"])
        done = await alice.call_tool("wait_entry", {"entry_id": job["id"]})
        assert structured(done)["entry"]["state"] == "succeeded"
        await asyncio.sleep(0.3)
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    assert len(heard["alice"]) > alice_before  # the job went on changing after the revoke
    assert heard["bob"][bob_before:] == []  # ... and bob heard none of it


async def test_prompts_list_and_render(alice: Client[Any]) -> None:
    prompts = {p.name: p for p in await alice.list_prompts()}
    assert set(prompts) == {"run_gpu_service", "steer_experiment", "diagnose_entry"}
    for prompt in prompts.values():
        assert prompt.description
    diag = await alice.get_prompt("diagnose_entry", {"entry_id": "ent-0123456789ab"})
    text = diag.messages[0].content.text  # type: ignore[union-attr]
    assert "ent-0123456789ab" in text and "get_entry" in text and "read_logs" in text
    assert "{" not in text.replace("{{", "")
    gpu = await alice.get_prompt("run_gpu_service", {"gpus": "2", "gpu_type": "a100"})
    text = gpu.messages[0].content.text  # type: ignore[union-attr]
    assert "2 GPU(s)" in text and "a100" in text and "http-app" in text  # default service
    assert "launch_service" in text and "access_url" in text
    steer = await alice.get_prompt("steer_experiment", {"goal": "minimise branin", "budget": "7"})
    text = steer.messages[0].content.text  # type: ignore[union-attr]
    assert "minimise branin" in text and "at most 7" in text and "sim-instrument" in text
    required = {a.name for a in prompts["diagnose_entry"].arguments or [] if a.required}
    assert required == {"entry_id"}


async def test_prompt_arguments_missing_or_unknown_are_named(alice: Client[Any]) -> None:
    with pytest.raises(Exception, match="invalid_input: entry_id: required by diagnose_entry"):
        await alice.get_prompt("diagnose_entry", {})
    with pytest.raises(Exception, match="invalid_input: goal: required by steer_experiment"):
        await alice.get_prompt("steer_experiment", {"goal": "", "budget": "3"})
    with pytest.raises(Exception, match="invalid_input: gpu: not an argument of run_gpu_service"):
        await alice.get_prompt("run_gpu_service", {"gpu": "a100"})
    ok = await alice.get_prompt("run_gpu_service", {})  # every argument optional
    assert ok.messages


async def test_refused_requests_are_not_logged_as_server_errors(
    alice: Client[Any], caplog: pytest.LogCaptureFixture
) -> None:
    fastmcp_log = logging.getLogger("fastmcp")
    propagate, fastmcp_log.propagate = fastmcp_log.propagate, True
    try:
        with caplog.at_level(logging.INFO):
            bad = await alice.call_tool(
                "get_entry", {"entry_id": "ent-000000000000"}, raise_on_error=False
            )
            assert bad.is_error
            with pytest.raises(Exception, match="invalid_input"):
                await alice.get_prompt("diagnose_entry", {})
            with pytest.raises(Exception, match="not_found"):
                await alice.read_resource("sciorch://entries/ent-000000000000")
    finally:
        fastmcp_log.propagate = propagate
    said = [r for r in caplog.records if r.name.startswith("fastmcp")]
    assert said, "fastmcp logged nothing: the check would see nothing"
    assert [r.getMessage() for r in said if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------ switches, audit, limits


async def test_read_only_and_disable_destructive_remove_the_right_tools(eng: Engine) -> None:
    expected = {
        "read_only": {s.name for s in TOOLS if s.read_only},
        "disable_destructive": {s.name for s in TOOLS if not s.destructive},
    }
    for switch, names in expected.items():
        server = create_server(
            eng,
            principal=ALICE,
            read_only=switch == "read_only",
            disable_destructive=switch == "disable_destructive",
        )
        async with Client(server) as client:
            tools = await client.list_tools()
            assert core(t.name for t in tools) == names, switch
            for tool in tools:  # the other modules' tools obey the switches too
                hints = tool.annotations
                assert hints is not None, tool.name
                if switch == "read_only":
                    assert hints.read_only_hint is True, tool.name
                else:
                    assert hints.destructive_hint is False, tool.name
            for gone in {s.name for s in TOOLS} - names:
                result = await client.call_tool(gone, {}, raise_on_error=False)
                assert result.is_error and "Unknown tool" in text_of(result), switch
            await still_answers(client)
    assert "cancel_entry" not in expected["disable_destructive"]
    assert "submit_job" in expected["disable_destructive"]


async def test_audit_log_has_a_line_per_mutating_call(eng: Engine) -> None:
    carol = Principal(id="carol-audit")
    audit = eng.settings.logs_dir / "audit.jsonl"
    async with Client(create_server(eng, principal=carol)) as client:
        event = structured(await client.call_tool("create_event", {"name": "audited"}))
        job = structured(
            await client.call_tool(
                "submit_job",
                {
                    "service": "sim-instrument",
                    "event_id": event["id"],
                    "parameters": {"duration_s": 5},
                },
            )
        )
        bad = await client.call_tool(
            "submit_job", {"service": "no-such-service"}, raise_on_error=False
        )
        assert bad.is_error
        await client.call_tool("cancel_entry", {"entry_id": job["id"]})
        await client.call_tool("get_entry", {"entry_id": job["id"]})  # a read: not audited
        await client.call_tool("list_entries", {})
        await client.call_tool("stop_event", {"event_id": event["id"]})
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [rec for rec in lines if rec["principal"] == carol.id]
    assert [(r["tool"], r["outcome"]) for r in mine] == [
        ("create_event", "ok"),
        ("submit_job", "ok"),
        ("submit_job", "error"),
        ("cancel_entry", "ok"),
        ("stop_event", "ok"),
    ]
    for rec in mine:
        assert rec["at"] and isinstance(rec["ms"], float) and "arguments" in rec
    assert mine[1]["object_id"] == job["id"]
    assert "unknown_service" in mine[2]["error"]


async def test_rate_limit_answers_a_clear_error(eng: Engine) -> None:
    server = create_server(
        eng, principal=Principal(id="dave-rate"), rate_per_second=0.5, rate_burst=4
    )
    async with Client(server) as client:  # the handshake counts too
        messages = []
        for _ in range(6):
            try:
                await client.call_tool("list_sites", {})
            except Exception as exc:
                messages.append(str(exc))
        assert messages, "the limit was never reached"
        assert all("Rate limit exceeded" in m and "dave-rate" in m for m in messages), messages
        for message in messages:
            assert_no_traceback(message)
    # Other principals on the same engine are not affected (per-principal buckets over HTTP
    # are in test_mcp_http.py).


async def test_rate_limit_counts_listings_and_polls_as_a_tenth(eng: Engine) -> None:
    server = create_server(
        eng, principal=Principal(id="erin-rate"), rate_per_second=0.001, rate_burst=3
    )
    async with Client(server) as client:  # initialize: 0.1
        for _ in range(15):
            await client.list_tools()  # 1.5 in all; counted in full, this would be refused
        await client.call_tool("list_sites", {})  # 2.6
        with pytest.raises(Exception, match="Rate limit exceeded for client: erin-rate"):
            await client.call_tool("list_sites", {})  # would be 3.6 of 3


# ------------------------------------------------------------------ bad input


def _bad_type(prop: dict[str, Any]) -> Any:
    """A value of the wrong JSON type for a property."""
    text = json.dumps(prop)
    if '"string"' in text:
        return 12345
    return "not-a-number-or-object"


INPUT_TOOLS = [s for s in TOOLS if s.input is not None]
ENTRY_TOOLS = [s for s in INPUT_TOOLS if "entry_id" in s.input.model_fields]  # type: ignore[union-attr]


def _minimal_args(spec: ToolSpec, entry_id: str = "ent-000000000000") -> dict[str, Any]:
    base = {
        "entry_id": entry_id,
        "event_id": "evt-000000000000",
        "service": "sim-instrument",
        "principal": "bob",
        "path": "out.csv",
        "name": "in.txt",
        "content": "hello",
        "sweep_id": "swp-000000000000",
        "walltime_seconds": 7200,
    }
    return {k: v for k, v in base.items() if k in _required(spec.input)}


@pytest.mark.parametrize("spec", INPUT_TOOLS, ids=lambda s: s.name)
async def test_wrong_types_missing_and_unknown_fields_name_the_field(
    alice: Client[Any], spec: ToolSpec
) -> None:
    assert spec.input is not None
    tools = {t.name: t for t in await alice.list_tools()}
    props = tools[spec.name].input_schema["properties"]
    for field in spec.input.model_fields:
        args = {**_minimal_args(spec), field: _bad_type(props[field])}
        result = await alice.call_tool(spec.name, args, raise_on_error=False)
        assert_tool_error(result, "invalid_input", field)
    for field in _required(spec.input):
        args = _minimal_args(spec)
        del args[field]
        result = await alice.call_tool(spec.name, args, raise_on_error=False)
        assert_tool_error(result, "invalid_input", field)
    result = await alice.call_tool(
        spec.name, {**_minimal_args(spec), "colour": "blue"}, raise_on_error=False
    )
    assert_tool_error(result, "invalid_input", "colour")
    await still_answers(alice)


async def test_tools_without_input_refuse_unknown_fields(alice: Client[Any]) -> None:
    for spec in TOOLS:
        if spec.input is None:
            result = await alice.call_tool(spec.name, {"colour": "blue"}, raise_on_error=False)
            assert_tool_error(result, "invalid_input", "colour")


async def test_bad_values_say_what_is_wrong(alice: Client[Any]) -> None:
    cases: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
        ("submit_job", {"service": "no-such-thing"}, ("unknown_service", "sim-instrument")),
        ("submit_job", {"service": "http-app"}, ("invalid_input", "launch_service")),
        ("launch_service", {"service": "sim-instrument"}, ("invalid_input", "submit_job")),
        (
            "submit_job",
            {"service": "sim-instrument", "parameters": {"x1": "abc"}},
            ("invalid_parameters", "parameters.x1"),
        ),
        (
            "submit_job",
            {"service": "sim-instrument", "parameters": {"colour": 1}},
            ("invalid_parameters", "parameters.colour"),
        ),
        (
            "submit_job",
            {"service": "sim-instrument", "resources": {"gpus": 64}},
            ("no_site", "64 GPU", "resources"),
        ),
        (
            "submit_job",
            {"service": "sim-instrument", "resources": {"gpus": -1}},
            ("invalid_input", "resources.gpus"),
        ),
        ("read_logs", {"entry_id": "ent-0", "offset": -1}, ("invalid_input", "offset")),
        ("read_logs", {"entry_id": "ent-0", "limit": 0}, ("invalid_input", "limit")),
        (
            "wait_entry",
            {"entry_id": "ent-0", "timeout_seconds": 0},
            ("invalid_input", "timeout_seconds"),
        ),
        ("wait_entry", {"entry_id": "ent-0", "until": "never"}, ("invalid_input", "until")),
        ("list_entries", {"limit": 100000}, ("invalid_input", "limit")),
        ("list_entries", {"states": ["sleeping"]}, ("invalid_input", "states")),
        ("share_event", {"event_id": "evt-0", "principal": "b", "role": "admin"}, ("role",)),
        ("create_event", {"ttl_seconds": -5}, ("invalid_input", "ttl_seconds")),
        ("create_event", {"site": "mars"}, ("mars",)),
    ]
    for name, args, needles in cases:
        result = await alice.call_tool(name, args, raise_on_error=False)
        assert_tool_error(result, *needles)
    await still_answers(alice)


@pytest.mark.parametrize("spec", ENTRY_TOOLS, ids=lambda s: s.name)
async def test_unknown_and_other_principals_entries_are_not_found(
    alice: Client[Any], bob: Client[Any], finished_job: dict[str, Any], spec: ToolSpec
) -> None:
    """Another principal's entry id gets the same answer as an id that does not exist."""
    unknown = await bob.call_tool(spec.name, _minimal_args(spec), raise_on_error=False)
    text_unknown = assert_tool_error(unknown, "not_found", "entry_id")
    theirs = await bob.call_tool(
        spec.name, _minimal_args(spec, finished_job["id"]), raise_on_error=False
    )
    text_theirs = assert_tool_error(theirs, "not_found", "entry_id")
    assert text_theirs.replace(finished_job["id"], "ent-000000000000") == text_unknown
    assert "alice" not in text_theirs
    # The owner is fine.
    mine = await alice.call_tool(
        spec.name, _minimal_args(spec, finished_job["id"]), raise_on_error=False
    )
    if spec.name == "read_artifact":  # the job wrote no such file: the entry itself is found
        assert_tool_error(mine, "not_found", "path")
    elif spec.name == "extend_entry":  # found, but it has ended: nothing to extend
        assert_tool_error(mine, "conflict", "entry_id")
    else:
        assert not mine.is_error, text_of(mine)


async def test_other_principals_events_are_not_found(alice: Client[Any], bob: Client[Any]) -> None:
    event = structured(await alice.call_tool("create_event", {"name": "alice-only"}))
    for name, args in [
        ("stop_event", {"event_id": event["id"]}),
        ("share_event", {"event_id": event["id"], "principal": "bob", "role": "operator"}),
        ("list_entries", {"event_id": event["id"]}),
        ("submit_job", {"service": "sim-instrument", "event_id": event["id"]}),
        ("launch_service", {"service": "http-app", "event_id": event["id"]}),
        ("search_results", {"event_id": event["id"]}),
    ]:
        result = await bob.call_tool(name, args, raise_on_error=False)
        text = assert_tool_error(result, "not_found", "event_id")
        assert "alice" not in text
        # ... the very answer an event that does not exist gets.
        unknown = await bob.call_tool(
            name, {**args, "event_id": "evt-000000000000"}, raise_on_error=False
        )
        assert text.replace(event["id"], "evt-000000000000") == text_of(unknown)
    assert event["id"] not in json.dumps(structured(await bob.call_tool("list_events", {})))
    await alice.call_tool("stop_event", {"event_id": event["id"]})


async def test_two_principals_cannot_see_each_others_work(
    alice: Client[Any], bob: Client[Any], finished_job: dict[str, Any], eng: Engine
) -> None:
    bobs = await submit_sim(bob, duration_s=0)
    alice_events = structured(await alice.call_tool("list_events", {}))["events"]
    bob_events = structured(await bob.call_tool("list_events", {}))["events"]
    assert {e["owner"] for e in alice_events} == {"alice"}
    assert {e["owner"] for e in bob_events} == {"bob"}
    assert not {e["id"] for e in alice_events} & {e["id"] for e in bob_events}

    alice_entries = structured(await alice.call_tool("list_entries", {"limit": 1000}))
    bob_entries = structured(await bob.call_tool("list_entries", {"limit": 1000}))
    assert finished_job["id"] in {e["id"] for e in alice_entries["entries"]}
    assert {e["submitted_by"] for e in bob_entries["entries"]} == {"bob"}
    assert bobs["id"] not in {e["id"] for e in alice_entries["entries"]}

    # Resources: the same not-found answer.
    for suffix in ("", "/log", "/results"):
        with pytest.raises(Exception) as info:
            await bob.read_resource(f"sciorch://entries/{finished_job['id']}{suffix}")
        assert "not_found" in str(info.value) and "alice" not in str(info.value)

    # Listening on another principal's entry is not honored (as for an entry that is not).
    bob_server = create_server(eng, principal=BOB)
    async with mcp.Client(bob_server._mcp_server) as sdk:
        async with sdk.listen(
            resource_subscriptions=[
                f"sciorch://entries/{finished_job['id']}",
                f"sciorch://entries/{bobs['id']}",
            ]
        ) as sub:
            assert sub.honored is not None
            assert sub.honored.resource_subscriptions == [f"sciorch://entries/{bobs['id']}"]
    await bob.call_tool("wait_entry", {"entry_id": bobs["id"], "timeout_seconds": 30})


async def test_oversize_inputs_are_refused(alice: Client[Any]) -> None:
    huge = "x" * (300 * 1024)
    result = await alice.call_tool("get_entry", {"entry_id": huge}, raise_on_error=False)
    assert_tool_error(result, "invalid_input", "bytes", "262144")
    result = await alice.call_tool(
        "submit_job",
        {"service": "sim-instrument", "parameters": {"blob": "y" * (100 * 1024)}},
        raise_on_error=False,
    )
    assert_tool_error(result, "invalid_input", "parameters", "65536")
    result = await alice.call_tool("create_event", {"name": "n" * 5000}, raise_on_error=False)
    assert_tool_error(result, "invalid_input", "name")
    await still_answers(alice)


async def test_unexpected_errors_are_masked_without_traceback(
    alice: Client[Any], eng: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(eng, "list_sites", broken)
    result = await alice.call_tool("list_sites", {}, raise_on_error=False)
    assert result.is_error
    text = text_of(result)
    assert_no_traceback(text)
    assert "/secret/path" not in text and "list_sites" in text
    monkeypatch.undo()
    await still_answers(alice)


# ------------------------------------------------------------------ property-based


def _text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), max_size=max_size)  # no lone surrogates


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    _text(20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text(8), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values shaped by a JSON schema, constraints loosened so some break them."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema or "oneOf" in schema:
        options: list[dict[str, Any]] = schema.get("anyOf") or schema.get("oneOf") or []
        return st.one_of([from_schema(s, defs) for s in options])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | _text(10)
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "string":
        limit = schema.get("maxLength", 60)
        ids = st.sampled_from(["ent-000000000000", "evt-000000000000", "", "local"])
        return ids | _text(min(limit + 5, 80))
    if kind == "integer":
        lo, hi = schema.get("minimum", -100), schema.get("maximum", 10**6)
        return st.integers(lo - 2, hi + 2)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=10)
    if kind == "object" and "properties" in schema:
        props = {k: from_schema(v, defs) for k, v in schema["properties"].items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if kind == "object":
        return st.dictionaries(_text(10), JSON_VALUES, max_size=4)
    return JSON_VALUES


TOOL_SCHEMAS: dict[str, dict[str, Any]] = {}


async def _schemas(client: Client[Any]) -> dict[str, dict[str, Any]]:
    if not TOOL_SCHEMAS:
        TOOL_SCHEMAS.update({t.name: t.input_schema for t in await client.list_tools()})
    return TOOL_SCHEMAS


def _never_launch(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Fuzzed launches must not start real work: an unknown parameter always fails them."""
    if name in ("submit_job", "launch_service"):
        params = args.get("parameters")
        args["parameters"] = {**(params if isinstance(params, dict) else {}), "fuzz_junk": 1}
    return args


def _check_answer(name: str, schema: dict[str, Any], args: dict[str, Any], result: Any) -> None:
    """A result that fits the tool's output model, or one clear 'code: message' error that
    names a field (or the size) when the input was the problem."""
    if not result.is_error:
        data = structured(result)
        if name in SPECS:
            SPECS[name].output.model_validate(data)
        return
    text = assert_tool_error(result)
    code = text.split(":", 1)[0]
    if code in ("invalid_input", "invalid_parameters"):
        # A key with blanks or control characters is named quoted, as JSON writes it.
        keys = [*args, *schema.get("required", [])]
        named = [k for k in keys if k in text or json.dumps(k) in text]
        assert named or "bytes" in text, f"error names no field: {text!r} for {args!r}"


async def _call_and_check(client: Client[Any], name: str, args: dict[str, Any]) -> None:
    try:
        result = await client.call_tool(name, _never_launch(name, args), raise_on_error=False)
    except Exception as exc:  # a protocol-level error must still be clear and traceback-free
        assert_no_traceback(str(exc))
        raise AssertionError(f"{name}({args!r}) raised {exc!r}") from exc
    _check_answer(name, (await _schemas(client))[name], args, result)


FUZZ_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("spec", INPUT_TOOLS, ids=lambda s: s.name)
@settings(FUZZ_SETTINGS, max_examples=25)
@given(data=st.data())
async def test_schema_shaped_arguments_get_a_result_or_a_clear_error(
    fuzz: Client[Any], spec: ToolSpec, data: st.DataObject
) -> None:
    """Arguments drawn from the tool's advertised input schema (constraints loosened, so
    some are valid and some break a bound or a type)."""
    schema = (await _schemas(fuzz))[spec.name]
    args = data.draw(from_schema(schema, schema.get("$defs", {})), label="arguments")
    await _call_and_check(fuzz, spec.name, args)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_junk_arguments_get_a_clear_error(fuzz: Client[Any], data: st.DataObject) -> None:
    schemas = await _schemas(fuzz)
    name = data.draw(st.sampled_from(sorted(schemas)), label="tool")
    keys = st.sampled_from(sorted(schemas[name].get("properties", {})) or ["x"]) | _text(12)
    args = data.draw(st.dictionaries(keys, JSON_VALUES, max_size=5), label="arguments")
    await _call_and_check(fuzz, name, args)


async def test_server_answers_after_the_fuzzing(fuzz: Client[Any], alice: Client[Any]) -> None:
    await still_answers(fuzz)
    await still_answers(alice)
