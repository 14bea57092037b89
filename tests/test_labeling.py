"""Vertebra labelling (anchors, T13/L6), completeness flags, POI centroid json and summary json."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest

from spineps_like.assign import assign_ivds_endplates
from spineps_like.instance.geometric import geometric_instances
from spineps_like.io import load_scan
from spineps_like.labeling import label_vertebrae, remap_instance, summary_json, write_centroids_json
from spineps_like.postprocess import check_consistency, postprocess
from synthetic_spine import make_spine


@lru_cache(maxsize=None)
def _crop(kind: str):
    from conftest import tptbox_sample

    paths = tptbox_sample(kind)
    return load_scan(paths["semantic"], kind="mask"), load_scan(paths["instance"], kind="mask")


def _instances(sem: np.ndarray, sp) -> tuple[np.ndarray, np.ndarray]:
    """Semantic -> geometric vertebrae 1..K -> IVD/endplate ids -> post-processing (the pipeline's order)."""
    vert = geometric_instances(sem, sp)
    inst, sem2 = assign_ivds_endplates(sem, vert, sp)
    sem3, inst3, _ = postprocess(sem2, inst, sp)
    return sem3, inst3


@lru_cache(maxsize=None)
def _synthetic(**kw):
    sy = make_spine(**kw)
    sem, inst = _instances(sy.semantic, sy.spacing)
    return sy, sem, inst


def test_sacrum_anchor_l5_above_it_and_discs_follow():
    sy, sem, inst = _synthetic(ids=(20, 21, 22, 23, 24), sacrum=True, endplates=True)
    assert set(np.unique(inst[(inst > 0) & (inst < 26)]).tolist()) == {1, 2, 3, 4, 5}
    out, res = label_vertebrae(inst, sem, sy.spacing)
    assert res.anchor == "sacrum" and not res.ambiguous
    assert res.order == [20, 21, 22, 23, 24] and res.names[24] == "L5"
    # every structure carries the GT id: vertebrae, discs (100 + above), endplates (200 + own), sacrum
    assert np.array_equal(out, sy.instance * (out > 0))
    assert np.array_equal(out > 0, sy.instance > 0)
    assert check_consistency(sem, out) == []
    assert all(res.complete.values())


def test_six_lumbar_looking_vertebrae_above_the_sacrum_give_l6():
    sy, sem, inst = _synthetic(ids=(19, 20, 21, 22, 23, 24), sacrum=True)
    out, res = label_vertebrae(inst, sem, sy.spacing)
    assert res.order == [20, 21, 22, 23, 24, 25]  # L1..L6
    assert res.ambiguous and any("L6" in n for n in res.notes)
    # the expected count can be given: 5 lumbar -> the top one is T12
    out5, res5 = label_vertebrae(inst, sem, sy.spacing, lumbar_count=5)
    assert res5.order == [19, 20, 21, 22, 23, 24]
    assert np.array_equal(out5, sy.instance * (out5 > 0))


def test_small_costal_processes_make_the_sixth_vertebra_t12():
    sy, sem, inst = _synthetic(ids=(19, 20, 21, 22, 23, 24), sacrum=True, costal=(2.0, 12.0, 12.0, 12.0, 12.0, 12.0))
    out, res = label_vertebrae(inst, sem, sy.spacing)
    assert res.order == [19, 20, 21, 22, 23, 24] and not res.ambiguous
    assert np.array_equal(out, sy.instance * (out > 0))
    _, res6 = label_vertebrae(inst, sem, sy.spacing, lumbar_count=6)
    assert res6.order == [20, 21, 22, 23, 24, 25]


def test_c2_anchor_from_the_dens_and_t13_from_both_anchors():
    sy, sem, inst = _synthetic(ids=(2, 3, 4, 5, 6), dens=16.0)
    out, res = label_vertebrae(inst, sem, sy.spacing)
    assert res.anchor == "C2" and res.order == [2, 3, 4, 5, 6]
    assert np.array_equal(out, sy.instance * (out > 0))
    # the same spine without the dens: no anchor, a count from first_id
    sy2, sem2, inst2 = _synthetic(ids=(2, 3, 4, 5, 6))
    _, res2 = label_vertebrae(inst2, sem2, sy2.spacing, first_id=8)
    assert res2.anchor == "none" and res2.order == [8, 9, 10, 11, 12]
    # dens label 51 (CT) anchors too
    sem51 = sem2.copy()
    top = np.argwhere((inst2 == inst2[inst2 > 0].min()) & (sem2 == 49))
    sem51[tuple(top[:20].T)] = 51
    _, res3 = label_vertebrae(inst2, sem51, sy2.spacing)
    assert res3.anchor == "C2" and res3.order[0] == 2


def test_whole_spine_with_thirteen_thoracic_vertebrae():
    names = [f"C{i}" for i in range(2, 8)] + [f"T{i}" for i in range(1, 13)] + ["T13"] + [f"L{i}" for i in range(1, 6)]
    from spineps_like.labels import VERTEBRA_NAME_TO_ID

    ids = tuple(VERTEBRA_NAME_TO_ID[n] for n in names)
    costal = tuple(2.0 if n == "T13" else 12.0 for n in names)
    sy, sem, inst = _synthetic(ids=ids, sacrum=True, dens=14.0, costal=costal, height=11.0, gap=4.0,
                               spacing=(2.0, 2.0, 2.0))
    out, res = label_vertebrae(inst, sem, sy.spacing)
    assert res.anchor == "sacrum+C2" and res.ambiguous
    assert res.order == list(ids)


def test_completeness_flags_at_the_field_of_view_border():
    sy, sem, inst = _synthetic(ids=(20, 21, 22, 23, 24))
    out, res = label_vertebrae(inst, sem, sy.spacing, first_id=20)
    assert res.anchor == "none" and all(res.complete.values())
    # crop the field of view through the first and the last vertebra
    corpus_rows = np.flatnonzero(((out == 20) & (sem == 49)).any(axis=(0, 2)))
    last_rows = np.flatnonzero(((out == 24) & (sem == 49)).any(axis=(0, 2)))
    y0 = int(corpus_rows[len(corpus_rows) // 2])
    y1 = int(last_rows[len(last_rows) // 2])
    _, res_c = label_vertebrae(out[:, y0:y1], sem[:, y0:y1], sy.spacing, first_id=20)
    assert res_c.complete == {20: False, 21: True, 22: True, 23: True, 24: False}
    assert "top" in res_c.truncated_by[20] and "bottom" in res_c.truncated_by[24]
    # the real crops: C5 and C7 (L2 and L4) are cut, C6 (L3) is whole
    for kind in ("mri", "ct"):
        sem_scan, gt_scan = _crop(kind)
        s, i = _instances(sem_scan.array, sem_scan.spacing)
        _, r = label_vertebrae(i, s, sem_scan.spacing)
        assert [r.complete[v] for v in r.order] == [False, True, False]


def test_disc_above_the_top_vertebra_is_renamed():
    inst = np.zeros((4, 12, 4), np.int16)
    inst[:, 0:2] = 100  # disc above vertebra 1 (assign's 'vertebra out of view')
    inst[:, 2:6] = 1
    inst[:, 6:8] = 101
    inst[:, 8:12] = 2
    out = remap_instance(inst, {1: 21, 2: 22}, [1, 2])
    assert out[0, 0, 0] == 120 and out[0, 3, 0] == 21 and out[0, 7, 0] == 121 and out[0, 9, 0] == 22
    # above C1 there is no disc: the voxels lose their id instead of keeping the invalid 100 + 0
    out = remap_instance(inst, {1: 1, 2: 2}, [1, 2])
    assert out[0, 0, 0] == 0 and out[0, 3, 0] == 1 and out[0, 7, 0] == 101 and out[0, 9, 0] == 2


def test_centroids_json_is_read_by_tptbox(tmp_path):
    from TPTBox import NII, POI, calc_centroids

    from conftest import tptbox_sample

    sem_scan, gt_scan = _crop("ct")
    path = tmp_path / "sub-ct_seg-spine_ctd.json"
    write_centroids_json(path, gt_scan.array, gt_scan.affine)
    raw = json.loads(path.read_text())
    assert raw[0]["direction"] == ["P", "I", "R"] and raw[0]["zoom"] == [1.5, 1.5, 1.5]
    assert set(raw[1]) == {"21", "22", "23"} and set(raw[1]["22"]) == {"50"}
    poi = POI.load(path)
    ref = calc_centroids(NII.load(tptbox_sample("ct")["instance"], seg=True), second_stage=50)
    assert np.allclose(poi.affine, gt_scan.affine, atol=1e-4)
    assert tuple(poi.shape) == gt_scan.shape
    assert set(poi.keys_region()) == {21, 22, 23}
    for v in (21, 22, 23):
        assert np.allclose(poi[v, 50], ref[v, 50], atol=1e-3)


def test_summary_json(tmp_path):
    sy, sem, inst = _synthetic(ids=(20, 21, 22, 23, 24), sacrum=True, endplates=True)
    out, res = label_vertebrae(inst, sem, sy.spacing)
    affine = np.diag(list(sy.spacing) + [1.0])
    summ = summary_json(out, affine, res, tmp_path / "summary.json")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summ))
    names = [r["name"] for r in summ["vertebrae"]]
    assert names == ["L1", "L2", "L3", "L4", "L5", "S1"]
    l3 = next(r for r in summ["vertebrae"] if r["name"] == "L3")
    n = int(np.count_nonzero(out == 22))
    assert l3["voxels"] == n and l3["volume_mm3"] == pytest.approx(n * np.prod(sy.spacing), rel=1e-6)
    assert l3["complete"] is True
    assert np.allclose(l3["centroid_voxel"], np.argwhere(out == 22).mean(0), atol=1e-3)
    assert [r["name"] for r in summ["ivds"]][-1] == "IVD L5"
    assert summ["labeling"]["anchor"] == "sacrum"


def test_labeling_bad_input():
    z = np.zeros((4, 4, 4), np.int16)
    with pytest.raises(ValueError, match="lumbar_count"):
        label_vertebrae(z, z, (1, 1, 1), lumbar_count=7)
    with pytest.raises(ValueError, match="shape"):
        label_vertebrae(z, np.zeros((4, 4, 3), np.int16), (1, 1, 1))
    with pytest.raises(ValueError, match="which"):
        write_centroids_json("x.json", z, np.eye(4), which="some")
    out, res = label_vertebrae(z, z, (1, 1, 1))
    assert res.order == [] and res.notes


def test_ids_stay_in_the_scheme_when_vertebrae_are_left_unnumbered():
    """More vertebrae above the sacrum than the anatomy has: the topmost stay unnumbered (0), and so do their discs
    and endplates, including the disc above the topmost one (never 100 + 0 or a stale fusion id)."""
    from synthetic_spine import make_spine

    from spineps_like.assign import assign_ivds_endplates
    from spineps_like.labeling import label_vertebrae

    ids = list(range(1, 29))  # 28 vertebrae above a sacrum: 3 more than C1..L5 + L6
    sy = make_spine(ids=ids, sacrum=True, height=8.0, gap=3.0, margin=20.0)
    cut = sy.instance == 1  # the field of view starts inside the disc below the first vertebra
    semantic = np.where(cut, 0, sy.semantic)
    vert = np.where((sy.instance > 1) & (sy.instance < 100) & (sy.instance != 26), sy.instance, 0)
    inst, sem = assign_ivds_endplates(semantic, vert, sy.spacing)
    assert (inst == 101).any()  # the disc above the topmost vertebra (2) carries the id of one out of view
    out, res = label_vertebrae(inst, sem, sy.spacing)
    u = np.unique(out)
    u = u[u > 0]
    v = u[u < 100]
    assert set(v.tolist()) <= set(range(1, 29)) | {26}
    assert all((x - 100) in v for x in u[(u >= 100) & (u < 200)])
    assert all((x - 200) in v for x in u[u >= 200])
    assert any("unnumbered" in n for n in res.notes)
    top = min(res.mapping, key=lambda o: np.argwhere(inst == o)[:, 1].mean())
    assert res.mapping[top] == 0
    # the disc above the unnumbered topmost vertebra must not take the id of the disc below the new C1
    assert np.all(out[inst == 101] == 0)


def test_missing_levels_finds_a_lost_body_and_nothing_else():
    from spineps_like.labeling import missing_levels

    pitch = np.array([30.0, 31, 32, 33, 35, 36, 38])
    centres = np.stack([np.zeros(8), np.concatenate([[0], np.cumsum(pitch)]), np.zeros(8)], axis=1)
    has = np.ones(8, bool)
    assert missing_levels(centres, has).tolist() == [0] * 7  # heights grow down the spine: no gap
    lost = np.delete(centres, 4, axis=0)  # one body gone: 33 + 35 mm between its neighbours
    assert missing_levels(lost, np.ones(7, bool)).tolist() == [0, 0, 0, 1, 0, 0]
    two = np.delete(centres, [3, 4], axis=0)
    assert missing_levels(two, np.ones(6, bool)).tolist() == [0, 0, 2, 0, 0]
    # a vertebra without corpus next to the gap: its centre is not a body's, the pair is not judged
    no_corpus = np.ones(7, bool)
    no_corpus[4] = False
    assert missing_levels(lost, no_corpus)[3] == 0


def test_a_lost_corpus_keeps_the_ids_beyond_it():
    """A semantic mask without one lumbar corpus: the ids above the gap stay anatomical (skipped, not shifted)."""
    from spineps_like.evaluation.degrade import missing_corpus
    from spineps_like.geometry import reorient
    from spineps_like.phantom import make_phantom
    from synthetic_spine import phantom_ids

    ph = make_phantom(7, fov="lumbar", spacing=(1.3, 1.3, 3.9))
    sem, ins = reorient(ph.semantic, "PIR").array, reorient(ph.instance, "PIR").array
    lost = missing_corpus(sem, ins, reorient(ph.semantic, "PIR").spacing, 1, np.random.default_rng(0))
    gone = sorted(set(np.unique(ins[(sem == 49) & (lost != 49)]).tolist()) & set(range(1, 26)))
    assert len(gone) == 1
    pairs, _ = phantom_ids(lost, ph)
    right = {g: v for g, v in pairs.items() if g != gone[0]}
    assert right and all(g == v for g, v in right.items()), pairs
