"""A campaign's data as a table: one row per evaluation, one column per space parameter, then
the value, noise, state and provenance. CSV always; Parquet with the `parquet` extra (pyarrow,
not a dependency of sciorch otherwise). The same writers export search_results' rows."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ground.errors import InvalidInput
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


PARQUET_EXTRA = "Parquet needs pyarrow: pip install 'sciorch[parquet]'"


def parquet_available() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def require_parquet(field: str) -> None:
    """InvalidInput naming `field` and the extra to install, where pyarrow is missing."""
    if not parquet_available():
        raise InvalidInput(f"{PARQUET_EXTRA} (or write CSV)", field=field)


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def typed(cols: list[str], data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows read back from CSV (every cell a string) with their numbers again: a column whose
    filled cells all read as integers holds ints, as numbers floats; empty cells are None."""
    out = [{k: (None if v == "" else v) for k, v in r.items()} for r in data]
    for c in cols:
        parsed = {i: _number(v) for i, r in enumerate(out) if isinstance(v := r.get(c), str)}
        if not parsed or any(n is None for n in parsed.values()):
            continue
        floats = any(isinstance(n, float) for n in parsed.values())
        for i, n in parsed.items():
            out[i][c] = float(n) if floats and n is not None else n
    return out


def write_parquet(path: Path, cols: list[str], data: list[dict[str, Any]]) -> None:
    """One typed column each: numbers as int64/double, `*_at` ISO times as UTC timestamps,
    text as strings; dicts and lists, and a column whose cells mix types, as JSON text."""
    try:
        import pyarrow as pa  # type: ignore[import-not-found, unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise InvalidInput(PARQUET_EXTRA, field="format") from exc

    arrays = []
    for c in cols:
        values = [_cell(r.get(c)) for r in data]
        if c.endswith("_at") and all(isinstance(v, str | None) for v in values):
            values = [None if v is None else datetime.fromisoformat(v) for v in values]
            arrays.append(pa.array(values, type=pa.timestamp("us", tz="UTC")))
            continue
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([None if v is None else json.dumps(v) for v in values]))
    pq.write_table(pa.Table.from_arrays(arrays, names=cols), str(path))
