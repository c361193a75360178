"""The local backend on its own: real processes, real files, a real HTTP service.

The engine is replaced by a small recording Reporter (the backend's only boundary); the engine
with this backend is tested in test_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.base import HealthSpec, LaunchSpec
from backends.local import LocalBackend
from ground.config import Settings, SiteConfig
from ground.errors import InvalidInput
from ground.models import EntryState, Resources, can_transition
from orchestrator.registry import create_backend

S = EntryState
PY = sys.executable


# ------------------------------------------------------------------ a recording reporter


@dataclass
class Report:
    entry_id: str
    state: EntryState
    reason: str | None
    exit_code: int | None
    handle: dict[str, Any] | None
    endpoint: str | None
    restarts: int | None
    at: float = field(default_factory=time.monotonic)


class Recorder:
    """Stands in for the engine: records every call and checks the backend keeps the rules
    (valid transitions, nothing after a final state)."""

    def __init__(self) -> None:
        self.transitions: list[Report] = []
        self.logs: dict[str, list[int]] = {}
        self.records: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.state: dict[str, EntryState] = {}
        self.errors: list[str] = []
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _check_open(self, entry_id: str, what: str) -> None:
        st = self.state.get(entry_id)
        if st is not None and st.terminal:
            self.errors.append(f"{entry_id}: {what} after final state {st}")

    async def transition(
        self,
        entry_id: str,
        state: EntryState,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        handle: Mapping[str, Any] | None = None,
        endpoint: str | None = None,
        restarts: int | None = None,
    ) -> None:
        self._check_open(entry_id, f"transition to {state}")
        old = self.state.get(entry_id, S.PENDING)
        if not can_transition(old, state):
            self.errors.append(f"{entry_id}: {old} -> {state} is not a transition")
        self.state[entry_id] = state
        self.transitions.append(
            Report(entry_id, state, reason, exit_code, dict(handle) if handle else None,
                   endpoint, restarts)
        )
        await asyncio.sleep(0)  # a real engine awaits a store write here
        await self._notify()

    async def log_grew(self, entry_id: str, size: int) -> None:
        self._check_open(entry_id, "log_grew")
        self.logs.setdefault(entry_id, []).append(size)
        await self._notify()

    async def stream_record(self, entry_id: str, index: int, record: dict[str, Any]) -> None:
        self._check_open(entry_id, "stream_record")
        got = self.records.setdefault(entry_id, [])
        if index != len(got):
            self.errors.append(f"{entry_id}: record index {index}, expected {len(got)}")
        got.append((index, record))
        await self._notify()

    # -------------------------------------------------------------- for the tests

    def of(self, entry_id: str) -> list[Report]:
        return [t for t in self.transitions if t.entry_id == entry_id]

    def states(self, entry_id: str) -> list[str]:
        return [t.state.value for t in self.of(entry_id)]

    async def until(self, pred: Callable[[], bool], within: float = 15.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(pred)

    async def reach(self, entry_id: str, state: EntryState, within: float = 15.0) -> Report:
        await self.until(
            lambda: any(t.state == state for t in self.of(entry_id))
            or self.state.get(entry_id, S.PENDING).terminal,
            within,
        )
        found = [t for t in self.of(entry_id) if t.state == state]
        assert found, f"{entry_id} ended {self.states(entry_id)} instead of reaching {state}"
        return found[-1]

    async def final(self, entry_id: str, within: float = 15.0) -> Report:
        await self.until(lambda: self.state.get(entry_id, S.PENDING).terminal, within)
        return self.of(entry_id)[-1]


# ------------------------------------------------------------------ fixtures and helpers

OPTIONS = {
    "cpus": 4,
    "memory_mb": 4096,
    "gpus": 1,
    "gpu_type": "virtual",
    "term_grace_s": 0.5,
    "max_walltime_s": 3600,
}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def entries_dir(tmp_path: Path) -> Path:
    d = tmp_path / "entries"
    d.mkdir()
    return d


@pytest.fixture
async def backend(entries_dir: Path, recorder: Recorder) -> AsyncIterator[LocalBackend]:
    b = LocalBackend("local", OPTIONS, entries_dir)
    await b.start(recorder)
    try:
        yield b
    finally:
        await b.shutdown_all()
    assert recorder.errors == []


_n = 0


def spec(
    argv: list[str],
    *,
    kind: str = "job",
    parameters: dict[str, Any] | None = None,
    health: HealthSpec | None = None,
    **resources: Any,
) -> LaunchSpec:
    global _n
    _n += 1
    entry_id = f"ent-{_n:04d}"
    res = {"cpus": 0.5, "memory_mb": 64, "walltime_s": 60, **resources}
    return LaunchSpec(
        entry_id=entry_id,
        event_id="evt-1",
        service="test",
        kind=kind,
        argv=argv,
        parameters=parameters or {},
        resources=Resources(**res),
        health=health,
        base_path=f"/entries/{entry_id}/",
    )


def sh(script: str, **kw: Any) -> LaunchSpec:
    return spec(["/bin/sh", "-c", script], **kw)


def alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rindex(")") + 2] != "Z"


async def gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


def sim(**params: Any) -> LaunchSpec:
    return spec([PY, "-m", "orchestrator.payloads.sim_instrument"], parameters=params)


def http_app(health_timeout: float = 20, **params: Any) -> LaunchSpec:
    s = spec(
        [PY, "-m", "orchestrator.payloads.http_app", "--port", "{port}"],
        kind="service",
        parameters=params,
        health=HealthSpec(path="/health", timeout_s=health_timeout, interval_s=0.1),
    )
    return s


# ------------------------------------------------------------------ jobs


async def test_job_succeeds_with_result_and_stream(
    backend: LocalBackend, recorder: Recorder
) -> None:
    s = sim(surface="branin", x1=3.14159, x2=2.275, duration_s=0.3, records=3, seed=7)
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert recorder.states(s.entry_id) == ["provisioning", "running", "succeeded"]
    assert end.exit_code == 0 and end.reason is None
    running = recorder.of(s.entry_id)[1]
    assert running.handle is not None
    assert running.handle["pid"] > 0 and running.handle["start_time"] is not None
    assert running.handle["workdir"] == str(backend.entries_dir / s.entry_id)
    records = recorder.records[s.entry_id]
    assert [i for i, _ in records] == [0, 1, 2]
    assert [r["step"] for _, r in records] == [1, 2, 3]
    assert all(r["of"] == 3 for _, r in records)
    log_file = backend.entries_dir / s.entry_id / "log"
    assert recorder.logs[s.entry_id][-1] == log_file.stat().st_size
    data = await backend.read_results(s.entry_id, running.handle, 0)
    assert data.result is not None
    assert data.result["surface"] == "branin"
    assert abs(data.result["true_value"] - 0.397887) < 1e-4
    assert data.result["noise_variance"] == pytest.approx(1e-4)
    assert data.next_record == 3
    logs = await backend.read_logs(s.entry_id, running.handle, 0, 100_000)
    assert "done: value=" in logs.data


async def test_stream_records_and_log_arrive_while_running(
    backend: LocalBackend, recorder: Recorder
) -> None:
    s = sh('echo first line; echo \'{"step": 1}\' >> "$SCIORCH_STREAM"; sleep 2')
    await backend.submit(s)
    t0 = time.monotonic()
    await recorder.until(lambda: bool(recorder.records.get(s.entry_id)), within=1.5)
    await recorder.until(lambda: bool(recorder.logs.get(s.entry_id)), within=1.5)
    assert time.monotonic() - t0 < 1.5
    assert recorder.state[s.entry_id] == S.RUNNING
    assert recorder.records[s.entry_id] == [(0, {"step": 1})]
    await backend.cancel(s.entry_id, {})
    await recorder.final(s.entry_id)


async def test_log_tail_is_the_last_lines(backend: LocalBackend, recorder: Recorder) -> None:
    s = sh("for i in $(seq 1 100); do echo line-$i; done; exit 9")
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert end.exit_code == 9 and end.reason is not None
    assert "line-100" in end.reason and "line-81" in end.reason and "line-80\n" not in end.reason


async def test_command_not_found_fails_127(backend: LocalBackend, recorder: Recorder) -> None:
    s = spec(["no-such-command-xyz", "--flag"])
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert recorder.states(s.entry_id) == ["failed"]
    assert end.reason == "command not found: no-such-command-xyz"
    assert end.exit_code == 127


async def test_killed_by_signal(backend: LocalBackend, recorder: Recorder) -> None:
    s = sh("echo about to die; kill -9 $$")
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert end.state == S.FAILED
    assert end.reason is not None and end.reason.startswith("killed by signal SIGKILL")
    assert end.exit_code == 137


async def test_result_that_is_not_an_object_still_ends_by_exit_code(
    backend: LocalBackend, recorder: Recorder
) -> None:
    s = sh('echo "[1, 2]" > "$SCIORCH_RESULT"')
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert end.state == S.SUCCEEDED


async def test_environment_and_placeholders(backend: LocalBackend, recorder: Recorder) -> None:
    s = spec(
        ["/bin/sh", "-c",
         'echo "$SCIORCH_ENTRY_ID|$SCIORCH_BASE_PATH|$CUDA_VISIBLE_DEVICES|$1|$FOO|$PWD"',
         "sh", "{workdir}"],
    )
    s.env["FOO"] = "bar"
    await backend.submit(s)
    await recorder.final(s.entry_id)
    wd = backend.entries_dir / s.entry_id
    line = (wd / "log").read_text().strip()
    assert line == f"{s.entry_id}|/entries/{s.entry_id}/||{wd}|bar|{wd}"
    assert json.loads((wd / "exit.json").read_text())["exit_code"] == 0


async def test_walltime_expires(backend: LocalBackend, recorder: Recorder) -> None:
    s = sh("sleep 30", walltime_s=1)
    await backend.submit(s)
    t0 = time.monotonic()
    end = await recorder.final(s.entry_id)
    assert end.state == S.EXPIRED
    assert end.reason == "walltime 00:00:01 exceeded"
    assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------ cancel


async def test_cancel_running_kills_the_whole_group(
    backend: LocalBackend, recorder: Recorder
) -> None:
    s = sh('sleep 30 & echo $! > "$SCIORCH_WORKDIR/child.pid"; wait')
    await backend.submit(s)
    running = await recorder.reach(s.entry_id, S.RUNNING)
    pidfile = backend.entries_dir / s.entry_id / "child.pid"
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    child = int(pidfile.read_text())
    assert alive(child)
    await backend.cancel(s.entry_id, running.handle or {})
    await backend.cancel(s.entry_id, running.handle or {})  # idempotent
    end = await recorder.final(s.entry_id)
    assert end.state == S.CANCELLED
    assert await gone(child)
    assert running.handle is not None and await gone(running.handle["pid"])
    await backend.cancel(s.entry_id, running.handle)  # finished: nothing happens
    await asyncio.sleep(0.05)
    assert recorder.states(s.entry_id).count("cancelled") == 1


async def test_cancel_escalates_to_sigkill(backend: LocalBackend, recorder: Recorder) -> None:
    s = sh("trap '' TERM; echo ignoring TERM; sleep 30")
    await backend.submit(s)
    await recorder.reach(s.entry_id, S.RUNNING)
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await backend.cancel(s.entry_id, {})
    end = await recorder.final(s.entry_id)
    assert end.state == S.CANCELLED
    assert time.monotonic() - t0 < 2.5  # grace 0.5 s, then SIGKILL
    outcome = json.loads((backend.entries_dir / s.entry_id / "exit.json").read_text())
    assert outcome["signal"] == signal.SIGKILL  # the wrapper outlived the kill to record it


# ------------------------------------------------------------------ resources and the queue


async def test_gpu_queueing(backend: LocalBackend, recorder: Recorder) -> None:
    first = sh('echo "gpus=$CUDA_VISIBLE_DEVICES"; sleep 0.6', gpus=1)
    second = sh('echo "gpus=$CUDA_VISIBLE_DEVICES"', gpus=1)
    cpu_only = sh('echo "gpus=[$CUDA_VISIBLE_DEVICES]"')
    await backend.submit(first)
    await recorder.reach(first.entry_id, S.RUNNING)
    assert await backend.estimate_wait(Resources(gpus=1)) > 0
    assert await backend.estimate_wait(Resources()) == 0
    await backend.submit(second)
    wait_one = await backend.estimate_wait(Resources(gpus=1, walltime_s=60))
    reason = backend.queue_reason(second.entry_id)
    assert reason is not None and "GPU" in reason and "1 busy" in reason
    await backend.submit(cpu_only)  # needs no GPU: starts at once, past the queued one
    done_cpu = await recorder.final(cpu_only.entry_id)
    assert done_cpu.state == S.SUCCEEDED
    assert recorder.states(second.entry_id) == []  # still pending: nothing reported
    # more queued GPU work ahead: a longer wait
    third = sh("true", gpus=1)
    await backend.submit(third)
    assert await backend.estimate_wait(Resources(gpus=1, walltime_s=60)) > wait_one
    end_first = await recorder.final(first.entry_id)
    await recorder.final(second.entry_id)
    await recorder.final(third.entry_id)
    assert recorder.of(second.entry_id)[0].at >= end_first.at
    wd = backend.entries_dir
    assert (wd / first.entry_id / "log").read_text().strip() == "gpus=0"
    assert (wd / second.entry_id / "log").read_text().strip() == "gpus=0"
    assert (wd / cpu_only.entry_id / "log").read_text().strip() == "gpus=[]"
    assert recorder.of(second.entry_id)[1].handle["gpus"] == [0]  # type: ignore[index]
    assert backend.queue_reason(second.entry_id) is None


async def test_backfill_does_not_delay_the_blocked_head(
    backend: LocalBackend, recorder: Recorder
) -> None:
    running = sh("sleep 30", cpus=2, walltime_s=60)
    head = sh("true", cpus=4)  # blocked until `running` ends (at the latest after 60 s)
    long_small = sh("true", cpus=1, walltime_s=3600)  # would still hold a CPU then: waits
    short_small = sh("true", cpus=1, walltime_s=10)  # done before the head could start: runs
    await backend.submit(running)
    await recorder.reach(running.entry_id, S.RUNNING)
    for s in (head, long_small, short_small):
        await backend.submit(s)
    assert (await recorder.final(short_small.entry_id)).state == S.SUCCEEDED
    assert recorder.states(head.entry_id) == recorder.states(long_small.entry_id) == []
    assert "behind 1 earlier entry" in (backend.queue_reason(long_small.entry_id) or "")
    await backend.cancel(running.entry_id, {})
    await recorder.final(head.entry_id)
    await recorder.final(long_small.entry_id)
    assert recorder.of(long_small.entry_id)[0].at >= recorder.of(head.entry_id)[0].at


async def test_exit_status_is_recorded_whatever_the_job_path(
    backend: LocalBackend, recorder: Recorder
) -> None:
    s = spec(["/bin/sh", "-c", "exit 6"])
    s.env["PATH"] = "/nonexistent"
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert end.exit_code == 6
    outcome = json.loads((backend.entries_dir / s.entry_id / "exit.json").read_text())
    assert outcome["exit_code"] == 6 and outcome["signal"] is None
    assert abs(outcome["finished_at"] - time.time()) < 60


async def test_cancel_queued(backend: LocalBackend, recorder: Recorder) -> None:
    blocker = sh("sleep 30", gpus=1)
    queued = sh("true", gpus=1)
    await backend.submit(blocker)
    await backend.submit(queued)
    await backend.cancel(queued.entry_id, {})
    end = await recorder.final(queued.entry_id)
    assert recorder.states(queued.entry_id) == ["cancelled"]
    assert end.reason == "cancelled before it started"
    await backend.cancel(blocker.entry_id, {})
    await recorder.final(blocker.entry_id)


async def test_what_never_fits_is_refused(backend: LocalBackend) -> None:
    with pytest.raises(InvalidInput) as err:
        await backend.submit(sh("true", gpus=2))
    assert err.value.field == "resources.gpus"
    with pytest.raises(InvalidInput) as err:
        await backend.submit(sh("true", gpus=1, gpu_type="a100"))
    assert err.value.field == "resources.gpu_type"
    with pytest.raises(InvalidInput) as err:
        await backend.submit(sh("true", walltime_s=7200))
    assert err.value.field == "resources.walltime_s"
    with pytest.raises(InvalidInput) as err:
        await backend.submit(sh("true", cpus=64))
    assert err.value.field == "resources.cpus"
    caps = await backend.capabilities()
    assert (caps.cpus, caps.memory_mb, caps.gpus, caps.gpu_types, caps.max_walltime_s) == (
        4, 4096, 1, ["virtual"], 3600
    )


def test_create_backend(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    b = create_backend(SiteConfig(name="here", kind="local", cpus=2), settings)
    assert isinstance(b, LocalBackend) and b.entries_dir == settings.entries_dir
    with pytest.raises(InvalidInput) as err:
        create_backend(SiteConfig(name="far", kind="teleport"), settings)
    assert err.value.field == "sites.far.kind"
    with pytest.raises(InvalidInput) as err:
        create_backend(SiteConfig(name="here", kind="local", gpu=2), settings)
    assert err.value.field == "sites.here.gpu"


# ------------------------------------------------------------------ services


async def test_service_becomes_ready(backend: LocalBackend, recorder: Recorder) -> None:
    s = http_app(greeting="hi there")
    await backend.submit(s)
    ready = await recorder.reach(s.entry_id, S.READY)
    assert recorder.states(s.entry_id) == ["provisioning", "running", "ready"]
    running = recorder.of(s.entry_id)[1]
    assert running.handle is not None and running.endpoint == ready.endpoint
    assert ready.endpoint == f"http://127.0.0.1:{running.handle['port']}"
    async with httpx.AsyncClient(trust_env=False) as client:
        echo = (await client.get(f"{ready.endpoint}/echo?a=1")).json()
        page = (await client.get(f"{ready.endpoint}/")).text
    assert echo["entry_id"] == s.entry_id and echo["query"] == {"a": ["1"]}
    assert "hi there" in page and s.entry_id in page
    await backend.cancel(s.entry_id, running.handle)
    end = await recorder.final(s.entry_id)
    assert end.state == S.CANCELLED


async def test_service_health_never_passes(backend: LocalBackend, recorder: Recorder) -> None:
    s = spec(
        ["/bin/sh", "-c", "echo warming up on port $1; sleep 30", "sh", "{port}"],
        kind="service",
        health=HealthSpec(path="/health", timeout_s=1, interval_s=0.1),
    )
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert end.state == S.FAILED
    assert end.reason is not None
    assert end.reason.startswith("health check GET /health did not pass within 1s; log tail:")
    assert "warming up on port" in end.reason


async def test_service_dies_before_ready(backend: LocalBackend, recorder: Recorder) -> None:
    s = spec(
        ["/bin/sh", "-c", "echo cannot bind >&2; exit 2"],
        kind="service",
        health=HealthSpec(path="/", timeout_s=10),
    )
    s = s.model_copy(update={"restart_policy": "on-failure", "max_restarts": 3})
    await backend.submit(s)
    end = await recorder.final(s.entry_id)
    assert recorder.states(s.entry_id) == ["provisioning", "running", "failed"]
    assert end.exit_code == 2 and end.reason is not None and "cannot bind" in end.reason


async def test_service_restarts_after_crash(backend: LocalBackend, recorder: Recorder) -> None:
    s = http_app(crash_after_s=0.8).model_copy(
        update={"restart_policy": "on-failure", "max_restarts": 1}
    )
    await backend.submit(s)
    end = await recorder.final(s.entry_id, within=30)
    assert recorder.states(s.entry_id) == [
        "provisioning", "running", "ready", "provisioning", "running", "ready", "failed",
    ]
    restart = recorder.of(s.entry_id)[3]
    assert restart.reason == "restarting after exit code 1 (restart 1/1)"
    assert restart.restarts == 1
    assert restart.handle is not None and restart.handle["pid"] is None
    assert end.exit_code == 1 and end.reason is not None and end.reason.startswith("exit code 1")
    assert "crashing on purpose" in end.reason


# ------------------------------------------------------------------ adoption after a restart


async def test_adopt_running_job_after_server_death(
    entries_dir: Path, backend: LocalBackend, recorder: Recorder
) -> None:
    s = sh('sleep 0.8; echo \'{"late": true}\' >> "$SCIORCH_STREAM"; sleep 0.3; exit 5',
           gpus=1)
    await backend.submit(s)
    running = await recorder.reach(s.entry_id, S.RUNNING)
    handle = running.handle
    assert handle is not None
    await backend.close()  # the server dies; the job does not
    assert alive(handle["pid"])

    second = Recorder()
    b2 = LocalBackend("local", OPTIONS, entries_dir)
    await b2.start(second)
    try:
        await b2.adopt(s.entry_id, S.RUNNING, handle, s)
        assert await b2.estimate_wait(Resources(gpus=1)) > 0  # its GPU is reserved again
        end = await second.final(s.entry_id)
        assert second.states(s.entry_id) == ["failed"]
        assert end.exit_code == 5
        assert end.reason is not None and end.reason.startswith("exit code 5")
        assert second.records[s.entry_id] == [(0, {"late": True})]
        assert await b2.estimate_wait(Resources(gpus=1)) == 0
    finally:
        await b2.shutdown_all()
    assert second.errors == []


async def test_adopt_job_that_finished_unwatched(
    entries_dir: Path, backend: LocalBackend, recorder: Recorder
) -> None:
    ok = sh("sleep 0.2; echo fine")
    bad = sh("sleep 0.2; exit 4")
    for s in (ok, bad):
        await backend.submit(s)
    handles = {s.entry_id: (await recorder.reach(s.entry_id, S.RUNNING)).handle for s in (ok, bad)}
    await backend.close()
    for s in (ok, bad):
        for _ in range(200):
            if (entries_dir / s.entry_id / "exit.json").exists():
                break
            await asyncio.sleep(0.02)

    second = Recorder()
    b2 = LocalBackend("local", OPTIONS, entries_dir)
    await b2.start(second)
    try:
        for s in (ok, bad):
            await b2.adopt(s.entry_id, S.RUNNING, handles[s.entry_id] or {}, s)
        assert second.of(ok.entry_id)[-1].state == S.SUCCEEDED
        end = second.of(bad.entry_id)[-1]
        assert end.state == S.FAILED and end.exit_code == 4
    finally:
        await b2.shutdown_all()
    assert second.errors == []


async def test_adopt_vanished_and_never_started(
    entries_dir: Path, backend: LocalBackend, recorder: Recorder
) -> None:
    vanished = sh("true")
    (entries_dir / vanished.entry_id).mkdir()
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    await backend.adopt(
        vanished.entry_id,
        S.RUNNING,
        {"pid": dead.pid, "start_time": 1, "workdir": str(entries_dir / vanished.entry_id)},
        vanished,
    )
    end = await recorder.final(vanished.entry_id)
    assert end.state == S.FAILED
    assert end.reason == "process vanished while the server was down; no exit status recorded"

    never = sh("echo started late")
    await backend.adopt(never.entry_id, S.PENDING, {}, never)
    end = await recorder.final(never.entry_id)
    assert recorder.states(never.entry_id) == ["provisioning", "running", "succeeded"]


async def test_adopt_ready_service(
    entries_dir: Path, backend: LocalBackend, recorder: Recorder
) -> None:
    s = http_app()
    await backend.submit(s)
    ready = await recorder.reach(s.entry_id, S.READY)
    handle = recorder.of(s.entry_id)[1].handle
    assert handle is not None
    await backend.close()

    second = Recorder()
    b2 = LocalBackend("local", OPTIONS, entries_dir)
    await b2.start(second)
    try:
        await b2.adopt(s.entry_id, S.READY, handle, s)
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{ready.endpoint}/health")).json() == {"ok": True}
        await b2.cancel(s.entry_id, handle)
        end = await second.final(s.entry_id)
        assert end.state == S.CANCELLED
        assert await gone(handle["pid"])
    finally:
        await b2.shutdown_all()
    assert second.errors == []


# ------------------------------------------------------------------ overhead


async def test_overhead_per_job_is_small(backend: LocalBackend, recorder: Recorder) -> None:
    specs = [spec(["true"]) for _ in range(10)]
    t0 = time.monotonic()
    for s in specs:
        await backend.submit(s)
        await recorder.final(s.entry_id)
    per_job = (time.monotonic() - t0) / len(specs)
    assert all(recorder.state[s.entry_id] == S.SUCCEEDED for s in specs)
    assert per_job < 0.2, per_job  # generous: CI machines are slow; the benchmark is stricter
