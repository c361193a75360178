"""A simulated instrument: measures a named test surface at one point, with noise, taking a
configurable time, and streaming intermediate records while it "acquires".

Follows the job contract: parameters from $SCIORCH_PARAMS (JSON), intermediate records appended
to $SCIORCH_STREAM (one JSON object a line), the final result written to $SCIORCH_RESULT.

The measurement averages `records` samples (each with noise std noise_std*sqrt(records)), so
each intermediate record carries the running mean and the final value has noise std noise_std.

Run: python -m orchestrator.payloads.sim_instrument
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.payloads.surfaces import SURFACES, get_surface

COORDS = ("x1", "x2", "x3", "x4", "x5", "x6")


def log(msg: str) -> None:
    print(f"[sim-instrument] {msg}", flush=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_params() -> dict[str, Any]:
    p = os.environ.get("SCIORCH_PARAMS")
    if not p:
        return {}
    data = json.loads(Path(p).read_text() or "{}")
    if not isinstance(data, dict):
        raise ValueError("parameters must be a JSON object")
    return data


def main() -> int:
    try:
        params = load_params()
        surface = get_surface(str(params.get("surface") or "branin"))
        noise_std = float(params.get("noise_std", 0.01) or 0.0)
        duration = float(params.get("duration_s", 0.5) or 0.0)
        n = int(params.get("records", 3) or 0)
        if noise_std < 0 or duration < 0 or not 0 <= n <= 100:
            raise ValueError("noise_std and duration_s must be >= 0, records within 0..100")
        point: dict[str, float] = {}
        for i, (name, c) in enumerate(zip(COORDS, surface.centre, strict=False)):
            v = params.get(name)
            point[name] = float(c if v is None else v)
            if not math.isfinite(point[name]):
                raise ValueError(f"{name} must be a finite number")
            lo, hi = surface.bounds[i]
            if not lo <= point[name] <= hi:
                log(f"warning: {name}={point[name]} is outside the domain [{lo}, {hi}]")
    except (ValueError, TypeError, OSError) as exc:
        print(f"[sim-instrument] error: invalid parameters: {exc}", file=sys.stderr, flush=True)
        return 2

    seed = params.get("seed")
    rng = random.Random(seed)
    log(f"surface={surface.name} point={point} noise_std={noise_std} duration_s={duration}")
    if params.get("fail"):
        time.sleep(duration)  # a fault found at the end of the measurement, as in real life
        print(
            "[sim-instrument] error: simulated instrument fault (fail=true)",
            file=sys.stderr,
            flush=True,
        )
        return 3

    x = list(point.values())
    # A region where the instrument fails ({"x1": [lo, hi], ...}): feasibility to be learned.
    region = params.get("fail_region") or {}
    if (
        isinstance(region, dict)
        and region
        and all(
            isinstance(b, list) and len(b) == 2 and b[0] <= point.get(k, math.nan) <= b[1]
            for k, b in region.items()
        )
    ):
        print(
            f"[sim-instrument] error: instrument fault in region {region} at {point}",
            file=sys.stderr,
            flush=True,
        )
        return 3
    try:
        true_value = surface(x)
        if not math.isfinite(true_value):
            raise ArithmeticError(f"f(x) is {true_value}")
    except ArithmeticError as exc:  # one line for the entry's reason, not a traceback
        print(
            f"[sim-instrument] error: cannot measure {surface.name} at {point}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 2
    stream_path = os.environ.get("SCIORCH_STREAM")
    start = time.monotonic()
    samples: list[float] = []
    if n == 0:
        time.sleep(duration)
        value = true_value + (rng.gauss(0.0, noise_std) if noise_std > 0 else 0.0)
    else:
        sample_std = noise_std * math.sqrt(n)
        stream = open(stream_path, "a") if stream_path else None
        try:
            for i in range(1, n + 1):
                delay = start + duration * i / n - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                samples.append(true_value + (rng.gauss(0.0, sample_std) if sample_std else 0.0))
                rec = {
                    "step": i,
                    "of": n,
                    "partial_value": sum(samples) / len(samples),
                    "elapsed_s": round(time.monotonic() - start, 4),
                }
                if stream is not None:
                    stream.write(json.dumps(rec) + "\n")
                    stream.flush()
                log(f"step {i}/{n}: partial_value={rec['partial_value']:.6g}")
        finally:
            if stream is not None:
                stream.close()
        value = sum(samples) / len(samples)

    result: dict[str, Any] = {
        "value": value,
        "noise_variance": noise_std**2,
        "surface": surface.name,
        "point": point,
        "true_value": true_value,
    }
    # A second surface measured at the same point (`value_b`): a second objective or an
    # outcome to constrain.
    if params.get("surface_b"):
        second = get_surface(str(params["surface_b"]))
        true_b = second(x[: second.dim])
        result["value_b"] = true_b + (rng.gauss(0.0, noise_std) if noise_std > 0 else 0.0)
        result["true_value_b"] = true_b
    result_path = os.environ.get("SCIORCH_RESULT")
    if result_path:
        write_json_atomic(Path(result_path), result)
    else:
        print(json.dumps(result), flush=True)
    log(f"done: value={value:.6g} (true {true_value:.6g})")
    return 0


__all__ = ["COORDS", "SURFACES", "main"]

if __name__ == "__main__":
    sys.exit(main())
