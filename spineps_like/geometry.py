"""Geometry on :class:`~spineps_like.io.Scan`: reorientation, resampling, crops.

Reorientation is an exact axis permutation/flip (nibabel.orientations); resampling goes through
nibabel.processing (scipy spline interpolation for images, nearest neighbour for masks). Where the target
grid equals the source grid, arrays are returned untouched, so a round trip is bit-exact.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import nibabel as nib
import nibabel.orientations as nio
import nibabel.processing as nip
import numpy as np
from scipy import ndimage

from spineps_like.io import Scan

#: Edge padding before the spline prefilter, as scipy's ``affine_transform`` pads for ``mode='nearest'``.
_SPLINE_PAD = 12


def reorient(scan: Scan, axcodes: str = "PIR") -> Scan:
    """Permute/flip the array so its axes point to ``axcodes`` (nibabel codes, e.g. 'PIR', 'RAS')."""
    src = nio.io_orientation(scan.affine)
    dst = nio.axcodes2ornt(tuple(axcodes))
    if np.array_equal(src, dst):
        return scan
    transform = nio.ornt_transform(src, dst)
    arr = nio.apply_orientation(scan.array, transform)
    affine = scan.affine @ nio.inv_ornt_aff(transform, scan.array.shape)
    return Scan(np.ascontiguousarray(arr), affine, scan.path)


def oriented_view(array: np.ndarray, affine: np.ndarray, axcodes: str = "PIR") -> np.ndarray:
    """``array`` (on the grid of ``affine``) with its axes pointing to ``axcodes``, as a view (flips and a transpose)
    that writes through: what :func:`reorient` copies. Writing a box of a reoriented result back this way moves only
    the box, not the whole volume."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
    return nio.apply_orientation(array, transform)


def reoriented_grid(shape: Sequence[int], affine: np.ndarray, axcodes: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The (shape, affine) :func:`reorient` gives a grid, without touching any array."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
    new_shape = tuple(int(shape[int(ax)]) for ax in np.argsort(transform[:, 0]))
    return new_shape, np.asarray(affine, float) @ nio.inv_ornt_aff(transform, tuple(shape))


def same_grid(a_shape: Sequence[int], a_affine: np.ndarray, b_shape: Sequence[int], b_affine: np.ndarray,
              atol: float = 1e-4) -> bool:
    """True when two grids (shape + affine) coincide."""
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_affine, b_affine, atol=atol)


def resample_to(scan: Scan, shape: Sequence[int], affine: np.ndarray, *, order: int = 3, mode: str = "nearest",
                threads: int = 1, box: Sequence[slice] | None = None) -> Scan:
    """Resample onto the grid (shape, affine). ``order`` 0 for masks (nearest), 1 linear, 3 cubic spline.

    Returns ``scan`` itself when the grids coincide. Between axis-aligned grids (a rescale, as :func:`rescale_grid`
    makes) with ``mode='nearest'``, order 0 is one gather and higher orders run scipy's zoom-shift algorithm split
    over ``threads`` threads (the general path's values to float rounding).

    ``box`` (order 0 only): return just ``result.array[box]`` (a C-ordered array; the Scan keeps the whole grid's
    affine), computed on the box alone where the grids are axis-aligned. Each voxel is mapped exactly as for the whole
    grid, so the values are those of the whole result cropped (a crop's own affine would move ties at half voxels).
    """
    if box is not None:
        if order != 0:
            raise ValueError("resample_to: a box is only supported for order 0")
        index = nearest_indices(scan.shape, scan.affine, shape, affine) if mode == "nearest" else None
        if index is None:
            arr = np.ascontiguousarray(resample_to(scan, shape, affine, order=0, mode=mode).array[tuple(box)])
        else:
            arr = scan.array[np.ix_(*(ix[b] for ix, b in zip(index, box)))]
        return Scan(arr, np.asarray(affine, dtype=float), scan.path)
    if same_grid(scan.shape, scan.affine, shape, affine):
        return scan
    if order == 0 and mode == "nearest":
        index = nearest_indices(scan.shape, scan.affine, shape, affine)
        if index is not None:  # axis-aligned grids (a rescale): one gather, no interpolation machinery
            return Scan(scan.array[np.ix_(*index)], np.asarray(affine, dtype=float), scan.path)
    if order > 0 and mode == "nearest" and scan.array.ndim == 3:
        mapping = axis_aligned_map(scan.shape, scan.affine, affine)
        if mapping is not None:
            arr = spline_resample(scan.array, *mapping, tuple(int(s) for s in shape), order, threads)
            return Scan(arr, np.asarray(affine, dtype=float), scan.path)
    src = nib.Nifti1Image(scan.array if order > 0 else scan.array.astype(np.float32), scan.affine)
    out = nip.resample_from_to(src, (tuple(int(s) for s in shape), affine), order=order, mode=mode, cval=0.0)
    arr = np.asarray(out.dataobj)
    if order == 0:
        arr = np.rint(arr).astype(scan.array.dtype)
    else:
        arr = arr.astype(np.float32, copy=False)
    return Scan(arr, np.asarray(out.affine, dtype=float), scan.path)


def spline_resample(array: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], order: int,
                     threads: int) -> np.ndarray:
    """float32 spline interpolation of ``array`` at ``scale * index + offset`` per axis, edge values beyond the ends.

    What ``ndimage.affine_transform(array, scale, offset, order=order, mode='nearest')`` computes with its 1-D
    (diagonal) matrix, i.e. scipy's zoom-shift algorithm. Cubic (``order`` 3) runs :func:`separable_cubic_resample`
    (the same interpolant one axis at a time, equal to float rounding); other orders run scipy's own padding,
    prefilter and evaluation, so the same bits, with the prefilter's lines and the output split into slabs, one per
    thread (the zoom-shift algorithm and the prefilter release the GIL; the general matrix path does not)."""
    if order == 3 and array.ndim == 3:
        return separable_cubic_resample(array, scale, offset, shape)
    if order > 1:  # scipy pads by the edge values before its prefilter for mode 'nearest'
        filtered = np.pad(array, _SPLINE_PAD, mode="edge").astype(np.float64, copy=False)
        for axis in range(filtered.ndim):  # ndimage.spline_filter: one axis after the other, its lines in parallel
            in_slabs(filtered.shape, threads, lambda index, axis=axis: ndimage.spline_filter1d(
                filtered[index], order, axis=axis, output=filtered[index], mode="nearest"), keep_axis=axis)
        pad = float(_SPLINE_PAD)
    else:
        filtered, pad = array, 0.0
    out = np.empty(shape, dtype=np.float32)
    matrix = np.asarray(scale, dtype=np.float64)

    def evaluate(index: tuple[slice, ...]) -> None:
        off = np.asarray(offset, dtype=np.float64) + pad
        off += matrix * np.array([s.start for s in index])
        ndimage.affine_transform(filtered, matrix, off, output_shape=out[index].shape, output=out[index], order=order,
                                 mode="nearest", prefilter=False)

    in_slabs(shape, threads, evaluate)
    return out


#: Spline-operator entries below this (relative to 1, the size of the largest) are left out of the matrix products:
#: scipy's cubic prefilter decays as 0.268 ** distance, so these are the coefficients more than about 30 samples
#: away, whose share of a value is under float64 rounding.
_SPLINE_OPERATOR_CUTOFF = 1e-17
#: Output rows per band block of a spline operator.
_SPLINE_BLOCK = 64


def cubic_spline_operator(n: int, scale: float, offset: float, m: int) -> np.ndarray:
    """(m, n) float64 matrix taking ``n`` samples to scipy's cubic spline interpolation (mode 'nearest') at
    ``scale * i + offset``, i < m: scipy's edge padding and prefilter applied to the identity, then each position's
    four cubic B-spline weights on the coefficients around it (indices clamped to the padded line, as scipy does)."""
    coeff = ndimage.spline_filter1d(np.pad(np.eye(n), ((_SPLINE_PAD, _SPLINE_PAD), (0, 0)), mode="edge"), 3, axis=0,
                                    mode="nearest")
    x = scale * np.arange(m) + offset + _SPLINE_PAD
    first = np.floor(x)
    t = x - first
    weights = ((1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6, (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6)
    op = np.zeros((m, n))
    for k, w in enumerate(weights):
        op += w[:, None] * coeff[np.clip(first.astype(np.intp) - 1 + k, 0, len(coeff) - 1)]
    return op


@functools.lru_cache(maxsize=16)
def _operator_bands(n: int, scale: float, offset: float, m: int) -> list[tuple[int, int, int, int, object]]:
    """Blocks of ``_SPLINE_BLOCK`` rows of :func:`cubic_spline_operator`, each with only the columns that carry its
    weights (see ``_SPLINE_OPERATOR_CUTOFF``): (first row, end row, first column, end column, torch block). Cached
    (a band is about 60 + 1.2 x 64 columns wide): the scans of one protocol share their operators."""
    import torch

    op = cubic_spline_operator(n, scale, offset, m)
    bands = []
    for r0 in range(0, m, _SPLINE_BLOCK):
        r1 = min(r0 + _SPLINE_BLOCK, m)
        cols = np.flatnonzero(np.abs(op[r0:r1]).max(axis=0) > _SPLINE_OPERATOR_CUTOFF)
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        bands.append((r0, r1, lo, hi, torch.tensor(op[r0:r1, lo:hi])))
    return bands


def separable_cubic_resample(array: np.ndarray, scale: np.ndarray, offset: np.ndarray, shape: Sequence[int]
                             ) -> np.ndarray:
    """float32 cubic spline interpolation of a 3-D ``array`` at ``scale * index + offset`` per axis (edge values
    beyond the ends): scipy's ``affine_transform`` result with a diagonal matrix and ``mode='nearest'``, to float
    rounding, computed one axis at a time.

    The cubic spline interpolant is a tensor product, so resampling one axis after the other with the 1-D operator
    of :func:`cubic_spline_operator` gives the same values (scipy: 64 taps per voxel on the prefiltered volume; here a
    matrix product per axis on torch's threads, over each operator's band). Axes whose grid stays (scale 1, offset 0)
    are left as they are: a spline evaluated at its own knots gives back the samples. The axis that shrinks most goes
    first."""
    import torch

    shape = tuple(int(n) for n in shape)
    x = torch.from_numpy(np.array(array, dtype=np.float64))
    axes = [a for a in range(3) if not (scale[a] == 1.0 and offset[a] == 0.0 and shape[a] == array.shape[a])]
    with torch.inference_mode():
        for a in sorted(axes, key=lambda a: shape[a] / array.shape[a]):
            out = torch.empty((*x.shape[:a], shape[a], *x.shape[a + 1:]), dtype=torch.float64)
            for r0, r1, lo, hi, block in _operator_bands(int(x.shape[a]), float(scale[a]), float(offset[a]), shape[a]):
                if a == 0:
                    torch.matmul(block, x[lo:hi].reshape(hi - lo, -1), out=out[r0:r1].view(r1 - r0, -1))
                elif a == 1:
                    out[:, r0:r1] = torch.matmul(block, x[:, lo:hi])
                else:
                    out[..., r0:r1] = torch.matmul(x[..., lo:hi], block.T)
            x = out
    return x.numpy().astype(np.float32)


def in_slabs(shape: Sequence[int], threads: int, fn, *, keep_axis: int | None = None) -> None:
    """Call ``fn(index)`` for ``threads`` slabs (tuples of slices, with explicit starts) that tile an array of
    ``shape`` along its longest axis other than ``keep_axis``, on as many threads. For work whose voxels (or lines
    along ``keep_axis``) are independent and whose numpy/scipy kernels release the GIL."""
    axes = [a for a in range(len(shape)) if a != keep_axis]
    ax = max(axes, key=lambda a: shape[a])
    n = max(1, min(int(threads), int(shape[ax])))
    bounds = np.linspace(0, shape[ax], n + 1).astype(int)
    slabs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        index = [slice(0, int(m)) for m in shape]
        index[ax] = slice(int(lo), int(hi))
        slabs.append(tuple(index))
    if n == 1:
        fn(slabs[0])
        return
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(fn, slabs))


def rescale_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid covering the same field of view as (shape, affine) with voxel size ``spacing`` (array-axis order)."""
    zooms = np.asarray(nib.affines.voxel_sizes(affine), dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    new_shape = tuple(max(1, int(round(s * z / n))) for s, z, n in zip(shape, zooms, spacing))
    if np.allclose(zooms, spacing, atol=1e-6):
        return tuple(int(s) for s in shape), np.asarray(affine, dtype=float)
    # new voxel j sits at old index (j - (m-1)/2) * f + (n-1)/2: the centres of both fields of view coincide
    f = spacing / zooms
    offset = (np.asarray(shape, float) - 1) / 2 - f * (np.asarray(new_shape, float) - 1) / 2
    index_map = nib.affines.from_matvec(np.diag(f), offset)
    return new_shape, np.asarray(affine, dtype=float) @ index_map


def rescale(scan: Scan, spacing: Sequence[float], *, order: int = 3, threads: int = 1) -> Scan:
    """Resample to voxel size ``spacing`` (mm, array-axis order) over the same field of view."""
    shape, affine = rescale_grid(scan.shape, scan.affine, spacing)
    return resample_to(scan, shape, affine, order=order, threads=threads)


def axis_aligned_map(src_shape: Sequence[int], src_affine: np.ndarray, dst_affine: np.ndarray,
                     atol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, offset) with ``src_index = scale * dst_index + offset`` per axis, when the destination grid's axes run
    along the source grid's (a rescale over the same orientation, as :func:`rescale_grid` makes); else None."""
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)
    lin, off = m[:3, :3], m[:3, 3]
    scale = np.diag(lin).copy()
    if not np.allclose(lin - np.diag(scale), 0.0, atol=atol) or np.any(scale <= 0) or len(src_shape) != 3:
        return None
    return scale, off.copy()


def nearest_indices(src_shape: Sequence[int], src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-axis source indices of nearest-neighbour resampling onto (shape, affine) when the grids are axis aligned
    (see :func:`axis_aligned_map`), else None. The same voxels as scipy's order-0 ``affine_transform`` with
    ``mode='nearest'``: ``floor(x + 0.5)``, clamped to the source."""
    m = axis_aligned_map(src_shape, src_affine, affine)
    if m is None:
        return None
    scale, off = m
    return tuple(np.clip(np.floor(scale[a] * np.arange(int(shape[a])) + off[a] + 0.5).astype(np.intp), 0,
                         int(src_shape[a]) - 1) for a in range(3))


def linear_weights(n_src: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (lower, upper) and weight of the upper for linear interpolation at source ``coords`` along one axis;
    coordinates beyond the ends take the edge value (nibabel's ``mode='nearest'``)."""
    x = np.clip(np.asarray(coords, float), 0.0, n_src - 1.0)
    lo = np.minimum(np.floor(x).astype(np.intp), max(n_src - 2, 0))
    hi = np.minimum(lo + 1, n_src - 1)
    return lo, hi, (x - lo).astype(np.float32)


def clamp_spacing(spacing: Sequence[float], resolution_range: Sequence | None) -> tuple[float, ...]:
    """Clamp each axis' spacing into the model's ``resolution_range``.

    ``resolution_range`` is either a single spacing per axis ``[a, b, c]`` (fixed) or ``[[lo...], [hi...]]``
    (SPINEPS' inference_config form: lower and upper bound per axis).
    """
    sp = np.asarray(spacing, dtype=float)
    if resolution_range is None:
        return tuple(sp)
    rr = np.asarray(resolution_range, dtype=float)
    if rr.ndim == 1:
        return tuple(rr)
    lo, hi = rr[0], rr[1]
    return tuple(np.clip(sp, lo, hi))


def to_model_grid(scan: Scan, orientation: str, resolution_range: Sequence | None, *, order: int = 3,
                  threads: int = 1) -> Scan:
    """Reorient to the model's orientation and resample into its resolution range."""
    oriented = reorient(scan, orientation)
    target = clamp_spacing(oriented.spacing, resolution_range)
    return rescale(oriented, target, order=order, threads=threads)


def to_input_grid(mask: Scan, reference: Scan) -> Scan:
    """Bring a mask on a model grid back onto the reference scan's grid (nearest neighbour).

    When only the orientation differs, this is an exact reorientation (no interpolation).
    """
    ref_codes = reference.orientation
    oriented = reorient(mask, ref_codes)
    out = resample_to(oriented, reference.shape, reference.affine, order=0)
    return Scan(out.array, reference.affine.copy(), reference.path)


def bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the non-zero voxels as slices, grown by ``margin`` and clipped; None when empty.

    One pass over the volume (its projection along axis 0 gives the other axes' extents), then one over the box's
    slab for axis 0: about 8x faster than a reduction per axis."""
    mask = np.asarray(mask)
    if mask.ndim < 2:
        nz = [np.flatnonzero(mask)]
    else:
        rest = mask.any(axis=0)
        rest_box = bbox(rest)
        if rest_box is None:
            return None
        nz0 = np.flatnonzero(mask[(slice(None),) + rest_box].reshape(mask.shape[0], -1).any(axis=1))
        nz = [nz0] + [np.array([b.start, b.stop - 1]) for b in rest_box]
    if len(nz[0]) == 0:
        return None
    return grow_box(tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nz), mask.shape, margin)


def grow_box(box: Sequence[slice], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    """A box (slices with explicit starts and stops) grown by ``margin`` voxels per side, clipped to ``shape``."""
    return tuple(slice(max(0, int(b.start) - margin), min(int(n), int(b.stop) + margin)) for b, n in zip(box, shape))
