"""IVD / endplate / sacrum ids: real crops (ground truth) and constructed cases."""

from __future__ import annotations

from functools import lru_cache

import cc3d
import numpy as np
import pytest

from spineps_like.assign import assign_ivds_endplates, vertebra_order
from spineps_like.instance.geometric import geometric_instances
from spineps_like.masks import contact_counts
from synthetic_spine import make_spine


def _crop(kind: str):
    from conftest import tptbox_crop

    return tptbox_crop(kind)


@lru_cache(maxsize=None)
def _spine(**kw):
    return make_spine(**kw)


def _own_corpus_by_contact(sem: np.ndarray, gt: np.ndarray) -> dict[int, int]:
    """Ground truth for 'own corpus', independent of distance transforms: each endplate component (6-connected)
    -> the GT vertebra whose corpus voxels it touches most."""
    ep = cc3d.connected_components(np.isin(sem, (52, 53, 62)), connectivity=6)
    corpus = np.where(np.isin(sem, (49, 50)), gt, 0)
    a, b, n = contact_counts(ep, corpus)
    out = {}
    for comp in np.unique(a):
        sel = a == comp
        out[int(comp)] = int(b[sel][np.argmax(n[sel])])
    return out, ep


@pytest.mark.parametrize("source", ["gt", "geometric"])
def test_mri_crop_ivds_and_endplates(source):
    sem, gt, sp = _crop("mri")
    if source == "gt":
        vert, expect = np.where(gt < 100, gt, 0), lambda v: v
    else:  # the geometric ids 1..3 are 5..7 in the GT
        vert, expect = geometric_instances(sem, sp), lambda v: v - 4
    inst, sem2 = assign_ivds_endplates(sem, vert, sp)
    # IVDs: exactly the GT discs (100 + vertebra above)
    ivd = sem == 100
    assert np.array_equal(inst[ivd] - 100, expect(gt[ivd] - 100))
    # endplates: 62 is gone, split into 52/53, every voxel on its own corpus
    assert not (sem2 == 62).any()
    ep = np.isin(sem, (62,))
    assert set(np.unique(sem2[ep]).tolist()) == {52, 53}
    own, comps = _own_corpus_by_contact(sem, gt)
    want = np.vectorize(lambda c: own.get(int(c), -1))(comps[ep])
    assert np.array_equal(inst[ep] - 200, expect(want))
    # against the GT's 2.1.3 convention (both endplates of a disc = vertebra above): inferior endplates agree,
    # superior endplates belong to the next vertebra
    inf = ep & (sem2 == 53)
    sup = ep & (sem2 == 52)
    assert np.array_equal(inst[inf], expect(gt[inf] - 200) + 200)
    assert np.array_equal(inst[sup], expect(gt[sup] - 200) + 201)
    # superior endplates lie above their corpus centre, inferior ones below
    ids, centres, _ = vertebra_order(np.where(inst < 100, inst, 0), sem2, sp)
    cy = dict(zip(ids.tolist(), centres[:, 1]))
    rows = np.nonzero(sup)[1]
    assert np.all(rows < np.vectorize(cy.get)(inst[sup] - 200))
    # vertebra ids untouched on bone
    bone = np.isin(sem, range(41, 50))
    assert np.array_equal(inst[bone], vert[bone])


def test_ct_crop_dense_corpus_maps_to_49_and_vertebrae_kept():
    sem, gt, sp = _crop("ct")
    vert = np.where(gt < 100, gt, 0)
    inst, sem2 = assign_ivds_endplates(sem, vert, sp)
    assert (sem == 50).any() and not (sem2 == 50).any()
    assert np.array_equal(sem2 == 49, np.isin(sem, (49, 50)))
    assert np.array_equal(inst, vert)  # no discs, endplates or sacrum in this crop


@pytest.mark.parametrize("kw", [dict(bend_deg=110.0), dict(bend_deg=-80.0, lateral_bend_deg=40.0)],
                         ids=["kyphosis", "lordosis+scoliosis"])
def test_ivd_on_a_curved_spine_gets_the_vertebra_above(kw):
    sy = _spine(**kw)
    vert = np.where(sy.instance < 100, sy.instance, 0)
    inst, _ = assign_ivds_endplates(sy.semantic, vert, sy.spacing)
    ivd = sy.semantic == 100
    assert np.array_equal(inst[ivd], sy.instance[ivd])
    # the spine is really curved: some disc lies higher (axis 1) than the corpus centre of the vertebra above it
    # would suggest for a straight spine, i.e. the disc normals turn by > 45 degrees along the spine
    ids, centres, axes = vertebra_order(vert, sy.semantic, sy.spacing)
    turn = np.degrees(np.arccos(np.clip(np.dot(axes[0], axes[-1]), -1, 1)))
    assert turn > 45


def test_merged_ivd_component_is_split_between_two_discs():
    sy = _spine()
    sem = sy.semantic.copy()
    ivd = sem == 100
    comps = cc3d.connected_components(ivd, connectivity=26)
    assert comps.max() == 4
    # bridge disc 1 and disc 2 with IVD voxels along the anterior face of vertebra 2
    d1 = np.argwhere(comps == 1)
    d2 = np.argwhere(comps == 2)
    x0 = min(d1[:, 0].min(), d2[:, 0].min()) - 2
    z = int(np.median(d1[:, 2]))
    y0, y1 = int(d1[:, 1].min()), int(d2[:, 1].max())
    sem[x0:x0 + 2, y0:y1 + 1, z - 1:z + 2] = 100
    assert cc3d.connected_components(sem == 100, connectivity=26).max() == 3
    vert = np.where(sy.instance < 100, sy.instance, 0)
    vert[sem == 100] = 0
    inst, _ = assign_ivds_endplates(sem, vert, sy.spacing)
    assert np.array_equal(inst[ivd], sy.instance[ivd])  # both discs keep their own ids
    bridge = (sem == 100) & ~ivd
    assert set(np.unique(inst[bridge]).tolist()) == {100 + sy.ids[0], 100 + sy.ids[1]}


def test_endplates_get_their_own_corpus_and_sacrum():
    sy = _spine(endplates=True, sacrum=True, bend_deg=50.0)
    vert = np.where(sy.instance < 100, sy.instance, 0)
    inst, sem2 = assign_ivds_endplates(sy.semantic, vert, sy.spacing)
    ep = sy.semantic == 62
    assert np.array_equal(inst[ep], sy.instance[ep])  # 200 + own vertebra, not the one above
    assert np.array_equal(inst[sy.semantic == 26], np.full(np.count_nonzero(sy.semantic == 26), 26))
    ivd = sy.semantic == 100
    assert np.array_equal(inst[ivd], sy.instance[ivd])
    assert 100 + sy.ids[-1] in np.unique(inst[ivd])  # the disc above the sacrum belongs to L5
    # each vertebra has a superior (52) and an inferior (53) endplate, each on its own side of the corpus
    for v in sy.ids:
        mine = inst == 200 + v
        assert set(np.unique(sem2[mine]).tolist()) == {52, 53}


def test_disc_above_the_topmost_vertebra_gets_the_vertebra_out_of_view():
    sy = _spine()
    vert = np.where(sy.instance < 100, sy.instance, 0)
    top = sy.ids[0]
    sem = sy.semantic.copy()
    sem[vert == top] = 0  # the top vertebra is out of view, its disc below is not
    vert[vert == top] = 0
    inst, _ = assign_ivds_endplates(sem, vert, sy.spacing)
    disc = sy.instance == 100 + top
    assert np.all(inst[disc] == 100 + sy.ids[1] - 1)


def test_assign_bad_input():
    with pytest.raises(ValueError, match="shape"):
        assign_ivds_endplates(np.zeros((4, 4, 4), np.int16), np.zeros((4, 4, 5), np.int16))
    with pytest.raises(ValueError, match="split_min_fraction"):
        assign_ivds_endplates(np.zeros((4, 4, 4), np.int16), np.zeros((4, 4, 4), np.int16), split_min_fraction=0.7)
    inst, sem = assign_ivds_endplates(np.full((4, 4, 4), 100, np.int16), np.zeros((4, 4, 4), np.int16))
    assert inst.max() == 0 and (sem == 100).all()  # no vertebra: nothing to assign to


def test_nearest_corpus_is_exact_in_mm():
    """The k-d tree on the seeds' surface finds a nearest seed voxel (in mm, anisotropic grid) for every target:
    its distance equals the exact Euclidean distance transform's, and its label is that voxel's."""
    from scipy import ndimage as ndi

    from spineps_like.assign import _nearest_corpus

    rng = np.random.default_rng(3)
    seeds = np.zeros((40, 50, 12), np.int32)
    for v in range(1, 6):  # five blocky 'corpora' with rough surfaces
        lo = rng.integers(0, [30, 40, 6])
        seeds[lo[0]:lo[0] + rng.integers(4, 10), lo[1]:lo[1] + rng.integers(4, 10), lo[2]:lo[2] + 5] = v
    seeds[rng.random(seeds.shape) < 0.05] = 0
    targets = (seeds == 0) & (rng.random(seeds.shape) < 0.3)
    sp = np.array([0.8, 1.1, 3.3])
    lab, near, t, box = _nearest_corpus(seeds, targets, sp, margin_mm=100.0)
    assert np.array_equal(t, np.argwhere(targets))
    exact = ndi.distance_transform_edt(seeds == 0, sampling=sp)[targets]
    got = np.linalg.norm((near - t) * sp, axis=1)
    assert np.allclose(got, exact)
    assert np.array_equal(lab, seeds[tuple(near.T)]) and (lab > 0).all()


def test_nearest_corpus_is_the_same_wherever_the_arrays_start():
    """Equidistant seeds (a grid is full of ties) are chosen the same way whether the margin box is clipped by the
    volume's edge or not: the instance phase runs this on the spine's bounding box, and must match the whole volume."""
    from spineps_like.assign import _nearest_corpus

    rng = np.random.default_rng(5)
    seeds = np.zeros((30, 40, 10), np.int32)
    seeds[3:9, 5:15, 2:8] = 1
    seeds[3:9, 25:35, 2:8] = 2  # a 'disc' between two 'corpora', at equal distance from both in its middle row
    seeds[rng.random(seeds.shape) < 0.1] = 0
    targets = np.zeros(seeds.shape, bool)
    targets[2:10, 15:25, 1:9] = True
    sp = np.array([0.7, 0.9, 3.1])
    lab0, near0, t0, _ = _nearest_corpus(seeds, targets, sp, margin_mm=20.0)  # margin box clipped at the volume edge
    for pad in (5, 40):
        big = np.pad(seeds, pad)
        lab, near, t, _ = _nearest_corpus(big, np.pad(targets, pad), sp, margin_mm=20.0)
        assert np.array_equal(t - pad, t0) and np.array_equal(near - pad, near0) and np.array_equal(lab, lab0)
    assert set(np.unique(lab0)) == {1, 2}


def test_vertebra_ids_are_the_vertebra_voxels_ids():
    from spineps_like.assign import vertebra_ids, vertebra_voxels

    inst = np.random.default_rng(0).integers(-5, 400, (20, 30, 10)).astype(np.int32)
    inst[0, 0, :3] = [26, 99, 100]
    assert np.array_equal(vertebra_ids(inst), np.where(vertebra_voxels(inst), inst, 0))
    assert np.array_equal(vertebra_ids(inst.astype(np.uint16).clip(0)), np.where(vertebra_voxels(inst.clip(0)), inst.clip(0), 0))


@pytest.mark.parametrize("spread", [3, 40, 10**9])
def test_unique_ints_equals_numpy_unique(spread):
    """The bincount shortcut (small key ranges) and the sorting fallback (wide ones) give np.unique's outputs."""
    from spineps_like.masks import unique_ints

    rng = np.random.default_rng(spread % 97)
    for n in (0, 1, 50, 5000):
        keys = rng.integers(0, spread, n, dtype=np.int64)
        ref = np.unique(keys, return_inverse=True, return_counts=True)
        got = unique_ints(keys, return_inverse=True, return_counts=True)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, ref))
        assert np.array_equal(unique_ints(keys), np.unique(keys))
        assert np.array_equal(unique_ints(keys, return_counts=True)[1], ref[2])


def test_vertebra_order_without_any_corpus_voxel():
    """Vertebrae whose corpus the semantic mask lost entirely (a real-scan failure mode): centres from all their
    voxels, no integer-division error."""
    from spineps_like.assign import vertebra_order

    vert = np.zeros((6, 12, 6), np.int32)
    vert[1:4, 1:4, 1:4] = 20
    vert[1:4, 6:10, 1:4] = 21
    sem = np.where(vert > 0, 41, 0).astype(np.uint8)  # arcus only
    ids, cen, _ = vertebra_order(vert, sem)
    assert ids.tolist() == [20, 21]
    np.testing.assert_allclose(cen, [[2.0, 2.0, 2.0], [2.0, 7.5, 2.0]])
