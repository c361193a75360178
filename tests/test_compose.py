"""Composed services (a template's `components:`, orchestrator.groups) end to end: the real MCP
SDK client over streamable HTTP, the real local backend running real processes, and the built-in
`dask` template with the real Dask (the `dask` extra): a scheduler whose dashboard answers
through the proxy, two workers as entries of their own, and a computation submitted from a job
of the same event that found the scheduler through the event."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from ground.models import EntryState
from orchestrator.catalogue import Catalogue
from orchestrator.engine import Engine
from tests.conftest import ALICE, BOTH_STORES, EngineHost, make_settings, shutdown
from tests.fakes.kube_emulator import KubeEmulator
from tests.mcp_helpers import run_http_server, sdk_client, structured
from tests.test_kubernetes import Emulated, ns_of
from tests.test_slurm import UNAVAILABLE, cancel_jobs_under, slurm_cmd, slurm_site

pytestmark = pytest.mark.timeout(300)


def _need_dask() -> None:
    if importlib.util.find_spec("distributed") is None:
        why = 'Dask is not installed (pip install -e ".[test]" brings the dask extra)'
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, args))


async def _until(client: Any, entry_id: str, ok: Any, timeout_s: float = 90) -> dict[str, Any]:
    """get_entry until ok(entry) holds (the members of a group move on their own)."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = await _call(client, "get_entry", entry_id=entry_id)
        if ok(entry):
            return entry
        assert time.monotonic() < deadline, f"gave up waiting: {entry}"
        await asyncio.sleep(0.2)


def _all_up(entry: dict[str, Any]) -> bool:
    up = {"ready", "running"}
    return bool(entry["members"]) and all(m["state"] in up for m in entry["members"])


_CLIENT = """
import json, os
from distributed import Client

# No address: DASK_SCHEDULER_ADDRESS came from the event the job was launched into.
with Client(timeout=30) as client:
    client.wait_for_workers(2, timeout=60)
    squares = client.map(lambda x: x * x, range(100))
    total = client.submit(sum, squares).result()
    entries = client.run(lambda: os.environ["SCIORCH_ENTRY_ID"])
    gpus = client.submit(
        lambda: os.environ.get("CUDA_VISIBLE_DEVICES"), resources={"GPU": 1}, pure=False
    ).result()
    result = {
        "total": total,
        "address": os.environ["DASK_SCHEDULER_ADDRESS"],
        "worker_entries": sorted(entries.values()),
        "gpus": gpus,
    }
with open(os.environ["SCIORCH_RESULT"], "w") as f:
    json.dump(result, f)
"""


def _catalogue(root: Path, templates: dict[str, dict[str, Any]], scripts: dict[str, str]) -> Path:
    cat = root / "catalogue"
    cat.mkdir(parents=True, exist_ok=True)
    for name, script in scripts.items():
        (cat / f"{name}.py").write_text(script)
    for name, template in templates.items():
        (cat / f"{name}.yaml").write_text(json.dumps({"name": name, **template}))
    return cat


def _job(script: Path, **more: Any) -> dict[str, Any]:
    return {"kind": "job", "command": ["{python}", str(script)], **more}


async def test_a_dask_cluster_of_two_workers_runs_a_computation_from_a_job_in_its_event(
    tmp_path: Path,
) -> None:
    _need_dask()
    cat = _catalogue(
        tmp_path, {"dask-client": _job(tmp_path / "catalogue" / "client.py")}, {"client": _CLIENT}
    )
    settings = {"catalogue_dirs": [str(cat)]}
    async with (
        run_http_server(tmp_path / "home", settings=settings) as http,
        sdk_client(http.mcp_url, http.token("alice")) as alice,
        sdk_client(http.mcp_url, http.token("bob")) as bob,
    ):
        event = await _call(alice, "create_event", name="dask")
        started = time.monotonic()
        launched = await _call(
            alice,
            "launch_service",
            service="dask",
            parameters={"workers": 2, "gpus_per_worker": 1},
            event_id=event["id"],
        )
        # launch_service returns the whole group at once: the scheduler and its two workers.
        assert launched["group"]["role"] == "main"
        assert launched["group"]["component"] == "scheduler"
        roles = sorted((m["component"], m["role"], m["index"]) for m in launched["members"])
        waiting = [m["reason"] for m in launched["members"] if m["role"] == "after"]
        assert waiting == ["waiting for scheduler to be ready"] * 2, waiting
        assert roles == [("scheduler", "main", 0), ("worker", "after", 0), ("worker", "after", 1)]
        waited = await _call(alice, "wait_entry", entry_id=launched["id"], timeout_seconds=120)
        assert waited["entry"]["state"] == "ready", waited
        scheduler_ready_s = time.monotonic() - started
        cluster = await _until(alice, launched["id"], _all_up)
        running_s = time.monotonic() - started
        workers = sorted(m["entry_id"] for m in cluster["members"] if m["component"] == "worker")
        listed = (await _call(alice, "list_entries", event_id=event["id"]))["entries"]
        assert {e["id"]: e["group"]["component"] for e in listed} == {
            launched["id"]: "scheduler",
            **{w: "worker" for w in workers},
        }
        worker_view = await _call(alice, "get_entry", entry_id=workers[0])
        assert worker_view["group"]["main_entry_id"] == launched["id"]
        assert worker_view["resources"]["gpus"] == 1

        # The dashboard answers through the per-entry proxy, under the entry's prefix.
        prefix = f"/entries/{launched['id']}/"
        async with httpx.AsyncClient(base_url=http.base, trust_env=False, timeout=30) as web:
            r = await web.get(cluster["access_url"])
            assert r.status_code == 303 and r.headers["location"] == prefix
            r = await web.get(prefix + "status")
            assert r.status_code == 200 and "Dask" in r.text, r.text[:300]
            deadline = time.monotonic() + 60  # the workers' processes run; now they connect
            while (r := await web.get(prefix + "json/counts.json")).json()["workers"] < 2:
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.2)
            assert r.status_code == 200 and r.json()["workers"] == 2, r.text
        print(
            f"\ndask: scheduler ready {scheduler_ready_s:.1f} s, 2 worker jobs running "
            f"{running_s:.1f} s, both connected {time.monotonic() - started:.1f} s after "
            "launch_service"
        )
        async with httpx.AsyncClient(base_url=http.base, trust_env=False, timeout=30) as anon:
            assert (await anon.get(prefix + "status")).status_code == 401

        # Bob sees nothing of alice's cluster.
        refused = await bob.call_tool("get_entry", {"entry_id": launched["id"]})
        assert refused.is_error
        assert (await _call(bob, "list_entries"))["entries"] == []

        # A job of the same event finds the scheduler through the event and computes there.
        submitted = time.monotonic()
        job = await _call(alice, "submit_job", service="dask-client", event_id=event["id"])
        done = (await _call(alice, "wait_entry", entry_id=job["id"], timeout_seconds=120))["entry"]
        print(f"dask: client job done {time.monotonic() - submitted:.1f} s after submit_job")
        assert done["state"] == "succeeded", done
        result = done["result"]
        assert result["total"] == sum(x * x for x in range(100))
        assert result["address"].startswith("ws://")
        assert result["worker_entries"] == workers  # the tasks ran in the group's workers
        assert result["gpus"] is not None and len(result["gpus"].split(",")) == 1

        # Cancelling the scheduler stops the workers with it.
        await _call(alice, "cancel_entry", entry_id=launched["id"])
        ended = await _until(
            alice, launched["id"], lambda e: all(m["state"] == "cancelled" for m in e["members"])
        )
        reasons = {m["entry_id"]: m["reason"] for m in ended["members"]}
        assert all("main component" in (reasons[w] or "") for w in workers), reasons


async def test_on_slurm_each_dask_worker_is_a_slurm_job_of_its_own(tmp_path: Path) -> None:
    _need_dask()
    if UNAVAILABLE is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and no Slurm: {UNAVAILABLE}")
        pytest.skip(UNAVAILABLE)
    shared = Path(os.environ["SCIORCH_SLURM_SHARED_DIR"]) / f"test-{uuid.uuid4().hex[:10]}"
    cat = _catalogue(
        tmp_path, {"dask-client": _job(tmp_path / "catalogue" / "client.py")}, {"client": _CLIENT}
    )
    settings = {"catalogue_dirs": [str(cat)], "sites": [slurm_site("hpc", "cli", shared)]}
    try:
        async with (
            run_http_server(tmp_path / "home", settings=settings) as http,
            sdk_client(http.mcp_url, http.token("alice")) as alice,
        ):
            event = await _call(alice, "create_event", name="dask-on-slurm")
            started = time.monotonic()
            launched = await _call(
                alice,
                "launch_service",
                service="dask",
                parameters={"workers": 2, "gpus_per_worker": 1, "worker_memory_mb": 512},
                resources={"memory_mb": 512, "walltime_s": 600},
                event_id=event["id"],
            )
            waited = await _call(alice, "wait_entry", entry_id=launched["id"], timeout_seconds=120)
            assert waited["entry"]["state"] == "ready", waited
            cluster = await _until(alice, launched["id"], _all_up, 120)
            print(f"\ndask on Slurm: 3 jobs up {time.monotonic() - started:.1f} s after launch")
            jobs = {}
            for m in cluster["members"]:
                view = await _call(alice, "get_entry", entry_id=m["entry_id"])
                jobs[m["entry_id"]] = view["backend_handle"]["job_id"]
            assert len(set(jobs.values())) == 3  # the scheduler and each worker: one job each
            queued = await asyncio.to_thread(
                slurm_cmd, "squeue", "-h", "-o", "%i %b", "-j", ",".join(jobs.values())
            )
            workers = sorted(m["entry_id"] for m in cluster["members"] if m["role"] == "after")
            for w in workers:
                assert f"{jobs[w]} gres/gpu:1" in queued or f"{jobs[w]} gres:gpu:1" in queued, (
                    queued
                )

            submitted = time.monotonic()
            job = await _call(
                alice,
                "submit_job",
                service="dask-client",
                event_id=event["id"],
                resources={"walltime_s": 300},
            )
            done = await _call(alice, "wait_entry", entry_id=job["id"], timeout_seconds=180)
            assert done["entry"]["state"] == "succeeded", done
            print(f"dask on Slurm: client job done {time.monotonic() - submitted:.1f} s after")
            result = done["entry"]["result"]
            assert result["total"] == sum(x * x for x in range(100))
            assert result["worker_entries"] == workers

            await _call(alice, "cancel_entry", entry_id=launched["id"])
            await _until(
                alice,
                launched["id"],
                lambda e: all(m["state"] == "cancelled" for m in e["members"]),
                60,
            )
    finally:
        cancel_jobs_under(shared)


_SIDECAR_CHECK = """
import json, os, urllib.request

env = {k: v for k, v in os.environ.items() if k.startswith(("SCIORCH_COMPONENT_", "SCIORCH_GROUP"))}
url = os.environ["SCIORCH_COMPONENT_LOGGER_ENDPOINT"] + "/health"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(url, timeout=10) as r:
    health = json.loads(r.read())
with open(os.environ["SCIORCH_RESULT"], "w") as f:
    json.dump({"env": env, "health": health, "log": os.environ.get("LOG_URL")}, f)
"""


@BOTH_STORES
async def test_a_sidecar_is_ready_before_main_starts_and_stops_with_it(
    tmp_path: Path, store_url: str | None
) -> None:
    root = tmp_path / "catalogue"
    main = _job(
        root / "check.py",
        components=[
            {
                "name": "logger",
                "service": "http-app",
                "parameters": {"greeting": "{label}"},
                "exports": {"LOG_URL": "{endpoint}/echo"},
            }
        ],
        parameters={
            "type": "object",
            "additionalProperties": False,
            "properties": {"label": {"type": "string", "default": "logs"}},
        },
    )
    cat = _catalogue(tmp_path, {"with-logger": main}, {"check": _SIDECAR_CHECK})
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [str(cat)]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as alice,
    ):
        started = time.monotonic()
        launched = await _call(alice, "submit_job", service="with-logger")
        logger = next(m for m in launched["members"] if m["component"] == "logger")
        assert launched["state"] == "pending"  # held until its sidecar is ready
        assert launched["reason"] == "waiting for logger to be up"
        done = (await _call(alice, "wait_entry", entry_id=launched["id"], timeout_seconds=60))[
            "entry"
        ]
        print(f"\ncomposed job + sidecar: {time.monotonic() - started:.1f} s to succeeded")
        assert done["state"] == "succeeded", done
        result = done["result"]
        assert result["health"] == {"ok": True}  # the sidecar answered when main ran
        env = result["env"]
        assert env["SCIORCH_COMPONENT_LOGGER_ENTRY_ID"] == logger["entry_id"]
        assert env["SCIORCH_COMPONENT_LOGGER_URL"] == logger["url"]
        assert result["log"] == env["SCIORCH_COMPONENT_LOGGER_ENDPOINT"] + "/echo"
        assert env["SCIORCH_GROUP_ID"] == launched["group"]["id"]
        assert len(env["SCIORCH_GROUP_SECRET"]) >= 32

        side = await _until(alice, logger["entry_id"], lambda e: e["state"] == "cancelled", 30)
        assert "main component" in side["reason"], side
        ready_at = next(t["at"] for t in side["transitions"] if t["state"] == "ready")
        assert ready_at <= done["started_at"], (ready_at, done["started_at"])
        assert side["parameters"] == {"greeting": "logs", "crash_after_s": None}


async def test_a_failing_sidecar_fails_its_group(tmp_path: Path) -> None:
    root = tmp_path / "catalogue"
    templates = {
        "flaky": _job(root / "flaky.py"),
        "app-with-flaky": {
            "kind": "service",
            "command": ["{python}", "-m", "orchestrator.payloads.http_app", "--port", "{port}"],
            "health": {"path": "/health"},
            "components": [{"name": "side", "service": "flaky", "start": "after"}],
        },
    }
    scripts = {"flaky": "import sys, time\ntime.sleep(1)\nsys.exit(3)\n"}
    cat = _catalogue(tmp_path, templates, scripts)
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [str(cat)]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as alice,
    ):
        launched = await _call(alice, "launch_service", service="app-with-flaky")
        failed = await _until(alice, launched["id"], lambda e: e["state"] == "failed", 60)
        side = next(m for m in failed["members"] if m["component"] == "side")
        assert side["state"] == "failed"
        assert f"component side ({side['entry_id']}) failed" in failed["reason"], failed


@BOTH_STORES
async def test_a_held_main_cancelled_before_its_sidecars_are_up_ends_the_group(
    tmp_path: Path, store_url: str | None
) -> None:
    root = tmp_path / "catalogue"
    templates = {
        "slow": {
            "kind": "service",
            "command": ["{python}", str(root / "slow.py")],
            "health": {"path": "/", "timeout_s": 60},
        },
        "waits": _job(root / "slow.py", components=[{"name": "slow", "service": "slow"}]),
    }
    cat = _catalogue(tmp_path, templates, {"slow": "import time\ntime.sleep(60)\n"})
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [str(cat)]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as alice,
        sdk_client(http.mcp_url, http.token("bob")) as bob,
    ):
        launched = await _call(alice, "submit_job", service="waits")
        assert launched["state"] == "pending"
        refused = await bob.call_tool("cancel_entry", {"entry_id": launched["id"]})
        assert refused.is_error
        cancelled = await _call(alice, "cancel_entry", entry_id=launched["id"])
        assert cancelled["state"] == "cancelled"
        ended = await _until(
            alice, launched["id"], lambda e: all(m["state"] == "cancelled" for m in e["members"])
        )
        assert ended["started_at"] is None  # it never ran


def test_a_component_must_name_a_catalogue_service(tmp_path: Path) -> None:
    from ground.errors import InvalidInput

    template = {"kind": "job", "command": ["true"], "components": [{"name": "x", "service": "no"}]}
    cat = _catalogue(tmp_path, {"broken": template}, {})
    with pytest.raises(InvalidInput) as err:
        Catalogue.load([cat])
    assert err.value.field == "components" and "components.x.service" in err.value.message


async def test_a_bad_component_parameter_launches_nothing(tmp_path: Path) -> None:
    template = {
        "kind": "job",
        "command": ["true"],
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
        # http-app takes a greeting of at most 200 characters; the main template takes any.
        "components": [
            {"name": "page", "service": "http-app", "parameters": {"greeting": "{title}"}}
        ],
    }
    cat = _catalogue(tmp_path, {"titled": template}, {})
    async with (
        run_http_server(tmp_path / "home", settings={"catalogue_dirs": [str(cat)]}) as http,
        sdk_client(http.mcp_url, http.token("alice")) as alice,
    ):
        bad = await alice.call_tool(
            "submit_job", {"service": "titled", "parameters": {"title": "x" * 300}}
        )
        assert bad.is_error, bad.content
        error = bad.meta["sciorch/error"]
        assert error["code"] == "invalid_parameters" and error["field"] == "parameters.title"
        assert "component page" in error["message"] and "greeting" in error["message"]
        assert (await _call(alice, "list_entries"))["entries"] == []


async def test_on_kubernetes_the_dask_workers_are_pods_told_the_schedulers_service(
    tmp_path: Path,
) -> None:
    """Manifests only: the emulated API server takes the objects, the test plays the kubelet
    for the scheduler; the workers' Jobs must carry the scheduler's in-cluster address."""
    _need_dask()
    async with KubeEmulator() as emu:
        emu.add_node("node-1", cpu="32", memory="128Gi", gpus=4)
        kube = {"name": "spin", "kind": "kubernetes", "host": emu.url, "endpoint": "service"}
        eng = await Engine.open(make_settings(tmp_path / "home", sites=[kube]))
        try:
            await _dask_on_kubernetes(eng, emu)
        finally:
            await shutdown(eng)
        assert emu.invalid == [], "the backend sent objects the server rejected"


async def _dask_on_kubernetes(eng: Engine, emu: KubeEmulator) -> None:
    ev = await eng.create_event(ALICE, "dask-on-k8s")
    main = await eng.launch(
        ALICE, "dask", {"workers": 2, "gpus_per_worker": 1}, event_id=ev.id, kind="service"
    )
    ns = ns_of(ev.id)
    await Emulated(emu).serve(ns, main.id)
    deadline = time.monotonic() + 30
    while len(emu.items("jobs", ns)) < 2:
        assert time.monotonic() < deadline, [j["metadata"]["name"] for j in emu.items("jobs")]
        await asyncio.sleep(0.05)
    ready = await eng.get_entry(ALICE, main.id)
    assert ready.state == EntryState.READY and ready.endpoint
    address = "ws://" + ready.endpoint.removeprefix("http://")
    (scheduler,) = emu.get("deployments", ns, main.id)["spec"]["template"]["spec"]["containers"]
    assert scheduler["image"] == "ghcr.io/dask/dask:2026.8.0"
    assert "--protocol=ws" in scheduler["command"] + scheduler.get("args", [])
    members = await eng.groups.members(ready)
    workers = [m for m in members if m.service == "dask-worker"]
    assert len(workers) == 2
    for w in workers:
        (c,) = emu.get("jobs", ns, w.id)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["DASK_SCHEDULER_ADDRESS"] == address
        assert env["SCIORCH_COMPONENT_SCHEDULER_ENTRY_ID"] == main.id
        assert c["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
        assert "distributed.cli.dask_worker" in " ".join(c["command"] + c.get("args", []))
    await eng.cancel(ALICE, main.id)
    deadline = time.monotonic() + 30
    while any(emu.get("jobs", ns, w.id) is not None for w in workers):
        assert time.monotonic() < deadline, "the workers' Jobs outlived their scheduler"
        await asyncio.sleep(0.05)


_SLOW_SERVER = """
import http.server, os, time

time.sleep(3)  # long enough for the server to restart before this sidecar is ready
http.server.ThreadingHTTPServer(
    ("127.0.0.1", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler
).serve_forever()
"""

_ENV_TO_RESULT = """
import json, os

with open(os.environ["SCIORCH_RESULT"], "w") as f:
    json.dump({k: v for k, v in os.environ.items() if k.startswith("SCIORCH_COMPONENT_")}, f)
"""


async def test_a_group_moves_on_after_a_server_restart(tmp_path: Path) -> None:
    root = tmp_path / "catalogue"
    templates = {
        "slow-server": {
            "kind": "service",
            "command": ["{python}", str(root / "slow.py")],
            "health": {"path": "/", "timeout_s": 60},
        },
        "after-slow": _job(
            root / "report.py", components=[{"name": "slow", "service": "slow-server"}]
        ),
    }
    cat = _catalogue(tmp_path, templates, {"slow": _SLOW_SERVER, "report": _ENV_TO_RESULT})
    local = {"name": "local", "kind": "local", "cpus": 8, "memory_mb": 16384, "term_grace_s": 1}
    host = EngineHost(home=tmp_path / "home", site=local, catalogue=cat)
    eng = await host.open()
    try:
        main = await eng.launch(ALICE, "after-slow")
        assert main.state == EntryState.PENDING
        eng = await host.restart(eng)  # the sidecar is still starting; main is held
        done, timed_out = await eng.wait_entry(ALICE, main.id, timeout_s=60)
        assert not timed_out and done.state == EntryState.SUCCEEDED, (done.state, done.reason)
        side = [m for m in await eng.groups.members(done) if m.id != main.id]
        assert done.result is not None
        assert done.result["SCIORCH_COMPONENT_SLOW_ENTRY_ID"] == side[0].id
        assert done.result["SCIORCH_COMPONENT_SLOW_ENDPOINT"] == side[0].endpoint
        # the sidecar shares the main entry's lifetime, across the restart too
        ended, timed_out = await eng.wait_entry(ALICE, side[0].id, 30, until="finished")
        assert not timed_out and ended.state.terminal, (ended.state, ended.reason)
    finally:
        for engine in list(host.engines):
            await shutdown(engine)
