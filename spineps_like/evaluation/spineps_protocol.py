"""The SPINEPS evaluation protocol (Moeller et al., Eur Radiol 2024): panoptic quality per structure group
(panoptica) plus global Dice per semantic structure.

Instance groups (instance-mask ids, ``spineps_like.labels``):

=========  ============================  ==========================================
group      ids                           matching
=========  ============================  ==========================================
vertebra   1-28 without 26               one-to-one, IoU >= 0.5 (NaiveThresholdMatching)
ivd        101-128                       one-to-one, IoU >= 0.5
endplate   201-228                       one-to-one, IoU >= 0.5
sacrum     26                            single instance: a TP whenever both sides hold it
=========  ============================  ==========================================

Per group (panoptica 2.1.7 definitions): ``RQ = TP / (TP + FP/2 + FN/2)``, ``SQ`` = mean IoU over TPs,
``PQ = SQ * RQ``, ``dice`` = mean Dice over TPs (panoptica ``sq_dsc``), ``assd`` = mean over TPs of
``(mean d(P->G) + mean d(G->P)) / 2`` in mm (border = mask XOR erosion, connectivity 1), ``global_dice`` = Dice of the
group's binary masks, ``tp``/``fp``/``fn``. We add ``id_rate``: the fraction of reference instances whose
*same-id* prediction overlaps with IoU >= 0.5 (labeling correctness; matching itself ignores ids).

Edge-case conventions (panoptica's defaults, kept so our numbers equal panoptica's):

- group absent from both masks: every metric NaN (not counted in cohort means);
- TP = 0 with something on either side (empty prediction, empty reference, or nothing overlapping enough):
  RQ = SQ = PQ = dice = 0, ``assd`` = inf; ``global_dice`` = 0;
- ``id_rate`` is NaN when the reference holds no instance of the group.

Global Dice per semantic structure (from the semantic masks, when both are given):
``Dice = 2 |P & G| / (|P| + |G|)``, NaN when the structure is absent from both, 0 when absent from one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

from spineps_like.evaluation.surface import check_pair, check_spacing
from spineps_like.geometry import bbox
from spineps_like.labels import (
    ENDPLATE_LABELS,
    POSTERIOR_LABELS,
    SEMANTIC_ALIASES,
    VERTEBRA_LABELS,
    Semantic,
    present_ids,
)

#: Panoptica label groups of the instance mask: name -> (ids, single_instance).
INSTANCE_GROUPS: dict[str, tuple[tuple[int, ...], bool]] = {
    "vertebra": (tuple(i for i in range(1, 29) if i != 26), False),
    "ivd": (tuple(range(101, 129)), False),
    "endplate": (tuple(range(201, 229)), False),
    "sacrum": ((26,), True),
}

#: Semantic structures for global Dice: name -> semantic labels merged into that structure.
GLOBAL_STRUCTURES: dict[str, tuple[int, ...]] = {
    "vertebra": tuple(VERTEBRA_LABELS) + tuple(SEMANTIC_ALIASES) + tuple(ENDPLATE_LABELS),
    "corpus": (int(Semantic.CORPUS),) + tuple(SEMANTIC_ALIASES),
    "posterior": tuple(POSTERIOR_LABELS),
    "endplate": tuple(ENDPLATE_LABELS),
    "ivd": (int(Semantic.IVD),),
    "canal": (int(Semantic.CANAL),),
    "cord": (int(Semantic.CORD),),
    "sacrum": (int(Semantic.SACRUM),),
}

#: The structures a SPIDER reference carries (its canal includes the cord; no subregions, no sacrum).
SPIDER_STRUCTURES: dict[str, tuple[int, ...]] = {
    "vertebra": GLOBAL_STRUCTURES["vertebra"],
    "ivd": (int(Semantic.IVD),),
    "canal": (int(Semantic.CANAL), int(Semantic.CORD)),
}

_SEMANTIC_ALLOWED = frozenset(int(s) for s in Semantic) | frozenset(SEMANTIC_ALIASES)
_INSTANCE_ALLOWED = frozenset(i for ids, _ in INSTANCE_GROUPS.values() for i in ids)


def _check_labels(arr: np.ndarray, allowed: frozenset[int], name: str, scheme: str) -> None:
    present = present_ids(arr)
    bad = sorted(int(v) for v in present if v != 0 and int(v) not in allowed)
    if bad:
        raise ValueError(f"{name} holds labels outside the {scheme}: {bad[:10]}{' ...' if len(bad) > 10 else ''}")


def _joint_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Contingency table ``C[p, g]`` = number of voxels with prediction label p and reference label g.

    Counted on the bounding box of the non-zero voxels of either mask; ``C[0, 0]`` is therefore not the full
    background count (no metric here uses it).
    """
    n = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    box = bbox((pred > 0) | (gt > 0))
    if box is None:
        return np.zeros((n, n), np.int64)
    p = pred[box].astype(np.int64).ravel()
    g = gt[box].astype(np.int64).ravel()
    return np.bincount(p * n + g, minlength=n * n).reshape(n, n)


@lru_cache(maxsize=4)
def _evaluator(iou_threshold: float):
    import panoptica
    from panoptica import InputType, Metric, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.utils.segmentation_class import LabelGroup, SegmentationClassGroups

    if hasattr(panoptica, "disable_citation_reminder"):
        panoptica.disable_citation_reminder()
    groups = SegmentationClassGroups(
        {name: LabelGroup(list(ids), single_instance=single) for name, (ids, single) in INSTANCE_GROUPS.items()}
    )
    return Panoptica_Evaluator(
        expected_input=InputType.UNMATCHED_INSTANCE,
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=iou_threshold),
        segmentation_class_groups=groups,
        instance_metrics=[Metric.DSC, Metric.IOU, Metric.ASSD],
        global_metrics=[Metric.DSC],
    )


def panoptic_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """PQ/SQ/RQ, instance Dice, ASSD, global Dice, TP/FP/FN and id_rate per instance group.

    Parameters
    ----------
    pred, gt : instance masks (ids of ``spineps_like.labels``) on the same grid.
    spacing : voxel size in mm per array axis (passed to panoptica in array-axis order).
    iou_threshold : IoU a prediction must reach (>=) to match a reference instance.

    Returns
    -------
    ``{"vertebra.pq": ..., "vertebra.sq": ..., "vertebra.rq": ..., "vertebra.dice": ..., "vertebra.assd": ...,
    "vertebra.global_dice": ..., "vertebra.tp": ..., "vertebra.fp": ..., "vertebra.fn": ...,
    "vertebra.id_rate": ..., "ivd.*", "endplate.*", "sacrum.*"}`` (no ``id_rate`` for the single-instance sacrum).
    """
    pred, gt = check_pair(pred, gt, "instance mask")
    sp = check_spacing(spacing)
    _check_labels(pred, _INSTANCE_ALLOWED, "prediction instance mask",
                  "instance scheme (vertebra 1-28, IVD 101-128, endplate 201-228)")
    _check_labels(gt, _INSTANCE_ALLOWED, "reference instance mask",
                  "instance scheme (vertebra 1-28, IVD 101-128, endplate 201-228)")
    results = _evaluator(float(iou_threshold)).evaluate(pred, gt, voxelspacing=sp, verbose=False)
    counts = _joint_counts(pred, gt)
    out: dict[str, float] = {}
    for name, (ids, single) in INSTANCE_GROUPS.items():
        r = results[name]
        out[f"{name}.pq"] = float(r.pq)
        out[f"{name}.sq"] = float(r.sq)
        out[f"{name}.rq"] = float(r.rq)
        out[f"{name}.dice"] = float(r.sq_dsc)
        out[f"{name}.assd"] = float(r.sq_assd)
        out[f"{name}.global_dice"] = float(r.global_bin_dsc)
        out[f"{name}.tp"] = float(r.tp)
        out[f"{name}.fp"] = float(r.fp)
        out[f"{name}.fn"] = float(r.fn)
        if not single:
            out[f"{name}.id_rate"] = _id_rate(counts, ids, iou_threshold)
    return out


def _id_rate(counts: np.ndarray, ids: Sequence[int], iou_threshold: float) -> float:
    """Fraction of reference ids i (in ``ids``) with IoU(pred == i, gt == i) >= threshold; NaN without reference."""
    n = counts.shape[0]
    idx = np.array([i for i in ids if i < n], dtype=int)
    if idx.size == 0:
        return float("nan")
    ref = counts[:, idx].sum(axis=0)
    present = ref > 0
    if not present.any():
        return float("nan")
    inter = counts[idx, idx]
    union = counts[idx, :].sum(axis=1) + ref - inter
    iou = np.divide(inter, union, out=np.zeros(idx.size), where=union > 0)
    return float(np.count_nonzero((iou >= iou_threshold) & present) / np.count_nonzero(present))


def global_dice(
    pred_semantic: np.ndarray, gt_semantic: np.ndarray, structures: Mapping[str, Sequence[int]] | None = None
) -> dict[str, float]:
    """Dice per semantic structure, ``2 |P & G| / (|P| + |G|)`` with each structure's labels merged.

    NaN when the structure is absent from both masks, 0 when absent from one. CT's dense-corpus 50 and dens 51
    count as corpus. Returns ``{"global_dice.<structure>": value}``.
    """
    pred, gt = check_pair(pred_semantic, gt_semantic, "semantic mask")
    _check_labels(pred, _SEMANTIC_ALLOWED, "prediction semantic mask", "semantic scheme")
    _check_labels(gt, _SEMANTIC_ALLOWED, "reference semantic mask", "semantic scheme")
    structures = GLOBAL_STRUCTURES if structures is None else structures
    counts = _joint_counts(pred, gt)
    n = counts.shape[0]
    row, col = counts.sum(axis=1), counts.sum(axis=0)
    out = {}
    for name, labels in structures.items():
        idx = np.array(sorted({int(x) for x in labels if 0 < int(x) < n}), dtype=int)
        inter = counts[np.ix_(idx, idx)].sum() if idx.size else 0
        denom = (row[idx].sum() + col[idx].sum()) if idx.size else 0
        out[f"global_dice.{name}"] = float(2 * inter / denom) if denom > 0 else float("nan")
    return out


def evaluate_spineps(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    semantic_pred: np.ndarray | None = None,
    semantic_gt: np.ndarray | None = None,
    structures: Mapping[str, Sequence[int]] | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """The SPINEPS protocol on one case: :func:`panoptic_metrics` on the instance masks plus
    :func:`global_dice` on the semantic masks when both are given (``structures`` defaults to
    :data:`GLOBAL_STRUCTURES`)."""
    out = panoptic_metrics(pred, gt, spacing, iou_threshold=iou_threshold)
    if semantic_pred is not None and semantic_gt is not None:
        if np.shape(semantic_pred) != np.shape(pred) or np.shape(semantic_gt) != np.shape(gt):
            raise ValueError(f"semantic masks {np.shape(semantic_pred)}/{np.shape(semantic_gt)} are not on the "
                             f"instance masks' grid {np.shape(gt)}")
        out.update(global_dice(semantic_pred, semantic_gt, structures))
    return out
