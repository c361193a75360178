"""Campaigns with several objectives, constraints or costs: one gpCAM GP per modelled result
field (steering.optimizer's `Optimizer`, each with its own frame, warp and training schedule),
combined here into one acquisition.

- Several objectives: the Pareto front of the feasible measurements; candidates are scored by
  Monte-Carlo expected hypervolume improvement over the objectives' independent posteriors
  (steering.pareto; 64 common standard-normal draws, exact box decomposition per draw). Only
  the most promising candidates by optimistic improvement (mean - std) get the Monte-Carlo
  estimate, which keeps a decision cheap with 3 objectives at n = 1000.
- One objective: the objective GP's own gpCAM acquisition (expected improvement by default).
- Known constraints on parameters: candidates violating them are never generated (Space).
- Outcome constraints (`value_b <= 3`): a GP of the field; P(holds) multiplies the score.
- Unknown feasibility: failed evaluations against succeeded ones, learned by scikit-learn's
  GaussianProcessClassifier; P(succeeds) multiplies the score.
- Cost: a GP of a cost field and/or a movement model from the instrument's last position; the
  score is divided by the expected cost, and a batch is ordered to shorten travel.
Batches: kriging believer on every model (points in flight told at their posterior mean).

Decisions at large n (steering.posterior): the candidates are a pool drawn when the first
objective's GP is rebuilt (at training) plus fresh points near the front; every model keeps
the triangular solve of its GP against the pool and extends it by the told rows, and points
in flight only lower the variance (no copy of the GP, nothing told). gpCAM's own posterior
(copies with the fantasies told) where a GP has no dense Cholesky factor.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from steering.constraints import Inequality, split_constraints
from steering.optimizer import (
    DUPLICATE_TOL,
    REJECT_RADIUS,
    SYNC_TRAIN_BELOW,
    Decision,
    Optimizer,
    _distinct_top,
)
from steering.pareto import Boxes, expected_improvement, hypervolume, non_dominated
from steering.posterior import PoolPosterior, usable
from steering.space import Array, Point, Space, min_distances, unique_rows
from steering.spec import CampaignSpec
from steering.views import lookup

MC_SAMPLES = 64
SCREENED = 96  # candidates that get the Monte-Carlo estimate
# Three objectives: the box decomposition grows as (front points + 1)^2, so the front is
# thinned (steering.pareto.thin) and fewer candidates and draws get the Monte-Carlo estimate
# (measured: 4.9 s a decision at n = 363 with 40 front points and 96 x 64 draws, loaded 2 cores).
MAX_FRONT = {2: 60, 3: 25}
SCREENED_3 = 48
MC_SAMPLES_3 = 32
GPC_MAX_POINTS = 300
FANTASY_FAILED = 10
GPC_LENGTH = 0.25  # unit box
COST_FLOOR = 0.05  # of the median candidate cost: a step of zero is not free


def needs_composite(spec: CampaignSpec) -> bool:
    return bool(spec.objectives or spec.constraints or spec.cost is not None)


def make_optimizer(spec: CampaignSpec, seed: int) -> Any:
    """The campaign's decision model: a plain Optimizer for one unconstrained objective."""
    return Composite(spec, seed) if needs_composite(spec) else Optimizer(spec, seed)


@dataclass
class _Model:
    field: str
    opt: Optimizer
    minimise_sign: float  # z = minimise_sign * y is minimised
    ref: float | None = None


def _sub_spec(spec: CampaignSpec, field: str, goal: str, warp: str | None = None) -> CampaignSpec:
    objective = spec.objective.model_copy(
        update={"field": field, "goal": goal, "warp": warp or spec.objective.warp}
    )
    return spec.model_copy(
        update={
            "objective": objective,
            "objectives": None,
            "constraints": [],
            "cost": None,
            "acquisition": None,
        }
    )


class Composite:
    """Ask/tell over several models; the same interface as `Optimizer` for the runners."""

    def __init__(self, spec: CampaignSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.rng = np.random.default_rng(seed + 17)
        self.space = Space(spec.space, spec.constraints)
        split = split_constraints(spec.constraints, {p.name: p.type for p in spec.space})
        self.multi = spec.objectives is not None
        self.objectives: list[_Model] = []
        if spec.objectives is None:
            self.objectives.append(
                _Model(
                    spec.objective.field,
                    Optimizer(spec, seed),
                    1.0 if spec.objective.goal != "maximise" else -1.0,
                )
            )
        else:
            for i, o in enumerate(spec.objectives):
                s = 1.0 if o.goal == "minimise" else -1.0
                ref = None if o.reference_point is None else s * o.reference_point
                self.objectives.append(
                    _Model(o.field, Optimizer(_sub_spec(spec, o.field, o.goal), seed + i), s, ref)
                )
        self.outcome: list[tuple[Inequality, _Model]] = []
        for j, c in enumerate(split.outcome):
            assert c.field is not None
            goal = "minimise" if c.upper else "maximise"
            m = Optimizer(_sub_spec(spec, c.field, goal, "none"), seed + 101 + j)
            self.outcome.append((c, _Model(c.field, m, 1.0)))
        self.cost_model: _Model | None = None
        if spec.cost is not None and spec.cost.field is not None:
            m = Optimizer(_sub_spec(spec, spec.cost.field, "minimise", "none"), seed + 202)
            self.cost_model = _Model(spec.cost.field, m, 1.0)
        for model in self.models:
            model.opt.space = self.space  # its space-filling points keep to the constraints
        self.position: Point | None = None
        self._z = np.zeros((0, len(self.objectives)))  # objectives (minimised), per told point
        self._ok = np.zeros(0, dtype=bool)  # every outcome constraint held
        self._x = np.zeros((0, self.space.dim))
        self._gpc: Any = None
        self._gpc_key: tuple[int, int] | None = None
        self._jobs: dict[int, _Model] = {}
        self._base = norm.ppf(
            (np.random.default_rng(seed + 5).permuted(np.arange(MC_SAMPLES))[:, None] + 0.5)
            / MC_SAMPLES
        ) * np.ones((1, len(self.objectives)))
        for j in range(1, len(self.objectives)):  # decorrelated columns (Latin-style draws)
            self._base[:, j] = self.rng.permutation(self._base[:, j])
        self._rejected = np.zeros((0, self.space.dim))
        self.last: dict[str, Any] = {}
        # the fast posterior (steering.posterior): the pool, the GP it was drawn for, each
        # model's solve against it, and the points a decision conditions the objectives on
        self._pool = np.zeros((0, self.space.dim))
        self._pool_gp: Any = None
        self._posts: dict[int, PoolPosterior] = {}
        self._given = np.zeros((0, self.space.dim))
        self._fast = False
        self._front_n = 0
        self._front_idx = np.zeros(0, dtype=np.intp)

    @property
    def models(self) -> list[_Model]:
        out = list(self.objectives) + [m for _, m in self.outcome]
        if self.cost_model is not None:
            out.append(self.cost_model)
        return out

    @property
    def n(self) -> int:
        return len(self._x)

    # ================================================================ data

    def tell(
        self,
        points: Sequence[Point],
        values: Sequence[float],
        noise: Sequence[float | None],
        results: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        if not points:
            return
        results = list(results) if results is not None else [None] * len(points)
        main = self.spec.objective.field
        for model in self.models:
            keep: list[int] = []
            vals: list[float] = []
            for i, (v, r) in enumerate(zip(values, results, strict=True)):
                got = float(v) if model.field == main else lookup(r, model.field)
                if got is not None:
                    keep.append(i)
                    vals.append(got)
            # The noise field is the main value's; other fields' noise is learned.
            nz = [noise[i] if model.field == main else self.spec.noise.variance for i in keep]
            model.opt.tell([points[i] for i in keep], vals, nz)
        x = self.space.snap(self.space.encode(points))
        z = np.full((len(points), len(self.objectives)), np.nan)
        for j, model in enumerate(self.objectives):
            for i, (v, r) in enumerate(zip(values, results, strict=True)):
                got = float(v) if model.field == main else lookup(r, model.field)
                if got is not None:
                    z[i, j] = model.minimise_sign * got
        ok = np.ones(len(points), dtype=bool)
        for c, _ in self.outcome:
            assert c.field is not None
            vals_c = np.array(
                [
                    np.nan
                    if (g := (float(v) if c.field == main else lookup(r, c.field))) is None
                    else g
                    for v, r in zip(values, results, strict=True)
                ]
            )
            ok &= c.holds({c.field: vals_c})
        self._x = np.vstack([self._x, x])
        self._z = np.vstack([self._z, z])
        self._ok = np.concatenate([self._ok, ok])
        if self.position is None:
            self.position = dict(points[-1])

    def set_state(self, state: dict[str, Any]) -> None:
        for model, sub in zip(self.models, state.get("models") or [], strict=False):
            model.opt.set_state(sub)

    def state(self) -> dict[str, Any]:
        return {"models": [m.opt.state() for m in self.models]}

    # ================================================================ training

    @property
    def training(self) -> Any:
        return next((m.opt.training for m in self.models if m.opt.training is not None), None)

    @training.setter
    def training(self, job: Any) -> None:
        if job is None:
            for m in self.models:
                m.opt.training = None
            return
        model = self._jobs.get(id(job))
        if model is not None:
            model.opt.training = job

    @property
    def trained_n(self) -> int:
        return min(m.opt.trained_n for m in self.models)

    @trained_n.setter
    def trained_n(self, n: int) -> None:
        for m in self.models:
            m.opt.trained_n = n

    def training_due(self) -> Any:
        """One scheduled training at a time (the runner trains one in the background);
        below SYNC_TRAIN_BELOW `train_now` trains every model that is due."""
        if self.training is not None:
            return None
        for model in self.models:
            job = model.opt.training_due()
            if job is not None:
                self._jobs = {id(job): model}
                return job
        return None

    def train_now(self, job: Any) -> None:
        model = self._jobs.pop(id(job), None)
        if model is not None:
            model.opt.train_now(job)
        for other in self.models:
            due = other.opt.training_due()
            if due is not None:
                if due.n < SYNC_TRAIN_BELOW:
                    other.opt.train_now(due)
                else:
                    other.opt.trained_n = 0  # due again at the next decision

    def apply(self, job: Any, trained: Any) -> None:
        model = self._jobs.pop(id(job), None)
        if model is not None:
            model.opt.apply(job, trained)

    # ================================================================ the posterior

    def predict(self, x: Array, gp: Any = None) -> tuple[Array, Array]:
        return self.objectives[0].opt.predict(x)

    def summary(self) -> dict[str, Any] | None:
        out = self.objectives[0].opt.summary()
        if out is not None:
            out = dict(out)
            out["models"] = {
                m.field: {"n": m.opt.n, "trained_at_n": m.opt.trained_n} for m in self.models
            }
            if self.last:
                out["last_decision"] = dict(self.last)
        return out

    def grid(self, dims: Sequence[str], at: Point, resolution: int = 60) -> dict[str, Any]:
        return self.objectives[0].opt.grid(dims, at, resolution)

    def hyperparameters_view(self) -> dict[str, Any] | None:
        return self.objectives[0].opt.hyperparameters_view()

    def front(self) -> tuple[NDArray[np.intp], Array]:
        """Indices of the feasible non-dominated measurements, and the reference point.
        Kept as points are told (they are only ever appended): a new point joins unless a
        front point dominates or equals it, and removes the front points it dominates."""
        if self._front_n > len(self._z):
            self._front_n, self._front_idx = 0, np.zeros(0, dtype=np.intp)
        idx = self._front_idx
        for i in range(self._front_n, len(self._z)):
            z = self._z[i]
            if not (self._ok[i] and np.all(np.isfinite(z))):
                continue
            if len(idx):
                f = self._z[idx]
                if np.any(np.all(f <= z, axis=1)):  # dominated by or equal to one of them
                    continue
                idx = idx[~(np.all(z <= f, axis=1) & np.any(z < f, axis=1))]
            idx = np.append(idx, i)
        self._front_idx, self._front_n = idx, len(self._z)
        return np.sort(idx), self.reference()

    def reference(self, extra: Array | None = None) -> Array:
        z = self._z[np.all(np.isfinite(self._z), axis=1)]
        if extra is not None and len(extra):
            z = np.vstack([z, extra])
        ref = np.zeros(len(self.objectives))
        for j, m in enumerate(self.objectives):
            if m.ref is not None:
                ref[j] = m.ref
            elif len(z):
                span = float(np.max(z[:, j]) - np.min(z[:, j]))
                ref[j] = float(np.max(z[:, j])) + 0.1 * (span if span > 0 else 1.0)
            else:
                ref[j] = 1.0
        return ref

    # ================================================================ asking

    def ask(
        self,
        k: int,
        pending: Sequence[Point] = (),
        avoid: Sequence[Point] = (),
        rejected: Sequence[Point] = (),
    ) -> Decision:
        started = time.perf_counter()
        self._rejected = self._encode(rejected)
        failed = self._encode(avoid)
        busy = self._encode([*pending, *avoid, *rejected])
        taken = np.vstack([self._x, busy]) if len(busy) else self._x
        main = self.objectives[0].opt
        if min(m.opt.n for m in self.objectives) < 2:
            pts = self._free(self.space.sobol_feasible(max(64, 8 * k), main._design_rng), taken)
            return self._decided(self._order(list(pts[:k])), started, "design", [])
        self._fit_feasibility(failed)
        gps = {id(m): m.opt._sync() for m in self.models}
        pend = self._encode(pending)
        # One objective scores with the GP's own gpCAM acquisition, which needs the
        # fantasies told: the fast posterior serves several.
        self._fast = self.multi and all(usable(gp) for gp in gps.values())
        if self._fast:
            self._follow(gps)
            self._given = np.vstack([pend, failed[-FANTASY_FAILED:]])
        elif len(pend) or len(failed) or k > 1:
            # Only the objectives' GPs take fantasies (copied first): the models of
            # constrained fields and cost only weigh the choice, and every told point is a
            # rank-one update in gpCAM, O(n^2) each.
            mine = {id(m) for m in self.objectives}
            gps = {key: copy.deepcopy(gp) if key in mine else gp for key, gp in gps.items()}
        fantasy = np.zeros((0, len(self.objectives)))
        if len(pend):
            fantasy = self._fantasise(gps, pend, objectives_only=True)
        if len(failed) and not self._fast:
            # Failed points are told at the posterior mean too (their uncertainty collapses,
            # so the GP does not chase the hole they leave), but achieve nothing on the front.
            # The latest few only: each is a rank-one update of every objective GP (O(n^2)
            # in gpCAM; 93 failures at n = 1000 took 7 s), and the classifier has them all.
            self._fantasise(gps, failed[-FANTASY_FAILED:], objectives_only=True)
        at = self._position_x()
        chosen: list[Array] = []
        scores: list[float] = []
        for j in range(k):
            best = self._maximise(gps, taken, fantasy, at)
            if best is None:
                break
            x, score = best
            chosen.append(x)
            scores.append(score)
            taken = np.vstack([taken, x[None, :]])
            at = x
            if j < k - 1:
                fantasy = np.vstack(
                    [fantasy, self._fantasise(gps, x[None, :], objectives_only=True)]
                )
        ordered = self._order(chosen)
        return self._decided(ordered, started, "gp", scores)

    def _decided(
        self, chosen: list[Array], started: float, source: str, scores: list[float]
    ) -> Decision:
        pts = np.asarray(chosen).reshape(-1, self.space.dim)
        points = self.space.decode(pts)
        if points:
            self.position = dict(points[-1])
        return Decision(points, time.perf_counter() - started, source, scores)

    def _encode(self, points: Sequence[Point]) -> Array:
        if not points:
            return np.zeros((0, self.space.dim))
        return self.space.snap(self.space.encode(points))

    def _free(self, cands: Array, taken: Array) -> Array:
        cands = self.space.feasible(cands)
        keep = min_distances(cands, taken) > DUPLICATE_TOL
        if len(self._rejected):
            keep &= min_distances(cands, self._rejected) > REJECT_RADIUS
        return cands[keep]

    def _follow(self, gps: dict[int, Any]) -> None:
        """The pool and every model's solve against it, in step with the GPs: a new pool when
        the first objective's GP was rebuilt, a new solve when a model's GP was, otherwise
        the rows told since appended."""
        main = gps[id(self.objectives[0])]
        if main is not self._pool_gp or not len(self._pool):
            d = self.space.dim
            count = int(min(1536, max(768, 192 * d))) if self.n <= 300 else 1024
            self._pool = self.space.sobol_feasible(count, self.rng)
            self._pool_gp = main
            self._posts = {}
        for model in self.models:
            gp = gps[id(model)]
            post = self._posts.get(id(model))
            if post is not None and post.fits(gp):
                post.refresh()
            else:
                self._posts[id(model)] = PoolPosterior(gp, self._pool)

    def _predict(
        self, gps: dict[int, Any], model: _Model, x: Array, pooled: NDArray[np.intp] | None = None
    ) -> tuple[Array, Array]:
        """Mean and std of a model's field at x, after the decision's fantasies (objectives
        only); the first len(pooled) rows of x are the pool's rows `pooled`."""
        if not self._fast:
            return model.opt.predict(x, gps[id(model)])
        post = self._posts[id(model)]
        given = self._given if model in self.objectives else None
        noise = model.opt.fantasy_noise()
        parts = []
        cut = 0 if pooled is None else len(pooled)
        if cut:
            parts.append(post.moments(index=pooled, given=given, noise=noise))
        if cut < len(x):
            parts.append(post.moments(x[cut:], given=given, noise=noise))
        m = np.concatenate([p[0] for p in parts])
        v = np.concatenate([p[1] for p in parts])
        return model.opt.result_units(m, v)

    def _fantasise(self, gps: dict[int, Any], x: Array, objectives_only: bool = False) -> Array:
        """Tell every model its own posterior mean at x; the objectives' means (minimised).
        With the fast posterior nothing is told: x joins the points the objectives'
        variances are conditioned on."""
        z = np.zeros((len(x), len(self.objectives)))
        if self._fast:
            for j, model in enumerate(self.objectives):
                if model.opt.n >= 2:
                    z[:, j] = model.minimise_sign * self._predict(gps, model, x)[0]
            self._given = np.vstack([self._given, x])
            return z
        for model in self.objectives if objectives_only else self.models:
            gp = gps[id(model)]
            if model.opt.n >= 2:
                if model in self.objectives:
                    mean, _ = model.opt.predict(x, gp)
                    z[:, self.objectives.index(model)] = model.minimise_sign * mean
                model.opt._fantasise(gp, x)
        return z

    # ---------------------------------------------------------------- scores

    def _feasibility(
        self, gps: dict[int, Any], x: Array, pooled: NDArray[np.intp] | None = None
    ) -> Array:
        p = np.ones(len(x))
        for c, model in self.outcome:
            if model.opt.n < 2:
                continue
            mean, std = self._predict(gps, model, x, pooled)
            assert c.bound is not None
            gap = (c.bound - mean) if c.upper else (mean - c.bound)
            p *= norm.cdf(gap / np.maximum(std, 1e-9))
        if self._gpc is not None:
            # squared: a point a failure borders must promise much more than one that is
            # surely measurable (the GP of the objective knows nothing of the failures)
            p *= self._gpc.predict_proba(x)[:, 1] ** 2
        return p

    def _fit_feasibility(self, failed: Array) -> None:
        """The classifier of where evaluations succeed, refitted when the failures change or
        the data have grown by a quarter."""
        if self.spec.feasibility == "off" or len(failed) == 0 or self.n < 2:
            self._gpc = None
            return
        key = (len(failed), self.n)
        if self._gpc is not None and self._gpc_key is not None:
            nf, n0 = self._gpc_key
            if nf == len(failed) and self.n < 1.25 * n0:
                return
        from sklearn.gaussian_process import GaussianProcessClassifier
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel

        ok = self._x
        rng = np.random.default_rng(self.seed + self.n)
        room = max(GPC_MAX_POINTS - len(failed), 20)
        if len(ok) > room:  # the successes nearest the failures say most about the border
            near = np.argsort(min_distances(ok, failed))[: room // 2]
            far = rng.choice(len(ok), size=room - len(near), replace=False)
            ok = ok[np.unique(np.concatenate([near, far]))]
        failed = failed[-GPC_MAX_POINTS:]
        x = np.vstack([ok, failed])
        y = np.concatenate([np.ones(len(ok)), np.zeros(len(failed))])
        # A few failures say little about length scales: marginal likelihood would then
        # flatten the classifier into the base rate everywhere, and the GP would go on
        # proposing next to a failed point. Fixed, local hyperparameters until both classes
        # have five points; learned (within local bounds) after.
        learn = len(failed) >= 5 and len(ok) >= 5
        kernel = ConstantKernel(9.0, (1.0, 100.0)) * RBF(
            np.full(self.space.dim, GPC_LENGTH), length_scale_bounds=(0.1, 1.0)
        )
        gpc = GaussianProcessClassifier(
            kernel=kernel,
            optimizer="fmin_l_bfgs_b" if learn else None,
            random_state=self.seed,
        )
        try:
            gpc.fit(x, y)
        except (ValueError, np.linalg.LinAlgError):
            return
        self._gpc, self._gpc_key = gpc, key

    def _position_x(self) -> Array | None:
        if self.position is None:
            return None
        x: Array = self._encode([self.position])[0]
        return x

    def _cost(
        self,
        gps: dict[int, Any],
        x: Array,
        at: Array | None,
        pooled: NDArray[np.intp] | None = None,
    ) -> Array | None:
        cost = self.spec.cost
        if cost is None:
            return None
        total = np.full(len(x), float(cost.overhead))
        if cost.per_unit and at is not None:
            here = self.space.values(at[None, :])
            vals = self.space.values(x)
            moves = np.stack(
                [np.abs(vals[n] - here[n][0]) * w for n, w in cost.per_unit.items()], axis=1
            )
            total += moves.max(axis=1) if cost.simultaneous else moves.sum(axis=1)
        if self.cost_model is not None and self.cost_model.opt.n >= 2:
            mean, _ = self._predict(gps, self.cost_model, x, pooled)
            total += np.maximum(mean, 0.0)
        floor = COST_FLOOR * float(np.median(total)) if len(total) else 0.0
        out: Array = np.maximum(total, max(floor, 1e-12))
        return out

    def _improvement(
        self, gps: dict[int, Any], x: Array, fantasy: Array, pooled: NDArray[np.intp] | None = None
    ) -> Array:
        """Expected hypervolume improvement (several objectives) or the objective GP's
        acquisition (one)."""
        if not self.multi:
            model = self.objectives[0].opt
            acq = model._acq(gps[id(self.objectives[0])], x)
            finite = np.isfinite(acq)
            if np.any(finite) and np.min(acq[finite]) < 0:  # ucb-like: shift to >= 0
                acq = acq - np.min(acq[finite])
            return np.where(finite, acq, 0.0)
        means, stds = [], []
        for m in self.objectives:
            mean, std = self._predict(gps, m, x, pooled)
            means.append(m.minimise_sign * mean)
            stds.append(std)
        mu, sd = np.stack(means, axis=1), np.stack(stds, axis=1)
        idx, _ = self.front()
        observed = self._z[idx]
        ref = self.reference(fantasy)
        boxes = Boxes(
            np.vstack([observed, fantasy]) if len(fantasy) else observed,
            ref,
            MAX_FRONT.get(len(ref)),
        )
        optimistic = boxes.improvement(mu - sd)
        three = len(ref) >= 3
        top = np.argsort(-optimistic)[: SCREENED_3 if three else SCREENED]
        base = self._base[:MC_SAMPLES_3] if three else self._base
        # Where nothing is expected to improve (a reference point no measurement dominates
        # yet), the tie goes to the candidate whose optimistic outcome comes nearest to
        # dominating it.
        z = self._z[np.all(np.isfinite(self._z), axis=1)]
        scale = np.ptp(z, axis=0) if len(z) > 1 else np.ones(len(ref))
        gap = np.maximum(mu - 2 * sd - ref, 0.0) / np.maximum(scale, 1e-12)
        out = 1e-9 * (optimistic + 1.0 / (1.0 + np.linalg.norm(gap, axis=1)))
        out[top] += expected_improvement(boxes, mu[top], sd[top], base)
        return np.asarray(out, dtype=float)

    def _scores(
        self,
        gps: dict[int, Any],
        x: Array,
        fantasy: Array,
        at: Array | None,
        pooled: NDArray[np.intp] | None = None,
    ) -> Array:
        a = self._improvement(gps, x, fantasy, pooled) * self._feasibility(gps, x, pooled)
        cost = self._cost(gps, x, at, pooled)
        return a if cost is None else a / cost

    def _candidates(self, taken: Array) -> tuple[Array, NDArray[np.intp] | None]:
        """Candidates, and which pool rows come first (the fast posterior) or None."""
        d = self.space.dim
        main = self.objectives[0].opt
        pooled: NDArray[np.intp] | None = None
        parts: list[Array] = []
        if self._fast:
            keep = min_distances(self._pool, taken) > DUPLICATE_TOL
            if len(self._rejected):
                keep &= min_distances(self._pool, self._rejected) > REJECT_RADIUS
            pooled = np.flatnonzero(keep)
        else:
            # Large data make every posterior dearer: fewer global candidates (as Optimizer)
            count = int(min(1536, max(768, 192 * d))) if self.n <= 300 else 768
            parts.append(self.space.sobol_feasible(count, self.rng))
        # fresh candidates near the front cost a full solve each: fewer at large n
        near, clipped = (24, 16) if self.n <= 300 else (12, 8)
        if self.multi:
            idx, _ = self.front()
            centres = self._x[idx][-16:] if len(idx) else self._x[-4:]
        else:
            g = main.sign * main._y
            centres = main._x[np.argsort(-g)[: min(5, main.n)]]
        if len(centres):
            parts.append(main._perturb(centres, near, 0.1))
            parts.append(main._perturb(centres, near, 0.3))
            # the same steps clipped rather than reflected: optima on a wall (Pareto sets
            # often lie on one) are reached exactly; the acquisition judges them with the rest
            reps = np.repeat(centres, clipped, axis=0)
            steps = main._steps(0.2) * self.rng.normal(0.0, 1.0, reps.shape)
            parts.append(self.space.snap(np.clip(reps + steps, 0.0, 1.0)))
        fresh = (
            self._free(unique_rows(np.vstack(parts)), taken)
            if parts
            else np.zeros((0, self.space.dim))
        )
        if pooled is None:
            return fresh, None
        return np.vstack([self._pool[pooled], fresh]), pooled

    def _maximise(
        self, gps: dict[int, Any], taken: Array, fantasy: Array, at: Array | None
    ) -> tuple[Array, float] | None:
        cands, pooled = self._candidates(taken)
        if len(cands) == 0:
            return None
        vals = self._scores(gps, cands, fantasy, at, pooled)
        main = self.objectives[0].opt
        for scale in (0.1, 0.02) if self.n <= 300 else (0.05,):
            centres = _distinct_top(cands, vals, 4, 0.05)
            local = self._free(unique_rows(main._perturb(centres, 48, scale)), taken)
            if len(local) == 0:
                continue
            cands = np.vstack([cands, local])
            vals = np.concatenate([vals, self._scores(gps, local, fantasy, at)])
        i = int(np.argmax(vals))
        if not np.isfinite(vals[i]):
            i = int(np.argmax(min_distances(cands, taken)))
        self.last = {"score": float(vals[i]), "candidates": len(cands)}
        return cands[i], float(vals[i])

    def _order(self, chosen: list[Array]) -> list[Array]:
        """A batch in the order that shortens travel: nearest next, from the last position."""
        cost = self.spec.cost
        if cost is None or not cost.per_unit or len(chosen) < 2:
            return chosen
        at = self._position_x()
        left = list(chosen)
        out: list[Array] = []
        while left:
            if at is None:
                nxt = 0
            else:
                here = self.space.values(at[None, :])
                vals = self.space.values(np.asarray(left))
                moves = np.stack(
                    [np.abs(vals[n] - here[n][0]) * w for n, w in cost.per_unit.items()], axis=1
                )
                travel = moves.max(axis=1) if cost.simultaneous else moves.sum(axis=1)
                nxt = int(np.argmin(travel))
            at = left.pop(nxt)
            out.append(at)
        return out


# ------------------------------------------------------------------------------ reports


def front_of(spec: CampaignSpec, evals: Sequence[Any]) -> dict[str, Any] | None:
    """The Pareto front of a campaign's feasible measurements (several objectives): its
    points, their values, and the hypervolume they dominate."""
    if not spec.objectives:
        return None
    split = split_constraints(spec.constraints, {p.name: p.type for p in spec.space})
    rows: list[tuple[Any, list[float]]] = []
    for e in evals:
        if getattr(e, "value", None) is None or str(e.state) != "succeeded":
            continue
        vals = [
            float(e.value) if o.field == spec.objective.field else lookup(e.result, o.field)
            for o in spec.objectives
        ]
        if any(v is None for v in vals):
            continue
        held = True
        for c in split.outcome:
            assert c.field is not None
            got = float(e.value) if c.field == spec.objective.field else lookup(e.result, c.field)
            held &= got is not None and bool(c.holds({c.field: np.array([got])})[0])
        if held:
            rows.append((e, [float(v) for v in vals if v is not None]))
    signs = np.array([1.0 if o.goal == "minimise" else -1.0 for o in spec.objectives])
    if not rows:
        return {"points": [], "hypervolume": 0.0, "reference_point": None, "feasible": 0}
    z = np.array([v for _, v in rows]) * signs
    ref = np.zeros(len(signs))
    for j, o in enumerate(spec.objectives):
        if o.reference_point is not None:
            ref[j] = signs[j] * o.reference_point
        else:
            span = float(np.ptp(z[:, j]))
            ref[j] = float(np.max(z[:, j])) + 0.1 * (span if span > 0 else 1.0)
    keep = np.flatnonzero(non_dominated(z))
    keep = keep[np.argsort(z[keep, 0])]
    return {
        "points": [
            {
                "seq": rows[i][0].seq,
                "point": rows[i][0].point,
                "values": dict(zip([o.field for o in spec.objectives], rows[i][1], strict=True)),
            }
            for i in keep
        ],
        "hypervolume": hypervolume(z, ref),
        "reference_point": [float(signs[j] * ref[j]) for j in range(len(signs))],
        "feasible": len(rows),
    }


def spent_cost(spec: CampaignSpec, evals: Sequence[Any]) -> float | None:
    """What the finished evaluations cost, in seq order: the cost field of each result plus
    the travel from the point before (and the overhead)."""
    cost = spec.cost
    if cost is None:
        return None
    total = 0.0
    prev: dict[str, Any] | None = None
    space = Space(spec.space)
    for e in sorted(evals, key=lambda e: e.seq):
        if str(e.state) not in ("succeeded", "failed"):
            continue
        total += cost.overhead
        if cost.field is not None:
            total += lookup(e.result, cost.field) or 0.0
        if cost.per_unit and prev is not None:
            here, there = space.values(space.encode([prev])), space.values(space.encode([e.point]))
            moves = [abs(float(there[n][0] - here[n][0])) * w for n, w in cost.per_unit.items()]
            total += max(moves) if cost.simultaneous else sum(moves)
        prev = e.point
    return total
