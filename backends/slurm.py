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
with a JWT (`transport = "rest"`, the main path) or the Slurm commands (`transport = "cli"`).
There is no pyslurm transport: no pyslurm that matches Slurm 22.05 can be installed here to test
it against (see the project's Slurm notes).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import math
import os
import pwd
import shlex
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from backends.base import (
    HealthSpec,
    LaunchSpec,
    LogChunk,
    Reporter,
    ResultData,
    WorkDir,
    site_options,
)
from backends.slurm_transport import (
    CliTransport,
    JobInfo,
    JobRequest,
    NodeInfo,
    PartitionInfo,
    RestTransport,
    SlurmAuthError,
    SlurmError,
    SlurmRejected,
    SlurmTransport,
    SlurmUnavailable,
)
from backends.supervisor import (
    DirWatcher,
    EntryRecord,
    Supervisor,
    health_failure,
    render_script,
    restart_reason,
    wait_healthy,
    walltime_exceeded,
    with_tail,
)
from orchestrator.errors import BackendError, InvalidInput, SciorchError
from orchestrator.models import (
    Capabilities,
    EntryState,
    Resources,
    SiteStatus,
    format_duration,
)

log = logging.getLogger("sciorch.backends.slurm")

HOT_INTERVAL_S = 0.05  # how often Slurm is asked while a job is known to be ending
HOT_FOR_S = 10.0  # ... for at most this long after the push
MAX_BACKOFF_S = 5.0  # polling interval ceiling while Slurm cannot be reached
MISSING_POLLS = 3  # a job Slurm does not list this many polls in a row is looked up once more
NO_START_FILE_S = 20.0  # running in Slurm without started.json for this long: say so

_PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_ACTIVE_STATES = {
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}
_TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}

# What the common pending reasons mean, for the entry's `reason`.
PENDING_REASONS = {
    "Resources": "waiting for CPUs, memory or GPUs to become free",
    "Priority": "jobs with a higher priority are ahead of it in the queue",
    "Dependency": "waiting for a job it depends on",
    "BeginTime": "its start time has not been reached",
    "JobHeldUser": "held by its user",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "a node it needs is not available (down, drained or reserved)",
    "Reservation": "waiting for its reservation to start",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionTimeLimit": "its time limit exceeds the partition's limit",
    "PartitionNodeLimit": "it needs more nodes than the partition allows",
    "Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions": (
        "the nodes it needs are down, drained or reserved"
    ),
    "QOSMaxJobsPerUserLimit": "QoS limit: the user already runs the most jobs the QoS allows",
    "QOSMaxCpuPerUserLimit": "QoS limit: the user already uses the most CPUs the QoS allows",
    "QOSMaxGRESPerUser": "QoS limit: the user already uses the most GPUs the QoS allows",
    "QOSGrpJobsLimit": "QoS limit: the QoS already runs the most jobs it allows",
    "QOSGrpCpuLimit": "QoS limit: the QoS already uses the most CPUs it allows",
    "AssocMaxJobsLimit": "account limit: the association already runs the most jobs it allows",
    "AssocGrpCpuLimit": "account limit: the account already uses the most CPUs it allows",
    "None": "queued; the scheduler has not looked at it yet",
}


def describe_pending(reason: str | None) -> str:
    """'Resources' -> 'Slurm: Resources (waiting for CPUs, memory or GPUs to become free)'."""
    key = reason or "None"
    text = PENDING_REASONS.get(key)
    if text is None and key.startswith("QOS"):
        text = "a QoS limit holds it"
    elif text is None and key.startswith("Assoc"):
        text = "an account (association) limit holds it"
    return f"Slurm: {key} ({text})" if text else f"Slurm: {key}"


class SlurmOptions(BaseModel):
    """The `[[sites]]` keys a Slurm site understands."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["rest", "cli"] = Field(
        "rest", description="rest: slurmrestd over HTTP (JWT); cli: sbatch, squeue, scontrol"
    )
    rest_url: str = Field("http://127.0.0.1:6820", description="slurmrestd base URL")
    user: str | None = Field(
        None,
        description="slurmrestd: the Slurm user requests act as and jobs run as (default: this "
        "process's user; slurmrestd refuses root). The Slurm commands run as this process's user",
    )
    token: str | None = Field(
        None, description="slurmrestd JWT; unset: sciorch gets its own with `scontrol token`"
    )
    token_lifespan_s: int = Field(3600, ge=10, description="lifespan of tokens sciorch gets")
    partition: str | None = Field(None, description="partition (default: the cluster's)")
    account: str | None = None
    qos: str | None = Field(None, description="QoS for normal work")
    qos_urgent: str | None = Field(None, description="QoS for time-sensitive (urgent) work")
    reservation: str | None = None
    shared_dir: Path | None = Field(
        None,
        description="job files, on a filesystem the compute nodes share (default: the "
        "server's entries dir)",
    )
    poll_interval_s: float = Field(0.5, gt=0, le=300, description="fallback polling interval")
    watch: bool = Field(True, description="watch the job dirs for the wrapper's files")
    callback_listen: str | None = Field(
        None, description="'host:port' for the wrappers' HTTP pokes (port 0: any free one)"
    )
    callback_url: str | None = Field(
        None, description="URL jobs use to reach the listener (default: http://<fqdn>:<port>)"
    )
    max_job_queries_per_s: float = Field(
        50.0, gt=0, description="slurmrestd: fallback polling asks about at most this many "
        "jobs a second (the interval grows with the number of active jobs)"
    )
    status_ttl_s: float = Field(2.0, ge=0, description="cache site facts this long")
    queue_ttl_s: float = Field(
        10.0, ge=0, description="refresh the queue snapshot for wait estimates at most this often"
    )
    request_timeout_s: float = Field(10.0, gt=0)
    env: dict[str, str] = Field(
        default_factory=dict, description="environment added for every job (PATH, modules)"
    )
    slurm_conf: str | None = Field(None, description="SLURM_CONF for the Slurm commands")


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


@dataclass
class _View:
    """What the site looked like at `at` (for status, capabilities and the wait estimate)."""

    at: float = 0.0
    error: str | None = None
    nodes: list[NodeInfo] = field(default_factory=list)
    partitions: list[PartitionInfo] = field(default_factory=list)
    jobs: list[JobInfo] | None = None
    jobs_at: float = 0.0


# ----------------------------------------------------------------------------- the batch script

# The batch script is backends/scripts/slurm-batch.sh, its @NAME@ placeholders filled here.


def _shell_word(arg: str) -> str:
    """One argv word for bash, with {port} becoming the wrapper's $port."""
    pieces = arg.split("{port}")
    return '"$port"'.join(shlex.quote(p) if p else "" for p in pieces) or "''"


def build_script(spec: LaunchSpec, wd: WorkDir) -> str:
    """The batch script for one entry (the same for every transport)."""
    argv = []
    for arg in spec.argv:
        for key, value in (
            ("workdir", str(wd.root)),
            ("params_file", str(wd.params)),
            ("result_file", str(wd.result)),
            ("stream_file", str(wd.stream)),
            ("output_dir", str(wd.output)),
        ):
            arg = arg.replace("{" + key + "}", value)
        argv.append(_shell_word(arg))
    return render_script(
        "slurm-batch.sh",
        {
            "entry_id": spec.entry_id,
            "service": spec.service,
            "wd": str(wd.root),
            "wd_q": shlex.quote(str(wd.root)),
            "walltime": str(int(spec.resources.walltime_s)),
            "service_flag": "1" if spec.kind == "service" else "0",
            "command": " ".join(argv),
        },
    )


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

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        entries_dir: Path,
        *,
        transport: SlurmTransport | None = None,
    ) -> None:
        opts = site_options(SlurmOptions, name, options)
        super().__init__(name)
        self.options = opts
        self.entries_dir = Path(entries_dir)
        self.shared_dir = Path(opts.shared_dir or entries_dir).expanduser()
        self.job_user = opts.user or getpass.getuser()
        if opts.transport == "cli":
            self.job_user = getpass.getuser()
        self._cmd_env = dict(os.environ)
        if opts.slurm_conf:
            self._cmd_env["SLURM_CONF"] = opts.slurm_conf
        self.transport: SlurmTransport = transport or self._make_transport()
        self._view = _View()
        self._view_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._callback: asyncio.Server | None = None
        self._callback_env: dict[str, str] = {}
        self._poll_failures = 0
        self._poll_error: str | None = None
        self._next_full_poll = 0.0
        self._queue_task: asyncio.Task[None] | None = None

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
        self._closed = False
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        if self.options.watch:
            self._watcher = DirWatcher(self._request_flush)
        if self.options.callback_listen:
            await self._start_callback(self.options.callback_listen)
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
        if self._callback is not None:
            self._callback.close()
            with contextlib.suppress(Exception):
                await self._callback.wait_closed()
            self._callback = None
        self._entries.clear()
        await self.transport.aclose()

    async def shutdown_all(self, timeout_s: float = 15.0) -> None:
        """Cancel every job this backend tracks, wait (bounded) for Slurm to end them, close.
        For tests and for an operator who wants nothing left behind."""
        jobs = [j for j in self._entries.values() if not j.finished]
        for j in jobs:
            j.cancel_requested = True
            if j.job_id:
                with contextlib.suppress(SlurmError):
                    await self.transport.cancel(j.job_id)
                    j.cancel_sent = True
            j.hot_until = time.time() + HOT_FOR_S
        self._wake.set()
        deadline = time.time() + timeout_s
        while any(not j.finished for j in jobs) and time.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.close()

    # ------------------------------------------------------------------ protocol: site facts

    async def capabilities(self) -> Capabilities:
        with contextlib.suppress(SlurmError):
            await self._refresh_view()
        view = self._view
        part = self._partition(view)
        nodes = self._partition_nodes(view, part)
        return Capabilities(
            cpus=float(max((n.cpus for n in nodes), default=0)),
            memory_mb=max((n.memory_mb for n in nodes), default=0),
            gpus=max((n.gpus for n in nodes), default=0),
            gpu_types=sorted({t for n in nodes for t in n.gpu_types}),
            max_walltime_s=part.max_time_s if part is not None else None,
        )

    async def status(self) -> tuple[SiteStatus, str | None]:
        try:
            await self._refresh_view()
        except SlurmError:
            pass
        view = self._view
        if view.error is not None:
            return SiteStatus.DOWN, view.error
        part = self._partition(view)
        if part is None:
            want = self.options.partition or "(default)"
            return SiteStatus.DOWN, f"partition {want} does not exist on this cluster"
        if not part.up:
            return SiteStatus.DOWN, f"partition {part.name} is down"
        nodes = self._partition_nodes(view, part)
        bad = [n for n in nodes if not n.usable]
        if not nodes:
            return SiteStatus.DOWN, f"partition {part.name} has no nodes"
        if len(bad) == len(nodes):
            # Slurm refuses new jobs outright ("Required node not available").
            return SiteStatus.DOWN, f"no node can take jobs: {_node_problems(bad)}"
        if bad:
            return SiteStatus.DEGRADED, f"some nodes are out: {_node_problems(bad)}"
        if self._poll_error is not None:
            return SiteStatus.DEGRADED, self._poll_error
        return SiteStatus.UP, None

    async def estimate_wait(self, resources: Resources) -> float:
        """Seconds until an entry with these needs would start: 0 when a node has room now;
        else when running jobs free enough (at their time limits) or when the jobs already
        waiting are expected to start (Slurm's backfill estimates), whichever is later."""
        try:
            await self._refresh_view()
        except SlurmError:
            return float("inf")
        view = self._view
        part = self._partition(view)
        nodes = [n for n in self._partition_nodes(view, part) if n.usable]
        if part is None or not nodes:
            return float("inf")
        need_cpus = max(1, math.ceil(resources.cpus))
        need_mem, need_gpus = resources.memory_mb, resources.gpus

        def fits(cpus: int, mem: int, gpus: int) -> bool:
            return cpus >= need_cpus and mem >= need_mem and gpus >= need_gpus

        if not any(fits(n.cpus, n.memory_mb, n.gpus) for n in nodes):
            return float("inf")
        free = {
            n.name: [n.cpus - n.alloc_cpus, n.memory_mb - n.alloc_memory_mb, n.gpus - n.gpus_used]
            for n in nodes
        }
        if any(fits(*f) for f in free.values()):
            return 0.0  # room now (backfill starts it even with others waiting for more)
        self._refresh_queue_soon()  # the queue matters only now (and is costly to list)
        jobs = [j for j in view.jobs or [] if j.partition in (None, part.name)]
        pending = [j for j in jobs if j.state in _PENDING_STATES]
        now = time.time()
        # Running jobs end at their time limit at the latest: give their resources back in order.
        t_fit = None
        running = sorted(
            (j for j in jobs if j.state in _ACTIVE_STATES and j.node in free),
            key=lambda j: j.end_time or now,
        )
        for j in running:
            assert j.node is not None
            f = free[j.node]
            f[0] += j.cpus
            f[1] += j.memory_mb
            f[2] += j.gpus
            if fits(*f):
                t_fit = max(now, j.end_time or now)
                break
        starts = [j.start_time for j in pending if j.start_time]
        t_queue = max(starts) if starts else None
        candidates = [t for t in (t_fit, t_queue) if t is not None]
        if not candidates:
            return float(part.max_time_s or 3600)
        return max(0.0, max(candidates) - now)

    # ------------------------------------------------------------------ protocol: entries

    async def submit(self, spec: LaunchSpec) -> None:
        self._require_started()
        if spec.entry_id in self._entries:
            log.info("entry %s submitted twice; ignoring the second", spec.entry_id)
            return
        if not spec.argv:
            raise InvalidInput("the command is empty", field="argv")
        wd = WorkDir(self.shared_dir / spec.entry_id)
        await asyncio.to_thread(self._prepare_dir, wd, spec)
        j = _Job(spec=spec, workdir=wd)
        self._entries[spec.entry_id] = j
        try:
            await self._submit_job(j)
        except BaseException:
            self._entries.pop(spec.entry_id, None)
            raise
        self._track(j)
        if j.cancel_requested and j.job_id:  # cancelled while it was being queued
            with contextlib.suppress(SlurmError):
                await self.transport.cancel(j.job_id)
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
            await self.transport.cancel(str(job_id))
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
        self._require_started()
        if entry_id in self._entries or state.terminal:
            return
        wd = WorkDir(Path(handle.get("workdir") or self.shared_dir / entry_id))
        j = _Job(spec=spec, workdir=wd, state=state)
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
                        await asyncio.to_thread(self._prepare_dir, wd, spec)
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

    async def read_logs(
        self, entry_id: str, handle: Mapping[str, Any], offset: int, limit: int
    ) -> LogChunk:
        return await asyncio.to_thread(self._workdir(entry_id, handle).read_logs, offset, limit)

    async def read_results(
        self, entry_id: str, handle: Mapping[str, Any], since_record: int
    ) -> ResultData:
        return await asyncio.to_thread(self._workdir(entry_id, handle).read_results, since_record)

    # ------------------------------------------------------------------ submitting

    def _prepare_dir(self, wd: WorkDir, spec: LaunchSpec) -> None:
        """The job contract's files, and the batch script as job.sh (to read or rerun by hand)."""
        wd.prepare(spec.parameters)
        (wd.root / "job.sh").write_text(build_script(spec, wd))
        if os.geteuid() == 0 and self.job_user != "root":
            try:
                pw = pwd.getpwnam(self.job_user)
            except KeyError:
                return
            for path in (wd.root, wd.output, wd.params, wd.root / "job.sh"):
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def _request(self, j: _Job) -> JobRequest:
        spec, o = j.spec, self.options
        res = spec.resources
        env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        for key in ("LANG", "LC_ALL", "TZ"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(o.env)
        env.update(spec.env)
        env.update(j.workdir.contract_env())
        env.update(
            SCIORCH_ENTRY_ID=spec.entry_id,
            SCIORCH_EVENT_ID=spec.event_id,
            SCIORCH_BASE_PATH=spec.base_path,
        )
        if self._callback_env:
            env.update(self._callback_env)
            env["SCIORCH_CALLBACK_PATH"] = f"{self._callback_env['SCIORCH_CALLBACK_PATH']}/{j.id}"
        qos = o.qos
        if spec.priority == "urgent" and o.qos_urgent:
            qos = o.qos_urgent
        return JobRequest(
            name=f"sciorch-{spec.service}-{spec.entry_id}"[:200],
            script=build_script(spec, j.workdir),
            cwd=str(j.workdir.root),
            output=str(j.workdir.log),
            env=env,
            cpus_per_task=max(1, math.ceil(res.cpus)),
            memory_mb=res.memory_mb,
            gpus=res.gpus,
            gpu_type=res.gpu_type,
            time_limit_min=max(1, math.ceil(res.walltime_s / 60)),
            partition=o.partition,
            account=o.account,
            qos=qos,
            reservation=o.reservation,
            comment=f"sciorch entry {spec.entry_id}",
        )

    async def _submit_job(self, j: _Job) -> None:
        """Queue the entry's job and record its id in the handle before returning."""
        req = self._request(j)
        try:
            job_id = await self.transport.submit(req)
        except SlurmRejected as exc:
            raise InvalidInput(
                f"site {self.name!r}: Slurm rejected the job: {exc.message}"
                f"{self._rejection_hint(j.spec.resources, exc.message)}",
                field="resources",
            ) from exc
        except SlurmError as exc:
            raise BackendError(
                f"site {self.name!r}: could not submit to Slurm: {exc.message}"
            ) from exc
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

    def _rejection_hint(self, res: Resources, message: str) -> str:
        low = message.lower()
        part = self._partition(self._view)
        nodes = self._partition_nodes(self._view, part)
        if "node configuration is not available" in low and nodes:
            most_gpus = max(n.gpus for n in nodes)
            most_cpus = max(n.cpus for n in nodes)
            most_mem = max(n.memory_mb for n in nodes)
            asked = (
                f"{math.ceil(res.cpus)} CPUs, {res.memory_mb} MiB, {res.gpus} GPU(s)"
                + (f" of type {res.gpu_type}" if res.gpu_type else "")
            )
            return (
                f" (asked for {asked}; the largest node in partition "
                f"{part.name if part else '?'} has {most_cpus} CPUs, {most_mem} MiB, "
                f"{most_gpus} GPU(s))"
            )
        if "time limit" in low and part is not None and part.max_time_s:
            return (
                f" (asked for {format_duration(res.walltime_s)}; partition {part.name} allows "
                f"{format_duration(part.max_time_s)})"
            )
        return ""

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

    async def _start_callback(self, listen: str) -> None:
        host, _, port_s = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            port = int(port_s)
        except ValueError:
            raise InvalidInput(
                f"site {self.name!r}: callback_listen must be 'host:port', not {listen!r}",
                field=f"sites.{self.name}.callback_listen",
            ) from None
        self._callback = await asyncio.start_server(self._on_callback, host, port)
        bound = int(self._callback.sockets[0].getsockname()[1])
        reach = host if host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        url = self.options.callback_url or f"http://{reach}:{bound}"
        parts = urlsplit(url)
        self._callback_env = {
            "SCIORCH_CALLBACK_HOST": parts.hostname or "127.0.0.1",
            "SCIORCH_CALLBACK_PORT": str(parts.port or bound),
            "SCIORCH_CALLBACK_PATH": parts.path.rstrip("/") + f"/slurm/{self.name}",
        }

    async def _on_callback(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """POST <path>/slurm/<site>/<entry id>/<started|exited>: a hint, never trusted for the
        outcome (the state always comes from Slurm), so it needs no secret."""
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            for _ in range(100):
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
            writer.write(b"HTTP/1.0 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (TimeoutError, OSError):
            return
        finally:
            writer.close()
        parts = line.decode(errors="replace").split()
        if len(parts) < 2:
            return
        segs = [s for s in parts[1].split("/") if s]
        if len(segs) < 2:
            return
        entry_id, what = segs[-2], segs[-1]
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
                    await self.transport.cancel(j.job_id)
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
        if state in _TERMINAL_STATES:
            await self._terminal(j, info)
            return
        async with j.lock:
            if j.finished:
                return
            if info.start_time and state not in _PENDING_STATES:
                j.started_at = info.start_time
            j.node = info.node or j.node
            if state in _PENDING_STATES:
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
            if state in _ACTIVE_STATES:
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
        state, reason = self._verdict(j, info, code, sig, expired)
        if state == EntryState.FAILED and j.may_restart():
            await self._restart(j, reason or "it failed")
            return
        await self._finish(j, state, reason, code)

    def _verdict(
        self, j: _Job, info: JobInfo, code: int | None, sig: int | None, expired: bool
    ) -> tuple[EntryState, str | None]:
        st = info.state
        walltime = format_duration(j.spec.resources.walltime_s)
        if j.fail_reason:
            return EntryState.FAILED, j.fail_reason
        if st == "CANCELLED" or (j.cancel_requested and st != "COMPLETED"):
            asked = j.intent_verdict()
            if asked is not None:
                return asked
            who = f" ({info.reason})" if info.reason and " by " in info.reason else ""
            return EntryState.CANCELLED, f"cancelled outside sciorch (scancel){who}"
        if expired:
            return EntryState.EXPIRED, walltime_exceeded(j.spec)
        if st in ("TIMEOUT", "DEADLINE"):
            return EntryState.EXPIRED, f"Slurm time limit reached (walltime {walltime})"
        if st == "OUT_OF_MEMORY":
            return EntryState.FAILED, with_tail(
                f"out of memory: it used more than its {j.spec.resources.memory_mb} MiB "
                "(Slurm OUT_OF_MEMORY)",
                j.workdir,
            )
        if st in ("NODE_FAIL", "BOOT_FAIL"):
            return EntryState.FAILED, f"node failure ({st} on {j.node or info.node or '?'})"
        if st == "PREEMPTED":
            return EntryState.FAILED, "preempted by Slurm (and not requeued)"
        return j.exit_verdict(code, sig, f"Slurm ended the job in state {st}")

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
                await self.transport.cancel(j.job_id)
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
        }

    def _final_facts(self, j: _Job) -> dict[str, Any]:
        return {"handle": self._handle(j)}

    def _stop_watching(self, j: _Job) -> None:
        if j.health_task is not None and j.health_task is not asyncio.current_task():
            j.health_task.cancel()
        super()._stop_watching(j)

    # ------------------------------------------------------------------ site view

    async def _refresh_view(self, *, force: bool = False) -> None:
        """Ping Slurm and learn nodes and partitions, at most every status_ttl_s; errors land
        in the view (status() reports them) and are raised."""
        async with self._view_lock:
            now = time.time()
            view = self._view
            ttl = self.options.status_ttl_s
            stale = force or now - view.at >= ttl
            if stale:
                try:
                    await self.transport.ping()
                    nodes = await self.transport.nodes()
                    parts = await self.transport.partitions()
                except SlurmError as exc:
                    view.at = now
                    view.error = self._describe_error(exc)
                    raise
                self._view = view = _View(
                    at=now, nodes=nodes, partitions=parts,
                    jobs=view.jobs, jobs_at=view.jobs_at,
                )
            elif view.error is not None:
                raise SlurmUnavailable(view.error)

    def _refresh_queue_soon(self) -> None:
        """The queue (every job of the partition) costs slurmctld more than anything else we
        ask: fetch it in the background, at most every queue_ttl_s; estimates use the latest."""
        now = time.time()
        fresh = now - self._view.jobs_at < self.options.queue_ttl_s
        if self._queue_task is not None or fresh or self._closed:
            return

        async def fetch() -> None:
            try:
                jobs = await self.transport.jobs(None)
                self._view.jobs, self._view.jobs_at = jobs, time.time()
            except SlurmError as exc:
                log.debug("slurm site %s: queue snapshot failed: %s", self.name, exc)
                self._view.jobs_at = time.time()
            finally:
                self._queue_task = None

        self._queue_task = asyncio.get_running_loop().create_task(fetch())
        self._bg.add(self._queue_task)
        self._queue_task.add_done_callback(self._bg.discard)

    def _describe_error(self, exc: SlurmError) -> str:
        where = (
            f"slurmrestd at {self.options.rest_url}"
            if self.transport.name == "rest"
            else "the Slurm commands"
        )
        if isinstance(exc, SlurmAuthError):
            return f"{where} refused sciorch's credentials: {exc.message}"
        if isinstance(exc, SlurmUnavailable):
            return f"Slurm cannot be reached through {where}: {exc.message}"
        return f"Slurm error through {where}: {exc.message}"

    def _partition(self, view: _View) -> PartitionInfo | None:
        want = self.options.partition
        for p in view.partitions:
            if (want is not None and p.name == want) or (want is None and p.default):
                return p
        if want is None and view.partitions:
            return view.partitions[0]
        return None

    @staticmethod
    def _partition_nodes(view: _View, part: PartitionInfo | None) -> list[NodeInfo]:
        if part is None:
            return []
        names = set(part.nodes)
        return [n for n in view.nodes if n.name in names or part.name in n.partitions]

    # ------------------------------------------------------------------ small parts

    def _workdir(self, entry_id: str, handle: Mapping[str, Any]) -> WorkDir:
        return WorkDir(Path(handle.get("workdir") or self.shared_dir / entry_id))


def _node_problems(nodes: list[NodeInfo]) -> str:
    parts = []
    for n in nodes[:5]:
        flags = "+".join(sorted(n.flags))
        what = n.state + (f"+{flags.lower()}" if flags else "")
        parts.append(f"node {n.name} is {what}" + (f" ({n.reason})" if n.reason else ""))
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return "; ".join(parts) + more


def _opt_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


__all__ = ["PENDING_REASONS", "SlurmBackend", "SlurmOptions", "build_script", "describe_pending"]
