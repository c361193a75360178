"""The two-scale kernel (steering.kernels) with the real gpCAM: its gradient, what training
makes of smooth and of rugged surfaces, a campaign saved with the plain kernel resuming, and
a rugged campaign through the MCP tools over streamable HTTP (the current protocol), which a
second principal cannot read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.payloads.surfaces import SURFACES, Surface
from steering.kernels import PLAIN, TWO_SCALE, two_scale, two_scale_grad
from steering.optimizer import RUGGED_SHARE, Optimizer
from steering.spec import parse_spec
from tests.mcp_helpers import CURRENT, assert_tool_error, run_http_server, sdk_client, structured


def _told(surface: Surface, n: int) -> Optimizer:
    spec = {
        "objective": {"service": "sim-instrument", "parameters": {"surface": surface.name}},
        "space": surface.space(),
        "budget": {"evaluations": 100},
    }
    opt = Optimizer(parse_spec(spec), 0)
    points = opt.space.decode(opt.space.sobol(n, np.random.default_rng(1)))
    values = [surface([p[f"x{i + 1}"] for i in range(surface.dim)]) for p in points]
    opt.tell(points, values, [1e-4] * n)
    return opt


def _share(opt: Optimizer) -> float:
    h = opt.hyperparameters
    assert h is not None
    d = opt.space.dim
    return float(h[d + 1] / h[0])


def test_the_gradient_is_the_kernels_derivative() -> None:
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((6, 3)), rng.random((5, 3))
    hps = np.array([1.3, 0.4, 0.2, 0.7, 0.3, 0.05, 0.01])  # last: a learned noise level
    grad = two_scale_grad(x1, x2, hps)
    assert grad.shape == (7, 6, 5)
    for i in range(len(hps)):
        step = np.zeros_like(hps)
        step[i] = 1e-6
        numeric = (two_scale(x1, x2, hps + step) - two_scale(x1, x2, hps - step)) / 2e-6
        assert np.allclose(grad[i], numeric, atol=1e-6), i
    k = two_scale(x1, x1, hps)
    assert np.allclose(k, k.T) and np.linalg.eigvalsh(k).min() > 0


@pytest.mark.parametrize("name", ["branin", "hartmann3", "rosenbrock"])
def test_on_a_smooth_surface_the_ripples_train_down_to_nothing(name: str) -> None:
    opt = _told(SURFACES[name], 30)
    job = opt.training_due()
    assert job is not None and job.kernel == TWO_SCALE
    opt.train_now(job)
    assert opt.kernel == TWO_SCALE
    assert _share(opt) < 1e-3
    assert not opt._rugged()
    view = opt.hyperparameters_view()
    assert view is not None and view["kernel"] == TWO_SCALE
    assert view["fine_signal_variance"] < 1e-3 * view["signal_variance"]


@pytest.mark.parametrize(("name", "n"), [("rastrigin", 30), ("ackley", 40), ("schwefel", 40)])
def test_on_a_rugged_surface_the_ripples_keep_a_share_and_the_loop_hedges(
    name: str, n: int
) -> None:
    opt = _told(SURFACES[name], n)
    job = opt.training_due()
    assert job is not None
    opt.train_now(job)
    assert _share(opt) > RUGGED_SHARE
    assert opt._rugged()
    # every other pick is upper-confidence: the portfolio alternates
    picks = [opt._portfolio() for _ in range(4)]
    assert picks.count("ucb") == 2 and picks.count(None) == 2


def test_a_campaign_saved_with_the_plain_kernel_resumes_then_trains_two_scale() -> None:
    surface = SURFACES["branin"]
    opt = _told(surface, 12)
    # the state a campaign saved before the two-scale kernel (no "kernel" key)
    opt.set_state({"hyperparameters": [1.0, 0.4, 0.5], "learn": False, "trained_n": 12})
    assert opt.kernel == PLAIN and opt.state()["kernel"] == PLAIN
    first = opt.ask(2)
    assert first.source == "gp" and len(first.points) == 2
    values = [surface([p["x1"], p["x2"]]) for p in first.points]
    opt.tell(first.points, values, [1e-4] * 2)
    job = opt.training_due()
    assert job is not None
    # training starts from the plain hyperparameters, the ripples at their defaults
    assert job.kernel == TWO_SCALE and job.init[:3] == [1.0, 0.4, 0.5] and len(job.init) == 5
    opt.train_now(job)
    assert opt.kernel == TWO_SCALE and opt.state()["kernel"] == TWO_SCALE
    assert len(opt.state()["hyperparameters"]) == 5
    assert len(opt.ask(1).points) == 1
    # a state naming an unknown structure is ignored rather than half applied
    fresh = _told(surface, 12)
    fresh.set_state({"hyperparameters": [1.0, 0.4, 0.5], "kernel": "spectral"})
    assert fresh.kernel == TWO_SCALE and fresh.hyperparameters is None


async def test_a_rugged_campaign_reports_its_ripples_over_streamable_http(tmp_path: Path) -> None:
    spec = {
        "objective": {
            "service": "sim-instrument",
            "parameters": {"surface": "rastrigin", "duration_s": 0.01, "records": 1},
            "goal": "minimise",
        },
        "space": SURFACES["rastrigin"].space(),
        "budget": {"evaluations": 24},
        "batch_size": 3,
        "seed": 1,
    }
    async with run_http_server(tmp_path / "home") as srv:
        async with sdk_client(srv.mcp_url, srv.token("alice"), mode=CURRENT) as alice:
            assert alice.protocol_version == CURRENT
            cid = structured(await alice.call_tool("start_campaign", spec))["id"]
            deadline = time.monotonic() + 180
            while True:
                view = structured(await alice.call_tool("get_campaign", {"campaign_id": cid}))
                if (view["state"] != "running" and not view["active"]) or (
                    time.monotonic() > deadline
                ):
                    break
                await asyncio.sleep(0.3)
        assert view["state"] == "completed" and view["progress"]["succeeded"] == 24, view
        hp = view["posterior"]["hyperparameters"]
        assert hp["kernel"] == TWO_SCALE
        assert hp["fine_signal_variance"] > RUGGED_SHARE * hp["signal_variance"], hp
        assert 0.005 <= hp["fine_length_fraction"] <= 0.15
        async with sdk_client(srv.mcp_url, srv.token("bob"), mode=CURRENT) as bob:
            res = await bob.call_tool("get_campaign", {"campaign_id": cid})
            assert_tool_error(res, "not_found", "campaign_id")
