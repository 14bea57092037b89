"""Semantic phase: intensity preparation, nnU-Net prediction on the model grid, clean-up, back to the input grid.

The flow is SPINEPS 2.1.3's (``phase_pre`` + ``phase_semantic`` + ``Segmentation_Model.segment_scan``):

1. MRI only: shift the intensities to start at 0 and scale them down into [0, 1500]; optional N4 bias correction
   (SimpleITK's ITK N4, the filter ANTs wraps), then the same normalisation again.
2. Reorient to the model's orientation (PIR) and resample each axis into its ``resolution_range``.
3. nnU-Net sliding window (Gaussian weighting, optional mirroring, fold ensemble, configurable tile step); nnU-Net
   crops, normalises and resamples as its plans say. Output indices become labels through the config's ``labels``.
4. Clean-up (:func:`clean_semantic`), then back onto the input grid. By default the way nnU-Net itself returns to
   the input spacing, in one step from nnU-Net's own grid: each label's probability is interpolated linearly and the
   most probable label wins (:func:`labels_from_probabilities`), with the clean-up's changes kept. SPINEPS lets
   nnU-Net return labels on the model grid and moves them with nearest neighbour (``restore="nearest"``), which puts
   staircases of model-grid voxels on every boundary.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import cc3d
import fill_voids
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from spineps_like.geometry import (
    axis_aligned_map, bbox, grow_box, in_slabs, linear_weights, oriented_view, reoriented_grid, resample_to, same_grid,
    to_input_grid, to_model_grid,
)
from spineps_like.io import Scan
from spineps_like.labels import label_mask
from spineps_like.masks import label_counts, nonzero_index, surface_voxels

#: SPINEPS' small-component threshold: 30 voxels at its reference 0.75 x 0.75 x 1.65 mm grid (27.8 mm^3).
SMALL_COMPONENT_MM3: float = 30 * 0.75 * 0.75 * 1.65
#: Labels whose small components are removed (posterior elements, corpus, canal, IVD).
SMALL_COMPONENT_LABELS: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48, 49, 61, 100)
#: Labels whose 3D holes are filled (corpus, canal, IVD, cord).
FILL_HOLES_LABELS: tuple[int, ...] = (49, 61, 100, 60)
#: Margin around component bounding boxes when keeping the spine's region (SPINEPS: 4 voxels of 0.75 mm).
REGION_MARGIN_MM: float = 3.0
#: Canal and cord labels: one tube (see :func:`_canal_tube`).
CANAL_LABELS: tuple[int, ...] = (60, 61)
#: Largest gap (mm) between pieces of the canal/cord tube that still belong to it, e.g. across a stenosis.
CANAL_GAP_MM: float = 15.0
#: Labels of the anterior column (corpus, its border, endplates, IVD, sacrum): it lies right in front of the canal.
COLUMN_LABELS: tuple[int, ...] = (49, 50, 51, 52, 53, 62, 100, 26)
#: Farthest a piece of the anterior column may start from the canal (mm); bodies touch the canal's front wall.
COLUMN_CANAL_MM: float = 20.0
#: Largest gap (mm) between pieces of the anterior column that still chain up (a column beyond the canal's extent).
COLUMN_GAP_MM: float = 15.0
#: Labels of the vertebral arch and its processes (arcus, spinous, costal, articular): the arch rings the canal.
ARCH_LABELS: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48)
#: Farthest a piece of the arch may start from the canal (mm); the arcus touches the canal's back wall.
ARCH_CANAL_MM: float = 20.0
#: Largest gap (mm) between pieces of the arch that still chain up (a process cut from its arcus by a gap).
ARCH_GAP_MM: float = 15.0
#: SPINEPS' MRI intensity range after normalisation.
NORMALIZE_MAX = 1500.0
#: SPINEPS' N4 foreground threshold on the normalised image.
N4_THRESHOLD = 60.0


# ---------------------------------------------------------------- intensities
def normalize_intensity(image: np.ndarray, max_value: float = NORMALIZE_MAX) -> np.ndarray:
    """Shift the minimum to 0 and scale down (never up) so the maximum is at most ``max_value`` (SPINEPS' MRI
    normalisation, TPTBox ``normalize_to_range_``). Returns float32."""
    out = np.asarray(image, dtype=np.float32)
    out = out - out.min()
    top = float(out.max())
    if top > max_value:
        out *= max_value / top
    return out


def n4_bias_correction(
    image: np.ndarray,
    spacing: Sequence[float],
    *,
    threshold: float = N4_THRESHOLD,
    shrink_mm: float = 8.0,
    spline_distance_mm: float = 100.0,
    iterations: Sequence[int] = (50, 50, 50),
    convergence: float = 1e-4,
) -> np.ndarray:
    """N4 bias field correction (SimpleITK), fitted on a downsampled copy and applied at full resolution.

    The mask is the bounding box of voxels above ``threshold`` (as SPINEPS builds it). Each axis is shrunk to about
    ``shrink_mm`` voxels (keeping at least 8 voxels): the field is smooth at the 100 mm spline scale, and ITK's N4
    costs about 0.1 s per iteration per 40k voxels, so this is where the speed comes from (~2-4 s for a 512x512x20
    scan instead of about a minute at 4 mm); the B-spline has one control point per ``spline_distance_mm``
    (SPINEPS: ``spline_param=100``). The fitted log field is evaluated on the full grid and divided out.

    Parameters
    ----------
    image : 3D array (non-negative, e.g. after :func:`normalize_intensity`).
    spacing : voxel size in mm along the array axes.

    Returns
    -------
    The corrected image (float32); the input unchanged when nothing exceeds ``threshold``.
    """
    import SimpleITK as sitk

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"n4_bias_correction: expected a 3D image, got shape {arr.shape}")
    box = bbox(arr > threshold)
    if box is None:
        return arr
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing([float(s) for s in spacing])
    mask_arr = np.zeros(arr.shape, np.uint8)
    mask_arr[box] = 1
    mask = sitk.GetImageFromArray(mask_arr.transpose(2, 1, 0))
    mask.CopyInformation(img)
    factors = [int(max(1, min(round(shrink_mm / s), n // 8))) for s, n in zip(spacing, arr.shape)]
    small, small_mask = sitk.Shrink(img, factors), sitk.Shrink(mask, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetConvergenceThreshold(convergence)
    extent = [n * s for n, s in zip(arr.shape, spacing)]
    n4.SetNumberOfControlPoints([max(4, int(np.ceil(e / spline_distance_mm)) + 3) for e in extent])
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).transpose(2, 1, 0)
    return (arr / np.exp(log_field)).astype(np.float32)


# ---------------------------------------------------------------- clean-up
def _remove_small_components(mask: np.ndarray, labels: Sequence[int], min_voxels: int) -> int:
    """In place: drop 6-connected components of ``labels`` smaller than ``min_voxels``. Returns voxels removed."""
    cc = cc3d.connected_components(mask, connectivity=6)  # multi-label: one component never mixes labels
    small = label_counts(cc) < min_voxels
    small[0] = False
    if not small.any():
        return 0
    # a component is one label, so "a small component of one of the labels" is decided voxel by voxel
    top = np.iinfo(mask.dtype).max if mask.dtype.itemsize == 1 else int(mask.max())
    of_labels = np.zeros(max(top, *labels, 0) + 1, bool)
    of_labels[list(labels)] = True
    hit = small[cc]
    hit &= of_labels[mask]
    mask[hit] = 0
    return int(np.count_nonzero(hit))


def _component_surfaces(cc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels (N, 3) of the components of ``cc`` and the component of each. Face neighbours never belong to
    different 26-connected components, so the union's surface is the union of the components' surfaces."""
    pts = surface_voxels(cc > 0)
    return pts, cc[tuple(pts.T)]


def _in_box(pts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether each voxel (N, 3 integer coordinates) lies in the box ``lo <= p <= hi``: compared with the integer
    bounds ``ceil(lo)``, ``floor(hi)`` (no float conversion of the points), one column at a time (2x faster)."""
    inside = (pts >= np.ceil(lo).astype(pts.dtype)) & (pts <= np.floor(hi).astype(pts.dtype))
    return inside[:, 0] & inside[:, 1] & inside[:, 2]


def _within(reference: np.ndarray, pts: np.ndarray, component: np.ndarray, n: int, spacing: Sequence[float],
            limit_mm: float, sample_step: int = 16) -> np.ndarray:
    """Whether each component 1..n comes within ``limit_mm`` (mm) of the ``reference`` voxels (N, 3), by a k-d tree on
    surface voxels: the components' ``pts`` with their ``component`` ids.

    Only the answer per component matters, not its distance: every ``sample_step``-th point is measured first, which
    settles most components that touch the reference (a vertebra's surface has thousands of points); the points of
    the components still unsettled are then all measured. The same answer as measuring every point."""
    hit = np.zeros(n + 1, bool)
    if len(reference) == 0 or len(pts) == 0:
        return hit[1:]
    sp = np.asarray(spacing, dtype=float)
    # a point farther than the limit along one axis from the other set's bounding box is farther than the limit
    # from all of it: such reference points leave the tree, such query points are not measured
    reach = limit_mm / sp + 1e-6
    reference = reference[_in_box(reference, pts.min(0) - reach, pts.max(0) + reach)]
    if len(reference) == 0:
        return hit[1:]
    near = _in_box(pts, reference.min(0) - reach, reference.max(0) + reach)
    pts, component = pts[near], component[near]
    if len(pts) == 0:
        return hit[1:]
    # only distances are compared (never which point is nearest): the quicker unbalanced tree answers the same
    tree = cKDTree(reference * sp, balanced_tree=False, compact_nodes=False)
    bound = limit_mm + 1e-6
    sample = np.arange(0, len(pts), max(1, sample_step))
    for idx in (sample, None):
        if idx is None:
            idx = np.flatnonzero(~hit[component])
            if len(idx) == 0:
                break
        d, _ = tree.query(pts[idx] * sp, k=1, distance_upper_bound=bound, workers=-1)
        hit[component[idx][d <= limit_mm]] = True
    hit[0] = False
    return hit[1:]


def _chain(keep: np.ndarray, pts: np.ndarray, component: np.ndarray, spacing: Sequence[float], gap_mm: float
           ) -> np.ndarray:
    """``keep`` (per component 0..n) grown by every component within ``gap_mm`` of the kept ones, repeatedly.

    Each round measures only the components not kept yet, and only against the ones the last round added: they were
    already farther than ``gap_mm`` from everything kept before."""
    n = len(keep) - 1
    added = keep.copy()
    while True:
        todo = ~keep[component]
        if not todo.any() or not added[1:].any():
            return keep
        new = _within(pts[added[component]], pts[todo], component[todo], n, spacing, gap_mm) & ~keep[1:]
        if not new.any():
            return keep
        keep[1:] |= new
        added[:] = False
        added[1:] = new


def _dropped(keep: np.ndarray) -> np.ndarray:
    """Per component id (0 = background, never dropped): whether it is dropped, for one look-up over the labels."""
    drop = ~keep
    drop[0] = False
    return drop


def _canal_tube(mask: np.ndarray, spacing: Sequence[float], gap_mm: float) -> int:
    """In place: the spinal canal and cord are one tube. Keep the largest 26-connected component of canal + cord and
    every other canal/cord component that comes within ``gap_mm`` of what is kept (repeated, so pieces split by a
    stenosis chain up); set the rest to background. Fluid far from the spine (bladder, bowel, cysts) looks like CSF
    and is what this removes. Returns voxels removed."""
    tube = label_mask(mask, CANAL_LABELS)
    box = bbox(tube)
    if box is None:
        return 0
    tube = tube[box]
    cc, n = cc3d.connected_components(tube, connectivity=26, return_N=True)
    if n <= 1:
        return 0
    keep = np.zeros(n + 1, bool)
    keep[1 + int(np.argmax(label_counts(cc)[1:]))] = True
    keep = _chain(keep, *_component_surfaces(cc), spacing, gap_mm)
    drop = _dropped(keep)[cc]
    mask[box][drop] = 0
    return int(drop.sum())


def _canal_voxels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The canal/cord voxels of ``mask`` and their surface voxels (N, 3)."""
    tube = label_mask(mask, CANAL_LABELS)
    return tube, surface_voxels(tube)


def _near_canal(mask: np.ndarray, labels: Sequence[int], spacing: Sequence[float], canal_mm: float,
                gap_mm: float, canal: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """In place: vertebral bodies, endplates and discs form a column right in front of the canal, the arches ring it.
    Keep each 26-connected component of ``labels`` that comes within ``canal_mm`` of the canal/cord, then every
    component within ``gap_mm`` of what is kept (repeated, so a column that runs beyond the canal's extent stays); set
    the rest to background. Nothing is removed when the mask has no canal. ``canal``: the canal/cord voxels of
    ``mask`` and their surface voxels, when known (``labels`` must not include them). Returns voxels removed."""
    tube, tube_surface = canal if canal is not None else _canal_voxels(mask)
    column = label_mask(mask, labels)
    box = bbox(column | tube)
    if box is None or not len(tube_surface) or not column.any():
        return 0
    column = column[box]
    cc, n = cc3d.connected_components(column, connectivity=26, return_N=True)
    pts, component = _component_surfaces(cc)
    keep = np.zeros(n + 1, bool)
    # the box holds the whole canal: its surface voxels are the canal's surface voxels, shifted
    keep[1:] = _within(tube_surface - [b.start for b in box], pts, component, n, spacing, canal_mm)
    keep = _chain(keep, pts, component, spacing, gap_mm)
    drop = _dropped(keep)[cc]
    mask[box][drop] = 0
    return int(drop.sum())


def _spine_region(mask: np.ndarray, spacing: Sequence[float], margin_mm: float, inferior_axis: int | None) -> int:
    """In place: keep the largest 26-connected component and every component whose bounding box (grown by
    ``margin_mm``, twice that along ``inferior_axis`` to bridge gaps between vertebrae) overlaps the region grown so
    far; drop the rest. Returns voxels removed."""
    cc, n = cc3d.connected_components(mask > 0, connectivity=26, return_N=True)
    if n <= 1:
        return 0
    counts = label_counts(cc, n + 1)[1:]
    boxes = ndimage.find_objects(cc, max_label=n)  # voxel counts and boxes only: cc3d.statistics adds centroids
    lo = np.array([[s.start for s in b] for b in boxes], dtype=float)
    hi = np.array([[s.stop for s in b] for b in boxes], dtype=float)
    grow = np.array([margin_mm / s for s in spacing])
    grow_si = grow.copy()
    if inferior_axis is not None:
        grow_si[inferior_axis] *= 2
    keep = np.zeros(n, bool)
    keep[int(np.argmax(counts))] = True
    changed = True
    while changed:
        a_lo, a_hi = lo[keep] - grow_si, hi[keep] + grow_si  # incorporated boxes
        cand = np.flatnonzero(~keep)
        c_lo, c_hi = lo[cand] - grow, hi[cand] + grow
        overlap = np.all((c_lo[:, None] <= a_hi[None]) & (a_lo[None] <= c_hi[:, None]), axis=2).any(axis=1)
        keep[cand[overlap]] = True
        changed = bool(overlap.any())
    if keep.all():
        return 0
    drop = _dropped(np.r_[False, keep])[cc]  # keep is per component 1..n here
    mask[drop] = 0
    return int(drop.sum())


def _fill_holes(mask: np.ndarray, labels: Sequence[int]) -> int:
    """In place: fill 3D holes of each label, background voxels only. Returns voxels filled."""
    if not len(labels):
        return 0
    # every label's bounding box in one pass; filling one label's holes (inside its box, on background) moves no other
    boxes = ndimage.find_objects(mask, max_label=max(labels)) if mask.size else []
    filled_total = 0
    for lab in labels:
        tight = boxes[lab - 1] if lab <= len(boxes) else None
        if tight is None:
            continue
        sub = mask[grow_box(tight, mask.shape, 1)]
        filled = fill_voids.fill(sub == lab, in_place=False)
        new = filled & (sub == 0)
        sub[new] = lab
        filled_total += int(new.sum())
    return filled_total


def clean_semantic(
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    min_volume_mm3: float = SMALL_COMPONENT_MM3,
    small_labels: Sequence[int] = SMALL_COMPONENT_LABELS,
    canal_gap_mm: float | None = CANAL_GAP_MM,
    column_canal_mm: float | None = COLUMN_CANAL_MM,
    arch_canal_mm: float | None = ARCH_CANAL_MM,
    keep_spine_region: bool = True,
    margin_mm: float = REGION_MARGIN_MM,
    inferior_axis: int | None = 1,
    fill_labels: Sequence[int] = FILL_HOLES_LABELS,
    stats: dict | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Clean a semantic mask the way SPINEPS does after its semantic model, plus three anatomical rules.

    1. Drop 6-connected components of ``small_labels`` smaller than ``min_volume_mm3``.
    2. The canal is one tube (not in SPINEPS): canal/cord pieces farther than ``canal_gap_mm`` from the largest one
       (bladder, bowel, cysts: fluid that looks like CSF) are removed; ``None`` skips this.
    3. The anterior column lies in front of the canal (not in SPINEPS): corpus/endplate/IVD/sacrum pieces that start
       farther than ``column_canal_mm`` from the canal, and do not chain up to pieces that do, are removed (bone and
       fluid in the pelvis or abdomen); ``None`` skips this, and so does a mask without canal.
       The same for the vertebral arch (not in SPINEPS): arch pieces (41-48) that start farther than ``arch_canal_mm``
       from the canal and do not chain up to pieces that do are removed (bone-like spots in the back muscles and
       the skin); ``None`` skips this.
    4. Keep the spine's region (SPINEPS): the largest 26-connected foreground component plus every component whose
       bounding box overlaps the region (see ``margin_mm``); everything else is removed. On a curved spine the
       region's box is large, which is why 2 and 3 exist.
    5. Fill 3D holes of ``fill_labels`` (only background voxels are filled, so the cord inside the canal stays).

    Parameters
    ----------
    mask : 3D integer array of semantic labels.
    spacing : voxel size in mm along the array axes.
    inferior_axis : the cranio-caudal axis (1 on a PIR grid), grown twice as much; None for isotropic growth.
    stats : if a dict is given, it receives the voxel counts removed/filled per step.
    threads : with 2 or more, the column and arch rules (3) run side by side (same result).

    Returns
    -------
    A cleaned copy of ``mask``.

    Examples
    --------
    >>> m = np.zeros((20, 20, 20), np.uint8); m[5:15, 5:15, 5:15] = 49; m[0, 0, 0] = 41
    >>> int(clean_semantic(m, (1, 1, 1))[0, 0, 0])
    0
    """
    out = _checked_mask(mask, spacing).copy()
    box = bbox(out > 0)
    info = {"small_removed": 0, "canal_removed": 0, "column_removed": 0, "arch_removed": 0, "region_removed": 0,
            "holes_filled": 0}
    if box is not None:
        sub = out[box]  # a view: the steps below work in place on the foreground's bounding box
        min_voxels = int(max(1, round(min_volume_mm3 / float(np.prod(spacing)))))
        info["small_removed"] = _remove_small_components(sub, small_labels, min_voxels)
        if canal_gap_mm is not None:
            info["canal_removed"] = _canal_tube(sub, spacing, canal_gap_mm)
        info.update(_near_canal_rules(sub, spacing, column_canal_mm, arch_canal_mm, threads))
        if keep_spine_region:
            info["region_removed"] = _spine_region(sub, spacing, margin_mm, inferior_axis)
        info["holes_filled"] = _fill_holes(sub, fill_labels)
    if stats is not None:
        stats.update(info)
    return out


def _checked_mask(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``mask`` as an array, refused unless it is 3D with three positive voxel sizes."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"clean_semantic: expected a 3D mask, got shape {mask.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"clean_semantic: spacing must be three positive numbers, got {spacing}")
    return mask


def _near_canal_rules(mask: np.ndarray, spacing: Sequence[float], column_canal_mm: float | None,
                      arch_canal_mm: float | None, threads: int) -> dict[str, int]:
    """In place: the anterior column and the vertebral arch near the canal (:func:`_near_canal`), each rule whose
    distance is not None. Both read the canal and clear only their own labels: with two ``threads`` they run side by
    side (same result). Returns the voxels each rule removed ('column_removed', 'arch_removed')."""
    rules = [(key, labels, mm, gap) for key, labels, mm, gap in (
        ("column_removed", COLUMN_LABELS, column_canal_mm, COLUMN_GAP_MM),
        ("arch_removed", ARCH_LABELS, arch_canal_mm, ARCH_GAP_MM)) if mm is not None]
    canal = _canal_voxels(mask) if rules else None
    with ThreadPoolExecutor(max(1, min(int(threads), len(rules)))) as pool:
        removed = pool.map(lambda r: _near_canal(mask, r[1], spacing, r[2], r[3], canal), rules)
        return {r[0]: n for r, n in zip(rules, removed)}


# ---------------------------------------------------------------- back to the input grid
def _most_probable(labels: Sequence[int], maps) -> np.ndarray:
    """uint8 label of the largest of ``maps`` (one per label, same shape, taken one at a time so that no stacked
    copy exists) at each voxel; ties keep the first label."""
    top = out = None
    for lab, m in zip(labels, maps):
        if top is None:
            top = np.array(m, dtype=np.float32, copy=True)
            out = np.full(top.shape, lab, dtype=np.uint8)
            continue
        take = m > top
        top[take] = m[take]
        out[take] = lab
    return out


#: Above this share of voxels in mixed cells, :func:`labels_from_probabilities` interpolates a slab whole.
SPARSE_RESTORE_SHARE = 0.5


def _uniform_cells(labels: np.ndarray) -> np.ndarray:
    """int16 label of each model-grid cell (the voxel and its successors along every axis, the last voxel its own
    successor) whose 8 corners share one label; -1 where they differ."""
    pad = np.pad(labels, [(0, 1)] * labels.ndim, mode="edge")
    same = np.ones(labels.shape, bool)
    for shift in np.ndindex(*(2,) * labels.ndim):
        if any(shift):
            same &= pad[tuple(slice(d, d + n) for d, n in zip(shift, labels.shape))] == labels
    return np.where(same, labels.astype(np.int16), np.int16(-1))


def _interpolate_separable(v: np.ndarray, w_slab, order: Sequence[int]) -> np.ndarray:
    """Linear interpolation of ``v`` along each axis in ``order``: ``w_slab[ax]`` = (lower, upper indices, weights)."""
    for ax in order:
        i0, i1, w = w_slab[ax]
        shape = [1] * v.ndim
        shape[ax] = -1
        w = w.reshape(shape)
        v = np.take(v, i0, axis=ax) * (1 - w) + np.take(v, i1, axis=ax) * w
    return v


def _flat_view(v: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """A 1-D view of the memory ``v`` spans (no copy for positive strides) and ``v``'s strides in elements."""
    item = v.itemsize
    if any(st < 0 or st % item for st in v.strides):
        v = np.ascontiguousarray(v)
    span = sum((n - 1) * st for n, st in zip(v.shape, v.strides)) // item + 1
    return (np.lib.stride_tricks.as_strided(v, shape=(span,), strides=(item,), writeable=False),
            tuple(st // item for st in v.strides))


def _corner_offsets(per_axis, strides: Sequence[int]) -> np.ndarray:
    """Offsets ``(2, 2, 2, M)``, for an array of ``strides`` (in elements), of the 8 cell corners of M points from
    ``per_axis[ax]`` = (lower, upper indices) of each point."""
    off = np.zeros((2, 2, 2, len(per_axis[0][0])), dtype=np.intp)
    for ax in range(3):
        for k in (0, 1):
            index = [slice(None)] * 3
            index[ax] = k
            off[tuple(index)] += per_axis[ax][k] * strides[ax]
    return off


def _interpolate_corners(v: np.ndarray, weights: list[np.ndarray], order: Sequence[int]) -> np.ndarray:
    """Linear interpolation at M points from the values ``(2, 2, 2, M)`` at their 8 cell corners, axis by axis in
    ``order``: the same arithmetic, in the same order, as :func:`_interpolate_separable` at those points (the same
    float32 values)."""
    left = [0, 1, 2]
    for ax in order:
        k = left.index(ax)
        w = weights[ax]
        v = np.take(v, 0, axis=k) * (1 - w) + np.take(v, 1, axis=k) * w
        left.pop(k)
    return v


def _most_probable_at(n: int, labels: Sequence[int], maps) -> np.ndarray:
    """As :func:`_most_probable` for ``n`` points, each label's map given on a subset of them as ``(points, values)``
    (``points`` an index array or ``slice(None)``); a label absent at a point cannot win there."""
    top = np.full(n, -np.inf, dtype=np.float32)
    out = np.zeros(n, dtype=np.uint8)
    for lab, (points, v) in zip(labels, maps):
        idx = np.arange(n)[points]
        take = v > top[idx]
        idx = idx[take]
        top[idx] = v[take]
        out[idx] = lab
    return out


def labels_from_probabilities(
    probabilities: np.ndarray,
    channel_labels: Sequence[int],
    grid_affine: np.ndarray,
    reference: Scan,
    *,
    override: np.ndarray | None = None,
    argmax: np.ndarray | None = None,
    margin: int = 2,
    threads: int = 1,
    normalized: bool = False,
) -> np.ndarray:
    """Semantic labels on ``reference``'s grid from class probabilities on a model grid.

    Each label's probability (channels sharing a label are summed) is interpolated linearly onto the reference grid
    and the most probable label wins: linear interpolation back to the input spacing as in nnU-Net (which
    interpolates the logits; probabilities here, so that clean-up overrides are simply 0 or 1), keeping sub-voxel
    boundaries that nearest-neighbour label resampling turns into model-grid staircases.

    Parameters
    ----------
    probabilities : ``(channels, *grid_shape)`` float array on the model grid (a strided view is fine).
    channel_labels : the semantic label of each channel (0 for background).
    grid_affine : the model grid's affine.
    reference : the scan whose grid (shape, affine, orientation) the labels are returned on.
    override : labels on the model grid (e.g. after :func:`clean_semantic`) that replace the probabilities wherever
        they differ from the probabilities' own argmax, so clean-up decisions survive.
    argmax : the probabilities' most probable label on the model grid, when already known (the network's labels
        before clean-up); computed here otherwise.
    margin : model-grid voxels around the foreground's bounding box that are interpolated; outside is background.
    threads : the reference grid's box is split into this many slabs, interpolated in parallel (same values).
    normalized : the probabilities sum to 1 at every voxel (softmax, not region-based sigmoids): a label is then
        interpolated only where it reaches 0.9 / (number of labels) at a corner of the voxel's cell (same labels).

    Returns
    -------
    uint8 labels of ``reference``'s shape.
    """
    probs = np.asarray(probabilities)
    grid_shape = probs.shape[1:]
    channel_labels = np.asarray(channel_labels, dtype=np.intp)
    if probs.ndim != 4 or len(channel_labels) != probs.shape[0]:
        raise ValueError(f"labels_from_probabilities: {probs.shape[0]} channels but {len(channel_labels)} labels")
    labels, label_index, per_label = _per_label(probs, channel_labels)
    fg = _most_probable(labels, per_label) if argmax is None else np.asarray(argmax)
    changed = None
    if override is not None:
        if override.shape != grid_shape:
            raise ValueError(f"labels_from_probabilities: override {override.shape} is not on the grid {grid_shape}")
        changed = override != fg
        changed = changed if changed.any() else None
        fg = override
    maps = _LabelMaps(labels, label_index, per_label, override, changed)
    # the reference grid turned into the model grid's orientation: both grids then share their axes. The labels are
    # written through a view of that orientation straight into an array on the reference grid (no reorienting copy)
    grid_orientation = Scan(fg, grid_affine).orientation
    out_shape, out_affine = reoriented_grid(reference.shape, reference.affine, grid_orientation)
    box = bbox(fg > 0, margin)
    result = np.zeros(reference.shape, dtype=np.uint8)
    out = oriented_view(result, reference.affine, grid_orientation)
    if box is None:
        return result
    mapping = axis_aligned_map(grid_shape, grid_affine, out_affine)
    if mapping is None:  # grids not axis-aligned: whole-volume resampling per label
        whole = tuple(slice(0, n) for n in grid_shape)
        out[...] = _most_probable(labels, (resample_to(Scan(np.ascontiguousarray(maps.overridden(p, lab, whole)),
                                                            grid_affine), out_shape, out_affine, order=1).array
                                           for lab, p in zip(labels, per_label)))
        return result
    reads = _box_weights(box, mapping, grid_shape, out_shape)
    if reads is None:
        return result
    sub_out, weights = reads
    # interpolate the shrinking axes first: the intermediates stay small
    order = sorted(range(3), key=lambda a: (sub_out[a].stop - sub_out[a].start) / (box[a].stop - box[a].start))
    restore = _SlabRestore(maps, box, weights, order, _uniform_cells(fg[box]), out[sub_out], normalized)
    in_slabs(restore.sub.shape, threads, restore.slab)
    return result


def _per_label(probs: np.ndarray, channel_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The labels (0 first), each label's position among them (a look-up table by label) and one probability map per
    label: a view of its channel, or the sum of its channels."""
    labels = np.unique(channel_labels)
    if labels[0] != 0:
        labels = np.concatenate([[0], labels])
    label_index = np.zeros(max(256, int(labels[-1]) + 1), dtype=np.intp)  # label -> its position in labels
    label_index[labels] = np.arange(len(labels))
    per_label = []
    for lab in labels:
        idx = np.flatnonzero(channel_labels == lab)
        per_label.append(probs[idx].sum(axis=0, dtype=np.float32) if len(idx) != 1 else probs[idx[0]])
    return labels, label_index, per_label


class _LabelMaps(NamedTuple):
    """The probability map of each label on the model grid, and the clean-up's decisions that replace them."""

    labels: np.ndarray  # the labels, 0 first
    label_index: np.ndarray  # label -> its position in labels
    per_label: list[np.ndarray]  # one probability map per label
    override: np.ndarray | None  # the clean-up's labels
    changed: np.ndarray | None  # where they differ from the probabilities' argmax (None: nowhere)

    def overridden(self, p: np.ndarray, lab: int, index: tuple[slice, ...]) -> np.ndarray:
        """``p[index]`` with the overridden voxels set to 1 where the override is ``lab``, else 0."""
        v = p[index]
        if self.changed is None or not self.changed[index].any():
            return v
        return np.where(self.changed[index], self.override[index] == lab, v).astype(np.float32, copy=False)


def _box_weights(box: tuple[slice, ...], mapping: tuple[np.ndarray, np.ndarray], grid_shape: Sequence[int],
                 out_shape: Sequence[int]) -> tuple[tuple[slice, ...], list] | None:
    """The reference voxels (slices, in the model grid's orientation) whose model-grid coordinate falls inside
    ``box``, past the grid's ends the edge voxels too, with their linear weights per axis (box-relative indices);
    None when there is none. ``mapping``: model-grid coordinate = scale x reference index + offset, per axis."""
    scale, offset = mapping
    sub_out, weights = [], []
    for ax in range(3):
        lo = 0 if box[ax].start == 0 else int(np.ceil((box[ax].start - offset[ax]) / scale[ax] - 1e-6))
        hi = (out_shape[ax] - 1 if box[ax].stop == grid_shape[ax]
              else int(np.floor((box[ax].stop - 1 - offset[ax]) / scale[ax] + 1e-6)))
        lo, hi = max(lo, 0), min(hi, out_shape[ax] - 1)
        if hi < lo:
            return None
        sub_out.append(slice(lo, hi + 1))
        coords = scale[ax] * np.arange(lo, hi + 1) + offset[ax] - box[ax].start
        weights.append(linear_weights(box[ax].stop - box[ax].start, coords))
    return tuple(sub_out), weights


@dataclass
class _SlabRestore:
    """Labels of ``sub`` (the reference grid's voxels over the model grid's ``box``) from the label maps, slab by
    slab (:meth:`slab`, called on threads for disjoint slabs of ``sub``)."""

    maps: _LabelMaps
    box: tuple[slice, ...]
    weights: list  # per axis: (lower, upper) box-relative model-grid index and weight of each voxel of sub
    order: list[int]  # the axes in the order they are interpolated
    cell: np.ndarray  # the label of each model-grid cell of the box with one label at all 8 corners, else -1
    sub: np.ndarray  # written
    normalized: bool  # the probabilities sum to 1

    def slab(self, index: tuple[slice, ...]) -> None:
        """Write the labels of ``sub[index]``. Where the model-grid cell around a voxel has one label at all 8
        corners, that label wins there (each corner prefers it to every other label, and so does any convex
        combination of them): only the voxels in mixed cells are interpolated."""
        w_slab, src = self._reads(index)
        known = self.cell[np.ix_(*(self.weights[ax][0][index[ax]] for ax in range(3)))]
        mixed = np.flatnonzero(known < 0)
        m = self.maps
        if len(mixed) > SPARSE_RESTORE_SHARE * known.size:
            self.sub[index] = _most_probable(m.labels, (_interpolate_separable(m.overridden(p, lab, src), w_slab,
                                                                               self.order)
                                                        for lab, p in zip(m.labels, m.per_label)))
            return
        labs = known.astype(np.uint8, order="C")  # C order: its flat view takes the mixed voxels
        if len(mixed):
            at = np.unravel_index(mixed, known.shape)
            at = [[a[at[ax]] for a in w_slab[ax]] for ax in range(3)]  # (lower, upper, weight) per point
            cells = _MixedCells(m, src, _CornerReader(at), self.order, len(mixed))
            if self.normalized and len(m.labels) <= 64:
                cells = cells.with_candidates()
            labs.reshape(-1)[mixed] = _most_probable_at(len(mixed), m.labels, (
                cells.interpolate(j, lab, p) for j, (lab, p) in enumerate(zip(m.labels, m.per_label))))
        self.sub[index] = labs

    def _reads(self, index: tuple[slice, ...]) -> tuple[list, tuple[slice, ...]]:
        """This slab's rows of the weights (indices relative to what it reads) and the model-grid range it reads."""
        w_slab, src = [], []
        for ax in range(3):
            i0, i1, w = (a[index[ax]] for a in self.weights[ax])
            first = int(i0.min())
            w_slab.append((i0 - first, i1 - first, w))
            src.append(slice(self.box[ax].start + first, self.box[ax].start + int(i1.max()) + 1))
        return w_slab, tuple(src)


class _CornerReader:
    """Values of maps on one model-grid range at the 8 cell corners of some points, with the corner offsets computed
    once per memory layout of the maps."""

    def __init__(self, at: list) -> None:
        self.at = at  # per axis: (lower, upper, weight) of each point
        self.offsets: dict[tuple[int, ...], np.ndarray] = {}

    def values(self, v: np.ndarray, points: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``v`` (a map on the range) at the 8 cell corners ``(2, 2, 2, m)`` of the points."""
        flat, strides = _flat_view(v)
        if strides not in self.offsets:
            self.offsets[strides] = _corner_offsets(self.at, strides)
        return np.take(flat, self.offsets[strides][..., points])


class _MixedCells:
    """The points of a slab in mixed cells: each label's interpolated probability there (:meth:`interpolate`), with
    the clean-up's decisions at the cell corners (1 for the label it set, 0 for the others)."""

    def __init__(self, maps: _LabelMaps, src: tuple[slice, ...], corners: _CornerReader, order: list[int],
                 n: int) -> None:
        self.maps, self.src, self.corners, self.order, self.n = maps, src, corners, order, n
        self.forced = self.forced_label = None
        if maps.changed is not None:
            forced = corners.values(maps.changed[src])
            if forced.any():
                self.forced, self.forced_label = forced, corners.values(maps.override[src])
        self.candidates = None  # per point, one bit per label that may win there (None: every label may)
        # one bit per label: the narrowest unsigned type that holds them, less memory to pass over
        self.label_bits = next((t for t in (np.uint8, np.uint16, np.uint32) if len(maps.labels) <= 8 * t().itemsize),
                               np.uint64)

    def with_candidates(self) -> "_MixedCells":
        """With the candidates of normalized probabilities: a label under 0.9 / n at all 8 corners of a cell stays
        under it inside the cell, where the winner holds at least 1 / n (n labels whose probabilities sum to 1): per
        point, only the labels reaching that at a corner of its cell are interpolated."""
        m, src, bits_t = self.maps, self.src, self.label_bits
        floor = np.float32(0.9 / len(m.labels))
        # in the maps' memory order (a permuted view of nnU-Net's array): 5x faster passes than in the grid's C order
        bits = np.zeros_like(m.per_label[0][src], dtype=bits_t)
        for j, p in enumerate(m.per_label):
            np.bitwise_or(bits, bits_t(1 << j), out=bits, where=p[src] >= floor)
        if m.changed is not None:
            ch = m.changed[src]
            bits[ch] = np.left_shift(bits_t(1), m.label_index[m.override[src][ch]].astype(bits_t))
        self.candidates = np.bitwise_or.reduce(self.corners.values(bits).reshape(8, -1), axis=0)
        return self

    def interpolate(self, j: int, lab: int, p: np.ndarray) -> tuple[np.ndarray | slice, np.ndarray]:
        """The points where label ``lab`` (the ``j``-th) may win and its interpolated probability there."""
        points = slice(None) if self.candidates is None else nonzero_index(self.candidates & self.label_bits(1 << j))
        if not isinstance(points, slice) and 2 * len(points) > self.n:
            # a label that is a candidate at most points: every point costs less than indexing them, and where it is
            # no candidate it stays under the floor, so it cannot win there
            points = slice(None)
        v = self.corners.values(p[self.src], points)
        if self.forced is not None:
            v = np.where(self.forced[..., points], self.forced_label[..., points] == lab, v).astype(np.float32,
                                                                                                    copy=False)
        return points, _interpolate_corners(v, [a[2][points] for a in self.corners.at], self.order)


# ---------------------------------------------------------------- prediction
def _inferior_axis(orientation: str) -> int | None:
    for i, c in enumerate(orientation):
        if c in "IS":
            return i
    return None


def predict_semantic(
    scan: Scan,
    model,
    *,
    step_size: float | None = None,
    mirroring: bool | None = None,
    folds: Sequence[str | int] | None = None,
    n4: bool = False,
    device: str | None = None,
    amp: bool = False,
    normalize: bool | None = None,
    clean: bool = True,
    restore: str = "linear",
    timings: dict | None = None,
) -> Scan:
    """Semantic segmentation of ``scan``, returned on the scan's own grid with labels of the scheme.

    Parameters
    ----------
    scan : the image.
    model : a :class:`~spineps_like.models.SemanticModel`, or a model name / folder path to load.
    step_size : sliding-window tile step as a fraction of the patch (default: the config's ``default_step_size``).
    mirroring : test-time mirroring (default: the config's ``inference_augmentation``); up to 8x slower.
    folds : folds to ensemble (default: the config's ``available_folds``).
    n4 : N4 bias field correction before prediction (MRI).
    device : 'cpu', 'cuda' or 'mps' to load ``model`` on (default 'cpu'); must match an already loaded model.
    amp : bfloat16 autocast on CPU (nnU-Net always autocasts on CUDA).
    normalize : SPINEPS' [0, 1500] intensity normalisation; default on for MRI models, off for CT models.
    clean : apply :func:`clean_semantic` on the model grid.
    restore : how labels return from the model grid to the scan's grid when it was resampled: 'linear' interpolates
        the class probabilities (:func:`labels_from_probabilities`; nnU-Net interpolates its logits), 'nearest'
        moves the label mask (SPINEPS' way; faster, staircased boundaries). A grid that was only reoriented is
        restored exactly either way.
    timings : if a dict is given, it receives seconds per step (prepare, n4, resample, predict, clean, restore).

    Raises
    ------
    ValueError for a scan that is not a finite 3D image.
    """
    t0 = time.perf_counter()
    t: dict[str, float] = {}
    given = model
    model = _semantic_model(given, device)
    if model is not given:
        t["load"] = time.perf_counter() - t0
    arr = _checked_image(scan, restore)
    cfg = model.config
    do_norm = (not cfg.is_ct) if normalize is None else normalize
    with _timed(t, "prepare"):
        image = _normalized(arr.astype(np.float32, copy=False), do_norm)
    if n4:
        with _timed(t, "n4"):
            image = _normalized(n4_bias_correction(image, scan.spacing), do_norm)
    with _timed(t, "resample"):
        import torch  # its CPU thread budget (a cohort worker sets it) also bounds the resampling threads

        threads = torch.get_num_threads()
        grid = to_model_grid(Scan(image, scan.affine), cfg.orientation, cfg.resolution_range, order=3, threads=threads)
    with _timed(t, "predict"):
        # 'linear' stops on nnU-Net's own grid when the scan was resampled: one interpolation to the input grid
        resampled = not same_grid(*reoriented_grid(scan.shape, scan.affine, cfg.orientation), grid.shape, grid.affine)
        labels, probabilities, label_affine = _network_output(model, grid, restore == "linear" and resampled,
                                                              folds=folds, step_size=step_size, mirroring=mirroring,
                                                              amp=amp)
    if not labels.any():
        warnings.warn("predict_semantic: the model found no spine in this scan (empty mask)", stacklevel=2)
    # the probabilities' per-label argmax, when no two channels share a label (clean_semantic returns a copy)
    network_labels = labels if len(np.unique(model.lut)) == len(model.lut) else None
    if clean:
        with _timed(t, "clean"):
            labels = clean_semantic(labels, Scan(labels, label_affine).spacing,
                                    inferior_axis=_inferior_axis(cfg.orientation), threads=threads)
    with _timed(t, "restore"):
        out = _on_input_grid(labels, probabilities, label_affine, grid, scan, model, network_labels, threads)
        del probabilities
    t["total"] = time.perf_counter() - t0
    if timings is not None:
        timings.update(t)
    return Scan(out.array.astype(np.uint8, copy=False), scan.affine.copy(), scan.path)


@contextmanager
def _timed(t: dict[str, float], step: str) -> Iterator[None]:
    """Seconds the block takes, as ``t[step]`` (not when it raises)."""
    tic = time.perf_counter()
    yield
    t[step] = time.perf_counter() - tic


def _semantic_model(model, device: str | None):
    """``model`` when it is a :class:`~spineps_like.models.SemanticModel` (on ``device``, when one is named), or the
    model that a name or folder names, loaded on ``device`` (default 'cpu')."""
    from spineps_like.models import ModelFolder, SemanticModel, load_semantic_model

    if isinstance(model, (str, os.PathLike, ModelFolder)):
        return load_semantic_model(model, device=device or "cpu")
    if not isinstance(model, SemanticModel):
        raise ValueError(f"model must be a SemanticModel, a model name or a folder, got {type(model).__name__}")
    if device is not None and str(device).split(":")[0] != model.nnunet.device.type:
        raise ValueError(f"model {model.name!r} is loaded on {model.nnunet.device}, not {device}; load it with device=")
    return model


def _checked_image(scan: Scan, restore: str) -> np.ndarray:
    """The scan's array, refused unless it is a non-empty finite 3D image (and ``restore`` a known way back)."""
    arr = np.asarray(scan.array)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"predict_semantic: expected a non-empty 3D image, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError("predict_semantic: the image holds non-finite (NaN/inf) or non-numeric values")
    if restore not in ("linear", "nearest"):
        raise ValueError(f"predict_semantic: restore must be 'linear' or 'nearest', got {restore!r}")
    return arr


def _normalized(image: np.ndarray, normalize: bool) -> np.ndarray:
    """SPINEPS' MRI intensity normalisation when ``normalize``, else ``image`` itself."""
    return normalize_intensity(image) if normalize else image


def _network_output(model, grid: Scan, on_network_grid: bool, **kw
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The network's labels, its probabilities and the labels' affine: on nnU-Net's own grid with the probabilities
    when ``on_network_grid``, else on the model grid ``grid`` without them. ``kw``: folds, step size, mirroring,
    amp."""
    if on_network_grid:
        return model.predict_network_grid(grid.array, grid.spacing, grid.affine, **kw)
    return model.predict_labels(grid.array, grid.spacing, **kw), None, grid.affine


def _on_input_grid(labels: np.ndarray, probabilities: np.ndarray | None, label_affine: np.ndarray, grid: Scan,
                   scan: Scan, model, network_labels: np.ndarray | None, threads: int) -> Scan:
    """The labels moved onto ``scan``'s grid: from the probabilities when there are any (the labels override them
    where the clean-up changed the network's argmax ``network_labels``), else by nearest neighbour from ``grid``."""
    if probabilities is None:
        return to_input_grid(Scan(labels, grid.affine), scan)
    return Scan(labels_from_probabilities(probabilities, model.lut, label_affine, scan, override=labels,
                                          argmax=network_labels, threads=threads,
                                          normalized=not model.nnunet.label_manager.has_regions), scan.affine)


__all__ = [
    "FILL_HOLES_LABELS", "SMALL_COMPONENT_LABELS", "SMALL_COMPONENT_MM3", "clean_semantic",
    "labels_from_probabilities", "n4_bias_correction", "normalize_intensity", "predict_semantic",
]
