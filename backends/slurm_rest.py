"""The Slurm transport over slurmrestd (OpenAPI v0.0.38, HTTP with a JWT): the main path, since
a facility service rarely runs on a login node (the interface: backends.slurm_transport)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx

from backends.slurm_transport import (
    JobInfo,
    JobRequest,
    NodeInfo,
    PartitionInfo,
    SlurmAuthError,
    SlurmError,
    SlurmUnavailable,
    as_int,
    base_state,
    classify,
    epoch,
    expand_array_id,
    expand_nodes,
    json_node,
    parse_tres_gpus,
    run_command,
    split_wait_status,
)

log = logging.getLogger("sciorch.backends.slurm")

API = "/slurm/v0.0.38"
DB_API = "/slurmdb/v0.0.38"


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without checking the signature (only Slurm can)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


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
        # Other users' tokens (jobs run as the principal's account): user -> (token, expiry).
        self._user_tokens: dict[str, tuple[str, float]] = {}
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

    async def _ensure_token(self, *, force: bool = False, user: str | None = None) -> str:
        if user is not None and user != self.user:
            return await self._user_token(user, force=force)
        async with self._token_lock:
            now = time.time()
            fresh = self._token is not None and (
                self._token_expires is None or self._token_expires - now > 10
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

    async def _user_token(self, user: str, *, force: bool) -> str:
        """A token of another user (`scontrol token` as root or SlurmUser), kept until a tenth
        of its life (at least 10 s) is left."""
        async with self._token_lock:
            now = time.time()
            held = self._user_tokens.get(user)
            margin = max(10.0, self.token_lifespan_s / 10)
            if held is not None and not force and held[1] - now > margin:
                return held[0]
            token = await self._mint(user)
            self._user_tokens[user] = (token, _jwt_expiry(token) or now + self.token_lifespan_s)
            return token

    async def _mint(self, user: str | None = None) -> str:
        user = user or self.user
        rc, out, err = await run_command(
            ["scontrol", "token", f"username={user}", f"lifespan={self.token_lifespan_s}"],
            env=self._env,
            timeout=15,
        )
        m = re.search(r"SLURM_JWT=(\S+)", out)
        if rc != 0 or not m:
            msg = (err or out).strip() or f"exit status {rc}"
            raise SlurmAuthError(
                f"could not get a slurmrestd token for user {user!r} with `scontrol token`: "
                f"{msg}; configure `token` for the site or run sciorch where scontrol works"
                + (" (as root or SlurmUser, to act for other users)" if user != self.user else "")
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
        user: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """One request as `user` (default: the site's own user)."""
        as_user = user or self.user
        for attempt in (0, 1):
            token = await self._ensure_token(force=attempt == 1, user=as_user)
            headers = {"X-SLURM-USER-NAME": as_user, "X-SLURM-USER-TOKEN": token}
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
                if as_user != self.user:
                    continue
                if self._static_token is not None and not self._token_expired():
                    # A configured token that is not expired: retrying will not help.
                    raise SlurmAuthError(self._token_problem())
                continue  # a fresh token, once
            message = _error_text(errors) or f"HTTP {resp.status_code}"
            if auth:
                if self._static_token is not None and as_user == self.user:
                    raise SlurmAuthError(self._token_problem())
                raise SlurmAuthError(
                    f"slurmrestd at {self.url} refused a fresh token for user {as_user!r}: "
                    f"{message}"
                )
            return resp.status_code, {**body, "_error": message, "_errors": errors}
        raise AssertionError("unreachable")

    def _token_expired(self) -> bool:
        return self._token_expires is not None and self._token_expires <= time.time()

    async def ping(self) -> None:
        _status, body = await self._request("GET", f"{API}/ping")
        if "_error" in body:
            raise classify(f"slurmrestd ping failed: {body['_error']}")
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
        for key in ("partition", "account", "qos", "reservation", "comment", "array"):
            value = getattr(req, key)
            if value:
                job[key] = value
        _status, body = await self._request(
            "POST", f"{API}/job/submit", json_body={"script": req.script, "job": job}, user=req.user
        )
        if "_error" in body:
            raise classify(body["_error"], submitting=True)
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
            raise classify(f"slurmrestd could not list jobs: {body['_error']}")
        self._all_jobs = [_rest_job(j) for j in body.get("jobs") or []]
        self._all_jobs_at = asked
        return list(self._all_jobs)

    async def _one_job(self, job_id: str) -> JobInfo | None:
        _status, body = await self._request("GET", f"{API}/job/{job_id}")
        if "_error" in body:
            if _unknown_job(body["_errors"]):
                return await self._pending_element(job_id) if "_" in job_id else None
            raise classify(f"slurmrestd could not show job {job_id}: {body['_error']}")
        jobs = body.get("jobs") or []
        if not jobs:
            return None
        info = _rest_job(jobs[0])
        # An array element is known by '<array id>_<index>' (its record has its own job id).
        return replace(info, job_id=job_id) if "_" in job_id else info

    async def _pending_element(self, job_id: str) -> JobInfo | None:
        """An array element still pending inside its array's record ('4-19%4'), which
        slurmrestd does not find by the element's id."""
        array_id = job_id.partition("_")[0]
        _status, body = await self._request("GET", f"{API}/job/{array_id}")
        for j in body.get("jobs") or [] if "_error" not in body else []:
            tasks = j.get("array_task_string")
            if tasks and job_id in expand_array_id(f"{array_id}_[{tasks}]"):
                return replace(_rest_job(j), job_id=job_id)
        return None

    async def set_time_limit(self, job_id: str, minutes: int) -> None:
        _status, body = await self._request(
            "POST", f"{API}/job/{job_id}", json_body={"time_limit": minutes}
        )
        if "_error" in body:
            raise classify(
                f"slurmrestd could not update job {job_id}: {body['_error']}", submitting=True
            )

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

    async def cancel(self, job_id: str, user: str | None = None) -> None:
        _status, body = await self._request("DELETE", f"{API}/job/{job_id}", user=user)
        if "_error" in body and not _unknown_job(body["_errors"]):
            low = body["_error"].lower()
            if "already completed" in low or "job/step already completing" in low:
                return
            raise classify(f"slurmrestd could not cancel job {job_id}: {body['_error']}")

    async def nodes(self) -> list[NodeInfo]:
        _status, body = await self._request("GET", f"{API}/nodes")
        if "_error" in body:
            raise classify(f"slurmrestd could not list nodes: {body['_error']}")
        return [json_node(n) for n in body.get("nodes") or []]

    async def partitions(self) -> list[PartitionInfo]:
        _status, body = await self._request("GET", f"{API}/partitions")
        if "_error" in body:
            raise classify(f"slurmrestd could not list partitions: {body['_error']}")
        out = []
        for p in body.get("partitions") or []:
            limit = as_int(p.get("max_time_limit"))
            flags = [str(f).lower() for f in p.get("flags") or []]
            out.append(
                PartitionInfo(
                    name=str(p.get("name")),
                    default="default" in flags,
                    max_time_s=limit * 60 if limit is not None and 0 <= limit < 2**31 else None,
                    up=str(p.get("state", "UP")).upper() == "UP",
                    nodes=tuple(expand_nodes(str(p.get("nodes") or ""))),
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
        e.get("error_number") == 2017
        or "invalid job id" in str(e.get("error", "")).lower()
        # a pending array element cancelled before it split off
        or "unable to find jobid" in f"{e.get('error', '')} {e.get('description', '')}".lower()
        for e in errors
    )


def _rest_job(j: Mapping[str, Any]) -> JobInfo:
    code, sig = split_wait_status(as_int(j.get("exit_code")))
    limit = as_int(j.get("time_limit"))
    reason = j.get("state_reason") or None
    return JobInfo(
        job_id=str(j.get("job_id")),
        state=base_state(j.get("job_state")),
        reason=None if reason in (None, "None") else str(reason),
        start_time=epoch(j.get("start_time")),
        end_time=epoch(j.get("end_time")),
        exit_code=code,
        signal=sig,
        node=str(j.get("batch_host") or "") or None,
        partition=j.get("partition") or None,
        qos=j.get("qos") or None,
        user=j.get("user_name") or None,
        cpus=as_int(j.get("cpus")) or 0,
        memory_mb=(as_int(j.get("memory_per_node")) or 0)
        or (as_int(j.get("memory_per_cpu")) or 0) * max(1, as_int(j.get("cpus")) or 1),
        gpus=parse_tres_gpus(j.get("tres_alloc_str") or j.get("tres_req_str")),
        time_limit_s=limit * 60 if limit is not None and 0 <= limit < 2**31 else None,
    )


def _rest_db_job(j: Mapping[str, Any]) -> JobInfo:
    state = j.get("state") or {}
    exit_code = j.get("exit_code") or {}
    code = as_int(exit_code.get("return_code"))
    sig = as_int((exit_code.get("signal") or {}).get("signal_id"))
    times = j.get("time") or {}
    return JobInfo(
        job_id=str(j.get("job_id")),
        state=base_state(state.get("current") if isinstance(state, dict) else state),
        reason=(state.get("reason") if isinstance(state, dict) else None) or None,
        start_time=epoch(times.get("start")),
        end_time=epoch(times.get("end")),
        exit_code=128 + sig if sig else code,
        signal=sig or None,
        partition=j.get("partition") or None,
        user=j.get("user") or None,
    )


__all__ = ["RestTransport"]
