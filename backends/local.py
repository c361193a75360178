"""The local backend: entries run as processes on this machine.

Each entry runs under a tiny /bin/sh wrapper in its own session and process group; the wrapper
appends the command's output to `<workdir>/log` and records how it ended in `<workdir>/exit.json`,
so the true outcome survives the server. Exits are awaited through pidfds (no polling), log and
stream growth through one shared file watcher, and resources (cpus, memory, whole GPUs, real or
virtual) are accounted so entries that do not fit wait in a FIFO queue with backfill
(backends.local_pool).

An entry with an account (`[sites.accounts]`) runs as that POSIX user when the server is root,
in a work dir the user owns (0700), with the user's groups, HOME and none of the server's
environment beyond PATH and the locale (backends.posix_users); without root it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backends.base import (
    HealthSpec,
    LaunchSpec,
    Outcome,
    Reporter,
    WorkDir,
    site_options,
)
from backends.local_pool import ResourcePool, detect_gpus
from backends.posix_users import PosixUser, give_workdir, run_as
from backends.supervisor import (
    DirWatcher,
    EntryRecord,
    Supervisor,
    health_failure,
    restart_reason,
    script_text,
    signal_name,
    wait_healthy,
)
from ground.errors import BackendError
from ground.models import (
    Capabilities,
    EntryState,
    Resources,
    SiteStatus,
)

log = logging.getLogger("sciorch.backends.local")


class LocalOptions(BaseModel):
    """The `[[sites]]` keys a local site understands."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0, description="CPU cores to hand out (default: all)")
    memory_mb: int | None = Field(None, gt=0, description="MiB to hand out (default: all RAM)")
    gpus: int | None = Field(
        None, ge=0, le=64, description="virtual GPUs to schedule (default: detect real ones)"
    )
    gpu_type: str | None = Field(None, description="type name of the virtual GPUs")
    max_walltime_s: int | None = Field(None, gt=0)
    term_grace_s: float = Field(5, ge=0, description="SIGTERM to SIGKILL grace period")
    host: str = Field("127.0.0.1", description="address services listen on")


class _Phase(enum.Enum):
    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"


@dataclass(eq=False, kw_only=True)
class _Entry(EntryRecord):
    phase: _Phase = _Phase.QUEUED
    user: PosixUser | None = None  # whom it runs as (None: the server's user)
    queued_at: float = field(default_factory=time.time)
    # allocation
    allocated: bool = False
    gpus: list[int] = field(default_factory=list)
    port: int | None = None
    # process
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    pgid: int | None = None
    start_time: int | None = None
    spawned_at: float | None = None  # epoch of the latest (re)start
    pidfd: int | None = None
    exited: asyncio.Future[int | None] | None = None  # raw exit status; None when unknown
    kill_timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None

    @property
    def resources(self) -> Resources:
        return self.spec.resources

    def deadline(self, now: float) -> float:
        start = self.started_at if self.started_at is not None else now
        return max(now, start + self.resources.walltime_s)

    @property
    def group(self) -> tuple[str, int] | None:
        if self.spec.sweep_id and self.spec.sweep_throttle:
            return self.spec.sweep_id, self.spec.sweep_throttle
        return None


# ----------------------------------------------------------------------------- helpers


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, start time in clock ticks) from /proc/<pid>/stat, None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return rest[0], int(rest[2]), int(rest[19])


def _members(pgid: int) -> list[int]:
    """Pids of the live processes in a process group."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None and st[1] == pgid and st[0] != "Z":
                out.append(int(name))
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str, avoid: set[int]) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port
    raise BackendError(f"no free TCP port on {host}")


# ----------------------------------------------------------------------------- the backend


class LocalBackend(Supervisor[_Entry]):
    """Runs entries as processes on this machine. See the module docstring."""

    kind = "local"

    def __init__(self, name: str, options: Mapping[str, Any], entries_dir: Path) -> None:
        opts = site_options(LocalOptions, name, options)
        super().__init__(name, entries_dir)
        self.options = opts
        self.host = opts.host
        self.term_grace_s = opts.term_grace_s
        self.max_walltime_s = opts.max_walltime_s
        # virtual GPUs now; real ones are detected in start()
        self._pool: ResourcePool[_Entry] = ResourcePool(
            opts.cpus,
            opts.memory_mb,
            {i: opts.gpu_type or "" for i in range(opts.gpus or 0)},
            opts.max_walltime_s,
        )
        self._ports: set[int] = set()

    # ------------------------------------------------------------------ protocol: lifecycle

    async def start(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self._closed = False
        if self.options.gpus is None:
            self._pool.set_gpus(await detect_gpus(self.name))
        self._watcher = DirWatcher(self._request_flush)

    async def close(self) -> None:
        """Stop watching; running processes keep running (a restarted server re-adopts them)."""
        self._closed = True
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for e in self._entries.values():
            self._detach(e)
        for t in tasks:
            t.cancel()
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*tasks, *self._bg, return_exceptions=True)
        if self._watcher is not None:
            await self._watcher.close()
        self._entries.clear()
        self._ports.clear()
        self._pool.reset()

    async def shutdown_all(self, timeout_s: float = 5.0) -> None:
        """Kill everything this backend runs (reporting `cancelled`), then close. For tests and
        for an operator who wants nothing left behind."""
        for e in list(self._pool.queue):
            await self.cancel(e.id, {})
        waiting = []
        for e in list(self._entries.values()):
            e.cancel_requested = True
            if e.pgid is not None and e.exited is not None and not e.exited.done():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(e.pgid, signal.SIGKILL)
            if e.task is not None:
                waiting.append(e.task)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)
        await self.close()

    # ------------------------------------------------------------------ protocol: site facts

    async def capabilities(self) -> Capabilities:
        pool = self._pool
        return Capabilities(
            cpus=pool.total_cpus,
            memory_mb=pool.total_memory_mb,
            gpus=len(pool.gpu_names),
            gpu_types=pool.gpu_types,
            max_walltime_s=pool.max_walltime_s,
            gpus_total=len(pool.gpu_names),
            gpus_free=len(pool.free.gpus),
        )

    async def status(self) -> tuple[SiteStatus, str | None]:
        return SiteStatus.UP, None

    async def estimate_wait(self, resources: Resources) -> float:
        return self._pool.estimate_wait(resources, self._entries.values())

    def queue_reason(self, entry_id: str) -> str | None:
        """Why a queued entry waits (None when it is not queued here)."""
        e = self._entries.get(entry_id)
        if e is None or e.phase is not _Phase.QUEUED:
            return None
        return self._pool.queue_reason(e)

    # ------------------------------------------------------------------ protocol: entries

    async def submit(self, spec: LaunchSpec) -> None:
        if not self._is_new(spec, self._pool.never_fits(spec.resources)):
            return
        user = run_as(self.name, spec.account)
        wd = WorkDir(self.entries_dir / spec.entry_id)
        if spec.inputs:  # copies: off the event loop
            await asyncio.to_thread(self._prepare, wd, spec, user)
        else:
            self._prepare(wd, spec, user)
        self._enqueue(_Entry(spec=spec, workdir=wd, user=user))

    @staticmethod
    def _prepare(wd: WorkDir, spec: LaunchSpec, user: PosixUser | None) -> None:
        wd.prepare(spec.parameters, spec.inputs)
        if user is not None:
            wd.log.touch()  # the wrapper appends to it as the user
            give_workdir(wd.root, user)

    async def cancel(self, entry_id: str, handle: Mapping[str, Any]) -> None:
        e = self._entries.get(entry_id)
        if e is None:
            await self._cancel_unknown(entry_id, handle)
            return
        if e.finished or e.cancel_requested:
            return
        e.cancel_requested = True
        if e.phase is _Phase.QUEUED:
            with contextlib.suppress(ValueError):
                self._pool.queue.remove(e)
            await self._finish(e, EntryState.CANCELLED, "cancelled before it started", None)
        elif e.pid is not None:
            self._terminate(e)
        # else: it is being started; the launch sees the flag and stops it

    async def adopt(
        self, entry_id: str, state: EntryState, handle: Mapping[str, Any], spec: LaunchSpec
    ) -> None:
        if not self._adoptable(entry_id, state):
            return
        root = Path(handle.get("workdir") or self.entries_dir / entry_id)
        e = _Entry(
            spec=spec, workdir=WorkDir(root), state=state, user=run_as(self.name, spec.account)
        )
        e.restarts = int(handle.get("restarts") or 0)
        started_at = handle.get("started_at")
        e.started_at = float(started_at) if started_at else None
        pid = handle.get("pid")
        if not pid:
            if state in (EntryState.PENDING, EntryState.PROVISIONING):
                # Never started, or between two runs of a restarting service: start it (again).
                with contextlib.suppress(OSError):
                    e.workdir.exit.unlink(missing_ok=True)
                if not e.workdir.params.exists():
                    await asyncio.to_thread(self._prepare, e.workdir, spec, e.user)
                self._enqueue(e)
                return
            await self._finish(
                e, EntryState.FAILED, "no process recorded for this entry; state unknown", None
            )
            return
        pid = int(pid)
        outcome = e.workdir.read_outcome()
        if outcome is not None:
            st, reason, code = self._verdict(e, outcome)
            await self._finish(e, st, reason, code)
            return
        stat = _proc_stat(pid)
        want = handle.get("start_time")
        alive = (
            stat is not None
            and stat[0] != "Z"
            and (stat[2] == int(want) if want is not None else stat[1] == pid)
        )
        if not alive:
            await self._finish(
                e,
                EntryState.FAILED,
                "process vanished while the server was down; no exit status recorded",
                None,
            )
            return
        assert stat is not None
        # Re-attach: the process is still ours.
        e.pid, e.pgid, e.start_time = pid, int(handle.get("pgid") or stat[1]), stat[2]
        e.gpus = [int(g) for g in handle.get("gpus") or []]
        e.port = int(handle["port"]) if handle.get("port") else None
        e.started_at = e.started_at or time.time()
        spawned = handle.get("spawned_at")
        e.spawned_at = float(spawned) if spawned else e.started_at
        e.ready = state == EntryState.READY
        e.phase = _Phase.ACTIVE
        self._pool.take(e, e.gpus)
        if e.port is not None:
            self._ports.add(e.port)
        # What is already written counts as reported; only growth from now on is reported.
        e.tail.skip_existing(e.workdir)
        self._entries[entry_id] = e
        self._watch_exit(e)
        self._arm_walltime(e)
        if self._watcher is not None:
            self._watcher.add(e.workdir.root, entry_id)
        e.task = asyncio.get_running_loop().create_task(self._life(e, adopted=True))

    # ------------------------------------------------------------------ scheduling

    def _enqueue(self, e: _Entry) -> None:
        e.phase = _Phase.QUEUED
        self._entries[e.id] = e
        queue = self._pool.queue
        if e.spec.priority == "urgent":  # the front of the queue, behind earlier urgent work
            at = next((i for i, q in enumerate(queue) if q.spec.priority != "urgent"), len(queue))
            queue.insert(at, e)
        else:
            queue.append(e)
        self._schedule()

    def _schedule(self) -> None:
        """Start what the pool says may start now."""
        if self._closed:
            return
        for e, gpus in self._pool.schedule(self._entries.values()):
            with contextlib.suppress(ValueError):
                self._pool.queue.remove(e)
            e.phase = _Phase.ACTIVE
            self._pool.take(e, gpus)
            e.task = asyncio.get_running_loop().create_task(self._life(e))

    def _release(self, e: _Entry) -> None:
        if self._pool.give(e):
            if e.port is not None:
                self._ports.discard(e.port)
            self._schedule()

    # ------------------------------------------------------------------ one entry's life

    async def _life(self, e: _Entry, adopted: bool = False) -> None:
        try:
            if adopted:
                if e.state in (EntryState.PENDING, EntryState.PROVISIONING):
                    await self._report(e, EntryState.RUNNING, handle=self._handle(e))
            elif not await self._launch(e, first=True):
                return
            while True:
                status = await self._until_exit(e)
                outcome = self._outcome(e, status)
                code = outcome.exit_code
                if code not in (0, None) and e.may_restart():
                    e.restarts += 1
                    what = (
                        f"signal {signal_name(outcome.signal)}"
                        if outcome.signal
                        else f"exit code {code}"
                    )
                    self._reset_process(e)
                    await self._report(
                        e,
                        EntryState.PROVISIONING,
                        reason=restart_reason(what, e.restarts, e.spec),
                        restarts=e.restarts,
                        handle=self._handle(e, running=False),
                    )
                    if not await self._launch(e, first=False):
                        return
                    continue
                state, reason, exit_code = self._verdict(e, outcome)
                await self._finish(e, state, reason, exit_code)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("local backend: entry %s", e.id)
            if e.pgid is not None and e.exited is not None and not e.exited.done():
                with contextlib.suppress(OSError):
                    os.killpg(e.pgid, signal.SIGKILL)
            await self._finish(
                e, EntryState.FAILED, f"internal error in the local backend: {exc}", None
            )

    async def _launch(self, e: _Entry, *, first: bool) -> bool:
        """Start the process; False when the entry ended instead (and was reported)."""
        spec = e.spec
        env = self._env(e)
        missing = self._missing_command(spec.argv[0], e.workdir, env.get("PATH"))
        if missing:
            await self._finish(e, EntryState.FAILED, missing, 127)
            return False
        if first:
            await self._report(e, EntryState.PROVISIONING, handle=self._handle(e, running=False))
        if e.cancel_requested:
            await self._finish(e, EntryState.CANCELLED, "cancelled before it started", None)
            return False
        if spec.kind == "service":
            if e.port is None or not _port_free(self.host, e.port):
                if e.port is not None:
                    self._ports.discard(e.port)
                e.port = _free_port(self.host, self._ports)
                self._ports.add(e.port)
            env["PORT"] = env["SCIORCH_PORT"] = str(e.port)
        argv = [self._fill(a, e) for a in spec.argv]
        try:
            self._popen(e, argv, env)
        except OSError as exc:
            who = f" as {e.user.name} (who must reach its work dir)" if e.user else ""
            await self._finish(
                e, EntryState.FAILED, f"could not start {argv[0]}{who}: {exc}", None
            )
            return False
        if first:
            if e.started_at is None:
                e.started_at = e.spawned_at
            self._arm_walltime(e)
            if self._watcher is not None:
                self._watcher.add(e.workdir.root, e.id)
        await self._report(
            e,
            EntryState.RUNNING,
            handle=self._handle(e),
            endpoint=self._endpoint(e),
        )
        if e.cancel_requested or e.expired:
            self._terminate(e)
        return True

    def _popen(self, e: _Entry, argv: list[str], env: dict[str, str]) -> None:
        root = e.workdir.root
        with contextlib.suppress(FileNotFoundError):
            e.workdir.exit.unlink()
        with open(e.workdir.log, "ab") as logf:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script_text("job-wrapper.sh"), "sciorch-job", str(root), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,
                close_fds=True,
                **(e.user.popen_args() if e.user else {}),
            )
        e.proc = proc
        e.pid = e.pgid = proc.pid
        e.spawned_at = time.time()
        stat = _proc_stat(proc.pid)
        e.start_time = stat[2] if stat else None
        self._watch_exit(e)

    def _watch_exit(self, e: _Entry) -> None:
        """Resolve `e.exited` when the process ends: a pidfd becomes readable (no polling)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()
        e.exited = fut
        assert e.pid is not None
        try:
            fd = os.pidfd_open(e.pid)
        except ProcessLookupError:
            fut.set_result(self._reap(e))
            return
        e.pidfd = fd

        def on_exit() -> None:
            self._close_pidfd(e)
            if not fut.done():
                fut.set_result(self._reap(e))

        loop.add_reader(fd, on_exit)

    def _reap(self, e: _Entry) -> int | None:
        """The wrapper's exit status (negative: killed by that signal), None when it is not
        our child. Stray processes left in the job's group are killed first."""
        assert e.pid is not None
        if e.proc is not None:
            self._kill_group(e)  # the unreaped wrapper keeps the group id from being reused
            return e.proc.wait()
        try:
            pid, status = os.waitpid(e.pid, os.WNOHANG)
        except ChildProcessError:
            if e.cancel_requested or e.expired or e.fail_reason:
                self._kill_group(e)
            return None
        if pid == 0:  # not exited after all (cannot happen after the pidfd fired)
            return None
        return os.waitstatus_to_exitcode(status)

    def _kill_group(self, e: _Entry) -> None:
        if e.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(e.pgid, signal.SIGKILL)

    def _close_pidfd(self, e: _Entry) -> None:
        if e.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(e.pidfd)
            with contextlib.suppress(OSError):
                os.close(e.pidfd)
            e.pidfd = None

    async def _until_exit(self, e: _Entry) -> int | None:
        """Wait for the process to end; for a service, first wait for its health check."""
        fut = e.exited
        assert fut is not None
        if (
            e.spec.kind == "service"
            and not e.ready
            and not e.stopping
        ):
            health = e.spec.health or HealthSpec()
            check = asyncio.get_running_loop().create_task(self._health(e, health))
            waiters: set[asyncio.Future[Any]] = {check, fut}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not check.done():
                    check.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await check
            if check.done() and not check.cancelled() and not fut.done():
                if check.result():
                    if not (e.cancel_requested or e.expired):
                        e.ready = True
                        await self._report(e, EntryState.READY, endpoint=self._endpoint(e))
                else:
                    e.fail_reason = health_failure(health, e.workdir)
                    self._terminate(e)
        return await fut

    async def _health(self, e: _Entry, health: HealthSpec) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        url = f"http://{host}:{e.port}{health.path}"
        return await wait_healthy(url, health, (e.spawned_at or time.time()) + health.timeout_s)

    def _outcome(self, e: _Entry, status: int | None) -> _OutcomeView:
        recorded = e.workdir.read_outcome()
        if recorded is not None and recorded.exit_code is not None:
            return _OutcomeView(recorded.exit_code, recorded.signal)
        if status is None:
            return _OutcomeView(None, None)
        if status < 0:
            return _OutcomeView(128 - status, -status)
        return _OutcomeView(status, status - 128 if status > 128 else None)

    def _verdict(
        self, e: _Entry, o: Outcome | _OutcomeView
    ) -> tuple[EntryState, str | None, int | None]:
        asked = e.intent_verdict()
        if asked is not None:
            return (*asked, o.exit_code)
        state, reason = e.exit_verdict(
            o.exit_code, o.signal, "the process ended without recording an exit status"
        )
        return state, reason, o.exit_code

    # ------------------------------------------------------------------ stopping

    def _expire(self, e: _Entry) -> None:
        self._terminate(e)

    def _terminate(self, e: _Entry) -> None:
        """SIGTERM the process group; after the grace period SIGKILL what is left of the command
        (the wrapper survives to record the status), and a little later the whole group."""
        if e.pgid is None or e.exited is None or e.exited.done() or e.kill_timer is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(e.pgid, signal.SIGTERM)
        e.kill_timer = asyncio.get_running_loop().call_later(
            self.term_grace_s, self._kill_members, e
        )

    def _kill_members(self, e: _Entry) -> None:
        e.kill_timer = None
        if e.pgid is None or e.exited is None or e.exited.done():
            return
        for pid in _members(e.pgid):
            if pid != e.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        e.kill_timer = asyncio.get_running_loop().call_later(1.0, self._kill_all, e)

    def _kill_all(self, e: _Entry) -> None:
        e.kill_timer = None
        if e.pgid is not None and e.exited is not None and not e.exited.done():
            self._kill_group(e)

    async def _cancel_unknown(self, entry_id: str, handle: Mapping[str, Any]) -> None:
        """Cancel for an entry this backend does not track: stop its process if it is still
        alive (and provably the same process), and say so."""
        pid = handle.get("pid")
        if not pid:
            return
        stat = _proc_stat(int(pid))
        want = handle.get("start_time")
        if stat is None or stat[0] == "Z" or want is None or stat[2] != int(want):
            return
        pgid = int(handle.get("pgid") or pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

        asyncio.get_running_loop().call_later(self.term_grace_s, kill)
        await self._call(
            entry_id, "transition", EntryState.CANCELLED, reason="cancelled by request"
        )

    # ------------------------------------------------------------------ reporting

    def _stop_watching(self, e: _Entry) -> None:
        e.phase = _Phase.DONE
        self._detach(e)
        super()._stop_watching(e)
        self._release(e)

    # ------------------------------------------------------------------ small parts

    def _detach(self, e: _Entry) -> None:
        """Stop timers and the exit watch (not the process)."""
        for timer in (e.walltime_timer, e.kill_timer):
            if timer is not None:
                timer.cancel()
        e.walltime_timer = e.kill_timer = None
        self._close_pidfd(e)

    def _reset_process(self, e: _Entry) -> None:
        """Forget a finished run before a restart."""
        if e.kill_timer is not None:
            e.kill_timer.cancel()
            e.kill_timer = None
        self._close_pidfd(e)
        e.proc = None
        e.pid = e.pgid = e.start_time = None
        e.exited = None
        e.ready = False

    def _handle(self, e: _Entry, running: bool = True) -> dict[str, Any]:
        return {
            "pid": e.pid if running else None,
            "pgid": e.pgid if running else None,
            "start_time": e.start_time if running else None,
            "workdir": str(e.workdir.root),
            "gpus": list(e.gpus),
            "port": e.port,
            "started_at": e.started_at,
            "spawned_at": e.spawned_at if running else None,
            "restarts": e.restarts,
            **({"user": e.user.name, "uid": e.user.uid} if e.user else {}),
        }

    def _endpoint(self, e: _Entry) -> str | None:
        if e.spec.kind != "service" or e.port is None:
            return None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{e.port}"

    def _env(self, e: _Entry) -> dict[str, str]:
        env = e.user.env() if e.user else dict(os.environ)
        env.update(e.spec.env)
        env.update(e.workdir.contract_env())
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in e.gpus)
        env["SCIORCH_ENTRY_ID"] = e.id
        env["SCIORCH_EVENT_ID"] = e.spec.event_id
        env["SCIORCH_BASE_PATH"] = e.spec.base_path
        return env

    def _fill(self, arg: str, e: _Entry) -> str:
        """Placeholders only the backend knows: the port and the work dir's files."""
        if "{" not in arg:
            return arg
        wd = e.workdir
        for key, value in (
            ("port", str(e.port) if e.port is not None else None),
            ("workdir", str(wd.root)),
            ("params_file", str(wd.params)),
            ("result_file", str(wd.result)),
            ("stream_file", str(wd.stream)),
            ("output_dir", str(wd.output)),
        ):
            if value is not None:
                arg = arg.replace("{" + key + "}", value)
        return arg

    @staticmethod
    def _missing_command(cmd: str, workdir: WorkDir, path: str | None) -> str | None:
        if "/" in cmd:
            p = Path(cmd) if os.path.isabs(cmd) else workdir.root / cmd
            if p.is_file() and os.access(p, os.X_OK):
                return None
            if p.exists():
                return f"command not executable: {cmd}"
            return f"command not found: {cmd}"
        if shutil.which(cmd, path=path) is None:
            return f"command not found: {cmd}"
        return None


@dataclass(frozen=True)
class _OutcomeView:
    exit_code: int | None
    signal: int | None


__all__ = ["LocalBackend", "LocalOptions"]
