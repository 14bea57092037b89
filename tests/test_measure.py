"""Measurements (issue 29, first slice) against the phantoms' exact geometry, in two orientations; wiring into
segment()/save() and the `measure` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spineps_like.measure import genant_grade, measure, meyerding_grade
from spineps_like.phantom import make_phantom

SP = (1.0, 1.0, 3.0)


def _measure(ph):
    complete = {e["id"]: not e["cut"] for e in ph.meta["vertebrae"]}
    return measure(ph.semantic.array, ph.instance.array, ph.semantic.affine, complete=complete)


@pytest.fixture(scope="module")
def collapsed():
    # seed 3: L3 collapsed by 48% (lumbar); both orientations share every anatomical draw
    return {o: make_phantom(2000001, fov="lumbar", mode="t2w", variant="collapsed", spacing=SP, orientation=o)
            for o in ("PIR", "LAS")}


def test_grades():
    assert [genant_grade(x) for x in (0.1, 0.2, 0.24, 0.3, 0.4, 0.41, float("nan"))] == [0, 1, 1, 2, 2, 3, None]
    assert [meyerding_grade(x) for x in (0.02, 0.1, 0.3, -0.3, 0.6, 0.8, 1.2)] == [0, 1, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("orientation", ["PIR", "LAS"])
def test_collapsed_vertebra_graded_and_others_zero(collapsed, orientation):
    ph = collapsed[orientation]
    truth = ph.meta["anatomy"]["collapsed"]
    m = _measure(ph)
    by = {r["id"]: r for r in m["vertebrae"]}
    c = by[truth["id"]]
    assert c["complete"] is True
    # like for like: the centre height against the neighbours' centre heights
    assert abs(c["middle_height_loss_vs_neighbours"] - truth["height_loss"]) < 0.06
    # Genant's loss takes the lower of anterior and middle: the phantom's anterior wedge adds to it
    assert truth["height_loss"] - 0.03 < c["height_loss"] < truth["height_loss"] + 0.12
    assert c["genant_grade"] >= 2 and c["genant_grade"] == genant_grade(truth["height_loss"])
    assert c["shape"] == "crush"  # all three heights far below the neighbours'
    assert c["body_height_anterior_mm"] < c["body_height_posterior_mm"]
    for r in m["vertebrae"]:
        if r["id"] != truth["id"] and r["complete"]:
            assert r["genant_grade"] == 0, r
            assert 18 < r["body_height_middle_mm"] < 28 and 20 < r["body_depth_mm"] < 36, r
        elif not r["complete"]:
            assert r["genant_grade"] is None and r["shape"] is None
    for c_ in m["canal"]:
        assert c_["ap_diameter_mm"] is not None and 10 < c_["ap_diameter_mm"] < 20, c_


def test_orientation_independent(collapsed):
    a, b = (_measure(collapsed[o]) for o in ("PIR", "LAS"))
    for ra, rb in zip(a["vertebrae"], b["vertebrae"]):
        assert ra["id"] == rb["id"]
        for k in ("body_height_anterior_mm", "body_height_middle_mm", "body_height_posterior_mm", "body_depth_mm"):
            assert abs(ra[k] - rb[k]) <= 1.0, (ra["name"], k, ra[k], rb[k])
        assert ra["genant_grade"] == rb["genant_grade"]
    for da, db in zip(a["discs"], b["discs"]):
        assert abs(da["height_middle_mm"] - db["height_middle_mm"]) <= 1.0


def test_disc_heights_plausible(collapsed):
    m = _measure(collapsed["PIR"])
    truth = {d["id"]: d["height_mm"] for d in collapsed["PIR"].meta["ivds"]}
    for d in m["discs"]:
        # the bodies' endplates are concave (~1 mm each): the middle height is the generator's centre height + ~2 mm
        assert -0.5 < d["height_middle_mm"] - truth[d["id"]] < 4.0, d
        assert 0.2 < d["disc_height_index"] < 1.0
    lumbar = [d for d in m["discs"] if d["upper"] in ("L1", "L2", "L3", "L4")]
    assert lumbar and all(8 <= d["height_middle_mm"] <= 15 for d in lumbar)


@pytest.mark.parametrize("orientation", ["PIR", "RSA"])
def test_listhesis(orientation):
    ph = make_phantom(2000003, fov="lumbar", mode="t2w", variant="listhesis", spacing=SP, orientation=orientation)
    truth = ph.meta["anatomy"]["listhesis"]
    assert truth["id"] == 23  # L4 over L5 (the generator draws it by seed)
    m = _measure(ph)
    by = {r["id"]: r for r in m["vertebrae"]}
    r = by[truth["id"]]
    assert abs(r["listhesis_mm"] - truth["slip_mm"]) < 1.5
    assert r["meyerding_grade"] == truth["meyerding_grade"] and r["listhesis_direction"] == "anterolisthesis"
    for v, rec in by.items():
        if v != truth["id"] and rec["listhesis_mm"] is not None and v < 23:
            assert abs(rec["listhesis_mm"]) < 2.0 and rec["meyerding_grade"] == 0, rec


def test_cervical_discs_and_c2_ungraded():
    ph = make_phantom(2000009, fov="cervical", mode="t2w", spacing=SP, orientation="PIR")
    m = _measure(ph)
    c2 = [r for r in m["vertebrae"] if r["name"] == "C2"]
    assert not c2 or c2[0]["genant_grade"] is None
    assert all(r["genant_grade"] in (0, None) for r in m["vertebrae"])
    cerv = [d for d in m["discs"] if d["upper"] in ("C3", "C4", "C5", "C6")]
    assert cerv and all(4.0 <= d["height_middle_mm"] <= 9.0 for d in cerv), cerv


def test_spacing_only_and_incomplete_by_border():
    ph = make_phantom(2000001, fov="lumbar", mode="t2w", variant="collapsed", spacing=SP, orientation="PIR")
    m = measure(ph.semantic.array, ph.instance.array, ph.semantic.spacing)
    cut = [r for r in m["vertebrae"] if r["complete"] is False]
    assert cut and all(r["genant_grade"] is None for r in cut)  # the top body touches the array's border
    assert set(m) >= {"vertebrae", "discs", "canal", "units"}
    json.dumps(m)
    with pytest.raises(ValueError):
        measure(ph.semantic.array, ph.instance.array[:-1], SP)


def test_segment_writes_measurements_and_cli(tmp_path, collapsed):
    from spineps_like.cli import main
    from spineps_like.io import Scan, save_scan
    from spineps_like.pipeline import segment

    ph = collapsed["PIR"]
    res = segment(ph.image, semantic_mask=ph.semantic, instance_method="geometric")
    assert res.measurements is not None and res.measurements["vertebrae"]
    paths = res.save(tmp_path / "out", snapshot=False)
    meas = json.loads(paths["measurements"].read_text())
    assert [r["name"] for r in meas["vertebrae"]] == [r["name"] for r in res.measurements["vertebrae"]]
    assert paths["measurements_csv"].read_text().startswith("structure,")
    assert "measure" in res.timings
    sem_p, inst_p = tmp_path / "sem.nii.gz", tmp_path / "inst.nii.gz"
    save_scan(Scan(ph.semantic.array, ph.semantic.affine), sem_p, dtype=np.uint8)
    save_scan(Scan(ph.instance.array, ph.instance.affine), inst_p, dtype=np.uint16)
    out = tmp_path / "m.json"
    assert main(["measure", str(sem_p), str(inst_p), "--out", str(out), "--csv", str(tmp_path / "m.csv"),
                 "--quiet"]) == 0
    got = json.loads(out.read_text())
    truth = ph.meta["anatomy"]["collapsed"]["id"]
    assert [r["genant_grade"] for r in got["vertebrae"] if r["id"] == truth][0] >= 2
    assert (tmp_path / "m.csv").exists()
    assert main(["measure", str(sem_p), str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 1
