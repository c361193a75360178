"""The campaign page's steering forms: add a point to measure next (one field per dimension of
the campaign's space, with the bounds the browser can check), reject a pending suggestion,
annotate, change the budget. Each form posts to the same steering tools the MCP server
registers (add_points, reject_point, annotate_campaign, update_campaign), which check
everything again and decide who may steer; this module only builds the fields, reads them
back and says where an error belongs. Whether to show the forms at all is a courtesy to a
viewer: the tools refuse them anyway."""

from __future__ import annotations

from typing import Any

from ground.errors import SciorchError
from ground.models import ROLE_RANK, Principal, Role
from sciorch.web.hub import forms
from steering.models import CampaignView, EvalState
from steering.spec import CampaignSpec
from tools.models import EventView

PENDING = (EvalState.ASKED, EvalState.SUBMITTED, EvalState.QUEUED)
# The steering actions (path segment -> the tool it calls).
ACTIONS = {
    "pause": "pause_campaign",
    "resume": "resume_campaign",
    "stop": "stop_campaign",
    "points": "add_points",
    "reject": "reject_point",
    "annotate": "annotate_campaign",
    "budget": "update_campaign",
}


def space_schema(spec: CampaignSpec) -> dict[str, Any]:
    """The space as the JSON schema the launch form is generated from."""
    props: dict[str, Any] = {}
    for p in spec.space:
        if p.type == "categorical":
            props[p.name] = {"enum": list(p.choices or [])}
        else:
            props[p.name] = {
                "type": "integer" if p.type == "integer" else "number",
                "minimum": p.low,
                "maximum": p.high,
            }
    return {"type": "object", "properties": props, "required": [p.name for p in spec.space]}


def point_fields(
    spec: CampaignSpec, values: dict[str, Any] | None = None, error: SciorchError | None = None
) -> list[forms.FormField]:
    fields = forms.fields_for(space_schema(spec), values)
    named = param_of(error.field if error else None)
    for f in fields:
        if error is not None and f.name == named:
            f.error = error.message
    return fields


def point_from(spec: CampaignSpec, form: dict[str, str]) -> dict[str, Any]:
    """The submitted point, typed; a categorical choice is matched back to the value it shows
    (a choice may be a number or a boolean). Range checks are the tool's."""
    point = forms.parameters_from(space_schema(spec), form)
    for p in spec.space:
        if p.type == "categorical" and p.name in point:
            shown = {forms.shown(c): c for c in p.choices or []}
            point[p.name] = shown.get(str(point[p.name]), point[p.name])
    return point


def param_of(error_field: str | None) -> str | None:
    """The dimension an add_points error names (`points.0.x1` -> `x1`)."""
    parts = (error_field or "").split(".")
    return parts[2] if len(parts) >= 3 and parts[0] == "points" else None


def beside(action: str, error: SciorchError | None) -> bool:
    """Whether the error names a field of the form it came from (else it is the page's)."""
    if error is None:
        return False
    field = error.field or ""
    return {
        "points": param_of(field) is not None,
        "reject": field == "point_id",
        "annotate": field == "text",
        "budget": field.startswith("budget"),
    }.get(action, False)


def may_steer(who: Principal, c: CampaignView, events: list[EventView]) -> bool:
    """What the steering tools will allow: the owner, an admin, or an operator (or owner) of
    the campaign's event."""
    if who.admin or c.owner == who.id:
        return True
    event = next((e for e in events if e.id == c.event_id), None)
    role = event.shares.get(who.id) if event is not None else None
    return role is not None and ROLE_RANK[Role(role)] >= ROLE_RANK[Role.OPERATOR]


def pending(c: CampaignView) -> list[dict[str, Any]]:
    """The suggestions not yet measured: what may be rejected."""
    return [
        {"point_id": e.point_id, "point": e.point, "state": e.state.value, "source": e.source}
        for e in c.evaluations or []
        if e.state in PENDING
    ]
