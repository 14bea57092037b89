"""Inter-Dice fusion of per-cutout predictions: constructed cases and the real TPTBox ground truth."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from spineps_like.instance.cutouts import (
    ABOVE, BELOW, CENTRE, SparseMask, SparsePrediction, cutout_targets, extract_cutouts, sparse_prediction,
)
from spineps_like.instance.fusion import fuse_predictions
from spineps_like.io import load_scan


def toy_spine(n: int = 5, height: int = 8, gap: int = 3, shape_r: int = 20):
    """n vertebrae (corpus 49 + arcus 41 + spinous 42) stacked along axis 1; ids 20.. top to bottom."""
    shape = (40, n * (height + gap) + 2 * gap, shape_r)
    sem = np.zeros(shape, np.int16)
    inst = np.zeros(shape, np.int16)
    ids = list(range(20, 20 + n))
    for k, v in enumerate(ids):
        i0 = gap + k * (height + gap)
        sl_i = slice(i0, i0 + height)
        sem[4:16, sl_i, 4:16] = 49
        sem[16:24, sl_i, 6:14] = 41
        sem[24:32, i0 + 2:i0 + height, 9:11] = 42
        inst[4:34, sl_i, 4:16] = np.where(sem[4:34, sl_i, 4:16] > 0, v, 0)
    centres = np.array(ndimage.center_of_mass(sem == 49, inst, ids))
    return sem, inst, ids, centres


def perfect_predictions(sem, inst, ids, centres, size):
    cut = extract_cutouts(sem, centres, size)
    tgt = cutout_targets(inst, ids, cut)
    return [sparse_prediction(tgt[k], k, cut) for k in range(len(ids))], cut


def assert_matches_gt(res, inst, ids, min_dice=0.999):
    """Each GT vertebra is one instance (ids 1..K top to bottom) and no instance covers two vertebrae."""
    assert res.n_instances == len(ids)
    for k, v in enumerate(ids):
        g, m = inst == v, res.instance == k + 1
        assert 2 * (g & m).sum() / (g.sum() + m.sum()) >= min_dice, (v, k + 1)
    for i in range(1, res.n_instances + 1):
        owners = np.unique(inst[res.instance == i])
        assert len(owners[owners > 0]) == 1, f"instance {i} covers vertebrae {owners}"


def test_three_consistent_predictions_fuse_into_one_vertebra():
    sem, inst, ids, centres = toy_spine(5)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)
    three = [g for g in res.groups if len(g.members) == 3]
    assert three and all(g.status == "committed" for g in three)
    g2 = next(g for g in res.groups if (2, CENTRE) in g.members)
    assert g2.members == ((1, BELOW), (2, CENTRE), (3, ABOVE)) and g2.score == pytest.approx(1.0)
    assert res.centre_ids == {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}
    assert res.warnings == []
    assert res.instance.dtype == np.uint16
    summary = res.summary()
    assert summary["n_instances"] == 5 and json.dumps(summary)


def _replace(pred: SparsePrediction, cls: int, dense: np.ndarray) -> None:
    m = SparseMask.from_dense(dense)
    if m is None:
        pred.classes.pop(cls, None)
    else:
        pred.classes[cls] = m


def test_one_disagreeing_prediction_neither_splits_nor_merges():
    sem, inst, ids, centres = toy_spine(5)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    # cutout 1 sees its 'below' vertebra shifted down by half a vertebra: half of vertebra 2, half of vertebra 3
    wrong = np.roll(preds[1].classes[BELOW].to_dense(sem.shape), 6, axis=1) & (sem > 0)
    assert (wrong & (inst == ids[2])).any() and (wrong & (inst == ids[3])).any()
    _replace(preds[1], BELOW, wrong)
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)
    # the disagreeing prediction is accounted for, not silently dropped
    g = next(g for g in res.groups if (1, BELOW) in g.members)
    assert g.status in ("committed", "duplicate")
    assert any("1:below" in d for d in res.decisions)


def test_disagreeing_centre_prediction_spanning_two_vertebrae_does_not_merge_them():
    sem, inst, ids, centres = toy_spine(5)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    _replace(preds[2], CENTRE, np.isin(inst, ids[2:4]))  # cutout 2 claims vertebrae 2 and 3 as its centre
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)


def test_empty_cutout_prediction_does_not_abort():
    sem, inst, ids, centres = toy_spine(5)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    preds[2].classes.clear()
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)  # its neighbours still see vertebra 2
    assert any("cutout 2" in w and "no vertebra" in w for w in res.warnings)
    assert res.centre_ids[2] == 0
    empty = fuse_predictions([SparsePrediction(0, (1, 1, 1), ((0, 0, 0), (5, 5, 5)))], (5, 5, 5))
    assert empty.n_instances == 0 and empty.warnings
    assert fuse_predictions([], (5, 5, 5)).instance.shape == (5, 5, 5)


def test_two_touching_vertebrae_stay_two():
    sem, inst, ids, centres = toy_spine(2, gap=0)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 24, 24))
    assert (ndimage.binary_dilation(inst == ids[0]) & (inst == ids[1])).any()  # they touch
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)


def test_two_corpus_centres_in_one_vertebra_give_one_instance_and_a_warning():
    sem, inst, ids, centres = toy_spine(4)
    # a second centre inside vertebra 1 (as from a wrongly split corpus): cutouts 1 and 2 both centre on it
    cents2 = np.vstack([centres[:2], centres[1] + np.array([0.0, 2.0, 0.0]), centres[2:]])
    cut = extract_cutouts(sem, cents2, (48, 32, 24))
    tgt = cutout_targets(inst, ids, cut, centre_index=[0, 1, 1, 2, 3])
    preds = [sparse_prediction(tgt[k], k, cut) for k in range(5)]
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids)
    assert res.centre_ids[1] == res.centre_ids[2] == 2
    assert any("cutouts 1, 2" in w for w in res.warnings)


def test_instance_holding_two_disagreeing_centres_is_split():
    sem, inst, ids, centres = toy_spine(4)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    # every view of vertebra 1 also claims vertebra 2, except cutout 2's own centre prediction
    both = np.isin(inst, ids[1:3])
    _replace(preds[0], BELOW, both)
    _replace(preds[1], CENTRE, both)
    _replace(preds[2], ABOVE, both)
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, inst, ids, min_dice=0.9)
    assert any("split" in w for w in res.warnings)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        fuse_predictions([], (5, 5))
    sem, inst, ids, centres = toy_spine(2)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 24, 24))
    with pytest.raises(ValueError, match="two predictions for cutout 0"):
        fuse_predictions([preds[0], preds[0]], sem.shape)


def _tptbox(name):
    import TPTBox

    d = Path(TPTBox.__file__).parent / "tests" / name
    sem = load_scan(glob.glob(str(d / "*seg-subreg*_msk.nii.gz"))[0], kind="mask").array
    inst = load_scan(glob.glob(str(d / "*seg-vert*_msk.nii.gz"))[0], kind="mask").array
    return np.where(sem == 50, 49, sem), inst


@pytest.mark.parametrize("crop", ["sample_mri", "sample_ct"])
def test_perfect_predictions_on_real_ground_truth_reproduce_the_vertebrae(crop):
    sem, inst = _tptbox(crop)
    ids = [int(v) for v in np.unique(inst) if 0 < v < 100]
    centres = np.array(ndimage.center_of_mass(sem == 49, inst, ids))
    order = np.argsort(centres[:, 1])
    ids, centres = [ids[i] for i in order], centres[order]
    vert_gt = np.where(np.isin(sem, range(41, 50)), inst, 0)
    # large cutouts: every voxel of every vertebra is visible -> exact reproduction
    preds, _ = perfect_predictions(sem, inst, ids, centres, (144, 96, 144))
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, vert_gt, ids, min_dice=1.0)
    assert res.warnings == []
    # SPINEPS-sized views relative to the anatomy (neighbours cut by the cutout border): still one instance per
    # vertebra, none merged, every voxel a cutout sees as its centre vertebra kept
    preds, cut = perfect_predictions(sem, inst, ids, centres, (48, 32, 48))
    res = fuse_predictions(preds, sem.shape)
    assert_matches_gt(res, vert_gt, ids, min_dice=0.8)
    for k, p in enumerate(preds):
        c = p.classes[CENTRE].to_dense(sem.shape)
        assert np.all(res.instance[c] == k + 1)


def test_size_limits_follow_the_spacing():
    sem, inst, ids, centres = toy_spine(3)
    preds, _ = perfect_predictions(sem, inst, ids, centres, (48, 32, 24))
    for k, cls in ((0, BELOW), (1, CENTRE), (2, ABOVE)):  # every view of vertebra 1 adds a detached 3x3x3 blob
        dense = preds[k].classes[cls].to_dense(sem.shape)
        dense[36:39, 16:19, 1:4] = True
        _replace(preds[k], cls, dense)
    fine = fuse_predictions(preds, sem.shape, spacing=(1.0, 1.0, 1.0))  # 27 mm^3 < 100 mm^3: removed
    coarse = fuse_predictions(preds, sem.shape, spacing=(3.0, 3.0, 3.0))  # 729 mm^3: kept
    assert fine.instance[37, 17, 2] == 0 and any("fragments" in d for d in fine.decisions)
    assert coarse.instance[37, 17, 2] == 2
    assert_matches_gt(fine, inst, ids)
