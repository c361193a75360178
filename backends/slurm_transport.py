"""How the Slurm backend talks to Slurm: one small interface, two ways.

`RestTransport` speaks to slurmrestd (OpenAPI v0.0.38) over HTTP with a JWT; it is the main path,
since a facility service rarely runs on a login node. `CliTransport` runs the Slurm commands
(sbatch, squeue, scontrol, sinfo, sacct, scancel) for sites without slurmrestd. Both hand back the
same plain records (`JobInfo`, `NodeInfo`, `PartitionInfo`) and raise the same errors, so the
backend above them behaves identically whichever one a site uses.

Errors: `SlurmRejected` (Slurm refused a request: bad input, say why), `SlurmAuthError` (the
credentials were refused), `SlurmUnavailable` (Slurm or slurmrestd cannot be reached right now;
try again later). All are `BackendError`s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from ground.errors import BackendError

log = logging.getLogger("sciorch.backends.slurm")

API = "/slurm/v0.0.38"
DB_API = "/slurmdb/v0.0.38"


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class JobRequest:
    """One batch job to submit. The script is the same for both transports; everything else
    becomes sbatch options or fields of the slurmrestd job description."""

    name: str
    script: str
    cwd: str
    output: str
    env: Mapping[str, str]
    cpus_per_task: int = 1
    memory_mb: int = 0
    gpus: int = 0
    gpu_type: str | None = None
    time_limit_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    comment: str | None = None

    @property
    def gres(self) -> str | None:
        if not self.gpus:
            return None
        return f"gpu:{self.gpu_type}:{self.gpus}" if self.gpu_type else f"gpu:{self.gpus}"


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about one job. `state` is the base state in capitals (PENDING, RUNNING,
    COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...); times are epoch seconds."""

    job_id: str
    state: str
    reason: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    node: str | None = None
    partition: str | None = None
    qos: str | None = None
    user: str | None = None
    cpus: int = 0
    memory_mb: int = 0
    gpus: int = 0
    time_limit_s: int | None = None


@dataclass(frozen=True)
class NodeInfo:
    name: str
    state: str  # idle, mixed, allocated, down, ... (lower case)
    flags: frozenset[str] = frozenset()  # DRAIN, NOT_RESPONDING, MAINTENANCE, ... (upper case)
    reason: str | None = None
    cpus: int = 0
    alloc_cpus: int = 0
    memory_mb: int = 0
    alloc_memory_mb: int = 0
    gpus: int = 0
    gpus_used: int = 0
    gpu_types: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Takes new jobs: up and neither draining nor drained."""
        bad = {"DRAIN", "DRAINED", "DRAINING", "FAIL", "NOT_RESPONDING", "MAINTENANCE", "REBOOT"}
        return self.state in ("idle", "mixed", "allocated", "completing") and not (
            self.flags & bad
        )


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    default: bool = False
    max_time_s: int | None = None  # None: unlimited
    up: bool = True
    nodes: tuple[str, ...] = field(default_factory=tuple)


class SlurmError(BackendError):
    code = "backend_error"


class SlurmUnavailable(SlurmError):
    """Slurm (slurmctld, slurmrestd) cannot be reached right now."""


class SlurmAuthError(SlurmError):
    """The credentials were refused (an expired or invalid token, an unknown user)."""


class SlurmRejected(SlurmError):
    """Slurm refused the request itself (invalid partition, too many GPUs, time limit, ...)."""

    code = "invalid_input"


class SlurmTransport(Protocol):
    """The backend's view of a Slurm cluster. Every method is async and never blocks the loop."""

    name: str
    batch_queries: bool  # jobs(ids) costs one request whatever the number of ids

    async def ping(self) -> None:
        """Raise SlurmUnavailable or SlurmAuthError unless slurmctld answers."""

    async def submit(self, req: JobRequest) -> str:
        """Queue the job; its Slurm job id."""

    async def jobs(self, ids: Sequence[str] | None = None) -> list[JobInfo]:
        """The named jobs that Slurm still knows (one request), or every job when ids is None."""

    async def job_detail(self, job_id: str) -> JobInfo | None:
        """One job with its exit code, from slurmctld or else accounting; None if unknown."""

    async def cancel(self, job_id: str) -> None:
        """scancel; a job that is gone already is not an error."""

    async def nodes(self) -> list[NodeInfo]: ...

    async def partitions(self) -> list[PartitionInfo]: ...

    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------------- parsing helpers

_GRES_RE = re.compile(r"^(?:gres[:/])?gpu(?::([^:(,]+))?:(\d+)")


def parse_gres(spec: str | None) -> dict[str, int]:
    """'gpu:a100:2,gpu:1(S:0),nic:1' -> {'a100': 2, '': 1} (GPU counts by type)."""
    out: dict[str, int] = {}
    if not spec:
        return out
    for part in re.split(r",(?![^(]*\))", spec):
        m = _GRES_RE.match(part.strip())
        if m:
            typ = m.group(1) or ""
            if typ.isdigit():  # 'gpu:2' parsed as type '2'? (not with this regex, but be safe)
                typ = ""
            out[typ] = out.get(typ, 0) + int(m.group(2))
    return out


def parse_tres_gpus(tres: str | None) -> int:
    """'cpu=1,mem=100M,gres/gpu=2,gres/gpu:a100=2' -> 2 (the untyped total)."""
    if not tres:
        return 0
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
    return 0


def parse_memory(value: str | None) -> int:
    """'100M', '4G', '512' (MiB), '1T' -> MiB."""
    if not value:
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]?)B?", value.strip().upper())
    if not m:
        return 0
    mult = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}[m.group(2)]
    return int(float(m.group(1)) * mult)


def parse_slurm_duration(value: str | None) -> int | None:
    """'10:00' (MM:SS), '1:00:00', '2-00:00:00', '30' (minutes), 'UNLIMITED' -> seconds."""
    if not value:
        return None
    v = value.strip()
    if v.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", "NOT_SET", ""):
        return None
    days = 0
    if "-" in v:
        d, _, v = v.partition("-")
        days = int(d)
    parts = [int(p) for p in v.split(":")] if v else [0]
    if len(parts) == 1:
        secs = parts[0] * 60 if days == 0 else parts[0] * 3600
    elif len(parts) == 2:
        secs = parts[0] * 3600 + parts[1] * 60 if days else parts[0] * 60 + parts[1]
    else:
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + secs


def base_state(state: Any) -> str:
    """'CANCELLED by 0', ['RUNNING'], 'completed' -> 'CANCELLED', 'RUNNING', 'COMPLETED'."""
    if isinstance(state, list):
        state = state[0] if state else ""
    text = str(state or "").strip().upper()
    return text.split()[0].rstrip("+") if text else "UNKNOWN"


def _epoch(value: Any) -> float | None:
    """A Slurm time (epoch seconds, 0 or a huge 'infinite' for unset) -> epoch or None."""
    if isinstance(value, dict):  # newer plugins: {"set": true, "number": N}
        value = value.get("number") if value.get("set", True) else None
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None
    if t <= 0 or t >= 4294967294:
        return None
    return t


def _int(value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("number") if value.get("set", True) else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def split_wait_status(status: int | None) -> tuple[int | None, int | None]:
    """A raw wait status (what slurmctld and squeue --json report) -> (exit code, signal)."""
    if status is None:
        return None, None
    if status & 0x7F:
        sig = status & 0x7F
        return 128 + sig, sig
    return (status >> 8) & 0xFF, None


def _parse_exit_pair(text: str | None) -> tuple[int | None, int | None]:
    """'3:0' -> (3, None); '0:15' -> (143, 15)."""
    if not text or ":" not in text:
        return None, None
    code_s, _, sig_s = text.partition(":")
    try:
        code, sig = int(code_s), int(sig_s)
    except ValueError:
        return None, None
    if sig:
        return 128 + sig, sig
    return code, None


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without checking the signature (only Slurm can)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


async def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> tuple[int, str, str]:
    """Run a command off the event loop: (exit status, stdout, stderr)."""
    exe = shutil.which(argv[0], path=(env or os.environ).get("PATH"))
    if exe is None:
        raise SlurmUnavailable(f"{argv[0]} is not installed (not on PATH)")
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *argv[1:],
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except OSError as exc:
        raise SlurmUnavailable(f"could not run {argv[0]}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SlurmUnavailable(f"{argv[0]} did not answer within {timeout:g}s") from None
    return (
        proc.returncode if proc.returncode is not None else -1,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


_UNREACHABLE = (
    "unable to contact slurm controller",
    "connection refused",
    "connect failure",
    "socket timed out",
    "communication connection failure",
    "slurm_load_",
    "zero bytes were transmitted",
    "unable to establish",
)


def _classify(message: str, *, submitting: bool = False) -> SlurmError:
    low = message.lower()
    if "authentication" in low or "invalid user" in low or "access/permission denied" in low:
        return SlurmAuthError(message)
    if any(p in low for p in _UNREACHABLE) or "controller" in low:
        return SlurmUnavailable(message)
    if submitting:
        return SlurmRejected(message)
    return SlurmError(message)


# ----------------------------------------------------------------------------- slurmrestd


class RestTransport:
    """slurmrestd over HTTP. The token comes from the site configuration or, when none is
    configured, from `scontrol token username=<user> lifespan=<s>` (run off the loop), renewed
    before it expires; a request the token makes fail is retried once with a fresh token."""

    name = "rest"
    batch_queries = False

    def __init__(
        self,
        url: str,
        user: str,
        *,
        token: str | None = None,
        token_lifespan_s: int = 3600,
        timeout_s: float = 10.0,
        concurrency: int = 8,
        env: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self._static_token = token
        self._token: str | None = token
        self._token_expires: float | None = _jwt_expiry(token) if token else None
        self.token_lifespan_s = token_lifespan_s
        self._env = dict(env) if env is not None else None
        self._concurrency = concurrency
        self._token_lock = asyncio.Lock()
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s),
            trust_env=False,
            transport=transport,
        )
        # GET /jobs answers 304 when nothing changed since update_time: keep the last list.
        self._all_jobs: list[JobInfo] | None = None
        self._all_jobs_at: float = 0.0

    # ------------------------------------------------------------------ token

    @property
    def token(self) -> str | None:
        return self._token

    def set_token(self, token: str) -> None:
        """Use this token from now on (tests and operators rotating a configured token)."""
        self._token = token
        self._token_expires = _jwt_expiry(token)

    async def _ensure_token(self, *, force: bool = False) -> str:
        async with self._token_lock:
            now = time.time()
            fresh = (
                self._token is not None
                and (self._token_expires is None or self._token_expires - now > 10)
            )
            if fresh and not force:
                assert self._token is not None
                return self._token
            if self._static_token is not None:
                if self._token is not None and not force:
                    return self._token  # expired: the request fails and says so
                raise SlurmAuthError(self._token_problem())
            self._token = await self._mint()
            self._token_expires = _jwt_expiry(self._token) or now + self.token_lifespan_s
            return self._token

    async def _mint(self) -> str:
        rc, out, err = await run_command(
            ["scontrol", "token", f"username={self.user}", f"lifespan={self.token_lifespan_s}"],
            env=self._env,
            timeout=15,
        )
        m = re.search(r"SLURM_JWT=(\S+)", out)
        if rc != 0 or not m:
            msg = (err or out).strip() or f"exit status {rc}"
            raise SlurmAuthError(
                f"could not get a slurmrestd token for user {self.user!r} with `scontrol token`: "
                f"{msg}; configure `token` for the site or run sciorch where scontrol works"
            )
        return m.group(1)

    def _token_problem(self) -> str:
        exp = self._token_expires
        if exp is not None and exp <= time.time():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(exp))
            return (
                f"the configured slurmrestd token for user {self.user!r} expired at {when}; "
                "configure a new `token` (scontrol token) or leave it unset so sciorch gets "
                "its own"
            )
        return (
            f"slurmrestd refused the configured token for user {self.user!r} (invalid or "
            "revoked); configure a new `token` or leave it unset so sciorch gets its own"
        )

    # ------------------------------------------------------------------ requests

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> tuple[int, dict[str, Any]]:
        for attempt in (0, 1):
            token = await self._ensure_token(force=attempt == 1)
            headers = {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": token}
            try:
                resp = await self._client.request(
                    method, path, json=json_body, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                raise SlurmUnavailable(
                    f"slurmrestd at {self.url} cannot be reached: {exc or type(exc).__name__}"
                ) from exc
            if resp.status_code == 304:
                return 304, {}
            try:
                if len(resp.content) > 256 * 1024:  # a long job list: parse off the loop
                    body = await asyncio.to_thread(json.loads, resp.content)
                else:
                    body = resp.json()
            except ValueError:
                body = {"errors": [{"error": resp.text.strip()[:300] or resp.reason_phrase}]}
            if not isinstance(body, dict):
                body = {"value": body}
            errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
            if resp.status_code < 300 and not errors:
                return resp.status_code, body
            if resp.status_code in ok_statuses:
                return resp.status_code, body
            auth = resp.status_code in (401, 403) or _looks_like_auth_failure(errors)
            if auth and attempt == 0:
                if self._static_token is not None and not self._token_expired():
                    # A configured token that is not expired: retrying will not help.
                    raise SlurmAuthError(self._token_problem())
                continue  # a fresh token, once
            message = _error_text(errors) or f"HTTP {resp.status_code}"
            if auth:
                if self._static_token is not None:
                    raise SlurmAuthError(self._token_problem())
                raise SlurmAuthError(
                    f"slurmrestd at {self.url} refused a fresh token for user {self.user!r}: "
                    f"{message}"
                )
            return resp.status_code, {**body, "_error": message, "_errors": errors}
        raise AssertionError("unreachable")

    def _token_expired(self) -> bool:
        return self._token_expires is not None and self._token_expires <= time.time()

    async def ping(self) -> None:
        _status, body = await self._request("GET", f"{API}/ping")
        if "_error" in body:
            raise _classify(f"slurmrestd ping failed: {body['_error']}")
        pings = body.get("pings") or []
        if not any(str(p.get("ping", "")).upper() == "UP" for p in pings):
            raise SlurmUnavailable(f"slurmctld does not answer slurmrestd's ping: {pings}")

    async def submit(self, req: JobRequest) -> str:
        job: dict[str, Any] = {
            "name": req.name,
            "current_working_directory": req.cwd,
            "standard_output": req.output,
            "standard_error": req.output,
            "environment": dict(req.env),
            "cpus_per_task": req.cpus_per_task,
            "time_limit": req.time_limit_min,
            "requeue": False,
        }
        if req.memory_mb:
            job["memory_per_node"] = req.memory_mb
        if req.gres:
            job["gres"] = req.gres
        for key in ("partition", "account", "qos", "reservation", "comment"):
            value = getattr(req, key)
            if value:
                job[key] = value
        _status, body = await self._request(
            "POST", f"{API}/job/submit", json_body={"script": req.script, "job": job}
        )
        if "_error" in body:
            raise _classify(body["_error"], submitting=True)
        job_id = body.get("job_id")
        if job_id is None:
            raise SlurmError(f"slurmrestd accepted the job but returned no job id: {body}")
        return str(job_id)

    async def jobs(self, ids: Sequence[str] | None = None) -> list[JobInfo]:
        if ids is not None:
            # One small request per job (a few at a time): GET /jobs has no filter in v0.0.38
            # and lists every job slurmctld remembers (MBs on a busy cluster).
            sem = asyncio.Semaphore(self._concurrency)

            async def one(job_id: str) -> JobInfo | None:
                async with sem:
                    return await self._one_job(job_id)

            found = await asyncio.gather(*(one(i) for i in ids))
            return [j for j in found if j is not None]
        asked = time.time()
        params = {"update_time": int(self._all_jobs_at) - 1} if self._all_jobs is not None else None
        _status, body = await self._request("GET", f"{API}/jobs", params=params)
        if _status == 304 and self._all_jobs is not None:
            return list(self._all_jobs)
        if "_error" in body:
            raise _classify(f"slurmrestd could not list jobs: {body['_error']}")
        self._all_jobs = [_rest_job(j) for j in body.get("jobs") or []]
        self._all_jobs_at = asked
        return list(self._all_jobs)

    async def _one_job(self, job_id: str) -> JobInfo | None:
        _status, body = await self._request("GET", f"{API}/job/{job_id}")
        if "_error" in body:
            if _unknown_job(body["_errors"]):
                return None
            raise _classify(f"slurmrestd could not show job {job_id}: {body['_error']}")
        jobs = body.get("jobs") or []
        return _rest_job(jobs[0]) if jobs else None

    async def job_detail(self, job_id: str) -> JobInfo | None:
        found = await self._one_job(job_id)
        if found is not None:
            return found
        # Gone from slurmctld (older than MinJobAge): ask accounting, where slurmrestd has it.
        status, body = await self._request("GET", f"{DB_API}/job/{job_id}", ok_statuses=(404,))
        if "_error" in body or status == 404:
            return None
        for j in body.get("jobs") or []:
            return _rest_db_job(j)
        return None

    async def cancel(self, job_id: str) -> None:
        _status, body = await self._request("DELETE", f"{API}/job/{job_id}")
        if "_error" in body and not _unknown_job(body["_errors"]):
            low = body["_error"].lower()
            if "already completed" in low or "job/step already completing" in low:
                return
            raise _classify(f"slurmrestd could not cancel job {job_id}: {body['_error']}")

    async def nodes(self) -> list[NodeInfo]:
        _status, body = await self._request("GET", f"{API}/nodes")
        if "_error" in body:
            raise _classify(f"slurmrestd could not list nodes: {body['_error']}")
        return [_json_node(n) for n in body.get("nodes") or []]

    async def partitions(self) -> list[PartitionInfo]:
        _status, body = await self._request("GET", f"{API}/partitions")
        if "_error" in body:
            raise _classify(f"slurmrestd could not list partitions: {body['_error']}")
        out = []
        for p in body.get("partitions") or []:
            limit = _int(p.get("max_time_limit"))
            flags = [str(f).lower() for f in p.get("flags") or []]
            out.append(
                PartitionInfo(
                    name=str(p.get("name")),
                    default="default" in flags,
                    max_time_s=limit * 60 if limit is not None and 0 <= limit < 2**31 else None,
                    up=str(p.get("state", "UP")).upper() == "UP",
                    nodes=tuple(_expand_nodes(str(p.get("nodes") or ""))),
                )
            )
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_text(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        text = e.get("error") or ""
        desc = e.get("description") or ""
        parts.append(f"{text}: {desc}" if text and desc and desc != text else text or desc)
    return "; ".join(p for p in parts if p)


def _looks_like_auth_failure(errors: list[dict[str, Any]]) -> bool:
    """slurmrestd passes a token it cannot check on to slurmctld, which drops the connection:
    the client sees error -1 'Unspecified error' or 5005 'Zero Bytes were transmitted or
    received' (slurmctld's log says 'auth_g_verify: ... authentication error')."""
    for e in errors:
        num = e.get("error_number", e.get("error_code", e.get("errno")))
        text = f"{e.get('error', '')} {e.get('description', '')}".lower()
        if "authentication" in text or num in (-1, 5005):
            return True
        if "unspecified error" in text or "zero bytes were transmitted" in text:
            return True
    return False


def _unknown_job(errors: list[dict[str, Any]]) -> bool:
    return any(
        e.get("error_number") == 2017 or "invalid job id" in str(e.get("error", "")).lower()
        for e in errors
    )


def _rest_job(j: Mapping[str, Any]) -> JobInfo:
    code, sig = split_wait_status(_int(j.get("exit_code")))
    limit = _int(j.get("time_limit"))
    reason = j.get("state_reason") or None
    return JobInfo(
        job_id=str(j.get("job_id")),
        state=base_state(j.get("job_state")),
        reason=None if reason in (None, "None") else str(reason),
        start_time=_epoch(j.get("start_time")),
        end_time=_epoch(j.get("end_time")),
        exit_code=code,
        signal=sig,
        node=str(j.get("batch_host") or "") or None,
        partition=j.get("partition") or None,
        qos=j.get("qos") or None,
        user=j.get("user_name") or None,
        cpus=_int(j.get("cpus")) or 0,
        memory_mb=(_int(j.get("memory_per_node")) or 0)
        or (_int(j.get("memory_per_cpu")) or 0) * max(1, _int(j.get("cpus")) or 1),
        gpus=parse_tres_gpus(j.get("tres_alloc_str") or j.get("tres_req_str")),
        time_limit_s=limit * 60 if limit is not None and 0 <= limit < 2**31 else None,
    )


def _rest_db_job(j: Mapping[str, Any]) -> JobInfo:
    state = j.get("state") or {}
    exit_code = j.get("exit_code") or {}
    code = _int(exit_code.get("return_code"))
    sig = _int((exit_code.get("signal") or {}).get("signal_id"))
    times = j.get("time") or {}
    return JobInfo(
        job_id=str(j.get("job_id")),
        state=base_state(state.get("current") if isinstance(state, dict) else state),
        reason=(state.get("reason") if isinstance(state, dict) else None) or None,
        start_time=_epoch(times.get("start")),
        end_time=_epoch(times.get("end")),
        exit_code=128 + sig if sig else code,
        signal=sig or None,
        partition=j.get("partition") or None,
        user=j.get("user") or None,
    )


def _json_node(n: Mapping[str, Any]) -> NodeInfo:
    gres = parse_gres(n.get("gres"))
    used = parse_gres(n.get("gres_used"))
    flags = frozenset(str(f).upper() for f in n.get("state_flags") or [])
    state = str(n.get("state") or "unknown").lower()
    if "+" in state:  # 'idle+drain'
        state, *rest = state.split("+")
        flags = flags | {r.upper() for r in rest}
    return NodeInfo(
        name=str(n.get("name")),
        state=state,
        flags=flags,
        reason=n.get("reason") or None,
        cpus=_int(n.get("cpus")) or 0,
        alloc_cpus=_int(n.get("alloc_cpus")) or 0,
        memory_mb=_int(n.get("real_memory")) or 0,
        alloc_memory_mb=_int(n.get("alloc_memory")) or 0,
        gpus=sum(gres.values()),
        gpus_used=sum(used.values()),
        gpu_types=tuple(sorted(t for t in gres if t)),
        partitions=tuple(n.get("partitions") or ()),
    )


def _expand_nodes(expr: str) -> list[str]:
    """'vm,n[01-03,07]' -> ['vm', 'n01', 'n02', 'n03', 'n07']."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", expr):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            out.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                out.append(prefix + lo)
                continue
            width = len(lo)
            out.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return out


# ----------------------------------------------------------------------------- the CLI

_SQUEUE_FORMAT = "%i|%T|%r|%S|%e|%B|%P|%q|%u|%C|%m|%b|%l"


class CliTransport:
    """The Slurm commands, run as the user sciorch runs as (off the event loop). Plain
    formatted output where the --json modes have quirks (squeue --json ignores -j)."""

    name = "cli"
    batch_queries = True

    def __init__(self, *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        base = dict(env) if env is not None else dict(os.environ)
        base["SLURM_TIME_FORMAT"] = "%s"  # epoch seconds in every time column
        self._env = base
        self._timeout = timeout_s

    async def _run(self, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        return await run_command(argv, env=self._env, stdin=stdin, timeout=self._timeout)

    async def ping(self) -> None:
        rc, out, err = await self._run("scontrol", "ping")
        if rc != 0 or "UP" not in out:
            raise _classify(f"scontrol ping: {(err or out).strip() or f'exit status {rc}'}")

    async def submit(self, req: JobRequest) -> str:
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={req.name}",
            f"--chdir={req.cwd}",
            f"--output={req.output}",
            f"--error={req.output}",
            "--open-mode=append",
            f"--cpus-per-task={req.cpus_per_task}",
            f"--time={req.time_limit_min}",
            "--no-requeue",
            "--export=ALL",
        ]
        if req.memory_mb:
            argv.append(f"--mem={req.memory_mb}M")
        if req.gres:
            argv.append(f"--gres={req.gres}")
        for key in ("partition", "account", "qos", "reservation", "comment"):
            value = getattr(req, key)
            if value:
                argv.append(f"--{key}={value}")
        # The job sees exactly this environment (sbatch --export=ALL of the submitting process).
        env = {k: v for k, v in self._env.items() if k.startswith("SLURM_")}
        env.update(req.env)
        rc, out, err = await run_command(
            argv, env=env, stdin=req.script.encode(), timeout=self._timeout
        )
        if rc != 0:
            message = "; ".join(
                line.removeprefix("sbatch: error: ").strip()
                for line in err.strip().splitlines()
                if line.strip()
            )
            raise _classify(message or f"sbatch failed with status {rc}", submitting=True)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {out.strip()!r}")
        return job_id

    async def jobs(self, ids: Sequence[str] | None = None) -> list[JobInfo]:
        if ids is not None and not ids:
            return []
        argv = ["squeue", "-h", "-o", _SQUEUE_FORMAT]
        if ids is None:  # the queue: what waits and what runs
            argv += ["-t", "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED"]
        else:
            argv += ["-t", "all", "-j", ",".join(ids)]
        rc, out, err = await self._run(*argv)
        if rc != 0:
            if "invalid job id" in err.lower():
                return []  # the only job asked for is unknown
            raise _classify(f"squeue: {err.strip() or f'exit status {rc}'}")
        return [j for j in (_squeue_line(line) for line in out.splitlines()) if j is not None]

    async def job_detail(self, job_id: str) -> JobInfo | None:
        rc, out, err = await self._run("scontrol", "-o", "show", "job", job_id)
        if rc == 0 and out.strip():
            return _scontrol_job(out.strip().splitlines()[0])
        if rc != 0 and "invalid job id" not in err.lower():
            raise _classify(f"scontrol show job {job_id}: {err.strip() or f'status {rc}'}")
        # Gone from slurmctld: accounting, if the site has it.
        rc, out, err = await self._run(
            "sacct", "-n", "-P", "-X", "-j", job_id, "-o",
            "JobID,State,ExitCode,Start,End,Partition",
        )
        if rc != 0:
            return None
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 6 and parts[0] == job_id:
                code, sig = _parse_exit_pair(parts[2])
                return JobInfo(
                    job_id=job_id,
                    state=base_state(parts[1]),
                    reason=parts[1] if " by " in parts[1] else None,
                    start_time=_epoch(parts[3]),
                    end_time=_epoch(parts[4]),
                    exit_code=code,
                    signal=sig,
                    partition=parts[5] or None,
                )
        return None

    async def cancel(self, job_id: str) -> None:
        rc, _out, err = await self._run("scancel", job_id)
        if rc != 0:
            low = err.lower()
            if "invalid job id" in low or "already completing" in low or "already completed" in low:
                return
            raise _classify(f"scancel {job_id}: {err.strip() or f'exit status {rc}'}")

    async def nodes(self) -> list[NodeInfo]:
        rc, out, err = await self._run("sinfo", "--json")
        if rc != 0:
            raise _classify(f"sinfo: {err.strip() or f'exit status {rc}'}")
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise SlurmError(f"sinfo --json printed something that is not JSON: {exc}") from exc
        return [_json_node(n) for n in data.get("nodes") or []]

    async def partitions(self) -> list[PartitionInfo]:
        rc, out, err = await self._run("scontrol", "-o", "show", "partition")
        if rc != 0:
            raise _classify(f"scontrol show partition: {err.strip() or f'exit status {rc}'}")
        out_list = []
        for line in out.splitlines():
            fields = _kv(line)
            if "PartitionName" not in fields:
                continue
            out_list.append(
                PartitionInfo(
                    name=fields["PartitionName"],
                    default=fields.get("Default") == "YES",
                    max_time_s=parse_slurm_duration(fields.get("MaxTime")),
                    up=fields.get("State", "UP") == "UP",
                    nodes=tuple(_expand_nodes(fields.get("Nodes", ""))),
                )
            )
        return out_list

    async def aclose(self) -> None:
        return None


def _kv(line: str) -> dict[str, str]:
    """'A=1 B=two words C=3' -> {'A': '1', 'B': 'two words', 'C': '3'} (scontrol -o)."""
    out: dict[str, str] = {}
    key = r"[A-Za-z][A-Za-z0-9_:/]*"
    for m in re.finditer(rf"(?:^|\s)({key})=(.*?)(?=\s+{key}=|$)", line):
        out[m.group(1)] = m.group(2)
    return out


def _squeue_line(line: str) -> JobInfo | None:
    parts = line.split("|")
    if len(parts) < 13 or not parts[0].strip():
        return None
    job_id, state, reason, start, end, host, part, qos, user, cpus, mem, tres, limit = parts[:13]
    return JobInfo(
        job_id=job_id.strip(),
        state=base_state(state),
        reason=None if reason in ("None", "", "(null)") else reason,
        start_time=_epoch(start),
        end_time=_epoch(end),
        node=None if host in ("", "n/a", "N/A", "(null)") else host,
        partition=part or None,
        qos=qos or None,
        user=user or None,
        cpus=_int(cpus) or 0,
        memory_mb=parse_memory(mem),
        gpus=sum(parse_gres(tres).values()) if tres not in ("N/A", "") else 0,
        time_limit_s=parse_slurm_duration(limit),
    )


def _scontrol_job(line: str) -> JobInfo:
    f = _kv(line)
    code, sig = _parse_exit_pair(f.get("ExitCode"))
    reason = f.get("Reason")
    return JobInfo(
        job_id=f.get("JobId", ""),
        state=base_state(f.get("JobState")),
        reason=None if reason in (None, "None") else reason,
        start_time=_epoch(f.get("StartTime")),
        end_time=_epoch(f.get("EndTime")),
        exit_code=code,
        signal=sig,
        node=f.get("BatchHost") or None,
        partition=f.get("Partition") or None,
        qos=f.get("QOS") or None,
        time_limit_s=parse_slurm_duration(f.get("TimeLimit")),
    )


__all__ = [
    "CliTransport",
    "JobInfo",
    "JobRequest",
    "NodeInfo",
    "PartitionInfo",
    "RestTransport",
    "SlurmAuthError",
    "SlurmError",
    "SlurmRejected",
    "SlurmTransport",
    "SlurmUnavailable",
    "base_state",
    "parse_gres",
    "split_wait_status",
]
