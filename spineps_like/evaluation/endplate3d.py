"""The Endplate3D-QCT protocol (CTSpine-Refined endplate benchmark; yin876705249/Endplate3D-QCT, evaluate.py).

Per case:

1. resample prediction and reference to 1 x 1 x 1 mm (nearest neighbour, via :func:`spineps_like.geometry.rescale`:
   same field of view, centre-preserving; the benchmark's SimpleITK resampling keeps the origin instead, which can
   shift the grid by under half a voxel);
2. binarise (``foreground``: our endplate labels by default, or ``"any"`` for the benchmark's own endplate-only
   masks);
3. 6-connected components (``cc3d``), dropping components under ``min_size`` voxels (1000 = 1 cm^3);
4. for every reference component g the predicted component p with the largest Dice; g is a TP when
   ``Dice(g, p) > 0.8`` (not one-to-one: one prediction can serve two references, so precision can exceed 1);
5. ``precision = TP / #pred components``, ``recall = TP / #ref components``; per TP ``Dice``, ``Jaccard``,
   ``HD95`` = 95th percentile of the pooled border distances of both directions, ``ASD`` = mean distance from the
   prediction's border to the reference's (directed, medpy ``asd(pred, ref)``), borders with connectivity 1;
   the case values are the means over its TPs;
6. ``global.dice`` / ``global.jaccard`` on the binarised masks (before component filtering).

Conventions: no predicted component (reference non-empty) gives the benchmark's defaults ``dice = jaccard =
precision = recall = 0`` and ``hd95 = asd = 100`` mm; predictions without any TP give NaN instance metrics (the
benchmark's mean of an empty list; precision and recall carry that failure); an empty reference gives recall NaN
(precision 0 when something was predicted), an empty reference and prediction gives NaN everywhere. The cohort
F1 is ``2 P R / (P + R)`` of the *dataset-mean* precision P and recall R (:func:`cohort_metrics`); the per-case
``endplate.f1`` is the same formula on the case's own P and R.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import cc3d
import numpy as np
from scipy import ndimage

from spineps_like.evaluation.surface import asd, check_pair, check_spacing, hd95
from spineps_like.geometry import bbox, rescale
from spineps_like.io import Scan
from spineps_like.labels import ENDPLATE_LABELS, ENDPLATE_OFFSET, label_counts

#: Endplate labels of our semantic (52, 53, 62) and instance (201-228) masks; the two sets do not collide.
ENDPLATE_FOREGROUND: tuple[int, ...] = tuple(ENDPLATE_LABELS) + tuple(range(ENDPLATE_OFFSET + 1, ENDPLATE_OFFSET + 29))
MISS_DISTANCE_MM = 100.0


def binarise(mask: np.ndarray, foreground: str | Sequence[int] = "endplate") -> np.ndarray:
    """Endplate foreground as bool: ``"endplate"`` (:data:`ENDPLATE_FOREGROUND`), ``"any"`` (mask > 0) or labels."""
    if isinstance(foreground, str):
        if foreground == "any":
            return np.asarray(mask) > 0
        if foreground != "endplate":
            raise ValueError(f"foreground must be 'endplate', 'any' or a list of labels, got {foreground!r}")
        foreground = ENDPLATE_FOREGROUND
    return np.isin(mask, np.asarray(list(foreground)))


def resample_isotropic(binary: np.ndarray, spacing: Sequence[float], target: float = 1.0) -> np.ndarray:
    """Nearest-neighbour resampling of a mask with voxel size ``spacing`` to ``target`` mm isotropic."""
    sp = check_spacing(spacing)
    scan = Scan(np.asarray(binary, dtype=np.uint8), np.diag([*sp, 1.0]))
    return rescale(scan, (target,) * 3, order=0).array.astype(bool)


def components(binary: np.ndarray, min_size: int = 1000) -> tuple[np.ndarray, int]:
    """6-connected components of at least ``min_size`` voxels, relabelled 1..n. Returns (labels, n)."""
    labels = cc3d.connected_components(np.ascontiguousarray(binary, dtype=np.uint8), connectivity=6)
    sizes = label_counts(labels)
    keep = np.flatnonzero(sizes >= min_size)
    keep = keep[keep > 0]
    lut = np.zeros(sizes.size, np.int32)
    lut[keep] = np.arange(1, keep.size + 1)
    return lut[labels], int(keep.size)


def evaluate_endplate3d(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    foreground: str | Sequence[int] = "endplate",
    target_spacing: float = 1.0,
    min_size: int = 1000,
    tp_dice: float = 0.8,
    miss_distance: float = MISS_DISTANCE_MM,
) -> dict[str, float]:
    """Score one case by the Endplate3D-QCT rules (module docstring).

    Returns ``{"endplate.dice", "endplate.jaccard", "endplate.hd95", "endplate.asd", "endplate.precision",
    "endplate.recall", "endplate.f1", "endplate.tp", "endplate.n_pred", "endplate.n_ref", "global.dice",
    "global.jaccard"}`` (distances in mm).
    """
    pred, gt = check_pair(pred, gt, "mask")
    sp = check_spacing(spacing)
    p_bin = resample_isotropic(binarise(pred, foreground), sp, target_spacing)
    g_bin = resample_isotropic(binarise(gt, foreground), sp, target_spacing)
    nan = float("nan")
    inter, vol = np.count_nonzero(p_bin & g_bin), np.count_nonzero(p_bin) + np.count_nonzero(g_bin)
    out: dict[str, float] = {
        "global.dice": 2 * inter / vol if vol else nan,
        "global.jaccard": inter / (vol - inter) if vol else nan,
    }
    p_cc, n_p = components(p_bin, min_size)
    g_cc, n_g = components(g_bin, min_size)
    out.update({"endplate.n_pred": float(n_p), "endplate.n_ref": float(n_g)})
    inst = {"endplate.dice": nan, "endplate.jaccard": nan, "endplate.hd95": nan, "endplate.asd": nan}
    if n_g == 0:
        out.update(inst, **{"endplate.tp": 0.0, "endplate.precision": 0.0 if n_p else nan,
                            "endplate.recall": nan, "endplate.f1": nan})
        return out
    if n_p == 0:
        out.update({"endplate.dice": 0.0, "endplate.jaccard": 0.0, "endplate.hd95": miss_distance,
                    "endplate.asd": miss_distance, "endplate.tp": 0.0, "endplate.precision": 0.0,
                    "endplate.recall": 0.0, "endplate.f1": 0.0})
        return out
    box = bbox((p_cc > 0) | (g_cc > 0))
    p_cc, g_cc = p_cc[box], g_cc[box]
    counts = np.bincount(g_cc.ravel().astype(np.int64) * (n_p + 1) + p_cc.ravel(),
                         minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    size_g, size_p = counts[1:].sum(axis=1), counts[:, 1:].sum(axis=0)
    dice = 2 * counts[1:, 1:] / (size_g[:, None] + size_p[None, :])  # (ref, pred)
    best = dice.argmax(axis=1)
    best_dice = dice[np.arange(n_g), best]
    tps = np.flatnonzero(best_dice > tp_dice)
    obj_g, obj_p = ndimage.find_objects(g_cc), ndimage.find_objects(p_cc)
    scores: dict[str, list[float]] = {k: [] for k in inst}
    for gi in tps:
        pi = int(best[gi])
        d = float(best_dice[gi])
        sl = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(obj_g[gi], obj_p[pi]))
        pm, gm = p_cc[sl] == pi + 1, g_cc[sl] == gi + 1
        scores["endplate.dice"].append(d)
        scores["endplate.jaccard"].append(d / (2 - d))
        scores["endplate.hd95"].append(hd95(pm, gm, (target_spacing,) * 3, connectivity=1))
        scores["endplate.asd"].append(asd(pm, gm, (target_spacing,) * 3, connectivity=1))
    for k, v in scores.items():
        out[k] = float(np.mean(v)) if v else nan
    tp = float(tps.size)
    prec, rec = tp / n_p, tp / n_g
    out.update({"endplate.tp": tp, "endplate.precision": prec, "endplate.recall": rec,
                "endplate.f1": 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0})
    return out


def cohort_f1(precision_mean: float, recall_mean: float) -> float:
    """The benchmark's detection F1: ``2 P R / (P + R)`` of the dataset-mean precision and recall (NaN if undefined)."""
    p, r = float(precision_mean), float(recall_mean)
    if not (np.isfinite(p) and np.isfinite(r)) or p + r == 0:
        return float("nan") if not (np.isfinite(p) and np.isfinite(r)) else 0.0
    return 2 * p * r / (p + r)


def cohort_metrics(means: Mapping[str, float]) -> dict[str, float]:
    """Cohort-level values from the per-metric means: ``{"endplate.f1_cohort": cohort_f1(P, R)}``."""
    return {"endplate.f1_cohort": cohort_f1(means.get("endplate.precision", float("nan")),
                                            means.get("endplate.recall", float("nan")))}
