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

from steering.models import CampaignRecord, EvaluationRecord, EvaluationView

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
        view = EvaluationView.of(e).model_dump()
        point = view.pop("point")
        # CSV and Parquet cells: the state's name, times as ISO 8601
        view["state"] = e.state.value
        view["asked_at"] = e.asked_at.isoformat()
        view["finished_at"] = e.finished_at.isoformat() if e.finished_at else None
        row = {c: view[c] for c in BASE_COLUMNS}
        row.update((p.name, point.get(p.name)) for p in rec.spec.space)
        row.update((c, view[c]) for c in TAIL_COLUMNS)
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
