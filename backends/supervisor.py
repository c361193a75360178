"""The entry lifecycle every backend shares, written once.

A backend is a `Supervisor` over its own kind of `EntryRecord`. The supervisor owns what is the
same everywhere: the per-entry record (lock, last reported state, intent flags, restart count,
what of the log and stream was reported), reporting a transition once, finishing with a verdict
(cancelled, expired, failed with the reason and the log tail, succeeded), walltime timers,
polling a service's health check, the restart policy and the one file watcher for all work dirs.
A backend adds only what is its own: how to start, watch, stop and adopt its work, and the
native reasons its scheduler gives (a Slurm state, a pod's waiting reason).

Shell wrappers are files in backends/scripts/, loaded with `script_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from watchfiles import awatch

from backends.base import DEFAULT_MAX_RESULT_BYTES, ContractTail, WorkDir, tell
from ground.contract import (
    ArtifactChunk,
    ArtifactStat,
    HealthSpec,
    LaunchSpec,
    LogChunk,
    Reporter,
    ResultData,
)
from ground.errors import BackendError, InvalidInput
from ground.models import EntryState, format_duration

log = logging.getLogger("sciorch.backends")

TAIL_LINES = 20
TAIL_BYTES = 8192


# ----------------------------------------------------------------------------- scripts


@cache
def script_text(name: str) -> str:
    """A shell script from backends/scripts/. Its leading comment block (the why, for people
    reading the file) is dropped unless the file starts with a #! line, so a wrapper passed to
    `sh -c` carries only its code."""
    text = (resources.files("backends") / "scripts" / name).read_text()
    if text.startswith("#!"):
        return text
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def render_script(name: str, values: Mapping[str, str]) -> str:
    """A script template with its @NAME@ placeholders filled in one pass (a value is never
    scanned again, so text from a template's argv cannot fill another placeholder)."""
    return _PLACEHOLDER.sub(
        lambda m: values.get(m.group(1).lower(), m.group(0)), script_text(name)
    )


# ----------------------------------------------------------------------------- reasons


def log_tail(workdir: WorkDir, lines: int = TAIL_LINES) -> str:
    """The last lines of an entry's log (empty when there is none)."""
    try:
        with workdir.log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            raw = f.read()
    except OSError:
        return ""
    text = raw.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.split("\n")[-lines:]) if text else ""


def with_tail(reason: str, workdir: WorkDir) -> str:
    tail = log_tail(workdir)
    return f"{reason}; log tail:\n{tail}" if tail else reason


def signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def walltime_exceeded(spec: LaunchSpec) -> str:
    return f"walltime {format_duration(spec.resources.walltime_s)} exceeded"


def health_failure(
    health: HealthSpec, workdir: WorkDir, *, probe: str = "health check", at: str | None = None
) -> str:
    where = f" at {at}" if at else ""
    return with_tail(
        f"{probe} GET {health.path}{where} did not pass within {health.timeout_s:g}s", workdir
    )


def walltime_over_limit(walltime_s: int, limit_s: int | None) -> tuple[str, str] | None:
    """(field, why) when a walltime exceeds the site's maximum."""
    if limit_s is None or walltime_s <= limit_s:
        return None
    return (
        "resources.walltime_s",
        f"walltime {format_duration(walltime_s)} exceeds the site's maximum "
        f"{format_duration(limit_s)}",
    )


def restart_allowed(spec: LaunchSpec, restarts: int) -> bool:
    """Whether the template's policy allows a service's `restarts`-th restart."""
    return spec.restart_policy == "on-failure" and restarts <= spec.max_restarts


def restart_reason(what: str, restarts: int, spec: LaunchSpec) -> str:
    return f"restarting after {what} (restart {restarts}/{spec.max_restarts})"


# ----------------------------------------------------------------------------- the record


@dataclass(eq=False, kw_only=True)
class EntryRecord:
    """What a backend keeps about one entry it supervises."""

    spec: LaunchSpec
    workdir: WorkDir
    state: EntryState = EntryState.PENDING  # the last state reported (or known at adoption)
    reason: str | None = None
    started_at: float | None = None  # epoch of the first start (walltime counts from here)
    ready: bool = False
    restarts: int = 0
    # intent: why it is being stopped
    cancel_requested: bool = False
    expired: bool = False
    fail_reason: str | None = None
    # reporting
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: bool = False
    tail: ContractTail = field(default_factory=ContractTail)
    flush_pending: bool = False
    walltime_timer: asyncio.TimerHandle | None = None

    @property
    def id(self) -> str:
        return self.spec.entry_id

    @property
    def stopping(self) -> bool:
        return self.cancel_requested or self.expired or bool(self.fail_reason)

    def may_restart(self) -> bool:
        """A ready service that failed on its own may be restarted if its policy allows."""
        return (
            self.spec.kind == "service"
            and self.ready
            and not self.stopping
            and restart_allowed(self.spec, self.restarts + 1)
        )

    def intent_verdict(self) -> tuple[EntryState, str] | None:
        """The final state sciorch asked for, if it asked for one."""
        if self.cancel_requested:
            return EntryState.CANCELLED, "cancelled by request"
        if self.expired:
            return EntryState.EXPIRED, walltime_exceeded(self.spec)
        if self.fail_reason:
            return EntryState.FAILED, self.fail_reason
        return None

    def exit_verdict(
        self, code: int | None, sig: int | None, unknown: str
    ) -> tuple[EntryState, str | None]:
        """The final state from how the command ended; `unknown` when that is not known."""
        if code == 0:
            return EntryState.SUCCEEDED, None
        if sig:
            killed = f"killed by signal {signal_name(sig)}"
            return EntryState.FAILED, with_tail(killed, self.workdir)
        if code is not None:
            return EntryState.FAILED, with_tail(f"exit code {code}", self.workdir)
        return EntryState.FAILED, with_tail(unknown, self.workdir)


R = TypeVar("R", bound=EntryRecord)


# ----------------------------------------------------------------------------- health


async def wait_healthy(
    url: str, health: HealthSpec, deadline: float, stop: Callable[[], bool] = lambda: False
) -> bool:
    """GET url until it answers below 400 (True) or the deadline passes (False)."""
    timeout = httpx.Timeout(min(5.0, max(0.5, health.interval_s * 5)))
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
        while not stop():
            try:
                resp = await client.get(url)
                if resp.status_code < 400:
                    return True
            except httpx.HTTPError:
                pass
            left = deadline - time.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(health.interval_s, left))
    return False


# ----------------------------------------------------------------------------- the supervisor


class Supervisor(Generic[R]):
    """The shared half of a backend (see the module docstring). Subclasses set `kind`, keep
    their records in `self._entries` and implement the Backend protocol's entry methods."""

    kind: str = "backend"
    # Read work dirs in a thread however small the read (Slurm's are on a shared filesystem,
    # where any read may stall); otherwise only large reads go to a thread.
    reads_block: bool = False

    def __init__(self, name: str, entries_dir: Path) -> None:
        self.name = name
        self.entries_dir = Path(entries_dir)
        self._reporter: Reporter | None = None
        self._entries: dict[str, R] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def release_event(self, event_id: str) -> None:
        """Nothing is held per event (the kubernetes backend holds a namespace)."""

    # ------------------------------------------------------------------ reading work dirs

    async def read_logs(
        self, entry_id: str, handle: Mapping[str, Any], offset: int, limit: int
    ) -> LogChunk:
        wd = self._workdir(entry_id, handle)
        if self.reads_block:
            return await asyncio.to_thread(wd.read_logs, offset, limit)
        return await wd.read_logs_async(offset, limit)

    async def read_results(
        self,
        entry_id: str,
        handle: Mapping[str, Any],
        since_record: int,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> ResultData:
        wd = self._workdir(entry_id, handle)
        if self.reads_block:
            data = await asyncio.to_thread(wd.read_results, since_record, max_result_bytes)
        else:
            data = await wd.read_results_async(since_record, max_result_bytes)
        more = self._more_artifacts(entry_id, wd)
        if more:
            data.artifacts = sorted(set(data.artifacts) | set(more))
        return data

    def _more_artifacts(self, entry_id: str, wd: WorkDir) -> Collection[str]:
        """Artifacts an entry has besides the files in its work dir's output/."""
        return ()

    def _workdirs(self) -> Path:
        """Where this site keeps its entries' work dirs."""
        return self.entries_dir

    def _workdir(self, entry_id: str, handle: Mapping[str, Any]) -> WorkDir:
        """An entry's work dir: the one its handle names, else the site's place for it."""
        return WorkDir(Path(handle.get("workdir") or self._workdirs() / entry_id))

    # ------------------------------------------------------------------ artifacts

    # Served from the work dir as this server sees it: the local one, Slurm's shared directory,
    # the Kubernetes mirror (which holds artifact names only: the files stay on the volume).
    async def list_artifacts(self, entry_id: str, handle: Mapping[str, Any]) -> list[ArtifactStat]:
        return await asyncio.to_thread(self._workdir(entry_id, handle).list_artifacts)

    async def read_artifact(
        self, entry_id: str, handle: Mapping[str, Any], path: str, offset: int, limit: int
    ) -> ArtifactChunk:
        wd = self._workdir(entry_id, handle)
        return await asyncio.to_thread(wd.read_artifact, path, offset, limit)

    # ------------------------------------------------------------------ reporting

    async def _call(self, entry_id: str, method: str, *args: Any, **kw: Any) -> None:
        await tell(self._reporter, entry_id, method, *args, **kw)

    def _accept(self, r: R, state: EntryState, kw: Mapping[str, Any], force: bool) -> bool:
        """Whether this report is news (a new state, or forced: a new reason for the same)."""
        return force or state != r.state

    async def _report_locked(
        self, r: R, state: EntryState, *, force: bool = False, **kw: Any
    ) -> None:
        """Report a transition once; r.lock held. Nothing is reported after the final state."""
        if r.finished or not self._accept(r, state, kw, force):
            return
        r.state = state
        if "reason" in kw:
            r.reason = kw["reason"]
        await self._call(r.id, "transition", state, **kw)

    async def _report(self, r: R, state: EntryState, **kw: Any) -> None:
        async with r.lock:
            await self._report_locked(r, state, **kw)

    def _final_facts(self, r: R) -> dict[str, Any]:
        """What the final transition carries besides state, reason and exit code."""
        return {}

    def _stop_watching(self, r: R) -> None:
        """Before the final report: stop timers and watches of the entry (not its work)."""
        if r.walltime_timer is not None:
            r.walltime_timer.cancel()
            r.walltime_timer = None
        if self._watcher is not None:
            self._watcher.remove(r.workdir.root)

    async def _finish(
        self, r: R, state: EntryState, reason: str | None, exit_code: int | None
    ) -> None:
        """Report the final state after a last flush of log and stream, and forget the entry."""
        if r.finished:
            return
        self._stop_watching(r)
        async with r.lock:
            if r.finished:
                return
            try:
                await self._flush_locked(r)
            except Exception:
                log.exception("entry %s: final flush failed", r.id)
            await self._finished_locked(r, state, reason, exit_code)

    async def _finished_locked(
        self, r: R, state: EntryState, reason: str | None, exit_code: int | None
    ) -> None:
        r.finished = True
        r.state = state
        await self._call(
            r.id, "transition", state, reason=reason, exit_code=exit_code, **self._final_facts(r)
        )
        if self._entries.get(r.id) is r:
            del self._entries[r.id]

    # ------------------------------------------------------------------ log and stream

    _watcher: DirWatcher | None = None

    async def _flush_locked(self, r: R) -> None:
        await r.tail.report(self._reporter, r.id, r.workdir)

    def _request_flush(self, entry_id: str) -> None:
        """The watcher saw a change in an entry's directory (or swept it)."""
        r = self._entries.get(entry_id)
        if r is None or r.finished or r.flush_pending or self._closed:
            return
        r.flush_pending = True
        self._spawn(self._flush(r))

    async def _flush(self, r: R) -> None:
        async with r.lock:
            r.flush_pending = False
            if not r.finished:
                await self._flush_locked(r)

    # ------------------------------------------------------------------ walltime

    def _arm_walltime(self, r: R) -> None:
        if r.walltime_timer is not None or r.started_at is None:
            return
        left = r.started_at + r.spec.resources.walltime_s - time.time()
        r.walltime_timer = asyncio.get_running_loop().call_later(
            max(0.0, left), self._walltime_reached, r
        )

    def _walltime_reached(self, r: R) -> None:
        r.walltime_timer = None
        if r.finished or r.cancel_requested:
            return
        r.expired = True
        self._expire(r)

    def _expire(self, r: R) -> None:
        """Stop an entry whose walltime is over; its verdict will say `expired`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ small parts

    def _is_new(self, spec: LaunchSpec, never_fits: tuple[str, str] | None = None) -> bool:
        """The checks of submit() every backend makes: started, not submitted before (False),
        fits the site (`never_fits`: (field, why) when it cannot), has a command."""
        self._require_started()
        if spec.entry_id in self._entries:
            log.info("entry %s submitted twice; ignoring the second", spec.entry_id)
            return False
        if never_fits is not None:
            raise InvalidInput(f"site {self.name!r}: {never_fits[1]}", field=never_fits[0])
        if not spec.argv:
            raise InvalidInput("the command is empty", field="argv")
        return True

    def _adoptable(self, entry_id: str, state: EntryState) -> bool:
        """Whether adopt() has anything to do: started, not tracked yet, not final."""
        self._require_started()
        return entry_id not in self._entries and not state.terminal

    def _require_started(self) -> None:
        if self._reporter is None or self._closed:
            raise BackendError(f"{self.kind} backend {self.name!r} is not started")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine in the background; close() cancels what is left."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)


# ----------------------------------------------------------------------------- file watching


class DirWatcher:
    """One `watchfiles.awatch` over the work dirs of all running entries, so a thousand entries
    cost one watcher thread, not a thousand. The watch restarts when the set of dirs changes;
    after each restart every watched entry is swept once, so nothing written in between is
    missed."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._dirs: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, path: Path, entry_id: str) -> None:
        self._dirs[str(path)] = entry_id
        self._changed()

    def remove(self, path: Path) -> None:
        if self._dirs.pop(str(path), None) is not None:
            self._changed()

    def _changed(self) -> None:
        if self._closed:
            return
        self._wake.set()
        if self._stop is not None:
            self._stop.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def _existing(self) -> dict[str, str]:
        return {p: eid for p, eid in self._dirs.items() if os.path.isdir(p)}

    async def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            dirs = self._existing()
            if not dirs:
                await self._wake.wait()
                continue
            stop = self._stop = asyncio.Event()
            for eid in set(dirs.values()):
                self._on_change(eid)
            try:
                async for changes in awatch(
                    *dirs,
                    stop_event=stop,
                    watch_filter=None,
                    debounce=20,
                    step=10,
                    recursive=False,
                    ignore_permission_denied=True,
                ):
                    seen = {dirs.get(os.path.dirname(path)) for _, path in changes}
                    for changed in seen:
                        if changed is not None:
                            self._on_change(changed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dir vanished under us, or the watcher failed
                log.debug("file watcher restarting after: %s", exc)
                await asyncio.sleep(0.05)


__all__ = [
    "DirWatcher",
    "EntryRecord",
    "Supervisor",
    "health_failure",
    "log_tail",
    "render_script",
    "restart_allowed",
    "restart_reason",
    "script_text",
    "signal_name",
    "wait_healthy",
    "walltime_exceeded",
    "walltime_over_limit",
    "with_tail",
]
