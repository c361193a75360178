"""The Claude agent runner: the real anthropic client and its tool runner against a scripted
Messages API (tests/fakes/messages_api.py), driving the real MCP server over a real engine (local
backend, real processes). In-process by default; one test over streamable HTTP with a bearer
token, and the `sciorch agent` command as a subprocess against the scripted API over HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from fastmcp import Client

import tools
from ground.errors import InvalidInput
from ground.models import EntryState, Principal
from mcp_server.server import create_server
from orchestrator.engine import Engine
from sciorch.agent import (
    AgentConfig,
    AgentError,
    AgentResult,
    Usage,
    choose_prompt,
    connect,
    price_for,
    run_agent,
)
from sciorch.agent.models import Confirm, OnEvent
from tests.conftest import ALICE, make_settings
from tests.fakes.messages_api import (
    Conversation,
    Reply,
    ScriptedMessagesAPI,
    call,
    calls,
    say,
    text,
    tool_use,
)
from tests.mcp_helpers import free_socket, run_http_server, serve_asgi
from tests.processes import cli_env
from tools.models import EntryRef, ListEntriesInput, SubmitJobInput, WaitEntryInput

MEASURE = {"surface": "branin", "x1": 1.0, "x2": 2.0, "duration_s": 0.2, "records": 1, "seed": 7}
MUTATING = {
    "create_event",
    "stop_event",
    "share_event",
    "launch_service",
    "submit_job",
    "cancel_entry",
    "submit_sweep",
    "cancel_sweep",
    "extend_entry",
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def mcp_client(engine: Engine) -> AsyncIterator[Client[Any]]:
    async with Client(create_server(engine, principal=ALICE)) as client:
        yield client


def config(tmp_path: Path, **kw: Any) -> AgentConfig:
    kw.setdefault("transcript_path", tmp_path / "transcript.json")
    return AgentConfig(model="claude-sonnet-5-5", **kw)


async def run_checked(
    goal: str,
    mcp_client: Client[Any],
    api: ScriptedMessagesAPI,
    tmp_path: Path,
    confirm: Confirm | None = None,
    on_event: OnEvent | None = None,
    **cfg: Any,
) -> AgentResult:
    """run_agent on the scripted model with config(tmp_path, **cfg); the model must have
    played its whole script."""
    settings = config(tmp_path, **cfg)
    result = await run_agent(goal, mcp_client, api.client(), settings, confirm, on_event)
    api.check()
    return result


def entry_of(c: Conversation) -> str:
    entry_id = c.json("submit_job")["id"]
    assert isinstance(entry_id, str)
    return entry_id


def measure_script(service: str = "sim-instrument") -> list[Any]:
    return [
        call("list_services", note="Let me look at the catalogue."),
        call("submit_job", {"service": service, "parameters": MEASURE}),
        lambda c: call("wait_entry", {"entry_id": entry_of(c), "timeout_seconds": 60}),
        lambda c: call("read_results", {"entry_id": entry_of(c)}),
        lambda c: say(
            f"Measured branin at (1, 2): entry {entry_of(c)}, value "
            f"{c.json('read_results')['result']['value']:.3f}."
        ),
    ]


async def long_job(engine: Engine) -> str:
    view = await tools.submit_job(
        engine,
        ALICE,
        SubmitJobInput(service="sim-instrument", parameters={"duration_s": 60, "records": 0}),
    )
    return view.id


async def state_of(engine: Engine, entry_id: str) -> EntryState:
    return (await tools.get_entry(engine, ALICE, EntryRef(entry_id=entry_id))).state


async def entry_count(engine: Engine) -> int:
    return len((await tools.list_entries(engine, ALICE, ListEntriesInput())).entries)


# ------------------------------------------------------------------ the happy path


async def test_success_runs_the_job_and_answers_with_evidence(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    api = ScriptedMessagesAPI(measure_script(), model="claude-sonnet-5-5")
    events: list[str] = []
    result = await run_checked(
        "measure the branin surface at (1, 2)",
        mcp_client,
        api,
        tmp_path,
        on_event=lambda kind, data: events.append(kind),
    )
    entry_id = entry_of(api.requests[-1])
    assert result.stopped_reason == "done"
    assert result.summary().startswith("(done; 1 entries; ")  # what the examples print
    assert entry_id in result.answer
    assert result.steps == 5
    assert [c.name for c in result.tool_calls] == [
        "list_services",
        "submit_job",
        "wait_entry",
        "read_results",
    ]
    assert all(c.status == "ok" for c in result.tool_calls)
    assert result.evidence.entry_ids == [entry_id]
    assert result.usage.input_tokens == 5000 and result.usage.output_tokens == 500
    assert result.cost_usd == pytest.approx((5000 * 3 + 500 * 15) / 1e6)
    # the job really ran, as alice, in the engine
    view = await tools.get_entry(engine, ALICE, EntryRef(entry_id=entry_id))
    assert view.state == EntryState.SUCCEEDED and view.submitted_by == "alice"
    assert view.result is not None and "value" in view.result
    # what the model saw: every MCP tool, the playbook tool, the instructions and playbooks
    first = api.requests[0]
    assert {"list_services", "submit_job", "wait_entry", "cancel_entry", "get_playbook"} <= set(
        first.tool_names
    )
    assert first.tool("submit_job")["input_schema"]["properties"]["service"]
    assert "Start with list_services" in first.system  # the server's instructions
    assert "diagnose_entry" in first.system and "steer_experiment" in first.system
    assert first.first_user_text.endswith("Goal: measure the branin surface at (1, 2)")
    waited = json.loads(api.requests[3].last("wait_entry").content)
    assert waited["entry"]["state"] == "succeeded" and waited["timed_out"] is False
    assert events[0] == "start" and events[-1] == "done" and "tool_result" in events

    # the transcript has every turn and call with its arguments, result, times
    doc = json.loads((tmp_path / "transcript.json").read_text())
    assert doc["goal"] == "measure the branin surface at (1, 2)"
    assert doc["stopped_reason"] == "done" and doc["answer"] == result.answer
    assert doc["config"]["model"] == "claude-sonnet-5-5"
    assert len(doc["turns"]) == 5 and doc["turns"][0]["usage"]["input_tokens"] == 1000
    assert doc["turns"][0]["tool_uses"][0]["name"] == "list_services"
    assert [c["name"] for c in doc["tool_calls"]] == [c.name for c in result.tool_calls]
    submit = doc["tool_calls"][1]
    assert submit["arguments"] == {"service": "sim-instrument", "parameters": MEASURE}
    assert submit["result"]["id"] == entry_id
    assert submit["tool_use_id"] == doc["turns"][1]["tool_uses"][0]["id"]
    for rec in doc["tool_calls"]:
        assert rec["started_at"] and rec["finished_at"] and rec["duration_s"] >= 0
    assert doc["usage"]["input_tokens"] == 5000 and doc["error"] is None
    assert doc["system"] == first.system


async def test_a_tool_error_reaches_the_model_which_recovers(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    script = measure_script()
    script[1:2] = [
        call("submit_job", {"service": "sim-instrumnt", "parameters": MEASURE}),
        call(
            "submit_job",
            {"service": "sim-instrument", "parameters": MEASURE},
            note="The name was misspelt; the error lists the known services.",
        ),
    ]
    api = ScriptedMessagesAPI(script)
    result = await run_checked("measure branin", mcp_client, api, tmp_path)
    failed = api.requests[2].last("submit_job")
    assert failed.is_error
    assert failed.content.startswith("unknown_service: unknown service 'sim-instrumnt'")
    assert "sim-instrument" in failed.content  # the known services, so the model can fix it
    assert result.stopped_reason == "done"
    assert [c.status for c in result.tool_calls if c.name == "submit_job"] == ["error", "ok"]
    assert result.tool_calls[1].error == failed.content
    assert await entry_count(engine) == 1
    assert await state_of(engine, entry_of(api.requests[-1])) == EntryState.SUCCEEDED


# ------------------------------------------------------------------ budgets


async def test_step_budget_stops_before_the_next_tools_run(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    api = ScriptedMessagesAPI(measure_script())
    result = await run_agent(
        "measure branin", mcp_client, api.client(), config(tmp_path, max_steps=2)
    )
    assert result.stopped_reason == "step_budget"
    assert result.steps == 2 and len(api.requests) == 2 and api.remaining == 3
    assert [(c.name, c.status) for c in result.tool_calls] == [
        ("list_services", "ok"),
        ("submit_job", "not_run"),
    ]
    assert await entry_count(engine) == 0  # the second turn's submit_job never ran
    doc = json.loads((tmp_path / "transcript.json").read_text())
    assert doc["stopped_reason"] == "step_budget"
    assert doc["tool_calls"][1]["error"] == "not run: step budget"


async def test_token_budget(mcp_client: Client[Any], tmp_path: Path) -> None:
    api = ScriptedMessagesAPI([call("list_sites")] * 4 + [say("never asked for")])
    result = await run_agent(
        "what sites are there?",
        mcp_client,
        api.client(),
        config(tmp_path, max_tokens_total=2500),
    )
    assert result.stopped_reason == "token_budget"
    assert result.steps == 3 and result.usage.total == 3300  # 1100 tokens a turn
    assert [c.status for c in result.tool_calls] == ["ok", "ok", "not_run"]
    assert api.remaining == 2


async def test_cost_budget(mcp_client: Client[Any], tmp_path: Path) -> None:
    api = ScriptedMessagesAPI([call("list_sites")] * 3 + [say("never asked for")])
    result = await run_agent(
        "what sites are there?",
        mcp_client,
        api.client(),
        config(tmp_path, max_cost_usd=2.0, price_per_mtok=(1000.0, 1000.0)),  # $1.10 a turn
    )
    assert result.stopped_reason == "cost_budget"
    assert result.steps == 2 and result.cost_usd == pytest.approx(2.2)


async def test_a_model_refusal_stops_the_run(mcp_client: Client[Any], tmp_path: Path) -> None:
    api = ScriptedMessagesAPI([Reply([text("I can't help with that.")], stop_reason="refusal")])
    result = await run_checked("do something bad", mcp_client, api, tmp_path)
    assert result.stopped_reason == "refused" and result.final_stop_reason == "refusal"
    assert result.answer == "I can't help with that." and not result.tool_calls


def test_prices() -> None:
    assert price_for("claude-opus-5-5") == (5.0, 25.0)
    assert price_for("claude-sonnet-4-6") == (3.0, 15.0)
    assert price_for("claude-haiku-4-5-20251001") == (1.0, 5.0)
    assert price_for("claude-fable-5-2") == (15.0, 75.0)  # unknown family: the highest price
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_read_input_tokens=1_000_000,
    )
    assert usage.cost_usd((3.0, 15.0)) == pytest.approx(3 + 15 + 3.75 + 0.3)


# ------------------------------------------------------------ read-only, confirmation, dry run


async def test_read_only_offers_no_mutating_tool_and_refuses_a_cancel(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    entry_id = await long_job(engine)
    api = ScriptedMessagesAPI(
        [
            call("cancel_entry", {"entry_id": entry_id}),
            say("I cannot cancel it: this run is read-only."),
        ]
    )
    result = await run_checked(f"cancel {entry_id}", mcp_client, api, tmp_path, read_only=True)
    offered = set(api.requests[0].tool_names)
    assert "list_services" in offered and "wait_entry" in offered
    assert not offered & MUTATING
    assert "READ-ONLY" in api.requests[0].system
    refused = api.requests[1].last("cancel_entry")
    assert refused.is_error and "cancel_entry" in refused.content
    assert result.stopped_reason == "done"
    assert [(c.name, c.status) for c in result.tool_calls] == [("cancel_entry", "refused")]
    assert "read-only" in (result.tool_calls[0].error or "")
    assert await state_of(engine, entry_id) not in (EntryState.CANCELLED,)
    doc = json.loads((tmp_path / "transcript.json").read_text())
    assert doc["tools_withheld"]["cancel_entry"].startswith("read-only")


async def test_connect_read_only_serves_only_read_only_tools(tmp_path: Path) -> None:
    async with connect(settings=make_settings(tmp_path / "ro"), read_only=True) as client:
        names = {t.name for t in await client.list_tools()}
    assert "list_services" in names and not names & MUTATING


async def test_destructive_call_is_confirmed_declined_then_allowed_with_yes(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    entry_id = await long_job(engine)
    asked: list[tuple[str, dict[str, Any]]] = []

    def no(tool: str, arguments: dict[str, Any]) -> bool:
        asked.append((tool, arguments))
        return False

    api = ScriptedMessagesAPI(
        [
            call("cancel_entry", {"entry_id": entry_id}),
            say("You declined, so the entry keeps running."),
        ]
    )
    result = await run_checked(f"cancel {entry_id}", mcp_client, api, tmp_path, confirm=no)
    assert asked == [("cancel_entry", {"entry_id": entry_id})]
    declined = api.requests[1].last("cancel_entry")
    assert declined.is_error and "the user declined" in declined.content
    assert result.tool_calls[0].status == "declined"
    assert await state_of(engine, entry_id) != EntryState.CANCELLED

    async def never(tool: str, arguments: dict[str, Any]) -> bool:
        raise AssertionError("--yes must not ask")

    api = ScriptedMessagesAPI(
        [
            call("cancel_entry", {"entry_id": entry_id}),
            lambda c: say(f"Cancelled {c.json('cancel_entry')['id']}."),
        ]
    )
    result = await run_checked(
        f"cancel {entry_id}",
        mcp_client,
        api,
        tmp_path,
        confirm=never,
        yes=True,
    )
    assert result.tool_calls[0].status == "ok"
    assert await state_of(engine, entry_id) == EntryState.CANCELLED


async def test_no_confirm_callback_declines(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    entry_id = await long_job(engine)
    api = ScriptedMessagesAPI(
        [
            calls(tool_use("cancel_entry", {"entry_id": entry_id}), tool_use("list_sites")),
            say("declined"),
        ]
    )
    result = await run_checked("stop it", mcp_client, api, tmp_path)
    assert [(c.name, c.status) for c in result.tool_calls] == [
        ("cancel_entry", "declined"),
        ("list_sites", "ok"),
    ]
    assert await state_of(engine, entry_id) != EntryState.CANCELLED


async def test_dry_run_plans_without_acting(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    plan = "1. submit_job sim-instrument x1=1 x2=2\n2. wait_entry\n3. read_results"
    api = ScriptedMessagesAPI([call("list_services"), say(plan)])
    result = await run_checked("measure branin at (1, 2)", mcp_client, api, tmp_path, dry_run=True)
    offered = set(api.requests[0].tool_names)
    assert offered <= {
        "list_services", "list_sites", "list_events", "list_entries", "list_campaigns",
        "list_flow_runs", "list_triggers", "get_playbook",
    }
    assert "list_services" in offered and "submit_job" not in offered
    assert "DRY RUN" in api.requests[0].system and "submit_job" in api.requests[0].system
    assert "Dry run" in api.requests[0].first_user_text
    assert result.dry_run and result.answer == plan and result.stopped_reason == "done"
    assert await entry_count(engine) == 0


# ------------------------------------------------------------------ prompts


async def test_goal_matching_a_prompt_gets_its_playbook(
    engine: Engine, mcp_client: Client[Any], tmp_path: Path
) -> None:
    view = await tools.submit_job(
        engine,
        ALICE,
        SubmitJobInput(service="sim-instrument", parameters={"fail": True, "duration_s": 0}),
    )
    await tools.wait_entry(engine, ALICE, WaitEntryInput(entry_id=view.id, timeout_seconds=30))
    api = ScriptedMessagesAPI(
        [
            call("get_entry", {"entry_id": view.id}),
            call("read_logs", {"entry_id": view.id}),
            call("get_playbook", {"name": "steer_experiment", "arguments": {"goal": "max signal"}}),
            lambda c: say(f"{view.id} failed with exit code {c.json('get_entry')['exit_code']}."),
        ]
    )
    result = await run_checked(
        f"why did entry {view.id} fail?",
        mcp_client,
        api,
        tmp_path,
        read_only=True,
    )
    assert result.prompt_used == "diagnose_entry"
    first = api.requests[0].first_user_text
    assert first.startswith("Playbook (diagnose_entry):")
    assert f"diagnosing the sciorch entry `{view.id}`" in first
    assert "exit code 3" in result.answer
    playbook = api.requests[3].last("get_playbook")
    assert not playbook.is_error and "Goal: max signal" in playbook.content


async def test_choose_prompt(mcp_client: Client[Any]) -> None:
    prompts = await mcp_client.list_prompts()
    chosen = choose_prompt("launch a GPU notebook and give me the link", prompts, None)
    assert chosen is not None and chosen[0].name == "run_gpu_service"
    chosen = choose_prompt(
        "find the setting that maximises the simulated signal in 30 measurements", prompts, None
    )
    assert chosen is not None and chosen[0].name == "steer_experiment"
    assert chosen[1]["budget"] == "30" and chosen[1]["goal"].startswith("find the setting")
    assert choose_prompt("list my events", prompts, None) is None
    assert choose_prompt("why did it fail?", prompts, None) is None  # no entry id: no playbook
    with pytest.raises(AgentError, match="unknown prompt 'nope'; the server offers: diagnose"):
        choose_prompt("x", prompts, "nope")
    with pytest.raises(AgentError, match="needs entry_id"):
        choose_prompt("why did it fail?", prompts, "diagnose_entry")


# ------------------------------------------------------------------ failures, remote, CLI


async def test_transcript_is_written_when_the_run_fails(
    mcp_client: Client[Any], tmp_path: Path
) -> None:
    api = ScriptedMessagesAPI([call("list_sites")])  # the second request finds no turn: 500
    with pytest.raises(anthropic.InternalServerError):
        await run_agent("what sites?", mcp_client, api.client(), config(tmp_path))
    doc = json.loads((tmp_path / "transcript.json").read_text())
    assert doc["error"].startswith("InternalServerError")
    assert [c["name"] for c in doc["tool_calls"]] == ["list_sites"]
    assert doc["finished_at"] and doc["stopped_reason"] is None


async def test_remote_server_over_http_with_a_token(tmp_path: Path) -> None:
    async with run_http_server(tmp_path / "remote") as srv:
        api = ScriptedMessagesAPI(measure_script())
        async with connect(url=srv.mcp_url, token=srv.token("carol", "read,submit")) as client:
            result = await run_agent("measure branin", client, api.client(), config(tmp_path))
        api.check()
        assert result.stopped_reason == "done"
        entry_id = result.evidence.entry_ids[0]
        view = await tools.get_entry(srv.engine, Principal(id="carol"), EntryRef(entry_id=entry_id))
        assert view.state == EntryState.SUCCEEDED and view.submitted_by == "carol"
    # connect() is shared with the campaign runner and `steer --url`: a typed error naming it.
    with pytest.raises(InvalidInput, match="bearer token") as refused:
        async with connect(url="http://127.0.0.1:9/mcp"):
            pass
    assert refused.value.field == "token"


async def run_python(env: dict[str, str], *argv: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    """This Python run with `argv` (within a minute): exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await run_python(env, "-m", "sciorch.cli", *args)


async def test_cli_without_api_key_says_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rc, out, err = await run_cli(cli_env(home), "agent", "launch a GPU notebook")
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "ANTHROPIC_API_KEY" in lines[0] and "export" in lines[0]
    assert not home.exists()  # nothing was opened


async def test_cli_runs_the_agent_against_the_messages_api_over_http(tmp_path: Path) -> None:
    """The command end to end: the real client over HTTP, a job that runs, and a cancel that is
    declined because there is no terminal to confirm it on."""
    home = tmp_path / "home"
    entry: dict[str, str] = {}

    def cancel(c: Conversation) -> Any:
        entry["id"] = entry_of(c)
        return call("cancel_entry", {"entry_id": entry_of(c)})

    api = ScriptedMessagesAPI(
        [
            *measure_script()[:3],
            cancel,
            lambda c: say(f"Done: entry {entry_of(c)} measured; you declined the cancel."),
        ]
    )
    async with serve_asgi(api.app(), free_socket()) as base:
        env = cli_env(home, ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=base)
        rc, out, err = await run_cli(
            env, "agent", "measure branin at (1, 2), then cancel it", "--model", "claude-haiku-5-5"
        )
    assert rc == 0, (out, err)
    api.check()
    assert f"Done: entry {entry['id']} measured" in out
    assert f"entries: {entry['id']}" in out
    assert "→ submit_job" in err and "✓ wait_entry" in err and "done: 5 steps" in err
    assert "no terminal to confirm cancel_entry" in err
    assert "the user declined" in api.requests[4].last("cancel_entry").content
    assert api.requests[0].body["model"] == "claude-haiku-5-5"
    (transcript,) = (home / "agent").glob("*-measure-branin-at-1-2-then.json")  # the default
    assert str(transcript) in err
    doc = json.loads(transcript.read_text())
    assert [(c["name"], c["status"]) for c in doc["tool_calls"]] == [
        ("list_services", "ok"),
        ("submit_job", "ok"),
        ("wait_entry", "ok"),
        ("cancel_entry", "declined"),
    ]
    assert doc["stopped_reason"] == "done"


# ------------------------------------------------------------------ examples


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_goals_match_their_playbooks(mcp_client: Client[Any]) -> None:
    prompts = await mcp_client.list_prompts()
    notebook = choose_prompt(load_example("agent_notebook").GOAL, prompts, None)
    assert notebook is not None and notebook[0].name == "run_gpu_service"
    optimise = load_example("agent_optimise")
    for steering in (True, False):
        chosen = choose_prompt(optimise.goal(30, steering), prompts, None)
        assert chosen is not None and chosen[0].name == "steer_experiment"
        assert chosen[1]["budget"] == "30"
    assert "start_campaign" in optimise.goal(30, True)
    assert "submit_job" in optimise.goal(30, False)


async def test_example_diagnose_runs(tmp_path: Path) -> None:
    def entry(c: Conversation) -> str:
        match = re.search(r"Goal: Why did entry (ent-[0-9a-f]+) fail\?", c.first_user_text)
        assert match, c.first_user_text
        return match.group(1)

    api = ScriptedMessagesAPI(
        [
            lambda c: call("get_entry", {"entry_id": entry(c)}),
            lambda c: call("read_logs", {"entry_id": entry(c)}),
            lambda c: say(
                f"{entry(c)} failed: exit code {c.json('get_entry')['exit_code']} "
                "(the simulated instrument fault)."
            ),
        ]
    )
    async with serve_asgi(api.app(), free_socket()) as base:
        env = cli_env(tmp_path / "home", ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=base)
        script = str(ROOT / "examples" / "agent_diagnose.py")
        rc, out, err = await run_python(env, script, cwd=tmp_path)
    assert rc == 0, (out, err)
    api.check()
    assert "failed: exit code 3" in out
    assert not set(api.requests[0].tool_names) & MUTATING  # read-only
    assert "Playbook (diagnose_entry)" in api.requests[0].first_user_text
    doc = json.loads((tmp_path / "agent-diagnose.json").read_text())
    assert [c["name"] for c in doc["tool_calls"]] == ["get_entry", "read_logs"]
