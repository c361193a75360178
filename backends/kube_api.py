"""The one place that talks to a Kubernetes API server: a small async adapter over the official
client's asyncio API (`kubernetes.aio`).

Objects go in and come out as plain dicts (bodies are still checked by the client's generated
models before they are sent). Errors become `KubeApiError` with the HTTP status; `KubeGone` is a
410 (a watch's resourceVersion is too old: list again); `KubeUnreachable` means no answer at all.
Watches and log follows are async iterators over one streaming response; they end quietly when
the server closes the stream (or it drops), and the caller decides whether to reconnect.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import aiohttp
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig
from pydantic import ValidationError

from ground.errors import BackendError

log = logging.getLogger("sciorch.backends.kubernetes")

_T = TypeVar("_T")
_R = TypeVar("_R")

_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def _given(**kw: Any) -> dict[str, Any]:
    """The query arguments that have a value (an empty selector or token is left out)."""
    return {k: v for k, v in kw.items() if v}


class KubeApiError(BackendError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str, what: str = "") -> None:
        text = f"{what}: " if what else ""
        super().__init__(f"{text}{status} {reason}: {message}".rstrip(": "))
        self.status = status
        self.reason = reason
        self.detail = message


class KubeGone(KubeApiError):
    """410 Gone: the resourceVersion asked for is no longer available."""


class KubeUnreachable(BackendError):
    """No answer from the API server (connection refused, reset, timed out)."""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK; CONNECTED (ours: the watch is open)
    object: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        rv = (self.object.get("metadata") or {}).get("resourceVersion")
        return str(rv) if rv else None


@dataclass(frozen=True)
class _Kind:
    api: str  # core, batch, apps, networking
    snake: str
    model: str
    namespaced: bool = True


KINDS: dict[str, _Kind] = {
    "Namespace": _Kind("core", "namespace", "V1Namespace", namespaced=False),
    "Node": _Kind("core", "node", "V1Node", namespaced=False),
    "ConfigMap": _Kind("core", "config_map", "V1ConfigMap"),
    "Secret": _Kind("core", "secret", "V1Secret"),
    "Pod": _Kind("core", "pod", "V1Pod"),
    "Service": _Kind("core", "service", "V1Service"),
    "Event": _Kind("core", "event", "CoreV1Event"),
    "Job": _Kind("batch", "job", "V1Job"),
    "Deployment": _Kind("apps", "deployment", "V1Deployment"),
    "Ingress": _Kind("networking", "ingress", "V1Ingress"),
}


def _status_error(status: int, body: bytes, what: str) -> KubeApiError:
    reason, message = "", ""
    try:
        data = json.loads(body or b"{}")
        if isinstance(data, dict):
            reason = str(data.get("reason") or "")
            message = str(data.get("message") or "")
    except ValueError:
        message = body[:300].decode(errors="replace")
    reason = reason or {403: "Forbidden", 404: "NotFound", 409: "AlreadyExists"}.get(status, "")
    cls = KubeGone if status == 410 else KubeApiError
    return cls(status, reason or "Error", message or "(no message)", what)


@dataclass(frozen=True)
class Identity:
    """Whom a call acts as (Kubernetes user impersonation)."""

    user: str
    groups: tuple[str, ...] = ()


# Set around one request by a KubeApi that acts as a user; the session's middleware turns it
# into the Impersonate-* headers (one Impersonate-Group header a group, which the generated
# client's header dict could not carry).
_ACTING_AS: ContextVar[Identity | None] = ContextVar("sciorch_kube_acting_as", default=None)


async def _impersonation(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    who = _ACTING_AS.get()
    if who is not None:
        request.headers["Impersonate-User"] = who.user
        for group in who.groups:
            request.headers.add("Impersonate-Group", group)
    return await handler(request)


def _default_kubeconfig_exists() -> bool:
    return os.path.exists(os.path.expanduser("~/.kube/config"))


def _is_loopback(host: str) -> bool:
    name = urlparse(host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class KubeApi:
    """Create, get, delete, list and watch objects; read and follow pod logs."""

    identity: Identity | None = None  # None: the credentials' own

    def __init__(self, configuration: kclient.Configuration) -> None:
        # Every session gets the impersonation middleware: a view made by acting_as must never
        # send its calls as the credentials' own identity for want of it.
        session = dict(getattr(configuration, "client_session_kwargs", None) or {})
        middlewares = tuple(session.get("middlewares") or ())
        if _impersonation not in middlewares:
            session["middlewares"] = (*middlewares, _impersonation)
        configuration.client_session_kwargs = session
        self.configuration = configuration
        self.host = str(configuration.host)
        self._client = kclient.ApiClient(configuration)
        self._apis: dict[str, Any] = {
            "core": kclient.CoreV1Api(self._client),
            "batch": kclient.BatchV1Api(self._client),
            "apps": kclient.AppsV1Api(self._client),
            "networking": kclient.NetworkingV1Api(self._client),
        }

    @classmethod
    async def connect(
        cls,
        *,
        host: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        in_cluster: bool = False,
        token_file: str | None = None,
        ca_cert: str | None = None,
        verify_ssl: bool = True,
        trust_env: bool | None = None,
    ) -> KubeApi:
        cfg = kclient.Configuration()
        try:
            if host:
                cfg.host = host.rstrip("/")
                cfg.verify_ssl = verify_ssl
                if ca_cert:
                    cfg.ssl_ca_cert = ca_cert
                if token_file:
                    token = (await asyncio.to_thread(Path(token_file).read_text)).strip()
                    cfg.api_key = {"authorization": token}
                    cfg.api_key_prefix = {"authorization": "Bearer"}
            elif in_cluster or (
                not kubeconfig
                and not os.environ.get("KUBECONFIG")
                and os.environ.get("KUBERNETES_SERVICE_HOST")
                and not await asyncio.to_thread(_default_kubeconfig_exists)
            ):
                kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                await kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=kubeconfig,
                    context=context,
                    client_configuration=cfg,
                    persist_config=False,
                )
        except (OSError, kconfig.ConfigException) as exc:
            raise BackendError(f"cannot configure the Kubernetes client: {exc}") from exc
        cfg.connection_pool_maxsize = 256
        if trust_env is None:
            trust_env = not _is_loopback(str(cfg.host))
        cfg.client_session_kwargs = {"trust_env": trust_env}
        return cls(cfg)

    def acting_as(self, identity: Identity | None) -> KubeApi:
        """The same connection, each call impersonating `identity` (None: this one)."""
        if identity == self.identity:
            return self
        view = copy.copy(self)
        view.identity = identity
        return view

    async def _start(self, call: Callable[[], Awaitable[_R]]) -> _R:
        """Send a request as this view's identity (the middleware reads it while sending)."""
        token = _ACTING_AS.set(self.identity)
        try:
            return await call()
        finally:
            _ACTING_AS.reset(token)

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ plumbing

    def _method(self, kind: str, verb: str, namespace: str | None) -> Callable[..., Any]:
        k = KINDS.get(kind)
        if k is None:
            raise BackendError(f"the Kubernetes adapter does not handle kind {kind!r}")
        api = self._apis[k.api]
        if not k.namespaced:
            name = f"{verb}_{k.snake}"
        elif verb == "list" and namespace is None:
            name = f"list_{k.snake}_for_all_namespaces"
        else:
            name = f"{verb}_namespaced_{k.snake}"
        fn: Callable[..., Any] = getattr(api, name + "_without_preload_content")
        return fn

    @staticmethod
    def _args(kind: str, namespace: str | None, *args: Any) -> tuple[Any, ...]:
        return (*args, namespace) if KINDS[kind].namespaced and namespace is not None else args

    async def _send_raw(
        self, what: str, call: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> tuple[int, bytes]:
        """The status and body of a call that succeeded; typed errors otherwise."""
        try:
            resp = await self._start(call)
        except _CONNECTION_ERRORS as exc:
            raise KubeUnreachable(f"{what}: API server {self.host} unreachable: {exc!r}") from exc
        try:
            body = await resp.read()
        except _CONNECTION_ERRORS as exc:
            raise KubeUnreachable(f"{what}: connection lost: {exc!r}") from exc
        finally:
            resp.release()
        if resp.status >= 400:
            raise _status_error(resp.status, body, what)
        return resp.status, body

    async def _send(
        self, what: str, call: Callable[[], Awaitable[aiohttp.ClientResponse]]
    ) -> dict[str, Any]:
        status, body = await self._send_raw(what, call)
        try:
            data = json.loads(body) if body else {}
        except ValueError as exc:
            raise KubeApiError(status, "BadResponse", f"not JSON: {exc}", what) from exc
        return data if isinstance(data, dict) else {"value": data}

    # ------------------------------------------------------------------ objects

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(body.get("kind"))
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace")
        what = f"create {kind} {namespace + '/' if namespace else ''}{meta.get('name')}"
        model = getattr(kclient.models, KINDS[kind].model) if kind in KINDS else None
        if model is None:
            raise BackendError(f"{what}: kind not handled by the adapter")
        try:
            typed = model.from_dict(dict(body))
        except ValidationError as exc:
            raise BackendError(f"{what}: the manifest does not fit the API model: {exc}") from exc
        fn = self._method(kind, "create", namespace)
        return await self._send(what, lambda: fn(*self._args(kind, namespace), typed))

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when there is none."""
        fn = self._method(kind, "read", namespace)
        try:
            return await self._send(
                f"get {kind} {name}", lambda: fn(*self._args(kind, namespace, name))
            )
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch(
        self, kind: str, namespace: str | None, name: str, change: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A merge patch (RFC 7386) of the object."""
        fn = self._method(kind, "patch", namespace)
        return await self._send(
            f"patch {kind} {name}",
            lambda: fn(
                *self._args(kind, namespace, name),
                dict(change),
                _content_type="application/merge-patch+json",
            ),
        )

    async def delete(
        self, kind: str, namespace: str | None, name: str, propagation: str = "Background"
    ) -> bool:
        """Delete it (its dependents too); False when it was not there."""
        fn = self._method(kind, "delete", namespace)
        try:
            await self._send(
                f"delete {kind} {name}",
                lambda: fn(*self._args(kind, namespace, name), propagation_policy=propagation),
            )
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """(items, the list's resourceVersion); pages through `continue` tokens."""
        fn = self._method(kind, "list", namespace)
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kw = {
                "limit": 500,
                **_given(
                    label_selector=label_selector, field_selector=field_selector, _continue=token
                ),
            }
            call = functools.partial(fn, *self._args(kind, namespace), **kw)
            data = await self._send(f"list {kind}", call)
            items += [i for i in data.get("items") or [] if isinstance(i, dict)]
            meta = data.get("metadata") or {}
            token = meta.get("continue") or None
            if not token:
                rv = meta.get("resourceVersion")
                return items, str(rv) if rv else None

    async def watch(
        self,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[WatchEvent]:
        """Changes after `resource_version`, after one CONNECTED event (no object) once the
        server has accepted the watch. Ends when the server closes the stream or the connection
        drops; raises `KubeGone` for a 410 (list again), `KubeApiError` otherwise."""
        fn = self._method(kind, "list", namespace)
        kw = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": int(timeout_s),
            "_request_timeout": float(timeout_s + 30),
            **_given(
                label_selector=label_selector,
                field_selector=field_selector,
                resource_version=resource_version,
            ),
        }
        what = f"watch {kind}" + (f" in {namespace}" if namespace else "")
        try:
            resp: aiohttp.ClientResponse = await self._start(
                lambda: fn(*self._args(kind, namespace), **kw)
            )
        except _CONNECTION_ERRORS as exc:
            raise KubeUnreachable(f"{what}: API server {self.host} unreachable: {exc!r}") from exc
        try:
            if resp.status >= 400:
                raise _status_error(resp.status, await resp.read(), what)
            yield WatchEvent("CONNECTED", {})
            while True:
                try:
                    line = await resp.content.readline()
                except (*_CONNECTION_ERRORS, ValueError):
                    return  # dropped: the caller reconnects from the last resourceVersion
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("%s: ignoring a line that is not JSON: %r", what, line[:200])
                    continue
                typ = str(event.get("type") or "")
                obj = event.get("object")
                if not isinstance(obj, dict):
                    continue
                if typ == "ERROR":
                    code = int(obj.get("code") or 500)
                    cls = KubeGone if code == 410 else KubeApiError
                    raise cls(code, str(obj.get("reason") or ""), str(obj.get("message")), what)
                yield WatchEvent(typ, obj)
        finally:
            resp.close()

    # ------------------------------------------------------------------ logs

    async def read_log(self, namespace: str, pod: str, container: str) -> bytes:
        """The whole log of a pod's container as it is now."""
        fn = self._apis["core"].read_namespaced_pod_log_without_preload_content
        what = f"read log of {namespace}/{pod}"
        _, body = await self._send_raw(what, lambda: fn(pod, namespace, container=container))
        return body

    async def follow_log(
        self, namespace: str, pod: str, container: str, timeout_s: float = 3600.0
    ) -> AsyncIterator[bytes]:
        """The log from its start, then what is written, until the container ends (or the
        stream drops, or `timeout_s` passes)."""
        fn = self._apis["core"].read_namespaced_pod_log_without_preload_content
        what = f"follow log of {namespace}/{pod}"
        try:
            resp: aiohttp.ClientResponse = await self._start(
                lambda: fn(
                    pod, namespace, container=container, follow=True, _request_timeout=timeout_s
                )
            )
        except _CONNECTION_ERRORS as exc:
            raise KubeUnreachable(f"{what}: API server {self.host} unreachable: {exc!r}") from exc
        try:
            if resp.status >= 400:
                raise _status_error(resp.status, await resp.read(), what)
            while True:
                try:
                    chunk = await resp.content.readany()
                except _CONNECTION_ERRORS:
                    return
                if not chunk:
                    return
                yield chunk
        finally:
            resp.close()


_RETRYABLE = {429, 500, 502, 503, 504}


async def retry(call: Callable[[], Awaitable[_T]], attempts: int = 4) -> _T:
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


__all__ = [
    "KINDS",
    "Identity",
    "KubeApi",
    "KubeApiError",
    "KubeGone",
    "KubeUnreachable",
    "WatchEvent",
    "retry",
]
