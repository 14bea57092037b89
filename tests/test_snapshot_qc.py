"""The per-scan QC picture: sagittal + coronal planes, vertebra names at their bodies, the summary's flags drawn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spineps_like.geometry import reorient
from spineps_like.io import Scan
from spineps_like.snapshot import SEVERITY_COLOURS, missing_levels, qc_marks, save_snapshot, snapshot_figure

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_spine import make_spine  # noqa: E402

BODY = (49, 50, 52, 53, 62)


def _body_centre(semantic: np.ndarray, instance: np.ndarray, v: int) -> np.ndarray:
    """Centre of the vertebra's body voxels, or of the whole vertebra when it has none (the sacrum)."""
    body = (instance == v) & np.isin(semantic, BODY)
    return np.argwhere(body if body.any() else instance == v).mean(axis=0)


def _row(v: int, name: str, complete=True, truncated=(), level="high", body_why="one body"):
    return {"id": v, "name": name, "complete": complete, "truncated_by": list(truncated),
            "confidence": {"level": level, "id": {"level": "high", "why": "counted from the sacrum"},
                           "body": {"level": level, "why": body_why}}}


def test_missing_levels_skip_transitional_and_lumbosacral():
    assert missing_levels([20, 21, 23, 24, 26]) == [(22, 21, 23)]  # L3 between L2 and L4
    assert missing_levels([19, 20, 21, 22, 23, 26]) == []  # four lumbar vertebrae: no L5 missing above the sacrum
    assert missing_levels([19, 28, 20, 21, 22, 23, 24, 25, 26]) == []  # T13 and L6 are extras, L5 present
    assert [m[0] for m in missing_levels([18, 20])] == [19]


def test_qc_marks_names_flags_missing_level_and_banner():
    # L1, L2, (L3 lost), L4, L5, L6 and the sacrum, in a PIR grid
    sy = make_spine(ids=[20, 21, 23, 24, 25], sacrum=True)
    sem, ins = sy.semantic, sy.instance
    summary = {
        "vertebrae": [_row(20, "L1", complete=False, truncated=["top"], level="medium"), _row(21, "L2"),
                      _row(23, "L4", level="low", body_why="body 0.3 x as tall as its neighbours"), _row(24, "L5"),
                      _row(25, "L6", level="medium")],
        "labeling": {"anchor": "sacrum", "ambiguous": True, "notes": []},
        "plausibility": {"plausible": False, "flags": ["L5: vertebral body of 200.0 cm3, outside 5-150 cm3"],
                         "advisories": []},
    }
    marks = qc_marks(ins, summary, sem)
    assert [m.name for m in marks.vertebrae] == ["L1", "L2", "L4", "L5", "L6", "S1"]
    for m in marks.vertebrae:
        np.testing.assert_allclose(m.centre, _body_centre(sem, ins, m.id), atol=1e-6)
    by = {m.name: m for m in marks.vertebrae}
    assert by["L1"].flags == ("cut",) and by["L1"].text == "L1 cut"
    assert by["L4"].confidence == "low" and by["L5"].flags == ("implausible",) and by["L5"].text == "L5!"
    assert "transitional" in by["L6"].flags and by["L2"].flags == ()
    # L3: between the centres of L2 and L4
    assert [n for n, _ in marks.missing] == ["L3"]
    np.testing.assert_allclose(marks.missing[0][1], (np.array(by["L2"].centre) + by["L4"].centre) / 2)
    assert marks.cut_edges == ("top",)
    text = "\n".join(marks.lines)
    for part in ("implausible: L5: vertebral body", "labelling ambiguous", "missing level(s): L3",
                 "transitional vertebra: L6", "cut by the field of view: L1 (top)",
                 "low confidence: L4 (body 0.3 x as tall as its neighbours)"):
        assert part in text
    assert marks.severity == "implausible"

    # nothing flagged: a green banner without lines; without the semantic mask, marks at the vertebra centres
    clean = {"vertebrae": [_row(v, n) for v, n in ((20, "L1"), (21, "L2"), (23, "L4"), (24, "L5"))],
             "labeling": {"anchor": "sacrum", "ambiguous": False, "notes": []},
             "plausibility": {"plausible": True, "flags": [], "advisories": []}}
    sy2 = make_spine(ids=[20, 21, 22, 23, 24], sacrum=True)
    ok = qc_marks(sy2.instance, clean)
    assert ok.lines == [] and ok.severity == "ok" and ok.missing == []
    np.testing.assert_allclose(ok.vertebrae[0].centre, np.argwhere(sy2.instance == 20).mean(axis=0), atol=1e-6)
    # no anchor: the ids are a count, and the banner says so
    none = qc_marks(sy2.instance, {**clean, "labeling": {"anchor": "none", "ambiguous": False}})
    assert none.severity == "look" and "no anchor in view" in none.lines[0]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A lumbar phantom segmented (ground-truth semantic mask, geometric instances) and saved with its snapshot."""
    from spineps_like.phantom import write_phantoms
    from spineps_like.pipeline import segment

    root = tmp_path_factory.mktemp("qc")
    img = write_phantoms(root / "ds", 1, seed=3, fov="lumbar", spacing=(1.5, 1.5, 4.0), orientation="RAS",
                         snapshot=False)[0]
    mask = next((root / "ds" / "derivatives_gt" / img.parent.parent.name).glob("*_seg-spine_msk.nii.gz"))
    res = segment(img, semantic_mask=mask, instance_method="geometric")
    paths = res.save(root / "out", name_from=img)
    return res, paths


def test_qc_picture_of_a_segmented_scan_names_every_vertebra_in_both_planes(segmented):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    res, paths = segmented
    assert paths["snapshot"].name.endswith("_seg-spine_snp.png")  # the name the callers know
    summary = json.loads(paths["summary"].read_text())
    fig = snapshot_figure(res.image, res.semantic, res.instance, title="t", summary=summary)
    axes = {ax.get_gid(): ax for ax in fig.axes}
    assert list(axes) == ["sagittal", "sagittal semantic", "sagittal instances", "coronal instances"]
    sem = reorient(res.semantic, "PIR").array
    ins = reorient(res.instance, "PIR").array
    names = {r["id"]: r["name"] for r in summary["vertebrae"]}
    assert len(names) >= 5
    for gid, (ix, iy) in (("sagittal instances", (0, 1)), ("coronal instances", (2, 1))):
        texts = {t.get_gid(): t for t in axes[gid].texts if (t.get_gid() or "").startswith("vertebra:")}
        assert sorted(texts) == sorted(f"vertebra:{v}" for v in names)
        for v, name in names.items():
            t = texts[f"vertebra:{v}"]
            assert t.get_text().startswith(name)
            c = _body_centre(sem, ins, v)
            np.testing.assert_allclose(t.get_position(), (c[ix], c[iy]), atol=1e-6)
    # the field of view cuts the phantom: the cut vertebrae say so, at their place and in the banner
    cut = [r["name"] for r in summary["vertebrae"] if r["complete"] is False]
    assert cut
    sag = {t.get_text() for t in axes["sagittal instances"].texts}
    assert all(f"{n} cut" in sag or f"{n} cut!" in sag for n in cut)
    banner = next(t for t in fig.texts if t.get_gid() == "banner")
    assert "cut by the field of view: " + cut[0] in banner.get_text()
    assert any((ln.get_gid() or "").startswith("cut:") for ln in axes["sagittal instances"].lines)
    plt.close(fig)
    # the PNG written by save() holds the banner's colour
    png = mpimg.imread(paths["snapshot"])[..., :3]
    want = np.array([int(SEVERITY_COLOURS["look"][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert summary["plausibility"]["flags"] == []
    assert (np.abs(png - want).max(axis=-1) < 0.02).sum() > 500


def test_qc_picture_without_instances_or_summary(segmented, tmp_path):
    import matplotlib.pyplot as plt

    res, _ = segmented
    fig = snapshot_figure(res.image, res.semantic)  # semantic only: sagittal + coronal, no names, no banner
    assert [ax.get_gid() for ax in fig.axes] == ["sagittal", "sagittal semantic", "coronal semantic"]
    assert not any(ax.texts[2:] for ax in fig.axes) and not fig.texts
    plt.close(fig)
    fig = snapshot_figure(res.image, res.semantic, res.instance)  # no summary: names, no flags
    assert not fig.texts
    ins_ax = next(ax for ax in fig.axes if ax.get_gid() == "sagittal instances")
    assert {t.get_text() for t in ins_ax.texts} >= {"L3", "L4"}
    plt.close(fig)
    arr = reorient(res.image, "PIR")
    out = save_snapshot(tmp_path / "x_snp.png", Scan(arr.array, arr.affine))  # an image alone
    assert out.is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
