"""The domain model: Service (a template), Event (an allocation), Entry (a live instance), Site.

Every boundary of sciorch speaks these pydantic models; the store persists them and the tools
return them.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)

from ground.compose import Component, check_exports
from ground.errors import FieldValueError

# ----------------------------------------------------------------------------- states


class EntryState(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    READY = "ready"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {EntryState.SUCCEEDED, EntryState.FAILED, EntryState.CANCELLED, EntryState.EXPIRED}
)
ACTIVE_STATES = frozenset(set(EntryState) - TERMINAL_STATES)

_FINISH = {EntryState.SUCCEEDED, EntryState.FAILED, EntryState.CANCELLED, EntryState.EXPIRED}

# The one state machine every backend reports into. `provisioning` may be re-entered from
# running/ready when a crashed service is restarted by its policy.
ALLOWED_TRANSITIONS: dict[EntryState, frozenset[EntryState]] = {
    EntryState.PENDING: frozenset({EntryState.PROVISIONING, EntryState.RUNNING} | _FINISH),
    EntryState.PROVISIONING: frozenset({EntryState.RUNNING, EntryState.PENDING} | _FINISH),
    EntryState.RUNNING: frozenset({EntryState.READY, EntryState.PROVISIONING} | _FINISH),
    EntryState.READY: frozenset({EntryState.RUNNING, EntryState.PROVISIONING} | _FINISH),
    EntryState.SUCCEEDED: frozenset(),
    EntryState.FAILED: frozenset(),
    EntryState.CANCELLED: frozenset(),
    EntryState.EXPIRED: frozenset(),
}


def can_transition(old: EntryState, new: EntryState) -> bool:
    return new in ALLOWED_TRANSITIONS[old]


# ----------------------------------------------------------------------------- quantities


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode takes JSON true for the number 1.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    return value


# The number types of inputs: no booleans, and for Number no inf or nan.
Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]
# The optional ones check the union: on `Int | None`, pydantic could not apply a field's bounds
# (gt, le) to the int inside the validator, and would publish them as unknown keywords.
OptInt = Annotated[int | None, BeforeValidator(_not_bool)]
OptNumber = Annotated[Annotated[float, AllowInfNan(False)] | None, BeforeValidator(_not_bool)]
# And the flag of inputs: true or false only (lax mode would take 0, 1, "yes", "off").
Bool = Annotated[bool, Strict()]

_MEM_UNITS = {
    "": 1 / (1024 * 1024),
    "k": 1 / 1024,
    "ki": 1 / 1024,
    "kb": 1 / 1024,
    "m": 1,
    "mi": 1,
    "mb": 1,
    "g": 1024,
    "gi": 1024,
    "gb": 1024,
    "t": 1024 * 1024,
    "ti": 1024 * 1024,
    "tb": 1024 * 1024,
}


# Far above any machine, and small enough that every quantity below stays a finite number.
MAX_MEMORY_MB = 2**40
MAX_DURATION_S = 100 * 366 * 86400
_MAX_DIGITS = 20


def _refuse(what: str | None, message: str) -> ValueError:
    """About a named input of a model validator (see FieldValueError), or plain."""
    return FieldValueError(what, message) if what else ValueError(f"duration {message}")


def _finite(value: int | float, what: str | None, limit: int) -> float:
    """A number that may be converted to int: no bool, inf, nan or 400-digit integer."""
    ok = isinstance(value, int) or math.isfinite(value)  # isfinite(10**400) overflows
    if isinstance(value, bool) or not ok or abs(value) > limit:
        raise _refuse(what, f"must be a number from 0 to {limit}")
    return float(value)


def parse_memory_mb(value: Any) -> int:
    """'512Mi', '4G', '2gb' or a number of MiB -> MiB."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise FieldValueError("memory", "must not be negative")
        return int(_finite(value, "memory", MAX_MEMORY_MB))
    if not isinstance(value, str):
        raise FieldValueError("memory", "expected a size such as '512Mi', '4Gi' or 2048 (MiB)")
    m = re.fullmatch(rf"\s*(\d{{1,{_MAX_DIGITS}}}(?:\.\d{{1,9}})?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _MEM_UNITS:
        raise FieldValueError(
            "memory", f"{value[:40]!r} is not a size such as '512Mi', '4Gi' or 2048 (MiB)"
        )
    mb = float(m.group(1)) * _MEM_UNITS[m.group(2).lower()]
    return max(0, int(_finite(mb, "memory", MAX_MEMORY_MB)))


def parse_duration_s(value: Any, what: str | None = None) -> int:
    """'01:30:00', '2-00:00:00', '90m', '30s', '2h' or seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not value > 0:
            raise _refuse(what, "must be positive")
        return int(_finite(value, what, MAX_DURATION_S))
    if not isinstance(value, str):
        raise _refuse(what, "expected seconds or a string such as '01:00:00' or '30m'")
    v = value.strip()
    if len(v) > 3 * _MAX_DIGITS:
        raise _refuse(what, f"{v[:40]!r}... is too long")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", v)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int(_finite(seconds, what, MAX_DURATION_S))
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", v)
    if m:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
        total = days * 86400 + hours * 3600 + minutes * 60 + seconds
        if total > 0:
            return total
    if v.isdigit() and int(v) > 0:
        return int(_finite(int(v), what, MAX_DURATION_S))
    raise _refuse(what, f"{value!r} is not seconds or 'HH:MM:SS', '[D-]HH:MM:SS', '30m', '2h'")


def format_duration(seconds: int) -> str:
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------- resources


def _resource_aliases(data: Any) -> Any:
    """Accept `memory: 4Gi` and `walltime: 01:00:00` for memory_mb and walltime_s."""
    if isinstance(data, dict):
        data = dict(data)
        if "memory" in data:
            data["memory_mb"] = parse_memory_mb(data.pop("memory"))
        if "walltime" in data:
            data["walltime_s"] = parse_duration_s(data.pop("walltime"), "walltime")
    return data


class Resources(BaseModel):
    """What one entry needs. Memory in MiB, walltime in seconds (strings like '4Gi'/'01:00:00'
    are accepted on input)."""

    model_config = ConfigDict(extra="forbid")

    cpus: Number = Field(1, gt=0, le=4096, description="CPU cores")
    memory_mb: Int = Field(
        512, ge=0, le=MAX_MEMORY_MB, description="memory in MiB ('4Gi' accepted)"
    )
    gpus: Int = Field(0, ge=0, le=64, description="whole GPUs")
    gpu_type: str | None = Field(None, description="GPU model, e.g. 'a100'; any if unset")
    walltime_s: Int = Field(
        3600, gt=0, le=MAX_DURATION_S, description="time limit in seconds ('01:00:00' accepted)"
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _resource_aliases(data)


class ResourceRequest(BaseModel):
    """A partial override of a template's resources, as a caller sends it."""

    model_config = ConfigDict(extra="forbid")

    cpus: OptNumber = Field(None, gt=0, le=4096)
    memory_mb: OptInt = Field(None, ge=0, le=MAX_MEMORY_MB)
    gpus: OptInt = Field(None, ge=0, le=64)
    gpu_type: str | None = None
    walltime_s: OptInt = Field(None, gt=0, le=MAX_DURATION_S)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        return _resource_aliases(data)

    def apply_to(self, base: Resources) -> Resources:
        return base.model_copy(update=self.model_dump(exclude_none=True))


# ----------------------------------------------------------------------------- services


ServiceKind = Literal["job", "service"]
_ALL_KINDS: tuple[ServiceKind, ...] = ("job", "service")
RESERVED_PLACEHOLDERS = frozenset(
    {
        "python",
        "port",
        "base_path",
        "public_origin",
        "entry_id",
        "workdir",
        "params_file",
        "result_file",
        "stream_file",
        "output_dir",
    }
)


HEALTH_PLACEHOLDERS = frozenset({"base_path", "entry_id"})


class HealthCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        "/",
        description="HTTP path answered with 2xx/3xx once the service is up; with strip_prefix "
        "false, put it under the entry's prefix: '{base_path}api/status'",
    )
    timeout_s: float = Field(60, gt=0, description="give up (entry fails) after this long")
    interval_s: float = Field(0.2, gt=0)

    @field_validator("path")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc})") from exc
        if unknown := fields - HEALTH_PLACEHOLDERS:
            raise ValueError(
                f"placeholders {sorted(unknown)} are not known here; "
                f"use {sorted(HEALTH_PLACEHOLDERS)}"
            )
        if not v.startswith(("/", "{base_path}")):
            raise ValueError("must start with '/' or '{base_path}'")
        return v


class RestartPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["never", "on-failure"] = "never"
    max_restarts: int = Field(3, ge=0, le=100)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent: int | None = Field(
        None, ge=1, description="active entries of this service one principal may hold at once"
    )


class InputSpec(BaseModel):
    """One input a template declares: staged as $SCIORCH_INPUTS/<name> before the job starts."""

    model_config = ConfigDict(extra="forbid")

    # A plain file name: it becomes a path in the work dir and a placeholder-free env value.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    kind: Literal["file", "directory"] = "file"
    required: bool = True
    max_bytes: int | None = Field(None, ge=1, description="largest size (a directory: in all)")
    description: str = ""


class Service(BaseModel):
    """A catalogue template: the static blueprint of a job or a long-running service."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    version: str = Field("1.0.0", pattern=r"^[0-9A-Za-z.+-]+$")
    kind: ServiceKind
    description: str = ""
    command: list[str] = Field(
        min_length=1,
        description="argv template; {param} and reserved placeholders such as {python}, {port}",
    )
    image: str | None = Field(None, description="container image for sites that run images")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False},
        description="JSON schema of the parameters",
    )
    resources: Resources = Field(default_factory=Resources)
    health: HealthCheck | None = None
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    limits: Limits = Field(default_factory=Limits)
    results: dict[str, Any] | None = Field(None, description="JSON schema of the final result")
    strip_prefix: bool = Field(
        True, description="services: the proxy strips /entries/<id> before forwarding"
    )
    resource_parameters: dict[
        Literal["cpus", "memory_mb", "gpus", "gpu_type", "walltime_s"], str
    ] = Field(
        default_factory=dict,
        description="resources a parameter sets (resource -> parameter name); a null value "
        "keeps the template's, the caller's resources override both",
    )
    env: dict[str, str] = Field(default_factory=dict)
    components: list[Component] = Field(
        default_factory=list,
        description="a composed service: the entries launched with this one (ground.compose)",
    )
    component_name: str = Field(
        "main", pattern=r"^[a-z][a-z0-9_]{0,30}$", description="this entry's name in its group"
    )
    exports: dict[str, str] = Field(
        default_factory=dict,
        description="variables this entry gives the group and its event once up ({host}, "
        "{port}, {endpoint}, {url}, {entry_id})",
    )
    inputs: list[InputSpec] = Field(
        default_factory=list, description="files the caller provides, staged before it starts"
    )
    source: str | None = Field(None, description="file the template was loaded from")

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        import shlex

        if isinstance(v, str):
            return shlex.split(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> Service:
        if self.kind == "service" and self.health is None:
            self.health = HealthCheck()
        if self.parameters.get("type", "object") != "object":
            raise ValueError("parameters: the schema's type must be 'object'")
        props = self.parameters.get("properties", {}) or {}
        clash = RESERVED_PLACEHOLDERS & set(props)
        if clash:
            raise ValueError(f"parameters: names {sorted(clash)} are reserved placeholders")
        if unknown := sorted(set(self.resource_parameters.values()) - set(props)):
            raise ValueError(f"resource_parameters: {unknown} are not parameters")
        check_exports(self.exports)
        names = [self.component_name] + [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components: names {names} must differ (and from component_name)")
        for c in self.components:
            if missing := sorted(c.referenced_parameters() - set(props)):
                raise ValueError(f"components.{c.name}: {missing} are not parameters")
        import string

        known = RESERVED_PLACEHOLDERS | set(props)
        for arg in self.command:
            for _, field, _, _ in string.Formatter().parse(arg):
                if field is not None and field.split(".")[0].split("[")[0] not in known:
                    raise ValueError(
                        f"command: placeholder {{{field}}} is neither a parameter nor one of "
                        f"{sorted(RESERVED_PLACEHOLDERS)}"
                    )
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ServiceSummary(BaseModel):
    name: str
    version: str = Field(description="the default version: the newest stable one")
    kind: ServiceKind
    description: str
    versions: list[str] = Field(description="every version, oldest first; launch as name@version")
    dev_versions: list[str] = Field(
        default_factory=list, description="the pre-releases among them (never the default)"
    )
    resources: Resources
    parameters: dict[str, Any]
    inputs: list[InputSpec] = Field(
        default_factory=list, description="files to pass as inputs={name: uri} when launching"
    )


# ----------------------------------------------------------------------------- principals


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    OWNER = "owner"


ROLE_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.OWNER: 3}


class Principal(BaseModel):
    """Who is calling. `admin` sees everything (granted by the `admin` scope over MCP)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=200)
    admin: bool = False
    urgent: bool = Field(False, description="may ask for urgent work (the sciorch.urgent scope)")
    # The string claims of the caller's access token, as (name, value) pairs (a tuple keeps the
    # model hashable): a site may map a principal to its account by one (ground.accounts).
    claims: tuple[tuple[str, str], ...] = ()

    def claim(self, name: str) -> str | None:
        return next((v for k, v in self.claims if k == name), None)


# ----------------------------------------------------------------------------- events


class EventState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"
    EXPIRED = "expired"


class Event(BaseModel):
    # Frozen: the store hands the same object to every reader until the next write.
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    owner: str
    site: str | None = None
    state: EventState = EventState.ACTIVE
    created_at: datetime
    expires_at: datetime | None = None
    stopped_at: datetime | None = None
    shares: dict[str, Role] = Field(default_factory=dict)
    default: bool = False
    reservation: str | None = Field(None, description="Slurm reservation its entries run in")
    webhook_url: str | None = Field(None, description="where its warnings are POSTed")

    def role_of(self, principal: Principal) -> Role | None:
        if principal.admin or principal.id == self.owner:
            return Role.OWNER
        return self.shares.get(principal.id)


# ----------------------------------------------------------------------------- entries


class Transition(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: EntryState
    at: datetime
    reason: str | None = None


class Entry(BaseModel):
    # Frozen: the store hands the same object to every reader until the next write.
    model_config = ConfigDict(frozen=True)

    id: str
    event_id: str
    service: str
    version: str
    kind: ServiceKind
    site: str
    submitted_by: str
    state: EntryState
    reason: str | None = Field(None, description="why it is in its state (pending reason, error)")
    parameters: dict[str, Any] = Field(default_factory=dict)
    resources: Resources
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    url: str | None = Field(None, description="per-entry URL through the server's proxy")
    endpoint: str | None = Field(None, description="internal upstream address of a service")
    handle: dict[str, Any] = Field(default_factory=dict, description="backend handle")
    idempotency_key: str | None = None
    restarts: int = 0
    result: dict[str, Any] | None = None
    transitions: list[Transition] = Field(default_factory=list)


# ----------------------------------------------------------------------------- sites


class SiteStatus(StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    MAINTENANCE = "maintenance"
    DOWN = "down"


class Capabilities(BaseModel):
    cpus: float
    memory_mb: int
    gpus: int = 0
    gpu_types: list[str] = Field(default_factory=list)
    max_walltime_s: int | None = None
    kinds: list[ServiceKind] = Field(default_factory=lambda: list(_ALL_KINDS))
    # `gpus` is what one entry can get (the largest node); these two are the whole site now.
    gpus_total: int | None = Field(
        None, ge=0, description="GPUs across the site's usable nodes (None: the site does not say)"
    )
    gpus_free: int | None = Field(
        None, ge=0, description="of those, GPUs no running work holds now (None: unknown)"
    )


class Site(BaseModel):
    name: str
    kind: str
    status: SiteStatus
    status_reason: str | None = None
    capabilities: Capabilities
    estimated_wait_s: float | None = None
    active_entries: int = 0
    account: str | None = Field(
        None, description="the account your work runs as here (None: the server's own user)"
    )
    account_note: str | None = Field(
        None, description="how your account here is decided, or why you have none (refused)"
    )
    association: AccountUsage | None = Field(
        None, description="your account's limits and usage as the site's scheduler reports them"
    )


class AccountUsage(BaseModel):
    """A user's association on a scheduler (Slurm: sacctmgr show assoc, sshare)."""

    user: str
    account: str | None = Field(None, description="the scheduler account it is charged to")
    limits: dict[str, str] = Field(default_factory=dict, description="set limits only")
    usage: dict[str, str] = Field(default_factory=dict, description="raw usage, fairshare")


# ----------------------------------------------------------------------------- bus messages


class Message(BaseModel):
    """What the event bus carries. `kind` says which fields are set."""

    kind: Literal["transition", "log", "stream", "event", "warning"]
    entry_id: str | None = None
    event_id: str | None = None
    state: EntryState | None = None
    reason: str | None = None
    log_size: int | None = None
    record: dict[str, Any] | None = None
    record_index: int | None = None
    at: datetime
