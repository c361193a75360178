"""The Slurm backend: entries run as batch jobs on a Slurm cluster.

Each entry becomes one batch job whose script wraps the command the way the local backend's
wrapper does: the job contract's files live in `<shared_dir>/<entry id>/` (a directory the
compute nodes share with this server), the command's output goes to `log`, and the wrapper
writes `started.json` (node, port, time) when it starts and `exit.json` when the command ends. The
wrapper also enforces the entry's walltime to the second (`timeout`), where Slurm only counts
whole minutes.

Completion is pushed, not polled with back-off: the backend watches the job directories (an
`exit.json` appearing means the job is ending) and, where compute nodes cannot deliver file
events to this host, the wrapper pokes an HTTP listener of the backend (`callback_listen`).
Either push makes the backend ask Slurm at once, every 50 ms until Slurm records the end; the
state reported is always Slurm's. Polling is the bounded fallback: one squeue for all active jobs
every `poll_interval_s` (slurmrestd v0.0.38 cannot filter its job list, so there it is one small
request per active job, at most `max_job_queries_per_s`), which also catches jobs Slurm ends on
its own (node failures, time limits, a scancel that left no exit.json) and follows pending
reasons, reported as the entry's `reason` ("Slurm: Resources (...)").

After a server restart `adopt` re-attaches by the Slurm job id in the handle; Slurm's answer (or,
for a job slurmctld has forgotten after MinJobAge, accounting and then exit.json) gives the true
state. While Slurm cannot be reached nothing is lost: entries keep their state, the site says
why it is down, and polling backs off (at most MAX_BACKOFF_S) until Slurm answers again.

Slurm is reached through a `SlurmTransport` (backends.slurm_transport): slurmrestd over HTTP
with a JWT (`transport = "rest"`, the main path: backends.slurm_rest) or the Slurm commands
(`transport = "cli"`: backends.slurm_cli).
There is no pyslurm transport: no pyslurm that matches Slurm 22.05 can be installed here to test
it against (see the project's Slurm notes).

An entry with an account (`[sites.accounts]`) is submitted as that user (slurmrestd: the
user's own token; the commands: sbatch --uid, or runuser), cancelled as it, and its work dir is
the user's (0700); its association's limits and usage are read for list_sites
(backends.slurm_accounts).

Beside this module: the options, batch script and job request (backends.slurm_job), what
Slurm's states and pending reasons mean (backends.slurm_states), the site's cached view for
status, capabilities and wait estimates (backends.slurm_site) and the poke listener
(backends.slurm_callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import pwd
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import (
    HealthSpec,
    LaunchSpec,
    Reporter,
    WorkDir,
    site_options,
)
from backends.posix_users import PosixUser, give_workdir, run_as
from backends.slurm_accounts import association
from backends.slurm_callback import CallbackListener
from backends.slurm_cli import CliTransport
from backends.slurm_job import SlurmOptions, array_request, build_script, env_file, job_request
from backends.slurm_rest import RestTransport
from backends.slurm_site import SlurmSite
from backends.slurm_states import (
    ACTIVE_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    describe_pending,
    job_verdict,
)
from backends.slurm_transport import (
    JobInfo,
    SlurmAuthError,
    SlurmError,
    SlurmRejected,
    SlurmTransport,
)
from backends.supervisor import (
    DirWatcher,
    EntryRecord,
    Supervisor,
    health_failure,
    restart_reason,
    wait_healthy,
)
from ground.errors import BackendError, InvalidInput, NotSupported, SciorchError
from ground.models import (
    AccountUsage,
    Capabilities,
    EntryState,
    Resources,
    SiteStatus,
)

log = logging.getLogger("sciorch.backends.slurm")

HOT_INTERVAL_S = 0.05  # how often Slurm is asked while a job is known to be ending
HOT_FOR_S = 10.0  # ... for at most this long after the push
MAX_BACKOFF_S = 5.0  # polling interval ceiling while Slurm cannot be reached
MISSING_POLLS = 3  # a job Slurm does not list this many polls in a row is looked up once more
NO_START_FILE_S = 20.0  # running in Slurm without started.json for this long: say so

@dataclass(eq=False, kw_only=True)
class _Job(EntryRecord):
    job_id: str | None = None
    node: str | None = None
    endpoint: str | None = None
    cancel_sent: bool = False
    missing: int = 0
    running_seen_at: float | None = None
    hot_until: float = 0.0
    health_task: asyncio.Task[None] | None = None
    user: PosixUser | None = None  # the account it is submitted as (None: the site's user)

    @property
    def slurm_user(self) -> str | None:
        return self.user.name if self.user else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _started_file(j: _Job) -> dict[str, Any] | None:
    """started.json if the wrapper of the entry's current Slurm job wrote it (a restarted
    service's directory still holds the previous job's until the new wrapper starts)."""
    started = _read_json(j.workdir.root / "started.json")
    if started is None or str(started.get("job_id") or "") not in ("", j.job_id):
        return None
    return started


# ----------------------------------------------------------------------------- the backend


class SlurmBackend(Supervisor[_Job]):
    """Runs entries as Slurm batch jobs. See the module docstring."""

    kind = "slurm"
    reads_block = True

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        entries_dir: Path,
        *,
        transport: SlurmTransport | None = None,
    ) -> None:
        opts = site_options(SlurmOptions, name, options)
        super().__init__(name, entries_dir)
        self.options = opts
        self.shared_dir = Path(opts.shared_dir or entries_dir).expanduser()
        self.job_user = opts.user or getpass.getuser()
        if opts.transport == "cli":
            self.job_user = getpass.getuser()
        self._cmd_env = dict(os.environ)
        if opts.slurm_conf:
            self._cmd_env["SLURM_CONF"] = opts.slurm_conf
        self.transport: SlurmTransport = transport or self._make_transport()
        self.site = SlurmSite(
            name,
            self.transport,
            partition=opts.partition,
            status_ttl_s=opts.status_ttl_s,
            queue_ttl_s=opts.queue_ttl_s,
            rest_url=opts.rest_url,
        )
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._callback = CallbackListener(name, self._on_callback)
        self._callback_env: dict[str, str] = {}
        self._poll_failures = 0
        self._poll_error: str | None = None
        self._next_full_poll = 0.0

    def _make_transport(self) -> SlurmTransport:
        o = self.options
        if o.transport == "cli":
            return CliTransport(env=self._cmd_env, timeout_s=max(30.0, o.request_timeout_s))
        return RestTransport(
            o.rest_url,
            self.job_user,
            token=o.token,
            token_lifespan_s=o.token_lifespan_s,
            timeout_s=o.request_timeout_s,
            env=self._cmd_env,
        )

    # ------------------------------------------------------------------ protocol: lifecycle

    async def start(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self._closed = self.site.closed = False
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        if self.options.watch:
            self._watcher = DirWatcher(self._request_flush)
        if self.options.callback_listen:
            self._callback_env = await self._callback.start(
                self.options.callback_listen, self.options.callback_url
            )
        self._poller = asyncio.get_running_loop().create_task(
            self._poll_loop(), name=f"sciorch-slurm-{self.name}"
        )
        # Nothing is asked of Slurm yet: site facts are fetched when first needed, so a server
        # (or a CLI command) starts at once even when the cluster is unreachable.

    async def close(self) -> None:
        """Stop watching and polling; Slurm jobs keep running (a restarted server adopts them)."""
        self._closed = True
        self._wake.set()
        tasks: list[asyncio.Task[Any]] = [*self._bg]
        for j in self._entries.values():
            if j.health_task is not None:
                tasks.append(j.health_task)
        if self._poller is not None:
            tasks.append(self._poller)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poller = None
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None
        await self._callback.close()
        self._entries.clear()
        await self.site.aclose()
        await self.transport.aclose()

    async def shutdown_all(self, timeout_s: float = 15.0) -> None:
        """Cancel every job this backend tracks, wait (bounded) for Slurm to end them, close.
        For tests and for an operator who wants nothing left behind."""
        jobs = [j for j in self._entries.values() if not j.finished]
        for j in jobs:
            j.cancel_requested = True
            if j.job_id:
                with contextlib.suppress(SlurmError):
                    await self.transport.cancel(j.job_id, j.slurm_user)
                    j.cancel_sent = True
            j.hot_until = time.time() + HOT_FOR_S
        self._wake.set()
        deadline = time.time() + timeout_s
        while any(not j.finished for j in jobs) and time.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.close()

    # ------------------------------------------------------------------ protocol: site facts

    async def capabilities(self) -> Capabilities:
        return await self.site.capabilities()

    async def status(self) -> tuple[SiteStatus, str | None]:
        return await self.site.status(self._poll_error)

    async def estimate_wait(self, resources: Resources) -> float:
        return await self.site.estimate_wait(resources)

    async def account_usage(self, account: str) -> AccountUsage | None:
        """The account's association: its limits, usage and fairshare (list_sites)."""
        return await association(account, self.options.account, self._cmd_env)

    # ------------------------------------------------------------------ protocol: entries

    async def submit(self, spec: LaunchSpec) -> None:
        if not self._is_new(spec):
            return
        user = self._user_for(spec)
        wd = WorkDir(self.shared_dir / spec.entry_id)
        await asyncio.to_thread(self._prepare_dir, wd, spec, user)
        j = _Job(spec=spec, workdir=wd, user=user)
        self._entries[spec.entry_id] = j
        try:
            await self._submit_job(j)
        except BaseException:
            self._entries.pop(spec.entry_id, None)
            raise
        self._track(j)
        if j.cancel_requested and j.job_id:  # cancelled while it was being queued
            with contextlib.suppress(SlurmError):
                await self.transport.cancel(j.job_id, j.slurm_user)
                j.cancel_sent = True

    async def cancel(self, entry_id: str, handle: Mapping[str, Any]) -> None:
        j = self._entries.get(entry_id)
        job_id = j.job_id if j is not None else handle.get("job_id")
        if j is not None:
            if j.finished or j.cancel_requested:
                return
            j.cancel_requested = True
            j.hot_until = time.time() + HOT_FOR_S
        if not job_id:
            return  # being queued right now: cancelled as soon as Slurm gives its id
        try:
            user = j.slurm_user if j is not None else handle.get("user")
            await self.transport.cancel(str(job_id), user)
            if j is not None:
                j.cancel_sent = True
        except SlurmError as exc:
            # The poller retries while the entry is active; the caller learns why it lingers.
            log.warning("cancelling Slurm job %s of %s failed: %s", job_id, entry_id, exc)
            if j is None:
                raise BackendError(f"could not cancel Slurm job {job_id}: {exc.message}") from exc
        if j is None:
            # Not tracked here (not adopted): the final state is recorded now.
            await self._call(
                entry_id, "transition", EntryState.CANCELLED, reason="cancelled by request"
            )
        self._wake.set()

    async def adopt(
        self, entry_id: str, state: EntryState, handle: Mapping[str, Any], spec: LaunchSpec
    ) -> None:
        if not self._adoptable(entry_id, state):
            return
        wd = WorkDir(Path(handle.get("workdir") or self.shared_dir / entry_id))
        j = _Job(spec=spec, workdir=wd, state=state, user=self._user_for(spec))
        j.job_id = str(handle["job_id"]) if handle.get("job_id") else None
        j.node = handle.get("node")
        started = handle.get("started_at")
        j.started_at = float(started) if started else None
        j.restarts = int(handle.get("restarts") or 0)
        j.ready = state == EntryState.READY
        j.endpoint = handle.get("endpoint")
        self._entries[entry_id] = j
        if j.job_id is None:
            if state == EntryState.PENDING:
                # Recorded but never queued (the server stopped in between): queue it now.
                try:
                    if not wd.params.exists():
                        await asyncio.to_thread(self._prepare_dir, wd, spec, j.user)
                    await self._submit_job(j)
                except SciorchError as exc:
                    await self._finish(
                        j, EntryState.FAILED, f"could not queue after restart: {exc.message}", None
                    )
                    return
            else:
                await self._finish(
                    j, EntryState.FAILED, "no Slurm job recorded for this entry; state unknown",
                    None,
                )
                return
        # What is already written counts as reported; only growth from now on is reported.
        j.tail.skip_existing(wd)
        if j.state == EntryState.RUNNING and spec.kind == "service" and not j.ready:
            started_file = _started_file(j)
            if started_file is not None:
                j.endpoint = j.endpoint or self._endpoint_of(started_file)
                self._start_health(j)
        self._track(j)

    async def submit_array(self, specs: list[LaunchSpec], throttle: int | None) -> None:
        """A sweep's elements as one Slurm job array (`--array=0-N%throttle`): each element
        keeps its own entry directory, job.sh and log; element i is '<array id>_<i>'."""
        specs = [s for s in specs if self._is_new(s)]
        if not specs:
            return
        if len({s.account for s in specs}) > 1:  # one array is one Slurm user's
            for s in specs:
                await self.submit(s)
            return
        sweep_id = specs[0].sweep_id or specs[0].entry_id
        sweep_dir = self.shared_dir / f"sweep-{sweep_id}"
        user = self._user_for(specs[0])
        jobs = [
            _Job(spec=s, workdir=WorkDir(self.shared_dir / s.entry_id), user=user) for s in specs
        ]
        reqs = [job_request(j.spec, j.workdir, self.options, self._callback_env) for j in jobs]
        if user is not None:  # the array runs as the sweep's account, as its entries would
            ident = user.identity()
            reqs = [dataclasses.replace(r, user=user.name, env={**r.env, **ident}) for r in reqs]
        await asyncio.to_thread(self._prepare_array, sweep_dir, jobs, reqs)
        for j in jobs:
            self._entries[j.id] = j
        try:
            array_id = await self._queue(
                array_request(reqs, sweep_id, sweep_dir, throttle), jobs[0].spec
            )
        except BaseException:
            for j in jobs:
                self._entries.pop(j.id, None)
            raise
        for i, j in enumerate(jobs):
            j.job_id = f"{array_id}_{i}"
            await self._report(
                j,
                j.state,
                force=True,
                reason=f"queued as element {i} of Slurm job array {array_id}",
                handle=self._handle(j),
            )
            self._track(j)

    def _prepare_array(self, sweep_dir: Path, jobs: list[_Job], reqs: list[Any]) -> None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for j, req in zip(jobs, reqs, strict=True):
            (j.workdir.root).mkdir(parents=True, exist_ok=True)
            (j.workdir.root / "env.sh").write_text(env_file(req.env))
            self._prepare_dir(j.workdir, j.spec, j.user)
        (sweep_dir / "elements").write_text("".join(f"{j.workdir.root}\n" for j in jobs))
        user = jobs[0].user
        if user is not None:  # the array's own output goes here, written as its user
            give_workdir(sweep_dir, user)
        elif os.geteuid() == 0 and self.job_user != "root":
            try:
                pw = pwd.getpwnam(self.job_user)
            except KeyError:
                return
            os.chown(sweep_dir, pw.pw_uid, pw.pw_gid)

    async def extend(self, entry_id: str, handle: Mapping[str, Any], walltime_s: int) -> None:
        """A new time limit for the entry's Slurm job (Slurm lets root or SlurmUser do it)."""
        j = self._entries.get(entry_id)
        job_id = (j.job_id if j is not None else None) or handle.get("job_id")
        if not job_id:
            raise NotSupported(f"entry {entry_id} has no Slurm job yet", field="entry_id")
        try:
            await self.transport.set_time_limit(str(job_id), max(1, -(-walltime_s // 60)))
        except (SlurmRejected, SlurmAuthError) as exc:
            raise NotSupported(
                f"site {self.name!r}: Slurm refused the new time limit: {exc.message} "
                "(only root or SlurmUser may raise a job's limit)",
                field="walltime_seconds",
            ) from exc
        except SlurmError as exc:
            raise BackendError(f"site {self.name!r}: {exc.message}") from exc

    # ------------------------------------------------------------------ submitting

    def _user_for(self, spec: LaunchSpec) -> PosixUser | None:
        """Whom the entry's job is submitted as: its account's user (sciorch must be root, to
        get that user's token or use sbatch --uid, and to give it the work dir), or None for
        the site's own user."""
        if spec.account is None or spec.account == self.job_user:
            return None
        return run_as(self.name, spec.account)

    def _prepare_dir(self, wd: WorkDir, spec: LaunchSpec, user: PosixUser | None = None) -> None:
        """The job contract's files, and the batch script as job.sh (to read or rerun by hand);
        an entry with an account gets a work dir that is its user's alone."""
        wd.prepare(spec.parameters, spec.inputs)
        (wd.root / "job.sh").write_text(build_script(spec, wd))
        if user is not None:
            give_workdir(wd.root, user)
        elif os.geteuid() == 0 and self.job_user != "root":
            try:
                pw = pwd.getpwnam(self.job_user)
            except KeyError:
                return
            staged = [wd.inputs, *wd.inputs.rglob("*")] if wd.inputs.exists() else []
            for path in (wd.root, wd.output, wd.params, wd.root / "job.sh", *staged):
                os.chown(path, pw.pw_uid, pw.pw_gid)

    async def _submit_job(self, j: _Job) -> None:
        """Queue the entry's job and record its id in the handle before returning."""
        req = job_request(j.spec, j.workdir, self.options, self._callback_env)
        if j.user is not None:
            env = {**req.env, **j.user.identity()}
            req = dataclasses.replace(req, user=j.user.name, env=env)
        job_id = await self._queue(req, j.spec)
        j.job_id = job_id
        j.missing = 0
        await self._report(
            j,
            j.state,
            force=True,
            reason=f"queued as Slurm job {job_id}"
            + (f" (restart {j.restarts})" if j.restarts else ""),
            handle=self._handle(j),
        )

    async def _queue(self, req: Any, spec: LaunchSpec) -> str:
        """Submit; Slurm's refusal becomes a typed error naming the resources."""
        try:
            return await self.transport.submit(req)
        except SlurmRejected as exc:
            raise InvalidInput(
                f"site {self.name!r}: Slurm rejected the job: {exc.message}"
                f"{self.site.rejection_hint(spec.resources, exc.message)}",
                field="resources",
            ) from exc
        except SlurmError as exc:
            raise BackendError(
                f"site {self.name!r}: could not submit to Slurm: {exc.message}"
            ) from exc

    def _track(self, j: _Job) -> None:
        if self._watcher is not None:
            self._watcher.add(j.workdir.root, j.id)
        self._wake.set()

    # ------------------------------------------------------------------ push: files, callbacks

    async def _flush(self, j: _Job) -> None:
        """The watcher saw a change in the job's directory (or swept it), or a callback came."""
        async with j.lock:
            j.flush_pending = False
            if j.finished:
                return
            if j.state in (EntryState.PENDING, EntryState.PROVISIONING):
                started = _started_file(j)
                if started is not None:
                    await self._started_locked(j, started)
            await self._flush_locked(j)  # after 'running': no record is announced before it
        if j.workdir.exit.exists():
            self._poke(j)

    def _poke(self, j: _Job) -> None:
        """The job is ending: ask Slurm now, and keep asking quickly until it has recorded it."""
        j.hot_until = time.time() + HOT_FOR_S
        self._wake.set()

    def _on_callback(self, entry_id: str, what: str) -> None:
        j = self._entries.get(entry_id)
        if j is None or j.finished:
            return
        if what == "started":
            self._request_flush(entry_id)
        self._poke(j)

    # ------------------------------------------------------------------ polling

    async def _poll_loop(self) -> None:
        """Every poll_interval_s one request about all active jobs; in between, every 50 ms one
        about the jobs a push said are ending (until Slurm has recorded their end)."""
        while not self._closed:
            wait = self._next_wait()
            try:
                if wait is None:
                    await self._wake.wait()
                elif wait > 0:
                    await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._closed:
                return
            now = time.time()
            active = [j for j in self._entries.values() if not j.finished and j.job_id]
            if now >= self._next_full_poll:
                jobs = active
                self._next_full_poll = now + self._poll_interval()
            else:
                jobs = [j for j in active if j.hot_until > now]
            try:
                await self._poll_once(jobs)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("slurm site %s: poll failed", self.name)

    def _poll_interval(self) -> float:
        base = self.options.poll_interval_s
        if not self.transport.batch_queries:
            # One request per active job (slurmrestd): cap the load on slurmctld.
            active = sum(1 for j in self._entries.values() if not j.finished and j.job_id)
            base = max(base, active / self.options.max_job_queries_per_s)
        if self._poll_failures:
            return float(min(max(base, MAX_BACKOFF_S), base * 2 ** min(self._poll_failures, 6)))
        return base

    def _next_wait(self) -> float | None:
        active = [j for j in self._entries.values() if not j.finished and j.job_id]
        if not active:
            return None
        now = time.time()
        wait = self._next_full_poll - now
        if self._poll_failures == 0 and any(j.hot_until > now for j in active):
            wait = min(wait, HOT_INTERVAL_S)
        return max(0.0, wait)

    async def _poll_once(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        ids = sorted({j.job_id for j in jobs if j.job_id})
        try:
            infos = await self.transport.jobs(ids)
        except SlurmError as exc:
            self._poll_failures += 1
            self._poll_error = f"cannot follow jobs: {exc.message}"
            self._next_full_poll = time.time() + self._poll_interval()
            if self._poll_failures in (1, 10) or self._poll_failures % 100 == 0:
                log.warning("slurm site %s: %s (attempt %d)", self.name, exc, self._poll_failures)
            return
        if self._poll_failures:
            log.info("slurm site %s: reachable again", self.name)
            self._next_full_poll = 0.0
        self._poll_failures = 0
        self._poll_error = None
        by_id = {i.job_id: i for i in infos}
        for j in jobs:
            try:
                await self._apply(j, by_id.get(j.job_id or ""))
            except SlurmError as exc:
                log.warning("slurm site %s: entry %s: %s", self.name, j.id, exc)
            if j.cancel_requested and not j.cancel_sent and not j.finished and j.job_id:
                with contextlib.suppress(SlurmError):
                    await self.transport.cancel(j.job_id, j.slurm_user)
                    j.cancel_sent = True

    async def _apply(self, j: _Job, info: JobInfo | None) -> None:
        if info is None:
            j.missing += 1
            if j.missing < MISSING_POLLS:
                return
            assert j.job_id is not None
            info = await self.transport.job_detail(j.job_id)
            if info is None:
                async with j.lock:
                    outcome = _read_json(j.workdir.exit)
                if outcome is None and j.cancel_sent:
                    # Cancelled while it waited (a pending array element leaves no record).
                    await self._finish(j, EntryState.CANCELLED, "cancelled before it started", None)
                    return
                if outcome is not None:
                    info = JobInfo(job_id=j.job_id, state="COMPLETED" if outcome.get(
                        "exit_code") == 0 else "FAILED")
                else:
                    await self._finish(
                        j,
                        EntryState.FAILED,
                        f"Slurm no longer knows job {j.job_id} (older than MinJobAge, or "
                        "slurmctld lost its state) and it left no exit status",
                        None,
                    )
                    return
        j.missing = 0
        state = info.state
        if state in TERMINAL_STATES:
            await self._terminal(j, info)
            return
        async with j.lock:
            if j.finished:
                return
            if info.start_time and state not in PENDING_STATES:
                j.started_at = info.start_time
            j.node = info.node or j.node
            if state in PENDING_STATES:
                if j.state in (EntryState.RUNNING, EntryState.READY):
                    await self._report_locked(
                        j, EntryState.PROVISIONING, reason="requeued by Slurm",
                        handle=self._handle(j),
                    )
                    j.ready = False
                    j.running_seen_at = None
                reason = describe_pending(info.reason)
                if j.state != EntryState.PENDING or reason != j.reason:
                    await self._report_locked(j, EntryState.PENDING, reason=reason, force=True)
                return
            if state == "CONFIGURING":
                if j.state == EntryState.PENDING:
                    await self._report_locked(
                        j, EntryState.PROVISIONING, reason="Slurm: nodes are being configured",
                        handle=self._handle(j),
                    )
                return
            if state in ACTIVE_STATES:
                if state == "COMPLETING":
                    j.hot_until = max(j.hot_until, time.time() + HOT_FOR_S)
                if j.state in (EntryState.PENDING, EntryState.PROVISIONING):
                    started = _started_file(j)
                    if j.running_seen_at is None:
                        j.running_seen_at = time.time()
                    if started is not None:
                        await self._started_locked(j, started)
                    elif j.state == EntryState.PENDING:
                        await self._report_locked(
                            j,
                            EntryState.PROVISIONING,
                            reason=f"Slurm started the job on {info.node or '?'}",
                            handle=self._handle(j),
                        )
                    elif time.time() - j.running_seen_at > NO_START_FILE_S:
                        await self._report_locked(
                            j,
                            EntryState.RUNNING,
                            reason=f"running on {info.node or '?'}, but its files do not show in "
                            f"{j.workdir.root}: is shared_dir shared with the compute nodes?",
                            handle=self._handle(j),
                        )
                await self._flush_locked(j)  # after 'running': no record is announced before it
                return
            log.info("slurm site %s: job %s in state %s", self.name, j.job_id, state)

    async def _started_locked(self, j: _Job, started: Mapping[str, Any]) -> None:
        """The wrapper is running: RUNNING (with the endpoint for a service)."""
        j.node = str(started.get("host") or j.node or "") or None
        if started.get("started_at") and j.started_at is None:
            with contextlib.suppress(TypeError, ValueError):
                j.started_at = float(started["started_at"])
        if j.spec.kind == "service":
            j.endpoint = self._endpoint_of(started)
        await self._report_locked(
            j,
            EntryState.RUNNING,
            reason=f"running on {j.node}" if j.node else None,
            handle=self._handle(j),
            endpoint=j.endpoint,
        )
        if j.spec.kind == "service" and j.endpoint and not j.ready:
            self._start_health(j)

    @staticmethod
    def _endpoint_of(started: Mapping[str, Any]) -> str | None:
        host, port = started.get("host"), started.get("port")
        if not host or not port:
            return None
        return f"http://{host}:{int(port)}"

    async def _terminal(self, j: _Job, info: JobInfo) -> None:
        """Slurm has recorded the end: report the final state (or restart a service)."""
        if j.finished:
            return
        outcome = _read_json(j.workdir.exit)
        if outcome is not None and _started_file(j) is None:
            outcome = None  # left by an earlier job of a restarted service
        code: int | None = None
        sig: int | None = None
        expired = False
        if outcome is not None:
            code = _opt_int(outcome.get("exit_code"))
            sig = _opt_int(outcome.get("signal"))
            expired = bool(outcome.get("expired"))
        elif info.exit_code is not None:
            code, sig = info.exit_code, info.signal
        elif info.state not in ("COMPLETED", "CANCELLED") and j.job_id:
            with contextlib.suppress(SlurmError):
                detail = await self.transport.job_detail(j.job_id)
                if detail is not None:
                    code, sig = detail.exit_code, detail.signal
        if info.state == "COMPLETED" and code is None:
            code = 0
        state, reason = job_verdict(j, j.node, info, code, sig, expired)
        if state == EntryState.FAILED and j.may_restart():
            await self._restart(j, reason or "it failed")
            return
        await self._finish(j, state, reason, code)

    async def _restart(self, j: _Job, why: str) -> None:
        j.restarts += 1
        j.ready = False
        j.endpoint = None
        j.started_at = None
        j.running_seen_at = None
        if j.health_task is not None:
            j.health_task.cancel()
            j.health_task = None
        first_line = why.split(";")[0]
        async with j.lock:
            await self._report_locked(
                j,
                EntryState.PROVISIONING,
                reason=restart_reason(first_line, j.restarts, j.spec),
                restarts=j.restarts,
                handle={**self._handle(j), "job_id": None},
            )
        j.job_id = None
        try:
            await self._submit_job(j)
        except SciorchError as exc:
            await self._finish(j, EntryState.FAILED, f"restart failed: {exc.message}", None)

    # ------------------------------------------------------------------ services

    def _start_health(self, j: _Job) -> None:
        if j.health_task is not None or j.finished:
            return
        j.health_task = asyncio.get_running_loop().create_task(self._health(j))

    async def _health(self, j: _Job) -> None:
        health = j.spec.health or HealthSpec()
        url = f"{j.endpoint}{health.path}"
        deadline = (j.started_at or time.time()) + health.timeout_s
        deadline = max(deadline, time.time() + min(5.0, health.timeout_s))
        if await wait_healthy(url, health, deadline, stop=lambda: j.finished):
            async with j.lock:
                if j.finished or j.cancel_requested:
                    return
                j.ready = True
                await self._report_locked(
                    j, EntryState.READY, endpoint=j.endpoint, handle=self._handle(j)
                )
            return
        if j.finished:
            return
        j.fail_reason = health_failure(health, j.workdir, at=j.endpoint)
        if j.job_id:
            with contextlib.suppress(SlurmError):
                await self.transport.cancel(j.job_id, j.slurm_user)
        j.hot_until = time.time() + HOT_FOR_S
        self._wake.set()

    # ------------------------------------------------------------------ reporting

    def _handle(self, j: _Job) -> dict[str, Any]:
        return {
            "job_id": j.job_id,
            "workdir": str(j.workdir.root),
            "transport": self.transport.name,
            "node": j.node,
            "started_at": j.started_at,
            "endpoint": j.endpoint,
            "restarts": j.restarts,
            **({"user": j.user.name} if j.user else {}),
        }

    def _final_facts(self, j: _Job) -> dict[str, Any]:
        return {"handle": self._handle(j)}

    def _stop_watching(self, j: _Job) -> None:
        if j.health_task is not None and j.health_task is not asyncio.current_task():
            j.health_task.cancel()
        super()._stop_watching(j)

    # ------------------------------------------------------------------ small parts

    def _workdirs(self) -> Path:
        return self.shared_dir


def _opt_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


__all__ = ["SlurmBackend", "SlurmOptions", "build_script"]
