"""The fast posterior of several-objective decisions (steering.posterior) against gpCAM's own,
with the real gpCAM: the pool's solve kept in step as points are told, and points in flight
conditioned on without telling them (the kriging believer on a copy of the GP)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from steering.kernels import PLAIN, TWO_SCALE
from steering.multi import Composite
from steering.pareto import non_dominated
from steering.posterior import PoolPosterior, usable
from steering.spec import parse_spec
from steering.training import make_gp

KERNELS = {PLAIN: [1.5, 0.3, 0.2, 0.4], TWO_SCALE: [1.5, 0.3, 0.2, 0.4, 0.3, 0.05]}


def _gp(n: int, seed: int, kernel: str = PLAIN) -> tuple[object, np.random.Generator]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3))
    y = np.sin(4 * x).sum(axis=1) + 0.2 * np.cos(40 * x).sum(axis=1)
    gp = make_gp(x, y, np.full(n, 1e-3), np.array(KERNELS[kernel]), kernel)
    return gp, rng


def _gpcam(gp: object, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(gp.posterior_mean(x)["m(x)"]).reshape(-1)  # type: ignore[attr-defined]
    v = np.asarray(
        gp.posterior_covariance(x, variance_only=True)["v(x)"]  # type: ignore[attr-defined]
    ).reshape(-1)
    return m, v


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_the_pool_follows_told_points_and_matches_gpcam(kernel: str) -> None:
    gp, rng = _gp(60, 1, kernel)
    assert usable(gp)
    pool = rng.random((200, 3))
    post = PoolPosterior(gp, pool)
    for step in range(3):  # one point, then two at once: gpCAM appends to its factor
        new = rng.random((1 + step, 3))
        gp.tell(new, np.sin(4 * new).sum(axis=1), noise_variances=np.full(len(new), 1e-3))  # type: ignore[attr-defined]
        assert post.fits(gp)
        post.refresh()
    assert post.n == 66
    idx = np.arange(0, 200, 3)
    mean, var = post.moments(index=idx)
    m, v = _gpcam(gp, pool[idx])
    np.testing.assert_allclose(mean, m, atol=1e-8)
    np.testing.assert_allclose(var, v, atol=1e-8)
    fresh = rng.random((50, 3))
    mean, var = post.moments(fresh)
    m, v = _gpcam(gp, fresh)
    np.testing.assert_allclose(mean, m, atol=1e-8)
    np.testing.assert_allclose(var, v, atol=1e-8)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_points_in_flight_lower_the_variance_as_if_told_at_their_mean(kernel: str) -> None:
    gp, rng = _gp(80, 2, kernel)
    pool = rng.random((150, 3))
    post = PoolPosterior(gp, pool)
    given = rng.random((5, 3))
    noise = 1e-3
    told = copy.deepcopy(gp)
    at = np.asarray(told.posterior_mean(given)["m(x)"]).reshape(-1)  # type: ignore[attr-defined]
    told.tell(given, at, noise_variances=np.full(5, noise))  # type: ignore[attr-defined]
    x = np.vstack([pool[:40], given + 0.01])
    mean, var = post.moments(x, given=given, noise=noise)
    _, v = _gpcam(told, x)
    np.testing.assert_allclose(var, v, atol=1e-7)
    # An observation equal to the predictive mean leaves the mean where it was (gpCAM's copy
    # moves it a little only through its prior mean, the average of the told values).
    m, _ = _gpcam(gp, x)
    np.testing.assert_allclose(mean, m, atol=1e-8)
    # near the points in flight the variance really dropped
    _, before = post.moments(given + 0.01)
    assert np.all(var[40:] < 0.5 * before)


def test_a_refit_gp_is_not_followed() -> None:
    gp, rng = _gp(30, 3)
    post = PoolPosterior(gp, rng.random((20, 3)))
    other, _ = _gp(30, 3)
    assert not post.fits(other)
    gp.set_hyperparameters(np.array([1.0, 0.5, 0.5, 0.5]))  # type: ignore[attr-defined]
    assert not post.fits(gp)


@pytest.mark.parametrize("k", [2, 3])
def test_the_kept_front_is_the_non_dominated_set(k: int) -> None:
    spec = parse_spec(
        {
            "objective": {"kind": "external"},
            "space": [{"name": "x1", "low": 0.0, "high": 1.0}],
            "objectives": [{"field": f"f{j}"} for j in range(k)],
            "constraints": ["f0 <= 0.9"],
            "budget": {"evaluations": 500},
        }
    )
    opt = Composite(spec, 0)
    rng = np.random.default_rng(k)
    z_all = np.round(rng.random((0, k)), 1)
    for _ in range(6):  # told in pieces, with exact duplicates and infeasible points
        z = np.round(rng.random((40, k)), 1)
        pts = [{"x1": float(v)} for v in rng.random(40)]
        opt.tell(pts, list(z[:, 0]), [None] * 40, [{f"f{j}": r[j] for j in range(k)} for r in z])
        z_all = np.vstack([z_all, z])
        idx, _ = opt.front()
        ok = np.flatnonzero(z_all[:, 0] <= 0.9)
        want = ok[non_dominated(z_all[ok])]
        assert sorted(idx.tolist()) == sorted(want.tolist())
