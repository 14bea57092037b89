"""Cohort processing: discovery, manifest, resume, failure isolation, local pool and Ray executors."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spineps_like.cohort import Cohort, CohortError, Manifest, discover_scans, format_summary
from spineps_like.cohort.run import clean_partial_files, main as cohort_cli, run_lock
from spineps_like.io import load_scan
from spineps_like.pipeline import segment

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import cohort_helpers  # noqa: E402

GEOMETRIC = {"instance_method": "geometric"}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict:
    """Three small lumbar phantoms (BIDS layout), their ground-truth semantic masks, and a CSV listing both."""
    from spineps_like.phantom import write_phantoms

    root = tmp_path_factory.mktemp("cohort-data")
    images = write_phantoms(root / "ds", 3, seed=0, fov="lumbar", spacing=(2.0, 2.0, 4.0), orientation="random",
                            snapshot=False)
    masks = [next((root / "ds" / "derivatives_gt" / p.parent.parent.name).glob("*_seg-spine_msk.nii.gz"))
             for p in images]
    return {"root": root, "dataset": root / "ds", "images": images, "masks": masks}


def _write_csv(path: Path, rows: list[tuple[Path, Path | None]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "semantic_mask"])
        for img, mask in rows:
            w.writerow([os.path.relpath(img, path.parent), os.path.relpath(mask, path.parent) if mask else ""])
    return path


@pytest.fixture(scope="module")
def semantic_model_dir(tmp_path_factory) -> Path:
    """A tiny nnU-Net semantic model with random weights on the phantoms' grid (fast: few sliding windows)."""
    from spineps_like.training.semantic import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", labels=(41, 49, 60, 61, 100),
                              spacing_pir=(2.0, 2.0, 4.0), patch_pir=(64, 96, 32),
                              resolution_range=((2.0, 2.0, 4.0), (2.0, 2.0, 4.0)))


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float arithmetic as single-threaded workers
    yield
    torch.set_num_threads(before)


def _reference(tmp: Path, rows, **settings) -> dict[str, bytes]:
    """Outputs of single-scan segment() + SegmentResult.save(), by file name: masks and centroids."""
    out = {}
    for img, mask in rows:
        res = segment(img, semantic_mask=mask, **settings)
        for kind, p in res.save(tmp / "ref" / img.parent.parent.name, name_from=img, snapshot=False).items():
            if kind != "summary":  # the summary holds timings
                out[p.name] = p.read_bytes()
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "derivatives_seg").rglob("*") if p.is_file()
            and "summary" not in p.name}


def _rows(manifest: Path) -> dict[str, dict]:
    with Manifest(manifest) as m:
        return {r["key"]: dict(r) for r in m.rows()}


# ------------------------------------------------------------------------------------------------ discovery
def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_discovery_bids_folder_glob_and_csv(tmp_path):
    ds = tmp_path / "bids"
    a = _touch(ds / "rawdata" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_acq-sag_T2w.nii.gz")
    b = _touch(ds / "rawdata" / "sub-02" / "anat" / "sub-02_acq-sag_T1w.mha")
    _touch(ds / "rawdata" / "sub-02" / "anat" / "sub-02_acq-sag_T2w_msk.nii.gz")          # a mask
    _touch(ds / "rawdata" / "sub-02" / "anat" / "sub-02_acq-sag_seg-spine_msk.nii.gz")     # a segmentation
    _touch(ds / "rawdata" / "sub-02" / "dwi" / "sub-02_dwi.nii.gz")                        # not anatomical
    _touch(ds / "rawdata" / "sub-02" / "anat" / ".sub-02_T2w.nii.gz.x1.part.nii.gz")       # temporary file
    _touch(ds / "derivatives_seg" / "sub-01" / "sub-01_ses-1_acq-sag_T2w.nii.gz")          # derivatives
    out = tmp_path / "out"
    entries = discover_scans(ds, out)
    assert [e.path for e in entries] == [a.resolve(), b.resolve()]
    assert entries[0].out_dir == out.resolve() / "derivatives_seg" / "sub-01" / "ses-1"
    assert entries[0].output_path("spine", "msk", ".nii.gz").name == "sub-01_ses-1_acq-sag_mod-T2w_seg-spine_msk.nii.gz"
    assert entries[1].out_dir == out.resolve() / "derivatives_seg" / "sub-02"
    assert [e.path for e in discover_scans(ds, out, modalities=["t1w"])] == [b.resolve()]

    # plain folders: the same file name in two folders gets two output folders, no collision
    plain = tmp_path / "plain"
    x = _touch(plain / "siteA" / "scan.nii.gz")
    y = _touch(plain / "siteB" / "scan.nii.gz")
    e = discover_scans(plain, out)
    assert [i.path for i in e] == [x.resolve(), y.resolve()] and len({i.key for i in e}) == 2
    assert {i.out_dir.name for i in e} == {"siteA", "siteB"}
    assert [i.path for i in discover_scans(str(plain / "**" / "*.nii.gz"), out)] == [x.resolve(), y.resolve()]

    lst = _write_csv(tmp_path / "list.csv", [(y, None), (a, x)])
    e = {i.path: i for i in discover_scans(lst, out)}
    assert set(e) == {a.resolve(), y.resolve()} and e[a.resolve()].semantic_mask == x.resolve()
    assert e[a.resolve()].out_dir == entries[0].out_dir  # BIDS layout, wherever the list points
    # a list of inputs, overlapping: each scan once
    assert len(discover_scans([ds, str(a)], out)) == 2


def test_discovery_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        discover_scans(tmp_path / "missing", tmp_path / "out")
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.nii.gz\n")
    with pytest.raises(ValueError, match="'path' column"):
        discover_scans(bad, tmp_path / "out")
    gone = tmp_path / "gone.csv"
    gone.write_text("path\nnot-there.nii.gz\n")
    with pytest.raises(ValueError, match="line 2: scan .*not-there.nii.gz not found"):
        discover_scans(gone, tmp_path / "out")
    _touch(tmp_path / "d" / "scan.nii.gz")
    _touch(tmp_path / "d" / "scan.mha")
    with pytest.raises(ValueError, match="would write the same outputs"):
        discover_scans(tmp_path / "d", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown segment setting"):
        Cohort(tmp_path / "d", tmp_path / "out", semantic_modle="x")
    with pytest.raises(ValueError, match="unknown executor"):
        Cohort(tmp_path / "d", tmp_path / "out", executor="slurm")
    _touch(tmp_path / "empty" / "only_msk.nii.gz")
    with pytest.raises(ValueError, match="no scans found"):
        Cohort(tmp_path / "empty", tmp_path / "out").run(progress=False)


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_states_checksums_and_summary(tmp_path):
    for name in ("a", "b", "c"):
        _touch(tmp_path / "in" / f"{name}.nii.gz")
    entries = discover_scans(tmp_path / "in", tmp_path / "out")
    with Manifest(tmp_path / "m.sqlite") as m:
        assert m.add(entries) == 3 and m.add(entries) == 0
        assert m._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ka, kb, kc = (e.key for e in entries)
        out = tmp_path / "o.nii.gz"
        out.write_bytes(b"mask")
        from spineps_like.cohort.manifest import describe_outputs

        m.mark_running(ka, "w1")
        m.mark_done(ka, outputs=describe_outputs({"semantic": out}), seconds=1.0)
        m.mark_running(kb, "w1")
        m.mark_failed(kb, "ScanError: b.nii.gz: not a readable image\nmore lines", traceback_path="/tb.txt")
        m.mark_running(kc, "w2")  # and the run dies here
        assert m.counts() == {"pending": 0, "running": 1, "done": 1, "failed": 1}
        assert m.recover_interrupted() == [kc]
        assert m.check_done(mode="checksum") == []
        out.write_bytes(b"MASK")  # same size, other content: only the checksum sees it
        assert m.check_done(mode="size") == []
        assert m.check_done(mode="checksum") == [ka]
        assert m.reset_failed() == 1
        assert m.counts() == {"pending": 3, "running": 0, "done": 0, "failed": 0}
        assert m.get(kb)["attempts"] == 1 and m.get(kb)["error"] == "ScanError: b.nii.gz: not a readable image"
        m.mark_failed(kb, "ValueError: boom")
        text = format_summary(m.summary())
    assert "3 scans: 0 done, 1 failed, 2 pending" in text and f"FAILED {kb}: ValueError: boom" in text


def test_manifest_is_safe_with_concurrent_writer_processes(tmp_path):
    import multiprocessing as mp

    for i in range(60):
        _touch(tmp_path / "in" / f"scan{i:02d}.nii.gz")
    entries = discover_scans(tmp_path / "in", tmp_path / "out")
    db = tmp_path / "m.sqlite"
    with Manifest(db) as m:
        m.add(entries)
    keys = [e.key for e in entries]
    with mp.get_context("spawn").Pool(2) as pool:
        n = pool.starmap(cohort_helpers.mark_many, [(str(db), keys[0::2], "w0"), (str(db), keys[1::2], "w1")])
    assert n == [30, 30]
    rows = _rows(db)
    assert all(r["state"] == "done" and r["attempts"] == 1 for r in rows.values())
    assert {r["worker"] for r in rows.values()} == {"w0", "w1"}


# ------------------------------------------------------------------------------------------------ runs
def test_in_process_cohort_is_byte_identical_resumes_and_isolates_failures(tmp_path, phantoms, capsys):
    rows = list(zip(phantoms["images"], phantoms["masks"]))
    data = tmp_path / "data"
    for img, _ in rows:  # the cohort also holds a corrupt scan
        shutil.copy(img, _touch(data / img.name))
    corrupt = data / "sub-phantom9999_acq-sag_T2w.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    lst = _write_csv(tmp_path / "list.csv", [(data / i.name, m) for i, m in rows] + [(corrupt, rows[0][1])])
    out = tmp_path / "out"
    summary = Cohort(lst, out, snapshot=False, **GEOMETRIC).run(progress=False)
    assert summary["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 1}
    fail = summary["failures"][0]
    assert str(corrupt) in fail["error"] and fail["error"].startswith("ScanError")
    assert "Traceback" in Path(fail["traceback"]).read_text()
    ref = _reference(tmp_path, [(data / i.name, m) for i, m in rows], **GEOMETRIC)
    assert _outputs(out) == ref and len(ref) == 15  # masks, centroids, measurements (JSON, CSV), byte for byte

    # resume: nothing redone; an output changed on disk is redone; the failure stays failed without --retry-failed
    vert = next((out / "derivatives_seg").rglob("*phantom0001*_seg-vert_msk.nii.gz"))
    good = vert.read_bytes()
    vert.write_bytes(good[:-1])
    rc = cohort_cli(["run", str(lst), "--out", str(out), "--instance-method", "geometric", "--no-snapshot", "-q"])
    assert rc == 1  # the corrupt scan is still failed
    printed = capsys.readouterr().out
    assert "1 done, 0 failed, 2 already done" in printed and "FAILED" in printed
    assert vert.read_bytes() == good
    rows_ = _rows(out / "cohort.sqlite")
    assert sorted(r["attempts"] for r in rows_.values()) == [1, 1, 1, 2]
    rc = cohort_cli(["run", str(lst), "--out", str(out), "--instance-method", "geometric", "--no-snapshot", "-q",
                     "--retry-failed"])
    assert rc == 1 and max(r["attempts"] for r in _rows(out / "cohort.sqlite").values()) == 2
    assert cohort_cli(["status", str(out)]) == 1
    assert "1 failed" in capsys.readouterr().out

    # only one run per output folder
    with run_lock(out), pytest.raises(CohortError, match="another cohort run"):
        Cohort(lst, out, **GEOMETRIC).run(progress=False)


def test_local_pool_loads_models_once_per_worker_and_survives_a_killed_worker(tmp_path, phantoms,
                                                                             semantic_model_dir, one_thread):
    from spineps_like.models import load_semantic_model

    settings = {"semantic_model": str(semantic_model_dir), "semantic_only": True, "step_size": 1.0}
    out = tmp_path / "out"
    (tmp_path / "markers").mkdir()
    fn = functools.partial(cohort_helpers.segment_with_faults, marker_dir=str(tmp_path / "markers"),
                           kill_name="phantom0001")
    summary = Cohort(phantoms["dataset"], out, workers=2, snapshot=False, segment_fn=fn, **settings).run(
        progress=False)
    assert summary["counts"]["done"] == 3 and summary["counts"]["failed"] == 0
    model = load_semantic_model(semantic_model_dir)
    ref = _reference(tmp_path, [(i, None) for i in phantoms["images"]], semantic_model=model, semantic_only=True,
                     step_size=1.0)
    assert _outputs(out) == ref and len(ref) == 3
    assert (tmp_path / "markers" / f"killed-{phantoms['images'][1].name}").exists()
    rows = _rows(out / "cohort.sqlite")
    assert sorted(r["attempts"] for r in rows.values()) == [1, 1, 2]  # the killed one ran again
    # every worker process got a loaded model, one and the same object for all its scans
    calls = list((tmp_path / "markers").glob("calls-*.txt"))
    assert len(calls) >= 2
    for f in calls:
        seen = {tuple(line.split()[1:]) for line in f.read_text().splitlines()}
        assert len(seen) == 1 and next(iter(seen))[1] == "SemanticModel"


def test_ray_cohort_is_byte_identical_and_retries_a_killed_actor(tmp_path, phantoms):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'spineps-like[ray]'")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(cohort_helpers)
    rows = list(zip(phantoms["images"], phantoms["masks"]))
    lst = _write_csv(tmp_path / "list.csv", rows)
    (tmp_path / "markers").mkdir()
    fn = functools.partial(cohort_helpers.segment_with_faults, marker_dir=str(tmp_path / "markers"),
                           kill_name="phantom0000")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = Cohort(lst, tmp_path / "out", workers=2, executor="ray", snapshot=False, segment_fn=fn,
                         max_task_retries=2, **GEOMETRIC).run(progress=False)
    finally:
        ray.shutdown()
    assert summary["counts"]["done"] == 3 and summary["counts"]["failed"] == 0
    assert (tmp_path / "markers" / f"killed-{rows[0][0].name}").exists()  # the actor did die once
    assert _outputs(tmp_path / "out") == _reference(tmp_path, rows, **GEOMETRIC)


def test_cli_run_killed_midway_resumes_without_loss_or_duplicates(tmp_path, phantoms):
    rows = []
    for site in ("siteA", "siteB"):  # the same file names in two folders: six scans, six output folders
        for img, mask in zip(phantoms["images"], phantoms["masks"]):
            rows.append((shutil.copy(img, _touch(tmp_path / "data" / site / img.parent.parent.name / img.name)),
                         mask))
    rows = [(Path(i), m) for i, m in rows]
    lst = _write_csv(tmp_path / "data" / "list.csv", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spineps_like.cohort", "run", str(lst), "--out", str(out), "--instance-method",
           "geometric", "--no-snapshot", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = out / "cohort.sqlite"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    done = c.execute("SELECT COUNT(*) FROM scans WHERE state = 'done'").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 1:
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {k: r for k, r in _rows(db).items()}
    n_done_first = sum(r["state"] == "done" for r in first.values())
    assert 1 <= n_done_first < 6, "the run was not killed midway"
    # what a kill in the middle of an atomic write leaves behind
    some_dir = Path(next(iter(first.values()))["out_dir"])
    partial = _touch(some_dir / ".sub-x_seg-vert_msk.nii.gz.abc123.part.nii.gz")

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not partial.exists() and not list(out.rglob(".*part*"))
    final = _rows(db)
    assert len(final) == 6 and all(r["state"] == "done" for r in final.values())
    for key, r in final.items():
        # done in the first run: not redone; the rest exactly once more
        assert r["attempts"] == (1 if first[key]["state"] == "done" else first[key]["attempts"] + 1)
        files = sorted(p.name for p in Path(r["out_dir"]).iterdir())
        # spine, vert, ctd, summary, measurements (.json, .csv)
        assert len(files) == 6 and all(not f.startswith(".") for f in files)
        for rec in json.loads(r["outputs"]).values():
            assert Path(rec["path"]).exists()
    masks = sorted(out.rglob("*_seg-vert_msk.nii.gz"))
    assert len(masks) == 6
    a, b = (load_scan(p, kind="mask").array for p in (masks[0], masks[3]))  # siteA and siteB copies of one scan
    assert np.array_equal(a, b)
    assert clean_partial_files(out) == []


def test_cohort_assume_orientation_reads_headerless_scans_and_notes_it(tmp_path, phantoms, capsys):
    """A NIfTI with neither qform nor sform fails in a cohort (one line naming --assume-orientation); with
    --assume-orientation it is read with those axes, and its summary notes what was assumed."""
    import nibabel as nib

    from spineps_like.cohort.run import main as cohort_cli

    src_img, src_mask = nib.load(str(phantoms["images"][0])), nib.load(str(phantoms["masks"][0]))
    folder = tmp_path / "in"
    folder.mkdir()
    for name, src in (("sub-01_T2w.nii.gz", src_img), ("sub-01_msk.nii.gz", src_mask)):
        img = nib.Nifti1Image(np.asanyarray(src.dataobj), np.diag([*src.header.get_zooms()[:3], 1.0]))
        img.header.set_qform(None, code=0)
        img.header.set_sform(None, code=0)
        nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), None, img.header.copy()), str(folder / name))
    rows = [(folder / "sub-01_T2w.nii.gz", folder / "sub-01_msk.nii.gz")]
    lst = _write_csv(tmp_path / "list.csv", rows)
    argv = ["run", str(lst), "--instance-method", "geometric", "--no-snapshot", "--quiet"]
    assert cohort_cli(argv + ["--out", str(tmp_path / "a")]) == 1
    failed = _rows(tmp_path / "a" / "cohort.sqlite")
    assert [r["state"] for r in failed.values()] == ["failed"]
    assert "--assume-orientation" in next(iter(failed.values()))["error"]
    assert cohort_cli(argv + ["--out", str(tmp_path / "b"), "--assume-orientation", "RAS"]) == 0
    summary = json.loads(next((tmp_path / "b").rglob("*summary.json")).read_text())
    assert any("assumed RAS" in n for n in summary["notes"])
    assert summary.get("vertebrae")
