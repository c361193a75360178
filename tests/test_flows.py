"""Flows: definitions checked whole (errors name the field), runs through the MCP tools over
streamable HTTP with real jobs on the local site, results passed forward, retries, approvals,
visibility to a second principal, triggers (a watched directory, a signed webhook, a schedule,
another flow's end), back-pressure, and a run that finishes across a kill -9 of `sciorch serve`
with no step run twice."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from flows.spec import parse_flow
from flows.triggers import sign
from ground.config import load_settings
from ground.errors import InvalidInput
from mcp_server.auth import create_token
from tests.conftest import BOTH_STORES
from tests.mcp_helpers import (
    assert_tool_error,
    free_socket,
    run_http_server,
    script_catalogue,
    sdk_client,
    structured,
)
from tests.test_steering import _healthy, _kill_9, _start_serve

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def detector_file(path: Path, n: int = 12) -> Path:
    """A raw detector file: n sampled positions of a 2-D scan around Branin's (pi, 2.275)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x1", "x2"])
        for i in range(n):
            w.writerow([2.0 + (i % 4) * 0.4, 1.5 + (i // 4) * 0.5])
    return path


DETECTOR_FLOW: dict[str, Any] = {
    "name": "detector",
    "inputs": {"path": {"type": "string"}},
    "steps": {
        "reduce": {
            "service": "detector-analysis",
            "parameters": {"mode": "reduce", "path": "{inputs.path}", "seed": 1},
        },
        "fit": {
            "service": "detector-analysis",
            "needs": ["reduce"],
            "parameters": {"mode": "fit", "path": "{steps.reduce.result.reduced}"},
        },
        "record": {
            "kind": "record",
            "needs": ["fit"],
            "values": {
                "source": "{inputs.path}",
                "optimum": "{steps.fit.result.optimum}",
                "predicted": "{steps.fit.result.predicted}",
            },
        },
    },
    "outputs": {"fit": "{steps.record.result}", "points": "{steps.reduce.result.points}"},
}


async def wait_run(client: Any, run_id: str, timeout_s: float = 90) -> dict[str, Any]:
    """Follow the run until it ends, by its resource's updates (no polling loop of our own
    beyond re-reading on each update)."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = structured(await client.call_tool("get_flow_run", {"run_id": run_id}))
        if view["state"] in ("succeeded", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"steps": {"a": {"service": "x", "needs": ["nope"]}}}, "steps.a.needs", "not a step"),
        (
            {
                "steps": {
                    "a": {"service": "x", "needs": ["b"]},
                    "b": {"service": "x", "needs": ["a"]},
                }
            },
            "steps",
            "cycle",
        ),
        (
            {
                "steps": {
                    "a": {"service": "x"},
                    "b": {"service": "x", "parameters": {"p": "{steps.a.result}"}},
                }
            },
            "steps.b.parameters.p",
            "not among its needs",
        ),
        (
            {
                "steps": {
                    "a": {"service": "x", "parameters": {"p": "{__import__('os').system('id')}"}}
                }
            },
            "steps.a.parameters.p",
            "not a reference",
        ),
        (
            {"steps": {"a": {"service": "x", "parameters": {"p": "{inputs.missing}"}}}},
            "steps.a.parameters.p",
            "not an input",
        ),
        (
            {"steps": {"a": {"service": "x", "parameters": {"p": "{item}"}}}},
            "steps.a.parameters.p",
            "for_each",
        ),
        ({"steps": {"a": {"kind": "approval", "service": "x"}}}, "steps.a", "runs no service"),
        ({"steps": {"a": {"service": "x", "retries": 99}}}, "steps.a.retries", "20"),
        ({"steps": {"a": {"service": "x", "bogus": 1}}}, "steps.a.bogus", "xtra"),
    ],
)
def test_a_bad_flow_is_refused_whole_naming_the_field(
    change: dict[str, Any], field: str, needle: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_flow({"name": "f", **change})
    assert err.value.field == field, err.value.text()
    assert needle in err.value.text()


def test_the_example_flows_parse() -> None:
    from flows.spec import load_flow

    names = {load_flow(p).name for p in EXAMPLES.glob("flow_*.yaml")}
    assert {"detector", "fanout"} <= names


def test_placeholders_keep_types_and_format_inside_strings() -> None:
    from flows.expr import Missing, render

    ctx = {"steps": {"a": {"result": {"n": 3, "xs": [1.5, 2.5]}}}, "inputs": {"p": "/d"}}
    assert render("{steps.a.result.n}", ctx) == 3
    assert render("{steps.a.result.xs[1]}", ctx) == 2.5
    assert render("file {inputs.p}/{steps.a.result.n}.csv {{raw}}", ctx) == "file /d/3.csv {raw}"
    with pytest.raises(Missing, match=r"steps\.a\.result\.nope"):
        render("{steps.a.result.nope}", ctx)


# ----------------------------------------------------------------------------- runs over MCP


@BOTH_STORES
async def test_a_detector_flow_runs_its_steps_in_order_passing_results_forward(
    tmp_path: Path, store_url: str | None
) -> None:
    raw = detector_file(tmp_path / "data" / "scan1.csv")
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            assert client.protocol_version == "2026-07-28"
            started = structured(
                await client.call_tool(
                    "start_flow", {"flow": DETECTOR_FLOW, "inputs": {"path": str(raw)}}
                )
            )
            view = await wait_run(client, started["run_id"])
            assert view["state"] == "succeeded", view
            steps = {s["key"]: s for s in view["steps"]}
            assert [s["key"] for s in view["steps"]] == ["reduce", "fit", "record"]
            reduce, fit = steps["reduce"], steps["fit"]
            entry = structured(await client.call_tool("get_entry", {"entry_id": fit["entry_id"]}))
            assert entry["parameters"]["path"] == reduce["result"]["reduced"]
            assert await asyncio.to_thread(os.path.isfile, reduce["result"]["reduced"])
            first = structured(
                await client.call_tool("get_entry", {"entry_id": reduce["entry_id"]})
            )
            # fit was submitted after reduce ended
            assert entry["created_at"] >= first["finished_at"]
            assert view["outputs"]["points"] == 12
            assert view["outputs"]["fit"]["source"] == str(raw)
            assert view["outputs"]["fit"]["optimum"] == fit["result"]["optimum"]
            assert 0.5 < fit["result"]["r2"] <= 1.0
            # a retried start with the same key is the same run
            again = {"flow": DETECTOR_FLOW, "inputs": {"path": str(raw)}}
            one = structured(
                await client.call_tool("start_flow", {**again, "idempotency_key": "k"})
            )
            two = structured(
                await client.call_tool("start_flow", {**again, "idempotency_key": "k"})
            )
            assert one["run_id"] == two["run_id"]
            await client.call_tool("cancel_flow_run", {"run_id": one["run_id"]})


async def test_a_failing_step_retries_then_fails_the_run_naming_the_step(tmp_path: Path) -> None:
    cat = script_catalogue(tmp_path, "flaky", "import sys\nprint('boom')\nsys.exit(3)\n", {})
    flow = {
        "name": "fails",
        "steps": {
            "first": {"service": "flaky", "retries": 2, "retry_delay_s": 0.05},
            "after": {"kind": "record", "needs": ["first"], "values": {"x": 1}},
        },
    }
    async with run_http_server(tmp_path / "home", settings={"catalogue_dirs": [cat]}) as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            run = structured(await client.call_tool("start_flow", {"flow": flow}))
            view = await wait_run(client, run["run_id"])
            entries = structured(await client.call_tool("list_entries", {}))["entries"]
    assert view["state"] == "failed"
    assert view["reason"].startswith("step first failed:"), view["reason"]
    assert "after 3 attempts" in view["reason"]
    steps = {s["key"]: s for s in view["steps"]}
    assert steps["first"]["attempt"] == 3
    assert steps["after"]["state"] == "skipped"
    assert len([e for e in entries if e["service"] == "flaky"]) == 3  # one job per attempt


async def test_runs_are_seen_by_their_event_s_principals_only(tmp_path: Path) -> None:
    flow = {
        "name": "gate",
        "steps": {
            "ask": {"kind": "approval", "message": "go on?"},
            "done": {"kind": "record", "needs": ["ask"], "values": {"by": "{steps.ask.result.by}"}},
        },
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with (
            sdk_client(srv.mcp_url, srv.token("alice")) as alice,
            sdk_client(srv.mcp_url, srv.token("bob")) as bob,
        ):
            run = structured(await alice.call_tool("start_flow", {"flow": flow}))
            rid = run["run_id"]
            for _ in range(50):
                view = structured(await alice.call_tool("get_flow_run", {"run_id": rid}))
                if view["steps"] and view["steps"][0]["state"] == "waiting":
                    break
                await asyncio.sleep(0.05)
            assert view["steps"][0]["state"] == "waiting"
            # bob sees nothing of it
            assert_tool_error(await bob.call_tool("get_flow_run", {"run_id": rid}), "not_found")
            assert structured(await bob.call_tool("list_flow_runs", {}))["runs"] == []
            assert_tool_error(
                await bob.call_tool("approve_flow_step", {"run_id": rid, "step": "ask"}),
                "not_found",
            )
            # shared as viewer: bob sees it but may not answer or cancel it
            await alice.call_tool(
                "share_event",
                {"event_id": run["event_id"], "principal": "bob", "role": "viewer"},
            )
            assert structured(await bob.call_tool("get_flow_run", {"run_id": rid}))["run_id"] == rid
            assert [
                r["run_id"] for r in structured(await bob.call_tool("list_flow_runs", {}))["runs"]
            ] == [rid]
            assert_tool_error(
                await bob.call_tool("cancel_flow_run", {"run_id": rid}), "needs operator"
            )
            # alice approves; the run goes on
            await alice.call_tool("approve_flow_step", {"run_id": rid, "step": "ask", "note": "ok"})
            view = await wait_run(alice, rid)
    assert view["state"] == "succeeded"
    assert view["outputs"] == {}
    assert {s["key"]: s for s in view["steps"]}["done"]["result"] == {"by": "alice"}


async def test_a_fan_out_runs_one_job_per_file_and_gathers_them(tmp_path: Path) -> None:
    files = [str(detector_file(tmp_path / "batch" / f"s{i}.csv", 9)) for i in range(4)]
    flow = {
        "name": "fan",
        "inputs": {"files": {"type": "list"}},
        "steps": {
            "reduce": {
                "service": "detector-analysis",
                "for_each": "{inputs.files}",
                "parameters": {"mode": "reduce", "path": "{item}", "seed": "{index}"},
            },
            "gather": {
                "kind": "record",
                "needs": ["reduce"],
                "values": {"tables": "{steps.reduce.result}"},
            },
        },
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            run = structured(
                await client.call_tool("start_flow", {"flow": flow, "inputs": {"files": files}})
            )
            view = await wait_run(client, run["run_id"])
    assert view["state"] == "succeeded", view
    keys = [s["key"] for s in view["steps"]]
    assert sorted(keys) == ["gather", "reduce[0]", "reduce[1]", "reduce[2]", "reduce[3]"]
    tables = {s["key"]: s for s in view["steps"]}["gather"]["result"]["tables"]
    assert [t["source"] for t in tables] == files  # in item order


async def test_a_fan_out_over_no_list_fails_its_step_and_over_an_empty_one_succeeds(
    tmp_path: Path,
) -> None:
    def fan(over: str) -> dict[str, Any]:
        return {
            "name": "fan",
            "steps": {
                "first": {"kind": "record", "values": {"n": 3, "none": []}},
                "each": {
                    "kind": "record",
                    "needs": ["first"],
                    "for_each": over,
                    "values": {"i": "{item}"},
                },
            },
        }

    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            views = []
            for over in ("{steps.first.result.n}", "{steps.first.result.none}"):
                run = structured(await client.call_tool("start_flow", {"flow": fan(over)}))
                views.append(await wait_run(client, run["run_id"]))
    bad, empty = ({s["key"]: s for s in v["steps"]}["each"] for v in views)
    assert bad["state"] == "failed"
    assert views[0]["state"] == "failed", views[0]
    assert views[0]["reason"] == "step each failed: for_each must name a list, got int"
    assert bad["error"] == "for_each must name a list, got int"
    assert views[1]["state"] == "succeeded" and empty["result"] == []


# ----------------------------------------------------------------------------- triggers


async def test_a_file_dropped_into_a_watched_directory_starts_one_run(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            flow = {**DETECTOR_FLOW, "inputs": {}}
            flow["steps"] = json.loads(
                json.dumps(DETECTOR_FLOW["steps"]).replace("inputs.path", "trigger.path")
            )
            flow["outputs"] = {}
            trig = structured(
                await client.call_tool(
                    "create_trigger",
                    {
                        "flow": flow,
                        "kind": "directory",
                        "path": str(inbox),
                        "pattern": "*.csv",
                        "debounce_s": 0.6,
                    },
                )
            )
            # bob cannot see or delete it
            async with sdk_client(srv.mcp_url, srv.token("bob")) as bob:
                assert structured(await bob.call_tool("list_triggers", {}))["triggers"] == []
                assert_tool_error(
                    await bob.call_tool("delete_trigger", {"trigger_id": trig["trigger_id"]}),
                    "not_found",
                )
            (inbox / "ignored.txt").write_text("not a csv")
            # written slowly: a partial file must not start a run before it is complete
            raw = inbox / "scan.csv"
            src = detector_file(tmp_path / "src.csv").read_text().splitlines(keepends=True)
            with raw.open("w") as fh:
                for line in src:
                    fh.write(line)
                    fh.flush()
                    await asyncio.sleep(0.1)
            deadline = time.monotonic() + 60
            runs: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                runs = structured(await client.call_tool("list_flow_runs", {}))["runs"]
                if runs and runs[0]["state"] == "succeeded":
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # more than the debounce again: still one run
            runs = structured(await client.call_tool("list_flow_runs", {}))["runs"]
            assert len(runs) == 1, runs
            view = await wait_run(client, runs[0]["run_id"])
            await client.call_tool("delete_trigger", {"trigger_id": trig["trigger_id"]})
    assert view["state"] == "succeeded", view
    assert view["trigger"]["path"] == str(raw)
    assert {s["key"]: s for s in view["steps"]}["reduce"]["result"]["points"] == 12


async def test_a_signed_webhook_starts_one_run_per_delivery_and_queues_beyond_its_limit(
    tmp_path: Path,
) -> None:
    cat = script_catalogue(
        tmp_path,
        "nap",
        "import json, os, time\n"
        "p = json.load(open(os.environ['SCIORCH_PARAMS']))\n"
        "time.sleep(p['s'])\n"
        "json.dump({'slept': p['s']}, open(os.environ['SCIORCH_RESULT'], 'w'))\n",
        {"s": {"type": "number"}},
    )
    flow = {
        "name": "hook",
        "steps": {"nap": {"service": "nap", "parameters": {"s": "{trigger.s}"}}},
    }
    async with run_http_server(tmp_path / "home", settings={"catalogue_dirs": [cat]}) as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            trig = structured(
                await client.call_tool(
                    "create_trigger", {"flow": flow, "kind": "webhook", "max_concurrent": 1}
                )
            )
            url, secret = trig["webhook_url"], trig["secret"]
            assert url.startswith(srv.base)
            listed = structured(await client.call_tool("list_triggers", {}))["triggers"]
            assert listed[0]["secret"] is None  # shown once, at creation
            async with httpx2.AsyncClient() as http:
                body = json.dumps({"s": 0.5}).encode()
                bad = await http.post(
                    url, content=body, headers={"X-Sciorch-Signature": "sha256=00"}
                )
                assert bad.status_code == 401
                assert "X-Sciorch-Signature" in bad.json()["error"]
                unsigned = await http.post(url, content=body)
                assert unsigned.status_code == 401
                ids = []
                for i in range(3):
                    body = json.dumps({"s": 0.5, "n": i}).encode()
                    headers = {
                        "X-Sciorch-Signature": sign(secret, body),
                        "X-Sciorch-Delivery": f"d{i}",
                    }
                    r = await http.post(url, content=body, headers=headers)
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["run_id"])
                    if i == 0:  # the same delivery again: the same run
                        r2 = await http.post(url, content=body, headers=headers)
                        assert r2.json()["run_id"] == ids[0]
                states = [
                    structured(await client.call_tool("get_flow_run", {"run_id": r}))["state"]
                    for r in ids
                ]
                assert states.count("running") <= 1 and "queued" in states, states
                views = [await wait_run(client, r) for r in ids]
    assert [v["state"] for v in views] == ["succeeded"] * 3
    assert [v["trigger"]["n"] for v in views] == [0, 1, 2]
    # one at a time: each started after the one before ended
    for before, after in itertools.pairwise(views):
        assert after["started_at"] >= before["finished_at"]


async def test_schedule_and_flow_end_triggers_start_runs(tmp_path: Path) -> None:
    first = {
        "name": "first",
        "steps": {"r": {"kind": "record", "values": {"v": 7}}},
        "outputs": {"v": "{steps.r.result.v}"},
    }
    second = {
        "name": "second",
        "steps": {"r": {"kind": "record", "values": {"got": "{trigger.outputs.v}"}}},
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as client:
            bad = await client.call_tool(
                "create_trigger", {"flow": first, "kind": "schedule", "cron": "every day"}
            )
            assert_tool_error(bad, "cron")
            await client.call_tool(
                "create_trigger",
                {"flow": second, "kind": "flow_end", "source_flow": "first"},
            )
            # croniter's sixth field is seconds: every second
            sched = structured(
                await client.call_tool(
                    "create_trigger",
                    {"flow": first, "kind": "schedule", "cron": "* * * * * *"},
                )
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                runs = structured(await client.call_tool("list_flow_runs", {}))["runs"]
                if any(r["flow"] == "second" and r["state"] == "succeeded" for r in runs):
                    break
                await asyncio.sleep(0.2)
            await client.call_tool("delete_trigger", {"trigger_id": sched["trigger_id"]})
            runs = structured(await client.call_tool("list_flow_runs", {}))["runs"]
            second_run = next(
                r for r in runs if r["flow"] == "second" and r["state"] == "succeeded"
            )
            view = structured(
                await client.call_tool("get_flow_run", {"run_id": second_run["run_id"]})
            )
    assert view["trigger"]["flow"] == "first" and view["trigger"]["state"] == "succeeded"
    assert view["steps"][0]["result"] == {"got": 7}


# ----------------------------------------------------------------------------- restarts


def _entries(home: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(f"file:{home / 'sciorch.db'}?mode=ro", uri=True, timeout=5) as con:
        return list(con.execute("SELECT id, idempotency_key FROM entries ORDER BY created_at"))


def test_a_run_finishes_across_a_kill_9_of_the_server_with_no_step_run_twice(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    raw = detector_file(tmp_path / "scan.csv")
    flow = json.loads(json.dumps(DETECTOR_FLOW))
    for name in ("reduce", "fit"):
        flow["steps"][name]["parameters"]["duration_s"] = 2.0
    token = create_token(load_settings(home).keys_dir, "alice", ["read", "submit"], 600)
    with free_socket() as sock:
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    procs = [_start_serve(home, port)]

    async def start() -> str:
        await _healthy(procs[0], base)
        async with sdk_client(base + "/mcp", token) as client:
            run = structured(
                await client.call_tool("start_flow", {"flow": flow, "inputs": {"path": str(raw)}})
            )
            return str(run["run_id"])

    async def get(rid: str) -> dict[str, Any]:
        async with sdk_client(base + "/mcp", token) as client:
            return structured(await client.call_tool("get_flow_run", {"run_id": rid}))

    async def finish(rid: str) -> dict[str, Any]:
        await _healthy(procs[-1], base)
        async with sdk_client(base + "/mcp", token) as client:
            return await wait_run(client, rid, 120)

    try:
        rid = asyncio.run(start())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill while fit runs: reduce done, fit in flight
            view = asyncio.run(get(rid))
            steps = {s["key"]: s for s in view["steps"]}
            if "fit" in steps and steps["fit"]["entry_id"]:
                break
            time.sleep(0.1)
        assert steps["reduce"]["state"] == "succeeded" and steps["fit"]["state"] == "running"
        _kill_9(procs[-1])
        procs.append(_start_serve(home, port))
        view = asyncio.run(finish(rid))
    finally:
        for proc in procs:
            _kill_9(proc)
    assert view["state"] == "succeeded", view
    keys = [k for _, k in _entries(home)]
    assert sorted(k for k in keys if k and k.startswith(f"flow:{rid}:")) == [
        f"flow:{rid}:fit:1",
        f"flow:{rid}:reduce:1",
    ]  # each step's job once
    assert [s["key"] for s in view["steps"]] == ["reduce", "fit", "record"]


def test_the_cli_starts_and_follows_a_flow(tmp_path: Path) -> None:
    from tests.processes import cli_env

    home = tmp_path / "home"
    raw = detector_file(tmp_path / "scan.csv")
    env = cli_env(home, "alice")
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "sciorch.cli"]
    if not Path(cmd[0]).exists():
        cmd[0] = os.environ.get("PYTHON", "python3")
    out = subprocess.run(
        [
            *cmd,
            "flow",
            "run",
            str(EXAMPLES / "flow_detector.yaml"),
            "--input",
            f"path={raw}",
            "--wait",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["state"] == "succeeded"
    listed = subprocess.run(
        [*cmd, "flow", "list"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert view["run_id"] in listed.stdout and "succeeded" in listed.stdout
    bad = subprocess.run(
        [*cmd, "flow", "run", str(EXAMPLES / "flow_detector.yaml"), "--input", "nope=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "inputs.nope" in bad.stderr
    files = [str(detector_file(tmp_path / f"b{i}.csv", 9)) for i in range(2)]
    fan = subprocess.run(
        [
            *cmd,
            "flow",
            "run",
            str(EXAMPLES / "flow_fanout.yaml"),
            "--input",
            f"files={json.dumps(files)}",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert fan.returncode == 0, fan.stderr
    outputs = json.loads(fan.stdout)["outputs"]
    assert [f["source"] for f in outputs["files"]] == files
    assert outputs["fit"]["points"] == 9


# ----------------------------------------------------------------------------- replicas


async def test_flows_run_where_the_flows_lease_is_and_move_when_that_replica_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines on one PostgreSQL store: a run started through the replica that does not
    hold the `flows` lease is driven by the one that does, its updates heard on both; when the
    holder stops renewing (a crash: nothing released), the other takes the lease over and
    finishes the run, each step's job once."""
    from flows.manager import flow_manager
    from flows.models import RunState, StartFlowInput
    from orchestrator.engine import Engine
    from tests.conftest import ALICE, make_settings, postgres_schema, shutdown

    raw = detector_file(tmp_path / "scan.csv")
    flow = json.loads(json.dumps(DETECTOR_FLOW))
    flow["steps"]["reduce"]["parameters"]["duration_s"] = 2.0
    async with postgres_schema(monkeypatch):
        home = tmp_path / "home"
        a = await Engine.open(make_settings(home, lease_ttl_s=3))
        b = await Engine.open(make_settings(home, lease_ttl_s=3))
        fa, fb = flow_manager(a), flow_manager(b)
        try:
            async with fa.serving(), fb.serving():
                assert fa.drives_here and not fb.drives_here
                heard: list[str] = []
                fb.listeners.append(heard.append)
                run = await fb.start(ALICE, StartFlowInput(flow=flow, inputs={"path": str(raw)}))
                for _ in range(100):
                    if run.run_id in fa.tasks:
                        break
                    await asyncio.sleep(0.05)
                assert run.run_id in fa.tasks and run.run_id not in fb.tasks
                for _ in range(100):
                    if run.run_id in heard:
                        break
                    await asyncio.sleep(0.05)
                assert run.run_id in heard  # updates made on a, heard on b
                assert a.replicas is not None
                await a.replicas.keeper.stop()  # a "dies": no renewal, no release
                await fa.stop_here()
                died = time.monotonic()
                deadline = died + 60
                while time.monotonic() < deadline:
                    view = await fb.view(run.run_id)
                    if view.state.terminal:
                        break
                    await asyncio.sleep(0.2)
                assert fb.drives_here
                assert view.state == RunState.SUCCEEDED, view.reason
                print(f"run finished {time.monotonic() - died:.1f} s after the holder died")
                steps = {s.key: s for s in view.steps}
                entries = [
                    e
                    for e in (await b.list_entries(ALICE, limit=100))[0]
                    if e.idempotency_key and e.idempotency_key.startswith(f"flow:{run.run_id}:")
                ]
                assert sorted(e.idempotency_key or "" for e in entries) == [
                    f"flow:{run.run_id}:fit:1",
                    f"flow:{run.run_id}:reduce:1",
                ]
                assert {steps["reduce"].entry_id, steps["fit"].entry_id} == {e.id for e in entries}
        finally:
            await fb.shutdown()
            await fa.shutdown()
            await shutdown(b)
            await shutdown(a)


async def test_a_run_s_resource_sends_updates_to_its_principals_only(tmp_path: Path) -> None:
    from mcp.client.subscriptions import ResourceUpdated

    raw = detector_file(tmp_path / "scan.csv")
    flow = json.loads(json.dumps(DETECTOR_FLOW))
    flow["steps"]["reduce"]["parameters"]["duration_s"] = 1.0
    async with run_http_server(tmp_path / "home") as srv:
        async with (
            sdk_client(srv.mcp_url, srv.token("alice")) as alice,
            sdk_client(srv.mcp_url, srv.token("bob")) as bob,
        ):
            gate = {"name": "held", "steps": {"ask": {"kind": "approval"}}}
            held = structured(await alice.call_tool("start_flow", {"flow": gate}))
            run = structured(
                await alice.call_tool("start_flow", {"flow": flow, "inputs": {"path": str(raw)}})
            )
            uri = f"sciorch://flow-runs/{run['run_id']}"
            async with bob.listen(resource_subscriptions=[uri]) as sub:
                assert sub.honored is not None and not sub.honored.resource_subscriptions
            heard = 0
            async with alice.listen(resource_subscriptions=[uri]) as sub:

                async def until_done() -> dict[str, Any]:
                    nonlocal heard
                    async for event in sub:
                        assert isinstance(event, ResourceUpdated) and event.uri == uri
                        heard += 1
                        read = await alice.read_resource(uri)
                        view = json.loads(read.contents[0].text)
                        if view["state"] == "succeeded":
                            return dict(view)
                    raise AssertionError("the updates ended")

                view = await asyncio.wait_for(until_done(), 60)
            await alice.call_tool("cancel_flow_run", {"run_id": held["run_id"]})
            cancelled = structured(
                await alice.call_tool("get_flow_run", {"run_id": held["run_id"]})
            )
    assert heard >= 3  # steps started and ended, then the run
    assert [s["state"] for s in view["steps"]] == ["succeeded"] * 3
    assert cancelled["state"] == "cancelled" and cancelled["reason"] == "cancelled by alice"
    assert cancelled["steps"][0]["state"] == "cancelled"


async def test_a_flow_name_is_never_a_path(tmp_path: Path) -> None:
    from flows.manager import flow_manager
    from orchestrator.engine import Engine
    from tests.conftest import make_settings, shutdown

    (tmp_path / "secret.yaml").write_text("name: secret\nsteps: {a: {kind: record}}\n")
    eng = await Engine.open(make_settings(tmp_path / "home"))
    try:
        mgr = flow_manager(eng)
        (eng.settings.home / "flows").mkdir(parents=True, exist_ok=True)
        for bad in ("../../secret", "/etc/passwd", "a\x00b", "x" * 5000):
            with pytest.raises(InvalidInput) as err:
                mgr.flow_named(bad)
            assert err.value.field == "flow"
        with pytest.raises(Exception, match="no flow named 'nope'"):
            mgr.flow_named("nope")
    finally:
        await shutdown(eng)


async def test_a_step_gets_an_earlier_step_s_file_as_an_input_and_a_search_step_reads_the_catalogue(
    tmp_path: Path,
) -> None:
    """Data between steps: fit gets reduce's reduced.csv staged as its input `data` (not a path
    on the server), and a search step reads the results catalogue as the run's owner sees it."""
    raw = detector_file(tmp_path / "scan.csv")
    flow = {
        "name": "staged",
        "inputs": {"path": {"type": "string"}},
        "steps": {
            "reduce": {
                "service": "detector-analysis",
                "parameters": {"mode": "reduce", "path": "{inputs.path}", "seed": 3},
            },
            "fit": {
                "service": "detector-analysis",
                "needs": ["reduce"],
                "parameters": {"mode": "fit"},
                "inputs": {
                    "data": "sciorch://entries/{steps.reduce.entry_id}/artifacts/reduced.csv"
                },
            },
            "found": {
                "kind": "search",
                "needs": ["fit"],
                "query": 'mode = "fit"',
                "search": {"service": "detector-analysis"},
            },
        },
        "outputs": {"found": "{steps.found.result.count}"},
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice")) as alice:
            run = structured(
                await alice.call_tool("start_flow", {"flow": flow, "inputs": {"path": str(raw)}})
            )
            view = await wait_run(alice, run["run_id"])
            steps = {s["key"]: s for s in view["steps"]}
            fit_entry = structured(
                await alice.call_tool("get_entry", {"entry_id": steps["fit"]["entry_id"]})
            )
            # bob's run of the same search finds nothing of alice's
            async with sdk_client(srv.mcp_url, srv.token("bob")) as bob:
                only = {"name": "peek", "steps": {"found": flow["steps"]["found"] | {"needs": []}}}
                theirs = structured(await bob.call_tool("start_flow", {"flow": only}))
                peek = await wait_run(bob, theirs["run_id"])
    assert view["state"] == "succeeded", view
    assert "path" not in fit_entry["parameters"]
    assert steps["fit"]["result"]["points"] == 12  # read the staged copy of reduce's table
    assert view["outputs"]["found"] >= 1
    rows = steps["found"]["result"]["rows"]
    assert steps["fit"]["entry_id"] in {r["entry_id"] for r in rows}
    assert peek["state"] == "succeeded" and peek["steps"][0]["result"]["count"] == 0


async def test_a_campaign_milestone_starts_a_run_of_its_owner_s_trigger_only(
    tmp_path: Path,
) -> None:
    import tomllib

    from tests.test_steering import CAMPAIGN_TOML

    spec = tomllib.loads(CAMPAIGN_TOML.format(duration=0, budget=3))
    flow = {
        "name": "after-campaign",
        "steps": {
            "note": {
                "kind": "record",
                "values": {"m": "{trigger.milestone}", "state": "{trigger.state}"},
            }
        },
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with (
            sdk_client(srv.mcp_url, srv.token("alice")) as alice,
            sdk_client(srv.mcp_url, srv.token("bob")) as bob,
        ):
            args = {"flow": flow, "kind": "campaign", "every": 2}
            structured(await alice.call_tool("create_trigger", args))
            structured(await bob.call_tool("create_trigger", {"flow": flow, "kind": "campaign"}))
            cid = structured(await alice.call_tool("start_campaign", spec))["id"]
            deadline = time.monotonic() + 120
            runs: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                runs = structured(await alice.call_tool("list_flow_runs", {}))["runs"]
                if len(runs) >= 2 and all(r["state"] == "succeeded" for r in runs):
                    break
                await asyncio.sleep(0.3)
            views = [
                structured(await alice.call_tool("get_flow_run", {"run_id": r["run_id"]}))
                for r in runs
            ]
            await asyncio.sleep(1)  # nothing more comes, and nothing for bob
            again = structured(await alice.call_tool("list_flow_runs", {}))["runs"]
            bobs = structured(await bob.call_tool("list_flow_runs", {}))["runs"]
    got = sorted((v["trigger"]["milestone"], v["steps"][0]["result"]["state"]) for v in views)
    assert got == [("2", "running"), ("end", "completed")], got
    assert {v["trigger"]["campaign_id"] for v in views} == {cid}
    assert len(again) == 2 and bobs == []
