"""gpCAM behind ask/tell for campaigns.

- The GP (gpCAM's GPOptimizer, default anisotropic Matern-3/2 kernel) lives in a unit box (see
  `steering.space`) on values in the goal's frame: h = s * y with s = -1 to minimise, so every
  acquisition maximises (gpCAM's expected improvement, probability of improvement, knowledge
  gradient and noisy EI maximise with no warning). `lcb` asked for a minimisation is gpCAM's
  `ucb` on -y, `minimum` its `maximum`. h is optionally log-warped away from the best value,
  then standardised (`steering.frame`); the warp is chosen by marginal likelihood.
- Noise: each measurement's variance carried into the GP's frame (floored at 1e-6 so Cholesky
  never sees a zero), or one level learned as an extra hyperparameter.
- ask(k): the acquisition (gpCAM's `evaluate_acquisition_function`, evaluated in chunks of 256
  because gpCAM's posterior variance builds an m x m matrix) is maximised over candidates:
  Sobol points, points near the best measurements, then three rounds of local refinement whose
  steps are fractions of the GP's length scales (reflected at the walls). Points are chosen one
  at a time on a copy of the GP into which the points still in flight, the failed ones and the
  batch chosen so far are told at their posterior mean (kriging believer): their posterior
  variance collapses, so the next pick goes elsewhere. Batches are diverse, and a point in
  flight is never asked again. Candidates closer than 1e-3 (unit box) to a measured, pending or
  failed point are dropped, so nothing is asked twice. Set criteria (total correlation,
  relative information entropy) pick the batch jointly through gpCAM's candidate-list `ask`.
- Covariance: a trend (anisotropic Matern-3/2) plus fine ripples (isotropic Matern-3/2), see
  steering.kernels; on a smooth landscape the ripples' variance trains down to nothing. Where
  it does not (a rugged landscape), every other pick is upper-confidence rather than expected
  improvement (`_portfolio`).
- Training (gpCAM `train`, local, with restarts) follows a schedule: every new point while
  n < 20, then whenever n has grown by a quarter (n < 100, in the caller's thread) or by half
  (n >= 100, in a child process while the loop keeps deciding with the previous
  hyperparameters). At n = 1000 a decision (tell + ask) stays under a second on 2 cores; see
  bench/steering.py.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from steering.frame import Frame
from steering.kernels import (
    FINE_LENGTH,
    FINE_SIGNAL,
    KERNELS,
    LENGTH_BOUNDS,
    PLAIN,
    TREND_LENGTH_BOUNDS,
    TWO_SCALE,
    extra_hps,
)
from steering.space import Array, Point, Space, min_distances, unique_rows
from steering.spec import SET_ACQUISITIONS, CampaignSpec
from steering.training import NOISE_FLOOR, Trained, TrainJob, make_gp, train

# One BLAS thread per process for GP work (SCIORCH_GP_THREADS to change): the matrices of a
# decision are small, and on a loaded machine two OpenBLAS threads per call spin against each
# other (measured: 0.25 s single-threaded against 0.6-5 s with two, n = 1000, 2 busy cores).
try:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(os.environ.get("SCIORCH_GP_THREADS", "1")), user_api="blas")
except ImportError:  # pragma: no cover - a dependency, but only an optimisation
    pass

DUPLICATE_TOL = 1e-3  # unit box
# A point a person rejected keeps the GP away from its neighbourhood, not only from itself: the
# next best candidate next to it is the same suggestion in all but name.
REJECT_RADIUS = 0.03  # unit box
CHUNK = 256
SYNC_TRAIN_BELOW = 100
WARP_FACTOR = 1.0  # c = median gap below the best (steering.frame)
EVERY_POINT_BELOW = 50
RUGGED_LENGTH = 0.1
RUGGED_SHARE = 0.2  # two-scale: the ripples' signal variance against the trend's
SIGNAL_BOUNDS = (0.01, 100.0)
NOISE_BOUNDS = (1e-6, 1.0)

_SWAP_FOR_MINIMISE = {"lcb": "ucb", "minimum": "maximum"}


@dataclass
class Decision:
    points: list[Point]
    seconds: float
    source: str  # design | gp
    acquisition: list[float] = field(default_factory=list)


class Optimizer:
    """Ask/tell over a campaign's space with gpCAM. Not thread-safe: one caller at a time."""

    def __init__(self, spec: CampaignSpec, seed: int) -> None:
        self.spec = spec
        self.space = Space(spec.space)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        goal = spec.objective.goal
        self.sign = -1.0 if goal == "minimise" else 1.0
        acq = spec.acquisition_name
        self.acquisition = _SWAP_FOR_MINIMISE.get(acq, acq) if goal == "minimise" else acq
        self.learn_noise = spec.noise.learn
        d = self.space.dim
        # observations (original units)
        self._x = np.zeros((0, d))
        self._y = np.zeros(0)
        self._v = np.zeros(0)  # noise variance, nan where unknown
        # the GP and the frame it was built in
        self._gp: Any = None
        self._gp_n = 0
        warp = spec.objective.warp
        # Candidate output warps (steering.frame): chosen by marginal likelihood at training.
        if goal == "explore" or warp == "none":
            self.warps: list[float | None] = [None]
        elif warp == "log":
            self.warps = [WARP_FACTOR]
        else:
            self.warps = [None, WARP_FACTOR]
        self.warp: float | None = self.warps[-1]
        self._frame = Frame(np.zeros(0), None)
        self._learn = False
        # The covariance structure (steering.kernels). A campaign saved before the two-scale
        # kernel resumes with the plain one and moves to two-scale at its next training.
        self.kernel = TWO_SCALE
        self.hyperparameters: Array | None = None
        self.trained_n = 0
        self.training: TrainJob | None = None  # in flight in a child process
        self._summary: dict[str, Any] | None = None
        self._monitor: Array | None = None
        self._design_rng = np.random.default_rng(seed + 1)
        self._rejected = np.zeros((0, self.space.dim))

    # ================================================================ data

    @property
    def n(self) -> int:
        return len(self._y)

    def tell(
        self,
        points: Sequence[Point],
        values: Sequence[float],
        noise: Sequence[float | None],
        results: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        """Measurements: `results` (each evaluation's whole result) serves the models of
        several fields (steering.multi); one objective needs only the values."""
        if not points:
            return
        x = self.space.snap(self.space.encode(points))
        y = np.asarray(values, dtype=float)
        v = np.asarray([np.nan if n is None else float(n) for n in noise], dtype=float)
        if not np.all(np.isfinite(y)):
            raise ValueError("told values must be finite")
        self._x = np.vstack([self._x, x])
        self._y = np.concatenate([self._y, y])
        self._v = np.concatenate([self._v, v])
        self._summary = None

    def set_state(self, state: dict[str, Any]) -> None:
        """Hyperparameters and output warp saved by `state()` (an earlier run of this
        campaign), so a resumed campaign decides well before its first training."""
        hps = state.get("hyperparameters")
        kernel = state.get("kernel", PLAIN)  # saved before there was a choice: plain
        if kernel not in KERNELS:
            return
        if hps and len(hps) == self._n_hps(bool(state.get("learn")), kernel):
            self.kernel = kernel
            self.hyperparameters = np.asarray(hps, dtype=float)
            self._learn = bool(state.get("learn"))
            self.trained_n = int(state.get("trained_n", 0))
            warp = state.get("warp")
            if warp in self.warps:
                self.warp = warp

    def state(self) -> dict[str, Any]:
        return {
            "hyperparameters": None
            if self.hyperparameters is None
            else [float(h) for h in self.hyperparameters],
            "learn": self._learn,
            "kernel": self.kernel,
            "trained_n": self.trained_n,
            "warp": self.warp,
        }

    # ================================================================ the GP

    def _n_hps(self, learn: bool, kernel: str | None = None) -> int:
        return 1 + self.space.dim + extra_hps(kernel or self.kernel) + (1 if learn else 0)

    def _noise_learned(self) -> bool:
        if self.learn_noise:
            return True
        return bool(np.any(~np.isfinite(self._v)) and self.spec.noise.variance is None)

    def _noise_orig(self) -> Array:
        v = self._v.copy()
        fallback = self.spec.noise.variance
        if fallback is None:
            known = v[np.isfinite(v)]
            fallback = float(np.median(known)) if len(known) else 0.0
        v[~np.isfinite(v)] = fallback
        return v

    def _g(self, y: Array) -> Array:
        return self._frame.forward(self.sign * y)

    def _noise_std(self, v: Array, y: Array) -> Array:
        return np.maximum(self._frame.noise(self.sign * y, v), NOISE_FLOOR)

    def _bounds(self, learn: bool, kernel: str | None = None) -> Array:
        if (kernel or self.kernel) == TWO_SCALE:
            rows = [
                SIGNAL_BOUNDS,
                *[TREND_LENGTH_BOUNDS] * self.space.dim,
                FINE_SIGNAL,
                FINE_LENGTH,
            ]
        else:
            rows = [SIGNAL_BOUNDS] + [LENGTH_BOUNDS] * self.space.dim
        if learn:
            rows.append(NOISE_BOUNDS)
        return np.asarray(rows, dtype=float)

    def _default_hps(self, learn: bool, kernel: str | None = None) -> Array:
        fine = [0.1, 0.05] if (kernel or self.kernel) == TWO_SCALE else []
        hps = [1.0] + [0.3] * self.space.dim + fine + ([1e-2] if learn else [])
        return np.asarray(hps, dtype=float)

    def _start(self) -> Array:
        """Where training starts: the current hyperparameters. A campaign resumed with the
        plain kernel carries its signal, length scales and noise over, the ripples at their
        defaults."""
        learn = self._learn
        h = self.hyperparameters
        if h is None:
            return self._default_hps(learn, TWO_SCALE)
        if self.kernel == TWO_SCALE:
            return np.asarray(h, dtype=float)
        d = self.space.dim
        fine = self._default_hps(False, TWO_SCALE)[d + 1 :]
        start = np.concatenate([h[: 1 + d], fine, h[-1:] if learn else []])
        b = self._bounds(learn, TWO_SCALE)
        out: Array = np.clip(start, b[:, 0], b[:, 1])
        return out

    def _build(self, hps: Array | None = None) -> None:
        """A fresh GP over all observations, in a new standardisation frame."""
        learn = self._noise_learned()
        if hps is None or len(hps) != self._n_hps(learn):
            hps = self.hyperparameters
            if hps is None or len(hps) != self._n_hps(learn):
                hps = self._default_hps(learn)
        hps = np.clip(hps, self._bounds(learn)[:, 0], self._bounds(learn)[:, 1])
        self._frame = Frame(self.sign * self._y, self.warp)
        self._learn = learn
        noise = None if learn else self._noise_std(self._noise_orig(), self._y)
        self._gp = make_gp(self._x, self._g(self._y), noise, hps, self.kernel)
        self._gp_n = self.n
        self.hyperparameters = np.asarray(hps, dtype=float)

    def _sync(self) -> Any:
        """The GP with every observation told (appended with a rank-n update)."""
        if self._gp is None or self._learn != self._noise_learned():
            self._build()
            return self._gp
        if self._gp_n < self.n:
            x = self._x[self._gp_n :]
            g = self._g(self._y[self._gp_n :])
            if self._learn:
                self._gp.tell(x, g)
            else:
                v = self._noise_std(self._noise_orig()[self._gp_n :], self._y[self._gp_n :])
                self._gp.tell(x, g, noise_variances=v)
            self._gp_n = self.n
        return self._gp

    # ================================================================ training

    def training_due(self) -> TrainJob | None:
        """The next scheduled training, or None. `job.n < SYNC_TRAIN_BELOW`: run it now
        (`train_now`); otherwise in the background, then `apply`."""
        n = self.n
        if n < 3 or self.training is not None:
            return None
        if n < EVERY_POINT_BELOW:
            due = n > self.trained_n
        elif n < SYNC_TRAIN_BELOW:
            due = n >= math.ceil(1.25 * self.trained_n)
        else:
            due = n >= math.ceil(1.5 * self.trained_n)
        if not due:
            return None
        self._sync()
        learn = self._learn
        assert self.hyperparameters is not None
        job = TrainJob(
            n=n,
            x=self._x.tolist(),
            h=(self.sign * self._y).tolist(),
            var=None if learn else self._noise_orig().tolist(),
            kernel=TWO_SCALE,
            init=[float(h) for h in self._start()],
            bounds=self._bounds(learn, TWO_SCALE).tolist(),
            restarts=4 if n < 50 else 2,
            max_iter=200 if n < SYNC_TRAIN_BELOW else 100,
            seed=self.seed * 7919 + n,
            warps=list(self.warps),
        )
        self.trained_n = n
        return job

    def train_now(self, job: TrainJob) -> None:
        self.apply(job, train(job))

    def apply(self, job: TrainJob, trained: Trained) -> None:
        """Use trained hyperparameters and output warp: rebuild the GP over all data (the
        job's snapshot plus what arrived while it trained)."""
        self.training = None
        h = np.asarray(trained.hyperparameters, dtype=float)
        if trained.kernel not in KERNELS:
            return
        if len(h) != self._n_hps(job.var is None, trained.kernel) or not np.all(np.isfinite(h)):
            return
        if trained.warp in self.warps:
            self.warp = trained.warp
        self.kernel = trained.kernel
        self.last_training = trained
        self.hyperparameters = h
        self._build(h)
        self._summary = None

    # ================================================================ asking

    def ask(
        self,
        k: int,
        pending: Sequence[Point] = (),
        avoid: Sequence[Point] = (),
        rejected: Sequence[Point] = (),
    ) -> Decision:
        """k new points, none within 1e-3 of a told, pending or avoided point, nor within
        REJECT_RADIUS of a rejected one; fewer if the space runs out. Before the GP has two
        values, space-filling points."""
        started = time.perf_counter()
        self._rejected = self._encode_all(rejected)
        busy = self._encode_all([*pending, *avoid, *rejected])
        taken = np.vstack([self._x, busy]) if len(busy) else self._x
        if self.n < 2:
            pts = self._space_filling(k, taken)
            return Decision(self.space.decode(pts), time.perf_counter() - started, "design")
        gp = self._sync()
        model = copy.deepcopy(gp) if (len(busy) or k > 1) else gp
        if len(busy):
            self._fantasise(model, busy)
        chosen: list[Array] = []
        scores: list[float] = []
        if self.acquisition in SET_ACQUISITIONS:
            chosen, scores = self._ask_set(model, k, taken)
        else:
            for j in range(k):
                best = self._maximise(model, taken, self._portfolio())
                if best is None:
                    break
                x, score = best
                chosen.append(x)
                scores.append(score)
                taken = np.vstack([taken, x[None, :]])
                if j < k - 1:
                    self._fantasise(model, x[None, :])
        pts = np.asarray(chosen).reshape(-1, self.space.dim)
        return Decision(self.space.decode(pts), time.perf_counter() - started, "gp", scores)

    def _encode_all(self, points: Sequence[Point]) -> Array:
        if not points:
            return np.zeros((0, self.space.dim))
        return self.space.snap(self.space.encode(points))

    def _space_filling(self, k: int, taken: Array) -> Array:
        cands = self.space.sobol(max(64, 8 * k), self._design_rng)
        cands = self._free(unique_rows(cands), taken)
        return cands[:k]  # consecutive Sobol points are spread out

    def _free(self, cands: Array, taken: Array) -> Array:
        """The candidates that are neither (near) taken points nor near a rejected one."""
        keep = min_distances(cands, taken) > DUPLICATE_TOL
        if len(self._rejected):
            keep &= min_distances(cands, self._rejected) > REJECT_RADIUS
        return cands[keep]

    def _typical_noise(self) -> Array | None:
        if self._learn:
            return None
        v = self._noise_std(self._noise_orig(), self._y)
        return np.array([float(np.min(v))]) if len(v) else np.array([NOISE_FLOOR])

    def _fantasise(self, model: Any, x: Array) -> None:
        """Kriging believer: tell the model its own posterior mean at x."""
        mean = np.asarray(model.posterior_mean(x)["m(x)"], dtype=float).reshape(-1)
        noise = self._typical_noise()
        if noise is None:
            model.tell(x, mean)
        else:
            model.tell(x, mean, noise_variances=np.full(len(x), noise[0]))

    def _acq(self, model: Any, x: Array, acquisition: str | None = None) -> Array:
        out = np.empty(len(x))
        for i in range(0, len(x), CHUNK):
            vals = model.evaluate_acquisition_function(
                x[i : i + CHUNK], acquisition_function=acquisition or self.acquisition
            )
            out[i : i + CHUNK] = np.asarray(vals, dtype=float).reshape(-1)
        out[~np.isfinite(out)] = -np.inf
        return out

    def _steps(self, scale: float) -> Array:
        """Per-coordinate step sizes: `scale` length scales, so a local search moves as far in
        each direction as the GP says matters (a coordinate it finds flat is resampled
        broadly instead of inheriting the incumbent's value)."""
        h = self.hyperparameters
        ls = h[1 : 1 + self.space.dim] if h is not None else np.full(self.space.dim, 0.3)
        return np.minimum(scale * ls, 1.0)

    def _perturb(self, centres: Array, count: int, scale: float) -> Array:
        reps = np.repeat(centres, count, axis=0)
        steps = self._steps(scale)
        # Reflected at the walls: clipping would pile candidates on the boundary, and where the
        # GP sees no trend in a coordinate the boundary would then win every tie.
        pts = 1.0 - np.abs(1.0 - np.abs(reps + self.rng.normal(0.0, 1.0, reps.shape) * steps))
        for p, sl in zip(self.space.params, self.space.slices, strict=True):
            if p.type == "continuous":
                continue
            flip = self.rng.random(len(pts)) < 0.25  # discrete neighbours: a new value
            if np.any(flip):
                fresh = self.space.random(int(np.sum(flip)), self.rng)
                pts[np.ix_(flip, np.arange(sl.start, sl.stop))] = fresh[:, sl]
        return self.space.snap(pts)

    def _candidates(self, taken: Array) -> Array:
        d = self.space.dim
        n_global = int(min(2048, max(1024, 256 * d))) if self.n <= 300 else 1024
        parts = [self.space.sobol(n_global, self.rng)]
        if self.n:
            g = self.sign * self._y
            top = self._x[np.argsort(-g)[: min(5, self.n)]]
            parts.append(self._perturb(top, 32, 0.1))
            parts.append(self._perturb(top, 32, 0.3))
        return self._free(unique_rows(np.vstack(parts)), taken)

    def _rugged(self) -> bool:
        """A landscape of many local optima: the two-scale kernel gives its ripples a real
        share of the signal (RUGGED_SHARE), or the plain one resolves structure much finer
        than the space (median length scale below RUGGED_LENGTH of the unit box)."""
        h = self.hyperparameters
        if h is None or self.trained_n < 15:
            return False
        d = self.space.dim
        if self.kernel == TWO_SCALE:
            return bool(h[d + 1] > RUGGED_SHARE * h[0])
        return bool(np.median(h[1 : 1 + d]) < RUGGED_LENGTH)

    def _portfolio(self) -> str | None:
        """On a rugged landscape expected improvement commits to the first good basin: every
        other pick there is upper-confidence (mean + 3 std) instead, which keeps looking at
        the other basins. Elsewhere (and for any other acquisition) nothing changes."""
        if self.acquisition != "expected improvement" or not self._rugged():
            return None
        self._portfolio_turn += 1
        return "ucb" if self._portfolio_turn % 2 == 0 else None

    _portfolio_turn = 0

    def _maximise(
        self, model: Any, taken: Array, acquisition: str | None = None
    ) -> tuple[Array, float] | None:
        cands = self._candidates(taken)
        if len(cands) == 0:
            return None
        vals = self._acq(model, cands, acquisition)
        for scale in (0.2, 0.06, 0.015):
            centres = _distinct_top(cands, vals, 4, 0.05)
            local = self._perturb(centres, 64, scale)
            local = self._free(unique_rows(local), taken)
            if len(local) == 0:
                continue
            lv = self._acq(model, local, acquisition)
            cands = np.vstack([cands, local])
            vals = np.concatenate([vals, lv])
        i = int(np.argmax(vals))
        if not np.isfinite(vals[i]):
            # Every score is -inf or nan (all excluded): fall back to the least crowded point.
            if not len(cands):
                return None
            i = int(np.argmax(min_distances(cands, taken)))
        return cands[i], float(vals[i])

    def _ask_set(self, model: Any, k: int, taken: Array) -> tuple[list[Array], list[float]]:
        cands = self._free(unique_rows(self.space.sobol(256, self.rng)), taken)
        if len(cands) == 0:
            return [], []
        k = min(k, len(cands))
        res = model.ask(list(cands), n=k, acquisition_function=self.acquisition)
        pts = np.asarray(res["x"], dtype=float).reshape(-1, self.space.dim)
        score = float(np.asarray(res["f_a(x)"], dtype=float).reshape(-1)[0])
        return [p for p in pts], [score] * len(pts)

    # ================================================================ the posterior

    def predict(self, x: Array, gp: Any = None) -> tuple[Array, Array]:
        """Posterior mean and standard deviation at encoded points, in result units (of this
        GP, or of `gp`, a copy of it with more told)."""
        gp = self._sync() if gp is None else gp
        mean = np.empty(len(x))
        std = np.empty(len(x))
        for i in range(0, len(x), CHUNK):
            chunk = x[i : i + CHUNK]
            m = np.asarray(gp.posterior_mean(chunk)["m(x)"], dtype=float).reshape(-1)
            v = np.asarray(
                gp.posterior_covariance(chunk, variance_only=True)["v(x)"], dtype=float
            ).reshape(-1)
            mean[i : i + CHUNK], std[i : i + CHUNK] = self.result_units(m, v)
        return mean, std

    def result_units(self, m: Array, v: Array) -> tuple[Array, Array]:
        """Posterior mean and variance in the GP's frame -> mean and std in result units."""
        mean = self.sign * self._frame.inverse(m)
        std = np.sqrt(np.maximum(v, 0.0)) * self._frame.slope(m)
        return mean, std

    def fantasy_noise(self) -> float:
        """The noise variance (GP frame) at which a point in flight is told (kriging
        believer, `_fantasise`)."""
        noise = self._typical_noise()
        if noise is not None:
            return float(noise[0])
        h = self.hyperparameters
        return float(h[-1]) if h is not None else NOISE_FLOOR

    def summary(self) -> dict[str, Any] | None:
        """Posterior summary over a fixed Sobol set of 512 points (cached until the next tell)."""
        if self.n < 2:
            return None
        if self._summary is not None:
            return self._summary
        if self._monitor is None:
            self._monitor = self.space.sobol(512, np.random.default_rng(self.seed + 2))
        x = np.vstack([self._monitor, self._x])
        mean, std = self.predict(x)
        mon = len(self._monitor)
        out: dict[str, Any] = {
            "n": self.n,
            "max_std": float(np.max(std[:mon])),
            "mean_std": float(np.mean(std[:mon])),
            "trained_at_n": self.trained_n,
            "training": self.training is not None,
            "noise": "learned" if self._learn else "measured",
            "output_warp": "none" if self.warp is None else f"log (c = {self.warp:g} x median gap)",
        }
        if self.spec.objective.goal != "explore":
            i = int(np.argmax(self.sign * mean))
            out["predicted_best"] = {
                "point": self.space.decode(x[i : i + 1])[0],
                "mean": float(mean[i]),
                "std": float(std[i]),
            }
        out["hyperparameters"] = self.hyperparameters_view()
        self._summary = out
        return out

    def hyperparameters_view(self) -> dict[str, Any] | None:
        """Hyperparameters in result units: signal variance, one length scale per parameter
        (in its own units; for one-hot categoricals the smallest of its coordinates), noise."""
        h = self.hyperparameters
        if h is None:
            return None
        lengths: dict[str, float] = {}
        for p, sl in zip(self.space.params, self.space.slices, strict=True):
            ls = float(np.min(h[1 + sl.start : 1 + sl.stop]))
            if p.type != "categorical" and not p.log:
                assert p.low is not None and p.high is not None
                span = p.high - p.low + (1.0 if p.type == "integer" else 0.0)
                ls *= span
            lengths[p.name] = ls
        # Without a warp the GP's frame is a plain standardisation: report in result units.
        scale = 1.0 if self._frame.warp else self._frame.sd**2
        out: dict[str, Any] = {
            "kernel": self.kernel,
            "signal_variance": float(h[0]) * scale,
            "length_scales": lengths,
            "units": "GP frame (log-warped)" if self._frame.warp else "result units",
        }
        d = self.space.dim
        if self.kernel == TWO_SCALE:
            # isotropic in the unit box: a fraction of every parameter's range
            out["fine_signal_variance"] = float(h[d + 1]) * scale
            out["fine_length_fraction"] = float(h[d + 2])
        if self._learn and len(h) == self._n_hps(True):
            out["noise_variance"] = float(h[-1]) * scale
        return out

    def grid(self, dims: Sequence[str], at: Point, resolution: int = 60) -> dict[str, Any]:
        """Posterior mean and std on a grid over one or two parameters, the others held at
        `at` (for the posterior plot). Values in result units."""
        params = {p.name: p for p in self.space.params}
        axes: list[Array] = []
        for name in dims:
            p = params[name]
            if p.type == "categorical":
                axes.append(np.arange(len(p.choices or ()), dtype=float))
            elif p.type == "integer":
                assert p.low is not None and p.high is not None
                count = int(p.high - p.low) + 1
                axes.append(np.linspace(p.low, p.high, min(count, resolution)))
            else:
                assert p.low is not None and p.high is not None
                axes.append(
                    np.geomspace(p.low, p.high, resolution)
                    if p.log
                    else np.linspace(p.low, p.high, resolution)
                )
        mesh = np.meshgrid(*axes, indexing="xy")
        points: list[Point] = []
        for idx in np.ndindex(mesh[0].shape):
            point = dict(at)
            for name, m in zip(dims, mesh, strict=True):
                p = params[name]
                v = float(m[idx])
                point[name] = (p.choices or [])[int(v)] if p.type == "categorical" else v
                if p.type == "integer":
                    point[name] = round(v)
            points.append(point)
        mean, std = self.predict(self.space.snap(self.space.encode(points)))
        shape = mesh[0].shape
        return {"axes": axes, "mean": mean.reshape(shape), "std": std.reshape(shape)}


def _distinct_top(cands: Array, vals: Array, k: int, sep: float) -> Array:
    order = np.argsort(-vals)
    picked: list[Array] = []
    for i in order:
        if not np.isfinite(vals[i]):
            break
        if all(np.linalg.norm(cands[i] - c) > sep for c in picked):
            picked.append(cands[i])
            if len(picked) >= k:
                break
    if not picked:
        picked.append(cands[int(order[0])])
    return np.asarray(picked)
