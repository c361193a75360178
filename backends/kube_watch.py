"""The kubernetes backend's watches: for each namespace it uses, Pods, Jobs and core/v1 Events
are listed, then watched from the list's resourceVersion; a watch reconnects from the last
version seen when it ends or drops, lists again on 410 Gone and backs off on errors. What a
watch sees goes to the backend's handlers; after a fresh list the backend is told what the list
holds (so it can tell what was deleted while nobody watched)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from backends.kube_api import KubeApi, KubeApiError, KubeGone, KubeUnreachable
from backends.kube_status import name_of

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


__all__ = ["Handler", "NamespaceWatch", "dispatch"]
