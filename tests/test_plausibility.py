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
    assert result_flags(ph.semantic.array, ph.instance.array, ph.semantic.spacing, complete,
                        affine=ph.semantic.affine) == []


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
    # one body alone, nothing of an arch and no canal: a blob, not a spine; with its arch or a canal it passes
    v = int(ins[sem == 49][0])
    lone = (ins == v) & np.isin(sem, (49, 52, 53))
    lone_sem, lone_ins = np.where(lone, sem, 0), np.where(lone, ins, 0)
    assert any("not a spine" in f for f in result_flags(lone_sem, lone_ins, sp))
    with_arch = ins == v
    assert not any("not a spine" in f for f in result_flags(np.where(with_arch, sem, 0), np.where(with_arch, ins, 0),
                                                             sp))
    # the column ends far above the bottom of the field of view without a sacrum (L3 down and the sacrum lost):
    # flagged when the affine tells where the bottom is; the whole phantom passes (test above)
    lost = np.isin(ins % 100, (22, 23, 24, 25, 26)) & (ins > 0)
    top_sem, top_ins = np.where(lost, 0, sem), np.where(lost, 0, ins)
    assert any("column ends" in f for f in result_flags(top_sem, top_ins, sp, affine=ph.semantic.affine))
    assert not any("column ends" in f for f in result_flags(top_sem, top_ins, sp))
    # a sacrum alone, every vertebra above it lost, while the field of view shows the lumbar spine's place: flagged;
    # the same sacrum in a field of view that starts at its top (a pelvis scan) passes
    sac = ins == 26
    sac_sem, sac_ins = np.where(sac, sem, 0), np.where(sac, ins, 0)
    assert any("sacrum without any vertebra" in f
               for f in result_flags(sac_sem, sac_ins, sp, affine=ph.semantic.affine))
    from spineps_like.geometry import oriented_view, reoriented_grid

    pir_sem, pir_ins = (oriented_view(a, ph.semantic.affine, "PIR") for a in (sac_sem, sac_ins))
    _, pir_aff = reoriented_grid(sac_sem.shape, ph.semantic.affine, "PIR")
    top = int(np.flatnonzero(pir_ins.any(axis=(0, 2)))[0])
    shift = np.eye(4)
    shift[1, 3] = top  # the cropped grid's first row is the sacrum's top row
    assert result_flags(pir_sem[:, top:], pir_ins[:, top:], tuple(np.linalg.norm(pir_aff[:3, :3], axis=0)),
                        affine=pir_aff @ shift) == []
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
    graded = [v for v in summary["vertebrae"] if v["id"] != 26]
    assert graded and all(v["confidence"]["level"] in ("high", "medium", "low") for v in graded)
    assert {v["confidence"]["id"]["anchor"] for v in graded} == {summary["labeling"]["anchor"]}
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


def _merge_two_bodies(ph):
    """The phantom's GT with two neighbouring lumbar vertebrae (and the disc between them) in one instance."""
    sem, ins = ph.semantic.array.copy(), ph.instance.array.copy()
    upper, lower = 21, 22  # L2, L3
    disc = ins == 100 + upper
    sem[disc] = 49
    ins[disc] = upper
    ins[ins == 200 + lower] = 200 + upper
    ins[ins == lower] = upper
    ins[ins == 100 + lower] = 100 + upper
    return sem, ins


def test_an_instance_spanning_two_bodies_is_flagged_and_graded_low():
    from spineps_like.labeling import label_vertebrae
    from spineps_like.measure import measure
    from spineps_like.plausibility import vertebra_confidence

    ph = make_phantom(5, fov="lumbar", spacing=FAST)
    sp = ph.semantic.spacing
    complete = {v["id"]: not v["cut"] for v in ph.meta["vertebrae"]}
    good = measure(ph.semantic.array, ph.instance.array, ph.semantic.affine, complete=complete)
    assert result_flags(ph.semantic.array, ph.instance.array, sp, complete, measurements=good) == []
    _, lab = label_vertebrae(ph.instance.array, ph.semantic.array, sp)
    conf = vertebra_confidence(lab, good)
    assert set(conf) == set(lab.order)
    assert all(c["body"]["level"] != "low" for c in conf.values())
    # anchored by the sacrum; medium where the labelling had to guess (here: the 6th vertebra up is cut, L6 or T12)
    want = "medium" if lab.ambiguous else "high"
    assert all(c["id"]["level"] == want and c["id"]["anchor"] == "sacrum" for c in conf.values())
    assert conf[24]["id"]["levels_from_anchor"] == 1  # L5 sits on the sacrum

    sem, ins = _merge_two_bodies(ph)
    bad = measure(sem, ins, ph.semantic.affine, complete=complete)
    flags = result_flags(sem, ins, sp, complete, measurements=bad)
    assert any("L2: body" in f and "several vertebral bodies" in f for f in flags)
    _, lab = label_vertebrae(ins, sem, sp)
    conf = vertebra_confidence(lab, bad)
    merged = [v for v, c in conf.items() if c["body"]["level"] == "low"]
    assert len(merged) == 1 and conf[merged[0]]["body"]["height_vs_neighbours"] > 1.9
    assert conf[merged[0]]["level"] == "low"


def test_ids_without_an_anchor_are_low_confidence():
    from spineps_like.labeling import label_vertebrae
    from spineps_like.plausibility import vertebra_confidence

    ph = make_phantom(5, fov="lumbar", spacing=FAST)
    sem = np.where(ph.semantic.array == 26, 0, ph.semantic.array)
    ins = np.where(ph.instance.array == 26, 0, ph.instance.array)
    _, lab = label_vertebrae(ins, sem, ph.semantic.spacing)
    conf = vertebra_confidence(lab, None)
    assert lab.anchor == "none" and conf
    assert all(c["id"]["level"] == "low" and c["level"] == "low" for c in conf.values())
    assert all(c["body"]["why"] == "not measured" for c in conf.values())
