"""Checks after the work: a real spine passes, garbage is flagged in the summary and by the exit code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spineps_like.phantom import make_phantom
from spineps_like.plausibility import advisories, result_flags

FAST = (1.3, 1.3, 3.9)


@pytest.mark.parametrize("fov,variant", [("lumbar", None), ("cervical", None), ("whole", "t13"),
                                         ("lumbar", "collapsed"), ("thoracic", None)])
def test_ground_truth_spines_pass(fov, variant):
    ph = make_phantom(5, fov=fov, variant=variant, spacing=FAST)
    complete = {v["id"]: not v["cut"] for v in ph.meta["vertebrae"]}
    assert result_flags(ph.semantic.array, ph.instance.array, ph.semantic.spacing, complete) == []


def test_garbage_is_flagged():
    ph = make_phantom(5, fov="lumbar", spacing=FAST)
    sem, ins, sp = ph.semantic.array, ph.instance.array, ph.semantic.spacing
    no_canal = np.where(np.isin(sem, (60, 61)), 0, sem)
    assert result_flags(no_canal, ins, sp) == []  # a label set without the canal: advisory, not implausible
    assert any("no spinal canal" in f for f in advisories(no_canal, ins)) and advisories(sem, ins) == []
    # the same masks read at a tenth of their voxel size: bodies far too small, vertebrae far too close
    tiny = result_flags(sem, ins, tuple(s / 10 for s in sp))
    assert any("vertebral body of" in f for f in tiny) and any("apart" in f for f in tiny)
    # vertebrae without bodies
    no_body = np.where(np.isin(sem, (49, 52, 53)), 41, sem)
    assert any("hold a vertebral body" in f for f in result_flags(no_body, ins, sp))
    # nothing found: nothing to flag (the empty result speaks for itself)
    assert result_flags(np.zeros_like(sem), np.zeros_like(ins), sp) == []
    with pytest.raises(ValueError, match="differ in shape"):
        result_flags(sem, ins[:-1], sp)


def test_cli_exit_code_and_summary_for_an_implausible_result(tmp_path, monkeypatch, capsys):
    """A result with flags: written, flagged in the summary and on stderr, exit 3 (0 with --allow-implausible)."""
    from spineps_like import cli, plausibility
    from spineps_like.io import save_mask, save_scan

    ph = make_phantom(5, fov="lumbar", spacing=FAST)
    save_scan(ph.image, tmp_path / "sub-01_T2w.nii.gz")
    save_mask(ph.semantic, tmp_path / "sem.nii.gz")
    monkeypatch.setattr(plausibility, "CORPUS_CM3", {"C": (0.1, 0.2), "T": (0.1, 0.2), "L": (0.1, 0.2)})
    argv = ["segment", str(tmp_path / "sub-01_T2w.nii.gz"), "--semantic-mask", str(tmp_path / "sem.nii.gz"),
            "--instance-method", "geometric", "--no-snapshot", "--quiet"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 3
    err = capsys.readouterr().err
    assert "implausible result" in err and "vertebral body of" in err
    summary = json.loads(next((tmp_path / "a").rglob("*summary.json")).read_text())
    assert summary["plausibility"]["plausible"] is False and summary["plausibility"]["flags"]
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--allow-implausible"]) == 0
    monkeypatch.undo()
    assert cli.main(argv + ["--out", str(tmp_path / "c")]) == 0
    summary = json.loads(next((tmp_path / "c").rglob("*summary.json")).read_text())
    assert summary["plausibility"] == {"plausible": True, "flags": [], "advisories": []}


@pytest.mark.parametrize("kind", ["noise", "smooth blobs"])
def test_no_confident_spine_in_noise(tmp_path, kind, capsys):
    """An image of pure noise or smooth random blobs passes the signal checks and reaches the default model; whatever
    it paints, segment must not answer with exit 0 and an unflagged spine."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from spineps_like import cli

    rng = np.random.default_rng(0)
    arr = rng.normal(100, 20, (15, 200, 200))
    if kind != "noise":
        arr = ndi.gaussian_filter(rng.normal(0, 1, arr.shape), (1, 8, 8)) * 100 + 500
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([3.3, 1.0, 1.0, 1.0])), str(path))
    code = cli.main(["segment", str(path), "--out", str(tmp_path / "out"), "--no-snapshot", "--quiet"])
    summary = list((tmp_path / "out").rglob("*summary.json"))
    if code == 0:  # only acceptable when nothing was found
        data = json.loads(summary[0].read_text())
        assert not [v for v in data["vertebrae"] if v["id"] != 26], data["vertebrae"]
    else:
        assert code == 3 and "implausible result" in capsys.readouterr().err
