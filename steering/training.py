"""Hyperparameter training: gpCAM's `train` on a snapshot of the data, in this process or in a
child process so that the steering loop keeps deciding while it runs.

gpCAM 8.6's own `train(asynchronous=True)` needs a dask cluster and supports only hgdl, mcmc,
adam and bo; a child process running the ordinary local optimiser (L-BFGS-B with restarts) is
lighter and is limited to one BLAS thread, so it leaves the other cores to the decisions. The
child reads one JSON job on stdin and writes the hyperparameters as JSON on stdout:

    python -m steering.training < job.json
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from steering.frame import Array, Frame
from steering.kernels import PLAIN, TWO_SCALE, extra_hps, two_scale, two_scale_grad

_quiet = False


def _import_gpcam() -> Any:
    """gpCAM, with its warnings silenced (uninitialised GPs, default bounds, negative
    variances; the loop handles what matters itself). fvGP installs `simplefilter("once")` when
    imported, so the filters go in afterwards."""
    global _quiet
    import gpcam

    if not _quiet:
        for module in ("gpcam", "fvgp", "hgdl"):
            warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
        _quiet = True
    return gpcam


NOISE_FLOOR = 1e-6  # standardised units: Cholesky never sees a zero


@dataclass
class TrainJob:
    """A snapshot of the data: encoded points, goal-frame values h (to maximise), their noise
    variances (None: learn one level as the last hyperparameter), the covariance structure
    (steering.kernels) with its starting hyperparameters and bounds, and the output warps to
    choose from (None: no warp; a number: the warp factor, see steering.frame)."""

    n: int
    x: list[list[float]]
    h: list[float]
    var: list[float] | None
    kernel: str
    init: list[float]
    bounds: list[list[float]]
    restarts: int
    max_iter: int
    seed: int
    warps: list[float | None]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        return cls(**json.loads(text))


@dataclass
class Trained:
    hyperparameters: list[float]
    warp: float | None
    scores: dict[str, float]
    kernel: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Trained:
        return cls(**json.loads(text))


def learned_noise(x: Array, hps: Array, *args: Any) -> Array:
    """Homoscedastic noise whose variance is the last hyperparameter."""
    return np.full(len(x), float(hps[-1]))


def learned_noise_grad(x: Array, hps: Array, *args: Any) -> Array:
    grad = np.zeros((len(hps), len(x)))
    grad[-1, :] = 1.0
    return grad


def make_gp(x: Array, y: Array, noise: Array | None, hps: Array, kernel: str = PLAIN) -> Any:
    """A gpCAM GPOptimizer over the data with these hyperparameters: gpCAM's default
    Matern-3/2 ARD kernel (hps[0] signal variance, hps[1:d+1] length scales) or the two-scale
    one (steering.kernels); a learned noise level last."""
    GPOptimizer = _import_gpcam().GPOptimizer
    structure: dict[str, Any] = {}
    if kernel == TWO_SCALE:
        structure = {"kernel_function": two_scale, "kernel_function_grad": two_scale_grad}
    if noise is None:
        return GPOptimizer(
            x,
            y,
            init_hyperparameters=hps,
            noise_function=learned_noise,
            noise_function_grad=learned_noise_grad,
            **structure,
        )
    return GPOptimizer(x, y, init_hyperparameters=hps, noise_variances=noise, **structure)


def gp_data(job: TrainJob, frame: Frame) -> tuple[Array, Array, Array | None]:
    h = np.asarray(job.h, dtype=float)
    y = frame.forward(h)
    if job.var is None:
        return np.asarray(job.x, dtype=float), y, None
    noise = np.maximum(frame.noise(h, np.asarray(job.var, dtype=float)), NOISE_FLOOR)
    return np.asarray(job.x, dtype=float), y, noise


def train(job: TrainJob) -> Trained:
    """gpCAM's local training (L-BFGS-B from the current hyperparameters plus random restarts)
    in each candidate output frame; the frame whose Jacobian-corrected marginal likelihood is
    highest wins. The starting point is kept if training fails."""
    init = np.asarray(job.init, dtype=float)
    h = np.asarray(job.h, dtype=float)
    best: Trained | None = None
    best_score = -math.inf
    scores: dict[str, float] = {}
    for warp in job.warps:
        # each frame and structure its own restarts
        salt = (0 if warp is None else int(1000 * warp)) + 7 * extra_hps(job.kernel)
        np.random.seed((job.seed + salt) % 2**32)
        frame = Frame(h, warp)
        try:
            x, y, noise = gp_data(job, frame)
            gp = make_gp(x, y, noise, init, job.kernel)
            hps = np.asarray(
                gp.train(
                    hyperparameter_bounds=np.asarray(job.bounds, dtype=float),
                    method="local",
                    n_restarts=job.restarts,
                    max_iter=job.max_iter,
                ),
                dtype=float,
            )
            if hps.shape != init.shape or not np.all(np.isfinite(hps)):
                continue
            score = float(gp.log_likelihood()) + frame.log_jacobian(h)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError, ArithmeticError):
            continue
        if not math.isfinite(score):
            continue
        scores["none" if warp is None else f"log/{warp:g}"] = score
        if score > best_score:
            best_score = score
            best = Trained([float(v) for v in hps], warp, scores, job.kernel)
    if best is None:
        return Trained(job.init, job.warps[0] if job.warps else None, scores, job.kernel)
    best.scores = scores
    return best


CHILD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


async def train_in_child(job: TrainJob) -> Trained:
    """`train` in a child process (one BLAS thread); awaited, never polled."""
    env = {**os.environ, **CHILD_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "steering.training",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await proc.communicate(job.to_json().encode())
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"training process exited {proc.returncode}: {' / '.join(tail)}")
    return Trained.from_json(out.decode())


def train_in_child_blocking(job: TrainJob) -> Trained:
    """`train_in_child` for synchronous callers (the benchmark runs it on a thread)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "steering.training"],
        input=job.to_json().encode(),
        capture_output=True,
        env={**os.environ, **CHILD_ENV},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training process exited {proc.returncode}")
    return Trained.from_json(proc.stdout.decode())


def main() -> int:
    job = TrainJob.from_json(sys.stdin.read())
    print(train(job).to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
