"""The cohort's measurement table: one row per scan x structure over a cohort output folder (issue 29).

Written by ``spineps-like cohort measurements OUT`` and at the end of every ``cohort run``
(``OUT/cohort_measurements.csv``). Every scan of the manifest is in it: a done scan gives the rows of its
``..._seg-spine_measurements.json`` (the rows of its per-scan CSV, :func:`spineps_like.measure.measurements_table`),
with the scan's id and state in front and, behind, the vertebra's confidence level and the scan's flags (those of the
cohort report and the QC picture). A scan without measurements (failed, pending, running, semantic only, its file
gone or unreadable) gives one row with an empty ``structure`` and the reason in ``problem``: it is listed, never
dropped. Units are in the column names (``_mm``, ``_mm2``, ``_mm3``, ``_deg``, ``_hu``, ``_au``; docs/measurements.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from spineps_like.cohort.manifest import MANIFEST_NAME, Manifest

TABLE_NAME = "cohort_measurements.csv"
#: Columns every row starts with, and those it ends with.
LEAD_COLUMNS = ("scan", "path", "scan_state", "structure", "name")
TAIL_COLUMNS = ("confidence", "scan_flags", "problem")


def load_measurements(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(measurements, None) of a done manifest row, else (None, why there are none)."""
    state = row["state"]
    if state != "done":
        error = (row.get("error") or "").strip()
        return None, f"{state}: {error}" if state == "failed" and error else state
    outputs = json.loads(row.get("outputs") or "{}")
    path = (outputs.get("measurements") or {}).get("path")
    if not path:
        return None, "no measurements written (semantic only, or no instance phase)"
    try:
        return json.loads(Path(path).read_text()), None
    except FileNotFoundError:
        return None, f"measurements file missing: {path}"
    except (OSError, ValueError) as e:
        return None, f"measurements file unreadable ({type(e).__name__}): {path}"


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    path = (json.loads(row.get("outputs") or "{}").get("summary") or {}).get("path")
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def scan_table_rows(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The table's rows of one manifest row, and the problem when it has no measurements (then one row)."""
    from spineps_like.cohort.report import summary_flags
    from spineps_like.measure import measurements_table

    lead = {"scan": row["key"], "path": row["path"], "scan_state": row["state"]}
    m, problem = load_measurements(row)
    if m is None:
        return [{**lead, "structure": None, "name": None, "problem": problem}], problem
    summary = _summary(row)
    flags = ";".join(summary_flags(summary)) if summary else "summary unreadable"
    confidence = {r.get("name"): (r.get("confidence") or {}).get("level") for r in summary.get("vertebrae") or []}
    out = []
    for rec in measurements_table(m, **lead):
        rec.setdefault("name", rec.get("level"))  # canal levels carry 'level'
        rec["confidence"] = confidence.get(rec["name"]) if rec["structure"] == "vertebra" else None
        out.append({**rec, "scan_flags": flags, "problem": None})
    return out, None


@dataclass
class CohortTable:
    """The rows of the table and the scans without measurements: [(key, reason)]."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    scans: int = 0

    @property
    def columns(self) -> list[str]:
        """Lead columns, then the measurements' in first-seen order, then the tail columns."""
        cols = dict.fromkeys(LEAD_COLUMNS)
        for r in self.rows:
            cols.update((k, None) for k in r if k not in TAIL_COLUMNS)
        return [*cols, *TAIL_COLUMNS]


def cohort_table(manifest_rows: Iterable[Mapping[str, Any]]) -> CohortTable:
    """The table of every manifest row (see the module docstring)."""
    table = CohortTable()
    for r in manifest_rows:
        rows, problem = scan_table_rows(dict(r))
        table.rows += rows
        table.scans += 1
        if problem is not None:
            table.missing.append((r["key"], problem))
    return table


def _csv_text(table: CohortTable) -> str:
    import csv
    import io

    cols = table.columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows([r.get(k) for k in cols] for r in table.rows)  # None is written as an empty field
    return buf.getvalue()


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: Parquet needs pyarrow, which is not installed (pip install pyarrow); the CSV "
                         "holds the same table") from None
    return pyarrow


def _write_parquet(table: CohortTable, path: Path) -> None:
    from spineps_like.io import atomic_path

    pa = _pyarrow(path)

    cols = {c: [r.get(c) for r in table.rows] for c in table.columns}
    arrays = {}
    for c, vals in cols.items():  # a column of numbers and text (rare) is written as text
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[c] = pa.array([None if v is None else str(v) for v in vals])
    with atomic_path(path) as tmp:
        pa.parquet.write_table(pa.table(arrays), str(tmp))


def write_table(out_dir: str | os.PathLike, csv_path: str | os.PathLike | None = None,
                parquet_path: str | os.PathLike | None = None) -> tuple[CohortTable, list[Path]]:
    """Write the measurement table of the cohort output folder ``out_dir`` as CSV (default
    ``out_dir/cohort_measurements.csv``) and, when asked, Parquet (needs pyarrow), atomically; returns the table
    and the paths written. A folder without a manifest is a ValueError."""
    from spineps_like.cohort.run import open_manifest_summary
    from spineps_like.io import atomic_write_text

    out_dir = Path(out_dir).expanduser()
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{out_dir}: no cohort manifest ({MANIFEST_NAME}) here")
    open_manifest_summary(path)  # a file that is not a manifest: a one-line CohortError
    if parquet_path is not None:
        _pyarrow(Path(parquet_path))  # before anything is written
    with Manifest(path, readonly=True) as m:
        table = cohort_table(m.rows())
    written = [atomic_write_text(Path(csv_path) if csv_path is not None else out_dir / TABLE_NAME,
                                 _csv_text(table))]
    if parquet_path is not None:
        _write_parquet(table, Path(parquet_path))
        written.append(Path(parquet_path))
    return table, written
