"""A sweep on a Kubernetes site runs as one Indexed Job (backends/kube_sweep.py), through the MCP
tools, on the emulator with its Indexed Job controller (tests/fakes/kube_indexed.py) running
each pod's real command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from backends.kube_api import KubeApi
from backends.kube_manifests import KubernetesOptions
from backends.kube_sweep import CANCEL_CODE, indexed_manifests, parse_indexes
from ground.models import Resources
from orchestrator import sweeps
from tests.conftest import ALICE, EngineHost, shutdown
from tests.fakes.kube_emulator import KubeEmulator
from tests.fakes.kube_indexed import INDEX_KEY, IndexedJobController, compress
from tests.mcp_helpers import (
    assert_tool_error,
    run_http_server,
    script_catalogue,
    sdk_client,
    structured,
)
from tests.test_kubernetes import K8S_VERSION, spec
from tests.test_sweeps import PAYLOAD, PROPS


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    return script_catalogue(tmp_path, "double", PAYLOAD, PROPS)


def test_indexes_compress_and_parse_as_the_api_writes_them() -> None:
    assert compress({0, 1, 2, 4, 6, 7}) == "0-2,4,6-7"
    assert parse_indexes("0-2,4,6-7") == {0, 1, 2, 4, 6, 7}
    assert parse_indexes("") == set()


def test_the_indexed_job_is_valid_and_each_index_has_its_own_parameters() -> None:
    specs = [
        spec(entry_id=f"ent-{i:012x}", sweep_id="swp-abc", parameters={"x": i}) for i in range(3)
    ]
    made = indexed_manifests(specs, 2, KubernetesOptions(), "spin")
    assert made is not None
    cm, job = made
    for obj in made:
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
    assert job["spec"]["completionMode"] == "Indexed"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 2)
    assert cm["data"]["params-2.json"] == '{"x": 2}'
    assert "SCIORCH_ENTRY_ID=ent-000000000001" in cm["data"]["element-1.sh"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailIndex"}.items() <= rules[1].items()
    assert rules[1]["onExitCodes"]["values"] == [CANCEL_CODE]
    # Elements whose pods differ in more than their own keys cannot share one template.
    other = spec(
        entry_id="ent-00000000000f",
        sweep_id="swp-abc",
        resources=Resources(cpus=3, memory_mb=512, walltime_s=600),
    )
    assert indexed_manifests([*specs, other], 2, KubernetesOptions(), "spin") is None


async def _until(check: Any, within: float = 60.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_sweep_on_kubernetes_is_one_indexed_job_with_one_element_cancelled(
    home: Path, catalogue: Path
) -> None:
    async with KubeEmulator() as emu:
        emu.add_node("node-1", cpu="16", memory="64Gi")
        controller = IndexedJobController(emu)
        controller.start()
        site = {"name": "spin", "kind": "kubernetes", "host": emu.url}
        settings = {"catalogue_dirs": [catalogue], "sites": [site]}
        api = await KubeApi.connect(host=emu.url)
        try:
            async with run_http_server(home, settings=settings) as srv:
                async with sdk_client(srv.mcp_url, srv.token("alice")) as alice:
                    sets = [{"x": 0, "sleep": 60}] + [{"x": i, "sleep": 0.4} for i in range(1, 6)]
                    view = structured(
                        await alice.call_tool(
                            "submit_sweep",
                            {"service": "double", "parameter_sets": sets, "throttle": 2},
                        )
                    )
                    assert view["size"] == 6 and view["site"] == "spin"
                    first = view["elements"][0]["entry_id"]
                    jobs, _ = await api.list("Job", None)
                    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
                    job = jobs[0]
                    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
                    assert job["spec"]["completionMode"] == "Indexed"
                    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (6, 2)

                    async def first_running() -> bool:
                        got = structured(await alice.call_tool("get_entry", {"entry_id": first}))
                        return bool(got["state"] == "running")

                    await _until(first_running, what="element 0 running")
                    async with sdk_client(srv.mcp_url, srv.token("bob")) as bob:
                        refused = await bob.call_tool("cancel_entry", {"entry_id": first})
                        assert_tool_error(refused, "not_found")
                        hidden = await bob.call_tool("get_sweep", {"sweep_id": view["id"]})
                        assert_tool_error(hidden, "not_found")
                    cancelled = structured(
                        await alice.call_tool("cancel_entry", {"entry_id": first})
                    )
                    assert cancelled["state"] == "cancelled"
                    done = structured(
                        await alice.call_tool(
                            "wait_sweep", {"sweep_id": view["id"], "timeout_seconds": 90}
                        )
                    )
                    sweep = done["sweep"]
                    assert sweep["counts"] == {"cancelled": 1, "succeeded": 5}, [
                        e.get("reason") for e in sweep["elements"]
                    ]
                    ys = [e["result"]["y"] for e in sweep["elements"][1:]]
                    assert ys == [2, 4, 6, 8, 10]
                    # A whole sweep cancelled: its Job goes, with its pods.
                    long = [{"x": i, "sleep": 60} for i in range(3)]
                    second = structured(
                        await alice.call_tool(
                            "submit_sweep",
                            {"service": "double", "parameter_sets": long, "throttle": 2},
                        )
                    )
                    other = str(second["id"])

                    def pods_of(job: str) -> list[dict[str, Any]]:
                        return [
                            p for p in emu.items("pods") if p["metadata"]["name"].startswith(job)
                        ]

                    await emu.wait_for(lambda: len(pods_of(other)) == 2, 30, "2 pods")
                    gone = structured(
                        await alice.call_tool("cancel_sweep", {"sweep_id": second["id"]})
                    )
                    assert gone["counts"] == {"cancelled": 3}
                    await emu.wait_for(
                        lambda: emu.get("jobs", ns, other) is None and not pods_of(other),
                        15,
                        "the second sweep's Job and pods deleted",
                    )
                # Still one Job; index 0 failed on the cancel and was not retried.
                jobs, _ = await api.list("Job", ns)
                assert [j["metadata"]["name"] for j in jobs] == [name]
                status = await _until(
                    lambda: _final_status(api, ns, name), what="the Job's final status"
                )
                assert parse_indexes(status["completedIndexes"]) == {1, 2, 3, 4, 5}
                assert parse_indexes(status["failedIndexes"]) == {0}
                zero = [
                    c
                    for c in emu._history  # every pod ever created for index 0
                    if c.plural == "pods"
                    and c.type == "ADDED"
                    and c.object["metadata"]["name"].startswith(name)
                    and c.object["metadata"]["labels"].get(INDEX_KEY) == "0"
                ]
                assert len(zero) == 1
                assert controller.most_active[(ns, name)] == 2
                assert emu.invalid == []
        finally:
            await api.close()


async def _final_status(api: KubeApi, ns: str, name: str) -> dict[str, Any] | None:
    job = await api.get("Job", ns, name)
    status = (job or {}).get("status") or {}
    done = any(c.get("type") in ("Complete", "Failed") for c in status.get("conditions") or [])
    return status if done else None


async def test_a_cancelled_index_is_not_retried_where_a_failed_one_is() -> None:
    """The Indexed Job's own rules, on the emulator's controller: with one retry per index, an
    index that fails is run twice, an index whose pod is deleted (a cancel) once."""
    argvs = [["sh", "-c", "sleep 30"], ["sh", "-c", "exit 3"]]
    specs = [
        spec(
            entry_id=f"ent-{i:012x}",
            sweep_id="swp-retry",
            argv=argv,
            restart_policy="on-failure",
            max_restarts=1,
        )
        for i, argv in enumerate(argvs)
    ]
    opts = KubernetesOptions(python=sys.executable)
    made = indexed_manifests(specs, None, opts, "spin")
    assert made is not None and made[1]["spec"]["backoffLimitPerIndex"] == 1
    ns = made[1]["metadata"]["namespace"]
    async with KubeEmulator() as emu:
        IndexedJobController(emu).start()
        emu.put("namespaces", {"metadata": {"name": ns}})
        api = await KubeApi.connect(host=emu.url)
        try:
            for body in made:
                await api.create(body)
            job = made[1]["metadata"]["name"]

            def running(index: int) -> list[dict[str, Any]]:
                return [
                    p
                    for p in emu.items("pods", ns)
                    if p["metadata"]["labels"][INDEX_KEY] == str(index)
                    and p["status"].get("phase") == "Running"
                ]

            pod = (await emu.wait_for(lambda: running(0), 20, "index 0 running"))[0]
            await api.patch("ConfigMap", ns, f"{job}-sweep", {"data": {"cancelled-0": "1"}})
            await api.delete("Pod", ns, pod["metadata"]["name"])
            final = await emu.wait_for(
                lambda: (emu.get("jobs", ns, job) or {}).get("status", {}).get("conditions"),
                30,
                "the Job's end",
            )
            assert final[-1]["reason"] == "FailedIndexes"
            status = (emu.get("jobs", ns, job) or {})["status"]
            assert parse_indexes(status["failedIndexes"]) == {0, 1}
            tries = {
                i: len(
                    [
                        c
                        for c in emu._history
                        if c.plural == "pods"
                        and c.type == "ADDED"
                        and c.object["metadata"]["labels"].get(INDEX_KEY) == str(i)
                    ]
                )
                for i in (0, 1)
            }
            assert tries == {0: 1, 1: 2}
        finally:
            await api.close()


async def test_a_restarted_server_adopts_each_element_of_a_running_indexed_job(
    home: Path, catalogue: Path
) -> None:
    async with KubeEmulator() as emu:
        emu.add_node("node-1", cpu="16", memory="64Gi")
        IndexedJobController(emu).start()
        host = EngineHost(home, {"name": "spin", "kind": "kubernetes", "host": emu.url}, catalogue)
        eng = await host.open()
        try:
            sets = [{"x": i, "sleep": 1.0} for i in range(4)]
            sweep = await sweeps.submit_sweep(eng, ALICE, "double", sets, throttle=2)
            first = sweep.entries[0].id
            running, _ = await eng.wait_entry(ALICE, first, timeout_s=30, until="started")
            assert running.handle["index"] == 0
            eng = await host.restart(eng)  # the Job runs on while no server watches it
            done, timed_out = await sweeps.wait_sweep(eng, ALICE, sweep.id, timeout_s=60)
            assert not timed_out and done.counts == {"succeeded": 4}, [
                e.reason for e in done.entries
            ]
            assert [(e.result or {})["y"] for e in done.entries] == [0, 2, 4, 6]
        finally:
            for e in host.engines:
                await shutdown(e)
