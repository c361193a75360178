"""Several objectives, constraints and costs (steering.multi, steering.pareto,
steering.constraints): the parser's whitelist, exact hypervolume against pymoo, and campaigns
through the MCP tools with real gpCAM, scikit-learn and sim-instrument jobs."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastmcp import Client
from pymoo.indicators.hv import HV

from ground.errors import InvalidInput
from ground.models import Principal
from mcp_server.server import create_server
from orchestrator.engine import Engine
from orchestrator.payloads.surfaces import SURFACES
from steering.constraints import parse_inequality, split_constraints
from steering.multi import Composite, make_optimizer, spent_cost
from steering.pareto import Boxes, expected_improvement, hypervolume, non_dominated
from steering.spec import load_spec, parse_spec
from tests.conftest import campaign_engine

ROOT = Path(__file__).resolve().parent.parent
ALICE = Principal(id="alice")
BOB = Principal(id="bob")
BRANIN01, CURRIN = SURFACES["branin01"], SURFACES["currin"]

eng = campaign_engine()


@pytest.fixture
async def alice(eng: Engine) -> AsyncIterator[Client[Any]]:
    async with Client(create_server(eng, principal=ALICE)) as client:
        yield client


def structured(result: Any) -> dict[str, Any]:
    return dict(result.structured_content or {})


async def finished(client: Client[Any], cid: str, within: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = structured(await client.call_tool("get_campaign", {"campaign_id": cid}))
        if view["state"] != "running" and not view["active"]:
            return view
        await asyncio.sleep(0.2)
    raise AssertionError(f"campaign {cid} did not finish in {within} s")


SIM = {"surface": "branin01", "surface_b": "currin", "duration_s": 0.01, "records": 1}
UNIT_SPACE = [{"name": "x1", "low": 0.0, "high": 1.0}, {"name": "x2", "low": 0.0, "high": 1.0}]


def spec_dict(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "objective": {"service": "sim-instrument", "parameters": dict(SIM)},
        "space": UNIT_SPACE,
        "budget": {"evaluations": 16},
        "batch_size": 2,
        "seed": 4,
    }
    spec.update(over)
    return spec


# ------------------------------------------------------------------------------ the parser


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("__import__('os').system('true') <= 1", "function calls are not allowed"),
        ("x1.real <= 1", "attribute access is not allowed"),
        ("abs(x1) <= 1", "function calls are not allowed"),
        ("x1[0] <= 1", "subscripts are not allowed"),
        ("(lambda: 1)() <= x1", "function calls are not allowed"),
        ("x1 <= 'a'", "only numbers"),
        ("x1 <= x2 <= 1", "one comparison"),
        ("x1 == 1", "must be <=, <, >= or >"),
        ("x1 + x2", "not an inequality"),
        ("x1 <= 1 and x2 <= 1", "not an inequality"),
        ("x1 + * 2 <= 1", "column 6"),
        ("1 <= 2", "names no parameter"),
        ("x1 // 2 <= 1", "operator FloorDiv is not allowed"),
        ("not x1 <= 1", "not an inequality"),
        ("-x1 % 2 <= 1", "operator Mod is not allowed"),
    ],
)
def test_the_parser_rejects_what_is_not_arithmetic(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_inequality(text, "constraints.2")
    assert info.value.field == "constraints.2"
    assert needle in info.value.message, info.value.message
    assert "column" in info.value.message or needle == "names no parameter"


def test_the_parser_evaluates_vectorised_and_sorts_constraints() -> None:
    c = parse_inequality("x1 + 2 * x2 ** 2 <= 1.5", "c")
    vals = {"x1": np.array([0.0, 1.1, 1.5]), "x2": np.array([0.5, 0.5, 0.0])}
    assert c.holds(vals).tolist() == [True, False, True]
    flipped = parse_inequality("3 >= value_b", "c")
    assert (flipped.field, flipped.bound, flipped.op) == ("value_b", 3.0, "<=")
    split = split_constraints(
        ["x1 + x2 <= 1.5", "value_b <= 3", "purity >= 0.2 * 5"],
        {"x1": "continuous", "x2": "integer"},
    )
    assert [k.text for k in split.known] == ["x1 + x2 <= 1.5"]
    assert [(o.field, o.bound, o.op) for o in split.outcome] == [
        ("value_b", 3.0, "<="),
        ("purity", 1.0, ">="),
    ]
    with pytest.raises(InvalidInput, match="mixes space parameters"):
        split_constraints(["x1 + value_b <= 1"], {"x1": "continuous"})
    with pytest.raises(InvalidInput, match="compares one result field"):
        split_constraints(["2 * value_b <= 1"], {"x1": "continuous"})


def test_spec_errors_name_the_constraint() -> None:
    base = spec_dict()
    with pytest.raises(InvalidInput) as info:
        parse_spec({**base, "constraints": ["x1 <= 1", "x1.__class__ <= 1"]})
    assert info.value.field == "constraints.1" and "attribute access" in info.value.message
    with pytest.raises(InvalidInput, match="no point of the space satisfies"):
        parse_spec({**base, "constraints": ["x1 + x2 >= 3"]})
    with pytest.raises(InvalidInput, match="expected hypervolume improvement"):
        parse_spec({**base, "acquisition": "ei", "objectives": [{"field": "a"}, {"field": "b"}]})
    with pytest.raises(InvalidInput) as info:
        parse_spec({**base, "cost": {"per_unit": {"x9": 1.0}}})
    assert info.value.field == "cost.per_unit"
    with pytest.raises(InvalidInput) as info:
        parse_spec({**base, "budget": {"cost": 10}})
    assert info.value.field == "budget.cost"


# ------------------------------------------------------------------------------ hypervolume


@pytest.mark.parametrize("k", [2, 3])
def test_hypervolume_is_exact_and_improvement_is_its_difference(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(5):
        z = rng.random((25, k))
        ref = np.full(k, 1.1)
        assert hypervolume(z, ref) == pytest.approx(HV(ref_point=ref)(z), rel=1e-12)
        front = z[non_dominated(z)]
        assert hypervolume(front, ref) == pytest.approx(hypervolume(z, ref), rel=1e-12)
        y = rng.random((40, k)) * 0.8
        boxes = Boxes(z, ref)
        want = [hypervolume(np.vstack([z, row]), ref) - hypervolume(z, ref) for row in y]
        assert boxes.improvement(y) == pytest.approx(want, abs=1e-12)
        assert max(want) > 0
        # a sure outcome (std 0): the expectation is the improvement itself
        ehvi = expected_improvement(boxes, y, np.zeros_like(y), rng.normal(size=(16, k)))
        assert ehvi == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------ campaigns


def _sizes(paths: list[str]) -> list[int]:
    return [Path(p).stat().st_size for p in paths]


def _values(e: dict[str, Any]) -> tuple[float, float]:
    assert e["values"]["value"] == e["value"]
    return float(e["value"]), float(e["values"]["value_b"])


async def test_two_objectives_keep_and_report_the_pareto_front(
    eng: Engine, alice: Client[Any]
) -> None:
    spec = spec_dict(
        objectives=[
            {"field": "value", "goal": "minimise", "reference_point": 18.0},
            {"field": "value_b", "goal": "minimise", "reference_point": 6.0},
        ],
        budget={"evaluations": 18},
    )
    cid = structured(await alice.call_tool("start_campaign", spec))["id"]
    view = await finished(alice, cid)
    assert view["state"] == "completed", view["reason"]
    evals = [e for e in view["evaluations"] if e["state"] == "succeeded"]
    assert len(evals) == 18
    z = np.array([_values(e) for e in evals])
    front = view["front"]
    assert front["reference_point"] == [18.0, 6.0] and front["feasible"] == 18
    # the reported front is exactly the non-dominated measurements, and its hypervolume exact
    want = {evals[i]["seq"] for i in np.flatnonzero(non_dominated(z))}
    assert {p["seq"] for p in front["points"]} == want
    assert front["hypervolume"] == pytest.approx(HV(ref_point=np.array([18.0, 6.0]))(z))
    # BraninCurrin's best hypervolume at this reference is 59.4; the 6 design points rarely
    # dominate the reference at all (0 to 10), 18 points chosen by EHVI reach 37-50
    design = z[[e["source"] == "design" for e in evals]]
    assert front["hypervolume"] > hypervolume(design, np.array([18.0, 6.0])) + 10.0
    assert front["hypervolume"] > 25.0, front["hypervolume"]
    assert {Path(p).name for p in view["plots"]} >= {"objective.png", "front.png"}
    assert all(size > 5000 for size in _sizes(view["plots"]))
    # a second principal sees neither the campaign nor its front
    async with Client(create_server(eng, principal=BOB)) as bob:
        listed = structured(await bob.call_tool("list_campaigns", {}))
        assert listed["campaigns"] == []
        refused = await bob.call_tool("get_campaign", {"campaign_id": cid}, raise_on_error=False)
        assert refused.is_error


def _in_fault_region(point: dict[str, Any]) -> bool:
    return bool(0.75 <= point["x1"] <= 1.0)


async def test_constraints_known_outcome_and_learned_failures(alice: Client[Any]) -> None:
    spec = spec_dict(
        objective={
            "service": "sim-instrument",
            "parameters": {**SIM, "fail_region": {"x1": [0.75, 1.0]}},
        },
        constraints=["x1 + x2 <= 1.2", "value_b <= 8"],
        initial_design={"count": 8},
        budget={"evaluations": 26},
        retries=0,
    )
    cid = structured(await alice.call_tool("start_campaign", spec))["id"]
    view = await finished(alice, cid)
    assert view["state"] == "completed", view["reason"]
    evals = view["evaluations"]
    assert len(evals) == 26
    # known: nothing outside the constraint was ever proposed, design included
    assert all(e["point"]["x1"] + e["point"]["x2"] <= 1.2 + 1e-12 for e in evals)
    # unknown: the instrument fails for x1 >= 0.75 (a quarter of the box); once it has failed there
    # the classifier keeps the GP away
    failed = [e for e in evals if e["state"] == "failed"]
    assert failed and all(_in_fault_region(e["point"]) for e in failed)
    # no point the GP chose after a failure was recorded lies next to that failure
    gp_after = 0
    for f in failed:
        done = datetime.fromisoformat(f["finished_at"])
        for e in evals:
            if e["source"] == "gp" and datetime.fromisoformat(e["asked_at"]) > done:
                gp_after += 1
                gap = math.dist(
                    (e["point"]["x1"], e["point"]["x2"]), (f["point"]["x1"], f["point"]["x2"])
                )
                assert gap > 0.1, (f["point"], e["point"])
    assert gp_after >= 5
    assert len(failed) <= 8, [e["point"] for e in failed]
    # outcome: value_b <= 8 is modelled; the GP's choices mostly keep to it
    ok = [e for e in evals if e["state"] == "succeeded"]
    assert all(set(e["values"]) == {"value", "value_b"} for e in ok)
    gp = [e for e in ok if e["source"] == "gp"]
    held = sum(e["values"]["value_b"] <= 8 for e in gp)
    assert held >= 0.7 * len(gp), [(e["point"], e["values"]) for e in gp]


def _travel(points: list[dict[str, Any]], per_unit: dict[str, float]) -> float:
    return sum(
        sum(abs(b[n] - a[n]) * w for n, w in per_unit.items())
        for a, b in itertools.pairwise(points)
    )


async def test_a_cost_budget_ends_the_campaign_and_cost_is_reported(alice: Client[Any]) -> None:
    per_unit = {"x1": 6.0, "x2": 2.0}
    spec = spec_dict(
        cost={"overhead": 1.0, "per_unit": per_unit},
        budget={"evaluations": 60, "cost": 45.0},
        batch_size=1,
    )
    cid = structured(await alice.call_tool("start_campaign", spec))["id"]
    view = await finished(alice, cid)
    assert view["state"] == "completed"
    assert view["reason"].startswith("cost budget spent"), view["reason"]
    done = sorted(
        (e for e in view["evaluations"] if e["state"] == "succeeded"), key=lambda e: e["seq"]
    )
    spent = len(done) + _travel([e["point"] for e in done], per_unit)
    assert view["cost_spent"] == pytest.approx(spent)
    assert 45.0 <= spent and len(done) < 60
    # spent just past the budget: without the last evaluation it was still under
    without_last = len(done) - 1 + _travel([e["point"] for e in done[:-1]], per_unit)
    assert without_last < 45.0


def _loop(spec: dict[str, Any], seed: int, budget: int) -> list[dict[str, Any]]:
    parsed = parse_spec(spec)
    opt = make_optimizer(parsed, seed)
    design = opt.space.decode(
        opt.space.design(parsed.initial_design, parsed.design_count, np.random.default_rng(seed))
    )
    asked: list[dict[str, Any]] = []

    def measure(points: list[dict[str, Any]]) -> None:
        asked.extend(points)
        values = [BRANIN01((p["x1"], p["x2"])) for p in points]
        opt.tell(points, values, [1e-4] * len(points), [{"value": v} for v in values])

    measure(design)
    while len(asked) < budget:
        job = opt.training_due()
        if job is not None:
            opt.train_now(job)
        measure(opt.ask(1).points)
    return asked


def test_choosing_per_unit_cost_shortens_travel() -> None:
    per_unit = {"x1": 10.0, "x2": 10.0}
    base = spec_dict(budget={"evaluations": 20})
    costly = spec_dict(budget={"evaluations": 20}, cost={"overhead": 1.0, "per_unit": per_unit})
    plain, aware = [], []
    for seed in (1, 2):
        plain.append(_travel(_loop(base, seed, 20)[6:], per_unit))
        aware.append(_travel(_loop(costly, seed, 20)[6:], per_unit))
    assert sum(aware) < 0.7 * sum(plain), (aware, plain)


def test_a_batch_is_ordered_to_shorten_travel() -> None:
    spec = parse_spec(spec_dict(cost={"per_unit": {"x1": 1.0, "x2": 1.0}}))
    opt = Composite(spec, 0)
    opt.position = {"x1": 0.0, "x2": 0.0}
    far, near, mid = (opt._encode([{"x1": v, "x2": v}])[0] for v in (0.9, 0.1, 0.5))
    ordered = opt._order([far, near, mid])
    assert [round(float(x[0]), 2) for x in ordered] == [0.1, 0.5, 0.9]
    assert spent_cost(spec, []) == 0.0


@pytest.mark.parametrize("name", ["campaign_multiobjective.toml", "campaign_constrained.toml"])
async def test_the_examples_run_on_the_embedded_default(alice: Client[Any], name: str) -> None:
    spec = load_spec(ROOT / "examples" / name).model_dump(exclude_none=True)
    spec["objective"]["parameters"]["duration_s"] = 0.01
    spec["budget"]["evaluations"] = 10
    cid = structured(await alice.call_tool("start_campaign", spec))["id"]
    view = await finished(alice, cid)
    assert view["state"] == "completed", view["reason"]
    assert view["progress"]["succeeded"] >= 5
    if "multi" in name:
        assert view["front"]["points"] and view["front"]["hypervolume"] >= 0
        assert any(Path(p).name == "front.png" for p in view["plots"])
    else:
        assert view["cost_spent"] > 0
        assert all(e["point"]["x1"] + e["point"]["x2"] <= 1.2 for e in view["evaluations"])


def test_a_large_front_is_thinned_to_spread_points_with_its_extremes() -> None:
    from steering.pareto import thin

    rng = np.random.default_rng(1)
    z = rng.random((400, 3))
    z /= np.linalg.norm(z, axis=1, keepdims=True)  # all on a sphere: all non-dominated
    front = z[non_dominated(z)]
    kept = thin(front, 25)
    assert len(kept) == 25
    for j in range(3):  # each objective's best survives
        assert front[:, j].min() in kept[:, j]
    boxes = Boxes(front, np.full(3, 1.1), 25)
    assert len(boxes.front) == 25 and len(boxes.lo) <= 26 * 26
    # thinning can only raise the improvement it sees
    y = rng.random((50, 3)) * 0.9
    assert np.all(boxes.improvement(y) >= Boxes(front, np.full(3, 1.1)).improvement(y) - 1e-12)


def _failures(feasibility: str, seed: int) -> int:
    """Minimise Branin on [0, 1]^2, whose best basin (0.96, 0.17) lies where the instrument
    fails (x1 >= 0.75): failed proposals after the first failure."""
    spec = parse_spec(
        spec_dict(feasibility=feasibility, constraints=["x1 <= 2"], initial_design={"count": 6})
    )
    opt = Composite(spec, seed)
    points = opt.space.decode(opt.space.design(spec.initial_design, 6, np.random.default_rng(seed)))
    failed: list[dict[str, Any]] = [{"x1": 0.8, "x2": 0.2}]  # known from the start
    later = 0
    for _ in range(12):
        ok = [p for p in points if p["x1"] < 0.75]
        bad = [p for p in points if p["x1"] >= 0.75]
        failed += bad
        later += len(bad)
        values = [BRANIN01((p["x1"], p["x2"])) for p in ok]
        opt.tell(ok, values, [1e-4] * len(ok), [{"value": v} for v in values])
        job = opt.training_due()
        if job is not None:
            opt.train_now(job)
        points = opt.ask(1, avoid=failed).points
    return later


def test_learned_feasibility_keeps_the_choice_out_of_where_it_fails() -> None:
    # Over 4 seeds the classifier cuts failed proposals by at least a quarter (measured: 8
    # against 12 with the two-scale kernel, 7 against 11 with the plain one); any one seed is
    # within one proposal either way.
    learned = [_failures("learn", s) for s in range(4)]
    ignored = [_failures("off", s) for s in range(4)]
    assert sum(learned) <= 0.75 * sum(ignored), (learned, ignored)
