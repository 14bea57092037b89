"""Corpus centres: one point per vertebral body, ordered top to bottom, with merged and split corpora repaired.

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis.

How it works (in the spirit of SPINEPS' instance phase, with the repairs made explicit):

1. corpus-like voxels (49, the aliases 50/51 and the endplates 52/53/62) are eroded by ``erosion_mm`` (a distance
   threshold from :func:`edt.edt`, so the erosion is in mm whatever the voxel size; the FOV border does not erode);
2. the 6-connected components of the eroded mask are the seeds; seeds below ``min_volume_mm3`` are dropped, and every
   corpus voxel takes the nearest seed of its own un-eroded component (a component without a seed is kept whole
   when it is large enough: a corpus truncated by the field of view erodes away but is still a vertebra);
3. duplicates (pieces whose centres are less than ``duplicate_fraction`` of a vertebra height apart along the
   spine axis, e.g. a body split left/right by the erosion) are merged;
4. merged corpora are split: at the level of an IVD whose centre lies inside a corpus' extent along the spine, and
   where a corpus' body height exceeds ``split_ratio`` times the median of its neighbours (n bodies from the
   vertebra pitch). Such a corpus loses its top body at the most disc-like cross-section near where the body divides
   evenly (a disc painted as corpus bulges beyond the bodies beside it; a block vertebra's fused disc is a waist),
   and the rest, with its own axis, is looked at again. The body height ignores slices narrower than half the widest
   one, so the dens of C2 does not make C2 look like two vertebrae.

All statistics come from one labelled array through :func:`cc3d.statistics` and ``np.bincount``; nothing loops
over labels on the whole volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cc3d
import edt
import numpy as np
from scipy import ndimage as ndi

from spineps_like.geometry import bbox
from spineps_like.labels import label_mask
from spineps_like.masks import check_mask, check_spacing, nonzero_coords, voxel_coords

#: Semantic labels counted as corpus when looking for vertebral bodies.
CORPUS_LIKE: tuple[int, ...] = (49, 50, 51, 52, 53, 62)
IVD_LABEL = 100


@dataclass
class CorpusCentres:
    """Vertebral-body centres, top to bottom.

    Attributes
    ----------
    centres : (K, 3) float array
        Centre of mass of each corpus in voxel coordinates, sorted along the spine (top first).
    sizes : (K,) int array
        Voxel count of each corpus (un-eroded, endplates included).
    heights : (K,) float array
        Body height in mm along the local spine axis (slices narrower than half the widest excluded).
    axes : (K, 3) float array
        Unit local spine axis (pointing down) in mm space, per corpus.
    labels : int32 array, shape of the input
        Corpus voxels numbered 1..K in the order of ``centres`` (0 elsewhere).
    spacing : tuple of float
        Voxel size in mm.
    repairs : list of str
        One line per repair (dropped fragment, merged duplicate, split corpus).
    """

    centres: np.ndarray
    sizes: np.ndarray
    heights: np.ndarray
    axes: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    repairs: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.centres.shape[0])


def spine_axes(centres_mm: np.ndarray, reach: int = 1) -> np.ndarray:
    """Unit local spine axis (pointing down, +axis 1) at each of K ordered centres given in mm.

    Differences over ``reach`` neighbours on each side (one-sided at the ends); (0, 1, 0) for a single centre.
    """
    k = len(centres_mm)
    if k < 2:
        return np.tile(np.array([0.0, 1.0, 0.0]), (k, 1))
    idx = np.arange(k)
    lo = np.clip(idx - reach, 0, k - 1)
    hi = np.clip(idx + reach, 0, k - 1)
    d = centres_mm[hi] - centres_mm[lo]
    d[d[:, 1] < 0] *= -1
    n = np.linalg.norm(d, axis=1, keepdims=True)
    out = np.where(n > 1e-9, d / np.maximum(n, 1e-9), np.array([0.0, 1.0, 0.0]))
    return out


def _relabel_sorted(labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """Renumber a label array 1..K by centroid along axis 1; returns it and its cc3d statistics."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    labels = lut[labels]
    if len(ids) == 0:
        return labels, {"voxel_counts": np.zeros(1), "centroids": np.zeros((1, 3))}
    stats = cc3d.statistics(labels)
    order = np.argsort(stats["centroids"][1:, 1], kind="stable")
    lut2 = np.zeros(len(ids) + 1, dtype=np.int32)
    lut2[order + 1] = np.arange(1, len(ids) + 1, dtype=np.int32)
    labels = lut2[labels]
    return labels, cc3d.statistics(labels)


@dataclass
class _Pieces:
    """Per-piece geometry of a labelled corpus crop (labels 1..K sorted top to bottom)."""

    coords: np.ndarray  # (N, 3) voxel coords of all labelled voxels (crop frame)
    lab: np.ndarray  # (N,) label per voxel, 1..K
    centres: np.ndarray  # (K, 3) voxel coords (crop frame)
    counts: np.ndarray  # (K,)
    axes: np.ndarray  # (K, 3) unit, mm space
    proj: np.ndarray  # (N,) mm along the piece's axis from its centre
    lo: np.ndarray  # (K,) min proj
    hi: np.ndarray  # (K,) max proj
    body_lo: np.ndarray
    body_hi: np.ndarray
    bins: np.ndarray  # (N,) bin index of each voxel
    bin_mm: np.ndarray  # (K,)
    profile: np.ndarray  # (K, nb) voxel counts per bin
    touches_border: np.ndarray  # (K,) bool: piece touches the array border along axis 1

    @property
    def heights(self) -> np.ndarray:
        return self.body_hi - self.body_lo


def _pieces(labels: np.ndarray, sp: np.ndarray, full_shape_axis1: tuple[int, int], reach: int = 1,
            body_fraction: float = 0.5) -> _Pieces:
    """Geometry of every piece of ``labels`` (crop, labels 1..K sorted top to bottom) in one vectorised pass."""
    coords = voxel_coords(labels > 0)
    lab = labels[tuple(coords.T)].astype(np.int64)
    k = int(labels.max(initial=0))
    counts = np.bincount(lab, minlength=k + 1)[1:].astype(np.int64)
    centres = np.stack([np.bincount(lab, weights=coords[:, a], minlength=k + 1)[1:] for a in range(3)], axis=1)
    centres = centres / np.maximum(counts, 1)[:, None]
    axes = spine_axes(centres * sp, reach=reach)
    rel = (coords - centres[lab - 1]) * sp
    proj = np.einsum("ij,ij->i", rel, axes[lab - 1])
    idx = np.arange(1, k + 1)
    lo = np.asarray(ndi.minimum(proj, lab, idx), dtype=float).reshape(-1)
    hi = np.asarray(ndi.maximum(proj, lab, idx), dtype=float).reshape(-1)
    bin_mm = np.abs(axes) @ sp
    bins = np.floor((proj - lo[lab - 1]) / bin_mm[lab - 1]).astype(np.int64)
    nb = int(bins.max(initial=0)) + 1
    profile = np.bincount((lab - 1) * nb + bins, minlength=k * nb).reshape(k, nb)
    # body: first..last bin whose cross-section is at least body_fraction of the widest
    strong = profile >= body_fraction * profile.max(axis=1, keepdims=True)
    first = np.argmax(strong, axis=1)
    last = nb - 1 - np.argmax(strong[:, ::-1], axis=1)
    body_lo = lo + first * bin_mm
    body_hi = np.minimum(lo + (last + 1) * bin_mm, hi + bin_mm)
    ax1_min = np.asarray(ndi.minimum(coords[:, 1], lab, idx)).reshape(-1)
    ax1_max = np.asarray(ndi.maximum(coords[:, 1], lab, idx)).reshape(-1)
    lo_edge, hi_edge = full_shape_axis1
    touches = (ax1_min <= lo_edge) | (ax1_max >= hi_edge)
    return _Pieces(coords, lab, centres, counts, axes, proj, lo, hi, body_lo, body_hi, bins, bin_mm, profile, touches)


def _reference_height(p: _Pieces, exclude: int | None = None, window: int = 3) -> float | None:
    """Median body height of the pieces not truncated along axis 1 (None when there is none: the height of a
    corpus cut by the field of view says nothing about a vertebra's height), without small fragments (< 30% of
    the median volume). With ``exclude`` = i: of the pieces within ``window`` places of i along the spine, since
    body height grows from C3 (~14 mm) to L5 (~28 mm) and a whole-spine median would split every lumbar body."""
    keep = ~p.touches_border & (p.counts >= 0.3 * np.median(p.counts))
    if exclude is not None:
        keep[exclude] = False
        near = keep & (np.abs(np.arange(len(keep)) - exclude) <= window)
        if near.sum() >= 2:
            keep = near
    if keep.sum() == 0:
        return None
    return float(np.median(p.heights[keep]))


def _drop_off_spine(labels: np.ndarray, sp: np.ndarray, off_mm: float, repairs: list[str],
                    window_mm: float = 60.0) -> np.ndarray:
    """Remove corpus pieces whose centre lies more than ``off_mm`` (in the axial plane) from the spine's centre line,
    which is fitted through the larger pieces within ``window_mm`` above and below (a line, so curvature is followed).
    Predicted masks put corpus label on blobs far in front of or beside the spine; each would become a cutout."""
    k = int(labels.max())
    if k < 3:
        return labels
    idx = nonzero_coords(labels)
    lab = labels[idx].astype(np.int64)
    counts = np.bincount(lab, minlength=k + 1)[1:].astype(float)
    cen = np.stack([np.bincount(lab, weights=idx[a], minlength=k + 1)[1:] for a in range(3)], axis=1)
    cen = cen / np.maximum(counts, 1)[:, None] * sp
    anchors = counts >= 0.5 * np.median(counts[counts >= np.median(counts)])
    bad = []
    for i in range(k):
        near = anchors & (np.abs(cen[:, 1] - cen[i, 1]) <= window_mm)
        near[i] = False
        if near.sum() < 2:
            continue
        t = cen[near, 1]
        if np.ptp(t) < 1e-6:
            pred = cen[near][:, [0, 2]].mean(axis=0)
        else:
            coef = np.polyfit(t, cen[near][:, [0, 2]], 1)
            pred = coef[0] * cen[i, 1] + coef[1]
        if np.hypot(*(cen[i, [0, 2]] - pred)) > off_mm:
            bad.append(i + 1)
    if not bad:
        return labels
    repairs.append(f"dropped {len(bad)} corpus piece(s) more than {off_mm:g} mm off the spine's centre line "
                   f"({int(counts[np.array(bad) - 1].sum())} voxels)")
    out = np.where(np.isin(labels, bad), 0, labels)
    return _relabel_sorted(out.astype(np.int32))[0]


def _union_find_merge(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Component index (0..n-1 roots) of n items joined by ``pairs``."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def corpus_centres(
    semantic: np.ndarray,
    spacing: Sequence[float],
    *,
    erosion_mm: float = 3.0,
    min_volume_mm3: float = 100.0,
    duplicate_fraction: float = 0.5,
    split_ratio: float = 1.6,
    reference_height_mm: float | None = None,
    use_ivds: bool = True,
    off_spine_mm: float | None = 25.0,
    ivd_fraction: float = 0.33,
) -> CorpusCentres:
    """Find one centre per vertebral body in a semantic mask, repairing merged and duplicated corpora.

    Parameters
    ----------
    semantic : (X, Y, Z) int array, PIR
        Semantic mask (TPTBox/SPINEPS labels). 49 with its aliases 50/51 and the endplates 52/53/62 count as corpus.
    spacing : 3 floats
        Voxel size in mm per axis.
    erosion_mm : float
        Voxels closer than this to the corpus border are removed before the seeds are found (SPINEPS erodes
        ~2 voxels). 0 disables the erosion.
    min_volume_mm3 : float
        Seeds and seedless components smaller than this are dropped (reported).
    duplicate_fraction : float
        Pieces closer than this fraction of the reference vertebra height along the spine are merged.
    split_ratio : float
        A corpus whose body height exceeds this times the reference height is split (at its waists).
    reference_height_mm : float, optional
        Expected body height; by default the median of the other, untruncated corpora (needed for size splits
        when only one corpus is visible).
    use_ivds : bool
        Split a corpus at the level of an IVD whose centre lies inside its extent along the spine.
    ivd_fraction : float
        Only discs of at least this fraction of the median disc volume split a corpus, at least half a reference
        body height from either end (fragments of the IVD label inside a body, common in predicted masks, do not).
    off_spine_mm : float, optional
        Drop corpus pieces whose centre is farther than this from the spine's centre line (fitted through the
        larger pieces nearby); None keeps them.

    Returns
    -------
    CorpusCentres

    Examples
    --------
    >>> cc = corpus_centres(semantic, (1.5, 1.5, 1.5))      # doctest: +SKIP
    >>> cc.centres[0]                                       # topmost corpus, voxel coords  # doctest: +SKIP
    """
    sem = check_mask(semantic)
    sp = check_spacing(spacing)
    if erosion_mm < 0 or min_volume_mm3 < 0 or not 0 < duplicate_fraction < 1 or split_ratio <= 1:
        raise ValueError("corpus_centres: erosion_mm and min_volume_mm3 must be >= 0, 0 < duplicate_fraction < 1, "
                         "split_ratio > 1")
    corpus = label_mask(sem, CORPUS_LIKE)
    box = bbox(corpus, margin=1)
    full_labels = np.zeros(sem.shape, dtype=np.int32)
    repairs: list[str] = []
    empty = CorpusCentres(np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3)), full_labels,
                          tuple(float(s) for s in sp), repairs)
    if box is None:
        return empty
    origin = np.array([s.start for s in box])
    # 1-2: seeds from the eroded mask; each un-eroded component takes its seeds' labels
    labels, dropped = _seeded_labels(corpus[box], sp, erosion_mm, min_volume_mm3)
    repairs += dropped
    if labels.max() == 0:
        return empty
    if off_spine_mm:
        labels = _drop_off_spine(labels, sp, off_spine_mm, repairs)
        if labels.max() == 0:
            return empty
    shape_edge = (0 - origin[1], sem.shape[1] - 1 - origin[1])
    # 3: merge duplicates (pieces at the same level along the spine)
    labels, p, merged = _merge_duplicates(labels, sp, shape_edge, reference_height_mm, duplicate_fraction)
    repairs += merged
    # 4: split merged corpora: cut planes (mm along each piece's axis) per piece, at discs inside it, else by size
    ivd = sem[box] == IVD_LABEL
    ivd_cuts = _ivd_cuts(ivd, p, sp, min_volume_mm3, ivd_fraction, reference_height_mm) if use_ivds else {}
    discs = _discs(ivd, sp, min_volume_mm3) if use_ivds else None
    size_cuts, counts, split = _size_cuts(p, {i: None for i in range(len(p.counts)) if i not in ivd_cuts}, discs,
                                         sp, split_ratio, reference_height_mm)
    repairs += split + [f"split corpus {i + 1} at {len(qs)} IVD level(s) inside it" for i, qs in ivd_cuts.items()]
    if ivd_cuts or size_cuts:
        labels, p, split = _cut_columns(labels, p, ivd_cuts, size_cuts, counts, sp, shape_edge, discs, split_ratio,
                                        reference_height_mm)
        repairs += split

    full_labels[box] = labels
    return CorpusCentres(
        centres=p.centres + origin,
        sizes=p.counts.astype(np.int64),
        heights=p.heights.astype(float),
        axes=p.axes,
        labels=full_labels,
        spacing=tuple(float(s) for s in sp),
        repairs=repairs,
    )


def _seeded_labels(sub: np.ndarray, sp: np.ndarray, erosion_mm: float, min_volume_mm3: float
                   ) -> tuple[np.ndarray, list[str]]:
    """Steps 1-2 on the corpus crop ``sub`` (boolean): the 6-connected components of the mask eroded by
    ``erosion_mm`` are the seeds (those under ``min_volume_mm3`` dropped); every corpus voxel takes the nearest seed
    of its own component, and a component without a seed is kept whole when it is that large. Returns the labels
    (int32, 1..K top to bottom) and the repair line of the fragments dropped (none or one)."""
    min_vox = max(int(np.ceil(min_volume_mm3 / float(np.prod(sp)))), 1)
    comps = cc3d.connected_components(sub, connectivity=6).astype(np.int64)
    if erosion_mm > 0:
        dist = edt.edt(sub, anisotropy=tuple(sp), black_border=False)
        seeds = cc3d.connected_components(dist > erosion_mm, connectivity=6).astype(np.int64)
    else:
        seeds = comps.copy()
    seed_counts = np.bincount(seeds.ravel())
    small = np.flatnonzero(seed_counts < min_vox)
    small = small[small > 0]
    if len(small):
        seeds[np.isin(seeds, small)] = 0
    comp_counts = np.bincount(comps.ravel())
    seeded = np.zeros(len(comp_counts), bool)
    seeded[np.unique(comps[seeds > 0])] = True
    seedless = np.flatnonzero(~seeded)
    seedless = seedless[seedless > 0]
    keep_whole = seedless[comp_counts[seedless] >= min_vox]
    drop = seedless[comp_counts[seedless] < min_vox]
    repairs = []
    if len(drop):
        repairs.append(f"dropped {len(drop)} corpus fragment(s) under {min_volume_mm3:g} mm3 "
                       f"({int(comp_counts[drop].sum())} voxels)")
    if len(keep_whole):
        offset = int(seeds.max(initial=0))
        whole = np.isin(comps, keep_whole)
        seeds[whole] = offset + comps[whole]
    labels = _nearest_seed(sub, comps, seeds, len(comp_counts), sp)
    return _relabel_sorted(labels.astype(np.int32))[0], repairs


def _nearest_seed(sub: np.ndarray, comps: np.ndarray, seeds: np.ndarray, n_comps: int, sp: np.ndarray
                  ) -> np.ndarray:
    """Every voxel of ``sub`` labelled with the nearest seed of its own component (seeds of one component only reach
    voxels of it: a component with a single seed takes it wholesale); 0 in components without a seed."""
    pair = np.unique(np.stack([comps[seeds > 0], seeds[seeds > 0]], axis=1), axis=0)
    n_seeds_per_comp = np.bincount(pair[:, 0], minlength=n_comps)
    lut = np.zeros(n_comps, dtype=np.int64)
    lut[pair[:, 0]] = pair[:, 1]
    labels = np.where(sub, lut[comps], 0)
    multi = np.flatnonzero(n_seeds_per_comp > 1)
    if len(multi):
        region = np.isin(comps, multi)
        idx = ndi.distance_transform_edt(seeds == 0, sampling=sp, return_distances=False, return_indices=True)
        nearest = seeds[tuple(idx)]
        ok = region & (comps[tuple(idx)] == comps)
        labels[ok] = nearest[ok]
    return labels


def _merge_duplicates(labels: np.ndarray, sp: np.ndarray, shape_edge: tuple[int, int],
                      reference_height_mm: float | None, duplicate_fraction: float
                      ) -> tuple[np.ndarray, _Pieces, list[str]]:
    """Step 3: merge pieces (and the pieces next but one) closer than ``duplicate_fraction`` x the reference body
    height along the spine. Returns the labels, their pieces and the repair line (none or one). The pieces' axes are
    differences over two neighbours unless pieces were merged or there was nothing to merge (one piece, no height)."""
    p = _pieces(labels, sp, shape_edge, reach=2)
    ref = reference_height_mm or _reference_height(p)
    if not (ref and len(p.counts) > 1):
        return labels, _pieces(labels, sp, shape_edge, reach=1), []
    d = (p.centres[1:] - p.centres[:-1]) * sp
    along = np.abs(np.einsum("ij,ij->i", d, 0.5 * (p.axes[1:] + p.axes[:-1])))
    pairs = [(i, i + 1) for i in np.flatnonzero(along < duplicate_fraction * ref)]
    if len(p.counts) > 2:
        d2 = (p.centres[2:] - p.centres[:-2]) * sp
        along2 = np.abs(np.einsum("ij,ij->i", d2, p.axes[1:-1]))
        pairs += [(i, i + 2) for i in np.flatnonzero(along2 < duplicate_fraction * ref)]
    if not pairs:
        return labels, p, []
    root = _union_find_merge(len(p.counts), pairs)
    merged = int(len(p.counts) - len(np.unique(root)))
    repair = (f"merged {merged} duplicate corpus piece(s) closer than {duplicate_fraction:g} x {ref:.1f} mm along "
              "the spine")
    lut = np.concatenate([[0], root + 1]).astype(np.int32)
    labels, _ = _relabel_sorted(lut[labels])
    return labels, _pieces(labels, sp, shape_edge, reach=1), [repair]


def _ivd_cuts(ivd: np.ndarray, p: _Pieces, sp: np.ndarray, min_volume_mm3: float, ivd_fraction: float,
              reference_height_mm: float | None) -> dict[int, list[float]]:
    """Step 4, discs: cut planes (mm along each piece's axis, per piece index) at the centre of every disc (at least
    ``min_volume_mm3`` and ``ivd_fraction`` of the median disc) that lies inside a piece, at least half a body height
    (of the other bodies) from either end; a quarter of the piece's own extent when it is the only body."""
    cuts: dict[int, list[float]] = {}
    if not ivd.any():
        return cuts
    vox_mm3 = float(np.prod(sp))
    ivd_cc = cc3d.connected_components(ivd, connectivity=26)
    st = cc3d.statistics(ivd_cc)
    vol = st["voxel_counts"][1:] * vox_mm3
    # a disc, not a fragment: at least min_volume_mm3 and a third of the median disc above that size
    real = vol >= min_volume_mm3
    if real.any():
        real &= vol >= ivd_fraction * np.median(vol[real])
    big = np.flatnonzero(real) + 1
    refs = [reference_height_mm or _reference_height(p, exclude=i) for i in range(len(p.counts))]
    margin = np.array([0.5 * r if r else 0.25 * (p.hi[i] - p.lo[i]) for i, r in enumerate(refs)])
    for c in st["centroids"][big]:
        rel = (c - p.centres) * sp
        q = np.einsum("ij,ij->i", rel, p.axes)
        lateral = np.linalg.norm(rel - q[:, None] * p.axes, axis=1)
        radius = np.sqrt(p.counts * vox_mm3 / (np.pi * np.maximum(p.hi - p.lo, 1e-3)))
        inside = (q > p.lo + margin) & (q < p.hi - margin) & (lateral < 1.5 * radius)
        for i in np.flatnonzero(inside):
            cuts.setdefault(int(i), []).append(float(q[i]))
    return cuts


def _cut_columns(labels: np.ndarray, p: _Pieces, ivd_cuts: dict[int, list[float]], size_cuts: dict[int, list[float]],
                 counts: dict[int, int], sp: np.ndarray, shape_edge: tuple[int, int],
                 discs: tuple[np.ndarray, np.ndarray] | None, split_ratio: float, reference_height_mm: float | None,
                 max_passes: int = 8) -> tuple[np.ndarray, _Pieces, list[str]]:
    """Step 4, applied: cut the pieces, then cut again, one body per pass, the rest of each merged column below the
    top body cut off (it holds the column's count of bodies less one) and every piece of a corpus cut at its discs
    that is over-tall. Each pass gives the rest its own axis: one straight axis through three or four lordotic
    bodies slices the lower discs obliquely, where they no longer stand out from the tilted bodies beside them.
    Returns the labels, their pieces and the repair lines of the passes after the first."""
    repairs: list[str] = []
    cuts = {**ivd_cuts, **size_cuts}
    for _ in range(max_passes):
        last = np.full(len(p.counts), np.inf)
        for i in size_cuts:
            last[i] = size_cuts[i][0]
        rest_of = {i: (p.lab == i + 1) & (p.proj > last[i]) for i in size_cuts}
        of_ivd = np.isin(p.lab - 1, list(ivd_cuts))
        labels = _apply_cuts(labels, p, cuts)
        p_cut, p = p, _pieces(labels, sp, shape_edge, reach=1)
        todo: dict[int, int | None] = {j: None for j in _piece_ids(labels, p_cut, of_ivd)}
        for i, below in rest_of.items():
            rest = _piece_ids(labels, p_cut, below)
            if counts[i] > 2 and rest:
                todo[max(rest, key=lambda j: p.counts[j])] = counts[i] - 1
        size_cuts, counts, split = _size_cuts(p, todo, discs, sp, split_ratio, reference_height_mm)
        ivd_cuts, cuts = {}, size_cuts
        repairs += split
        if not cuts:
            break
    return labels, p, repairs


def _piece_ids(labels: np.ndarray, p_before: _Pieces, voxels: np.ndarray) -> set[int]:
    """Indices (0-based) of the pieces of ``labels`` holding the voxels ``voxels`` (a boolean over ``p_before``'s)."""
    return {int(v) - 1 for v in np.unique(labels[tuple(p_before.coords[voxels].T)]) if v > 0}


def _size_cuts(p: _Pieces, todo: dict[int, int | None], discs: tuple[np.ndarray, np.ndarray] | None,
               sp: np.ndarray, split_ratio: float, reference_height_mm: float | None
               ) -> tuple[dict[int, list[float]], dict[int, int], list[str]]:
    """Step 4, sizes: the cut below the top body (:func:`_top_disc`) of every piece in ``todo`` that holds several
    bodies: as many as ``todo`` says (the rest of a merged column), or, where it says None, a piece whose body is
    over ``split_ratio`` x the reference height, its height over the vertebra pitch (from the discs next to it when
    there are discs). Returns the cut and the number of bodies per piece index, and one repair line per piece cut."""
    cuts: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    repairs: list[str] = []
    if len(p.counts) <= 1 and not reference_height_mm:
        return cuts, counts, repairs
    centres_mm = p.centres * sp
    pitch_all = np.linalg.norm(np.diff(centres_mm, axis=0), axis=1) if len(p.counts) > 1 else np.zeros(0)
    for i, known in todo.items():
        h = p.heights[i]
        r = reference_height_mm or _reference_height(p, exclude=i) or (h / known if known else None)
        if not r or (known is None and h <= split_ratio * r):
            continue
        others = np.delete(pitch_all, [j for j in (i - 1, i) if 0 <= j < len(pitch_all)])
        pitch = max(float(np.median(others)) if len(others) else 1.25 * r, r)
        gap = pitch - r
        disc_mm = _disc_next_to(discs, p, i, sp) if discs is not None else None
        if disc_mm:  # bodies between their neighbours' heights and discs as thick as those at its ends: the
            # neighbours' pitch may be of smaller vertebrae (T11/T12 above merged lumbar bodies)
            body = _neighbour_height(p, i) or r
            gap, pitch = disc_mm, body + disc_mm
        n = known or _body_count(p, i, (h + gap) / pitch, pitch)
        q, kind = _top_disc(p, i, n, pitch)
        cuts[i], counts[i] = [q], n
        what = "the rest of a merged corpus" if known else f"{h / r:.1f} x the median {r:.1f} mm"
        repairs.append(f"split corpus {i + 1} ({h:.1f} mm tall, {what}: {n} bodies): the top body cut off at the "
                       f"{kind}")
    return cuts, counts, repairs


def _apply_cuts(labels: np.ndarray, p: _Pieces, cuts: dict[int, list[float]]) -> np.ndarray:
    """The labels with each piece cut at its planes (mm along its axis), renumbered 1..K top to bottom."""
    new = p.lab.copy() * 1000
    for i, qs in cuts.items():
        sel = p.lab == i + 1
        new[sel] += np.searchsorted(np.sort(qs), p.proj[sel], side="right")
    _, inv = np.unique(new, return_inverse=True)
    out = np.zeros_like(labels)
    out[tuple(p.coords.T)] = inv.reshape(-1).astype(np.int32) + 1
    return _relabel_sorted(out)[0]


def _neighbour_height(p: _Pieces, i: int) -> float | None:
    """Mean body height of the pieces right above and below piece ``i`` (those the field of view does not cut and
    that are not fragments); None without one. Bodies merged into piece ``i`` lie between the two in size."""
    ok = ~p.touches_border & (p.counts >= 0.3 * np.median(p.counts))
    near = [j for j in (i - 1, i + 1) if 0 <= j < len(ok) and ok[j]]
    return float(np.mean(p.heights[near])) if near else None


def _body_count(p: _Pieces, i: int, pitches: float, pitch: float, doubt: float = 0.2) -> int:
    """Number of bodies in piece ``i``, ``pitches`` long by the pitch of its neighbours: the rounding of that, unless
    it lies more than ``doubt`` from a whole number and the discs bulging inside it (:func:`_disc_bulges`) count one
    of the two whole numbers around it. The pitch is only good to about a tenth (a tilted L5, concave endplates):
    too little to tell four bodies from five."""
    n = max(2, int(round(pitches)))
    if abs(pitches - round(pitches)) <= doubt:
        return n
    seen = _disc_bulges(p, i, pitch) + 1
    return seen if seen >= 2 and int(np.floor(pitches)) <= seen <= int(np.ceil(pitches)) else n


def _disc_bulges(p: _Pieces, i: int, pitch: float, bulge: float = 0.08) -> int:
    """Number of discs bulging inside piece ``i``'s body: sections that are the widest within 0.3 pitch and
    ``bulge`` x their width wider than the narrowest section on either side within 0.6 pitch, at least half a pitch
    from either end of the body."""
    prof, first, last = _section_profile(p, i)
    bm = p.bin_mm[i]
    local, margin = max(1, int(round(0.3 * pitch / bm))), int(round(0.5 * pitch / bm))
    peak = prof == ndi.maximum_filter1d(prof, 2 * local + 1, mode="nearest")
    found: list[int] = []
    for b in np.flatnonzero(peak[first + margin: last - margin + 1]) + first + margin:
        beside = _beside(prof, b, first, last, max(1, int(round(0.6 * pitch / bm))))
        if prof[b] - beside >= bulge * prof[b] and not (found and b - found[-1] <= local):  # a flat top: once
            found.append(int(b))
    return len(found)


def _section_profile(p: _Pieces, i: int) -> tuple[np.ndarray, int, int]:
    """Cross-section of piece ``i`` along its axis (voxels per bin, smoothed over 3 bins) and its body's first and
    last bin."""
    prof = ndi.uniform_filter1d(p.profile[i].astype(float), 3, mode="nearest")
    b_of = lambda q: int(np.floor((q - p.lo[i]) / p.bin_mm[i]))  # noqa: E731
    return prof, max(b_of(p.body_lo[i]), 0), min(b_of(p.body_hi[i]), len(prof) - 1)


def _beside(prof: np.ndarray, b: int, first: int, last: int, reach: int) -> float:
    """Section of the bodies beside bin ``b``: the narrowest within ``reach`` bins above it and the narrowest within
    ``reach`` below (bins ``first``..``last``), the wider of the two; its own section at either end."""
    if not first < b < last:
        return float(prof[b])
    return float(max(prof[max(first, b - reach): b].min(), prof[b + 1: min(last, b + reach) + 1].min()))


def _discs(ivd: np.ndarray, sp: np.ndarray, min_volume_mm3: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre (mm, crop frame) and thickness (mm) of each disc in ``ivd`` (a boolean crop): components of at least
    ``min_volume_mm3`` and a third of the median disc; thickness sqrt(12 x the smallest variance of its voxels' mm
    coordinates), exact for a uniform slab. None without such a disc."""
    if not ivd.any():
        return None
    cc = cc3d.connected_components(ivd, connectivity=26)
    st = cc3d.statistics(cc)
    vol = st["voxel_counts"][1:] * float(np.prod(sp))
    real = vol >= min_volume_mm3
    if not real.any():
        return None
    real &= vol >= 0.33 * np.median(vol[real])
    centres, thickness = [], []
    for c in np.flatnonzero(real) + 1:
        sl = st["bounding_boxes"][c]
        pts = (np.argwhere(cc[sl] == c) + [s.start for s in sl]) * sp
        if len(pts) < 10:
            continue
        centres.append(pts.mean(axis=0))
        thickness.append(float(np.sqrt(12.0 * max(np.linalg.eigvalsh(np.cov(pts.T))[0], 0.0))))
    return (np.array(centres), np.array(thickness)) if centres else None


def _disc_next_to(discs: tuple[np.ndarray, np.ndarray], p: _Pieces, i: int, sp: np.ndarray) -> float | None:
    """Mean thickness (mm) of the discs nearest to piece ``i``'s two ends along its axis (within 20 mm of an end);
    the median disc when none is that close; None without discs."""
    centres, thickness = discs
    c = p.centres[i] * sp
    near = []
    for q in (p.lo[i], p.hi[i]):
        d = np.linalg.norm(centres - (c + q * p.axes[i]), axis=1)
        k = int(np.argmin(d))
        if d[k] <= 20.0:
            near.append(thickness[k])
    return float(np.mean(near)) if near else float(np.median(thickness))


def _top_disc(p: _Pieces, i: int, n: int, pitch: float, window: float = 0.3, bulge: float = 0.08,
              waist: float = 0.85) -> tuple[float, str]:
    """The cut plane (mm along piece ``i``'s axis) below the top one of the ``n`` vertebral bodies in its body, and
    how it was found. It is expected where the body divides evenly and moved, within ``window`` x ``pitch`` of that
    place and at least half a pitch from either end, to the most disc-like cross-section: a disc painted as corpus
    bulges beyond the bodies on both sides of it (the widest section there, ``bulge`` x its width above the
    narrowest section of the body on either side, within 0.6 pitch: the middle of the bulge); without one, a waist
    within half the window (narrower than ``waist`` x the sections around it: the fused disc of a block vertebra)."""
    prof, first, last = _section_profile(p, i)
    bm, lo = p.bin_mm[i], p.lo[i]
    b_of = lambda q: int(np.floor((q - lo) / bm))  # noqa: E731
    top, end = float(p.body_lo[i]), float(p.body_hi[i])
    expected = top + (end - top) / n
    w0 = max(b_of(expected - window * pitch), b_of(top + 0.5 * pitch), first + 1)
    w1 = min(b_of(expected + window * pitch), b_of(end - 0.5 * pitch), last - 1) + 1
    if w1 <= w0:
        return expected, "expected place"
    b = w0 + int(np.argmax(prof[w0:w1]))
    beside = _beside(prof, b, first, last, max(1, int(round(0.6 * pitch / bm))))
    if prof[b] - beside >= bulge * prof[b]:
        return lo + (w0 + _plateau_middle(prof[w0:w1], b - w0, 0.5 * (prof[b] + beside)) + 0.5) * bm, "disc bulge"
    half = max(1, int(round(0.5 * window * pitch / bm)))
    h0, h1 = max(w0, b_of(expected) - half), min(w1, b_of(expected) + half + 1)
    b = h0 + int(np.argmin(prof[h0:h1])) if h1 > h0 else -1
    if b >= 0 and prof[b] < waist * np.median(prof[w0:w1]):
        return lo + (b + 0.5) * bm, "waist"
    return expected, "expected place"


def _plateau_middle(prof: np.ndarray, b: int, level: float) -> float:
    """Middle (fractional bin) of the run of bins around bin ``b`` whose profile is at least ``level``."""
    a, z = b, b
    while a > 0 and prof[a - 1] >= level:
        a -= 1
    while z < len(prof) - 1 and prof[z + 1] >= level:
        z += 1
    return 0.5 * (a + z)
