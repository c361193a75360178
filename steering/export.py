"""A campaign's data as a table: one row per evaluation, one column per space parameter, then
the value, noise, state and provenance. CSV always; Parquet where pyarrow is installed (it is
not a dependency of sciorch)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from steering.models import CampaignRecord, EvaluationRecord

BASE_COLUMNS = ["seq", "point_id", "source", "state"]
TAIL_COLUMNS = [
    "value",
    "noise_variance",
    "entry_id",
    "attempts",
    "reason",
    "decision_s",
    "asked_at",
    "finished_at",
]


def columns(rec: CampaignRecord) -> list[str]:
    return [*BASE_COLUMNS, *(p.name for p in rec.spec.space), *TAIL_COLUMNS]


def rows(rec: CampaignRecord, evals: list[EvaluationRecord]) -> list[dict[str, Any]]:
    out = []
    for e in evals:
        row: dict[str, Any] = {
            "seq": e.seq,
            "point_id": e.point_id,
            "source": e.source,
            "state": e.state.value,
        }
        for p in rec.spec.space:
            row[p.name] = e.point.get(p.name)
        row.update(
            value=e.value,
            noise_variance=e.noise,
            entry_id=e.entry_id,
            attempts=e.attempt,
            reason=e.reason,
            decision_s=e.decision_s,
            asked_at=e.asked_at.isoformat(),
            finished_at=e.finished_at.isoformat() if e.finished_at else None,
        )
        out.append(row)
    return out


def to_csv(cols: list[str], data: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: "" if v is None else _cell(v) for k, v in row.items()})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, dict | list) else v


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def write_parquet(path: Path, cols: list[str], data: list[dict[str, Any]]) -> None:
    import pyarrow as pa  # type: ignore[import-not-found, unused-ignore]
    import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]

    table = pa.Table.from_pylist(
        [{k: _cell(v) if isinstance(v, dict | list) else v for k, v in r.items()} for r in data],
        schema=None,
    ).select(cols)
    pq.write_table(table, str(path))
