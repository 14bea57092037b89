"""Weights-free vertebra instances from the semantic mask: the selectable fallback and the baseline to beat.

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis.

1. Corpora: the components of :func:`~spineps_like.instance.centres.corpus_centres` (eroded, merged corpora split,
   duplicates merged), numbered 1..K top to bottom.
2. Arch: the arcus (41), spinous (42) and costal (43/44) processes are flooded from the corpora through the bone
   mask only (:func:`skimage.segmentation.watershed` on a flat image = breadth-first geodesic growth), so a pedicle
   follows its own corpus and laminae that touch meet half way.
3. Articular processes (45-48), the hard case: the superior process of vertebra k+1 and the inferior process of k
   touch at the facet joint, so growth never crosses from one articular label to the other. Each articular
   component goes to the arch it touches most when that contact dominates (> ``dominance`` x the runner-up); an
   inferior process touching only an arch *below* it (its own lamina cut off by thick slices) goes to the vertebra
   above that arch. Components reached from no arch take their level from their articular partners: an inferior
   process lies between the superior process of its own vertebra (above it) and that of the next one (below it,
   across the joint), and mirrored for a superior process.
4. Arch pieces reached from no corpus (a lamina cut off from its pedicle, an arch whose corpus is out of view) join
   the vertebra they touch most (contacts across facet joints excluded); an arch resting through its facets on the
   topmost / bottom vertebra with no corpus of its own becomes a vertebra of its own.
5. Whatever is left takes the nearest vertebra within ``max_gap_mm`` (one decision per component); further away it
   stays 0 and is left to post-processing.

Steps 3-4 repeat until nothing changes.

The output holds ids only on vertebra bone (41-49 and the aliases 50/51); IVDs, endplates and the sacrum are
assigned by :func:`spineps_like.assign.assign_ivds_endplates`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import cc3d
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from spineps_like.geometry import bbox
from spineps_like.instance.centres import CorpusCentres, corpus_centres
from spineps_like.labels import label_mask
from spineps_like.masks import (
    check_mask, check_spacing, contact_counts, dominant_partner, facet_free_contacts, nonzero_coords,
)

CORPUS_BONE: tuple[int, ...] = (49, 50, 51)
ARCH_LABELS: tuple[int, ...] = (41, 42, 43, 44)
ARTICULAR_LABELS: tuple[int, ...] = (45, 46, 47, 48)
ENDPLATE_LIKE: tuple[int, ...] = (52, 53, 62)
BONE_LABELS: tuple[int, ...] = ARCH_LABELS + ARTICULAR_LABELS + CORPUS_BONE


def _component_vote(comp: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> dict[int, int]:
    """For each component id in ``comp``, the ``target`` value with the largest summed weight (ties: smallest)."""
    out: dict[int, int] = {}
    if len(comp) == 0:
        return out
    w = np.ones(len(comp)) if weights is None else weights
    pairs, inv = np.unique(np.stack([comp, target], axis=1), axis=0, return_inverse=True)
    tot = np.bincount(inv.reshape(-1), weights=w)
    order = np.lexsort((-tot, pairs[:, 0]))
    first = np.r_[True, pairs[order][1:, 0] != pairs[order][:-1, 0]]
    for c, t in pairs[order][first]:
        out[int(c)] = int(t)
    return out


def _relabel_free(lab: np.ndarray, comps: np.ndarray, owner: dict[int, int]) -> bool:
    """Write ``owner[c]`` into the unlabelled voxels of each component ``c``; True if anything was written."""
    lut = np.zeros(int(comps.max()) + 1, dtype=np.int32)
    for c, v in owner.items():
        lut[c] = v
    sel = (comps > 0) & (lab == 0) & (lut[comps] > 0)
    lab[sel] = lut[comps[sel]]
    return bool(sel.any())


def geometric_instances(
    semantic: np.ndarray,
    spacing: Sequence[float],
    *,
    centres: CorpusCentres | None = None,
    dominance: float = 2.0,
    max_gap_mm: float = 6.0,
    **centre_kwargs,
) -> np.ndarray:
    """Vertebra instances 1..K (top to bottom) from a semantic mask, without a network.

    Parameters
    ----------
    semantic : (X, Y, Z) int array, PIR
        Semantic mask (TPTBox/SPINEPS labels).
    spacing : 3 floats
        Voxel size in mm.
    centres : CorpusCentres, optional
        Precomputed corpus centres (else computed with ``centre_kwargs``).
    dominance : float
        A superior articular component goes wholesale to the vertebra whose arch it touches more than
        ``dominance`` x as much as any other.
    max_gap_mm : float
        Bone reached by none of the rules joins the nearest vertebra within this distance (else stays 0).

    Returns
    -------
    int32 array, shape of ``semantic``: vertebra ids 1..K on vertebra bone (41-49, 50, 51), 0 elsewhere. K can
    exceed the number of corpora by the arches whose corpus is out of view (one above the top, one below the
    bottom corpus).

    Examples
    --------
    >>> vert = geometric_instances(semantic, (1.5, 1.5, 1.5))   # doctest: +SKIP
    """
    sem = check_mask(semantic)
    sp = check_spacing(spacing)
    cc = centres if centres is not None else corpus_centres(sem, sp, **centre_kwargs)
    if cc.labels.shape != sem.shape:
        raise ValueError(f"corpus centres were computed on a grid {cc.labels.shape}, not {sem.shape}")
    out = np.zeros(sem.shape, dtype=np.int32)
    box = bbox(label_mask(sem, BONE_LABELS) | (cc.labels > 0), margin=1)
    if box is None or len(cc) == 0:
        return out
    crop = _crop(sem[box], sp)
    levels = _Levels({i: float(i) for i in range(1, len(cc) + 1)}, {i + 1: cc.axes[i] for i in range(len(cc))})
    # A: corpus + arch (pedicles, laminae, spinous and costal processes), flooded from the corpora
    seeds = np.where(label_mask(crop.s, CORPUS_BONE + ENDPLATE_LIKE), cc.labels[box].astype(np.int32), 0)
    lab = watershed(crop.flat, markers=seeds, connectivity=1,
                    mask=(seeds > 0) | crop.corpus_bone | crop.arch).astype(np.int32)
    lab[~crop.bone] = 0
    for _ in range(8):  # B, C1, C2 until nothing changes
        levels, by_arch = _articular_by_arch(lab, levels, crop, dominance)
        levels, by_partner = _articular_by_partner(lab, levels, crop)
        if not (_free_arches(lab, crop) or by_arch or by_partner):
            break
    # D: anything left -> nearest vertebra within max_gap_mm, one decision per component
    _nearest_within(lab, crop, max_gap_mm)
    out[box] = _spine_order_lut(levels)[lab]
    present = np.unique(out)
    present = present[present > 0]
    if len(present) and present[-1] != len(present):  # an id with no voxels: close the gap
        lut2 = np.zeros(present[-1] + 1, dtype=np.int32)
        lut2[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        out = lut2[out]
    return out


class _Crop(NamedTuple):
    """The semantic crop of :func:`geometric_instances` with the masks and articular components every step reads."""

    s: np.ndarray  # semantic labels
    sp: np.ndarray  # mm per axis
    arch: np.ndarray  # arch labels (41-44)
    art: np.ndarray  # articular labels (45-48)
    corpus_bone: np.ndarray  # corpus and its aliases (49-51)
    bone: np.ndarray  # all of them
    flat: np.ndarray  # a flat (zero) image: watershed on it is breadth-first geodesic growth
    art_cc: np.ndarray  # 26-connected components of each articular label
    n_art: int  # articular components + 1
    art_centroids: np.ndarray | None  # per articular component (voxel coords), None without one
    art_kind: np.ndarray  # per articular component: 1 superior, 2 inferior


def _crop(s: np.ndarray, sp: np.ndarray) -> _Crop:
    """The masks and articular components of the semantic crop ``s``."""
    arch = label_mask(s, ARCH_LABELS)
    art = label_mask(s, ARTICULAR_LABELS)
    corpus_bone = label_mask(s, CORPUS_BONE)
    art_cc = cc3d.connected_components(np.where(art, s, 0), connectivity=26).astype(np.int64)
    n_art = int(art_cc.max(initial=0)) + 1
    art_stats = cc3d.statistics(art_cc.astype(np.uint32)) if n_art > 1 else None
    art_kind = np.zeros(n_art, dtype=np.int8)  # 1 superior, 2 inferior articular
    nz = nonzero_coords(art_cc)
    art_kind[art_cc[nz]] = np.where(label_mask(s[nz], (45, 46)), 1, 2)
    return _Crop(s, sp, arch, art, corpus_bone, arch | art | corpus_bone, np.zeros(s.shape, dtype=np.uint8), art_cc,
                 n_art, None if art_stats is None else art_stats["centroids"], art_kind)


class _Levels(NamedTuple):
    """The place of every vertebra id along the spine (its key: 1..K for the corpora in order, half a step beyond
    either end for a vertebra whose corpus is out of view) and its local spine axis."""

    keys: dict[int, float]
    axes: dict[int, np.ndarray]

    def neighbours(self, key: np.ndarray, step: np.ndarray) -> np.ndarray:
        """The key of the vertebra before (step -1) / after (step +1) each key in spine order; beyond the ends,
        a new key half a step out (a vertebra whose corpus is out of view); step 0 keeps the key."""
        ks = np.sort(np.fromiter(self.keys.values(), dtype=float))
        pos = np.searchsorted(ks, key)
        prev = np.where(pos > 0, ks[np.maximum(pos - 1, 0)], ks[0] - 0.5)
        nxt = np.where(pos + 1 < len(ks), ks[np.minimum(pos + 1, len(ks) - 1)], ks[-1] + 0.5)
        return np.where(step < 0, prev, np.where(step > 0, nxt, key))

    def axis_of(self, ids: np.ndarray) -> np.ndarray:
        """(N, 3) spine axes of vertebra ids (down the array's axis 1 for an id without one)."""
        return np.array([self.axes.get(int(o), np.array([0.0, 1.0, 0.0])) for o in ids]).reshape(-1, 3)


def _with_voted_levels(levels: _Levels, votes: dict[int, float]) -> tuple[_Levels, dict[int, int]]:
    """The vertebra id of each component's voted key (``votes``: component -> key), and the levels with a new
    vertebra for each key not held yet (a key beyond either end: an arch whose corpus is out of view, one vertebra
    above the top / below the bottom one; it takes that end's axis)."""
    keys, axes = dict(levels.keys), dict(levels.axes)
    by_key = {v: i for i, v in keys.items()}
    lo_key, hi_key = min(keys.values()), max(keys.values())
    owner: dict[int, int] = {}
    for comp, tkey in votes.items():
        if tkey not in by_key:
            tkey = lo_key - 0.5 if tkey < lo_key else (hi_key + 0.5 if tkey > hi_key else tkey)
        if tkey not in by_key:
            new_id = max(keys) + 1
            keys[new_id] = tkey
            by_key[tkey] = new_id
            axes[new_id] = axes[by_key[lo_key] if tkey < lo_key else by_key[hi_key]]
        owner[comp] = by_key[tkey]
    return _Levels(keys, axes), owner


def _write_votes(lab: np.ndarray, levels: _Levels, votes: dict[int, float], comp_img: np.ndarray
                 ) -> tuple[_Levels, bool]:
    """Write the voted keys of the components of ``comp_img`` into the unlabelled voxels of ``lab`` (in place).
    Returns the levels (with the new vertebrae) and whether anything was written."""
    if not votes:
        return levels, False
    levels, owner = _with_voted_levels(levels, votes)
    return levels, _relabel_free(lab, comp_img, owner)


def _articular_by_arch(lab: np.ndarray, levels: _Levels, c: _Crop, dominance: float) -> tuple[_Levels, bool]:
    """B (in place): articular components -> the arch they touch most, when dominant (the facet partner is another
    label and does not count). An inferior articular process hangs below its own arch; when the arch it touches lies
    below it, that arch is the next vertebra's (a lamina cut off from its own pedicle leaves only that contact), so
    the vote goes to the vertebra above it. Superior articular components touched but not dominated are split from
    the arch geodesically. Returns the levels and whether anything changed."""
    free_art = np.where(c.art & (lab == 0), c.art_cc, 0)
    arch_lab = np.where(c.arch, lab, 0)
    a_ids, b_ids, counts = contact_counts(free_art, arch_lab)
    if not len(a_ids):
        return levels, False
    nzl = nonzero_coords(arch_lab)
    owners = arch_lab[nzl].astype(np.int64)
    m = int(owners.max()) + 1
    cnt = np.maximum(np.bincount(owners, minlength=m), 1)
    arch_c = np.stack([np.bincount(owners, weights=nzl[d], minlength=m) for d in range(3)], axis=1)
    arch_c /= cnt[:, None]
    arch_below = np.einsum("ij,ij->i", (arch_c[b_ids] - c.art_centroids[a_ids]) * c.sp, levels.axis_of(b_ids)) > 0
    key_b = np.array([levels.keys[int(o)] for o in b_ids])
    target = levels.neighbours(key_b, np.where((c.art_kind[a_ids] == 2) & arch_below, -1, 0))
    owner = dominant_partner(a_ids, np.round(target * 2).astype(np.int64), counts, dominance)
    levels, changed = _write_votes(lab, levels, {k: t / 2 for k, t in owner.items()}, free_art)
    touched = np.isin(free_art, a_ids[c.art_kind[a_ids] == 1]) & (free_art > 0) & (lab == 0)
    if touched.any():
        markers = np.where(c.arch | c.corpus_bone, lab, 0)
        ext = watershed(c.flat, markers=markers, connectivity=1, mask=(markers > 0) | touched)
        lab[touched] = ext[touched]
        changed = True
    return levels, changed


def _articular_by_partner(lab: np.ndarray, levels: _Levels, c: _Crop) -> tuple[_Levels, bool]:
    """C1 (in place): articular components reached from no arch: the articular partner they touch tells the level.
    An inferior articular process lies between the superior one of its own vertebra (above it) and the superior one
    of the next vertebra (below it: the facet joint); so a partner below an inferior process is the next vertebra,
    one above it the same vertebra (and mirrored for a superior process). Returns the levels and whether anything
    changed."""
    free_art = np.where(c.art & (lab == 0), c.art_cc, 0)
    done_art = np.where(c.art & (lab > 0), c.art_cc, 0)
    a_ids, b_ids, counts = contact_counts(free_art, done_art)
    pair = c.art_kind[a_ids] != c.art_kind[b_ids]
    a_ids, b_ids, counts = a_ids[pair], b_ids[pair], counts[pair]
    if not len(a_ids):
        return levels, False
    owner_of = np.zeros(c.n_art, dtype=np.int64)
    owner_of[done_art[done_art > 0]] = lab[done_art > 0]
    own = owner_of[b_ids]
    cen = c.art_centroids
    below = np.einsum("ij,ij->i", (cen[b_ids] - cen[a_ids]) * c.sp, levels.axis_of(own)) > 0
    key_own = np.array([levels.keys[int(o)] for o in own])
    is_inf = c.art_kind[a_ids] == 2
    step = np.where(is_inf, np.where(below, -1, 0), np.where(below, 0, 1))
    target = levels.neighbours(key_own, step)
    votes = _component_vote(a_ids, np.round(target * 2).astype(np.int64), counts.astype(float))
    return _write_votes(lab, levels, {k: t / 2 for k, t in votes.items()}, free_art)


def _free_arches(lab: np.ndarray, c: _Crop) -> bool:
    """C2 (in place): arch pieces reached from no corpus (a lamina cut off from its pedicle by thick slices, an arch
    whose corpus is out of view) -> the vertebra they touch most, facet contacts excluded. True if any moved."""
    free_arch = c.arch & (lab == 0)
    if not free_arch.any():
        return False
    pieces = cc3d.connected_components(free_arch, connectivity=26)
    a_ids, b_ids, counts = facet_free_contacts(pieces, np.where(c.bone, lab, 0), c.s)
    owner = dominant_partner(a_ids, b_ids, counts, 1.0)
    return bool(owner) and _relabel_free(lab, pieces, owner)


def _nearest_within(lab: np.ndarray, c: _Crop, max_gap_mm: float) -> None:
    """D (in place): bone still without a vertebra joins the nearest vertebra within ``max_gap_mm`` (one decision
    per component, by the majority of its voxels); further away it stays 0."""
    missing = c.bone & (lab == 0)
    if not (missing.any() and (lab > 0).any()):
        return
    dist, idx = ndi.distance_transform_edt(lab == 0, sampling=c.sp, return_distances=True, return_indices=True)
    near = lab[tuple(idx)]
    comps = cc3d.connected_components(missing, connectivity=26)
    sel = (comps > 0) & (dist <= max_gap_mm)
    votes = _component_vote(comps[sel].astype(np.int64), near[sel].astype(np.int64))
    lut = np.zeros(int(comps.max()) + 1, dtype=np.int32)
    for k, v in votes.items():
        lut[k] = int(v)
    lab[missing] = lut[comps[missing]]


def _spine_order_lut(levels: _Levels) -> np.ndarray:
    """Look-up table from vertebra id to its place 1..K' along the spine."""
    order = sorted(levels.keys, key=lambda i: levels.keys[i])
    lut = np.zeros(max(levels.keys) + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut
