"""Corpus centres and the geometric (weights-free) instance method, on the real TPTBox crops and synthetic spines."""

from __future__ import annotations

from functools import lru_cache

import cc3d
import numpy as np
import pytest

from spineps_like.instance.centres import corpus_centres
from spineps_like.instance.geometric import geometric_instances
from synthetic_spine import make_spine

BONE = tuple(range(41, 52))


def _crop(kind: str):
    from conftest import tptbox_crop

    return tptbox_crop(kind)


@lru_cache(maxsize=None)
def _spine(**kw):
    return make_spine(**kw)


def _best_iou(pred: np.ndarray, gt: np.ndarray, where: np.ndarray) -> dict[int, tuple[int, float]]:
    """For each GT id inside ``where``: the predicted id overlapping it most and their IoU."""
    out = {}
    g_all = np.where(where, gt, 0)
    p_all = np.where(where, pred, 0)
    for g in np.unique(g_all[g_all > 0]):
        m = g_all == g
        ids, cnt = np.unique(p_all[m], return_counts=True)
        best = ids[np.argmax(cnt)]
        inter = np.count_nonzero(m & (p_all == best))
        union = np.count_nonzero(m | (p_all == best))
        out[int(g)] = (int(best), inter / union)
    return out


def _vertebra_pq(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, int, int, int]:
    import panoptica
    from panoptica import InputType, Metric, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.utils.segmentation_class import LabelGroup, SegmentationClassGroups

    panoptica.disable_citation_reminder()
    ev = Panoptica_Evaluator(
        expected_input=InputType.UNMATCHED_INSTANCE,
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=0.5),
        segmentation_class_groups=SegmentationClassGroups({"vertebra": LabelGroup(list(range(1, 100)))}),
        instance_metrics=[Metric.IOU],
        global_metrics=[Metric.DSC],
    )
    r = ev.evaluate(pred.astype(np.int32), gt.astype(np.int32), voxelspacing=tuple(spacing), verbose=False)
    v = r["vertebra"]
    return float(v.pq), int(v.tp), int(v.fp), int(v.fn)


# ------------------------------------------------------------------------------------------------ centres
@pytest.mark.parametrize("kind,ids", [("mri", (5, 6, 7)), ("ct", (21, 22, 23))])
def test_centres_on_real_crops_one_per_vertebra_in_order(kind, ids):
    sem, gt, sp = _crop(kind)
    cc = corpus_centres(sem, sp)
    assert len(cc) == 3 and cc.repairs == []
    # each centre lies in the corpus of a different GT vertebra, top to bottom
    hit = [int(gt[tuple(np.round(c).astype(int))]) for c in cc.centres]
    assert hit == list(ids)
    assert np.all(np.diff(cc.centres[:, 1]) > 0)
    # the corpus pieces are the GT corpora (compared on 49/50: the MRI GT gives both endplates of a disc the id
    # of the vertebra above, SPINEPS 2.1.3's convention)
    corpus = np.isin(sem, (49, 50))
    match = _best_iou(cc.labels, gt, corpus)
    assert sorted(b for b, _ in match.values()) == [1, 2, 3]
    assert min(iou for _, iou in match.values()) > 0.97
    assert cc.sizes.sum() == np.count_nonzero(np.isin(sem, (49, 50, 51, 52, 53, 62)))
    assert np.allclose(np.linalg.norm(cc.axes, axis=1), 1)


@pytest.mark.parametrize("bend", [0.0, 40.0])
def test_merged_corpus_is_split_into_two(bend):
    sy = _spine(block=1, bend_deg=bend, endplates=True)
    cc = corpus_centres(sy.semantic, sy.spacing)
    assert len(cc) == 5
    assert any(r.startswith("split corpus 2") for r in cc.repairs)
    corpus = np.isin(sy.semantic, (49, 62))
    gt = np.where(corpus, np.where(sy.instance >= 200, sy.instance - 200, sy.instance), 0)
    match = _best_iou(cc.labels, gt, corpus)
    assert [match[v][0] for v in sy.ids] == [1, 2, 3, 4, 5]
    assert min(iou for _, iou in match.values()) > 0.85


def test_merged_corpus_split_at_an_ivd_without_reference_height():
    # two vertebrae fused except for a small remnant of the disc: only one corpus, so no size reference;
    # the IVD inside the corpus' extent tells where to cut
    sy = _spine(ids=(20, 21), block=0)
    sem = sy.semantic.copy()
    sem0 = make_spine(ids=[20, 21]).semantic
    remnant = (sem0 == 100)
    rows = np.flatnonzero(remnant.any(axis=(0, 2)))
    keep = remnant.copy()
    keep[:, :, : sem.shape[2] // 2 - 2] = False  # half of the disc only
    keep[:, :, sem.shape[2] // 2 + 3:] = False
    sem[keep] = 100
    assert len(rows) > 0 and keep.any()
    cc = corpus_centres(sem, sy.spacing)
    assert len(cc) == 2
    assert any("IVD level" in r for r in cc.repairs)
    gt = np.where(sem == 49, sy.instance, 0)
    match = _best_iou(cc.labels, gt, sem == 49)
    assert match[20][0] == 1 and match[21][0] == 2 and min(i for _, i in match.values()) > 0.85


def test_duplicate_pieces_of_one_corpus_are_merged():
    sy = _spine()
    sem = sy.semantic.copy()
    # cut the third corpus into left and right halves with a 2-voxel gap: two pieces at one level
    third = (sy.instance == sy.ids[2]) & (sem == 49)
    zc = int(np.round(np.argwhere(third)[:, 2].mean()))
    cut = third.copy()
    cut[:, :, : zc - 1] = False
    cut[:, :, zc + 1:] = False
    sem[cut] = 0
    assert len(np.unique(cc3d.connected_components(third & ~cut, connectivity=26))) == 3
    cc = corpus_centres(sem, sy.spacing)
    assert len(cc) == 5
    assert any(r.startswith("merged 1 duplicate") for r in cc.repairs)
    assert set(np.unique(cc.labels[third & ~cut]).tolist()) == {3}


def test_dens_does_not_split_c2_and_small_fragments_are_dropped():
    sy = _spine(ids=(2, 3, 4, 5, 6), dens=16.0)
    sem = sy.semantic.copy()
    sem[1:3, 1:3, 1:3] = 49  # a 8-voxel corpus speck far from the spine
    cc = corpus_centres(sem, sy.spacing)
    assert len(cc) == 5
    assert not any(r.startswith("split") for r in cc.repairs)
    assert any(r.startswith("dropped 1 corpus fragment") for r in cc.repairs)
    assert cc.labels[1:3, 1:3, 1:3].max() == 0


def test_centres_bad_input_and_empty():
    with pytest.raises(ValueError, match="3D"):
        corpus_centres(np.zeros((4, 4), np.int16), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        corpus_centres(np.zeros((4, 4, 4), np.int16), (1, 0, 1))
    cc = corpus_centres(np.zeros((8, 8, 8), np.int16), (1, 1, 1))
    assert len(cc) == 0 and cc.centres.shape == (0, 3)


# ------------------------------------------------------------------------------------------------ geometric
@pytest.mark.parametrize("kind", ["mri", "ct"])
def test_geometric_reproduces_gt_vertebrae_on_real_crops(kind):
    sem, gt, sp = _crop(kind)
    pred = geometric_instances(sem, sp)
    bone = np.isin(sem, BONE)
    assert set(np.unique(pred[~bone]).tolist()) == {0}
    gt_v = np.where(bone & (gt < 100), gt, 0)
    pq, tp, fp, fn = _vertebra_pq(pred, gt_v, sp)
    assert (tp, fp, fn) == (3, 0, 0)
    assert pq >= 0.9
    match = _best_iou(pred, gt_v, bone)
    assert min(iou for _, iou in match.values()) > 0.98
    # the hard case: every articular process on its own vertebra (>= 99 %)
    lut = {g: b for g, (b, _) in match.items()}
    art = np.isin(sem, (45, 46, 47, 48))
    expected = np.vectorize(lambda g: lut.get(int(g), -1))(gt_v[art])
    assert np.mean(pred[art] == expected) > 0.99


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(bend_deg=60.0), dict(lateral_bend_deg=30.0, sacrum=True), dict(block=2, endplates=True),
     dict(spacing=(0.8, 0.8, 3.0))],
    ids=["straight", "lordosis", "scoliosis", "block", "anisotropic"],
)
def test_geometric_on_synthetic_spines(kw):
    sy = _spine(**kw)
    pred = geometric_instances(sy.semantic, sy.spacing)
    bone = np.isin(sy.semantic, BONE)
    match = _best_iou(pred, sy.instance, bone)
    assert [match[v][0] for v in sy.ids] == list(range(1, len(sy.ids) + 1))
    assert min(iou for _, iou in match.values()) > 0.95
    art = np.isin(sy.semantic, (45, 46, 47, 48))
    want = np.searchsorted(np.array(sy.ids), sy.instance[art]) + 1  # GT vertebra -> its position 1..K
    assert np.mean(pred[art] == want) > 0.97


def test_arch_whose_corpus_is_out_of_view_becomes_its_own_vertebra():
    sy = _spine()
    sem = sy.semantic.copy()
    top = sy.ids[0]
    sem[(sy.instance == top) & (sem == 49)] = 0  # corpus of the top vertebra not in the mask
    pred = geometric_instances(sem, sy.spacing)
    bone = np.isin(sem, BONE)
    match = _best_iou(pred, sy.instance, bone)
    assert [match[v][0] for v in sy.ids] == [1, 2, 3, 4, 5]
    assert match[top][1] > 0.95


def test_geometric_on_phantoms():
    from spineps_like.phantom import make_phantom

    for variant in (None, "block"):
        ph = make_phantom(1, fov="lumbar", variant=variant, orientation="PIR")
        sem, gt, sp = ph.semantic.array, ph.instance.array, ph.semantic.spacing
        pred = geometric_instances(sem, sp)
        bone = np.isin(sem, BONE)
        gt_v = np.where(bone & (gt < 100), gt, 0)
        pq, tp, fp, fn = _vertebra_pq(pred, gt_v, sp)
        assert pq >= 0.85 and fn <= 1 and fp <= 1, (variant, pq, tp, fp, fn)


def test_corpus_blobs_off_the_spine_and_disc_fragments_do_not_make_vertebrae():
    """Predicted masks put corpus label on blobs in front of the spine and IVD label on specks inside a body: neither
    may add a centre (each centre costs a cutout and becomes a vertebra)."""
    sy = make_spine(ids=[18, 19, 20, 21, 22, 23], margin=45.0)
    sem = sy.semantic.copy()
    c = corpus_centres(sem, sy.spacing)
    assert len(c) == 6
    body = np.argwhere(sy.semantic == 100)  # at a disc level, so no vertebra there to merge it into
    mid = np.round(body[body[:, 1] < np.median(body[:, 1])].mean(0)).astype(int)
    # a corpus blob ~40 mm in front of the spine (P is axis 0: anterior = smaller index), 9 mm across
    a = mid[0] - int(40 / sy.spacing[0])
    assert a > 3
    sem[a - 3:a + 3, mid[1] - 3:mid[1] + 3, mid[2] - 3:mid[2] + 3] = 49
    # an IVD speck (above the size floor, far below a disc's volume) in the middle of L2's body
    b = np.round(np.argwhere((sy.instance == 21) & (sy.semantic == 49)).mean(0)).astype(int)
    sem[b[0] - 3:b[0] + 3, b[1] - 1:b[1] + 2, b[2] - 3:b[2] + 3] = 100
    c = corpus_centres(sem, sy.spacing)
    assert len(c) == 6, c.repairs
    assert any("off the spine" in r for r in c.repairs)
    inside = sy.instance[tuple(np.round(c.centres).astype(int).T)]
    assert sorted(inside.tolist()) == [18, 19, 20, 21, 22, 23]  # one centre in each body, none on the blob


def test_present_ids_equals_unique_for_every_integer_type():
    from spineps_like.labels import present_ids

    rng = np.random.default_rng(1)
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64, np.int16, np.int32, np.int64):
        a = rng.integers(0, 40, (6, 7, 5)).astype(dt) * (rng.random((6, 7, 5)) < 0.3)
        assert np.array_equal(present_ids(a), np.unique(a).astype(np.int64)), dt
    neg = np.array([[-3, 0, 7, 7]], np.int32)
    assert present_ids(neg).tolist() == [-3, 0, 7]
    assert len(present_ids(np.zeros((0, 2), np.int32))) == 0
    assert present_ids(np.array([[True, False], [True, True]])).tolist() == [0, 1]
    wide = np.array([0, 5, 2**40, 5, 3], np.int64)  # a wide range (no counting array) and a strided view
    assert present_ids(wide[::2]).tolist() == [0, 3, 2**40]
    big = rng.integers(0, 300, (40, 30, 20)).astype(np.int32)[:, ::2, 1:]
    assert np.array_equal(present_ids(big), np.unique(big))


def test_bodies_merged_across_three_discs_are_all_recovered_with_their_ids():
    """Issue 27: a semantic mask whose lumbar bodies run together across three discs (disc labels lost): the
    instance phase (network + fusion + post-processing + labelling) recovers every body, each with its own id."""
    from spineps_like.evaluation.degrade import merge_bodies
    from spineps_like.geometry import reorient
    from spineps_like.io import Scan
    from spineps_like.phantom import make_phantom
    from spineps_like.pipeline import instance_phase

    ph = make_phantom(7, fov="lumbar", spacing=(1.3, 1.3, 3.9))
    sem, ins = reorient(ph.semantic, "PIR"), reorient(ph.instance, "PIR")
    merged = merge_bodies(sem.array, ins.array, sem.spacing, 3, np.random.default_rng(0))
    assert np.count_nonzero(merged == 100) < np.count_nonzero(sem.array == 100)
    _, out, _ = instance_phase(Scan(merged, sem.affine), method="network")
    gt = ins.array
    for g in [int(v) for v in np.unique(gt) if 0 < v < 26]:
        body = (gt == g) & (sem.array == 49)
        if not body.any():  # a vertebra the field of view cut above its body
            continue
        ids, n = np.unique(out.array[body], return_counts=True)
        assert ids[np.argmax(n)] == g and n.max() > 0.5 * body.sum(), (g, dict(zip(ids.tolist(), n.tolist())))
