"""The GP's output frame: how measured values become the numbers the GP models.

h = s * y is the goal-frame value (s = -1 to minimise), to be maximised. With a warp factor k,
h is first compressed away from the best value seen,

    w = -log(1 + (h_best - h) / c),  c = k * median(h_best - h),

continued linearly above h_best, so that a few very bad measurements (Branin spans 0.4 to 300)
do not flatten the region that matters; then standardised. The warp is monotone, so
improvement keeps its meaning; noise variances follow by the delta method. Whether to warp,
and how strongly, is chosen by the marginal likelihood of the data corrected by the warp's
Jacobian (a Box-Cox style choice) each time the hyperparameters are trained.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


class Frame:
    def __init__(self, h: Array, factor: float | None) -> None:
        h = np.asarray(h, dtype=float)
        self.factor = factor
        self.warp = factor is not None and len(h) >= 3
        self.top = float(np.max(h)) if len(h) else 0.0
        gap = self.top - h
        c = 1.0
        if self.warp and factor is not None:
            c = factor * float(np.median(gap))
            if not math.isfinite(c) or c <= 0:
                c = factor * float(np.max(gap)) if np.max(gap) > 0 else 1.0
        self.c = c
        w = self._w(h) if len(h) else np.zeros(0)
        self.mu = float(np.mean(w)) if len(w) else 0.0
        sd = float(np.std(w)) if len(w) else 1.0
        self.sd = sd if math.isfinite(sd) and sd > 1e-12 * max(1.0, abs(self.mu)) else 1.0

    def _r(self, h: Array) -> Array:
        return (self.top - np.asarray(h, dtype=float)) / self.c

    def _w(self, h: Array) -> Array:
        """-log1p(r) at or below the best (r >= 0), continued linearly (-r) above it, so a new
        best value after the frame was fixed keeps its full size."""
        if not self.warp:
            return np.asarray(h, dtype=float)
        r = self._r(h)
        return np.where(r >= 0, -np.log1p(np.maximum(r, 0.0)), -r)

    def _dw(self, h: Array) -> Array:
        if not self.warp:
            return np.ones(np.shape(h))
        r = self._r(h)
        return np.where(r >= 0, 1.0 / (self.c * (1.0 + np.maximum(r, 0.0))), 1.0 / self.c)

    def forward(self, h: Array) -> Array:
        return (self._w(h) - self.mu) / self.sd

    def noise(self, h: Array, var: Array) -> Array:
        """Variance of forward(h) for measurement variance var (delta method)."""
        return np.asarray(var, dtype=float) * (self._dw(h) / self.sd) ** 2

    def log_jacobian(self, h: Array) -> float:
        """log |d forward / d h| summed over the data: what the marginal likelihood of the
        transformed values must be corrected by to compare frames."""
        return float(np.sum(np.log(self._dw(h))) - len(h) * math.log(self.sd))

    def inverse(self, g: Array) -> Array:
        w = np.asarray(g, dtype=float) * self.sd + self.mu
        if not self.warp:
            return w
        r = np.where(w <= 0, np.expm1(np.minimum(-w, 700.0)), -w)
        return self.top - self.c * r

    def slope(self, g: Array) -> Array:
        """|d inverse / d g|, to carry standard deviations back to result units."""
        if not self.warp:
            return np.full(np.shape(g), self.sd)
        w = np.asarray(g, dtype=float) * self.sd + self.mu
        return self.sd * self.c * np.where(w <= 0, np.exp(np.minimum(-w, 700.0)), 1.0)
