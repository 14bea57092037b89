"""The degraded-mask suite's degradations (spineps_like.evaluation.degrade) on a small lumbar phantom, and one degraded
mask run through the geometric instance phase and scored."""

from __future__ import annotations

import cc3d
import edt
import numpy as np
import pytest

from spineps_like.evaluation import evaluate
from spineps_like.evaluation.degrade import (
    BODY_LABELS,
    DEGRADATIONS,
    LEFT_PROCESSES,
    LEVELS,
    RIGHT_PROCESSES,
    body_ids,
    degrade,
)
from spineps_like.io import Scan
from spineps_like.phantom import make_phantom

FAST = (1.3, 1.3, 3.9)  # coarse but anisotropic like a sagittal scan, as the phantom tests use


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(11, fov="lumbar", spacing=FAST, orientation="PIR")  # T10-L5 + sacrum, discs 118-124


@pytest.fixture(scope="module")
def ph(phantom):
    return phantom.semantic.array, phantom.instance.array, phantom.semantic.spacing


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def changes(before: np.ndarray, after: np.ndarray) -> dict[tuple[int, int], int]:
    """{(old label, new label): voxels}."""
    ch = before != after
    pairs, counts = np.unique(np.stack([before[ch], after[ch]]), axis=1, return_counts=True)
    return {(int(a), int(b)): int(n) for (a, b), n in zip(pairs.T, counts)}


def test_registry_names_and_levels():
    assert list(DEGRADATIONS) == ["merge_bodies", "bleed_into_disc", "missing_corpus", "erode_corpus",
                                  "dilate_corpus", "false_blobs", "sacrum_as_corpus", "posterior_missing_one_side",
                                  "label_noise", "combined"]
    for table in LEVELS.values():
        assert set(table) == set(DEGRADATIONS)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade("blur", np.zeros((4, 4, 4), np.int16), np.zeros((4, 4, 4), np.int16), (1, 1, 1), 1, rng())
    with pytest.raises(ValueError, match="severity"):
        degrade("erode_corpus", np.zeros((4, 4, 4), np.int16), np.zeros((4, 4, 4), np.int16), (1, 1, 1), -1, rng())


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_severity_zero_is_identity_and_ground_truth_untouched(ph, name):
    sem, ins, sp = ph
    sem0, ins0 = sem.copy(), ins.copy()
    same = DEGRADATIONS[name](sem, ins, sp, 0, rng())
    assert same is not sem and np.array_equal(same, sem)
    out = DEGRADATIONS[name](sem, ins, sp, LEVELS["moderate"][name], rng())
    assert out.shape == sem.shape and out.dtype == sem.dtype
    assert (out != sem).any(), f"{name} at moderate severity changed nothing"
    assert np.array_equal(sem, sem0) and np.array_equal(ins, ins0)  # inputs (the ground truth) never change


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_deterministic_with_the_same_seed(ph, name):
    sem, ins, sp = ph
    sev = LEVELS["moderate"][name]
    assert np.array_equal(DEGRADATIONS[name](sem, ins, sp, sev, rng(7)), DEGRADATIONS[name](sem, ins, sp, sev, rng(7)))


def test_merge_bodies_two_discs_between_three_consecutive_bodies(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["merge_bodies"](sem, ins, sp, 2, rng(3))
    ch = changes(sem, out)
    assert set(ch) <= {(100, 49), (52, 49), (53, 49)}
    lost = sorted(int(d) for d in np.unique(ins[(sem == 100) & (out == 49)]))
    assert len(lost) == 2 and lost[1] == lost[0] + 1  # two discs, consecutive (L1=20 .. L5=24, T10-T12 17-19)
    upper, middle, lower = lost[0] - 100, lost[1] - 100, lost[1] - 100 + 1
    for d in lost:  # each disc entirely gone, with the endplates beside it
        assert not ((sem == 100) & (ins == d) & (out == 100)).any()
    assert not ((ins == 200 + upper) & (sem == 53) & (out != 49)).any()
    assert not ((ins == 200 + middle) & np.isin(sem, (52, 53)) & (out != 49)).any()
    assert not ((ins == 200 + lower) & (sem == 52) & (out != 49)).any()
    # everything else as it was: the other discs, all other labels
    other = ~((sem == 100) & np.isin(ins, lost)) & ~np.isin(ins, [200 + upper, 200 + middle, 200 + lower])
    assert np.array_equal(out[other], sem[other])
    # the three bodies now form one corpus component
    bodies = body_ids(sem, ins)
    labels = cc3d.connected_components(out == 49, connectivity=6)
    comps = {int(np.bincount(labels[bodies == v]).argmax()) for v in (upper, middle, lower)}
    assert len(comps) == 1 and 0 not in comps


def test_merge_bodies_asks_more_discs_than_there_are(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["merge_bodies"](sem, ins, sp, 30, rng())
    discs = sorted(int(d) for d in np.unique(ins[sem == 100]))
    merged = sorted(int(d) for d in np.unique(ins[(sem == 100) & (out == 49)]))
    # every disc between two bodies (the longest run there is); never the L5/S1 disc, which lies on the sacrum
    assert discs[-1] == 124 and merged == discs[:-1]


@pytest.mark.parametrize("mm", [2.0, 3.0])
def test_erode_corpus_by_mm(ph, mm):
    sem, ins, sp = ph
    body = np.isin(sem, BODY_LABELS)
    dist = edt.edt(body.astype(np.uint8), anisotropy=sp, black_border=False)  # mm to the nearest non-body voxel
    out = DEGRADATIONS["erode_corpus"](sem, ins, sp, mm, rng())
    kept = np.isin(out, BODY_LABELS)
    assert np.array_equal(kept, body & (dist > mm))  # exactly the voxels deeper than mm stay
    removed = body & ~kept
    assert dist[removed].max() <= mm and dist[removed].max() > mm - max(sp)
    assert np.array_equal(out[kept], sem[kept]) and np.array_equal(out[~body], sem[~body])
    # removed voxels take a neighbouring structure's label: mostly disc (endplate side) and background
    new = changes(sem, out)
    assert all(a in BODY_LABELS and b not in BODY_LABELS for a, b in new)
    assert {b for _, b in new} >= {0, 100}


def test_erosion_thinner_than_a_voxel_changes_nothing(ph):
    sem, ins, sp = ph  # distances between voxel centres: no body voxel lies within 1 mm of a 1.3 mm voxel outside
    assert np.array_equal(DEGRADATIONS["erode_corpus"](sem, ins, sp, 1.0, rng()), sem)


def test_dilate_and_bleed_by_mm(ph):
    sem, ins, sp = ph
    body = np.isin(sem, BODY_LABELS)
    near = edt.edt((~body).astype(np.uint8), anisotropy=sp, black_border=False) <= 2.0
    dil = DEGRADATIONS["dilate_corpus"](sem, ins, sp, 2.0, rng())
    assert np.array_equal(dil != sem, near & np.isin(sem, (0, 100)))
    assert set(changes(sem, dil)) == {(0, 49), (100, 49)}
    bleed = DEGRADATIONS["bleed_into_disc"](sem, ins, sp, 2.0, rng())
    assert np.array_equal(bleed != sem, near & (sem == 100))
    assert set(changes(sem, bleed)) == {(100, 49)}
    # each disc keeps a core: 2 mm from either side does not cut a lumbar disc through
    for d in range(118, 124):
        assert ((ins == d) & (bleed == 100)).any()


def test_missing_corpus_removes_one_body_and_keeps_its_arch(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["missing_corpus"](sem, ins, sp, 1, rng(5))
    assert set(changes(sem, out)) <= {(49, 0), (52, 0), (53, 0)}
    bodies = body_ids(sem, ins)
    gone = [v for v in np.unique(bodies[bodies > 0]) if not np.isin(out[bodies == v], BODY_LABELS).any()]
    assert len(gone) == 1
    assert np.array_equal(out != sem, bodies == gone[0])
    assert (np.isin(out, (41, 42)) & (ins == gone[0])).any()  # the posterior elements stay


def test_false_blobs_in_front_of_the_spine(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["false_blobs"](sem, ins, sp, 2, rng(1))
    assert set(changes(sem, out)) == {(0, 49), (0, 100)}
    new = out != sem
    labels, n = cc3d.connected_components(new, connectivity=26, return_N=True)
    assert n == 2
    spine_front = np.argwhere(np.isin(sem, BODY_LABELS))[:, 0].min()  # most anterior body voxel (axis 0 = P)
    vox_mm3 = float(np.prod(sp))
    for k in (1, 2):
        blob = labels == k
        assert 1.0 < blob.sum() * vox_mm3 / 1000 < 5.0  # cm3, a small body
        assert len(np.unique(out[blob])) == 1
        assert np.argwhere(blob)[:, 0].max() < spine_front  # entirely in front of the spine
    assert sorted(int(np.unique(out[labels == k])[0]) for k in (1, 2)) == [49, 100]


@pytest.mark.parametrize("segments", [1, 2])
def test_sacrum_as_corpus(ph, segments):
    sem, ins, sp = ph
    out = DEGRADATIONS["sacrum_as_corpus"](sem, ins, sp, segments, rng())
    ch = changes(sem, out)
    assert set(ch) == ({(26, 49)} if segments == 1 else {(26, 49), (26, 100)})
    new_corpus = (sem == 26) & (out == 49)
    # the new corpus sits under the L5/S1 disc, about a lumbar body height per segment
    l5s1 = (sem == 100) & (ins == 124)
    below = np.zeros_like(l5s1)
    below[:, 1:] = l5s1[:, :-1]
    assert (below & new_corpus).any()
    l5 = np.argwhere(body_ids(sem, ins) == 24)[:, 1]
    height = (l5.max() - l5.min() + 1) * sp[1]
    extent = (np.ptp(np.argwhere(new_corpus)[:, 1]) + 1) * sp[1]
    assert 0.6 * segments * height < extent < 1.6 * segments * height
    comps = cc3d.connected_components(new_corpus, connectivity=6, return_N=True)[1]
    if segments == 1:
        assert comps == 1
    else:  # a thin disc separates S1 from S2
        assert comps == 2 and ch[(26, 100)] < ch[(26, 49)] / 5


def test_sacrum_as_corpus_without_sacrum_changes_nothing(ph):
    sem, ins, sp = ph
    sem = np.where(sem == 26, 0, sem).astype(sem.dtype)
    assert np.array_equal(DEGRADATIONS["sacrum_as_corpus"](sem, ins, sp, 2, rng()), sem)


@pytest.mark.parametrize("count", [3, 99])
def test_posterior_missing_one_side(ph, count):
    sem, ins, sp = ph
    out = DEGRADATIONS["posterior_missing_one_side"](sem, ins, sp, count, rng(2))
    ch = changes(sem, out)
    olds = {a for a, _ in ch}
    assert {b for _, b in ch} == {0}
    side = LEFT_PROCESSES if olds <= set(LEFT_PROCESSES) else RIGHT_PROCESSES
    assert olds <= set(side)
    other = RIGHT_PROCESSES if side is LEFT_PROCESSES else LEFT_PROCESSES
    assert np.array_equal(np.isin(out, other), np.isin(sem, other))
    hit = np.unique(ins[out != sem])
    with_side = np.unique(ins[np.isin(sem, side)])
    assert len(hit) == min(count, len(with_side))
    assert np.all(np.diff(hit) == 1)  # consecutive vertebrae (T10-L5 ids are consecutive here)
    assert not np.isin(out[np.isin(ins, hit)], side).any()


def test_label_noise_flips_the_fraction_to_touching_labels(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["label_noise"](sem, ins, sp, 2, rng())
    spine = int((sem > 0).sum())
    changed = int((out != sem).sum())
    assert changed == round(0.02 * spine)
    touching = set()
    for ax in range(3):
        a = np.moveaxis(sem, ax, 0)
        d = a[1:] != a[:-1]
        touching |= set(zip(a[1:][d].tolist(), a[:-1][d].tolist())) | set(zip(a[:-1][d].tolist(), a[1:][d].tolist()))
    assert set(changes(sem, out)) <= touching
    assert (sem[out != sem] > 0).all()  # only spine voxels flip


def test_combined_does_several_things(ph):
    sem, ins, sp = ph
    out = DEGRADATIONS["combined"](sem, ins, sp, 2, rng())
    ch = changes(sem, out)
    assert ch.get((100, 49), 0) > 0  # bleeding
    assert ch.get((49, 0), 0) > 0  # erosion
    assert (out[sem == 0] == 49).sum() * np.prod(sp) > 1000  # a false corpus blob (> 1 cm3; plus noise)


def test_mild_erosion_runs_through_the_geometric_instance_phase():
    from spineps_like.pipeline import instance_phase

    p = make_phantom(11, fov="lumbar", spacing=(0.9, 0.9, 3.3), orientation="PIR")  # sagittal in-plane voxels
    sem, ins, sp = p.semantic.array, p.instance.array, p.semantic.spacing
    deg = DEGRADATIONS["erode_corpus"](sem, ins, sp, 1.0, rng())
    assert (deg != sem).sum() > 1000
    _, pred, _ = instance_phase(Scan(deg, p.semantic.affine), method="geometric")
    m = evaluate(pred.array, ins, sp)
    for k in ("vertebra.pq", "vertebra.rq", "vertebra.sq", "vertebra.id_rate", "ivd.pq"):
        assert 0.0 <= m[k] <= 1.0
    # a 1 mm erosion still gives every vertebra, with the right id, on main's geometric method
    assert m["vertebra.rq"] == 1.0 and m["vertebra.fn"] == 0 and m["vertebra.fp"] == 0
    assert m["vertebra.id_rate"] == 1.0
    assert m["vertebra.pq"] > 0.9
