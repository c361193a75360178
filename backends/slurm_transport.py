"""How the Slurm backend talks to Slurm: one small interface, two ways.

`RestTransport` (backends.slurm_rest) speaks to slurmrestd (OpenAPI v0.0.38) over HTTP with a JWT;
it is the main path, since a facility service rarely runs on a login node. `CliTransport`
(backends.slurm_cli) runs the Slurm commands (sbatch, squeue, scontrol, sinfo, sacct, scancel) for
sites without slurmrestd. Both hand back the
same plain records (`JobInfo`, `NodeInfo`, `PartitionInfo`) and raise the same errors, so the
backend above them behaves identically whichever one a site uses.

Errors: `SlurmRejected` (Slurm refused a request: bad input, say why), `SlurmAuthError` (the
credentials were refused), `SlurmUnavailable` (Slurm or slurmrestd cannot be reached right now;
try again later). All are `BackendError`s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ground.errors import BackendError

log = logging.getLogger("sciorch.backends.slurm")


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
    user: str | None = None  # the Slurm user it is submitted as (None: the site's own)
    array: str | None = None  # a job array's indices, '0-19%4' (elements: '<id>_<index>')

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
        return self.state in ("idle", "mixed", "allocated", "completing") and not (self.flags & bad)


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

    async def cancel(self, job_id: str, user: str | None = None) -> None:
        """scancel (as `user`, the job's own, where it is not the site's); a job that is gone
        already is not an error."""

    async def set_time_limit(self, job_id: str, minutes: int) -> None:
        """scontrol update JobId=.. TimeLimit=.. (as root or SlurmUser); SlurmRejected if
        Slurm refuses."""

    async def nodes(self) -> list[NodeInfo]: ...

    async def partitions(self) -> list[PartitionInfo]: ...

    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------------- parsing helpers

_ARRAY_RE = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")


def expand_array_id(job_id: str) -> list[str]:
    """'123_[2-4,7%2]' (an array's elements still pending as one record) -> ['123_2', '123_3',
    '123_4', '123_7']; any other id as it is."""
    m = _ARRAY_RE.match(job_id)
    if m is None:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


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


def epoch(value: Any) -> float | None:
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


def as_int(value: Any) -> int | None:
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


def classify(message: str, *, submitting: bool = False) -> SlurmError:
    low = message.lower()
    if "authentication" in low or "invalid user" in low or "access/permission denied" in low:
        return SlurmAuthError(message)
    if any(p in low for p in _UNREACHABLE) or "controller" in low:
        return SlurmUnavailable(message)
    if submitting:
        return SlurmRejected(message)
    return SlurmError(message)


# ----------------------------------------------------------------------------- shared by both


def json_node(n: Mapping[str, Any]) -> NodeInfo:
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
        cpus=as_int(n.get("cpus")) or 0,
        alloc_cpus=as_int(n.get("alloc_cpus")) or 0,
        memory_mb=as_int(n.get("real_memory")) or 0,
        alloc_memory_mb=as_int(n.get("alloc_memory")) or 0,
        gpus=sum(gres.values()),
        gpus_used=sum(used.values()),
        gpu_types=tuple(sorted(t for t in gres if t)),
        partitions=tuple(n.get("partitions") or ()),
    )


def expand_nodes(expr: str) -> list[str]:
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


__all__ = [
    "JobInfo",
    "JobRequest",
    "NodeInfo",
    "PartitionInfo",
    "SlurmAuthError",
    "SlurmError",
    "SlurmRejected",
    "SlurmTransport",
    "SlurmUnavailable",
    "as_int",
    "base_state",
    "classify",
    "epoch",
    "expand_nodes",
    "json_node",
    "parse_gres",
    "parse_memory",
    "parse_slurm_duration",
    "parse_tres_gpus",
    "run_command",
    "split_wait_status",
]
