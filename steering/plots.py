"""PNG plots of a campaign (matplotlib, Agg): the objective against evaluation number, and the
posterior mean and standard deviation over two chosen parameters with the evaluated points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steering.models import CampaignRecord, EvalState, EvaluationRecord


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def objective_plot(rec: CampaignRecord, evals: list[EvaluationRecord], path: Path) -> Path:
    plt = _pyplot()
    spec = rec.spec
    goal = spec.objective.goal
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ok = [e for e in evals if e.state == EvalState.SUCCEEDED and e.value is not None]
    for source, colour, label in (("design", "#8c8c8c", "initial design"), ("gp", "#1f77b4", "GP")):
        pts = [e for e in ok if e.source == source]
        ax.scatter(
            [e.seq + 1 for e in pts],
            [e.value for e in pts],
            s=18,
            color=colour,
            label=label,
            zorder=3,
        )
    if ok and goal != "explore":
        best: list[float] = []
        xs: list[int] = []
        cur: float | None = None
        for e in sorted(ok, key=lambda e: e.seq):
            v = float(e.value or 0.0)
            if cur is None or (v < cur if goal == "minimise" else v > cur):
                cur = v
            xs.append(e.seq + 1)
            best.append(cur)
        ax.step(xs, best, where="post", color="#d62728", lw=1.6, label="best so far", zorder=2)
    failed = [e for e in evals if e.state == EvalState.FAILED]
    if failed and ok:
        lo, hi = min(e.value or 0.0 for e in ok), max(e.value or 0.0 for e in ok)
        y = hi if goal == "minimise" else lo
        ax.scatter(
            [e.seq + 1 for e in failed],
            [y] * len(failed),
            marker="x",
            color="#ff7f0e",
            label="failed",
            zorder=3,
        )
    if spec.objective.reference is not None:
        ax.axhline(spec.objective.reference, color="#2ca02c", ls="--", lw=1, label="known optimum")
    if ok:
        values = [float(e.value or 0.0) for e in ok]
        if min(values) > 0 and max(values) / max(min(values), 1e-300) > 100:
            ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(spec.objective.field)
    what = spec.objective.service or "external"
    ax.set_title(f"{rec.name}: {what}, {goal} {spec.objective.field}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def posterior_plot(
    rec: CampaignRecord, evals: list[EvaluationRecord], opt: Any, path: Path
) -> Path | None:
    spec = rec.spec
    dims = spec.plot.dims or [p.name for p in spec.space if p.type != "categorical"][:2]
    if not dims:
        dims = [spec.space[0].name]
    ok = [e for e in evals if e.state == EvalState.SUCCEEDED and e.value is not None]
    if len(ok) < 2:
        return None
    goal = spec.objective.goal
    sign = 1.0 if goal == "maximise" else -1.0
    best = max(ok, key=lambda e: sign * float(e.value or 0.0)) if goal != "explore" else ok[-1]
    grid = opt.grid(dims, best.point)
    plt = _pyplot()
    params = {p.name: p for p in spec.space}
    fixed = {k: v for k, v in best.point.items() if k not in dims}
    note = ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)

    def coord(e: EvaluationRecord, name: str) -> float:
        p = params[name]
        v = e.point[name]
        return float((p.choices or []).index(v)) if p.type == "categorical" else float(v)

    for ax, key, title, cmap in (
        (axes[0], "mean", "posterior mean", "viridis"),
        (axes[1], "std", "posterior std", "magma"),
    ):
        if len(dims) == 2:
            x, y = grid["axes"]
            im = ax.pcolormesh(x, y, grid[key], shading="auto", cmap=cmap)
            fig.colorbar(im, ax=ax)
            ax.scatter(
                [coord(e, dims[0]) for e in ok],
                [coord(e, dims[1]) for e in ok],
                s=14,
                c="white",
                edgecolors="black",
                linewidths=0.6,
                label="evaluated",
            )
            if goal != "explore":
                ax.scatter(
                    [coord(best, dims[0])],
                    [coord(best, dims[1])],
                    marker="*",
                    s=160,
                    c="#d62728",
                    edgecolors="white",
                    label="best",
                )
            ax.set_xlabel(dims[0])
            ax.set_ylabel(dims[1])
            for name, axis in ((dims[0], ax.xaxis), (dims[1], ax.yaxis)):
                p = params[name]
                if p.type == "categorical":
                    axis.set_ticks(range(len(p.choices or [])))
                    axis.set_ticklabels([str(c) for c in p.choices or []])
                elif p.log:
                    (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
        else:
            (x,) = grid["axes"]
            ax.plot(x, grid[key], color="#1f77b4")
            if key == "mean":
                ax.fill_between(
                    x,
                    grid["mean"] - 2 * grid["std"],
                    grid["mean"] + 2 * grid["std"],
                    alpha=0.25,
                    color="#1f77b4",
                    label="±2 std",
                )
                ax.scatter(
                    [coord(e, dims[0]) for e in ok],
                    [e.value for e in ok],
                    s=14,
                    c="black",
                    label="evaluated",
                )
            ax.set_xlabel(dims[0])
            ax.set_ylabel(spec.objective.field if key == "mean" else "std")
            if params[dims[0]].log:
                ax.set_xscale("log")
        ax.set_title(title + (f" ({note})" if note else ""), fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{rec.name}: GP posterior after {len(ok)} measurements", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def front_plot(rec: CampaignRecord, evals: list[EvaluationRecord], path: Path) -> Path | None:
    """Several objectives: every measurement and the Pareto front, one panel per pair."""
    from steering.multi import front_of
    from steering.views import lookup

    spec = rec.spec
    objectives = spec.objectives or []
    front = front_of(spec, evals)
    if front is None:
        return None
    fields = [o.field for o in objectives]

    def values(e: EvaluationRecord) -> list[float | None]:
        return [e.value if f == spec.objective.field else lookup(e.result, f) for f in fields]

    measured = [v for e in evals if e.state == EvalState.SUCCEEDED for v in [values(e)]]
    measured = [v for v in measured if all(x is not None for x in v)]
    best = [[p["values"][f] for f in fields] for p in front["points"]]
    pairs = [(0, 1)] if len(fields) == 2 else [(0, 1), (0, 2), (1, 2)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), dpi=110)
    axes = [axes] if len(pairs) == 1 else list(axes)
    for ax, (i, j) in zip(axes, pairs, strict=True):
        ax.scatter(
            [v[i] for v in measured], [v[j] for v in measured], s=14, c="#8c8c8c", label="measured"
        )
        pts = sorted(best, key=lambda v: v[i])
        ax.scatter([v[i] for v in pts], [v[j] for v in pts], s=26, c="#d62728", label="front")
        if len(fields) == 2:
            ax.step([v[i] for v in pts], [v[j] for v in pts], where="post", color="#d62728")
        ref = front["reference_point"]
        if ref is not None:
            ax.scatter([ref[i]], [ref[j]], marker="x", c="black", label="reference point")
        ax.set_xlabel(f"{fields[i]} ({objectives[i].goal})")
        ax.set_ylabel(f"{fields[j]} ({objectives[j].goal})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{rec.name}: Pareto front of {len(best)} of {front['feasible']} feasible measurements, "
        f"hypervolume {front['hypervolume']:.4g}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(
    rec: CampaignRecord, evals: list[EvaluationRecord], opt: Any, folder: Path
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = [objective_plot(rec, evals, folder / "objective.png")]
    pareto = front_plot(rec, evals, folder / "front.png")
    if pareto is not None:
        out.append(pareto)
    post = posterior_plot(rec, evals, opt, folder / "posterior.png")
    if post is not None:
        out.append(post)
    return out
