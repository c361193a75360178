"""A gpCAM GP's posterior at many candidates, from its own Cholesky factor, for decisions at
large n (steering.multi).

gpCAM's `posterior_covariance(variance_only=True)` solves K^-1 k with two triangular solves
and also builds the m x m prior and posterior covariances of the candidates; at n = 1000 that
was most of a decision (3 objectives and an outcome constraint, ~2000 candidates: 2.4 s of
4.6 s on the loaded 2 cores). Here

    A = L^-1 k(X, C)          (one triangular solve; L is gpCAM's factor of K + noise)
    var(c) = k(c, c) - |A_c|^2

and three things make it cheap:

- A pool of candidates stays fixed while the GP only grows: gpCAM appends told points to its
  factor (rank-one updates leave the top-left block as it was), so A for the pool grows by
  the new rows, L22^-1 (k(X_new, C) - L21 A), O(n m) per told point instead of O(n^2 m).
  Fresh candidates (near the front, local refinement) get the full solve.
- Points in flight, failed and chosen earlier in a batch are "told at their posterior mean"
  (kriging believer) without telling anything: conditioning on an observation equal to the
  predictive mean leaves the mean where it was and lowers the variance by
  diag(S_cB (S_BB + N)^-1 S_Bc), with S_cB = k(c, B) - A_c^T W and W = L^-1 k(X, B): no copy
  of the GP, no O(n^2) update per fantasy.
- The mean is gpCAM's, k(C, X) KVinvY plus its prior mean, from the pool's cross-covariance
  kept (and grown) beside A: O(n m), no kernel evaluations.

Only gpCAM's dense Cholesky mode (the default below its gp2Scale sizes) has a factor to read;
`PoolPosterior.usable` says whether a GP does, and steering.multi falls back to gpCAM's own
posterior otherwise. Values are in the GP's frame (steering.frame): callers convert.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import solve_triangular

from steering.space import Array


def usable(gp: Any) -> bool:
    kv = getattr(gp, "kv", None)
    factor = getattr(kv, "Chol_factor", None)
    return (
        getattr(kv, "mode", None) == "Chol"
        and isinstance(factor, np.ndarray)
        and len(factor) == len(gp.x_data)
        and getattr(gp, "x_out", None) is None
    )


class PoolPosterior:
    """One GP's posterior over a fixed candidate pool, kept in step with the GP as it grows
    (`refresh`); `moments` at the pool (by index) or at any other points."""

    def __init__(self, gp: Any, pool: Array) -> None:
        self.gp = gp
        self.pool = pool
        self.hps = np.array(gp.hyperparameters, dtype=float)
        self._prior_var = float(self._k(pool[:1], pool[:1])[0, 0]) if len(pool) else 1.0
        self.n = len(gp.x_data)
        self._kx = self._cross(pool)  # k(X, pool)
        self._a = self._solve(self._kx)
        self._s = np.einsum("ij,ij->j", self._a, self._a)
        self._given: tuple[bytes, Array] | None = None  # the last given set's solve

    # ------------------------------------------------------------------ kernel pieces

    def _k(self, a: Array, b: Array) -> Array:
        return np.asarray(self.gp.prior.compute_covariances(a, b, self.hps), dtype=float)

    def _cross(self, x: Array) -> Array:
        """k(X, x), n x m."""
        return np.asarray(self.gp.posterior.cross_covariance(x, self.hps), dtype=float)

    def _factor(self) -> Array:
        f: Array = self.gp.kv.Chol_factor
        return f

    def _solve(self, k: Array) -> Array:
        out: Array = solve_triangular(self._factor(), k, lower=True, check_finite=False)
        return out

    # ------------------------------------------------------------------ keeping in step

    def fits(self, gp: Any) -> bool:
        """Whether this pool's solve can follow `gp` by appending rows: the same GP object
        (a rebuild makes a new one), the same hyperparameters, and no fewer points."""
        return (
            gp is self.gp
            and usable(gp)
            and len(gp.x_data) >= self.n
            and np.array_equal(np.asarray(gp.hyperparameters, dtype=float), self.hps)
        )

    def refresh(self) -> None:
        """Extend A by the rows of the points told since (O(n m) per point)."""
        n = len(self.gp.x_data)
        if n == self.n:
            return
        f = self._factor()
        x_new = np.asarray(self.gp.x_data[self.n :], dtype=float)
        l21 = f[self.n : n, : self.n]
        l22 = np.tril(f[self.n : n, self.n : n])
        k_new = self._k(x_new, self.pool)
        rows = solve_triangular(l22, k_new - l21 @ self._a, lower=True, check_finite=False)
        self._kx = np.vstack([self._kx, k_new])
        self._a = np.vstack([self._a, rows])
        self._s = self._s + np.einsum("ij,ij->j", rows, rows)
        self.n = n

    # ------------------------------------------------------------------ the posterior

    def moments(
        self,
        x: Array | None = None,
        index: NDArray[np.intp] | None = None,
        given: Array | None = None,
        noise: float = 1e-6,
    ) -> tuple[Array, Array]:
        """Posterior mean and variance (GP frame) at `x`, or at the pool rows `index`, after
        also conditioning on `given` points observed at their posterior mean with noise
        variance `noise`."""
        if x is None:
            assert index is not None
            pts = self.pool[index]
            kx = self._kx[:, index]
            a = self._a[:, index]
            var = self._prior_var - self._s[index]
        else:
            pts = x
            kx = self._cross(x)
            a = self._solve(kx)
            var = self._prior_var - np.einsum("ij,ij->j", a, a)
        alpha = np.asarray(self.gp.posterior.KVinvY, dtype=float).reshape(-1)
        prior = np.asarray(self.gp.prior.compute_mean(pts, self.hps), dtype=float).reshape(-1)
        mean = prior + kx.T @ alpha
        if given is not None and len(given):
            w = self._given_solve(given)
            s_bb = self._k(given, given) - w.T @ w + noise * np.eye(len(given))
            s_cb = self._k(pts, given) - a.T @ w  # m x b
            try:
                c = np.linalg.cholesky(s_bb)
                u = solve_triangular(c, s_cb.T, lower=True, check_finite=False)
                var = var - np.einsum("ij,ij->j", u, u)
            except np.linalg.LinAlgError:
                var = var - np.einsum("ij,ji->i", s_cb, np.linalg.pinv(s_bb) @ s_cb.T)
        return mean, np.maximum(var, 0.0)

    def _given_solve(self, given: Array) -> Array:
        """L^-1 k(X, given), kept while a decision asks about the same given set."""
        key = given.tobytes()
        if self._given is None or self._given[0] != key or self._given[1].shape[0] != self.n:
            w = self._solve(self._cross(given))
            self._given = (key, w)
        return self._given[1]
