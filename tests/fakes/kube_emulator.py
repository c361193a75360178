"""A Kubernetes API server for the tests: kmock 0.8's `KubernetesEmulator` served over real HTTP
on 127.0.0.1, with the gaps the notes list patched, and helpers for the test to play the
controllers and the kubelet.

What the wrapper fixes in kmock 0.8: Namespaces (create/get/delete: 500 in kmock), metadata that
a real server fills (namespace, uid, creationTimestamp, resourceVersion), validation of every
created object (kubernetes-validate strict plus `kube_manifests.check_manifest`; 422 Invalid),
label and field selectors on list and watch, resourceVersions with watches that resume from one
(and 410 Gone for one that was compacted away), cascading deletes (a Namespace takes its
objects, a Job or Deployment its pods), PUT, list `kind`s, and pod logs with follow.

The objects still live in kmock's object store (`emu.objects[...]`, with kmock's history and
partial-match assertions), and everything that is not a resource path (discovery, /version)
is served by kmock itself.

Failure injection: `inject(status, path=regex, method=..., watch=...)` answers the next matching
request(s) with that status (a 410 on a watch arrives as an ERROR event, as a real server sends
it); `drop_watches()` cuts every open watch connection; `expire_history()` compacts the event
history so that watches from an older resourceVersion get 410.

Impersonation: every request's Impersonate-User and Impersonate-Group headers are recorded in
`identities`; a request that impersonates is authorised as that user (and groups) against
`rbac`, a table `allow(subject, verbs, resources)` fills ("*" for any), and refused with 403
Forbidden in a real server's words when no rule allows it. A request without the headers is
the credentials' own (sciorch's service account: allowed everything, as before).

Controllers: none run by themselves, except the Job controller for Indexed Jobs when a test
starts it (tests/fakes/kube_indexed.py: `IndexedJobController(emu).start()`). The test creates
pods for other Jobs and for Deployments (`create_pod`),
moves them through their phases (`schedule`, `run`, `set_ready`, `terminate`, ...), writes their
logs (`write_log`), sets Job conditions (`complete_job`, `fail_job`) and Events (`event`).
`kubelet_run` plays the kubelet for a job pod: it runs the pod's real container command
(the job wrapper and the template's command) locally under /bin/sh, with /sciorch mapped to a
temporary directory, and streams its output into the pod log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import tempfile
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kubernetes_validate

from backends.kube_manifests import CONTAINER, WORK_ROOT, check_manifest

# plural -> (group, version, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    "namespaces": ("", "v1", "Namespace", False),
    "nodes": ("", "v1", "Node", False),
    "pods": ("", "v1", "Pod", True),
    "configmaps": ("", "v1", "ConfigMap", True),
    "secrets": ("", "v1", "Secret", True),
    "services": ("", "v1", "Service", True),
    "events": ("", "v1", "Event", True),
    "persistentvolumeclaims": ("", "v1", "PersistentVolumeClaim", True),
    "jobs": ("batch", "v1", "Job", True),
    "deployments": ("apps", "v1", "Deployment", True),
    "ingresses": ("networking.k8s.io", "v1", "Ingress", True),
}
PLURAL = {kind: plural for plural, (_, _, kind, _) in RESOURCES.items()}


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _env_value(var: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    """An env var's value, a downward-API fieldRef (metadata.name, .namespace,
    .labels['k'], .annotations['k']) read from the pod."""
    ref = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    if not ref:
        return str(var.get("value", ""))
    meta = pod.get("metadata") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", ref)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    return str(meta.get(ref.removeprefix("metadata."), ""))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _res(plural: str) -> kmock.resource:
    group, version, _, _ = RESOURCES[plural]
    return kmock.resource(group, version, plural)


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386); strategic merge patches are treated the same here."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dig(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label_selector_matches(selector: str | None, labels: Mapping[str, str]) -> bool:
    for term in _split_selector(selector or ""):
        if m := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\((.*)\)", term):
            values = {v.strip() for v in m.group(3).split(",")}
            present = labels.get(m.group(1)) in values
            if present != (m.group(2) == "in"):
                return False
        elif m := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term):
            equal = labels.get(m.group(1)) == m.group(3)
            if equal != (m.group(2) != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str | None, obj: Mapping[str, Any]) -> bool:
    for term in _split_selector(selector or ""):
        m = re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term)
        if not m:
            continue
        value = _dig(obj, m.group(1))
        equal = ("" if value is None else str(value)) == m.group(3)
        if equal != (m.group(2) != "!="):
            return False
    return True


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
    return aiohttp.web.json_response(body, status=code)


_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "AlreadyExists",
    410: "Expired",
    422: "Invalid",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class _Fault:
    status: int
    pattern: re.Pattern[str]
    method: str | None
    watch: bool | None
    times: int
    message: str


@dataclass
class _Log:
    data: bytearray = field(default_factory=bytearray)
    closed: bool = False


@dataclass
class _Change:
    rv: int
    plural: str
    namespace: str | None
    type: str
    object: dict[str, Any]


@attrs.define(kw_only=True)
class _PatchedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with our request handling in front of it."""

    front: Any = None

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if self.front is not None:
            response: aiohttp.web.StreamResponse | None = await self.front.handle(raw_request)
            if response is not None:
                return response
        return await super().__call__(raw_request)


class KubeEmulator:
    """The emulated cluster. `async with KubeEmulator() as emu:` serves it at `emu.url`."""

    def __init__(self, *, version: str = "1.33", validate: bool = True) -> None:
        self.version = version
        self.validate = validate
        self.handler = _PatchedEmulator(front=self)
        with warnings.catch_warnings():  # kmock 0.8 uses a deprecated importlib API here
            warnings.simplefilter("ignore", DeprecationWarning)
            self.handler.resources.load_bundled()
        self._server: kmock.Server | None = None
        self.url = ""
        self._rv = 1
        self._compacted = 0
        self._history: list[_Change] = []
        self._tick = asyncio.Event()
        self._drop = 0
        self._faults: list[_Fault] = []
        self.logs: dict[tuple[str, str], _Log] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # (method, path, Impersonate-User, Impersonate-Groups) of every resource request
        self.identities: list[tuple[str, str, str | None, tuple[str, ...]]] = []
        # subject ("alice", or "group:<name>") -> the (verb, resource) pairs allowed
        self.rbac: dict[str, set[tuple[str, str]]] = {}
        self.invalid: list[str] = []
        self._workdirs: list[str] = []
        self._kubelets: set[asyncio.Task[Any]] = set()
        self._procs: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self._all_procs: list[asyncio.subprocess.Process] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` first when the emulator stops (a controller playing on it)."""
        self._closers.append(fn)

    async def changed(self) -> None:
        """Return at the next change of any object."""
        await self._tick.wait()

    async def __aenter__(self) -> KubeEmulator:
        await self.handler.__aenter__()
        self._server = kmock.Server(self.handler, host="127.0.0.1")
        await self._server.__aenter__()
        self.url = str(self._server.url).rstrip("/")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for closer in self._closers:
            await closer()
        for t in list(self._kubelets):
            t.cancel()
        await asyncio.gather(*self._kubelets, return_exceptions=True)
        for proc in self._all_procs:
            _kill_group(proc)
            await proc.wait()
        if self._all_procs:
            await asyncio.sleep(0.05)  # let the subprocess transports close on this loop
        self._drop += 1
        self._changed()
        if self._server is not None:
            await self._server.__aexit__(None, None, None)
        await self.handler.__aexit__(None, None, None)
        for d in self._workdirs:
            shutil.rmtree(d, ignore_errors=True)

    @property
    def objects(self) -> Any:
        return self.handler.objects

    # ------------------------------------------------------------------ the store

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def _record(self, plural: str, ns: str | None, typ: str, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        self._history.append(_Change(self._rv, plural, ns, typ, copy.deepcopy(obj)))
        self._changed()

    def get(self, plural: str, ns: str | None, name: str) -> dict[str, Any] | None:
        key = (_res(plural), ns, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw: dict[str, Any] = copy.deepcopy(self.objects[key].raw)
        return raw

    def items(self, plural: str, ns: str | None = None) -> list[dict[str, Any]]:
        res = _res(plural)
        out = []
        for (r, o_ns, _name), obj in self.objects.items():
            if r == res and (ns is None or o_ns == ns) and not obj.deleted:
                out.append(copy.deepcopy(obj.raw))
        return out

    def put(self, plural: str, obj: dict[str, Any], typ: str | None = None) -> dict[str, Any]:
        """Store an object (created or replaced) and announce it."""
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace") if RESOURCES[plural][3] else None
        key = (_res(plural), ns, meta["name"])
        existed = key in self.objects and not self.objects[key].deleted
        group, version, kind, _ = RESOURCES[plural]
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        obj.setdefault("kind", kind)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        self._record(plural, ns, typ or ("MODIFIED" if existed else "ADDED"), obj)
        if existed:
            self.objects[key].create(copy.deepcopy(obj))  # a new version in kmock's history
        else:
            self.objects[key] = copy.deepcopy(obj)
        return obj

    def patch(
        self, plural: str, ns: str | None, name: str, change: Mapping[str, Any]
    ) -> dict[str, Any]:
        obj = self.get(plural, ns, name)
        if obj is None:
            raise KeyError(f"{plural} {ns}/{name} does not exist")
        return self.put(plural, _merge(obj, change))

    def remove(
        self, plural: str, ns: str | None, name: str, force: bool = False
    ) -> dict[str, Any] | None:
        """Delete an object (and what it owns) and announce it. A pod with finalizers (an
        Indexed Job's, see kube_indexed) is only marked deleted and its container sent SIGTERM,
        as a kubelet does; whoever owns the finalizer removes it (`force`)."""
        obj = self.get(plural, ns, name)
        if obj is None:
            return None
        if plural == "pods" and obj["metadata"].get("finalizers") and not force:
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                self.put("pods", obj)
                proc = self._procs.get((ns or "", name))
                if proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
            return obj
        key = (_res(plural), ns, name)
        self.objects[key].delete()
        self._record(plural, ns, "DELETED", obj)
        uid = obj["metadata"].get("uid")
        if plural == "namespaces":
            for p, (_, _, _, namespaced) in RESOURCES.items():
                if namespaced:
                    for child in self.items(p, name):
                        self.remove(p, name, child["metadata"]["name"])
        elif plural in ("jobs", "deployments"):
            for pod in self.items("pods", ns):
                owners = pod["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == uid for o in owners):
                    self.remove("pods", ns, pod["metadata"]["name"], force=True)
        if plural == "pods":
            log = self.logs.get((ns or "", name))
            if log is not None:
                log.closed = True
            proc = self._procs.pop((ns or "", name), None)
            if proc is not None:
                _kill_group(proc)  # the kubelet stops the containers of a deleted pod
        return obj

    # ------------------------------------------------------------------ failure injection

    def inject(
        self,
        status: int,
        *,
        path: str = ".*",
        method: str | None = None,
        watch: bool | None = None,
        times: int = 1,
        message: str | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `status`."""
        self._faults.append(
            _Fault(
                status,
                re.compile(path),
                method.upper() if method else None,
                watch,
                times,
                message or f"injected {status} by the test",
            )
        )

    def drop_watches(self) -> None:
        """Cut every open watch connection (the client sees the stream end abruptly)."""
        self._drop += 1
        self._changed()

    def expire_history(self) -> None:
        """Compact the history: watches from a resourceVersion before now get 410 Gone."""
        self._compacted = self._rv
        self._history.clear()

    def watch_count(self, plural: str) -> int:
        return sum(1 for m, p, q in self.requests if m == "GET" and q.get("watch") in
                   ("true", "1") and p.endswith("/" + plural))

    def list_count(self, plural: str) -> int:
        return sum(1 for m, p, q in self.requests if m == "GET" and q.get("watch") not in
                   ("true", "1") and p.endswith("/" + plural))

    def allow(self, subject: str, verbs: str = "*", resources: str = "*") -> None:
        """An RBAC rule: `subject` (a user, or "group:<name>") may use these comma-separated
        verbs on these comma-separated resources (a subresource as "pods/log")."""
        rules = self.rbac.setdefault(subject, set())
        for verb in verbs.split(","):
            for res in resources.split(","):
                rules.add((verb.strip(), res.strip()))

    def _authorize(
        self, raw: aiohttp.web.BaseRequest, verb: str, resource: str, ns: str | None
    ) -> aiohttp.web.Response | None:
        """Record who the request acts as; a 403 when it impersonates someone RBAC does not let
        do this."""
        user = raw.headers.get("Impersonate-User")
        groups = tuple(raw.headers.getall("Impersonate-Group", []))
        self.identities.append((raw.method.upper(), raw.path, user, groups))
        if user is None:
            if groups:
                return _status(
                    500, "InternalError", f"requested {list(groups)} without impersonating a user"
                )
            return None
        for subject in (user, *(f"group:{g}" for g in groups)):
            for v, r in self.rbac.get(subject, ()):
                if v in ("*", verb) and r in ("*", resource):
                    return None
        plural, _, sub = resource.partition("/")
        group = RESOURCES[plural][0]
        where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
        what = f'resource "{plural}"' + (f' subresource "{sub}"' if sub else "")
        return _status(
            403,
            "Forbidden",
            f'{resource} is forbidden: User "{user}" cannot {verb} {what} in API group '
            f'"{group}"{where}',
        )

    def _take_fault(self, method: str, path: str, watch: bool) -> _Fault | None:
        for f in self._faults:
            if f.times <= 0:
                continue
            if f.method is not None and f.method != method:
                continue
            if f.watch is not None and f.watch != watch:
                continue
            if not f.pattern.search(path):
                continue
            f.times -= 1
            return f
        return None

    # ------------------------------------------------------------------ HTTP

    @staticmethod
    def _parse(path: str) -> tuple[str, str | None, str | None, str | None] | None:
        """(plural, namespace, name, subresource) of a resource path; None for anything else."""
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            rest = parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            rest = parts[3:]
        else:
            return None
        if not rest:
            return None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        else:
            ns = None
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        return plural, ns, name, sub

    async def handle(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse | None:
        parsed = self._parse(raw.path)
        if parsed is None:
            return None  # discovery and the like: kmock serves it
        plural, ns, name, sub = parsed
        query = dict(raw.query)
        method = raw.method.upper()
        self.requests.append((method, raw.path, query))
        if plural not in RESOURCES:
            return _status(404, "NotFound", f"the server could not find resource {plural}")
        watch = method == "GET" and query.get("watch") in ("true", "1")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, "watch" if watch else "get" if name is not None else "list"
        )
        refused = self._authorize(raw, verb, plural + (f"/{sub}" if sub else ""), ns)
        if refused is not None:
            return refused
        fault = self._take_fault(method, raw.path, watch)
        if fault is not None:
            if watch and fault.status == 410:
                return await self._stream_error(raw, 410, "Expired", fault.message)
            return _status(fault.status, _REASONS.get(fault.status, "Error"), fault.message)
        body: Any = None
        if method in ("POST", "PUT", "PATCH"):
            try:
                body = json.loads(await raw.read() or b"null")
            except ValueError:
                return _status(400, "BadRequest", "the body is not JSON")
        if method == "GET" and watch:
            return await self._watch(raw, plural, ns, query)
        if method == "GET" and name is None:
            return self._list(plural, ns, query)
        if method == "GET" and plural == "pods" and sub == "log":
            assert name is not None
            return await self._log(raw, ns or "", name, query)
        if method == "GET":
            assert name is not None
            obj = self.get(plural, ns, name)
            if obj is None:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            return aiohttp.web.json_response(obj)
        if method == "POST" and name is None:
            return self._create(plural, ns, body)
        if method in ("PUT", "PATCH") and name is not None:
            current = self.get(plural, ns, name)
            if current is None:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            if method == "PUT":
                new = dict(body or {})
                new.setdefault("metadata", {}).update(
                    {k: current["metadata"][k] for k in ("uid", "creationTimestamp")
                     if k in current["metadata"]}
                )
            elif "json-patch" in (raw.content_type or ""):
                new = jsonpatch.apply_patch(current, body)
            else:
                new = _merge(current, body or {})
            new.setdefault("metadata", {})["name"] = name
            if ns is not None:
                new["metadata"]["namespace"] = ns
            problem = self._invalid(plural, new)
            if problem:
                return _status(422, "Invalid", problem)
            return aiohttp.web.json_response(self.put(plural, new))
        if method == "DELETE" and name is not None:
            obj = self.remove(plural, ns, name)
            if obj is None:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            return aiohttp.web.json_response(obj)
        return _status(405, "MethodNotAllowed", f"{method} {raw.path} is not supported here")

    def _invalid(self, plural: str, obj: dict[str, Any]) -> str | None:
        if not self.validate:
            return None
        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            problem = f"{RESOURCES[plural][2]}: {where}: {exc.message}"
            self.invalid.append(problem)
            return problem
        own = check_manifest(obj)
        if own and plural not in ("pods", "events", "nodes"):
            problem = "; ".join(own)
            self.invalid.append(problem)
            return problem
        return None

    def _create(self, plural: str, ns: str | None, body: Any) -> aiohttp.web.Response:
        if not isinstance(body, dict):
            return _status(400, "BadRequest", "the body must be an object")
        meta = body.setdefault("metadata", {})
        if RESOURCES[plural][3]:
            if meta.get("namespace") not in (None, ns):
                return _status(
                    400, "BadRequest", "the namespace of the object does not match the URL"
                )
            meta["namespace"] = ns
            if self.get("namespaces", None, ns or "") is None:
                return _status(404, "NotFound", f'namespaces "{ns}" not found')
            terminating = (self.get("namespaces", None, ns or "") or {}).get("status", {})
            if terminating.get("phase") == "Terminating":
                return _status(403, "Forbidden", f"namespace {ns} is being terminated")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        problem = self._invalid(plural, body)
        if problem:
            return _status(422, "Invalid", problem)
        if self.get(plural, ns if RESOURCES[plural][3] else None, meta["name"]) is not None:
            return _status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        if plural == "namespaces":
            body.setdefault("status", {})["phase"] = "Active"
        if plural in ("jobs", "deployments"):
            body.setdefault("status", {})
        meta["generation"] = 1
        return aiohttp.web.json_response(self.put(plural, body), status=201)

    def _matching(
        self, plural: str, ns: str | None, query: Mapping[str, str], obj: Mapping[str, Any]
    ) -> bool:
        meta = obj.get("metadata") or {}
        if ns is not None and meta.get("namespace") != ns:
            return False
        return label_selector_matches(
            query.get("labelSelector"), meta.get("labels") or {}
        ) and field_selector_matches(query.get("fieldSelector"), obj)

    def _list(self, plural: str, ns: str | None, query: Mapping[str, str]) -> aiohttp.web.Response:
        group, version, kind, _ = RESOURCES[plural]
        items = [o for o in self.items(plural, ns) if self._matching(plural, ns, query, o)]
        items.sort(key=lambda o: int(o["metadata"].get("resourceVersion") or 0))
        return aiohttp.web.json_response(
            {
                "apiVersion": f"{group}/{version}" if group else version,
                "kind": kind + "List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _stream_error(
        self, raw: aiohttp.web.BaseRequest, code: int, reason: str, message: str
    ) -> aiohttp.web.StreamResponse:
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(raw)
        event = {
            "type": "ERROR",
            "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "code": code, "reason": reason, "message": message, "metadata": {}},
        }
        await resp.write(json.dumps(event).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def _watch(
        self, raw: aiohttp.web.BaseRequest, plural: str, ns: str | None, query: dict[str, str]
    ) -> aiohttp.web.StreamResponse:
        rv = query.get("resourceVersion") or ""
        start = int(rv) if rv.isdigit() and rv != "0" else None
        if start is not None and start < self._compacted:
            return await self._stream_error(
                raw, 410, "Expired", f"too old resource version: {start} ({self._compacted})"
            )
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(raw)
        drop = self._drop
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(query.get("timeoutSeconds") or 1800)
        position = self._rv
        try:
            if start is None:
                for obj in self.items(plural, ns):
                    if self._matching(plural, ns, query, obj):
                        await resp.write(json.dumps({"type": "ADDED", "object": obj}).encode()
                                         + b"\n")
            else:
                position = start
            while True:
                for ch in [c for c in self._history if c.rv > position]:
                    position = ch.rv
                    if ch.plural != plural or not self._matching(plural, ns, query, ch.object):
                        continue
                    line = json.dumps({"type": ch.type, "object": ch.object}).encode() + b"\n"
                    await resp.write(line)
                if self._drop != drop:
                    if raw.transport is not None:
                        raw.transport.close()
                    return resp
                left = deadline - loop.time()
                if left <= 0:
                    break
                tick = self._tick
                try:
                    await asyncio.wait_for(tick.wait(), timeout=left)
                except TimeoutError:
                    break
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass
        return resp

    async def _log(
        self, raw: aiohttp.web.BaseRequest, ns: str, name: str, query: Mapping[str, str]
    ) -> aiohttp.web.StreamResponse:
        if self.get("pods", ns, name) is None:
            return _status(404, "NotFound", f'pods "{name}" not found')
        log = self.logs.setdefault((ns, name), _Log())
        if query.get("follow") not in ("true", "1"):
            return aiohttp.web.Response(body=bytes(log.data), content_type="text/plain")
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(raw)
        sent = 0
        drop = self._drop
        try:
            while True:
                if len(log.data) > sent:
                    chunk = bytes(log.data[sent:])
                    sent += len(chunk)
                    await resp.write(chunk)
                if log.closed and sent >= len(log.data):
                    break
                if self._drop != drop:
                    if raw.transport is not None:
                        raw.transport.close()
                    return resp
                tick = self._tick
                await tick.wait()
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            pass
        return resp

    # ------------------------------------------------------------------ playing the controllers

    async def wait_for(
        self, check: Callable[[], Any], within: float = 10.0, what: str = "condition"
    ) -> Any:
        """Wait until `check()` returns something truthy (re-checked on every change)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = check()
            if value:
                return value
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            tick = self._tick
            with_timeout = min(left, 0.05)
            try:
                await asyncio.wait_for(tick.wait(), timeout=with_timeout)
            except TimeoutError:
                pass

    async def wait_object(
        self, plural: str, ns: str | None, name: str, within: float = 10.0
    ) -> dict[str, Any]:
        obj: dict[str, Any] = await self.wait_for(
            lambda: self.get(plural, ns, name), within, f"{plural} {ns}/{name}"
        )
        return obj

    def add_node(
        self,
        name: str,
        *,
        cpu: str = "16",
        memory: str = "64Gi",
        gpus: int = 0,
        labels: Mapping[str, str] | None = None,
        ready: bool = True,
    ) -> dict[str, Any]:
        allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            allocatable["nvidia.com/gpu"] = str(gpus)
        return self.put(
            "nodes",
            {
                "metadata": {"name": name, "labels": dict(labels or {})},
                "status": {
                    "allocatable": allocatable,
                    "capacity": dict(allocatable),
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            },
        )

    def create_pod(
        self,
        ns: str,
        owner_plural: str,
        owner: str,
        suffix: str | None = None,
        mutate: Callable[[dict[str, Any]], None] | None = None,
    ) -> str:
        """A pod from a Job's or Deployment's template, Pending and not yet scheduled
        (`mutate` changes it before it is created, as a controller adds its own fields)."""
        parent = self.get(owner_plural, ns, owner)
        if parent is None:
            raise KeyError(f"{owner_plural} {ns}/{owner} does not exist")
        template = copy.deepcopy(parent["spec"]["template"])
        name = f"{owner}-{suffix or uuid.uuid4().hex[:5]}"
        labels = dict(template.get("metadata", {}).get("labels") or {})
        if owner_plural == "jobs":
            labels["job-name"] = owner
            labels["batch.kubernetes.io/job-name"] = owner
        pod = {
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": parent["apiVersion"],
                        "kind": parent["kind"],
                        "name": owner,
                        "uid": parent["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending", "conditions": []},
        }
        if mutate is not None:
            mutate(pod)
        self.put("pods", pod)
        return name

    def _pod_status(self, ns: str, name: str, change: Mapping[str, Any]) -> dict[str, Any]:
        return self.patch("pods", ns, name, {"status": change})

    def _conditions(
        self, ns: str, name: str, **conds: bool | tuple[bool, str, str]
    ) -> list[dict[str, Any]]:
        pod = self.get("pods", ns, name) or {}
        current = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        for kind, value in conds.items():
            status, reason, message = value if isinstance(value, tuple) else (value, "", "")
            cond = {"type": kind, "status": "True" if status else "False",
                    "lastTransitionTime": _now()}
            if reason:
                cond["reason"] = reason
            if message:
                cond["message"] = message
            current[kind] = cond
        return list(current.values())

    def schedule(self, ns: str, pod: str, node: str = "node-1") -> None:
        self.patch("pods", ns, pod, {"spec": {"nodeName": node}})
        self._pod_status(ns, pod, {"conditions": self._conditions(ns, pod, PodScheduled=True)})

    def unschedulable(self, ns: str, pod: str, message: str) -> None:
        conds = self._conditions(ns, pod, PodScheduled=(False, "Unschedulable", message))
        self._pod_status(ns, pod, {"phase": "Pending", "conditions": conds})

    def waiting(self, ns: str, pod: str, reason: str, message: str = "") -> None:
        self._pod_status(
            ns,
            pod,
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": CONTAINER,
                        "ready": False,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {"waiting": {"reason": reason, "message": message}},
                    }
                ],
            },
        )

    def _container(self, ns: str, pod: str) -> dict[str, Any]:
        obj = self.get("pods", ns, pod) or {}
        for cs in (obj.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == CONTAINER:
                return dict(cs)
        return {"name": CONTAINER, "ready": False, "restartCount": 0, "image": "x",
                "imageID": ""}

    def run(self, ns: str, pod: str, ready: bool = False) -> None:
        """The container started (and is Ready if `ready`)."""
        cs = self._container(ns, pod)
        cs.update({"ready": ready, "started": True, "state": {"running": {"startedAt": _now()}}})
        conds = self._conditions(
            ns, pod, PodScheduled=True, Initialized=True, ContainersReady=ready, Ready=ready
        )
        self._pod_status(
            ns,
            pod,
            {"phase": "Running", "startTime": _now(), "conditions": conds,
             "containerStatuses": [cs]},
        )

    def set_ready(self, ns: str, pod: str, ready: bool = True) -> None:
        cs = self._container(ns, pod)
        cs["ready"] = ready
        conds = self._conditions(ns, pod, ContainersReady=ready, Ready=ready)
        self._pod_status(ns, pod, {"conditions": conds, "containerStatuses": [cs]})

    def restart_container(self, ns: str, pod: str, exit_code: int) -> None:
        """The container exited and the kubelet restarted it (a new, empty log)."""
        cs = self._container(ns, pod)
        cs["restartCount"] = int(cs.get("restartCount") or 0) + 1
        cs["lastState"] = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
        cs["state"] = {"running": {"startedAt": _now()}}
        cs["ready"] = False
        conds = self._conditions(ns, pod, ContainersReady=False, Ready=False)
        self.logs[(ns, pod)] = _Log()
        self._pod_status(ns, pod, {"conditions": conds, "containerStatuses": [cs]})

    def terminate(self, ns: str, pod: str, exit_code: int, reason: str | None = None) -> None:
        """The container ended: the pod Succeeded (0) or Failed; its log is complete."""
        cs = self._container(ns, pod)
        cs.update(
            {
                "ready": False,
                "started": False,
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    }
                },
            }
        )
        self.close_log(ns, pod)
        conds = self._conditions(ns, pod, ContainersReady=False, Ready=False)
        self._pod_status(
            ns,
            pod,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": conds,
                "containerStatuses": [cs],
            },
        )

    def write_log(self, ns: str, pod: str, text: str | bytes) -> None:
        log = self.logs.setdefault((ns, pod), _Log())
        log.data += text.encode() if isinstance(text, str) else text
        self._changed()

    def close_log(self, ns: str, pod: str) -> None:
        self.logs.setdefault((ns, pod), _Log()).closed = True
        self._changed()

    def complete_job(self, ns: str, job: str) -> None:
        self.patch(
            "jobs",
            ns,
            job,
            {
                "status": {
                    "succeeded": 1,
                    "completionTime": _now(),
                    "conditions": [
                        {"type": "SuccessCriteriaMet", "status": "True"},
                        {"type": "Complete", "status": "True"},
                    ],
                }
            },
        )

    def fail_job(self, ns: str, job: str, reason: str = "BackoffLimitExceeded",
                 message: str = "Job has reached the specified backoff limit") -> None:
        self.patch(
            "jobs",
            ns,
            job,
            {
                "status": {
                    "failed": 1,
                    "conditions": [
                        {"type": "FailureTarget", "status": "True", "reason": reason,
                         "message": message},
                        {"type": "Failed", "status": "True", "reason": reason,
                         "message": message},
                    ],
                }
            },
        )

    def event(
        self,
        ns: str,
        kind: str,
        name: str,
        reason: str,
        message: str,
        type_: str = "Warning",
    ) -> None:
        self.put(
            "events",
            {
                "metadata": {"name": f"{name}.{uuid.uuid4().hex[:12]}", "namespace": ns},
                "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                "reason": reason,
                "message": message,
                "type": type_,
                "count": 1,
                "firstTimestamp": _now(),
                "lastTimestamp": _now(),
            },
        )

    # ------------------------------------------------------------------ playing the kubelet

    async def kubelet_run(self, ns: str, pod: str, *, finish_job: bool = True) -> int:
        """Run a job pod's real container command locally (the wrapper and the template's
        command, /sciorch mapped to a temporary directory), stream its output into the pod log,
        end the pod with its exit status and (with `finish_job`) complete or fail its Job."""
        obj = self.get("pods", ns, pod)
        assert obj is not None, f"no pod {ns}/{pod}"
        container = next(c for c in obj["spec"]["containers"] if c["name"] == CONTAINER)
        root = tempfile.mkdtemp(prefix="sciorch-kubelet-")
        self._workdirs.append(root)

        def local(text: str) -> str:
            # The volume's paths only: not a URL of a bucket whose name starts the same.
            return re.sub(re.escape(WORK_ROOT) + r"(?=/|$)", lambda _: root, text)

        owner = obj["metadata"]["ownerReferences"][0]["name"]
        await asyncio.to_thread(self._mount_configmaps, ns, obj, container, local)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": root}
        for e in container.get("env") or []:
            if (e.get("valueFrom") or {}).get("secretKeyRef"):
                env[e["name"]] = self._env_from(ns, e["valueFrom"])
            else:
                env[e["name"]] = local(_env_value(e, obj))
        argv = [local(a) for a in container["command"]]
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                cwd=root,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: a "container" to kill whole
            )
        )
        try:
            proc = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            proc = await spawn  # never leave a process behind, even when cancelled
            _kill_group(proc)
            await proc.wait()
            raise
        self._procs[(ns, pod)] = proc
        self._all_procs.append(proc)
        now_obj = self.get("pods", ns, pod)
        if now_obj is None or now_obj["metadata"].get("deletionTimestamp"):
            _kill_group(proc)  # deleted while it was starting
        else:
            self.schedule(ns, pod)
            self.run(ns, pod)
        assert proc.stdout is not None
        stdout = proc.stdout

        async def pump() -> None:
            while chunk := await stdout.read(4096):
                self.write_log(ns, pod, chunk)

        reader = asyncio.get_running_loop().create_task(pump())
        try:
            # asyncio's wait() also waits for the pipes, which a left-behind child holds open:
            # the first process's own exit shows in returncode.
            while proc.returncode is None and not reader.done():
                await asyncio.wait([reader], timeout=0.05)
            code = await proc.wait() if proc.returncode is None else proc.returncode
            if code < 0:
                code = 128 - code  # killed by a signal: the container runtime's exit code
        finally:
            # The container ends with its first process: what that left behind (the wrapper's
            # tail -f, a child it was killed away from) goes with it, then the log is drained.
            _kill_group(proc)
            await proc.wait()
            await asyncio.gather(reader, return_exceptions=True)
            self._procs.pop((ns, pod), None)
        if self.get("pods", ns, pod) is None:
            return code  # deleted meanwhile: nothing left to report
        self.terminate(ns, pod, code)
        if finish_job and self.get("jobs", ns, owner) is not None:
            if code == 0:
                self.complete_job(ns, owner)
            else:
                self.fail_job(ns, owner)
        return code

    def _env_from(self, ns: str, source: Mapping[str, Any]) -> str:
        """What a kubelet puts in a `valueFrom` variable (a Secret's key, decoded)."""
        ref = source["secretKeyRef"]
        secret = self.get("secrets", ns, ref["name"])
        assert secret is not None, f"no Secret {ns}/{ref['name']} (a kubelet would not start)"
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    def _mount_configmaps(
        self,
        ns: str,
        pod: Mapping[str, Any],
        container: Mapping[str, Any],
        local: Callable[[str], str],
    ) -> None:
        """Write the ConfigMap volumes the container mounts (a key at a subPath, or every key
        or item as a file under the mount path). Their text is mapped like the command's
        (/sciorch is the temporary directory): a script in a ConfigMap names container paths."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            source = (volumes.get(mount["name"]) or {}).get("configMap")
            if not source:
                continue
            cm = self.get("configmaps", ns, source["name"])
            if cm is None:
                continue
            data: dict[str, str] = cm.get("data") or {}
            items = source.get("items") or []
            files = {i["path"]: data[i["key"]] for i in items if i["key"] in data} or dict(data)
            target = Path(local(mount["mountPath"]))
            if mount.get("subPath"):
                if mount["subPath"] in files:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(local(files[mount["subPath"]]))
                continue
            target.mkdir(parents=True, exist_ok=True)
            for path, text in files.items():
                (target / path).write_text(local(text))

    def start_kubelet(self, ns: str, pod: str, *, finish_job: bool = True) -> asyncio.Task[int]:
        task = asyncio.get_running_loop().create_task(
            self.kubelet_run(ns, pod, finish_job=finish_job)
        )
        self._kubelets.add(task)
        task.add_done_callback(self._kubelets.discard)
        return task
