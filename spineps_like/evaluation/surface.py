"""Border (surface) distances between binary masks, and the input checks every protocol shares (from
:mod:`spineps_like.masks`, where every stage takes them).

One implementation for every protocol that needs its own surface rule (SPIDER, Endplate3D-QCT); the
SPINEPS protocol uses panoptica's ASSD unchanged.

Definitions (the medpy / SPIDER-Evaluation convention):

- border of a mask M: ``M XOR erode(M)`` with ``scipy.ndimage.generate_binary_structure(3, connectivity)`` and
  voxels outside the array counted as background (a mask touching the array edge has its border there);
- directed distances d(A -> B): for every border voxel of A, the Euclidean distance in mm (``spacing``, array-axis
  order) to the nearest border voxel of B.

All work happens on the bounding box of A | B grown by one voxel: erosion and distances there are identical to
those on the whole array, so large scans cost what their objects cost.

Examples
--------
>>> a = np.zeros((9, 9, 9), bool); a[2:6, 2:6, 2:6] = True
>>> b = np.roll(a, 1, axis=0)
>>> round(hd95(a, b, (2.0, 1.0, 1.0)), 3)
2.0
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from spineps_like import masks
from spineps_like.geometry import bbox
from spineps_like.masks import as_label_array, border  # as_label_array: spider.py takes it from here


# ---------------------------------------------------------------- shared input checks
def check_spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """:func:`spineps_like.masks.check_spacing` as a tuple of floats (what the protocols pass on to panoptica)."""
    return tuple(float(s) for s in masks.check_spacing(spacing, ndim))


def check_pair(pred: np.ndarray, gt: np.ndarray, what: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/reference pair of label arrays on the same grid."""
    p = as_label_array(pred, f"prediction {what}")
    g = as_label_array(gt, f"reference {what}")
    if p.shape != g.shape:
        raise ValueError(f"prediction {what} shape {p.shape} differs from reference {what} shape {g.shape}")
    return p, g


# ---------------------------------------------------------------- distances
def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Directed border distances (mm) ``d(a -> b)`` and ``d(b -> a)`` between two non-empty binary masks.

    Parameters
    ----------
    a, b : array of bool, same shape
    spacing : voxel size in mm per array axis.
    connectivity : 1 (faces, medpy's default) to 3 (full, SPIDER's default) for the border erosion.

    Returns
    -------
    d_ab, d_ba : float64 arrays, one distance per border voxel of ``a`` (resp. ``b``).

    Raises
    ------
    ValueError when either mask is empty (distances are undefined) or shapes differ.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"surface distance: mask shapes differ, {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("surface distance of an empty mask is undefined")
    sp = check_spacing(spacing, a.ndim)
    box = bbox(a | b, margin=1)
    a, b = a[box], b[box]
    ba, bb = border(a, connectivity), border(b, connectivity)
    # exact Euclidean distance of every voxel to the nearest zero; the zeros are the other mask's border.
    # (scipy rather than the edt package: float64 like medpy, and faster on these mostly-foreground crops)
    dist_to_b = ndimage.distance_transform_edt(~bb, sampling=sp)
    dist_to_a = ndimage.distance_transform_edt(~ba, sampling=sp)
    return dist_to_b[ba], dist_to_a[bb]


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], connectivity: int = 1) -> float:
    """95th percentile of the pooled directed distances (medpy ``hd95``, panoptica): ``P95(d_ab U d_ba)``.

    Note: MONAI / MetricsReloaded take ``max(P95(d_ab), P95(d_ba))`` instead, which can be larger.
    """
    d_ab, d_ba = surface_distances(a, b, spacing, connectivity)
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def asd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], connectivity: int = 1) -> float:
    """Directed average surface distance ``mean(d(a -> b))`` (medpy ``asd(result=a, reference=b)``)."""
    d_ab, _ = surface_distances(a, b, spacing, connectivity)
    return float(d_ab.mean())


def assd_pooled(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], connectivity: int = 3) -> float:
    """Symmetric ASD as the mean of the pooled distances ``mean(d_ab U d_ba)`` (SPIDER-Evaluation).

    This weights each direction by its number of border voxels; panoptica's ASSD instead averages the two
    directed means, ``(mean(d_ab) + mean(d_ba)) / 2``.
    """
    d_ab, d_ba = surface_distances(a, b, spacing, connectivity)
    return float(np.concatenate([d_ab, d_ba]).mean())
