"""Pareto fronts and hypervolume for 2 or 3 objectives, exact, in numpy.

Everything here minimises: callers turn a maximised objective into its negative. The region
not dominated by a front P (and below the reference point r) is cut into boxes: a grid over
the first k-1 objectives from P's coordinates, and in each grid column everything below the
lowest last coordinate of the points that dominate the column's lower corner. So there are at
most (m + 1)^(k-1) boxes for m front points, and

    HV(P)      = sum over columns of column area x (r_k - lowest last coordinate)
    HVI(y | P) = sum over boxes of the volume of [max(y, lo), hi]

the second vectorised over many y at once (the Monte-Carlo samples of expected hypervolume
improvement).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def non_dominated(z: Array) -> NDArray[np.bool_]:
    """Which rows of z (minimised) no other row dominates (<= everywhere, < somewhere);
    of exact duplicates the first is kept."""
    z = np.atleast_2d(np.asarray(z, dtype=float))
    n = len(z)
    if n == 0:
        return np.zeros(0, dtype=bool)
    le = np.all(z[:, None, :] <= z[None, :, :], axis=2)  # le[i, j]: i <= j everywhere
    lt = np.any(z[:, None, :] < z[None, :, :], axis=2)
    dominated = np.any(le & lt, axis=0)
    same = le & le.T
    earlier_twin = np.any(np.triu(same, 1), axis=0)  # a duplicate of an earlier row
    keep: NDArray[np.bool_] = ~dominated & ~earlier_twin
    return keep


def _front_below(z: Array, ref: Array) -> Array:
    z = np.atleast_2d(np.asarray(z, dtype=float)).reshape(-1, len(ref))
    z = z[np.all(z < ref, axis=1)]
    return z[non_dominated(z)] if len(z) else z


def _columns(front: Array, ref: Array) -> tuple[Array, Array, Array]:
    """Grid columns over the first k-1 objectives: lower corners, upper corners, and the
    lowest last coordinate among the front points that dominate each lower corner."""
    k = len(ref)
    edges = [np.concatenate([[-np.inf], np.unique(front[:, j]), [ref[j]]]) for j in range(k - 1)]
    grids = np.meshgrid(*[e[:-1] for e in edges], indexing="ij")
    tops = np.meshgrid(*[e[1:] for e in edges], indexing="ij")
    lo = np.stack([g.ravel() for g in grids], axis=1)
    hi = np.stack([g.ravel() for g in tops], axis=1)
    if len(front):
        covers = np.all(front[None, :, : k - 1] <= lo[:, None, :], axis=2)  # (cells, m)
        last = np.where(covers, front[None, :, k - 1], ref[k - 1]).min(axis=1)
    else:
        last = np.full(len(lo), ref[k - 1])
    keep = np.all(hi > lo, axis=1)
    return lo[keep], hi[keep], last[keep]


def hypervolume(z: Array, ref: Array) -> float:
    """Exact hypervolume dominated by the rows of z (minimised) up to ref (2 or 3 columns)."""
    ref = np.asarray(ref, dtype=float)
    front = _front_below(z, ref)
    if len(front) == 0:
        return 0.0
    if len(ref) == 1:
        return float(ref[0] - front[:, 0].min())
    lo, hi, last = _columns(front, ref)
    finite = np.all(np.isfinite(lo), axis=1)
    area = np.prod(hi[finite] - lo[finite], axis=1)
    return float(np.sum(area * (ref[-1] - last[finite])))


def thin(front: Array, keep: int) -> Array:
    """At most `keep` points of a front, spread out (farthest-point order in objectives
    scaled to the front's range, starting from each objective's best)."""
    if len(front) <= keep:
        return front
    span = np.ptp(front, axis=0)
    u = (front - front.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen = list(dict.fromkeys(int(i) for i in np.argmin(front, axis=0)))
    d = np.min(np.linalg.norm(u[:, None, :] - u[None, chosen, :], axis=2), axis=1)
    while len(chosen) < keep:
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(u - u[i], axis=1))
    out: Array = front[np.sort(chosen)]
    return out


class Boxes:
    """The non-dominated region of a front below ref, as boxes, for many HVI evaluations.
    With `keep`, a front of more points is thinned to that many first (3 objectives make
    (m + 1)^2 boxes): improvement is then overestimated in the gaps, which only makes the
    choice look there a little more."""

    def __init__(self, z: Array, ref: Array, keep: int | None = None) -> None:
        self.ref = np.asarray(ref, dtype=float)
        front = _front_below(z, self.ref)
        if keep is not None:
            front = thin(front, keep)
        self._build(front)

    def _build(self, front: Array) -> None:
        k = len(self.ref)
        if k == 1:
            top = front[:, 0].min() if len(front) else self.ref[0]
            self.lo = np.array([[-np.inf]])
            self.hi = np.array([[top]])
        else:
            lo, hi, last = _columns(front, self.ref)
            keep = last > -np.inf
            self.lo = np.column_stack([lo[keep], np.full(int(np.sum(keep)), -np.inf)])
            self.hi = np.column_stack([hi[keep], last[keep]])
        self.front = front

    def improvement(self, y: Array, chunk: int = 1 << 22) -> Array:
        """HVI of each row of y (minimised) over the front."""
        y = np.atleast_2d(np.asarray(y, dtype=float))
        out = np.empty(len(y))
        step = max(1, chunk // max(1, len(self.lo)))
        # one objective at a time on (points, boxes) arrays, in place: a product over a short
        # last axis of a 3-d array is several times slower in numpy
        lo, hi = self.lo.T.copy(), self.hi.T.copy()
        for i in range(0, len(y), step):
            part = y[i : i + step]
            vol: Array | None = None
            for j in range(y.shape[1]):
                side = np.maximum(part[:, j, None], lo[j][None, :])
                np.subtract(hi[j][None, :], side, out=side)
                np.maximum(side, 0.0, out=side)
                if vol is None:
                    vol = side
                else:
                    vol *= side
            assert vol is not None
            out[i : i + step] = vol.sum(axis=1)
        return out


def expected_improvement(
    boxes: Boxes, mean: Array, std: Array, base: Array, chunk: int = 1 << 22
) -> Array:
    """Monte-Carlo expected hypervolume improvement of candidates whose objectives
    (minimised) are independent normals N(mean, std^2): `base` holds S standard-normal draws
    of k values, the same for every candidate (common random numbers keep the ranking
    smooth)."""
    c, k = mean.shape
    s = len(base)
    out = np.empty(c)
    per = max(1, chunk // max(1, s * len(boxes.lo) * k))
    for i in range(0, c, per):
        m = mean[i : i + per, None, :]
        sd = std[i : i + per, None, :]
        y = (m + sd * base[None, :, :]).reshape(-1, k)
        out[i : i + per] = boxes.improvement(y).reshape(-1, s).mean(axis=1)
    return out
