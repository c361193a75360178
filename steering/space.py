"""The search space as the GP sees it: every point encoded into a unit box.

- continuous: (v - low) / (high - low), or the same on log(v) with `log = true`;
- integer: the cell [k - 1/2, k + 1/2] of each value k, scaled into [0, 1]; decoding rounds;
- categorical: one-hot, one unit coordinate per choice; decoding takes the largest.

`snap` maps any box point to the encoding of the point it decodes to, so the GP is only ever
conditioned on, and asked about, points that can really be measured (integers whole, one
category at a time). Candidates are snapped before acquisition, which makes mixed spaces
honest instead of rounding a continuous optimum afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import qmc

from steering.spec import InitialDesign, Parameter

Array = NDArray[np.float64]
Point = dict[str, Any]


class Space:
    def __init__(self, params: Sequence[Parameter], constraints: Sequence[str] = ()) -> None:
        self.params = list(params)
        # Known constraints on parameters (steering.constraints): space-filling designs and
        # candidates keep to the points that satisfy them.
        from steering.constraints import split_constraints

        self.known = split_constraints(constraints, {p.name: p.type for p in self.params}).known
        self.slices: list[slice] = []
        start = 0
        for p in self.params:
            width = len(p.choices or ()) if p.type == "categorical" else 1
            self.slices.append(slice(start, start + width))
            start += width
        self.dim = start

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def discrete(self) -> bool:
        return all(p.type != "continuous" for p in self.params)

    def size(self) -> float:
        """Number of distinct points (inf if any dimension is continuous)."""
        total = 1.0
        for p in self.params:
            if p.type == "continuous":
                return math.inf
            if p.type == "integer":
                assert p.low is not None and p.high is not None
                total *= int(p.high) - int(p.low) + 1
            else:
                total *= len(p.choices or ())
        return total

    # ------------------------------------------------------------------ one parameter

    @staticmethod
    def _span(p: Parameter) -> tuple[float, float]:
        assert p.low is not None and p.high is not None
        if p.log:
            return math.log(p.low), math.log(p.high)
        return p.low, p.high

    def _encode_value(self, p: Parameter, value: Any, out: Array) -> None:
        if p.type == "categorical":
            choices = p.choices or []
            idx = next((i for i, c in enumerate(choices) if _same(c, value)), None)
            if idx is None:
                raise ValueError(f"{p.name}={value!r} is not one of {choices}")
            out[:] = 0.0
            out[idx] = 1.0
            return
        lo, hi = self._span(p)
        v = float(value)
        if p.log:
            v = math.log(max(v, 1e-300))
        if p.type == "integer":
            out[0] = (v - lo + 0.5) / (hi - lo + 1.0) if not p.log else (v - lo) / (hi - lo)
        else:
            out[0] = (v - lo) / (hi - lo)

    def _decode_value(self, p: Parameter, u: Array) -> Any:
        if p.type == "categorical":
            choices = p.choices or []
            return choices[int(np.argmax(u))]
        lo, hi = self._span(p)
        x = float(min(max(u[0], 0.0), 1.0))
        if p.type == "integer":
            assert p.low is not None and p.high is not None
            if p.log:
                v = float(np.round(math.exp(lo + x * (hi - lo))))
            else:
                n = int(p.high) - int(p.low) + 1
                v = int(p.low) + min(math.floor(x * n), n - 1)
            return int(min(max(v, int(p.low)), int(p.high)))
        v = lo + x * (hi - lo)
        return math.exp(v) if p.log else v

    # ------------------------------------------------------------------ points

    def encode(self, points: Sequence[Point]) -> Array:
        out = np.zeros((len(points), self.dim))
        for i, point in enumerate(points):
            for p, sl in zip(self.params, self.slices, strict=True):
                if p.name not in point:
                    raise ValueError(f"point {point} has no value for {p.name}")
                self._encode_value(p, point[p.name], out[i, sl])
        return out

    def decode(self, u: Array) -> list[Point]:
        u = np.atleast_2d(u)
        return [
            {
                p.name: self._decode_value(p, row[sl])
                for p, sl in zip(self.params, self.slices, strict=True)
            }
            for row in u
        ]

    def snap(self, u: Array) -> Array:
        """Each box point replaced by the encoding of the point it decodes to."""
        u = np.clip(np.atleast_2d(u), 0.0, 1.0).copy()
        for p, sl in zip(self.params, self.slices, strict=True):
            if p.type == "continuous":
                continue
            if p.type == "categorical":
                block = u[:, sl]
                idx = np.argmax(block, axis=1)
                block[:] = 0.0
                block[np.arange(len(u)), idx] = 1.0
                u[:, sl] = block
            else:
                assert p.low is not None and p.high is not None
                lo_i, hi_i = int(p.low), int(p.high)
                if p.log:
                    lo, hi = self._span(p)
                    vals = np.clip(np.round(np.exp(lo + u[:, sl.start] * (hi - lo))), lo_i, hi_i)
                    u[:, sl.start] = (np.log(vals) - lo) / (hi - lo)
                else:
                    n = hi_i - lo_i + 1
                    cell = np.clip(np.floor(u[:, sl.start] * n), 0, n - 1)
                    u[:, sl.start] = (cell + 0.5) / n
        return u

    def from_unit(self, z: Array) -> Array:
        """Points of the P-dimensional unit cube (one coordinate per parameter, as space-filling
        designs produce them) to snapped encodings: a categorical takes choice floor(z * n)."""
        z = np.atleast_2d(z)
        u = np.zeros((len(z), self.dim))
        for j, (p, sl) in enumerate(zip(self.params, self.slices, strict=True)):
            if p.type == "categorical":
                n = len(p.choices or ())
                idx = np.clip(np.floor(z[:, j] * n).astype(int), 0, n - 1)
                u[np.arange(len(z)), sl.start + idx] = 1.0
            else:
                u[:, sl.start] = z[:, j]
        return self.snap(u)

    def values(self, u: Array) -> dict[str, Array]:
        """Each numeric parameter's values (its own units) at encoded points, vectorised."""
        u = np.atleast_2d(u)
        out: dict[str, Array] = {}
        for p, sl in zip(self.params, self.slices, strict=True):
            if p.type == "categorical":
                continue
            lo, hi = self._span(p)
            x = np.clip(u[:, sl.start], 0.0, 1.0)
            if p.type == "integer" and not p.log:
                assert p.low is not None and p.high is not None
                n = int(p.high) - int(p.low) + 1
                out[p.name] = int(p.low) + np.minimum(np.floor(x * n), n - 1)
                continue
            v = lo + x * (hi - lo)
            out[p.name] = np.exp(v) if p.log else v
            if p.type == "integer":
                out[p.name] = np.round(out[p.name])
        return out

    def satisfied(self, u: Array) -> NDArray[np.bool_]:
        """Which encoded points satisfy every known constraint."""
        ok = np.ones(len(np.atleast_2d(u)), dtype=bool)
        if self.known and len(ok):
            vals = self.values(u)
            for c in self.known:
                ok &= c.holds(vals)
        return ok

    def feasible(self, u: Array) -> Array:
        return u[self.satisfied(u)] if self.known else u

    def random(self, n: int, rng: np.random.Generator) -> Array:
        return self.from_unit(rng.random((n, len(self.params))))

    def sobol(self, n: int, rng: np.random.Generator) -> Array:
        """n scrambled-Sobol points (n need not be a power of two)."""
        sampler = qmc.Sobol(d=len(self.params), scramble=True, seed=rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # balance properties need 2^m points
            z = sampler.random(n)
        return self.from_unit(z)

    def sobol_feasible(self, n: int, rng: np.random.Generator) -> Array:
        """About n scrambled-Sobol points that satisfy the known constraints (more are drawn
        in proportion to the share rejected)."""
        u = self.feasible(self.sobol(n, rng))
        if not self.known or len(u) >= n or len(u) == 0:
            return u
        extra = self.feasible(self.sobol(int(min(64 * n, n * n / max(len(u), 1))), rng))
        return np.vstack([u, extra])[:n]

    def design(self, spec: InitialDesign, n: int, rng: np.random.Generator) -> Array:
        """The initial design: n distinct points (fewer if the space has fewer)."""
        if n <= 0:
            return np.zeros((0, self.dim))
        if self.known:  # drawn from the feasible region (no stratification survives the cut)
            u = unique_rows(self.sobol_feasible(n, rng))
            tries = 0
            while len(u) < n and tries < 20:
                u = unique_rows(np.vstack([u, self.feasible(self.random(8 * n, rng))]))
                tries += 1
            return u[:n]
        if spec.method == "lhs":
            z = qmc.LatinHypercube(d=len(self.params), seed=rng).random(n)
            u = self.from_unit(z)
        elif spec.method == "sobol":
            u = self.sobol(n, rng)
        else:
            u = self.random(n, rng)
        u = unique_rows(u)
        tries = 0
        while len(u) < min(n, self.size()) and tries < 20:  # discrete spaces collide
            u = unique_rows(np.vstack([u, self.random(4 * n, rng)]))[: int(min(n, self.size()))]
            tries += 1
        return u[:n]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return bool(a == b)


def unique_rows(u: Array, decimals: int = 9) -> Array:
    """Rows in first-seen order without repeats."""
    if len(u) == 0:
        return u
    _, idx = np.unique(np.round(u, decimals), axis=0, return_index=True)
    return u[np.sort(idx)]


def min_distances(a: Array, b: Array, chunk: int = 4096) -> Array:
    """For each row of a, the Euclidean distance to the nearest row of b (inf if b is empty)."""
    if len(b) == 0:
        return np.full(len(a), np.inf)
    out = np.empty(len(a))
    bb = np.sum(b * b, axis=1)
    for i in range(0, len(a), chunk):
        x = a[i : i + chunk]
        d2 = np.sum(x * x, axis=1)[:, None] + bb[None, :] - 2.0 * x @ b.T
        out[i : i + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out
