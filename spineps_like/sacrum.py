"""The sacrum on evidence: which sacrum label is the sacrum, and which 'vertebrae' are sacral segments.

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis. Runs after
post-processing (semantic and instance masks agree) and before labelling, which anchors the ids on the sacrum when
one is in view: a wrong sacrum shifts every id, so here the sacrum must show its own evidence.

1. **Which sacrum label is the sacrum.** A component of the sacrum label (26) is kept as sacrum when it lies at the
   bottom of the column (it reaches below the lowest vertebral body and its centre is not above the second-lowest
   vertebra's) and is large enough (the largest such component at least ``min_volume_fraction`` x the median
   corpus volume). A semantic model's stray sacrum blobs (a few hundred mm3 at the top of a cervical crop,
   crumbs in a lumbar body) fail and are given back to the nearest vertebra within ``reach_mm`` (its instance id and
   semantic label) or removed from both masks.
2. **Sacral segments painted as corpus.** One of the lowest two vertebrae is a sacral segment when the kept sacrum
   flanks its body on both sides at the body's mid-height (the alae beside S1), or on one side while it has almost
   no posterior elements of its own (the sacrum's laminae and crest carry label 26); it and every vertebra below it
   (S2 under S1, which the alae do not reach) become sacrum in both masks, with their endplates and discs. L5 is never flanked at its mid-height: the alae begin at the
   S1 endplate, below the L5/S1 disc.

Everything is decided on the spine's voxels and per-component statistics (:func:`cc3d.statistics`); the one distance
transform runs on the bounding box of the rejected sacrum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage as ndi

from spineps_like.assign import vertebra_ids, vertebra_order
from spineps_like.geometry import bbox, grow_box
from spineps_like.labels import ENDPLATE_OFFSET, IVD_OFFSET, SACRUM_ID, VERTEBRA_LABELS, label_mask
from spineps_like.masks import check_mask, check_spacing

BODY_LABELS: tuple[int, ...] = (49, 52, 53)
POSTERIOR_LABELS: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48)


@dataclass
class SacrumReport:
    """What :func:`confirm_sacrum` decided.

    Attributes
    ----------
    confirmed : True when a sacrum with its own evidence is in view (the labelling may anchor on it).
    volume_mm3 : volume of the kept sacrum (sacral segments included).
    rejected_mm3 : volume of the sacrum label that was not the sacrum (given to a vertebra or removed).
    absorbed : instance ids (input numbering) of the 'vertebrae' taken into the sacrum as sacral segments.
    notes : one line per decision.
    """

    confirmed: bool = False
    volume_mm3: float = 0.0
    rejected_mm3: float = 0.0
    absorbed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _corpus_voxels(vert: np.ndarray, sem: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Corpus voxels per vertebra in ``ids``."""
    n = int(max(ids.max(initial=0), 1)) + 1
    corpus = np.bincount(vert[sem == 49], minlength=n)
    return corpus[ids]


def _stray_sacrum(sem: np.ndarray, inst: np.ndarray, cc: np.ndarray, keep: np.ndarray, sp: np.ndarray,
                  reach_mm: float) -> int:
    """Give the voxels of the rejected sacrum components (``cc`` ids not in ``keep``) to the nearest vertebra bone
    voxel within ``reach_mm`` (instance id and semantic label), or clear them in both masks; in place. Returns the
    voxel count."""
    rejected = (cc > 0) & ~np.isin(cc, keep)
    # a disc or endplate named after the sacrum (126 / 226) is no longer one when no sacrum is kept
    if len(keep) == 0:
        rejected |= (inst == IVD_OFFSET + SACRUM_ID) | (inst == ENDPLATE_OFFSET + SACRUM_ID)
    n = int(rejected.sum())
    if n == 0:
        return 0
    margin = int(np.ceil(reach_mm / sp.min())) + 1
    box = grow_box(bbox(rejected), sem.shape, margin)
    s, i, r = sem[box], inst[box], rejected[box]
    bone = label_mask(s, VERTEBRA_LABELS) & (i > 0) & (i < IVD_OFFSET) & (i != SACRUM_ID)
    if not bone.any():
        s[r], i[r] = 0, 0
        return n
    dist, idx = ndi.distance_transform_edt(~bone, sampling=sp, return_indices=True)
    near = r & (dist <= reach_mm)
    src = tuple(a[near] for a in idx)
    v = i[src]
    was_endplate = i[near] == ENDPLATE_OFFSET + SACRUM_ID
    was_disc = i[near] == IVD_OFFSET + SACRUM_ID
    i[near] = np.where(was_endplate, ENDPLATE_OFFSET + v, np.where(was_disc, IVD_OFFSET + v, v))
    s[near] = np.where(was_endplate | was_disc, s[near], s[src])
    far = r & ~near
    s[far], i[far] = 0, 0
    return n


def _flanking(sacrum: np.ndarray, body: np.ndarray, axis_mm: np.ndarray, sp: np.ndarray) -> tuple[int, int]:
    """Sacrum voxels left and right of ``body`` at its mid-height (middle half of its extent along the spine axis),
    within its antero-posterior range."""
    bc = np.argwhere(body)
    sc = np.argwhere(sacrum)
    if len(bc) == 0 or len(sc) == 0:
        return 0, 0
    origin = bc.mean(axis=0)
    qb = ((bc - origin) * sp) @ axis_mm
    qs = ((sc - origin) * sp) @ axis_mm
    lo, hi = np.percentile(qb, [25, 75])
    p_lo, p_hi = bc[:, 0].min(), bc[:, 0].max()
    level = (qs >= lo) & (qs <= hi) & (sc[:, 0] >= p_lo) & (sc[:, 0] <= p_hi)
    r_lo, r_hi = bc[:, 2].min(), bc[:, 2].max()
    return int(np.count_nonzero(level & (sc[:, 2] < r_lo))), int(np.count_nonzero(level & (sc[:, 2] > r_hi)))


def _absorb(sem: np.ndarray, inst: np.ndarray, v: int) -> int:
    """Make vertebra ``v``, its endplates and the disc below it sacrum in both masks (in place); voxel count."""
    sel = (inst == v) | (inst == ENDPLATE_OFFSET + v) | (inst == IVD_OFFSET + v)
    sem[sel] = SACRUM_ID
    inst[sel] = SACRUM_ID
    return int(sel.sum())


def confirm_sacrum(
    semantic: np.ndarray,
    instance: np.ndarray,
    spacing: Sequence[float],
    *,
    min_volume_fraction: float = 0.25,
    reach_mm: float = 5.0,
    max_segments: int = 2,
    flank_fraction: float = 0.02,
    posterior_share: float = 0.1,
    min_alone_mm3: float = 5000.0,
) -> tuple[np.ndarray, np.ndarray, SacrumReport]:
    """Keep the sacrum label only where it is the sacrum, and take sacral segments painted as corpus into it.

    Parameters
    ----------
    semantic, instance : (X, Y, Z) int arrays, PIR, consistent (after :func:`spineps_like.postprocess.postprocess`)
    spacing : 3 floats, mm
    min_volume_fraction : the sacrum (its largest component at the bottom of the column) must hold at least this x
        the median vertebral-body volume.
    reach_mm : rejected sacrum voxels within this distance of vertebra bone join that vertebra; the rest are cleared.
    max_segments : at most this many vertebrae at the bottom are taken into the sacrum (S1, S2).
    flank_fraction : a flank counts when it holds at least this x the body's voxels.
    posterior_share : a vertebra flanked on one side only is a sacral segment when its posterior elements are below
        this share of its bone.
    min_alone_mm3 : without any vertebra to compare with, a sacrum component is kept only from this volume on (an
        adult sacrum holds about 100 cm3; a scan cut to its lowest part still shows several cm3): a model's crumbs of
        sacrum label in an image without a spine are no sacrum.

    Returns
    -------
    semantic, instance, report : new arrays (inputs untouched) and a :class:`SacrumReport`.
    """
    sem, inst, sp = _checked(semantic, instance, spacing)
    rep = SacrumReport()
    vox_mm3 = float(np.prod(sp))
    sacrum_label = sem == SACRUM_ID
    if not sacrum_label.any():
        rep.notes.append("no sacrum label in the mask")
        return sem, inst, rep
    cc = cc3d.connected_components(sacrum_label, connectivity=26).astype(np.int32)
    st = cc3d.statistics(cc)
    vert = vertebra_ids(inst)
    ids, vcen, axes = vertebra_order(vert, sem, sp)
    if len(ids) == 0:
        keep, notes = _sacrum_alone(st["voxel_counts"][1:], vox_mm3, min_alone_mm3)
    else:
        at_bottom, below_mm = _at_bottom(cc, st, vert, sem, ids, vcen, axes[-1], sp)
        keep, notes = _sacrum_at_bottom(st["voxel_counts"][1:], at_bottom, below_mm,
                                        _median_body(vert, sem, ids), vox_mm3, min_volume_fraction)
    rep.notes.extend(notes)
    n_rejected = _stray_sacrum(sem, inst, cc, keep, sp, reach_mm)
    rep.rejected_mm3 = round(n_rejected * vox_mm3, 1)
    if n_rejected:
        rep.notes.append(f"{rep.rejected_mm3:.0f} mm3 of sacrum label given to the nearest vertebra within "
                         f"{reach_mm:g} mm or removed")
    rep.confirmed = len(keep) > 0
    if rep.confirmed and len(ids) > 1:
        _take_sacral_segments(sem, inst, sp, rep, flank_fraction, posterior_share, max_segments)
    rep.volume_mm3 = round(float(np.count_nonzero(sem == SACRUM_ID)) * vox_mm3, 1)
    return sem, inst, rep


def _checked(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the two masks (checked, same shape) and the checked spacing."""
    sem = check_mask(semantic).copy()
    inst = check_mask(instance, "instance mask").copy()
    if sem.shape != inst.shape:
        raise ValueError(f"instance mask shape {inst.shape} differs from the semantic mask {sem.shape}")
    return sem, inst, check_spacing(spacing)


def _sacrum_alone(counts: np.ndarray, vox_mm3: float, min_alone_mm3: float) -> tuple[np.ndarray, list[str]]:
    """Without a vertebra to compare with: the sacrum components (voxel ``counts``) kept, those of at least
    ``min_alone_mm3`` (ids 1..n), and the notes."""
    notes = []
    big = counts * vox_mm3 >= min_alone_mm3
    keep = np.flatnonzero(big) + 1
    if big.any():
        notes.append(f"sacrum kept without a vertebra to compare it with: {counts[big].sum() * vox_mm3:.0f} mm3")
    if (~big).any():
        notes.append(f"sacrum label without a vertebra and under {min_alone_mm3:g} mm3 "
                     f"({counts[~big].sum() * vox_mm3:.0f} mm3 in {int((~big).sum())} component(s)): not the "
                     "sacrum")
    return keep, notes


def _median_body(vert: np.ndarray, sem: np.ndarray, ids: np.ndarray) -> float:
    """Median corpus voxel count of the vertebrae ``ids`` that have a corpus (0 when none has)."""
    bodies = _corpus_voxels(vert, sem, ids)
    return float(np.median(bodies[bodies > 0])) if (bodies > 0).any() else 0.0


def _at_bottom(cc: np.ndarray, st: dict, vert: np.ndarray, sem: np.ndarray, ids: np.ndarray, vcen: np.ndarray,
               lowest_axis: np.ndarray, sp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sacrum component of ``cc`` (statistics ``st``): whether it lies at the bottom of the column (it reaches
    below the lowest vertebral body and its centre is not above the second-lowest vertebra's), and how far its centre
    lies below the lowest body's centre along the spine axis (mm; negative above)."""
    cen = st["centroids"][1:]
    axis = lowest_axis / max(np.linalg.norm(lowest_axis), 1e-9)
    low = vcen[-1]
    lowest_body = np.argwhere((vert == ids[-1]) & (sem == 49))
    body_reach = float((((lowest_body - low) * sp) @ axis).max()) if len(lowest_body) else 0.0
    reach = _reach_below(cc, st["bounding_boxes"], len(cen), low, axis, sp)
    above_second = np.zeros(len(cen), bool)
    if len(ids) > 1:
        above_second = ((cen - vcen[-2]) * sp) @ axis < 0
    return (reach > body_reach) & ~above_second, ((cen - low) * sp) @ axis


def _reach_below(cc: np.ndarray, boxes: Sequence, n: int, low: np.ndarray, axis: np.ndarray, sp: np.ndarray
                 ) -> np.ndarray:
    """How far below ``low`` each component 1..n of ``cc`` reaches along ``axis`` (mm): a pass over each one's own
    voxels, in its bounding box (a sacrum label has few components)."""
    reach = np.zeros(n)
    for c in range(n):
        sl = boxes[c + 1]
        pts = np.argwhere(cc[sl] == c + 1) + [s.start for s in sl]
        reach[c] = float((((pts - low) * sp) @ axis).max())
    return reach


def _sacrum_at_bottom(counts: np.ndarray, at_bottom: np.ndarray, below_mm: np.ndarray, ref: float, vox_mm3: float,
                      min_volume_fraction: float) -> tuple[np.ndarray, list[str]]:
    """The sacrum components kept (ids 1..n): all those ``at_bottom`` when one of them holds at least
    ``min_volume_fraction`` x the median vertebral body ``ref`` (voxels); and the notes. ``below_mm``: how far each
    component's centre lies below the lowest body's (for the note on the rest)."""
    notes = []
    keep = np.zeros(0, np.int64)
    big = counts >= min_volume_fraction * ref
    if (at_bottom & big).any():
        keep = np.flatnonzero(at_bottom) + 1
        notes.append(f"sacrum kept: {counts[at_bottom].sum() * vox_mm3:.0f} mm3 at the bottom of the column "
                     f"(median vertebral body {ref * vox_mm3:.0f} mm3)")
    elif at_bottom.any():
        notes.append(f"sacrum label at the bottom of the column too small to be the sacrum "
                     f"({counts[at_bottom].max() * vox_mm3:.0f} mm3, under {min_volume_fraction:g} x the "
                     f"median vertebral body {ref * vox_mm3:.0f} mm3)")
    away = ~np.isin(np.arange(1, len(counts) + 1), keep)
    if away.any() and (~at_bottom & away).any():
        notes.append(f"sacrum label away from the bottom of the column ({int((~at_bottom).sum())} "
                     f"component(s), {counts[~at_bottom].sum() * vox_mm3:.0f} mm3, centre up to "
                     f"{-below_mm[~at_bottom].min():.0f} mm above the lowest body): not the sacrum")
    return keep, notes


def _take_sacral_segments(sem: np.ndarray, inst: np.ndarray, sp: np.ndarray, rep: SacrumReport,
                          flank_fraction: float, posterior_share: float, max_segments: int) -> None:
    """Take the lowest vertebrae into the sacrum when they look like sacral segments (in place): the highest of the
    lowest ``max_segments`` that does (S1 above a painted S2 that the alae do not flank) and every one below it."""
    vert = vertebra_ids(inst)
    ids, _, axes = vertebra_order(vert, sem, sp)
    sacral_from, why = None, ""
    for k in range(len(ids) - 1, max(len(ids) - 1 - max_segments, 0), -1):  # never the topmost: it stays above
        v = int(ids[k])
        box = bbox((vert == v) | (sem == SACRUM_ID), margin=1)
        s, i = sem[box], inst[box]
        own = i == v
        body = own & (s == 49)
        if not body.any():
            continue
        axis = axes[k] / max(np.linalg.norm(axes[k]), 1e-9)
        left, right = _flanking(s == SACRUM_ID, body, axis, sp)
        n_body = int(body.sum())
        flanks = int(left >= flank_fraction * n_body) + int(right >= flank_fraction * n_body)
        posterior = float(np.count_nonzero(own & label_mask(s, POSTERIOR_LABELS))) / max(int(own.sum()), 1)
        if flanks == 2 or (flanks == 1 and posterior < posterior_share):
            sacral_from = k
            why = (f"the sacrum flanks the body of instance {v} on {flanks} side(s) at mid-height, posterior elements "
                   f"{posterior:.0%} of its bone")
    if sacral_from is None:
        return
    vox_mm3 = float(np.prod(sp))
    taken = [int(v) for v in ids[sacral_from:]]
    n = sum(_absorb(sem, inst, v) for v in taken)
    rep.absorbed.extend(taken)
    rep.notes.append(f"{len(taken)} lowest vertebra(e) (instances {', '.join(map(str, taken))}) are sacral segments "
                     f"painted as corpus: {why}; {n * vox_mm3:.0f} mm3 taken into the sacrum")
