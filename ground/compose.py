"""Composed services: a template whose entry comes with a group of other entries.

A template lists `components:`; launching it launches the template's own entry (the group's
*main* component, named by `component_name`) and, for each component, `count` entries of the
component's catalogue service, all in one event:

- `start: before` components (sidecars: a logger, a database) are started first; the main one
  is held (pending) until every one of them is up (a service ready, a job running);
- `start: after` components (a Dask cluster's workers) are started once the main one is ready.

Each member is told the addresses of the members started before it, through environment
variables: SCIORCH_COMPONENT_<NAME>_ENTRY_ID, _ENDPOINT (internal http://host:port of a service),
_URL (its proxied URL), and for a count above one the same with _<INDEX> after the name. All
members share SCIORCH_GROUP_ID and SCIORCH_GROUP_SECRET, a random credential made per launch
(for a sidecar that wants a password). A component's `exports` are more variables, filled from
its address (`{host}`, `{port}`, `{endpoint}`, `{url}`, `{entry_id}`) once it is up, and given
to the later members and to every entry launched into the event after that (a Dask client job
finds DASK_SCHEDULER_ADDRESS so).

Members share the main one's lifetime: they run on its site with its time limit; when the
main entry ends, the others are cancelled; when a component with `on_exit: fail` ends (other
than succeeded) while the main one is still active, the main entry fails (saying which
component ended and why) and the rest are cancelled.

The membership of an entry is fixed at launch and rides in its backend handle under `group`
(backends merge their own keys beside it), so listing entries shows it with no schema change.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPORT_PLACEHOLDERS = frozenset({"host", "port", "endpoint", "url", "entry_id"})
MAX_COUNT = 64


def _fields(template: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a valid template ({exc})") from exc


def check_exports(exports: Mapping[str, str]) -> Mapping[str, str]:
    for name, template in exports.items():
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", name):
            raise ValueError(f"exports: {name!r} is not an environment variable name")
        if unknown := _fields(template) - EXPORT_PLACEHOLDERS:
            raise ValueError(
                f"exports.{name}: placeholders {sorted(unknown)} are not known; use "
                f"{sorted(EXPORT_PLACEHOLDERS)}"
            )
    return exports


class Component(BaseModel):
    """One kind of member of a composed service."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,30}$",
        description="names its environment variables: SCIORCH_COMPONENT_<NAME>_...",
    )
    service: str = Field(min_length=1, description="catalogue service, optionally name@version")
    start: Literal["before", "after"] = Field(
        "before",
        description="before: a sidecar, up before the main component starts; after: started "
        "once the main component is ready",
    )
    count: int | str = Field(
        1, description="how many entries: a number, or '{param}' naming a parameter of the main"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="the component's parameters; a value '{param}' takes the main's parameter",
    )
    on_exit: Literal["fail", "ignore"] = Field(
        "fail", description="fail: this component ending while the main runs fails the group"
    )
    exports: dict[str, str] = Field(
        default_factory=dict, description="variables for later members and the event's entries"
    )

    @field_validator("count")
    @classmethod
    def _count(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= MAX_COUNT:
            raise ValueError(f"must be from 0 to {MAX_COUNT}")
        if isinstance(v, str) and not re.fullmatch(r"\{[a-z_][a-z0-9_]*\}", v):
            raise ValueError("must be a number or '{param}'")
        return v

    @field_validator("exports")
    @classmethod
    def _exports(cls, v: dict[str, str]) -> dict[str, str]:
        check_exports(v)
        return v

    def count_for(self, params: Mapping[str, Any]) -> int:
        if isinstance(self.count, int):
            return self.count
        value = params.get(self.count[1:-1])
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.count} must be an integer, not {value!r}")
        return value

    def parameters_for(self, params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.parameters.items():
            if isinstance(value, str) and re.fullmatch(r"\{[a-z_][a-z0-9_]*\}", value):
                name = value[1:-1]
                if name in params:
                    out[key] = params[name]
                continue
            out[key] = value
        return out

    def referenced_parameters(self) -> set[str]:
        refs = {v[1:-1] for v in self.parameters.values() if isinstance(v, str) and _ref(v)}
        if isinstance(self.count, str):
            refs.add(self.count[1:-1])
        return refs


def _ref(value: str) -> bool:
    return re.fullmatch(r"\{[a-z_][a-z0-9_]*\}", value) is not None


class EntryGroup(BaseModel):
    """An entry's place in its group (a composed service's launch)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="the group, e.g. 'grp-1a2b3c4d5e6f'")
    component: str = Field(description="this member's component name")
    index: int = Field(0, description="which of the component's count")
    role: Literal["main", "before", "after"]
    main_entry_id: str = Field(description="the main component's entry: cancel it to stop all")
    on_exit: Literal["fail", "ignore"] = "fail"


def group_of(handle: Mapping[str, Any]) -> EntryGroup | None:
    data = handle.get("group")
    return EntryGroup.model_validate(data) if isinstance(data, dict) else None


def env_prefix(component: str, index: int | None) -> str:
    suffix = "" if index is None else f"_{index}"
    return f"SCIORCH_COMPONENT_{component.upper()}{suffix}_"


def fill_exports(exports: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    return {k: v.format_map(values) for k, v in exports.items()}


class Member(BaseModel):
    """How the engine launches one member of a group (what a plain launch does not have)."""

    group: EntryGroup
    env: dict[str, str] = Field(default_factory=dict)
    exports: dict[str, str] = Field(default_factory=dict)
    hold: bool = Field(False, description="record it, but start it only when the group says")
    reason: str | None = Field(None, description="why a held member is pending")
