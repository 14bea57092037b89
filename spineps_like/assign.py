"""IVD, endplate and sacrum instance ids from the vertebra instances (TPTBox scheme).

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis.

- IVD voxels get ``100 + v`` with v the vertebra above the disc. Each IVD voxel finds its nearest corpus voxel
  (in mm, a k-d tree on the corpus surfaces within the bounding box of the discs and endplates); if it lies below
  that corpus' centre along the local spine axis, that vertebra is above it, else the vertebra before it in spine
  order is. This holds on a curved spine (the axis is local) and splits an IVD
  component that merges two discs; pieces of a component under ``split_min_fraction`` of it join its majority.
  A disc above the topmost vertebra gets ``100 + (top id - 1)`` (a vertebra out of view; with the instance phase's
  ids 1..K that is 100, which :func:`spineps_like.labeling.label_vertebrae` turns into the IVD above the top one).
- Endplate voxels (52, 53 and the unsplit 62) get ``200 + v`` with v the vertebra whose corpus they lie on (the
  nearest corpus: their own, not the one above, which SPINEPS 2.1.3 assigns to both endplates of a disc);
  62 is split into superior (52: above its corpus' centre) and inferior (53: below it). 52/53 given as input stay.
- Sacrum voxels (26) get 26; the sacrum counts as the vertebra below the last disc.
- The aliases 50/51 (dense corpus, dens) become 49 in the returned semantic mask.
"""

from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
from scipy.spatial import cKDTree

from spineps_like.geometry import bbox
from spineps_like.instance.centres import spine_axes
from spineps_like.labels import ENDPLATE_OFFSET, IVD_OFFSET, SACRUM_ID, SEMANTIC_ALIASES, label_mask
from spineps_like.masks import check_mask, check_spacing, present_ids, surface_voxels, unique_ints, voxel_coords

IVD = 100
ENDPLATE_LIKE: tuple[int, ...] = (52, 53, 62)
CORPUS_BONE: tuple[int, ...] = (49, 50, 51)
_IS_CORPUS = np.zeros(256, bool)
_IS_CORPUS[list(CORPUS_BONE)] = True
_IS_POSTERIOR = np.zeros(256, bool)
_IS_POSTERIOR[41:49] = True


def map_aliases(semantic: np.ndarray) -> np.ndarray:
    """Semantic mask with the aliases (50 dense corpus, 51 dens) mapped to 49; a copy only when needed."""
    sem = np.asarray(semantic)
    if not label_mask(sem, list(SEMANTIC_ALIASES)).any():
        return sem
    out = sem.copy()
    for a, b in SEMANTIC_ALIASES.items():
        out[sem == a] = b
    return out


def vertebra_voxels(instance: np.ndarray) -> np.ndarray:
    """Voxels holding a vertebra id: 1-99 without the sacrum (not IVDs, endplates or the sacrum; compare
    :func:`spineps_like.labels.is_vertebra`, which tells whether one id names a vertebra, sacrum included)."""
    return (instance > 0) & (instance < IVD_OFFSET) & (instance != SACRUM_ID)


#: Each id below 300 that names a vertebra (1-99 without the sacrum), else 0: the lookup table of :func:`vertebra_ids`.
_VERTEBRA_ID = np.arange(300, dtype=np.int32)
_VERTEBRA_ID[(_VERTEBRA_ID >= IVD_OFFSET) | (_VERTEBRA_ID == SACRUM_ID)] = 0


def vertebra_ids(instance: np.ndarray) -> np.ndarray:
    """The mask's vertebra ids where :func:`vertebra_voxels` holds, 0 elsewhere (int32), by one lookup."""
    return np.take(_VERTEBRA_ID, instance, mode="clip")


def vertebra_order(vertebrae: np.ndarray, semantic: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertebra ids present (sacrum included) in spine order, their corpus centres (voxel coords) and axes.

    The centre is that of the vertebra's corpus voxels (semantic 49-51), or of all its voxels when it has no corpus.
    The sacrum comes last; vertebrae with a corpus are ordered by centre along axis 1. A vertebra without one (the
    spinous tip or facet of a vertebra the field of view cut) is placed by its posterior elements: above the first
    vertebra whose posterior elements lie below its centre (comparing its corpus-free centre with the others' corpus
    centres would put a spinous tip hanging over the next body below that body). Axes are unit vectors in mm space.
    """
    sp = check_spacing(spacing)
    v = np.asarray(vertebrae)
    flat = v.ravel()  # a view for the C-ordered masks of the pipeline
    # one pass over the volume for the vertebra voxels; everything else on those voxels only
    idx = np.flatnonzero((flat > 0) & (flat < IVD_OFFSET))
    if len(idx) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3))
    lab = flat[idx].astype(np.int64)
    a_cnt = np.bincount(lab)
    ids_all = np.flatnonzero(a_cnt)
    # centres from the corpus voxels (coordinates only of those); all voxels of a vertebra without corpus
    corpus = np.take(_IS_CORPUS, np.asarray(semantic).ravel()[idx], mode="clip")
    c_lab = lab[corpus]
    c_cnt = np.bincount(c_lab, minlength=len(a_cnt))
    c_xyz = np.unravel_index(idx[corpus], v.shape)
    # float64 also when no voxel is corpus (np.bincount of an empty array is integer even with weights)
    cen = np.stack([np.bincount(c_lab, weights=c_xyz[a], minlength=len(a_cnt)) for a in range(3)], axis=1)
    cen = cen.astype(np.float64, copy=False) / np.maximum(c_cnt, 1)[:, None]
    for i in ids_all[c_cnt[ids_all] == 0]:  # rare: a vertebra without corpus voxels
        cen[i] = [c.sum() / a_cnt[i] for c in np.unravel_index(idx[lab == i], v.shape)]
    key = cen[:, 1].copy()
    bodyless = np.flatnonzero(c_cnt == 0)
    bodyless = bodyless[(a_cnt[bodyless] > 0) & (bodyless != SACRUM_ID)]
    if len(bodyless) and (c_cnt > 0).any():
        key = _bodyless_keys(key, bodyless, c_cnt, lab, idx, v.shape, semantic)
    cen = cen[ids_all]
    sac = ids_all == SACRUM_ID
    order = np.lexsort((key[ids_all], sac))
    ids, cen = ids_all[order], cen[order]
    axes = spine_axes(cen * sp)
    return ids.astype(np.int64), cen, axes


def _bodyless_keys(key: np.ndarray, bodyless: np.ndarray, c_cnt: np.ndarray, lab: np.ndarray, idx: np.ndarray,
                   shape: tuple[int, ...], semantic: np.ndarray) -> np.ndarray:
    """Sort keys (axis 1) for vertebrae without corpus: just above the first vertebra with a corpus whose posterior
    elements' centre lies below theirs (below every one: after the last)."""
    rows = np.unravel_index(idx, shape)[1].astype(np.float64)
    post = np.take(_IS_POSTERIOR, np.asarray(semantic).ravel()[idx], mode="clip")
    n = len(key)
    p_cnt = np.bincount(lab[post], minlength=n)
    p_row = np.bincount(lab[post], weights=rows[post], minlength=n) / np.maximum(p_cnt, 1)
    a_cnt = np.bincount(lab, minlength=n)
    a_row = np.bincount(lab, weights=rows, minlength=n) / np.maximum(a_cnt, 1)
    ref = np.where(p_cnt > 0, p_row, a_row)  # where a vertebra's posterior elements are (all of it without them)
    with_body = np.flatnonzero(c_cnt > 0)
    with_body = with_body[with_body != SACRUM_ID]
    with_body = with_body[np.argsort(key[with_body], kind="stable")]
    out = key.copy()
    for b in bodyless:
        below = with_body[ref[with_body] > ref[b]]
        out[b] = key[below[0]] - 0.5 if len(below) else key[with_body[-1]] + 0.5 if len(with_body) else ref[b]
    return out


def _previous_ids(ids: np.ndarray) -> np.ndarray:
    """The id above each vertebra in ``ids`` (spine order); the topmost gets ``id - 1`` (out of view)."""
    prev = np.empty_like(ids)
    if len(ids):
        prev[1:] = ids[:-1]
        prev[0] = ids[0] - 1
    return prev


def _nearest_corpus(corpus_seed: np.ndarray, targets: np.ndarray, sp: np.ndarray,
                    margin_mm: float = 20.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, ...] | None]:
    """For each target voxel (C order): the nearest seed's label, that seed voxel's coords and the target's coords,
    searched in mm on the targets' bounding box + margin; and that box. The nearest seed voxel of a point outside the
    seeds is always on their surface (a face neighbour closer to the point would be a seed too), so only surface
    voxels go into the k-d tree."""
    margin = int(np.ceil(margin_mm / sp.min()))
    box = bbox(targets, margin=margin)
    if box is None:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64), None
    seeds = corpus_seed[box]
    if not (seeds > 0).any():
        # no corpus near: widen to the whole corpus bounding box
        box = bbox(targets | (corpus_seed > 0), margin=1)
        seeds = corpus_seed[box]
    origin = np.array([s.start for s in box])
    t = voxel_coords(targets[box])
    fg = seeds > 0
    if not fg.any():
        return np.zeros(len(t), np.int64), t + origin, t + origin, box
    surface = surface_voxels(fg)
    if len(t):
        # coordinates from the targets' first voxel less the margin, not from the (clipped) box: the same numbers, so
        # the same k-d tree and the same choice between equidistant seeds, wherever the arrays start in a volume
        ref = t.min(axis=0) - margin
        _, k = cKDTree((surface - ref) * sp).query((t - ref) * sp, k=1, workers=-1)
        near = surface[k]
    else:
        near = np.zeros((0, 3), np.int64)
    lab = seeds[tuple(near.T)]
    return lab.astype(np.int64), near + origin, t + origin, box


def _smooth_components(comp: np.ndarray, lab: np.ndarray, min_fraction: float) -> np.ndarray:
    """Within each component, labels holding under ``min_fraction`` of it join the component's majority label."""
    if len(lab) == 0:
        return lab
    base = int(lab.max()) + 1  # labels are vertebra ids (>= 0): one int64 key per (component, label) pair
    keys, inv = unique_ints(comp.astype(np.int64) * base + lab, return_inverse=True)
    pairs = np.stack([keys // base, keys % base], axis=1)
    inv = inv.reshape(-1)
    cnt = np.bincount(inv)
    comp_tot = np.bincount(comp, minlength=int(comp.max()) + 1)
    order = np.lexsort((-cnt, pairs[:, 0]))
    majority = np.zeros(int(comp.max()) + 1, dtype=lab.dtype)
    first = np.r_[True, pairs[order][1:, 0] != pairs[order][:-1, 0]]
    majority[pairs[order][first, 0]] = pairs[order][first, 1]
    small = cnt < min_fraction * comp_tot[pairs[:, 0]]
    out = lab.copy()
    bad = small[inv]
    out[bad] = majority[comp[bad]]
    return out


def assign_ivds_endplates(
    semantic: np.ndarray,
    vertebrae: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    split_min_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Full instance mask (vertebrae + IVDs + endplates + sacrum) and the semantic mask with 62 split.

    Parameters
    ----------
    semantic : (X, Y, Z) int array, PIR
        Semantic mask.
    vertebrae : (X, Y, Z) int array
        Vertebra instances (ids 1..K top to bottom from the instance phase, or anatomical ids); other ids are
        ignored. Its ids are kept on vertebra bone (41-49).
    spacing : 3 floats
        Voxel size in mm (distances and the spine axis are measured in mm).
    split_min_fraction : float
        Within one IVD or endplate component, a vertebra holding less than this fraction joins the majority.

    Returns
    -------
    instance : int32 array
        Vertebra ids on 41-49 (from ``vertebrae``), 100 + v on IVDs, 200 + v on endplates, 26 on the sacrum.
    semantic : array
        ``semantic`` with 62 split into 52/53 and 50/51 mapped to 49.

    Examples
    --------
    >>> inst, sem = assign_ivds_endplates(semantic, vert, (1.5, 1.5, 1.5))   # doctest: +SKIP
    """
    sem = check_mask(semantic)
    vert = check_mask(vertebrae, "vertebra instance mask")
    if vert.shape != sem.shape:
        raise ValueError(f"vertebra instance mask shape {vert.shape} differs from the semantic mask {sem.shape}")
    sp = check_spacing(spacing)
    if not 0 <= split_min_fraction < 0.5:
        raise ValueError(f"split_min_fraction must be in [0, 0.5), got {split_min_fraction}")
    sem = map_aliases(sem).copy()
    vert = np.where(vertebra_voxels(vert) & (sem >= 41) & (sem <= 49), vert, 0)
    vert = vert.astype(np.int32, copy=False)
    sacrum = sem == SACRUM_ID
    vert[sacrum] = SACRUM_ID
    instance = vert  # vert is only read from here on; the IVD and endplate ids go into this array at the end
    ids, centres, axes = vertebra_order(vert, sem, sp)
    if len(ids) == 0:
        return instance, sem
    pos = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    pos[ids] = np.arange(len(ids))
    prev = _previous_ids(ids)
    # corpus seeds for the nearest-corpus rule: corpus voxels of a vertebra, the sacrum, else all its bone
    has_corpus = np.zeros(int(ids.max()) + 1, bool)
    corpus_seed = np.where((sem == 49) | sacrum, vert, 0)
    has_corpus[present_ids(corpus_seed)] = True
    no_corpus = ids[~has_corpus[ids]]
    if len(no_corpus):
        extra = np.isin(vert, no_corpus)
        corpus_seed[extra] = vert[extra]

    targets = label_mask(sem, (IVD,) + ENDPLATE_LIKE)
    near, _, t_xyz, box = _nearest_corpus(corpus_seed, targets, sp)
    if box is None:
        return instance, sem
    t_sem = sem[box][targets[box]]
    p = pos[near]
    along = np.einsum("ij,ij->i", (t_xyz - centres[p]) * sp, axes[p])  # > 0: below the nearest corpus' centre
    is_ivd = t_sem == IVD
    # IVDs: the vertebra above
    ivd_owner = np.where(along > 0, ids[p], prev[p])
    # endplates: their own corpus; 62 split by the side of the centre it lies on
    ep_owner = ids[p]
    new_sem = t_sem.copy()
    split = t_sem == 62
    new_sem[split] = np.where(along[split] < 0, 52, 53)
    # one decision per component for minor pieces (merged discs keep their split), on the targets' own box
    t_box = targets[box]
    tight = bbox(t_box)
    t_tight = t_box[tight]
    comp_img = cc3d.connected_components(np.where(t_tight, np.where(sem[box][tight] == IVD, 1, 2), 0),
                                         connectivity=26)
    comp = comp_img[t_tight].astype(np.int64)  # C order within the tight box = C order of the targets in box
    owner = np.where(is_ivd, ivd_owner, ep_owner)
    owner = _smooth_components(comp, owner, split_min_fraction)
    ids_out = np.where(is_ivd, IVD_OFFSET + owner, ENDPLATE_OFFSET + owner)
    m = targets[box]
    instance[box][m] = ids_out  # views of the box: the writes land in the whole arrays
    sem[box][m] = new_sem
    return instance, sem
