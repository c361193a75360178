"""The backend contract, once for every backend: the same scenarios through the real engine and
store against the local backend, the real Slurm (slurmrestd and the Slurm commands) and the
Kubernetes emulator (tests/fakes/kube_emulator.py, where the test plays the Job controller and
runs the pod's real command as its kubelet). What only one backend does stays in its own file.

Slurm without a reachable cluster skips here, as in test_slurm.py, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ground.models import Entry, EntryState, ResourceRequest
from orchestrator.engine import Engine
from tests.conftest import ALICE, EngineHost, shutdown
from tests.fakes.kube_emulator import KubeEmulator
from tests.test_slurm import UNAVAILABLE, cancel_jobs_under, slurm_site

# One job every backend runs (under its own name): a POSIX-sh job that streams, writes a result
# and an output file, and exits.
JOB_BODY = r"""
kind: job
image: busybox:1.36
command:
  - sh
  - -c
  - >-
    echo "hello {who}";
    i=0; while [ $i -lt {records} ]; do
    printf '{{"i": %d}}\n' $i >>"$SCIORCH_STREAM"; i=$((i+1)); sleep {pause}; done;
    printf '{{"value": %s}}' {value} >"$SCIORCH_RESULT";
    mkdir -p "$SCIORCH_OUTPUT_DIR"; echo x >"$SCIORCH_OUTPUT_DIR/plot.txt";
    sleep {sleep}; exit {code}
parameters:
  type: object
  additionalProperties: false
  properties:
    who: {type: string, default: world, pattern: "^[a-z]+$"}
    records: {type: integer, default: 2}
    pause: {type: number, default: 0}
    value: {type: number, default: 42}
    sleep: {type: number, default: 0}
    code: {type: integer, default: 0}
resources: {cpus: 0.25, memory: 64Mi, walltime: "00:05:00"}
"""
CJOB = "name: cjob" + JOB_BODY

# One service every backend runs: the built-in HTTP app (GET /health), one restart allowed.
CSVC = r"""
name: csvc
kind: service
image: python:3.12-slim
command: ["{python}", "-m", "orchestrator.payloads.http_app", "--port", "{port}"]
parameters:
  type: object
  additionalProperties: false
  properties:
    crash_after_s: {type: [number, "null"], default: null}
resources: {cpus: 0.25, memory: 256Mi, walltime: "00:05:00"}
health: {path: /health, timeout_s: 30}
restart: {policy: on-failure, max_restarts: 1}
"""


@dataclass(kw_only=True)
class Site(EngineHost):
    """One backend under test: how to open an engine on it (again, after a 'restart') and what
    the cluster's own machinery must do for an entry (nothing, except on the emulator)."""

    name: str
    emu: KubeEmulator | None = None
    pods: dict[str, str] = field(default_factory=dict)

    async def started(self, entry: Entry) -> None:
        """The Job controller and the kubelet, on the emulator: a pod that runs the command."""
        if self.emu is None:
            return
        ns = "sciorch-" + entry.event_id
        await self.emu.wait_object("jobs", ns, entry.id)
        pod = self.pods[entry.id] = self.emu.create_pod(ns, "jobs", entry.id)
        self.emu.start_kubelet(ns, pod, finish_job=True)

    async def serve(self, entry: Entry) -> None:
        """A service's pod becomes Ready, on the emulator (elsewhere the real process starts
        and the backend's own health check passes)."""
        if self.emu is None:
            return
        ns = "sciorch-" + entry.event_id
        await self.emu.wait_object("deployments", ns, entry.id)
        pod = self.pods[entry.id] = self.emu.create_pod(ns, "deployments", entry.id)
        self.emu.schedule(ns, pod)
        self.emu.run(ns, pod, ready=False)
        await asyncio.sleep(0.1)
        self.emu.set_ready(ns, pod)

    async def crash(self, entry: Entry, ready_again: bool) -> None:
        """The service's process exits with code 1 (elsewhere it does so by itself, after
        crash_after_s); on the emulator the kubelet restarts the container, Ready again if
        `ready_again`."""
        if self.emu is None:
            return
        ns = "sciorch-" + entry.event_id
        pod = self.pods[entry.id]
        self.emu.restart_container(ns, pod, 1)
        if ready_again:
            await asyncio.sleep(0.1)
            self.emu.set_ready(ns, pod)

    async def answers(self, entry: Entry) -> None:
        """The ready service answers its health check at its endpoint (on the emulator: the
        readiness probe the kubelet ran is the template's health check)."""
        if self.emu is None:
            assert entry.endpoint
            async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
                assert (await c.get(f"{entry.endpoint}/health")).json() == {"ok": True}
            return
        dep = self.emu.get("deployments", "sciorch-" + entry.event_id, entry.id)
        assert dep is not None
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"

    async def deadline(self, entry: Entry) -> None:
        """The Job controller's activeDeadlineSeconds, on the emulator (elsewhere the backend or
        the scheduler enforces the walltime itself)."""
        if self.emu is None:
            return
        ns = "sciorch-" + entry.event_id
        await asyncio.sleep(entry.resources.walltime_s)
        self.emu.terminate(ns, self.pods[entry.id], 137, reason="DeadlineExceeded")
        self.emu.fail_job(ns, entry.id, "DeadlineExceeded", "Job was active longer than specified")


BACKENDS = ["local", "slurm-rest", "slurm-cli", "kubernetes-emulator"]


@pytest.fixture(params=BACKENDS)
async def site(request: pytest.FixtureRequest, home: Path, tmp_path: Path) -> AsyncIterator[Site]:
    cat = tmp_path / "catalogue"
    cat.mkdir()
    (cat / "cjob.yaml").write_text(CJOB)
    (cat / "csvc.yaml").write_text(CSVC)
    name = str(request.param)
    cleanup: Callable[[], Awaitable[None]] | None = None
    emu: KubeEmulator | None = None
    if name == "local":
        opts: dict[str, Any] = {"name": "here", "kind": "local", "cpus": 4, "memory_mb": 4096,
                                "term_grace_s": 0.5}
    elif name.startswith("slurm"):
        if UNAVAILABLE is not None:
            if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
                pytest.fail(f"CI=true and no Slurm: {UNAVAILABLE}")
            pytest.skip(UNAVAILABLE)
        shared = Path(os.environ["SCIORCH_SLURM_SHARED_DIR"]) / f"contract-{uuid.uuid4().hex[:10]}"
        opts = slurm_site("cluster", name.removeprefix("slurm-"), shared)

        async def cleanup() -> None:
            cancel_jobs_under(shared)
    else:
        emu = KubeEmulator()
        await emu.__aenter__()
        emu.add_node("node-1", cpu="16", memory="64Gi")
        opts = {"name": "spin", "kind": "kubernetes", "host": emu.url}
    s = Site(name=name, site=opts, home=home, catalogue=cat, emu=emu)
    try:
        yield s
    finally:
        for eng in list(s.engines):
            await shutdown(eng)
        if cleanup is not None:
            await cleanup()
        if emu is not None:
            await emu.__aexit__(None, None, None)
            assert emu.invalid == [], "the backend sent objects the server rejected"


async def until(
    eng: Engine, entry_id: str, check: Callable[[Entry], bool], within: float = 60.0
) -> Entry:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        entry = await eng.get_entry(ALICE, entry_id)
        if check(entry):
            return entry
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{entry_id} stuck in {entry.state}: {entry.reason}")
        await asyncio.sleep(0.05)


def done(e: Entry) -> bool:
    return e.state.terminal


# ------------------------------------------------------------------ the contract


async def test_a_job_succeeds_with_its_result_stream_and_log(site: Site) -> None:
    eng = await site.open()
    heard: list[str] = []
    async with eng.bus.subscribe(lambda m: m.kind in ("stream", "transition")) as sub:
        entry = await eng.launch(ALICE, "cjob", {"records": 3, "value": 7})
        await site.started(entry)
        end = await until(eng, entry.id, done)
        while not sub.queue.empty():
            msg = sub.queue.get_nowait()
            if msg.entry_id == entry.id:
                is_state = msg.kind == "transition" and msg.state
                heard.append(msg.state.value if is_state and msg.state else msg.kind)
    assert end.state == EntryState.SUCCEEDED, end.reason
    assert end.exit_code == 0 and end.result == {"value": 7}
    assert heard.count("stream") == 3 and heard.index("running") < heard.index("stream"), heard
    _, data = await eng.read_results(ALICE, entry.id)
    assert [r["i"] for r in data.records] == [0, 1, 2]
    assert "hello world" in (await eng.read_logs(ALICE, entry.id)).data


async def test_a_nonzero_exit_fails_with_the_exit_code_and_log_tail(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(ALICE, "cjob", {"code": 3, "who": "failing", "records": 0})
    await site.started(entry)
    end = await until(eng, entry.id, done)
    assert end.state == EntryState.FAILED and end.exit_code == 3
    assert (end.reason or "").startswith("exit code 3")
    assert "hello failing" in (end.reason or "")  # the log tail


async def test_the_walltime_ends_it_as_expired(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(
        ALICE, "cjob", {"sleep": 60, "records": 0}, resources=ResourceRequest(walltime_s=3)
    )
    await site.started(entry)
    await site.deadline(entry)
    end = await until(eng, entry.id, done, within=30)
    assert end.state == EntryState.EXPIRED, end.reason
    assert end.reason == "walltime 00:00:03 exceeded"
    assert end.started_at is not None and end.finished_at is not None
    assert 2.5 < (end.finished_at - end.started_at).total_seconds() < 15


async def test_cancel_stops_a_running_job(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(ALICE, "cjob", {"sleep": 60, "records": 0})
    await site.started(entry)
    await until(eng, entry.id, lambda e: e.state == EntryState.RUNNING)
    await eng.cancel(ALICE, entry.id)
    end = await until(eng, entry.id, done, within=30)
    assert end.state == EntryState.CANCELLED
    assert end.reason == "cancelled by alice"
    again = await eng.cancel(ALICE, entry.id)  # cancelling twice changes nothing
    assert (again.state, again.reason) == (EntryState.CANCELLED, "cancelled by alice")


async def test_a_restarted_server_re_adopts_and_finishes_it(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(ALICE, "cjob", {"sleep": 2, "records": 1, "value": 5})
    await site.started(entry)
    await until(eng, entry.id, lambda e: e.state == EntryState.RUNNING)
    eng = await site.restart(eng)
    end = await until(eng, entry.id, done)
    assert end.state == EntryState.SUCCEEDED, end.reason
    assert end.result == {"value": 5}
    _, data = await eng.read_results(ALICE, entry.id)
    assert [r["i"] for r in data.records] == [0]


async def test_a_service_becomes_ready_once_its_health_check_answers(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(ALICE, "csvc")
    await site.serve(entry)
    ready = await until(eng, entry.id, lambda e: e.state == EntryState.READY)
    assert [t.state.value for t in ready.transitions][-2:] == ["running", "ready"]
    assert ready.endpoint
    await site.answers(ready)
    await eng.cancel(ALICE, entry.id)
    end = await until(eng, entry.id, done, within=30)
    assert end.state == EntryState.CANCELLED


async def test_a_service_that_dies_is_restarted_then_fails_after_max_restarts(site: Site) -> None:
    eng = await site.open()
    entry = await eng.launch(ALICE, "csvc", {"crash_after_s": 3})
    await site.serve(entry)
    first = await until(eng, entry.id, lambda e: e.state == EntryState.READY)
    await site.crash(entry, ready_again=True)
    again = await until(eng, entry.id, lambda e: e.restarts == 1 and e.state == EntryState.READY)
    assert any(
        t.state == EntryState.PROVISIONING
        and "restarting after exit code 1 (restart 1/1)" in (t.reason or "")
        for t in again.transitions
    ), [(t.state, t.reason) for t in again.transitions]
    assert first.restarts == 0
    await site.crash(entry, ready_again=False)
    end = await until(eng, entry.id, done)
    assert end.state == EntryState.FAILED and end.exit_code == 1, end.reason
    assert "exit code 1" in (end.reason or "") and end.restarts == 1
