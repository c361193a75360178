"""Test surfaces for the simulated instrument and the steering loop: plain Python (math only),
each with its domain and known global minimum.

All surfaces are to be minimised. `Surface.centre` is the default measurement point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Surface:
    name: str
    dim: int
    bounds: tuple[tuple[float, float], ...]
    minimum: float
    minimizers: tuple[tuple[float, ...], ...]
    fn: Callable[[Sequence[float]], float]
    description: str

    @property
    def centre(self) -> tuple[float, ...]:
        return tuple((lo + hi) / 2 for lo, hi in self.bounds)

    def __call__(self, x: Sequence[float]) -> float:
        if len(x) != self.dim:
            raise ValueError(f"{self.name} takes {self.dim} coordinates, got {len(x)}")
        return float(self.fn(x))

    def space(self) -> list[dict[str, float | str]]:
        """A campaign's space over this surface's domain, named as the simulated instrument
        names its coordinates (x1, x2, ...)."""
        return [
            {"name": f"x{i + 1}", "low": lo, "high": hi} for i, (lo, hi) in enumerate(self.bounds)
        ]

    def contains(self, x: Sequence[float]) -> bool:
        if len(x) != self.dim:
            return False
        return all(lo <= v <= hi for v, (lo, hi) in zip(x, self.bounds, strict=True))


def branin(x: Sequence[float]) -> float:
    x1, x2 = x
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


_H3_A = ((3.0, 10, 30), (0.1, 10, 35), (3.0, 10, 30), (0.1, 10, 35))
_H3_P = (
    (0.3689, 0.1170, 0.2673),
    (0.4699, 0.4387, 0.7470),
    (0.1091, 0.8732, 0.5547),
    (0.03815, 0.5743, 0.8828),
)
_H_ALPHA = (1.0, 1.2, 3.0, 3.2)


def hartmann3(x: Sequence[float]) -> float:
    total = 0.0
    for alpha, a, p in zip(_H_ALPHA, _H3_A, _H3_P, strict=True):
        r = sum(aj * (xj - pj) ** 2 for aj, xj, pj in zip(a, x, p, strict=True))
        total += alpha * math.exp(-r)
    return -total


_H6_A = (
    (10, 3, 17, 3.5, 1.7, 8),
    (0.05, 10, 17, 0.1, 8, 14),
    (3, 3.5, 1.7, 10, 17, 8),
    (17, 8, 0.05, 10, 0.1, 14),
)
_H6_P = (
    (0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886),
    (0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991),
    (0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650),
    (0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381),
)


def hartmann6(x: Sequence[float]) -> float:
    total = 0.0
    for alpha, a, p in zip(_H_ALPHA, _H6_A, _H6_P, strict=True):
        r = sum(aj * (xj - pj) ** 2 for aj, xj, pj in zip(a, x, p, strict=True))
        total += alpha * math.exp(-r)
    return -total


def rosenbrock(x: Sequence[float]) -> float:
    return sum(100 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(len(x) - 1))


def sphere(x: Sequence[float]) -> float:
    return sum(v * v for v in x)


def ackley(x: Sequence[float]) -> float:
    d = len(x)
    s1 = sum(v * v for v in x) / d
    s2 = sum(math.cos(2 * math.pi * v) for v in x) / d
    return -20 * math.exp(-0.2 * math.sqrt(s1)) - math.exp(s2) + 20 + math.e


def rastrigin(x: Sequence[float]) -> float:
    return 10.0 * len(x) + sum(v * v - 10.0 * math.cos(2 * math.pi * v) for v in x)


def schwefel(x: Sequence[float]) -> float:
    return 418.9829 * len(x) - sum(v * math.sin(math.sqrt(abs(v))) for v in x)


def himmelblau(x: Sequence[float]) -> float:
    x1, x2 = x
    return (x1**2 + x2 - 11) ** 2 + (x1 + x2**2 - 7) ** 2


def branin01(x: Sequence[float]) -> float:
    """Branin on [0, 1]^2 (the first of the BraninCurrin pair of objectives)."""
    return branin((15.0 * x[0] - 5.0, 15.0 * x[1]))


def currin(x: Sequence[float]) -> float:
    """Currin's exponential function on [0, 1]^2 (BraninCurrin's second objective)."""
    x1, x2 = x
    x2 = max(x2, 1e-9)
    poly = (2300 * x1**3 + 1900 * x1**2 + 2092 * x1 + 60) / (
        100 * x1**3 + 500 * x1**2 + 4 * x1 + 20
    )
    return (1 - math.exp(-1 / (2 * x2))) * poly


SURFACES: dict[str, Surface] = {
    s.name: s
    for s in (
        Surface(
            "branin",
            2,
            ((-5.0, 10.0), (0.0, 15.0)),
            0.397887,
            ((-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)),
            branin,
            "Branin-Hoo, 2-D, x1 in [-5, 10], x2 in [0, 15]; minimum 0.397887 at "
            "(-pi, 12.275), (pi, 2.275), (9.42478, 2.475)",
        ),
        Surface(
            "hartmann3",
            3,
            ((0.0, 1.0),) * 3,
            -3.86278,
            ((0.114614, 0.555649, 0.852547),),
            hartmann3,
            "Hartmann, 3-D, [0, 1]^3; minimum -3.86278 at (0.114614, 0.555649, 0.852547)",
        ),
        Surface(
            "hartmann6",
            6,
            ((0.0, 1.0),) * 6,
            -3.32237,
            ((0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573),),
            hartmann6,
            "Hartmann, 6-D, [0, 1]^6; minimum -3.32237 at "
            "(0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)",
        ),
        Surface(
            "rosenbrock",
            2,
            ((-2.0, 2.0),) * 2,
            0.0,
            ((1.0, 1.0),),
            rosenbrock,
            "Rosenbrock, 2-D, [-2, 2]^2; minimum 0 at (1, 1)",
        ),
        Surface(
            "sphere",
            3,
            ((-5.12, 5.12),) * 3,
            0.0,
            ((0.0, 0.0, 0.0),),
            sphere,
            "sphere, 3-D, [-5.12, 5.12]^3; minimum 0 at the origin",
        ),
        Surface(
            "ackley",
            2,
            ((-32.768, 32.768),) * 2,
            0.0,
            ((0.0, 0.0),),
            ackley,
            "Ackley, 2-D, [-32.768, 32.768]^2; minimum 0 at the origin",
        ),
        Surface(
            "rastrigin",
            3,
            ((-5.12, 5.12),) * 3,
            0.0,
            ((0.0, 0.0, 0.0),),
            rastrigin,
            "Rastrigin, 3-D, [-5.12, 5.12]^3 (a bowl under about 1000 ripples); minimum 0 at "
            "the origin",
        ),
        Surface(
            "schwefel",
            2,
            ((-500.0, 500.0),) * 2,
            0.0,
            ((420.9687, 420.9687),),
            schwefel,
            "Schwefel, 2-D, [-500, 500]^2 (the best basin far from the next best); minimum 0 "
            "at (420.9687, 420.9687)",
        ),
        Surface(
            "himmelblau",
            2,
            ((-5.0, 5.0),) * 2,
            0.0,
            ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)),
            himmelblau,
            "Himmelblau, 2-D, [-5, 5]^2; minimum 0 at (3, 2), (-2.805118, 3.131312), "
            "(-3.779310, -3.283186), (3.584428, -1.848126)",
        ),
        Surface(
            "branin01",
            2,
            ((0.0, 1.0),) * 2,
            0.397887,
            ((0.12389, 0.81833), (0.5428, 0.15167), (0.96165, 0.165)),
            branin01,
            "Branin rescaled to [0, 1]^2 (BraninCurrin's first objective); minimum 0.397887",
        ),
        Surface(
            "currin",
            2,
            ((0.0, 1.0),) * 2,
            1.180408,
            ((0.0, 1.0),),
            currin,
            "Currin exponential, 2-D, [0, 1]^2 (BraninCurrin's second objective); minimum "
            "1.180408 at (0, 1)",
        ),
    )
}


def get_surface(name: str) -> Surface:
    try:
        return SURFACES[name]
    except KeyError:
        raise ValueError(f"unknown surface {name!r}; known: {', '.join(SURFACES)}") from None


def evaluate(name: str, x: Sequence[float]) -> float:
    return get_surface(name)(x)
