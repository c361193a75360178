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
    The command's wrapper writes stream records, the result, artifact names and the exit status
    into the pod log between `@@sciorch:` markers; the backend follows each running pod's log
    into a local mirror of the work dir that `read_logs` and `read_results` serve (the markers
    and the mirror: backends.kube_log). The files under output/ stay in the pod; where the
    server's storage makes upload forms (S3: a POST policy for the entry's prefix), the form
    reaches the pod in a Secret and the wrapper uploads each file before it exits, so they are
    in storage, and served from there, by the time the Job completes.

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
    impersonate = true                    # with [sites.accounts]: calls for an entry act as its
    impersonate_groups = ["sciorch-users"]   # account (Impersonate-User, -Group); RBAC decides

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
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import (
    LaunchSpec,
    Reporter,
    WorkDir,
    site_options,
)
from backends.kube_api import Identity, KubeApi, KubeApiError, KubeUnreachable, retry
from backends.kube_cluster import ClusterFacts, Running
from backends.kube_log import LogFollower, Mirror, Records
from backends.kube_manifests import (
    KubernetesOptions,
    build_manifests,
    check_bundle,
    endpoint,
    namespace_name,
    object_name,
    object_refs,
    upload_name,
)
from backends.kube_objects import SiteObjects
from backends.kube_status import (
    condition,
    current_pod,
    dig,
    exit_code,
    is_true,
    main_status,
    name_of,
    pending_pod,
    pod_done,
)
from backends.kube_sweep import (
    INDEX_KEY,
    indexed_manifests,
    parse_indexes,
    sweep_configmap_name,
)
from backends.kube_watch import SiteWatches, WatchedEntry
from backends.supervisor import (
    Supervisor,
    health_failure,
    restart_allowed,
    restart_reason,
    walltime_exceeded,
    with_tail,
)
from ground.errors import BackendError
from ground.models import (
    Capabilities,
    EntryState,
    Resources,
    SiteStatus,
    can_transition,
    format_duration,
)

log = logging.getLogger("sciorch.backends.kubernetes")


# ----------------------------------------------------------------------------- bookkeeping


@dataclass(eq=False, kw_only=True)
class _Entry(WatchedEntry):
    mirror: Mirror
    endpoint: str | None
    pod_restarts: dict[str, int] = field(default_factory=dict)
    failed_pods: set[str] = field(default_factory=set)
    stuck_kind: str | None = None
    stuck_text: str | None = None
    stuck_timer: asyncio.TimerHandle | None = None
    health_timer: asyncio.TimerHandle | None = None
    follower: LogFollower
    log_size: int = 0
    reported: dict[str, Any] = field(default_factory=dict)

    @property
    def workload(self) -> str:
        return "Job" if self.spec.kind == "job" else "Deployment"


# ----------------------------------------------------------------------------- the backend


class KubernetesBackend(Supervisor[_Entry]):
    """Runs entries on a Kubernetes cluster. See the module docstring."""

    kind = "kubernetes"
    # Inputs reach the pod by URL (an init container downloads them), not as server files.
    stages_from_urls = True
    # Outputs leave it the same way: the wrapper uploads them to the site's object storage.
    uploads_outputs = True

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        entries_dir: Path,
        api: KubeApi | None = None,
    ) -> None:
        opts = site_options(KubernetesOptions, name, options)
        super().__init__(name, entries_dir)
        self.options = opts
        self.api = api
        self._own_api = api is None
        self.watches: SiteWatches[_Entry] = SiteWatches(
            name,
            self._api,
            self._entries,
            evaluate=self._evaluate,
            job_deleted=self._job_deleted,
            reachable=self._reachable,
            closed=lambda: self._closed,
            timeout_s=opts.watch_timeout_s,
        )
        self.objects = SiteObjects(name, opts, self._api)
        self.cluster = ClusterFacts(name, opts)

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
            await asyncio.wait_for(self.cluster.refresh(self.api), timeout=5)

    async def close(self) -> None:
        """Stop watching and following; what runs on the cluster keeps running."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = list(self.watches.tasks())
        for e in self._entries.values():
            self._stop_timers(e)
            if e.follower.task is not None:
                tasks.append(e.follower.task)
        tasks += list(self._bg)
        tasks += self.cluster.tasks()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watches.by_namespace.clear()
        self._entries.clear()
        self.objects.namespaces.clear()
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
        return self.cluster.capabilities()

    async def status(self) -> tuple[SiteStatus, str | None]:
        self._maybe_refresh()
        if self.cluster.unreachable:
            return SiteStatus.DOWN, self.cluster.unreachable
        if self.cluster.no_node_ready():
            return SiteStatus.DEGRADED, "no node is Ready and schedulable"
        problems = self.watches.problems()
        if problems:
            return SiteStatus.DEGRADED, "; ".join(problems)
        return SiteStatus.UP, None

    async def estimate_wait(self, resources: Resources) -> float:
        self._maybe_refresh()
        waiting = (EntryState.PENDING, EntryState.PROVISIONING)
        active = [
            Running(e.spec.resources, e.started_at, e.state in waiting)
            for e in self._entries.values()
            if not e.finished
        ]
        return self.cluster.estimate_wait(resources, active)

    # ------------------------------------------------------------------ protocol: entries

    async def submit_array(self, specs: list[LaunchSpec], throttle: int | None) -> None:
        """A sweep as one Indexed Job (backends.kube_sweep); element i is its index i. When
        the elements cannot share one pod template, each is submitted on its own."""
        specs = [s for s in specs if self._is_new(s, self.cluster.never_fits(s.resources))]
        if not specs:
            return
        one_account = len({s.account for s in specs}) == 1  # calls impersonate one user
        manifests = indexed_manifests(specs, throttle, self.options, self.name)
        if manifests is None or not one_account:
            for s in specs:
                await self.submit(s)
            return
        problems = check_bundle(manifests)
        if problems:
            raise BackendError(
                f"site {self.name!r}: the Indexed Job of sweep {specs[0].sweep_id} is invalid: "
                + "; ".join(problems)
            )
        job = str(manifests[1]["metadata"]["name"])
        elements = []
        for i, s in enumerate(specs):
            e = self._new_entry(s, EntryState.PENDING)
            e.name, e.index = job, i
            elements.append(e)
            self._entries[e.id] = e
        api = self._api_for(specs[0].account)
        try:
            ns = await self.objects.ensure_namespace(specs[0].event_id, api)
            self.watches.watch(ns)
            for body in manifests:
                await self.objects.create(body, specs[0].entry_id, api)
        except BaseException:
            for e in elements:
                self._entries.pop(e.id, None)
            for kind, name in (("Job", job), ("ConfigMap", sweep_configmap_name(job))):
                with contextlib.suppress(Exception):
                    await api.delete(kind, elements[0].namespace, name)
            self.watches.maybe_unwatch(elements[0].namespace)
            raise
        for e in elements:
            async with e.lock:
                if e.state == EntryState.PENDING and e.reason is None:
                    await self._report_locked(
                        e,
                        EntryState.PENDING,
                        reason=f"queued as index {e.index} of Indexed Job {e.namespace}/{job}",
                        handle=self._handle(e),
                    )

    async def submit(self, spec: LaunchSpec) -> None:
        if not self._is_new(spec, self.cluster.never_fits(spec.resources)):
            return
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
        api = self._api_for(spec.account)
        try:
            await self.objects.ensure_namespace(spec.event_id, api)
            self.watches.watch(e.namespace)
            for body in manifests:
                await self.objects.create(body, spec.entry_id, api)
                created.append(body)
        except BaseException:
            self._entries.pop(e.id, None)
            for body in reversed(created):
                with contextlib.suppress(Exception):
                    await api.delete(str(body["kind"]), e.namespace, str(body["metadata"]["name"]))
            self.watches.maybe_unwatch(e.namespace)
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
            if ns and name and handle.get("index") is not None:
                await self._cancel_element(
                    str(ns), str(name), int(handle["index"]), self._api_for(handle.get("account"))
                )
            elif ns and name:
                kind = "Job" if handle.get("kind") == "Job" else "Deployment"
                api = self._api_for(handle.get("account"))
                await self.objects.delete_objects(str(ns), str(name), kind, api)
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
        if not self._adoptable(entry_id, state):
            return
        if not handle.get("name"):
            # The server stopped before the objects were created: submit again (idempotent).
            await self.submit(spec)
            return
        e = self._new_entry(spec, state, str(handle.get("namespace") or "") or None)
        if handle.get("index") is not None:
            e.name, e.index = str(handle["name"]), int(handle["index"])
        e.restarts = int(handle.get("restarts") or 0)
        started = handle.get("started_at")
        e.started_at = float(started) if started else None
        e.ready = state == EntryState.READY
        e.log_size = e.mirror.log_size()
        try:
            found = await self._api_for(spec.account).get(e.workload, e.namespace, e.name)
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
        self.objects.namespaces.add(e.namespace)
        if spec.kind == "service" and e.started_at is not None:
            self._arm_walltime(e)
        self.watches.watch(e.namespace)
        await self.watches.sync_entry(e)

    async def release_event(self, event_id: str) -> None:
        """The event has ended: stop what is left of it and delete its namespace."""
        ns = namespace_name(self.options.namespace_prefix, event_id)
        for e in [x for x in self._entries.values() if x.namespace == ns]:
            async with e.lock:
                if not e.finished:
                    e.cancel_requested = True
                    await self._end(e, EntryState.CANCELLED, "event stopped", None, delete=False)
        await self.watches.unwatch(ns)
        self.objects.namespaces.discard(ns)
        await retry(lambda: self._api().delete("Namespace", None, ns))

    # ------------------------------------------------------------------ creating

    def _new_entry(
        self, spec: LaunchSpec, state: EntryState, namespace: str | None = None
    ) -> _Entry:
        wd = WorkDir(self.entries_dir / spec.entry_id)
        ep = endpoint(spec, self.options, self.name) if spec.kind == "service" else None
        ns = namespace or namespace_name(self.options.namespace_prefix, spec.event_id)
        mirror = Mirror(wd, markers=spec.kind == "job")
        e = _Entry(
            spec=spec,
            workdir=wd,
            namespace=ns,
            name=object_name(spec.entry_id),
            mirror=mirror,
            follower=LogFollower(
                mirror,
                spec.entry_id,
                ns,
                is_job=spec.kind == "job",
                publish=lambda records: self._publish(e, records),
                pod_done=lambda pod: pod_done(e.pods.get(pod), spec.kind == "job"),
                stopped=lambda: e.finished or self._closed,
            ),
            endpoint=ep,
            state=state,
        )
        return e

    # ------------------------------------------------------------------ watching

    def _reachable(self, why: str | None) -> None:
        self.cluster.unreachable = why

    async def _job_deleted(self, e: _Entry) -> None:
        if not e.cancel_requested:
            await self._end(
                e,
                EntryState.FAILED,
                f"its Job {e.namespace}/{e.name} was deleted outside sciorch",
                None,
                delete=True,
            )

    # ------------------------------------------------------------------ the state machine

    async def _evaluate(self, e: _Entry) -> None:
        """Report what the objects say now (called with e.lock held)."""
        if e.finished:
            return
        if e.spec.kind == "job":
            await self._evaluate_job(e)
        else:
            await self._evaluate_service(e)

    async def _evaluate_job(self, e: _Entry) -> None:
        pod = current_pod(e.pods)
        if pod is not None:
            await self._observe_job_pod(e, pod)
            if e.finished:
                return
        job = e.job
        if e.index is not None:
            await self._evaluate_element(e, job)
            return
        if job is not None and (is_true(job, "Complete") or is_true(job, "SuccessCriteriaMet")):
            await self._end(e, EntryState.SUCCEEDED, None, 0, delete=False)
            return
        failed = condition(job, "Failed")
        if failed is None or failed.get("status") != "True":
            failed = condition(job, "FailureTarget")
        if failed is not None and failed.get("status") == "True":
            why = str(failed.get("reason") or "")
            await self._final_log(e)  # the exit code may be in it, and the pods are fresh
            code = self._exit_code(e, current_pod(e.pods))
            if why == "DeadlineExceeded":
                walltime = format_duration(int(dig(job, "spec", "activeDeadlineSeconds") or 0))
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

    async def _evaluate_element(self, e: _Entry, job: dict[str, Any] | None) -> None:
        """A sweep element: its index among the Job's completed or failed indexes ends it;
        the Job failing as a whole (its deadline) ends the elements not done."""
        if job is None:
            return
        if e.index in parse_indexes(dig(job, "status", "completedIndexes")):
            await self._end(e, EntryState.SUCCEEDED, None, 0, delete=False)
            return
        if e.index in parse_indexes(dig(job, "status", "failedIndexes")):
            await self._final_log(e)
            code = self._exit_code(e, current_pod(e.pods))
            tries = len(e.failed_pods) or 1
            what = f"exit code {code}" + (f" (after {tries} attempts)" if tries > 1 else "")
            await self._end(e, EntryState.FAILED, with_tail(what, e.mirror.wd), code, delete=False)
            return
        failed = condition(job, "Failed")
        if failed is not None and failed.get("status") == "True":
            why = str(failed.get("reason") or "")
            if why == "FailedIndexes":
                return  # the other indexes' news; ours has not arrived yet
            state = EntryState.EXPIRED if why == "DeadlineExceeded" else EntryState.FAILED
            text = str(failed.get("message") or why or "the Job failed")
            await self._end(e, state, f"its Indexed Job ended: {text}", None, delete=False)

    async def _cancel_element(self, ns: str, job: str, index: int, api: KubeApi) -> None:
        """Kubernetes cannot cancel one index: mark it cancelled in the sweep's ConfigMap (a pod
        that starts for it exits at once) and delete its pods (their launcher exits with the
        code the Job's podFailurePolicy turns into FailIndex). See backends.kube_sweep. The
        last live element of the Job takes the Job and its ConfigMap with it."""
        cm = sweep_configmap_name(job)
        mark = {"data": {f"cancelled-{index}": "1"}}
        try:
            await retry(lambda: api.patch("ConfigMap", ns, cm, mark))
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            return  # the sweep's objects are gone (the whole sweep was cancelled)
        selector = f"batch.kubernetes.io/job-name={job},{INDEX_KEY}={index}"
        pods, _ = await retry(lambda: api.list("Pod", ns, label_selector=selector))
        for pod in pods:
            await retry(functools.partial(api.delete, "Pod", ns, name_of(pod)))
        live = [
            x
            for x in self._entries.values()
            if x.index not in (None, index)
            and x.name == job
            and x.namespace == ns
            and not (x.finished or x.cancel_requested or x.expired)
        ]
        if not live:
            for kind, name in (("Job", job), ("ConfigMap", cm)):
                await retry(functools.partial(api.delete, kind, ns, name))

    def _exit_code(self, e: _Entry, pod: Mapping[str, Any] | None) -> int | None:
        code = exit_code(pod)
        return code if code is not None else e.mirror.exit_code

    async def _observe_job_pod(self, e: _Entry, pod: dict[str, Any]) -> None:
        phase = dig(pod, "status", "phase")
        name = name_of(pod)
        if phase == "Pending" or phase is None:
            await self._pending_pod(e, pod)
            return
        self._unstuck(e)
        if phase == "Running" and e.state in (EntryState.PENDING, EntryState.PROVISIONING):
            e.started_at = e.started_at or time.time()
            await self._report_locked(
                e, EntryState.RUNNING, reason=None, handle=self._handle(e, name)
            )
            if e.index is not None:
                self._arm_walltime(e)  # the Job's deadline bounds the whole sweep
        # Followed only now: a record announced from the log never precedes 'running'.
        if phase in ("Running", "Succeeded", "Failed"):
            self._follow(e, name, name)
        if phase == "Failed" and name not in e.failed_pods:
            e.failed_pods.add(name)
            if e.index is None:
                limit = int(dig(e.job, "spec", "backoffLimit") or 0)
                over = is_true(e.job, "Failed")
            else:
                limit = int(dig(e.job, "spec", "backoffLimitPerIndex") or 0)
                over = e.index in parse_indexes(dig(e.job, "status", "failedIndexes"))
            if len(e.failed_pods) <= limit and not over:
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
        pod = current_pod(e.pods)
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
        name = name_of(pod)
        phase = dig(pod, "status", "phase")
        cs = main_status(pod)
        count = int(cs.get("restartCount") or 0)
        seen = e.pod_restarts.get(name, 0)
        if count > seen:
            e.pod_restarts[name] = count
            e.restarts += count - seen
            last = dig(cs, "lastState", "terminated") or {}
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
            why = dig(pod, "status", "reason") or phase
            await self._report_locked(
                e,
                EntryState.PROVISIONING,
                reason=f"pod {name} ended ({why}); waiting for a new one",
            )
            return
        ready = is_true(pod, "Ready")
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
        name = name_of(pod)
        seen = pending_pod(pod, e.events.get(name))
        if seen.stuck is not None:
            await self._stuck(e, seen.stuck, seen.text, fatal=seen.fatal)
            return
        self._unstuck(e)
        if seen.scheduled:
            await self._report_locked(
                e, EntryState.PROVISIONING, reason=seen.text, handle=self._handle(e, pod=name)
            )
        else:
            await self._report_locked(e, EntryState.PENDING, reason=seen.text)

    async def _stuck(self, e: _Entry, kind: str, text: str, fatal: bool = False) -> None:
        """A pod that does not get going: show why; give up after the grace period."""
        if e.stuck_kind != kind:
            self._cancel_timer(e, "stuck_timer")
            e.stuck_kind = kind
            grace = self.options.stuck_grace(kind, fatal)
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
                await self._end(e, EntryState.EXPIRED, walltime_exceeded(e.spec), None, delete=True)

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

    async def _final_log(self, e: _Entry) -> None:
        """Before the final report: stop following and mirror the rest of the log."""
        if e.follower.final:
            return
        await e.follower.stop()
        pod = e.follower.pod
        if pod is None:
            # The Job's end can arrive before its pod's news (separate watches): ask.
            with contextlib.suppress(KubeApiError, KubeUnreachable):
                pods, _ = await self._api_for(e.spec.account).list(
                    "Pod", e.namespace, label_selector=e.pod_selector
                )
                e.pods.update({name_of(p): p for p in pods})
            current = current_pod(e.pods)
            if current is not None and dig(current, "status", "phase") != "Pending":
                pod = name_of(current)
        if pod is not None:
            await e.follower.read_rest(self._api_for(e.spec.account), pod)

    def _follow(self, e: _Entry, pod: str, source: str) -> None:
        if not self._closed:
            e.follower.follow(self._api_for(e.spec.account), pod, source)

    async def _publish(self, e: _Entry, records: Records) -> None:
        size = e.mirror.log_size()
        if size > e.log_size:
            e.log_size = size
            await self._call(e.id, "log_grew", size)
        for index, record in records:
            await self._call(e.id, "stream_record", index, record)

    # ------------------------------------------------------------------ reporting

    def _accept(self, e: _Entry, state: EntryState, kw: Mapping[str, Any], force: bool) -> bool:
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
        if e.spec.outputs is not None and not delete:
            # The job has uploaded what it will: its form goes (it stays valid until it
            # expires, but no one in the namespace can read it any more).
            with contextlib.suppress(KubeApiError, KubeUnreachable):
                api = self._api_for(e.spec.account)
                await api.delete("Secret", e.namespace, upload_name(e.id))
        if delete:
            try:
                if e.index is not None:
                    api = self._api_for(e.spec.account)
                    await self._cancel_element(e.namespace, e.name, e.index, api)
                else:
                    await self.objects.delete_objects(
                        e.namespace, e.name, e.workload, self._api_for(e.spec.account)
                    )
            except KubeApiError as exc:
                if state == EntryState.CANCELLED:
                    raise self.objects.refusal(exc, f"cancel index {e.index} of {e.name}") from exc
                reason = f"{reason}; cancelling its index failed: {exc.message}"
            except (BackendError, KubeUnreachable) as exc:
                if state == EntryState.CANCELLED:
                    raise
                reason = f"{reason}; deleting its objects failed: {exc.message}"
        await self._finished_locked(e, state, reason, exit_code)
        self.watches.maybe_unwatch(e.namespace)

    def _final_facts(self, e: _Entry) -> dict[str, Any]:
        return {"handle": self._handle(e)}

    def _handle(self, e: _Entry, pod: str | None = None) -> dict[str, Any]:
        return {
            "namespace": e.namespace,
            "kind": e.workload,
            "name": e.name,
            "objects": object_refs(e.spec, self.options),
            "pod": pod or e.follower.pod,
            "workdir": str(e.mirror.wd.root),
            "started_at": e.started_at,
            "restarts": e.restarts,
        } | ({"index": e.index} if e.index is not None else {})

    def _maybe_refresh(self) -> None:
        if not self._closed:
            self.cluster.maybe_refresh(self.api)

    # ------------------------------------------------------------------ small parts

    def _api_for(self, account: str | None) -> KubeApi:
        """The connection calls made for an entry use: impersonating its account where the
        site says so (the watches of a namespace stay the site's own: they serve every entry
        in it)."""
        api = self._api()
        if not self.options.impersonate or not account:
            return api
        return api.acting_as(Identity(account, tuple(self.options.impersonate_groups)))

    def _api(self) -> KubeApi:
        if self.api is None:
            raise BackendError(f"kubernetes backend {self.name!r} is not started")
        return self.api

    def _require_started(self) -> None:
        super()._require_started()
        self._api()  # connected too

    def _more_artifacts(self, entry_id: str, wd: WorkDir) -> Collection[str]:
        """What the pod log announced (its files are in the pod, not in the mirror)."""
        e = self._entries.get(entry_id)
        return (e.mirror if e is not None else Mirror(wd, markers=True)).artifacts

    def _later(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run fn(*args) as a background task (timers call this when they fire)."""
        if not self._closed:
            self._spawn(fn(*args))


__all__ = ["KubernetesBackend", "KubernetesOptions"]
