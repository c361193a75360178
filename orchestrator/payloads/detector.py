"""Detector data analysis, the two steps of the example flows (examples/flow_*.yaml):

- reduce: a raw detector file (CSV; a header row naming x1, x2, ... and one row per sampled
  position) is "measured" on the simulated instrument's surface at each position, with noise;
  the reduced table (the positions and a `value` column) goes to $SCIORCH_OUTPUT_DIR/reduced.csv.
- fit: a quadratic surface is fitted to a reduced table by least squares; the result is the
  fitted optimum (its position and predicted value) and the fit's R^2.

Follows the job contract (parameters from $SCIORCH_PARAMS, result to $SCIORCH_RESULT).
Run: python -m orchestrator.payloads.detector
"""

from __future__ import annotations

import csv
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.payloads.sim_instrument import load_params, log, write_json_atomic
from orchestrator.payloads.surfaces import get_surface


def source_of(params: dict[str, Any]) -> Path:
    """The `path` parameter, else the staged input `data`."""
    if params.get("path"):
        return Path(str(params["path"]))
    staged = Path(os.environ.get("SCIORCH_INPUTS", "inputs")) / "data"
    if not staged.is_file():
        raise ValueError("give path, or the input data")
    return staged


def reduce(params: dict[str, Any], out: Path) -> dict[str, Any]:
    surface = get_surface(str(params.get("surface") or "branin"))
    noise = float(params.get("noise_std", 0.01))
    rng = random.Random(params.get("seed"))
    source = source_of(params)
    with source.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{source} has no rows")
    coords = [c for c in rows[0] if c.startswith("x")]
    table = []
    for row in rows:
        point = [float(row[c]) for c in coords]
        full = point + list(surface.centre[len(point) :])
        value = surface(full[: surface.dim]) + rng.gauss(0.0, noise)
        table.append([*point, value])
    reduced = out / "reduced.csv"
    with reduced.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*coords, "value"])
        writer.writerows(table)
    best = min(table, key=lambda r: r[-1])
    return {
        "reduced": str(reduced),
        "source": str(source),
        "points": len(table),
        "min_value": best[-1],
        "min_at": dict(zip(coords, best[:-1], strict=True)),
    }


def fit(params: dict[str, Any]) -> dict[str, Any]:
    with source_of(params).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    coords = [c for c in rows[0] if c != "value"]
    x = np.array([[float(r[c]) for c in coords] for r in rows])
    y = np.array([float(r["value"]) for r in rows])
    d = x.shape[1]
    # A full quadratic: 1, x_i, x_i * x_j (i <= j).
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    design = np.column_stack([np.ones(len(x)), x] + [x[:, i] * x[:, j] for i, j in pairs])
    if len(x) < design.shape[1]:
        raise ValueError(f"a quadratic in {d} dimensions needs {design.shape[1]} points")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    predicted = design @ coef
    ss_res = float(np.sum((y - predicted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    # The fitted surface's best sampled point (a quadratic need not have an interior minimum).
    best = int(np.argmin(predicted))
    return {
        "optimum": dict(zip(coords, x[best].tolist(), strict=True)),
        "predicted": float(predicted[best]),
        "r2": 1.0 - ss_res / ss_tot,
        "points": len(x),
    }


def main() -> int:
    try:
        params = load_params()
        mode = params.get("mode")
        time.sleep(float(params.get("duration_s", 0.0)))
        out = Path(os.environ.get("SCIORCH_OUTPUT_DIR", "."))
        out.mkdir(parents=True, exist_ok=True)
        if mode == "reduce":
            result = reduce(params, out)
        elif mode == "fit":
            result = fit(params)
        else:
            raise ValueError(f"mode must be reduce or fit, not {mode!r}")
    except (ValueError, KeyError, OSError) as exc:
        log(f"error: {exc}")
        return 2
    log(f"{mode}: {result}")
    path = os.environ.get("SCIORCH_RESULT")
    if path:
        write_json_atomic(Path(path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
