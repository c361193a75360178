"""The kubernetes backend: services and jobs run on a cluster, as Sci-Orchestra does on NERSC Spin.

Layout on the cluster
    One namespace per event (`<namespace_prefix><event id>`); every object carries the
    `app.kubernetes.io/*` labels and `sciorch.io/{entry,event,site}`. A job is a `batch/v1` Job
    (backoffLimit from the template's restart policy, walltime as activeDeadlineSeconds); a
    service is a Deployment (one replica, Recreate), a ClusterIP Service and, when the site
    configures ingress, an Ingress (a host per entry or a path per entry; class, annotations and
    TLS secret from the site). GPUs are whole `nvidia.com/gpu` with request = limit, steered to
    nodes by `gpu_node_selectors[gpu_type]` and `gpu_tolerations`. Stopping an event deletes its
    namespace (`release_event`). The manifests come from `backends.kube_manifests`; all cluster
    access goes through `backends.kube_api.KubeApi`.

The job contract on Kubernetes (results through the pod log)
    The work dir is an emptyDir (or a sub-path of the `results_pvc` claim) mounted at /sciorch,
    with the same layout as everywhere else: params.json (a ConfigMap key mounted read-only;
    $SCIORCH_PARAMS), result.json ($SCIORCH_RESULT), stream.jsonl ($SCIORCH_STREAM), output/
    ($SCIORCH_OUTPUT_DIR). The command runs under a POSIX-sh wrapper
    (`kube_manifests.JOB_WRAPPER`) that writes to the pod log, besides the command's own output:
        @@sciorch:stream <index> <json>   each stream record as it is written (and all of them
                                          once more at exit: the backend keeps the first copy)
        @@sciorch:result-begin / -end     the result file, between the two markers, at exit
        @@sciorch:artifact <path>         one line per file under output/ (names only: the
                                          files stay on the volume; use `results_pvc` to keep
                                          them)
        @@sciorch:exit <code>             the command's exit status
    The backend follows the log of every running pod (streaming, with follow) and splits it into
    a local mirror of the work dir (<entries_dir>/<entry id>/: log without the markers,
    stream.jsonl, result.json), which `read_logs` and `read_results` serve, which outlives the
    pods and the namespace, and from which stream records and log growth are reported as they
    arrive. A restarted server re-reads the log from the byte it had reached (kube-log.json).

Status
    Pods, Jobs and core/v1 Events of each active namespace are watched (list, then watch from
    the list's resourceVersion; reconnect from the last resourceVersion when a watch ends or
    drops, list again on 410 Gone, back off on errors). Pod phases map onto the one state
    machine: Pending/unscheduled -> pending, scheduled -> provisioning, Running -> running,
    Ready (readiness probe from the template's health check) -> ready; the Job's Complete/Failed
    condition ends a job (DeadlineExceeded -> expired). A pod stuck in ImagePullBackOff,
    ErrImagePull or Unschedulable is reported as pending with the reason (so `get_entry` shows
    it) and failed after `image_pull_grace_s` (`unschedulable_grace_s`, unset by default: a full
    cluster is a queue). Service restarts follow the template: `never` fails the entry on the
    first container restart, `on-failure` allows max_restarts. Services' walltime and health
    timeout are timers here; jobs' walltime is the Job's activeDeadlineSeconds.

Configuration (one `[[sites]]` table; every key is in `KubernetesOptions`)
    [[sites]]
    name = "spin"
    kind = "kubernetes"
    kubeconfig = "~/.kube/spin.yaml"      # or context = ..., or in_cluster = true, or host = URL
    namespace_prefix = "sciorch-"
    image = "registry.example.org/sciorch/runtime:1"   # for templates without an image
    ingress_host_template = "{entry}.sciorch.apps.example.org"   # or ingress_host (path mode)
    ingress_class = "nginx"
    tls_secret = "sciorch-apps-tls"
    gpu_node_selectors = { a100 = { "nvidia.com/gpu.product" = "NVIDIA-A100-SXM4-40GB" } }
    gpu_tolerations = [ { key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" } ]
    max_walltime_s = 86400

Router facts
    Capabilities come from the node list (the largest schedulable node's allocatable cpu,
    memory and GPUs; `cpus`/`memory_mb`/`gpus`/`gpu_types` override, and are needed when the
    service account may not list nodes). The wait estimate counts pending pods (cluster-wide
    when allowed, else this site's) times `pending_pod_wait_s`, plus the shortest remaining
    walltime of this site's running entries when the request does not fit in what they leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from backends.base import (
    LaunchSpec,
    LogChunk,
    Reporter,
    ResultData,
    WorkDir,
    site_options,
)
from backends.kube_api import KubeApi, KubeApiError, KubeGone, KubeUnreachable
from backends.kube_log import Mirror
from backends.kube_manifests import (
    CONTAINER,
    ENTRY_LABEL,
    MANAGED_BY,
    MANAGER,
    SITE_LABEL,
    KubernetesOptions,
    build_manifests,
    check_bundle,
    endpoint,
    label_value,
    namespace_manifest,
    namespace_name,
    object_name,
    params_name,
)
from backends.supervisor import (
    EntryRecord,
    Supervisor,
    health_failure,
    restart_allowed,
    restart_reason,
    walltime_exceeded,
    with_tail,
)
from orchestrator.errors import BackendError, InvalidInput
from orchestrator.models import (
    Capabilities,
    EntryState,
    Resources,
    SiteStatus,
    can_transition,
    format_duration,
)

log = logging.getLogger("sciorch.backends.kubernetes")

_IMAGE_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_FATAL_REASONS = {"InvalidImageName", "ErrImageNeverPull"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
_EVENT_KINDS = {
    "FailedScheduling": "unschedulable",
    "ErrImagePull": "image",
    "ImagePullBackOff": "image",
    "ErrImageNeverPull": "image",
    "InspectFailed": "image",
    "FailedMount": "config",
    "FailedAttachVolume": "config",
    "FailedCreatePodSandBox": "config",
    "FailedCreate": "config",
}
_T = TypeVar("_T")
_RETRYABLE = {429, 500, 502, 503, 504}
_UNKNOWN_CPUS = 64.0
_UNKNOWN_MEMORY_MB = 256 * 1024


# ----------------------------------------------------------------------------- small helpers


def _dig(obj: Mapping[str, Any] | None, *keys: str) -> Any:
    cur: Any = obj
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in _dig(obj, "status", "conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def _true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    cond = _condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def _main_status(pod: Mapping[str, Any]) -> dict[str, Any]:
    statuses = [s for s in _dig(pod, "status", "containerStatuses") or [] if isinstance(s, dict)]
    for s in statuses:
        if s.get("name") == CONTAINER:
            return s
    return statuses[0] if statuses else {}


def _name(obj: Mapping[str, Any]) -> str:
    return str(_dig(obj, "metadata", "name") or "")


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 1024.0,
    "Mi": 1024.0**2,
    "Gi": 1024.0**3,
    "Ti": 1024.0**4,
    "Pi": 1024.0**5,
    "Ei": 1024.0**6,
}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ('15900m', '64Gi', '4') as a number (0 when unreadable)."""
    m = _QUANTITY.match(str(value or "0").strip())
    if not m or m.group(2) not in _SUFFIX:
        return 0.0
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# ----------------------------------------------------------------------------- bookkeeping


@dataclass(eq=False, kw_only=True)
class _Entry(EntryRecord):
    namespace: str
    name: str
    mirror: Mirror
    endpoint: str | None
    job: dict[str, Any] | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_restarts: dict[str, int] = field(default_factory=dict)
    failed_pods: set[str] = field(default_factory=set)
    events: dict[str, tuple[str, str]] = field(default_factory=dict)  # object -> (kind, text)
    stuck_kind: str | None = None
    stuck_text: str | None = None
    stuck_timer: asyncio.TimerHandle | None = None
    health_timer: asyncio.TimerHandle | None = None
    follow_task: asyncio.Task[None] | None = None
    follow_source: str | None = None
    follow_pod: str | None = None
    log_size: int = 0
    log_final: bool = False
    reported: dict[str, Any] = field(default_factory=dict)
    log_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def workload(self) -> str:
        return "Job" if self.spec.kind == "job" else "Deployment"


@dataclass(eq=False)
class _Watcher:
    namespace: str
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Node:
    name: str
    cpus: float
    memory_mb: int
    gpus: int
    gpu_type: str | None
    ready: bool


Handler = Callable[[str, dict[str, Any]], Awaitable[None]]


# ----------------------------------------------------------------------------- the backend


class KubernetesBackend(Supervisor[_Entry]):
    """Runs entries on a Kubernetes cluster. See the module docstring."""

    kind = "kubernetes"

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        entries_dir: Path,
        api: KubeApi | None = None,
    ) -> None:
        opts = site_options(KubernetesOptions, name, options)
        super().__init__(name)
        self.options = opts
        self.entries_dir = Path(entries_dir)
        self.api = api
        self._own_api = api is None
        self._watchers: dict[str, _Watcher] = {}
        self._namespaces: set[str] = set()
        self._nodes: list[_Node] | None = None
        self._nodes_note: str | None = None
        self._pending_pods: int | None = None
        self._unreachable: str | None = None
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ protocol: lifecycle

    async def start(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self._closed = False
        if self.api is None:
            o = self.options
            self.api = await KubeApi.connect(
                host=o.host,
                kubeconfig=o.kubeconfig,
                context=o.context,
                in_cluster=o.in_cluster,
                token_file=o.token_file,
                ca_cert=o.ca_cert,
                verify_ssl=o.verify_ssl,
                trust_env=o.trust_env,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._refresh_cluster(), timeout=5)

    async def close(self) -> None:
        """Stop watching and following; what runs on the cluster keeps running."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = []
        for w in self._watchers.values():
            tasks += w.tasks
        for e in self._entries.values():
            self._stop_timers(e)
            if e.follow_task is not None:
                tasks.append(e.follow_task)
        tasks += list(self._bg)
        if self._refreshing is not None:
            tasks.append(self._refreshing)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()
        self._entries.clear()
        self._namespaces.clear()
        if self._own_api and self.api is not None:
            await self.api.close()
            self.api = None

    async def shutdown_all(self, timeout_s: float = 5.0) -> None:
        """Cancel every entry this backend tracks (deleting its objects), then close. For tests
        and for an operator who wants nothing left behind."""

        async def stop(entry_id: str) -> None:
            with contextlib.suppress(Exception):
                await self.cancel(entry_id, {})

        tasks = [
            asyncio.get_running_loop().create_task(stop(e.id))
            for e in list(self._entries.values())
            if not e.finished
        ]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.close()

    # ------------------------------------------------------------------ protocol: site facts

    async def capabilities(self) -> Capabilities:
        self._maybe_refresh()
        o = self.options
        # What one pod can get: the largest Ready node (unknown: generous guesses).
        nodes = [n for n in self._nodes or [] if n.ready]
        cpus = max((n.cpus for n in nodes), default=_UNKNOWN_CPUS)
        memory = max((n.memory_mb for n in nodes), default=_UNKNOWN_MEMORY_MB)
        gpus = max((n.gpus for n in nodes), default=0)
        types = o.gpu_types if o.gpu_types is not None else sorted(o.gpu_node_selectors)
        return Capabilities(
            cpus=o.cpus if o.cpus is not None else cpus,
            memory_mb=o.memory_mb if o.memory_mb is not None else memory,
            gpus=o.gpus if o.gpus is not None else gpus,
            gpu_types=list(types),
            max_walltime_s=o.max_walltime_s,
        )

    async def status(self) -> tuple[SiteStatus, str | None]:
        self._maybe_refresh()
        if self._unreachable:
            return SiteStatus.DOWN, self._unreachable
        if self._nodes is not None and self._nodes and not any(n.ready for n in self._nodes):
            return SiteStatus.DEGRADED, "no node is Ready and schedulable"
        problems = sorted({p for w in self._watchers.values() for p in w.problems.values()})
        if problems:
            return SiteStatus.DEGRADED, "; ".join(problems)
        return SiteStatus.UP, None

    async def estimate_wait(self, resources: Resources) -> float:
        """Pending pods times `pending_pod_wait_s`, plus the shortest remaining walltime of this
        site's running entries when the request does not fit beside them."""
        if self._never_fits(resources) is not None:
            return float("inf")
        self._maybe_refresh()
        ours = sum(
            1
            for e in self._entries.values()
            if not e.finished and e.state in (EntryState.PENDING, EntryState.PROVISIONING)
        )
        pending = max(ours, self._pending_pods or 0)
        wait = pending * self.options.pending_pod_wait_s
        caps = await self.capabilities()
        nodes = [n for n in self._nodes or [] if n.ready]
        total_cpus = sum(n.cpus for n in nodes) if nodes else caps.cpus
        total_mem = sum(n.memory_mb for n in nodes) if nodes else caps.memory_mb
        total_gpus = sum(n.gpus for n in nodes) if nodes else caps.gpus
        active = [e for e in self._entries.values() if not e.finished]
        used = [e.spec.resources for e in active]
        fits = (
            resources.cpus <= total_cpus - sum(r.cpus for r in used) + 1e-9
            and resources.memory_mb <= total_mem - sum(r.memory_mb for r in used)
            and resources.gpus <= total_gpus - sum(r.gpus for r in used)
        )
        if not fits:
            now = time.time()
            left = [
                max(0.0, e.started_at + e.spec.resources.walltime_s - now)
                for e in active
                if e.started_at is not None
            ]
            wait += min(left) if left else self.options.pending_pod_wait_s
        return wait

    # ------------------------------------------------------------------ protocol: entries

    async def submit(self, spec: LaunchSpec) -> None:
        self._require_started()
        if spec.entry_id in self._entries:
            log.info("entry %s submitted twice; ignoring the second", spec.entry_id)
            return
        problem = self._never_fits(spec.resources)
        if problem is not None:
            raise InvalidInput(f"site {self.name!r}: {problem[1]}", field=problem[0])
        if not spec.argv:
            raise InvalidInput("the command is empty", field="argv")
        manifests = build_manifests(spec, self.options, self.name)
        problems = check_bundle(manifests)
        if problems:
            raise BackendError(
                f"site {self.name!r}: the manifests for {spec.entry_id} are invalid: "
                + "; ".join(problems)
            )
        e = self._new_entry(spec, EntryState.PENDING)
        self._entries[e.id] = e
        created: list[dict[str, Any]] = []
        try:
            await self._ensure_namespace(spec.event_id)
            self._watch(e.namespace)
            for body in manifests:
                await self._create(body, spec.entry_id)
                created.append(body)
        except BaseException:
            self._entries.pop(e.id, None)
            for body in reversed(created):
                with contextlib.suppress(Exception):
                    await self._api().delete(
                        str(body["kind"]), e.namespace, str(body["metadata"]["name"])
                    )
            self._maybe_unwatch(e.namespace)
            raise
        async with e.lock:
            if e.state == EntryState.PENDING and e.reason is None:  # nothing newer reported
                await self._report_locked(
                    e,
                    EntryState.PENDING,
                    reason=f"submitted to namespace {e.namespace}; waiting for a pod",
                    handle=self._handle(e),
                )

    async def cancel(self, entry_id: str, handle: Mapping[str, Any]) -> None:
        e = self._entries.get(entry_id)
        if e is None:
            ns, name = handle.get("namespace"), handle.get("name")
            if ns and name:
                kind = "Job" if handle.get("kind") == "Job" else "Deployment"
                await self._delete_objects(str(ns), str(name), kind)
            await self._call(
                entry_id, "transition", EntryState.CANCELLED, reason="cancelled by request"
            )
            return
        async with e.lock:
            if e.finished or e.cancel_requested:
                return
            e.cancel_requested = True
            try:
                await self._end(e, EntryState.CANCELLED, "cancelled by request", None, delete=True)
            except BaseException:
                e.cancel_requested = False
                raise

    async def adopt(
        self, entry_id: str, state: EntryState, handle: Mapping[str, Any], spec: LaunchSpec
    ) -> None:
        self._require_started()
        if entry_id in self._entries or state.terminal:
            return
        if not handle.get("name"):
            # The server stopped before the objects were created: submit again (idempotent).
            await self.submit(spec)
            return
        e = self._new_entry(spec, state)
        e.namespace = str(handle.get("namespace") or e.namespace)
        e.restarts = int(handle.get("restarts") or 0)
        started = handle.get("started_at")
        e.started_at = float(started) if started else None
        e.ready = state == EntryState.READY
        e.log_size = e.mirror.log_size()
        try:
            found = await self._api().get(e.workload, e.namespace, e.name)
        except (KubeApiError, KubeUnreachable) as exc:
            log.warning("adopting %s: %s; the watches will tell", entry_id, exc)
            found = {}
        if found is None:
            self._entries[entry_id] = e
            async with e.lock:
                await self._end(
                    e,
                    EntryState.FAILED,
                    f"its {e.workload} {e.namespace}/{e.name} is gone (deleted while the "
                    "server was down); state unknown",
                    None,
                    delete=True,
                )
            return
        self._entries[entry_id] = e
        self._namespaces.add(e.namespace)
        if spec.kind == "service" and e.started_at is not None:
            self._arm_walltime(e)
        self._watch(e.namespace)
        await self._sync_entry(e)

    async def read_logs(
        self, entry_id: str, handle: Mapping[str, Any], offset: int, limit: int
    ) -> LogChunk:
        return await self._workdir(entry_id, handle).read_logs_async(offset, limit)

    async def read_results(
        self, entry_id: str, handle: Mapping[str, Any], since_record: int
    ) -> ResultData:
        wd = self._workdir(entry_id, handle)
        data = await wd.read_results_async(since_record)
        e = self._entries.get(entry_id)
        mirror = e.mirror if e is not None else Mirror(wd, markers=True)
        data.artifacts = sorted(set(data.artifacts) | set(mirror.artifacts))
        return data

    async def release_event(self, event_id: str) -> None:
        """The event has ended: stop what is left of it and delete its namespace."""
        ns = namespace_name(self.options.namespace_prefix, event_id)
        for e in [x for x in self._entries.values() if x.namespace == ns]:
            async with e.lock:
                if not e.finished:
                    e.cancel_requested = True
                    await self._end(e, EntryState.CANCELLED, "event stopped", None, delete=False)
        await self._unwatch(ns)
        self._namespaces.discard(ns)
        await self._retry(lambda: self._api().delete("Namespace", None, ns))

    # ------------------------------------------------------------------ creating

    def _new_entry(self, spec: LaunchSpec, state: EntryState) -> _Entry:
        wd = WorkDir(self.entries_dir / spec.entry_id)
        ep = endpoint(spec, self.options, self.name) if spec.kind == "service" else None
        return _Entry(
            spec=spec,
            workdir=wd,
            namespace=namespace_name(self.options.namespace_prefix, spec.event_id),
            name=object_name(spec.entry_id),
            mirror=Mirror(wd, markers=spec.kind == "job"),
            endpoint=ep,
            state=state,
        )

    async def _ensure_namespace(self, event_id: str) -> str:
        body = namespace_manifest(event_id, self.name, self.options)
        ns = str(body["metadata"]["name"])
        if ns in self._namespaces:
            return ns
        try:
            await self._retry(lambda: self._api().create(body))
        except KubeApiError as exc:
            if exc.status != 409:
                raise self._refusal(exc, f"create namespace {ns}") from exc
            found = await self._retry(lambda: self._api().get("Namespace", None, ns))
            labels = _dig(found, "metadata", "labels") or {}
            if labels.get(MANAGED_BY) != MANAGER or labels.get("sciorch.io/event") != label_value(
                event_id
            ):
                raise BackendError(
                    f"site {self.name!r}: namespace {ns} already exists and does not belong to "
                    f"event {event_id}; choose another namespace_prefix",
                    field=f"sites.{self.name}.namespace_prefix",
                ) from exc
            if _dig(found, "status", "phase") == "Terminating":
                raise BackendError(
                    f"site {self.name!r}: namespace {ns} is still being deleted; try again "
                    "in a moment"
                ) from exc
        self._namespaces.add(ns)
        return ns

    async def _create(self, body: dict[str, Any], entry_id: str) -> None:
        kind = str(body["kind"])
        ns = str(body["metadata"]["namespace"])
        name = str(body["metadata"]["name"])
        try:
            await self._retry(lambda: self._api().create(body))
        except KubeApiError as exc:
            if exc.status != 409:
                raise self._refusal(exc, f"create {kind} {ns}/{name}") from exc
            found = await self._retry(lambda: self._api().get(kind, ns, name))
            owner = (_dig(found, "metadata", "labels") or {}).get(ENTRY_LABEL)
            if owner != label_value(entry_id):
                raise BackendError(
                    f"site {self.name!r}: {kind} {ns}/{name} already exists and is not "
                    f"entry {entry_id}'s",
                ) from exc
            # Ours already (a retried submit, an adoption): nothing to do.

    def _refusal(self, exc: KubeApiError, what: str) -> BackendError:
        if exc.status == 403:
            return BackendError(
                f"site {self.name!r}: the cluster refused to {what} (403 Forbidden: "
                f"{exc.detail}); the account sciorch uses needs that permission"
            )
        if exc.status == 422:
            return BackendError(
                f"site {self.name!r}: the cluster rejected {what} as invalid: {exc.detail}"
            )
        return BackendError(f"site {self.name!r}: could not {what}: {exc.message}")

    async def _retry(self, call: Callable[[], Awaitable[_T]], attempts: int = 4) -> _T:
        """Retry server errors and lost connections with a short backoff."""
        delay = 0.1
        for attempt in range(attempts):
            try:
                return await call()
            except KubeApiError as exc:
                if exc.status not in _RETRYABLE or attempt == attempts - 1:
                    raise
            except KubeUnreachable:
                if attempt == attempts - 1:
                    raise
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def _delete_objects(self, ns: str, name: str, workload: str) -> None:
        for kind, obj in (
            (workload, name),
            ("Ingress", name),
            ("Service", name),
            ("ConfigMap", name + "-params"),
        ):
            if kind in ("Ingress", "Service") and workload == "Job":
                continue
            try:
                await self._retry(functools.partial(self._api().delete, kind, ns, obj))
            except KubeApiError as exc:
                raise self._refusal(exc, f"delete {kind} {ns}/{obj}") from exc

    # ------------------------------------------------------------------ watching

    def _watch(self, ns: str) -> None:
        if ns in self._watchers or self._closed:
            return
        w = self._watchers[ns] = _Watcher(ns)
        ours = f"{MANAGED_BY}={MANAGER},{SITE_LABEL}={label_value(self.name)}"
        loop = asyncio.get_running_loop()
        for kind, selector, handler in (
            ("Pod", ours, self._on_pod),
            ("Job", ours, self._on_job),
            ("Event", None, self._on_event),
        ):
            w.tasks.append(
                loop.create_task(
                    self._watch_loop(w, kind, selector, handler),
                    name=f"sciorch-kube-watch-{kind}-{ns}",
                )
            )

    def _maybe_unwatch(self, ns: str) -> None:
        if any(e.namespace == ns and not e.finished for e in self._entries.values()):
            return
        w = self._watchers.pop(ns, None)
        if w is not None:
            for t in w.tasks:
                t.cancel()

    async def _unwatch(self, ns: str) -> None:
        w = self._watchers.pop(ns, None)
        if w is not None:
            for t in w.tasks:
                t.cancel()
            await asyncio.gather(*w.tasks, return_exceptions=True)

    async def _watch_loop(
        self, w: _Watcher, kind: str, selector: str | None, handler: Handler
    ) -> None:
        """List, then watch from the list's resourceVersion; reconnect from the last version
        seen when the stream ends or drops; list again on 410 Gone; back off on errors."""
        api = self._api()
        rv: str | None = None
        backoff = 0.1
        while not self._closed:
            began = time.monotonic()
            seen = 0
            try:
                if rv is None:
                    items, rv = await api.list(kind, w.namespace, label_selector=selector)
                    await self._relisted(kind, w.namespace, items, handler)
                async for ev in api.watch(
                    kind,
                    w.namespace,
                    label_selector=selector,
                    resource_version=rv,
                    timeout_s=self.options.watch_timeout_s,
                ):
                    if ev.type == "CONNECTED":
                        w.problems.pop(kind, None)
                        self._unreachable = None
                        continue
                    seen += 1
                    if ev.resource_version:
                        rv = ev.resource_version
                    if ev.type in ("ADDED", "MODIFIED", "DELETED"):
                        await self._dispatch(handler, ev.type, ev.object)
                if seen or time.monotonic() - began > 1.0:
                    backoff = 0.1
                    continue
                # Closed at once with nothing in it: do not spin.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except asyncio.CancelledError:
                raise
            except KubeGone:
                log.info(
                    "watch %s in %s: resourceVersion %s is gone; listing again",
                    kind,
                    w.namespace,
                    rv,
                )
                rv = None
            except KubeApiError as exc:
                if exc.status == 403:
                    w.problems[kind] = f"forbidden to watch {kind} in {w.namespace}: {exc.detail}"
                log.warning(
                    "watch %s in %s: %s; retrying in %.1fs", kind, w.namespace, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except KubeUnreachable as exc:
                self._unreachable = f"API server unreachable: {exc.message}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("watch %s in %s failed", kind, w.namespace)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _dispatch(self, handler: Handler, typ: str, obj: dict[str, Any]) -> None:
        try:
            await handler(typ, obj)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handling %s %s failed", typ, _name(obj))

    async def _relisted(
        self, kind: str, ns: str, items: list[dict[str, Any]], handler: Handler
    ) -> None:
        """A fresh list: what it lacks was deleted while nobody watched."""
        names = {_name(i) for i in items}
        for e in [x for x in self._entries.values() if x.namespace == ns and not x.finished]:
            if kind == "Pod":
                for gone in [p for p in e.pods if p not in names]:
                    await self._dispatch(handler, "DELETED", e.pods[gone])
            elif kind == "Job" and e.job is not None and e.name not in names:
                await self._dispatch(handler, "DELETED", e.job)
        for item in items:
            await self._dispatch(handler, "ADDED", item)

    async def _sync_entry(self, e: _Entry) -> None:
        """Feed the entry's current objects through the handlers (after an adoption)."""
        selector = f"{ENTRY_LABEL}={label_value(e.id)}"
        try:
            pods, _ = await self._api().list("Pod", e.namespace, label_selector=selector)
            jobs: list[dict[str, Any]] = []
            if e.spec.kind == "job":
                jobs, _ = await self._api().list("Job", e.namespace, label_selector=selector)
        except (KubeApiError, KubeUnreachable) as exc:
            log.warning("syncing %s: %s; the watches will tell", e.id, exc)
            return
        for pod in pods:
            await self._dispatch(self._on_pod, "ADDED", pod)
        for job in jobs:
            await self._dispatch(self._on_job, "ADDED", job)

    def _entry_of(self, obj: Mapping[str, Any]) -> _Entry | None:
        eid = (_dig(obj, "metadata", "labels") or {}).get(ENTRY_LABEL)
        e = self._entries.get(str(eid)) if eid else None
        return None if e is None or e.finished else e

    async def _on_pod(self, typ: str, pod: dict[str, Any]) -> None:
        e = self._entry_of(pod)
        if e is None:
            return
        async with e.lock:
            if e.finished:
                return
            name = _name(pod)
            if typ == "DELETED":
                e.pods.pop(name, None)
            else:
                e.pods[name] = pod
            await self._evaluate(e)

    async def _on_job(self, typ: str, job: dict[str, Any]) -> None:
        e = self._entry_of(job)
        if e is None or _name(job) != e.name:
            return
        async with e.lock:
            if e.finished:
                return
            if typ == "DELETED":
                if not e.cancel_requested:
                    await self._end(
                        e,
                        EntryState.FAILED,
                        f"its Job {e.namespace}/{e.name} was deleted outside sciorch",
                        None,
                        delete=True,
                    )
                return
            e.job = job
            await self._evaluate(e)

    async def _on_event(self, typ: str, ev: dict[str, Any]) -> None:
        if typ == "DELETED":
            return
        reason = str(ev.get("reason") or "")
        message = str(ev.get("message") or "").strip()
        kind = _EVENT_KINDS.get(reason)
        if kind is None and reason in ("Failed", "BackOff") and "image" in message.lower():
            kind = "image"
        if kind is None or ev.get("type") not in (None, "Warning"):
            return
        target = str(_dig(ev, "involvedObject", "name") or "")
        ns = str(_dig(ev, "involvedObject", "namespace") or _dig(ev, "metadata", "namespace"))
        for e in list(self._entries.values()):
            if e.finished or e.namespace != ns:
                continue
            if target == e.name or target.startswith(e.name + "-"):
                async with e.lock:
                    if e.finished:
                        return
                    e.events[target] = (kind, f"{reason}: {message}" if message else reason)
                    await self._evaluate(e)
                return

    # ------------------------------------------------------------------ the state machine

    async def _evaluate(self, e: _Entry) -> None:
        """Report what the objects say now (called with e.lock held)."""
        if e.finished:
            return
        if e.spec.kind == "job":
            await self._evaluate_job(e)
        else:
            await self._evaluate_service(e)

    def _current_pod(self, e: _Entry) -> dict[str, Any] | None:
        pods = list(e.pods.values())
        if not pods:
            return None
        live = [p for p in pods if not _dig(p, "metadata", "deletionTimestamp")] or pods
        return max(live, key=lambda p: (str(_dig(p, "metadata", "creationTimestamp")), _name(p)))

    async def _evaluate_job(self, e: _Entry) -> None:
        pod = self._current_pod(e)
        if pod is not None:
            await self._observe_job_pod(e, pod)
            if e.finished:
                return
        job = e.job
        if job is not None and (_true(job, "Complete") or _true(job, "SuccessCriteriaMet")):
            await self._end(e, EntryState.SUCCEEDED, None, 0, delete=False)
            return
        failed = _condition(job, "Failed")
        if failed is None or failed.get("status") != "True":
            failed = _condition(job, "FailureTarget")
        if failed is not None and failed.get("status") == "True":
            why = str(failed.get("reason") or "")
            await self._final_log(e)  # the exit code may be in it, and the pods are fresh
            code = self._exit_code(e, self._current_pod(e))
            if why == "DeadlineExceeded":
                walltime = format_duration(int(_dig(job, "spec", "activeDeadlineSeconds") or 0))
                await self._end(
                    e, EntryState.EXPIRED, f"walltime {walltime} exceeded", code, delete=False
                )
            elif why == "BackoffLimitExceeded" and code is not None:
                tries = len(e.failed_pods) or 1
                what = f"exit code {code}" + (f" (after {tries} attempts)" if tries > 1 else "")
                await self._end(
                    e, EntryState.FAILED, with_tail(what, e.mirror.wd), code, delete=False
                )
            else:
                text = str(failed.get("message") or "").strip()
                await self._end(
                    e,
                    EntryState.FAILED,
                    with_tail(f"{why or 'failed'}: {text}" if text else why, e.mirror.wd),
                    code,
                    delete=False,
                )
            return
        if pod is None:
            stuck = e.events.get(e.name)
            if stuck is not None:
                await self._stuck(e, stuck[0], stuck[1])

    def _exit_code(self, e: _Entry, pod: Mapping[str, Any] | None) -> int | None:
        if pod is not None:
            term = _dig(_main_status(pod), "state", "terminated")
            if isinstance(term, dict) and term.get("exitCode") is not None:
                return int(term["exitCode"])
        return e.mirror.exit_code

    async def _observe_job_pod(self, e: _Entry, pod: dict[str, Any]) -> None:
        phase = _dig(pod, "status", "phase")
        name = _name(pod)
        if phase == "Pending" or phase is None:
            await self._pending_pod(e, pod)
            return
        self._unstuck(e)
        if phase == "Running" and e.state in (EntryState.PENDING, EntryState.PROVISIONING):
            e.started_at = e.started_at or time.time()
            await self._report_locked(
                e, EntryState.RUNNING, reason=None, handle=self._handle(e, name)
            )
        # Followed only now: a record announced from the log never precedes 'running'.
        if phase in ("Running", "Succeeded", "Failed"):
            self._follow(e, name, name)
        if phase == "Failed" and name not in e.failed_pods:
            e.failed_pods.add(name)
            limit = int(_dig(e.job, "spec", "backoffLimit") or 0)
            if len(e.failed_pods) <= limit and not _true(e.job, "Failed"):
                code = self._exit_code(e, pod)
                e.restarts = len(e.failed_pods)
                await self._report_locked(
                    e,
                    EntryState.PROVISIONING,
                    reason=f"retrying after exit code {code} (retry {e.restarts}/{limit})",
                    restarts=e.restarts,
                    handle=self._handle(e),
                )

    async def _evaluate_service(self, e: _Entry) -> None:
        pod = self._current_pod(e)
        if pod is None:
            if e.state in (EntryState.RUNNING, EntryState.READY):
                e.ready = False
                await self._report_locked(
                    e, EntryState.PROVISIONING, reason="its pod is gone; waiting for a new one"
                )
            else:
                # No pod yet: a warning about the Deployment or its ReplicaSet says why.
                stuck = next(reversed(e.events.values()), None)
                if stuck is not None:
                    await self._stuck(e, stuck[0], stuck[1])
            return
        name = _name(pod)
        phase = _dig(pod, "status", "phase")
        cs = _main_status(pod)
        count = int(cs.get("restartCount") or 0)
        seen = e.pod_restarts.get(name, 0)
        if count > seen:
            e.pod_restarts[name] = count
            e.restarts += count - seen
            last = _dig(cs, "lastState", "terminated") or {}
            code = last.get("exitCode")
            what = f"exit code {code}" if code is not None else "its container ended"
            policy, most = e.spec.restart_policy, e.spec.max_restarts
            if not restart_allowed(e.spec, e.restarts):
                allowed = "no restarts" if policy != "on-failure" else f"{most} restarts"
                await self._end(
                    e,
                    EntryState.FAILED,
                    with_tail(
                        f"the service exited ({what}); its restart policy {policy!r} allows "
                        f"{allowed}",
                        e.mirror.wd,
                    ),
                    int(code) if code is not None else None,
                    delete=True,
                )
                return
            e.ready = False
            self._cancel_timer(e, "health_timer")
            await self._report_locked(
                e,
                EntryState.PROVISIONING,
                reason=restart_reason(what, e.restarts, e.spec),
                restarts=e.restarts,
                handle=self._handle(e),
            )
        if phase == "Pending" or phase is None:
            await self._pending_pod(e, pod)
            return
        self._unstuck(e)
        if phase != "Running":
            self._follow(e, name, f"{name}#{count}")
            e.ready = False
            why = _dig(pod, "status", "reason") or phase
            await self._report_locked(
                e,
                EntryState.PROVISIONING,
                reason=f"pod {name} ended ({why}); waiting for a new one",
            )
            return
        ready = _true(pod, "Ready")
        if e.state in (EntryState.PENDING, EntryState.PROVISIONING):
            first = e.started_at is None
            e.started_at = e.started_at or time.time()
            await self._report_locked(
                e,
                EntryState.RUNNING,
                reason=None,
                handle=self._handle(e, name),
                endpoint=e.endpoint,
            )
            if first:
                self._arm_walltime(e)
            if not ready:
                self._arm_health(e)
        # Followed only once reported running: no record is announced before that.
        self._follow(e, name, f"{name}#{count}")
        if ready and e.state != EntryState.READY:
            self._cancel_timer(e, "health_timer")
            e.ready = True
            await self._report_locked(e, EntryState.READY, reason=None, endpoint=e.endpoint)
        elif not ready and e.state == EntryState.READY:
            e.ready = False
            await self._report_locked(e, EntryState.RUNNING, reason="the readiness probe fails")

    async def _pending_pod(self, e: _Entry, pod: dict[str, Any]) -> None:
        name = _name(pod)
        sched = _condition(pod, "PodScheduled")
        waiting = _dig(_main_status(pod), "state", "waiting") or {}
        wreason = str(waiting.get("reason") or "")
        wmessage = str(waiting.get("message") or "").strip()
        event = e.events.get(name)
        if sched is not None and sched.get("status") == "False":
            text = str(sched.get("message") or "").strip()
            if not text and event is not None:
                text = event[1]
            await self._stuck(
                e, "unschedulable", f"Unschedulable: {text}" if text else "Unschedulable"
            )
            return
        if wreason in _IMAGE_REASONS or wreason in _CONFIG_REASONS:
            kind = "image" if wreason in _IMAGE_REASONS else "config"
            text = f"{wreason}: {wmessage}" if wmessage else wreason
            if event is not None and event[0] == kind and event[1] not in text:
                text += f" ({event[1]})"
            await self._stuck(e, kind, text, fatal=wreason in _FATAL_REASONS)
            return
        if event is not None and not (
            sched is not None and sched.get("status") == "True" and event[0] == "unschedulable"
        ):
            await self._stuck(e, event[0], event[1])
            return
        self._unstuck(e)
        if sched is not None and sched.get("status") == "True":
            node = _dig(pod, "spec", "nodeName")
            where = f" on {node}" if node else ""
            doing = f" ({wreason})" if wreason else ""
            await self._report_locked(
                e,
                EntryState.PROVISIONING,
                reason=f"pod {name} scheduled{where}; starting its container{doing}",
                handle=self._handle(e, pod=name),
            )
        else:
            await self._report_locked(
                e, EntryState.PENDING, reason=f"pod {name} is waiting for the scheduler"
            )

    async def _stuck(self, e: _Entry, kind: str, text: str, fatal: bool = False) -> None:
        """A pod that does not get going: show why; give up after the grace period."""
        if e.stuck_kind != kind:
            self._cancel_timer(e, "stuck_timer")
            e.stuck_kind = kind
            grace = (
                0.0
                if fatal
                else self.options.unschedulable_grace_s
                if kind == "unschedulable"
                else self.options.image_pull_grace_s
            )
            if grace is not None:
                e.stuck_timer = asyncio.get_running_loop().call_later(
                    grace, self._later, self._give_up, e, kind, grace
                )
        e.stuck_text = text
        target = (
            EntryState.PENDING
            if e.state in (EntryState.PENDING, EntryState.PROVISIONING)
            else e.state
        )
        await self._report_locked(e, target, reason=text)

    def _unstuck(self, e: _Entry) -> None:
        if e.stuck_kind is not None:
            self._cancel_timer(e, "stuck_timer")
            e.stuck_kind = e.stuck_text = None

    async def _give_up(self, e: _Entry, kind: str, grace: float) -> None:
        async with e.lock:
            if e.finished or e.stuck_kind != kind:
                return
            how = f" (for more than {grace:g}s)" if grace else ""
            await self._end(
                e, EntryState.FAILED, f"{e.stuck_text}{how}; gave up", None, delete=True
            )

    # ------------------------------------------------------------------ timers

    def _expire(self, e: _Entry) -> None:
        self._later(self._expire_now, e)

    async def _expire_now(self, e: _Entry) -> None:
        async with e.lock:
            if not e.finished:
                await self._end(
                    e, EntryState.EXPIRED, walltime_exceeded(e.spec), None, delete=True
                )

    def _arm_health(self, e: _Entry) -> None:
        health = e.spec.health
        if health is None or e.health_timer is not None:
            return
        e.health_timer = asyncio.get_running_loop().call_later(
            health.timeout_s, self._later, self._unhealthy, e
        )

    async def _unhealthy(self, e: _Entry) -> None:
        async with e.lock:
            e.health_timer = None
            if e.finished or e.ready:
                return
            health = e.spec.health
            assert health is not None
            await self._end(
                e,
                EntryState.FAILED,
                health_failure(health, e.mirror.wd, probe="readiness probe"),
                None,
                delete=True,
            )

    def _cancel_timer(self, e: _Entry, attr: str) -> None:
        timer = getattr(e, attr)
        if timer is not None:
            timer.cancel()
            setattr(e, attr, None)

    def _stop_timers(self, e: _Entry) -> None:
        for attr in ("stuck_timer", "walltime_timer", "health_timer"):
            self._cancel_timer(e, attr)

    # ------------------------------------------------------------------ logs

    def _follow(self, e: _Entry, pod: str, source: str) -> None:
        """Follow this pod's log into the mirror (once per source)."""
        if e.follow_source == source or e.finished or self._closed:
            return
        previous = e.follow_pod if e.spec.kind == "job" else None
        if e.follow_task is not None:
            e.follow_task.cancel()
        e.follow_source, e.follow_pod = source, pod
        e.follow_task = asyncio.get_running_loop().create_task(
            self._follow_loop(e, pod, source, previous), name=f"sciorch-kube-log-{e.id}"
        )

    async def _follow_loop(self, e: _Entry, pod: str, source: str, previous: str | None) -> None:
        api = self._api()
        if previous is not None and previous != pod and e.mirror.source == previous:
            await self._read_rest(e, previous)  # the end of the last attempt's log
        backoff = 0.1
        while not e.finished and not self._closed:
            async with e.log_lock:
                e.mirror.switch(source)
                skip = e.mirror.reconnecting()
            got = 0
            try:
                async for chunk in api.follow_log(e.namespace, pod, CONTAINER):
                    if got + len(chunk) <= skip:
                        got += len(chunk)
                        continue
                    if got < skip:
                        chunk = chunk[skip - got :]
                        got = skip
                    got += len(chunk)
                    async with e.log_lock:
                        if e.mirror.source != source:
                            return
                        records = e.mirror.feed(chunk)
                    await self._publish(e, records)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except KubeApiError as exc:
                if exc.status == 404:
                    return  # the pod is gone
                log.debug("following %s/%s: %s", e.namespace, pod, exc)
            except KubeUnreachable as exc:
                log.debug("following %s/%s: %s", e.namespace, pod, exc)
            if self._pod_done(e, pod):
                async with e.log_lock:
                    records = e.mirror.finish() if e.mirror.source == source else []
                await self._publish(e, records)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _pod_done(self, e: _Entry, pod: str) -> bool:
        p = e.pods.get(pod)
        if p is None:
            return True
        if _dig(p, "status", "phase") in ("Succeeded", "Failed"):
            return True
        return e.spec.kind == "job" and bool(_dig(_main_status(p), "state", "terminated"))

    async def _read_rest(self, e: _Entry, pod: str) -> None:
        """Read a pod's whole log once and mirror what was not mirrored yet."""
        try:
            data = await self._retry(lambda: self._api().read_log(e.namespace, pod, CONTAINER))
        except (KubeApiError, KubeUnreachable) as exc:
            log.info("entry %s: last read of %s's log failed: %s", e.id, pod, exc)
            return
        async with e.log_lock:
            if e.mirror.source != pod and e.mirror.source is not None:
                if not (e.mirror.source or "").startswith(pod + "#"):
                    return
            if e.mirror.source is None:
                e.mirror.switch(pod)
            skip = e.mirror.reconnecting()
            records = e.mirror.feed(data[skip:]) + e.mirror.finish()
        await self._publish(e, records)

    async def _final_log(self, e: _Entry) -> None:
        """Before the final report: stop following and mirror the rest of the log."""
        if e.log_final:
            return
        e.log_final = True
        task, e.follow_task = e.follow_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pod = e.follow_pod
        if pod is None:
            # The Job's end can arrive before its pod's news (separate watches): ask.
            with contextlib.suppress(KubeApiError, KubeUnreachable):
                pods, _ = await self._api().list(
                    "Pod", e.namespace, label_selector=f"{ENTRY_LABEL}={label_value(e.id)}"
                )
                e.pods.update({_name(p): p for p in pods})
            current = self._current_pod(e)
            if current is not None and _dig(current, "status", "phase") != "Pending":
                pod = _name(current)
        if pod is not None:
            await self._read_rest(e, pod)

    async def _publish(self, e: _Entry, records: list[tuple[int, dict[str, Any]]]) -> None:
        size = e.mirror.log_size()
        if size > e.log_size:
            e.log_size = size
            await self._call(e.id, "log_grew", size)
        for index, record in records:
            await self._call(e.id, "stream_record", index, record)

    # ------------------------------------------------------------------ reporting

    def _accept(
        self, e: _Entry, state: EntryState, kw: Mapping[str, Any], force: bool
    ) -> bool:
        """A state, or for the same state a new reason, handle or restart count, is news;
        steps the state machine does not allow are not."""
        reason = kw.get("reason")
        facts = {k: kw[k] for k in ("handle", "restarts", "endpoint") if kw.get(k) is not None}
        if state == e.state:
            if reason == e.reason and all(e.reported.get(k) == v for k, v in facts.items()):
                return False
        elif not can_transition(e.state, state):
            return False
        e.reason = reason
        e.reported.update(facts)
        return True

    async def _end(
        self,
        e: _Entry,
        state: EntryState,
        reason: str | None,
        exit_code: int | None,
        *,
        delete: bool,
    ) -> None:
        """Report the final state after a last read of the log; e.lock held."""
        if e.finished:
            return
        self._stop_timers(e)
        await self._final_log(e)
        if delete:
            try:
                await self._delete_objects(e.namespace, e.name, e.workload)
            except (BackendError, KubeUnreachable) as exc:
                if state == EntryState.CANCELLED:
                    raise
                reason = f"{reason}; deleting its objects failed: {exc.message}"
        await self._finished_locked(e, state, reason, exit_code)
        self._maybe_unwatch(e.namespace)

    def _final_facts(self, e: _Entry) -> dict[str, Any]:
        return {"handle": self._handle(e)}

    def _handle(self, e: _Entry, pod: str | None = None) -> dict[str, Any]:
        return {
            "namespace": e.namespace,
            "kind": e.workload,
            "name": e.name,
            "objects": [
                f"ConfigMap/{params_name(e.id)}",
                f"{e.workload}/{e.name}",
                *([f"Service/{e.name}"] if e.spec.kind == "service" else []),
                *(
                    [f"Ingress/{e.name}"]
                    if e.spec.kind == "service" and self.options.ingress_enabled
                    else []
                ),
            ],
            "pod": pod or e.follow_pod,
            "workdir": str(e.mirror.wd.root),
            "started_at": e.started_at,
            "restarts": e.restarts,
        }

    # ------------------------------------------------------------------ cluster facts

    def _maybe_refresh(self) -> None:
        if self._closed or self.api is None:
            return
        stale = time.monotonic() - self._refreshed > self.options.refresh_s
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_cluster())

    async def _refresh_cluster(self) -> None:
        try:
            await self._refresh_cluster_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("site %s: reading the cluster's nodes failed", self.name)

    async def _refresh_cluster_once(self) -> None:
        api = self._api()
        self._refreshed = time.monotonic()
        try:
            nodes, _ = await api.list("Node")
            self._nodes = [self._node(n) for n in nodes]
            self._nodes_note = None
        except KubeApiError as exc:
            self._nodes_note = f"cannot list nodes ({exc.status} {exc.reason})"
        except KubeUnreachable as exc:
            self._unreachable = f"API server unreachable: {exc.message}"
            return
        self._unreachable = None
        try:
            pending, _ = await api.list("Pod", None, field_selector="status.phase=Pending")
            self._pending_pods = len(pending)
        except (KubeApiError, KubeUnreachable):
            self._pending_pods = None

    def _node(self, n: Mapping[str, Any]) -> _Node:
        alloc = _dig(n, "status", "allocatable") or {}
        labels = _dig(n, "metadata", "labels") or {}
        gpu_type = next(
            (
                t
                for t, sel in self.options.gpu_node_selectors.items()
                if sel and all(labels.get(k) == v for k, v in sel.items())
            ),
            None,
        )
        return _Node(
            name=_name(n),
            cpus=parse_quantity(alloc.get("cpu")),
            memory_mb=int(parse_quantity(alloc.get("memory")) / (1024 * 1024)),
            gpus=math.floor(parse_quantity(alloc.get(self.options.gpu_resource))),
            gpu_type=gpu_type,
            ready=_true(n, "Ready") and not _dig(n, "spec", "unschedulable"),
        )

    def _never_fits(self, res: Resources) -> tuple[str, str] | None:
        o = self.options
        if res.gpus and res.gpu_type:
            if res.gpu_type not in o.gpu_node_selectors:
                have = ", ".join(sorted(o.gpu_node_selectors)) or "none configured"
                return (
                    "resources.gpu_type",
                    f"has no node selector for GPU type {res.gpu_type!r} "
                    f"(gpu_node_selectors: {have})",
                )
        nodes = [n for n in self._nodes or [] if n.ready]
        most_gpus = o.gpus if o.gpus is not None else max((n.gpus for n in nodes), default=0)
        if res.gpus and (nodes or o.gpus is not None) and res.gpus > most_gpus:
            return "resources.gpus", f"needs {res.gpus} GPUs; the largest node has {most_gpus}"
        if o.max_walltime_s is not None and res.walltime_s > o.max_walltime_s:
            return (
                "resources.walltime_s",
                f"walltime {format_duration(res.walltime_s)} exceeds the site's maximum "
                f"{format_duration(o.max_walltime_s)}",
            )
        return None

    # ------------------------------------------------------------------ small parts

    def _api(self) -> KubeApi:
        if self.api is None:
            raise BackendError(f"kubernetes backend {self.name!r} is not started")
        return self.api

    def _require_started(self) -> None:
        if self._reporter is None or self._closed or self.api is None:
            raise BackendError(f"kubernetes backend {self.name!r} is not started")

    def _workdir(self, entry_id: str, handle: Mapping[str, Any]) -> WorkDir:
        return WorkDir(Path(handle.get("workdir") or self.entries_dir / entry_id))

    def _later(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run fn(*args) as a background task (timers call this when they fire)."""
        if not self._closed:
            self._spawn(fn(*args))


__all__ = ["KubernetesBackend", "KubernetesOptions", "parse_quantity"]
