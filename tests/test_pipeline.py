"""End to end through spineps_like.pipeline on the real TPTBox crops and phantoms."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from spineps_like.evaluation import evaluate
from spineps_like.io import load_scan
from spineps_like.pipeline import segment


def _overlap_map(pred: np.ndarray, gt: np.ndarray, ids: list[int]) -> dict[int, int]:
    """Each predicted id -> the reference id it overlaps most."""
    out = {}
    for i in ids:
        vals, counts = np.unique(gt[(pred == i) & (gt > 0)], return_counts=True)
        out[i] = int(vals[np.argmax(counts)]) if len(vals) else 0
    return out


@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_instance_phase_on_real_crops_reproduces_ground_truth(kind, request):
    sample = request.getfixturevalue(f"sample_{kind}")
    result = segment(sample["image"], semantic_mask=sample["semantic"], instance_method="geometric")
    gt = load_scan(sample["instance"], kind="mask")
    pred = result.instance.array
    assert result.instance.shape == gt.shape and np.allclose(result.instance.affine, gt.affine)
    m = evaluate(pred, gt.array, gt.spacing)
    assert m["vertebra.pq"] >= 0.9 and m["vertebra.rq"] == 1.0

    verts = [int(v) for v in np.unique(pred) if 0 < v < 100]
    to_gt = _overlap_map(pred, gt.array, verts)
    assert len(set(to_gt.values())) == len(verts)  # one to one
    # every IVD carries the id of the vertebra above it, as in the ground truth
    ivds = [int(v) for v in np.unique(pred) if 100 < v < 200]
    assert len(ivds) == len([v for v in np.unique(gt.array) if 100 < v < 200])
    for i, g in _overlap_map(pred, gt.array, ivds).items():
        assert g == 100 + to_gt[i - 100]
    # every endplate belongs to the vertebra whose corpus it touches most (its own; not the one above)
    sem = result.semantic.array
    for e in [int(v) for v in np.unique(pred) if v > 200]:
        grown = ndimage.binary_dilation(pred == e)
        owners, counts = np.unique(pred[grown & (sem == 49)], return_counts=True)
        assert owners[np.argmax(counts)] == e - 200
    # semantic and instance masks agree voxel for voxel
    assert np.array_equal(pred > 0, np.isin(sem, [41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 100, 26]))


def test_segment_cli_writes_spineps_outputs_and_nothing_partial(tmp_path, sample_ct):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spineps_like.cli", "segment", str(sample_ct["image"]),
                           "--semantic-mask", str(sample_ct["semantic"]), "--instance-method", "geometric",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    stem = "sub-ct_label-22_mod-ct"
    assert names == sorted([f"{stem}_seg-spine_msk.nii.gz", f"{stem}_seg-vert_msk.nii.gz",
                            f"{stem}_seg-spine_ctd.json", f"{stem}_seg-spine_snp.png",
                            f"{stem}_seg-spine_summary.json", f"{stem}_seg-spine_measurements.json",
                            f"{stem}_seg-spine_measurements.csv"])
    summary = json.loads((out / f"{stem}_seg-spine_summary.json").read_text())
    assert len(summary["vertebrae"]) == 3
    from TPTBox import POI

    poi = POI.load(out / f"{stem}_seg-spine_ctd.json")
    assert len(poi.keys()) == 3


def test_segment_cli_bad_scan_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("garbage")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "spineps_like.cli", "segment", str(bad), "--out", str(out),
                           "--instance-method", "geometric"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr
    assert not out.exists()


def test_segment_rejects_mask_on_another_grid(sample_ct, sample_mri):
    with pytest.raises(ValueError, match="grid differs"):
        segment(sample_ct["image"], semantic_mask=sample_mri["semantic"], instance_method="geometric")


def test_save_is_all_or_nothing(tmp_path, sample_ct, monkeypatch):
    result = segment(sample_ct["image"], semantic_mask=sample_ct["semantic"], instance_method="geometric")
    import spineps_like.snapshot as snap

    def broken(*a, **k):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(snap, "save_snapshot", broken)
    with pytest.raises(RuntimeError):
        result.save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_bundled_instance_model_on_held_out_phantom():
    """The bundled network instance phase, fed an exact semantic mask of a phantom it never saw."""
    from spineps_like.phantom import make_phantom
    from spineps_like.pipeline import instance_phase

    ph = make_phantom(900001, fov="lumbar", mode="t2w")
    _, ins, labeling = instance_phase(ph.semantic, method="network")
    m = evaluate(ins.array, ph.instance.array, ph.instance.spacing)
    assert m["vertebra.rq"] >= 0.9 and m["vertebra.pq"] >= 0.85
    assert m["ivd.pq"] >= 0.9
    assert labeling.anchor.startswith("sacrum")  # a lumbar FOV shows the sacrum: anatomical ids


def test_demo_runs_both_bundled_models(tmp_path, capsys):
    from spineps_like.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "full pipeline: vertebra PQ" in out and "instance phase on the ground-truth semantic mask" in out
    seg = next((tmp_path / "derivatives_seg").glob("*_seg-spine_msk.nii.gz"))
    sem = load_scan(seg, kind="mask").array
    assert (sem == 49).any()  # the undertrained semantic model still finds corpus voxels
