"""The kubernetes backend's writes to the cluster: an event's namespace (created once, and
refused when it belongs to someone else or is still being deleted), an entry's objects (created
idempotently: one that exists and is the entry's own is fine) and deleting them again, each call
retried on server errors, with a refusal said in the site's words."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from backends.kube_api import KubeApi, KubeApiError, retry
from backends.kube_manifests import (
    ENTRY_LABEL,
    MANAGED_BY,
    MANAGER,
    KubernetesOptions,
    label_value,
    namespace_manifest,
)
from backends.kube_status import dig
from ground.errors import BackendError


class SiteObjects:
    """Creates and deletes one site's objects; `namespaces` are those known to exist."""

    def __init__(self, site: str, options: KubernetesOptions, api: Callable[[], KubeApi]) -> None:
        self.site = site
        self.options = options
        self._api = api
        self.namespaces: set[str] = set()

    def _as(self, api: KubeApi | None) -> Callable[[], KubeApi]:
        """The calls' connection: `api` (one acting as an entry's user), else the site's."""
        return (lambda: api) if api is not None else self._api

    async def ensure_namespace(self, event_id: str, api: KubeApi | None = None) -> str:
        body = namespace_manifest(event_id, self.site, self.options)
        ns = str(body["metadata"]["name"])
        if ns in self.namespaces:
            return ns
        conn = self._as(api)
        try:
            await retry(lambda: conn().create(body))
        except KubeApiError as exc:
            if exc.status != 409:
                raise self.refusal(exc, f"create namespace {ns}", conn()) from exc
            found = await retry(lambda: conn().get("Namespace", None, ns))
            labels = dig(found, "metadata", "labels") or {}
            if labels.get(MANAGED_BY) != MANAGER or labels.get("sciorch.io/event") != label_value(
                event_id
            ):
                raise BackendError(
                    f"site {self.site!r}: namespace {ns} already exists and does not belong to "
                    f"event {event_id}; choose another namespace_prefix",
                    field=f"sites.{self.site}.namespace_prefix",
                ) from exc
            if dig(found, "status", "phase") == "Terminating":
                raise BackendError(
                    f"site {self.site!r}: namespace {ns} is still being deleted; try again "
                    "in a moment"
                ) from exc
        self.namespaces.add(ns)
        return ns

    async def create(self, body: dict[str, Any], entry_id: str, api: KubeApi | None = None) -> None:
        kind = str(body["kind"])
        ns = str(body["metadata"]["namespace"])
        name = str(body["metadata"]["name"])
        conn = self._as(api)
        try:
            await retry(lambda: conn().create(body))
        except KubeApiError as exc:
            if exc.status != 409:
                raise self.refusal(exc, f"create {kind} {ns}/{name}", conn()) from exc
            found = await retry(lambda: conn().get(kind, ns, name))
            owner = (dig(found, "metadata", "labels") or {}).get(ENTRY_LABEL)
            if owner != label_value(entry_id):
                raise BackendError(
                    f"site {self.site!r}: {kind} {ns}/{name} already exists and is not "
                    f"entry {entry_id}'s",
                ) from exc
            # Ours already (a retried submit, an adoption): nothing to do.

    def refusal(self, exc: KubeApiError, what: str, api: KubeApi | None = None) -> BackendError:
        if exc.status == 403:
            who = (
                f"user {api.identity.user!r} (impersonated for this entry)"
                if api is not None and api.identity is not None
                else "the account sciorch uses"
            )
            return BackendError(
                f"site {self.site!r}: the cluster refused to {what} (403 Forbidden: "
                f"{exc.detail}); {who} needs that permission"
            )
        if exc.status == 422:
            return BackendError(
                f"site {self.site!r}: the cluster rejected {what} as invalid: {exc.detail}"
            )
        return BackendError(f"site {self.site!r}: could not {what}: {exc.message}")

    async def delete_objects(
        self, ns: str, name: str, workload: str, api: KubeApi | None = None
    ) -> None:
        conn = self._as(api)
        for kind, obj in (
            (workload, name),
            ("Ingress", name),
            ("Service", name),
            ("ConfigMap", name + "-params"),
            ("Secret", name + "-upload"),  # 404 (there was none): not an error
        ):
            if kind in ("Ingress", "Service") and workload == "Job":
                continue
            try:
                await retry(functools.partial(conn().delete, kind, ns, obj))
            except KubeApiError as exc:
                raise self.refusal(exc, f"delete {kind} {ns}/{obj}", conn()) from exc


__all__ = ["SiteObjects"]
