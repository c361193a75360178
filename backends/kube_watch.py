"""The kubernetes backend's watches: for each namespace it uses, Pods, Jobs and core/v1 Events
are listed, then watched from the list's resourceVersion; a watch reconnects from the last
version seen when it ends or drops, lists again on 410 Gone and backs off on errors. What a
watch sees goes to the handlers; after a fresh list they are told what the list holds (so they
can tell what was deleted while nobody watched).

`SiteWatches` is the site's side of it: one `NamespaceWatch` per namespace with a live entry,
and the handlers that keep each entry's copy of its objects (its Job, its pods, the warnings
Events say about them), then ask the backend to evaluate the entry again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from backends.kube_api import KubeApi, KubeApiError, KubeGone, KubeUnreachable
from backends.kube_manifests import ENTRY_LABEL, MANAGED_BY, MANAGER, SITE_LABEL, label_value
from backends.kube_status import dig, event_problem, name_of
from backends.kube_sweep import INDEX_KEY, SWEEP_LABEL
from backends.supervisor import EntryRecord

log = logging.getLogger("sciorch.backends.kubernetes")

Handler = Callable[[str, dict[str, Any]], Awaitable[None]]
Relisted = Callable[[str, str, list[dict[str, Any]], Handler], Awaitable[None]]


async def dispatch(handler: Handler, typ: str, obj: dict[str, Any]) -> None:
    """Hand one object to a handler; a handler's failure is logged, never fatal to the watch."""
    try:
        await handler(typ, obj)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handling %s %s failed", typ, name_of(obj))


class NamespaceWatch:
    """The watches of one namespace: one task per (kind, label selector, handler).
    `problems` holds why a kind cannot be watched (for the site's status); `reachable(why)`
    hears whether the API server answers (None: it does)."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        kinds: Sequence[tuple[str, str | None, Handler]],
        *,
        relisted: Relisted,
        reachable: Callable[[str | None], None],
        closed: Callable[[], bool],
        timeout_s: int,
    ) -> None:
        self.namespace = namespace
        self.problems: dict[str, str] = {}
        self._api = api
        self._relisted = relisted
        self._reachable = reachable
        self._closed = closed
        self._timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(
                self._loop(kind, selector, handler),
                name=f"sciorch-kube-watch-{kind}-{namespace}",
            )
            for kind, selector, handler in kinds
        ]

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _loop(self, kind: str, selector: str | None, handler: Handler) -> None:
        """List, then watch from the list's resourceVersion; reconnect from the last version
        seen when the stream ends or drops; list again on 410 Gone; back off on errors."""
        api, w = self._api, self
        rv: str | None = None
        backoff = 0.1
        while not self._closed():
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
                    timeout_s=self._timeout_s,
                ):
                    if ev.type == "CONNECTED":
                        w.problems.pop(kind, None)
                        self._reachable(None)
                        continue
                    seen += 1
                    if ev.resource_version:
                        rv = ev.resource_version
                    if ev.type in ("ADDED", "MODIFIED", "DELETED"):
                        await dispatch(handler, ev.type, ev.object)
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
                self._reachable(f"API server unreachable: {exc.message}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:
                log.exception("watch %s in %s failed", kind, w.namespace)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


# ----------------------------------------------------------------------------- the site's watches


@dataclass(eq=False, kw_only=True)
class WatchedEntry(EntryRecord):
    """An entry's objects as the watches last saw them."""

    namespace: str
    name: str
    job: dict[str, Any] | None = None
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, tuple[str, str]] = field(default_factory=dict)  # object -> (kind, text)
    index: int | None = None  # a sweep element: its index in the Indexed Job `name`

    @property
    def pod_selector(self) -> str:
        if self.index is None:
            return f"{ENTRY_LABEL}={label_value(self.id)}"
        return f"batch.kubernetes.io/job-name={self.name},{INDEX_KEY}={self.index}"

    @property
    def job_selector(self) -> str:
        if self.index is None:
            return f"{ENTRY_LABEL}={label_value(self.id)}"
        return f"{SWEEP_LABEL}={self.name}"

    def owns_event_about(self, target: str) -> bool:
        if self.index is not None:
            return target == self.name or target.startswith(f"{self.name}-{self.index}-")
        return target == self.name or target.startswith(self.name + "-")


E = TypeVar("E", bound=WatchedEntry)
OnEntry = Callable[[E], Awaitable[None]]


class SiteWatches(Generic[E]):
    """The watches of a site's namespaces and their handlers. A handler updates the entry's
    objects under its lock, then calls `evaluate(entry)` (lock held); `job_deleted(entry)`
    (lock held) hears that an entry's Job was deleted."""

    def __init__(
        self,
        site: str,
        api: Callable[[], KubeApi],
        entries: Mapping[str, E],
        *,
        evaluate: OnEntry[E],
        job_deleted: OnEntry[E],
        reachable: Callable[[str | None], None],
        closed: Callable[[], bool],
        timeout_s: int,
    ) -> None:
        self._site = site
        self._api = api
        self._entries = entries
        self._evaluate = evaluate
        self._job_deleted = job_deleted
        self._reachable = reachable
        self._closed = closed
        self._timeout_s = timeout_s
        self.by_namespace: dict[str, NamespaceWatch] = {}

    def problems(self) -> list[str]:
        """Why some kinds cannot be watched (for the site's status), sorted."""
        return sorted({p for w in self.by_namespace.values() for p in w.problems.values()})

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for w in self.by_namespace.values() for t in w.tasks]

    def watch(self, ns: str) -> None:
        if ns in self.by_namespace or self._closed():
            return
        ours = f"{MANAGED_BY}={MANAGER},{SITE_LABEL}={label_value(self._site)}"
        self.by_namespace[ns] = NamespaceWatch(
            self._api(),
            ns,
            [
                ("Pod", ours, self._on_pod),
                ("Job", ours, self._on_job),
                ("Event", None, self._on_event),
            ],
            relisted=self._relisted,
            reachable=self._reachable,
            closed=self._closed,
            timeout_s=self._timeout_s,
        )

    def maybe_unwatch(self, ns: str) -> None:
        """Stop watching a namespace none of whose entries is live any more."""
        if any(e.namespace == ns and not e.finished for e in self._entries.values()):
            return
        w = self.by_namespace.pop(ns, None)
        if w is not None:
            w.cancel()

    async def unwatch(self, ns: str) -> None:
        w = self.by_namespace.pop(ns, None)
        if w is not None:
            await w.aclose()

    async def sync_entry(self, e: E) -> None:
        """Feed the entry's current objects through the handlers (after an adoption)."""
        try:
            pods, _ = await self._api().list("Pod", e.namespace, label_selector=e.pod_selector)
            jobs: list[dict[str, Any]] = []
            if e.spec.kind == "job":
                jobs, _ = await self._api().list("Job", e.namespace, label_selector=e.job_selector)
        except (KubeApiError, KubeUnreachable) as exc:
            log.warning("syncing %s: %s; the watches will tell", e.id, exc)
            return
        for pod in pods:
            await dispatch(self._on_pod, "ADDED", pod)
        for job in jobs:
            await dispatch(self._on_job, "ADDED", job)

    async def _relisted(
        self, kind: str, ns: str, items: list[dict[str, Any]], handler: Handler
    ) -> None:
        """A fresh list: what it lacks was deleted while nobody watched."""
        names = {name_of(i) for i in items}
        for e in [x for x in self._entries.values() if x.namespace == ns and not x.finished]:
            if kind == "Pod":
                for gone in [p for p in e.pods if p not in names]:
                    await dispatch(handler, "DELETED", e.pods[gone])
            elif kind == "Job" and e.job is not None and e.name not in names:
                await dispatch(handler, "DELETED", e.job)
        for item in items:
            await dispatch(handler, "ADDED", item)

    def _entry_of(self, obj: Mapping[str, Any]) -> E | None:
        found = self._entries_of(obj)
        return found[0] if found else None

    def _entries_of(self, obj: Mapping[str, Any]) -> list[E]:
        """The live entries an object is about: its entry's, or for a sweep's Indexed Job
        every element's, for one of its pods the element of the pod's completion index."""
        labels = dig(obj, "metadata", "labels") or {}
        eid = labels.get(ENTRY_LABEL)
        if eid:
            e = self._entries.get(str(eid))
            return [] if e is None or e.finished else [e]
        job = labels.get(SWEEP_LABEL)
        if not job:
            return []
        ns = dig(obj, "metadata", "namespace")
        index = labels.get(INDEX_KEY)
        return [
            e
            for e in self._entries.values()
            if not e.finished
            and e.index is not None
            and e.name == job
            and e.namespace == ns
            and (index is None or str(e.index) == index)
        ]

    async def _on_pod(self, typ: str, pod: dict[str, Any]) -> None:
        e = self._entry_of(pod)
        if e is None:
            return
        async with e.lock:
            if e.finished:
                return
            name = name_of(pod)
            if typ == "DELETED":
                e.pods.pop(name, None)
            else:
                e.pods[name] = pod
            await self._evaluate(e)

    async def _on_job(self, typ: str, job: dict[str, Any]) -> None:
        for e in self._entries_of(job):
            if name_of(job) != e.name:
                continue
            async with e.lock:
                if e.finished:
                    continue
                if typ == "DELETED":
                    await self._job_deleted(e)
                    continue
                e.job = job
                await self._evaluate(e)

    async def _on_event(self, typ: str, ev: dict[str, Any]) -> None:
        if typ == "DELETED":
            return
        said = event_problem(ev)
        if said is None:
            return
        target = str(dig(ev, "involvedObject", "name") or "")
        ns = str(dig(ev, "involvedObject", "namespace") or dig(ev, "metadata", "namespace"))
        for e in list(self._entries.values()):
            if e.finished or e.namespace != ns:
                continue
            if e.owns_event_about(target):
                async with e.lock:
                    if e.finished:
                        return
                    e.events[target] = said
                    await self._evaluate(e)
                return


__all__ = ["Handler", "NamespaceWatch", "SiteWatches", "WatchedEntry", "dispatch"]
