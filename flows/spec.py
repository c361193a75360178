"""A flow definition: named steps in a DAG, each a sciorch job, a service launch, a wait for a
person's approval, or a record of values; parameters from the flow's inputs, the trigger and
earlier steps' results (flows.expr placeholders). Loaded from YAML or TOML, validated whole
before anything runs: errors name the field (`steps.fit.needs`)."""

from __future__ import annotations

import graphlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.expr import parse_path, references
from ground.documents import read_document
from ground.errors import InvalidInput, invalid_input

StepKind = Literal["job", "service", "approval", "record", "search"]
_STEP_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
FLOW_NAME = _STEP_NAME


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_IS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": _number,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "number", "integer", "boolean", "list", "object"] = "string"
    required: bool = True
    default: Any = None
    description: str | None = None

    def check(self, name: str, value: Any) -> Any:
        if not _IS[self.type](value):
            raise InvalidInput(
                f"input {name} must be a {self.type}, got {type(value).__name__}",
                field=f"inputs.{name}",
            )
        return value


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: StepKind = "job"
    service: str | None = Field(None, description="the template (name or name@version)")
    parameters: dict[str, Any] = Field(default_factory=dict)
    site: str | None = None
    priority: Literal["normal", "urgent"] = "normal"
    needs: list[str] = Field(default_factory=list, description="steps that must end first")
    for_each: str | None = Field(
        None, description="a placeholder naming a list: the step runs once per item ({item})"
    )
    retries: int = Field(0, ge=0, le=20)
    retry_delay_s: float = Field(1.0, ge=0, le=3600)
    timeout_s: float | None = Field(None, gt=0, description="per attempt")
    on_failure: Literal["fail", "continue"] = Field(
        "fail", description="fail: the run fails; continue: later steps still run"
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="job/service: files for the template's inputs, name -> URI, staged to the "
        "step's site; an earlier step's file is "
        "sciorch://entries/{steps.<step>.entry_id}/artifacts/<path>",
    )
    values: dict[str, Any] = Field(
        default_factory=dict, description="record: what to record (placeholders allowed)"
    )
    query: str | None = Field(
        None, max_length=4000, description="search: a results-catalogue query (search_results)"
    )
    search: dict[str, Any] = Field(
        default_factory=dict,
        description="search: search_results' other filters (service, campaign_id, sort, limit)",
    )
    message: str | None = Field(None, description="approval: what the person is asked")

    @model_validator(mode="after")
    def _kind_fields(self) -> StepSpec:
        if self.kind in ("job", "service") and not self.service:
            raise ValueError(f"a {self.kind} step needs service")
        if self.kind in ("approval", "record", "search") and self.service:
            raise ValueError(f"a {self.kind} step runs no service")
        if self.inputs and self.kind not in ("job", "service"):
            raise ValueError("inputs are for job and service steps")
        if (self.query is not None or self.search) and self.kind != "search":
            raise ValueError("query and search are for search steps")
        if self.for_each is not None and self.kind not in ("job", "record", "search"):
            raise ValueError("for_each is for job, record and search steps")
        return self


class FlowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_STEP_NAME)
    description: str | None = None
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    steps: dict[str, StepSpec] = Field(min_length=1)
    outputs: dict[str, Any] = Field(
        default_factory=dict, description="the run's outputs (placeholders allowed)"
    )
    max_parallel: int = Field(8, ge=1, le=256, description="steps running at once in one run")

    def order(self) -> list[str]:
        return list(
            graphlib.TopologicalSorter({k: s.needs for k, s in self.steps.items()}).static_order()
        )

    def upstream(self, step: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.steps[step].needs)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += self.steps[name].needs
        return seen

    def resolve_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            raise InvalidInput(
                f"{self.name} has no input {unknown[0]!r}; its inputs are "
                + (", ".join(self.inputs) or "none"),
                field=f"inputs.{unknown[0]}",
            )
        out: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given:
                out[name] = spec.check(name, given[name])
            elif spec.default is not None:
                out[name] = spec.default
            elif spec.required:
                raise InvalidInput(f"input {name} is required", field=f"inputs.{name}")
        return out


def _check_graph(flow: FlowSpec) -> None:
    for name, step in flow.steps.items():
        if not re.match(_STEP_NAME, name):
            raise InvalidInput(
                f"step name {name!r}: lower-case letters, digits, - and _", field=f"steps.{name}"
            )
        for need in step.needs:
            if need not in flow.steps:
                raise InvalidInput(
                    f"step {name} needs {need!r}, which is not a step of {flow.name}",
                    field=f"steps.{name}.needs",
                )
    try:
        flow.order()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise InvalidInput(f"the steps' needs form a cycle: {cycle}", field="steps") from None
    for name, step in flow.steps.items():
        before = flow.upstream(name)
        where = f"steps.{name}"
        refs = list(references(step.parameters, f"{where}.parameters"))
        refs += list(references(step.values, f"{where}.values"))
        refs += list(references(step.inputs, f"{where}.inputs"))
        refs += list(references(step.query or "", f"{where}.query"))
        if step.for_each is not None:
            field = f"{where}.for_each"
            refs.append((field, parse_path(step.for_each.strip().strip("{}"), field)))
        for field, ref in refs:
            _check_ref(flow, before, ref, step.for_each is not None, field)
    for field, ref in references(flow.outputs, "outputs"):
        _check_ref(flow, set(flow.steps), ref, False, field)


def _check_ref(
    flow: FlowSpec,
    before: set[str],
    ref: list[str | int],
    fans_out: bool,
    where: str,
) -> None:
    root = ref[0]
    if root == "steps":
        target = ref[1] if len(ref) > 1 else None
        if not isinstance(target, str) or target not in flow.steps:
            raise InvalidInput(f"{where}: {{steps.{target}}} names no step", field=where)
        if target not in before:
            raise InvalidInput(
                f"{where} reads step {target}, which is not among its needs (direct or "
                "through other steps): add it to needs",
                field=where,
            )
    elif root == "inputs":
        if len(ref) < 2 or ref[1] not in flow.inputs:
            raise InvalidInput(
                f"{where}: {{inputs.{ref[1] if len(ref) > 1 else ''}}} is not an input of "
                f"{flow.name}",
                field=where,
            )
    elif root in ("item", "index") and not fans_out:
        raise InvalidInput(f"{where}: {{{root}}} is only set in a for_each step", field=where)


def parse_flow(data: Any, source: str | None = None) -> FlowSpec:
    if not isinstance(data, dict):
        raise InvalidInput(
            f"{source + ': ' if source else ''}a flow is a mapping with name and steps",
            field="flow",
        )
    try:
        flow = FlowSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc, where=source) from None
    _check_graph(flow)
    return flow


def load_flow(path: Path) -> FlowSpec:
    """Read a flow from a .yaml, .yml or .toml file."""
    return parse_flow(read_document(path, "flow"), str(path))
