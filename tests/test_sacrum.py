"""The sacrum on evidence (spineps_like.sacrum): stray sacrum labels do not anchor the ids, sacral segments painted
as corpus are taken into the sacrum, and a real sacrum is left alone."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from spineps_like.assign import assign_ivds_endplates
from spineps_like.instance.geometric import geometric_instances
from spineps_like.labeling import label_vertebrae
from spineps_like.labels import SACRUM_ID
from spineps_like.postprocess import check_consistency, postprocess
from spineps_like.sacrum import confirm_sacrum
from synthetic_spine import make_spine, phantom_ids


@lru_cache(maxsize=None)
def _lumbar(sacrum: bool = True):
    """L1-L5 (+ sacrum block) through the pipeline's instance steps (geometric vertebrae, ids, post-processing)."""
    sy = make_spine(ids=(20, 21, 22, 23, 24), sacrum=sacrum, endplates=True)
    vert = geometric_instances(sy.semantic, sy.spacing)
    inst, sem = assign_ivds_endplates(sy.semantic, vert, sy.spacing)
    sem, inst, _ = postprocess(sem, inst, sy.spacing)
    return sy, sem, inst


def _blob(sem: np.ndarray, inst: np.ndarray, label_from: int, n_vox: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel ``n_vox`` voxels of instance ``label_from``'s corpus (its topmost rows) as sacrum in both masks."""
    sem, inst = sem.copy(), inst.copy()
    idx = np.argwhere((inst == label_from) & (sem == 49))
    idx = idx[np.argsort(idx[:, 1], kind="stable")][:n_vox]
    sem[tuple(idx.T)] = SACRUM_ID
    inst[tuple(idx.T)] = SACRUM_ID
    return sem, inst


def test_a_real_sacrum_is_kept_and_nothing_changes():
    sy, sem, inst = _lumbar()
    s2, i2, rep = confirm_sacrum(sem, inst, sy.spacing)
    assert rep.confirmed and rep.absorbed == [] and rep.rejected_mm3 == 0
    assert np.array_equal(s2, sem) and np.array_equal(i2, inst)
    _, res = label_vertebrae(i2, s2, sy.spacing)
    assert res.anchor == "sacrum" and res.names[res.order[-1]] == "L5"


def test_a_stray_sacrum_blob_up_the_column_goes_back_to_its_vertebra_and_anchors_nothing():
    sy, sem, inst = _lumbar(sacrum=False)
    top = int(np.unique(inst[(inst > 0) & (inst < 26)])[0])
    bad_sem, bad_inst = _blob(sem, inst, top, 60)
    # before: any sacrum voxel anchors the count (the topmost of five vertebrae becomes L1 .. the lowest L5)
    _, before = label_vertebrae(bad_inst, bad_sem, sy.spacing)
    assert before.anchor == "sacrum"
    s2, i2, rep = confirm_sacrum(bad_sem, bad_inst, sy.spacing)
    assert not rep.confirmed and rep.rejected_mm3 > 0
    assert not (s2 == SACRUM_ID).any() and not (i2 == SACRUM_ID).any()
    # the blob went back to the vertebra it was cut from, as corpus
    assert np.array_equal(i2, inst) and np.array_equal(s2, sem)
    assert check_consistency(s2, i2) == []
    _, res = label_vertebrae(i2, s2, sy.spacing)
    assert res.anchor == "none"


def test_a_small_sacrum_at_the_bottom_is_not_an_anchor_but_a_large_one_is():
    sy, sem, inst = _lumbar()
    sac = np.argwhere(inst == SACRUM_ID)
    corpus = np.count_nonzero(sem == 49) / 5
    # keep only the top rows of the sacrum: 10% of a corpus
    order = np.argsort(sac[:, 1], kind="stable")
    drop = sac[order[int(0.1 * corpus):]]
    small_sem, small_inst = sem.copy(), inst.copy()
    small_sem[tuple(drop.T)] = 0
    small_inst[tuple(drop.T)] = 0
    _, _, rep = confirm_sacrum(small_sem, small_inst, sy.spacing)
    assert not rep.confirmed and any("too small" in n for n in rep.notes)
    _, _, rep = confirm_sacrum(small_sem, small_inst, sy.spacing, min_volume_fraction=0.05)
    assert rep.confirmed


def test_inputs_are_not_modified():
    sy, sem, inst = _lumbar(sacrum=False)
    bad_sem, bad_inst = _blob(sem, inst, int(np.unique(inst[(inst > 0) & (inst < 26)])[0]), 60)
    keep_sem, keep_inst = bad_sem.copy(), bad_inst.copy()
    confirm_sacrum(bad_sem, bad_inst, sy.spacing)
    assert np.array_equal(bad_sem, keep_sem) and np.array_equal(bad_inst, keep_inst)


def test_sacral_segments_painted_as_corpus_are_taken_into_the_sacrum():
    """S1 (and S2 under it, with the rudimentary disc between them) painted as corpus, as semantic models do: without
    this stage they are 'L5' / 'L6' and every id above shifts; with it they are sacrum and the ids are right."""
    from spineps_like.evaluation.degrade import sacrum_as_corpus
    from spineps_like.geometry import reorient
    from spineps_like.phantom import make_phantom

    ph = make_phantom(7, fov="lumbar", spacing=(1.3, 1.3, 3.9))
    sem = reorient(ph.semantic, "PIR").array
    ins = reorient(ph.instance, "PIR").array
    sp = reorient(ph.semantic, "PIR").spacing
    clean, rep = phantom_ids(sem, ph)
    assert rep.absorbed == [] and all(g == v for g, v in clean.items() if v)
    for segments in (1, 2):
        painted = sacrum_as_corpus(sem, ins, sp, segments, np.random.default_rng(0))
        assert (painted == 49).sum() > (sem == 49).sum()
        pairs, rep = phantom_ids(painted, ph)
        assert len(rep.absorbed) == segments, rep.notes
        assert pairs == clean
        assert phantom_ids(painted, ph, confirm=False)[0] != clean



def test_sacrum_crumbs_without_any_vertebra_are_no_sacrum_but_a_lone_sacrum_is_kept():
    """An image without a spine where the model painted a few voxels of sacrum (a noise image: 33 voxels) reports no
    sacrum; a scan that shows only the sacrum keeps it."""
    sy, sem, inst = _lumbar()
    lone_sem = np.where(sem == SACRUM_ID, sem, 0)
    lone_inst = np.where(inst == SACRUM_ID, inst, 0)
    s2, i2, rep = confirm_sacrum(lone_sem, lone_inst, sy.spacing)
    assert rep.confirmed and np.array_equal(s2, lone_sem)
    crumbs = np.zeros_like(sem)
    crumbs[10:13, 10:13, 10:13] = SACRUM_ID  # 27 voxels
    s3, i3, rep = confirm_sacrum(crumbs, crumbs.copy(), sy.spacing)
    assert not rep.confirmed and not s3.any() and not i3.any()
    assert any("not the sacrum" in n for n in rep.notes)
