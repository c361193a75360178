"""The parts of a campaign's view that several objectives and costs add (steering.multi)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from steering.constraints import split_constraints
from steering.models import EvaluationRecord, FrontView
from steering.spec import CampaignSpec


def lookup(result: dict[str, Any] | None, field: str) -> float | None:
    """A finite number at a dotted field of a result, else None."""
    node: Any = result
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


def modelled_fields(spec: CampaignSpec) -> list[str]:
    """Result fields besides objective.field that every evaluation must report: the other
    objectives, the fields outcome constraints hold, the cost field."""
    fields = [o.field for o in spec.objectives or []]
    split = split_constraints(spec.constraints, {p.name: p.type for p in spec.space})
    fields += [c.field for c in split.outcome if c.field is not None]
    if spec.cost is not None and spec.cost.field is not None:
        fields.append(spec.cost.field)
    return [f for f in dict.fromkeys(fields) if f != spec.objective.field]


def reported_fields(spec: CampaignSpec) -> list[str] | None:
    """The fields an evaluation's view lists under `values` (none for a plain campaign)."""
    fields = modelled_fields(spec)
    return [spec.objective.field, *fields] if fields else None


def objectives_view(spec: CampaignSpec, evals: Sequence[EvaluationRecord]) -> dict[str, Any]:
    """`front` and `cost_spent` for CampaignView (absent for one objective without cost)."""
    if not spec.objectives and spec.cost is None:
        return {}
    from steering.multi import front_of, spent_cost

    front = front_of(spec, evals)
    return {
        "front": None if front is None else FrontView.model_validate(front),
        "cost_spent": spent_cost(spec, evals),
    }
