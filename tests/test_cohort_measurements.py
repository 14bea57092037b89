"""The cohort measurement table (issue 29): one row per scan x structure gathered from a real cohort run, scans
without measurements listed with the reason, CSV (and Parquet only where pyarrow is installed)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
from test_cohort_report import cohort_list

from spineps_like.cli import main as cli_main
from spineps_like.cohort import Manifest, ScanEntry
from spineps_like.cohort.report import summary_flags
from spineps_like.cohort.table import TABLE_NAME, write_table

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """`cohort run` on a T2w and a CT lumbar phantom (ground-truth semantic masks, geometric instances) and a
    corrupt file; the run writes the table at its end."""
    from spineps_like.phantom import write_phantoms

    root = tmp_path_factory.mktemp("cohort-measurements")
    images = write_phantoms(root / "ds", 1, seed=40, fov="lumbar", spacing=(2.0, 2.0, 4.0), orientation="RAS",
                            snapshot=False)
    images += write_phantoms(root / "ds", 1, seed=41, fov="lumbar", mode="ct", spacing=(2.0, 2.0, 4.0),
                             orientation="LPS", snapshot=False)
    corrupt = root / "broken_T2w.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    lst = cohort_list(root, images, corrupt)
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli_main(["cohort", "run", str(lst), "--out", str(out), "--instance-method", "geometric", "--no-snapshot",
                       "-q"])
    assert rc == 1  # the corrupt scan failed
    with Manifest(out / "cohort.sqlite", readonly=True) as m:
        rows = {r["key"]: dict(r) for r in m.rows()}
    return {"out": out, "rows": rows, "stdout": stdout.getvalue()}


def _outputs(row: dict) -> dict:
    return {k: v["path"] for k, v in json.loads(row["outputs"] or "{}").items()}


def test_cohort_run_writes_the_table(cohort):
    table = cohort["out"] / TABLE_NAME
    assert table.is_file() and f"measurements: {table}" in cohort["stdout"]
    assert {r["scan"] for r in _read_csv(table)} == set(cohort["rows"])


def test_table_rows_are_the_per_scan_measurement_files(cohort, tmp_path):
    target = tmp_path / "t.csv"
    table, paths = write_table(cohort["out"], target)
    assert paths == [target]
    got = _read_csv(target)
    done = [k for k, r in cohort["rows"].items() if r["state"] == "done"]
    assert len(done) == 2 and table.scans == 3
    for key in done:
        row = cohort["rows"][key]
        per_scan = _read_csv(Path(_outputs(row)["measurements_csv"]))
        mine = [r for r in got if r["scan"] == key]
        assert len(mine) == len(per_scan) > 10
        for t, expected in zip(mine, per_scan):  # same rows, same order, same values as written by segment
            if expected["structure"] == "canal":
                expected["name"] = expected["level"]  # the table names canal levels in 'name' too
            assert {k: t[k] for k in expected} == expected
            assert t["path"] == row["path"] and t["scan_state"] == "done" and t["problem"] == ""
    assert sum(r["scan"] in done for r in got) == len(got) - 1  # and the failed scan's row


def test_failed_scan_is_listed_with_its_error(cohort, capsys):
    assert cli_main(["cohort", "measurements", str(cohort["out"])]) == 0
    out, err = capsys.readouterr()
    failed = [k for k, r in cohort["rows"].items() if r["state"] == "failed"]
    assert len(failed) == 1
    assert out.splitlines()[0] == str(cohort["out"] / TABLE_NAME)
    assert "3 scans, 2 measured" in out and "1 without measurements" in out
    assert err.strip().count("\n") == 0 and failed[0] in err and "not a readable image" in err
    rows = [r for r in _read_csv(cohort["out"] / TABLE_NAME) if r["scan"] == failed[0]]
    assert len(rows) == 1 and rows[0]["structure"] == "" and rows[0]["scan_state"] == "failed"
    assert rows[0]["problem"].startswith("failed: ScanError") and "not a readable image" in rows[0]["problem"]


def test_rows_carry_confidence_flags_and_the_modality_s_fields(cohort):
    got = _read_csv(cohort["out"] / TABLE_NAME)
    for key, row in cohort["rows"].items():
        if row["state"] != "done":
            continue
        summary = json.loads(Path(_outputs(row)["summary"]).read_text())
        level = {v["name"]: v["confidence"]["level"] for v in summary["vertebrae"] if "confidence" in v}
        mine = [r for r in got if r["scan"] == key]
        verts = [r for r in mine if r["structure"] == "vertebra"]
        assert verts and all(r["confidence"] == level[r["name"]] for r in verts)
        assert {r["confidence"] for r in verts} & {"high", "medium", "low"}
        assert all(r["confidence"] == "" for r in mine if r["structure"] != "vertebra")
        assert {r["scan_flags"] for r in mine} == {";".join(summary_flags(summary))}
        complete = [r for r in verts if r["complete"] == "True"]
        hu = [r["trabecular_hu_mean"] for r in complete]
        if key.endswith("_mod-ct"):  # the CT phantom: trabecular HU in every complete body, no disc/CSF ratio
            assert complete and all(float(h) > 50 for h in hu)
            assert all(r["disc_csf_signal_ratio"] == "" for r in mine if r["structure"] == "disc")
        else:
            assert all(h == "" for h in hu)
            assert any(r["disc_csf_signal_ratio"] != "" for r in mine if r["structure"] == "disc")


def _manifest(out: Path, done_outputs: list[dict]) -> list[str]:
    entries = [ScanEntry(Path(f"/data/s{i}.nii.gz"), out / f"s{i}", f"s{i}") for i in range(len(done_outputs) + 1)]
    with Manifest(out / "cohort.sqlite") as m:
        m.add(entries)
        for e, outputs in zip(entries, done_outputs):
            m.mark_running(e.key, "w0")
            m.mark_done(e.key, outputs={k: {"path": str(p), "sha256": "", "bytes": 0} for k, p in outputs.items()})
    return [e.key for e in entries]


def test_scans_without_measurements_are_listed_with_the_reason(tmp_path, cohort):
    done = next(r for r in cohort["rows"].values() if r["state"] == "done")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    keys = _manifest(tmp_path, [{"measurements": _outputs(done)["measurements"]},
                                {"measurements": tmp_path / "gone.json"}, {"measurements": bad},
                                {"summary": _outputs(done)["summary"]}])
    table, _ = write_table(tmp_path)
    reasons = dict(table.missing)
    assert list(reasons) == keys[1:]
    assert reasons[keys[1]].startswith("measurements file missing") and reasons[keys[2]].startswith(
        "measurements file unreadable (JSONDecodeError)")
    assert reasons[keys[3]].startswith("no measurements written") and reasons[keys[4]] == "pending"
    rows = _read_csv(tmp_path / TABLE_NAME)
    assert [r["scan"] for r in rows if r["problem"]] == keys[1:]
    assert all(r["scan_flags"] == "summary unreadable" for r in rows if r["scan"] == keys[0])  # no summary recorded


@pytest.mark.skipif(HAVE_PYARROW, reason="pyarrow is installed: the Parquet test below runs instead")
def test_parquet_without_pyarrow_is_one_line_and_writes_nothing(cohort, tmp_path, capsys):
    csv_path, pq_path = tmp_path / "t.csv", tmp_path / "t.parquet"
    assert cli_main(["cohort", "measurements", str(cohort["out"]), "--csv", str(csv_path), "--parquet",
                     str(pq_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pyarrow" in err
    assert not csv_path.exists() and not pq_path.exists()


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed (not a dependency)")
def test_parquet_holds_the_csv_table(cohort, tmp_path):
    import pyarrow.parquet as pq

    table, _ = write_table(cohort["out"], tmp_path / "t.csv", tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert len(back) == len(table.rows) and [r["scan"] for r in back] == [r["scan"] for r in table.rows]


def test_no_manifest_is_one_line(tmp_path, capsys):
    assert cli_main(["cohort", "measurements", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cohort manifest" in err
    assert not (tmp_path / TABLE_NAME).exists()
