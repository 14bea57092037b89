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

from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from spineps_like.geometry import bbox, nonzero_coords
from spineps_like.instance.centres import CorpusCentres, corpus_centres
from spineps_like.labels import label_mask
from spineps_like.masks import check_mask, check_spacing, contact_counts, dominant_partner, facet_free_contacts

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
    s = sem[box]
    k = len(cc)
    corpus_lab = cc.labels[box].astype(np.int32)
    arch = label_mask(s, ARCH_LABELS)
    art = label_mask(s, ARTICULAR_LABELS)
    corpus_bone = label_mask(s, CORPUS_BONE)
    bone = arch | art | corpus_bone
    seeds = np.where(label_mask(s, CORPUS_BONE + ENDPLATE_LIKE), corpus_lab, 0)
    flat = np.zeros(s.shape, dtype=np.uint8)

    # A: corpus + arch (pedicles, laminae, spinous and costal processes), flooded from the corpora
    lab = watershed(flat, markers=seeds, connectivity=1, mask=(seeds > 0) | corpus_bone | arch).astype(np.int32)
    lab[~bone] = 0
    art_cc = cc3d.connected_components(np.where(art, s, 0), connectivity=26).astype(np.int64)
    n_art = int(art_cc.max(initial=0)) + 1
    art_stats = cc3d.statistics(art_cc.astype(np.uint32)) if n_art > 1 else None
    art_kind = np.zeros(n_art, dtype=np.int8)  # 1 superior, 2 inferior articular
    nz = nonzero_coords(art_cc)
    art_kind[art_cc[nz]] = np.where(label_mask(s[nz], (45, 46)), 1, 2)
    keys: dict[int, float] = {i: float(i) for i in range(1, k + 1)}  # order of every id along the spine
    axes_by_id = {i + 1: cc.axes[i] for i in range(k)}

    def neighbour_keys(key: np.ndarray, step: np.ndarray) -> np.ndarray:
        """The key of the vertebra before (step -1) / after (step +1) each key in spine order; beyond the ends,
        a new key half a step out (a vertebra whose corpus is out of view); step 0 keeps the key."""
        ks = np.sort(np.fromiter(keys.values(), dtype=float))
        pos = np.searchsorted(ks, key)
        prev = np.where(pos > 0, ks[np.maximum(pos - 1, 0)], ks[0] - 0.5)
        nxt = np.where(pos + 1 < len(ks), ks[np.minimum(pos + 1, len(ks) - 1)], ks[-1] + 0.5)
        return np.where(step < 0, prev, np.where(step > 0, nxt, key))

    def add_votes(votes: dict[int, float], comp_img: np.ndarray) -> bool:
        """Write the voted keys into ``lab`` (new vertebrae for keys beyond the ends); True if anything changed."""
        if not votes:
            return False
        by_key = {v: i for i, v in keys.items()}
        lut = np.zeros(int(comp_img.max()) + 1, dtype=np.int32)
        lo_key, hi_key = min(keys.values()), max(keys.values())
        for comp, tkey in votes.items():
            if tkey not in by_key:
                # an arch whose corpus is out of view: a vertebra of its own above the top / below the bottom one
                tkey = lo_key - 0.5 if tkey < lo_key else (hi_key + 0.5 if tkey > hi_key else tkey)
            if tkey not in by_key:
                new_id = max(keys) + 1
                keys[new_id] = tkey
                by_key[tkey] = new_id
                axes_by_id[new_id] = axes_by_id[by_key[lo_key] if tkey < lo_key else by_key[hi_key]]
            lut[comp] = by_key[tkey]
        sel = (comp_img > 0) & (lab == 0)
        lab[sel] = lut[comp_img[sel]]
        return bool(sel.any() and (lut[comp_img[sel]] > 0).any())

    for _ in range(8):
        changed = False
        # B: articular components -> the arch they touch most, when dominant (the facet partner is another label
        # and does not count). An inferior articular process hangs below its own arch; when the arch it touches
        # lies below it, that arch is the next vertebra's (a lamina cut off from its own pedicle leaves only that
        # contact), so the vote goes to the vertebra above it
        free_art = np.where(art & (lab == 0), art_cc, 0)
        arch_lab = np.where(arch, lab, 0)
        a_ids, b_ids, counts = contact_counts(free_art, arch_lab)
        if len(a_ids):
            nzl = nonzero_coords(arch_lab)
            owners = arch_lab[nzl].astype(np.int64)
            m = int(owners.max()) + 1
            cnt = np.maximum(np.bincount(owners, minlength=m), 1)
            arch_c = np.stack([np.bincount(owners, weights=nzl[d], minlength=m) for d in range(3)], axis=1)
            arch_c /= cnt[:, None]
            ax = np.array([axes_by_id.get(int(o), np.array([0.0, 1.0, 0.0])) for o in b_ids]).reshape(-1, 3)
            arch_below = np.einsum("ij,ij->i", (arch_c[b_ids] - art_stats["centroids"][a_ids]) * sp, ax) > 0
            key_b = np.array([keys[int(o)] for o in b_ids])
            target = neighbour_keys(key_b, np.where((art_kind[a_ids] == 2) & arch_below, -1, 0))
            code = np.round(target * 2).astype(np.int64)
            owner = dominant_partner(a_ids, code, counts, dominance)
            changed |= add_votes({c: t / 2 for c, t in owner.items()}, free_art)
            # superior articular components touched but not dominated: geodesic split from the arch
            touched = np.isin(free_art, a_ids[art_kind[a_ids] == 1]) & (free_art > 0) & (lab == 0)
            if touched.any():
                markers = np.where(arch | corpus_bone, lab, 0)
                ext = watershed(flat, markers=markers, connectivity=1, mask=(markers > 0) | touched)
                lab[touched] = ext[touched]
                changed = True
        # C1: articular components reached from no arch: the articular partner they touch tells the level. An
        # inferior articular process lies between the superior one of its own vertebra (above it) and the
        # superior one of the next vertebra (below it: the facet joint); so a partner below an inferior process
        # is the next vertebra, one above it the same vertebra (and mirrored for a superior process)
        free_art = np.where(art & (lab == 0), art_cc, 0)
        done_art = np.where(art & (lab > 0), art_cc, 0)
        a_ids, b_ids, counts = contact_counts(free_art, done_art)
        pair = art_kind[a_ids] != art_kind[b_ids]
        a_ids, b_ids, counts = a_ids[pair], b_ids[pair], counts[pair]
        if len(a_ids):
            owner_of = np.zeros(n_art, dtype=np.int64)
            owner_of[done_art[done_art > 0]] = lab[done_art > 0]
            own = owner_of[b_ids]
            cen = art_stats["centroids"]
            ax = np.array([axes_by_id.get(int(o), np.array([0.0, 1.0, 0.0])) for o in own]).reshape(-1, 3)
            below = np.einsum("ij,ij->i", (cen[b_ids] - cen[a_ids]) * sp, ax) > 0
            key_own = np.array([keys[int(o)] for o in own])
            is_inf = art_kind[a_ids] == 2
            step = np.where(is_inf, np.where(below, -1, 0), np.where(below, 0, 1))
            target = neighbour_keys(key_own, step)
            votes = _component_vote(a_ids, np.round(target * 2).astype(np.int64), counts.astype(float))
            changed |= add_votes({c: t / 2 for c, t in votes.items()}, free_art)
        # C2: arch pieces reached from no corpus (a lamina cut off from its pedicle by thick slices, an arch whose
        # corpus is out of view) -> the vertebra they touch most, facet contacts excluded
        free_arch = arch & (lab == 0)
        if free_arch.any():
            pieces = cc3d.connected_components(free_arch, connectivity=26)
            a_ids, b_ids, counts = facet_free_contacts(pieces, np.where(bone, lab, 0), s)
            owner = dominant_partner(a_ids, b_ids, counts, 1.0)
            if owner:
                changed |= _relabel_free(lab, pieces, owner)
        if not changed:
            break

    # D: anything left -> nearest vertebra within max_gap_mm, one decision per component
    missing = bone & (lab == 0)
    if missing.any() and (lab > 0).any():
        dist, idx = ndi.distance_transform_edt(lab == 0, sampling=sp, return_distances=True, return_indices=True)
        near = lab[tuple(idx)]
        comps = cc3d.connected_components(missing, connectivity=26)
        sel = (comps > 0) & (dist <= max_gap_mm)
        votes = _component_vote(comps[sel].astype(np.int64), near[sel].astype(np.int64))
        lut = np.zeros(int(comps.max()) + 1, dtype=np.int32)
        for c, v in votes.items():
            lut[c] = int(v)
        lab[missing] = lut[comps[missing]]
    # ids 1..K' in spine order
    order = sorted(keys, key=lambda i: keys[i])
    lut = np.zeros(max(keys) + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    out[box] = lut[lab]
    present = np.unique(out)
    present = present[present > 0]
    if len(present) and present[-1] != len(present):  # an id with no voxels: close the gap
        lut2 = np.zeros(present[-1] + 1, dtype=np.int32)
        lut2[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        out = lut2[out]
    return out
