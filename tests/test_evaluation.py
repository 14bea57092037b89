"""Evaluation protocols (spineps / SPIDER / Endplate3D-QCT), surface distances, reports and folder evaluation.

Hand-computable synthetic cases plus cross-checks against panoptica, medpy and scipy, and the real TPTBox crops.
"""

from __future__ import annotations

import csv
import json
import math

import medpy.metric.binary as mb
import nibabel as nib
import numpy as np
import pytest
from scipy.stats import wilcoxon

from spineps_like.evaluation import (
    case_key,
    evaluate,
    evaluate_folders,
    from_spider,
    run_evaluate_cli,
    to_spider,
)
from spineps_like.evaluation.endplate3d import cohort_f1, evaluate_endplate3d
from spineps_like.evaluation.report import (
    paired_comparison,
    read_cases_csv,
    summarize,
    wilcoxon_p,
    write_cases_csv,
)
from spineps_like.evaluation.spider import evaluate_spider
from spineps_like.evaluation.spineps_protocol import global_dice, panoptic_metrics
from spineps_like.evaluation.surface import asd, assd_pooled, hd95, surface_distances
from spineps_like.io import Scan, ScanError, load_scan, save_mask


# ---------------------------------------------------------------- synthetic spines
def box_spine(shape=(30, 80, 24), n=3, first=20, height=12, gap=4):
    """Vertebrae as boxes stacked along axis 1 (ids first, first+1, ...) with IVD boxes between them."""
    arr = np.zeros(shape, np.uint16)
    y = 4
    for k in range(n):
        arr[8:22, y:y + height, 6:18] = first + k
        y += height
        if k < n - 1:
            arr[9:21, y:y + gap, 7:17] = 100 + first + k
            y += gap
    return arr


def medpy_distances(a, b, spacing, connectivity):
    f = getattr(mb, "__surface_distances")
    return f(a, b, spacing, connectivity), f(b, a, spacing, connectivity)


# ---------------------------------------------------------------- surface distances vs medpy
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.3, 0.6, 0.7), (0.5, 2.0, 1.25)])
def test_surface_metrics_equal_medpy(spacing):
    rng = np.random.default_rng(1)
    a = np.zeros((30, 36, 33), bool)
    b = np.zeros_like(a)
    a[4:18, 6:30, 0:20] = True  # touches the array edge: border there, as in medpy
    a[rng.integers(0, 30, 40), rng.integers(0, 36, 40), rng.integers(0, 33, 40)] = True
    b[6:20, 8:28, 3:33] = True
    b[0:2, 0:4, 28:33] = True
    for conn in (1, 3):
        assert hd95(a, b, spacing, conn) == pytest.approx(mb.hd95(a, b, spacing, conn), rel=1e-9)
        d1, d2 = medpy_distances(a, b, spacing, conn)
        assert assd_pooled(a, b, spacing, conn) == pytest.approx(np.concatenate([d1, d2]).mean(), rel=1e-9)
    assert asd(a, b, spacing) == pytest.approx(mb.asd(a, b, spacing), rel=1e-9)
    assert asd(b, a, spacing) == pytest.approx(mb.asd(b, a, spacing), rel=1e-9)
    if spacing != (1.0, 1.0, 1.0):  # spacing is applied per array axis: another spacing, another distance
        assert hd95(a, b, spacing) != pytest.approx(hd95(a, b, (1.0, 1.0, 1.0)), rel=1e-3)


def test_surface_distance_shift_is_spacing_and_empty_raises():
    a = np.zeros((12, 12, 12), bool)
    a[3:8, 3:8, 3:8] = True
    b = np.roll(a, 1, axis=0)  # shifted one voxel along axis 0 (2.5 mm)
    d_ab, d_ba = surface_distances(a, b, (2.5, 1.0, 1.0))
    assert d_ab.max() == pytest.approx(2.5) and d_ba.max() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="empty"):
        hd95(a, np.zeros_like(a), (1, 1, 1))


# ---------------------------------------------------------------- spineps protocol
def test_spineps_missing_extra_shifted_by_hand():
    gt = box_spine()
    pred = gt.copy()
    pred[pred == 21] = 0  # one missing vertebra: TP 2, FN 1
    pred[0:5, 70:80, 0:6] = 23  # one extra blob (id not in GT): FP 1
    m = evaluate(pred, gt, (1.0, 1.0, 1.0))
    assert (m["vertebra.tp"], m["vertebra.fp"], m["vertebra.fn"]) == (2, 1, 1)
    assert m["vertebra.rq"] == pytest.approx(2 / (2 + 0.5 + 0.5))  # RQ = TP / (TP + FP/2 + FN/2)
    assert m["vertebra.sq"] == pytest.approx(1.0) and m["vertebra.pq"] == pytest.approx(2 / 3)
    assert m["ivd.rq"] == 1.0 and math.isnan(m["sacrum.pq"])

    # shift vertebra 22 by 2 voxels along its 12-voxel height: IoU = 10/14 >= 0.5, Dice = 2*10/24
    shifted = gt.copy()
    v = gt == 22
    shifted[v] = 0
    shifted[np.roll(v, 2, axis=1) & (shifted == 0)] = 22
    m = evaluate(shifted, gt, (1.0, 1.0, 1.0))
    inter = np.count_nonzero(v & (shifted == 22))
    iou = inter / np.count_nonzero(v | (shifted == 22))
    assert m["vertebra.tp"] == 3
    assert m["vertebra.sq"] == pytest.approx((1 + 1 + iou) / 3)
    assert m["vertebra.dice"] == pytest.approx((2 + 2 * inter / (v.sum() + (shifted == 22).sum())) / 3)
    assert m["vertebra.assd"] > 0


def test_spineps_equals_panoptica_directly():
    import panoptica
    from panoptica import InputType, Metric, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.utils.segmentation_class import LabelGroup, SegmentationClassGroups

    gt = box_spine()
    pred = np.roll(gt, 5, axis=1)  # IoU of each vertebra (12 high, shifted 5): 7/17 < 0.5 -> no TP
    pred[gt == 20] = 20
    pred[0:4, 0:4, 0:4] = 5
    panoptica.disable_citation_reminder()
    groups = SegmentationClassGroups({
        "vertebra": LabelGroup([i for i in range(1, 29) if i != 26]),
        "ivd": LabelGroup(list(range(101, 129))),
        "endplate": LabelGroup(list(range(201, 229))),
        "sacrum": LabelGroup(26, single_instance=True),
    })
    ev = Panoptica_Evaluator(expected_input=InputType.UNMATCHED_INSTANCE,
                             instance_matcher=NaiveThresholdMatching(Metric.IOU, 0.5),
                             segmentation_class_groups=groups,
                             instance_metrics=[Metric.DSC, Metric.IOU, Metric.ASSD])
    spacing = (2.0, 0.8, 1.1)
    ref = ev.evaluate(pred, gt, voxelspacing=spacing)
    ours = panoptic_metrics(pred, gt, spacing)
    for g in ("vertebra", "ivd"):
        for k, pk in (("pq", "pq"), ("sq", "sq"), ("rq", "rq"), ("dice", "sq_dsc"), ("assd", "sq_assd")):
            assert ours[f"{g}.{k}"] == pytest.approx(float(getattr(ref[g], pk)), nan_ok=True)
    assert ours["vertebra.tp"] >= 1 and ours["vertebra.fp"] >= 1


def test_spineps_edge_cases():
    gt = box_spine()
    empty = np.zeros_like(gt)
    m = evaluate(empty, gt, (1, 1, 1))  # empty prediction
    assert m["vertebra.rq"] == 0 and m["vertebra.pq"] == 0 and m["vertebra.assd"] == math.inf
    assert m["vertebra.fn"] == 3 and m["vertebra.id_rate"] == 0
    m = evaluate(gt, empty, (1, 1, 1))  # empty reference
    assert m["vertebra.rq"] == 0 and m["vertebra.fp"] == 3 and math.isnan(m["vertebra.id_rate"])
    m = evaluate(empty, empty, (1, 1, 1))  # nothing anywhere
    assert all(math.isnan(m[f"vertebra.{k}"]) for k in ("pq", "sq", "rq", "dice", "assd"))
    with pytest.raises(ValueError, match="outside the instance scheme"):
        evaluate(np.where(gt == 20, 61, gt), gt, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        evaluate(gt, gt, (1, 1))
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate(gt, gt, (1, 1, 1), "verse")


def test_spineps_id_rate_detects_swapped_labels():
    gt = box_spine()
    pred = gt.copy()
    pred[gt == 20], pred[gt == 21] = 21, 20  # matching ignores ids: RQ 1, but two of three ids are wrong
    m = evaluate(pred, gt, (1, 1, 1))
    assert m["vertebra.rq"] == 1 and m["vertebra.id_rate"] == pytest.approx(1 / 3)


def test_global_dice_by_hand_and_aliases():
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:4] = 49
    pred[0:2] = 50  # CT dense corpus counts as corpus: Dice = 2*200/(400+200)
    gt[5:7] = 61
    pred[6:8] = 61  # canal: Dice 2*100/400
    pred[9] = 60  # cord only in the prediction: 0
    d = global_dice(pred, gt)
    assert d["global_dice.corpus"] == pytest.approx(2 * 200 / 600)
    assert d["global_dice.canal"] == pytest.approx(0.5)
    assert d["global_dice.cord"] == 0 and math.isnan(d["global_dice.ivd"])


def test_real_crops_gt_vs_gt_and_one_vertebra_removed(sample_mri, sample_ct):
    inst = load_scan(sample_mri["instance"], kind="mask")
    sem = load_scan(sample_mri["semantic"], kind="mask")
    m = evaluate(inst.array, inst.array, inst.spacing, semantic_pred=sem.array, semantic_gt=sem.array)
    for g in ("vertebra", "ivd", "endplate"):
        assert m[f"{g}.pq"] == 1.0 and m[f"{g}.assd"] == 0.0
    assert m["global_dice.canal"] == 1.0 and m["global_dice.vertebra"] == 1.0
    pred = inst.array.copy()
    pred[pred == 6] = 0  # remove C6: TP 2 (C5, C7), FP 0, FN 1
    m = evaluate(pred, inst.array, inst.spacing)
    # RQ = TP / (TP + FP/2 + FN/2) = 2 / (2 + 0 + 1/2) = 2*2 / (2*2 + 0 + 1) = 0.8; SQ = 1 -> PQ = 0.8
    assert m["vertebra.rq"] == pytest.approx(0.8) and m["vertebra.pq"] == pytest.approx(0.8)
    assert m["ivd.pq"] == 1.0

    ct = load_scan(sample_ct["instance"], kind="mask")
    ct_sem = load_scan(sample_ct["semantic"], kind="mask")  # holds 50 (dense corpus) -> corpus
    m = evaluate(ct.array, ct.array, ct.spacing, semantic_pred=ct_sem.array, semantic_gt=ct_sem.array)
    assert m["vertebra.pq"] == 1.0 and m["global_dice.corpus"] == 1.0


# ---------------------------------------------------------------- SPIDER
def test_spider_conversion_round_trip():
    inst = box_spine(n=3, first=22)  # L3, L4, L5 with IVDs 122, 123
    inst[10:12, 20:22, 8:10] = 223  # an endplate of L4: joins the vertebra in SPIDER
    sem = np.zeros_like(inst)
    sem[2:6, 4:60, 2:4] = 61
    sem[2:6, 4:60, 4:5] = 60
    sp = to_spider(inst, sem)
    assert set(np.unique(sp[inst == 24])) == {1} and set(np.unique(sp[inst == 22])) == {3}
    # IVD below L4 (123) -> 200 + number(L4) = 202 (the L5/S1 disc, 124, would be 201)
    assert set(np.unique(sp[inst == 123])) == {202} and set(np.unique(sp[inst == 223])) == {2}
    assert set(np.unique(sp[np.isin(sem, (60, 61))])) == {100}
    back, sem_back = from_spider(sp)
    expected = np.where(inst == 223, 23, inst)
    assert np.array_equal(back, expected)
    assert np.array_equal(sem_back == 61, np.isin(sem, (60, 61)))
    l6 = box_spine(n=2, first=24)  # L5, L6 (id 25): L6 is SPIDER 1
    sp6 = to_spider(l6)
    assert set(np.unique(sp6[l6 == 25])) == {1} and set(np.unique(sp6[l6 == 124])) == {202}
    assert np.array_equal(from_spider(sp6, lumbar6=True)[0], l6)
    partial = to_spider(inst, partial=[22])
    assert set(np.unique(partial[inst == 22])) == {103}
    with pytest.raises(ValueError, match="outside the SPIDER scheme"):
        from_spider(np.full((2, 2, 2), 150, np.uint16))


def test_spider_missing_extra_shifted_empty():
    gt = to_spider(box_spine())  # L1-L3 (ids 20-22) -> SPIDER 5, 4, 3; IVDs below L1 / L2 -> 205, 204
    labels = [int(v) for v in np.unique(gt) if v]
    pred = gt.copy()
    missing = 4
    pred[pred == missing] = 0
    pred[0:4, 70:80, 0:4] = 7  # extra blob: SPIDER ignores false positives
    m = evaluate_spider(pred, gt, (1, 1, 1))
    assert m["vertebrae.detection_rate"] == pytest.approx(2 / 3) and m["vertebrae.dice"] == 1.0
    assert math.isnan(m["vertebrae.asd"])  # one unmatched vertebra -> class ASD NaN (challenge's np.mean)
    assert m["ivd.dice"] == 1.0 and m["ivd.asd"] == 0.0
    assert m["overall.dice"] == pytest.approx((len(labels) - 1) / len(labels))
    assert math.isnan(m["canal.dice"])  # no canal in the reference (challenge: 999)

    shifted = gt.copy()  # move vertebra 5 by 8 of its 12 voxels: Dice = 2*4*14*12 / (2*12*14*12) = 1/3
    v = gt == 5
    shifted[v] = 0
    shifted[np.roll(v, 8, axis=1)] = 5
    m = evaluate_spider(shifted, gt, (2.0, 1.0, 1.0))
    dices = []
    for lab in [x for x in labels if x < 100]:
        g = gt == lab
        best = np.bincount(shifted[g][shifted[g] > 0]).argmax()
        dices.append(2 * np.count_nonzero(g & (shifted == best)) / (g.sum() + (shifted == best).sum()))
    assert m["vertebrae.dice"] == pytest.approx(np.mean(dices))
    assert m["vertebrae.asd"] > 0
    far = gt.copy()  # shifted by 11 of 12 rows: matched (one row overlaps) but Dice = 2*1/24 < 0.1 -> missed
    far[v] = 0
    far[np.roll(v, 11, axis=1)] = 5
    m = evaluate_spider(far, gt, (1, 1, 1))
    assert m["vertebrae.detection_rate"] == pytest.approx(2 / 3)
    assert math.isfinite(m["vertebrae.asd"])  # every vertebra matched: the class ASD is defined

    empty = np.zeros_like(gt)
    m = evaluate_spider(empty, gt, (1, 1, 1))
    assert m["vertebrae.detection_rate"] == 0 and math.isnan(m["vertebrae.dice"]) and m["overall.dice"] == 0
    m = evaluate_spider(gt, empty, (1, 1, 1))
    assert all(math.isnan(v) for k, v in m.items() if not k.endswith("n_ref"))


def test_spider_asd_is_pooled_full_connectivity_and_challenge_spacing():
    gt = to_spider(box_spine(n=1))
    pred = np.roll(gt, 1, axis=0)
    sp = (3.0, 1.0, 0.5)
    m = evaluate_spider(pred, gt, sp)
    d1, d2 = medpy_distances(gt > 0, pred > 0, sp, 3)
    assert m["vertebrae.asd"] == pytest.approx(np.concatenate([d1, d2]).mean(), rel=1e-9)
    rev = evaluate_spider(pred, gt, sp, challenge_spacing=True)
    assert rev["vertebrae.asd"] == pytest.approx(evaluate_spider(pred, gt, sp[::-1])["vertebrae.asd"])
    assert rev["vertebrae.asd"] != pytest.approx(m["vertebrae.asd"])


def test_spider_protocol_through_evaluate_with_semantic_canal(sample_mri):
    inst = load_scan(sample_mri["instance"], kind="mask")
    sem = load_scan(sample_mri["semantic"], kind="mask")
    m = evaluate(inst.array, inst.array, inst.spacing, "spider", semantic_pred=sem.array, semantic_gt=sem.array)
    assert m["canal.dice"] == 1.0 and m["vertebrae.n_ref"] == 3 and m["ivd.n_ref"] == 2
    # a SPIDER reference against our prediction, via the spineps protocol (vertebra/IVD/canal global Dice)
    spider_gt = to_spider(inst.array, sem.array)
    m = evaluate(inst.array, spider_gt, inst.spacing, "spineps", semantic_pred=sem.array, gt_scheme="spider")
    # endplates join the vertebra in SPIDER: each vertebra still matches (RQ 1) with IoU = |v| / (|v| + |endplate v|)
    a = inst.array
    ious = [np.sum(a == v) / (np.sum(a == v) + np.sum(a == 200 + v)) for v in (5, 6, 7)]
    assert m["vertebra.rq"] == 1.0 and m["vertebra.sq"] == pytest.approx(np.mean(ious))
    assert m["global_dice.canal"] == 1.0 and "global_dice.corpus" not in m


# ---------------------------------------------------------------- Endplate3D-QCT
def endplate_slabs(shape=(40, 40, 60), n=3):
    """n endplate slabs of 20 x 4 x 20 = 1600 voxels (>= 1000) at 1 mm, label 52."""
    arr = np.zeros(shape, np.uint8)
    for k in range(n):
        arr[10:30, 4 + 12 * k:8 + 12 * k, 20:40] = 52
    return arr


def test_endplate3d_missing_extra_shifted_by_hand():
    gt = endplate_slabs()
    pred = gt.copy()
    pred[:, 28:32] = 0  # third slab missing
    m = evaluate(pred, gt, (1, 1, 1), "endplate3d")
    assert (m["endplate.tp"], m["endplate.n_pred"], m["endplate.n_ref"]) == (2, 2, 3)
    assert m["endplate.precision"] == 1 and m["endplate.recall"] == pytest.approx(2 / 3)
    assert m["endplate.dice"] == 1 and m["endplate.hd95"] == 0 and m["endplate.asd"] == 0
    assert m["global.dice"] == pytest.approx(2 * 3200 / (3200 + 4800))
    pred[0:12, 30:34, 0:10] = 53  # extra blob of 480 voxels: below 1000, dropped
    assert evaluate(pred, gt, (1, 1, 1), "endplate3d")["endplate.n_pred"] == 2
    pred[0:12, 30:39, 0:10] = 53  # 1080 voxels: a false-positive component
    m = evaluate(pred, gt, (1, 1, 1), "endplate3d")
    assert m["endplate.precision"] == pytest.approx(2 / 3)

    shifted = gt.copy()  # slab 1 shifted 1 voxel along its 20-voxel side: Dice 2*19*4*20/3200 = 0.95 -> TP
    s1 = gt.copy() * 0
    s1[10:30, 4:8, 20:40] = 1
    shifted[s1 > 0] = 0
    shifted[np.roll(s1, 1, axis=0) > 0] = 52
    m = evaluate_endplate3d(shifted, gt, (1, 1, 1))
    assert m["endplate.tp"] == 3
    pm, gm = np.roll(s1, 1, axis=0) > 0, s1 > 0
    assert m["endplate.dice"] == pytest.approx((2 + 0.95) / 3)
    assert m["endplate.hd95"] == pytest.approx(mb.hd95(pm, gm) / 3, rel=1e-9)
    assert m["endplate.asd"] == pytest.approx(mb.asd(pm, gm) / 3, rel=1e-9)  # directed pred -> ref
    thin = gt.copy()  # slab 1 shifted 1 voxel across its 4-voxel thickness: Dice 2*3/8 = 0.75 -> not a TP
    thin[s1 > 0] = 0
    thin[np.roll(s1, 1, axis=1) > 0] = 52
    assert evaluate_endplate3d(thin, gt, (1, 1, 1))["endplate.tp"] == 2


def test_endplate3d_edge_cases_and_resampling():
    gt = endplate_slabs()
    empty = np.zeros_like(gt)
    m = evaluate_endplate3d(empty, gt, (1, 1, 1))  # nothing predicted: the benchmark's defaults
    assert (m["endplate.dice"], m["endplate.hd95"], m["endplate.asd"], m["endplate.recall"]) == (0, 100, 100, 0)
    m = evaluate_endplate3d(gt, empty, (1, 1, 1))  # empty reference
    assert m["endplate.precision"] == 0 and math.isnan(m["endplate.recall"]) and math.isnan(m["endplate.dice"])
    assert all(math.isnan(v) for k, v in evaluate_endplate3d(empty, empty, (1, 1, 1)).items()
               if k not in ("endplate.n_pred", "endplate.n_ref", "endplate.tp"))
    # a 2 mm grid along axis 0: 10 x 4 x 20 = 800 voxels per slab are 1600 mm^3 -> kept after resampling to 1 mm
    coarse = gt[::2]
    m = evaluate_endplate3d(coarse, coarse, (2.0, 1.0, 1.0))
    assert m["endplate.n_ref"] == 3 and m["endplate.tp"] == 3
    assert evaluate_endplate3d(coarse, coarse, (1.0, 1.0, 1.0))["endplate.n_ref"] == 0
    assert cohort_f1(1.0, 0.5) == pytest.approx(2 / 3) and cohort_f1(0.0, 0.0) == 0
    with pytest.raises(ValueError, match="no endplates"):
        evaluate(gt, gt, (1, 1, 1), "endplate3d", gt_scheme="spider")


# ---------------------------------------------------------------- reports
def test_wilcoxon_and_paired_comparison_match_scipy():
    a = [0.91, 0.88, 0.93, 0.85, 0.90, 0.87, 0.92]
    b = [0.93, 0.90, 0.92, 0.89, 0.94, 0.90, 0.95]
    ref = wilcoxon(a, b)
    assert wilcoxon_p(a, b) == pytest.approx((ref.statistic, ref.pvalue))
    assert wilcoxon_p(a, a) == (0.0, 1.0)
    rows_a = [{"case": f"c{i}", "vertebra.dice": v} for i, v in enumerate(a)] + [{"case": "x", "vertebra.dice": 1.0}]
    rows_b = [{"case": f"c{i}", "vertebra.dice": v} for i, v in enumerate(b)]
    rows_b[0]["vertebra.dice"] = math.nan  # dropped from the pairs
    (c,) = paired_comparison(rows_a, rows_b)
    assert c["n"] == 6 and c["p_value"] == pytest.approx(wilcoxon(a[1:], b[1:]).pvalue)
    assert c["mean_diff"] == pytest.approx(np.mean(np.subtract(b[1:], a[1:])))


def test_summary_statistics_and_csv_round_trip(tmp_path):
    rows = [{"case": "a", "status": "ok", "vertebra.pq": 0.5, "vertebra.assd": 1.0},
            {"case": "b", "status": "ok", "vertebra.pq": 0.7, "vertebra.assd": math.inf},
            {"case": "c", "status": "missing_prediction", "vertebra.pq": math.nan, "vertebra.assd": 3.0}]
    s = summarize(rows, "spineps")
    pq = s["metrics"]["vertebra.pq"]
    assert pq["n"] == 2 and pq["mean"] == pytest.approx(0.6) and pq["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert pq["n_nan"] == 1 and s["metrics"]["vertebra.assd"]["n_inf"] == 1
    assert s["status"] == {"ok": 2, "missing_prediction": 1}
    write_cases_csv(rows, tmp_path / "c.csv")
    back = read_cases_csv(tmp_path / "c.csv")
    assert [r["case"] for r in back] == ["a", "b", "c"] and back[1]["vertebra.assd"] == math.inf
    assert math.isnan(back[2]["vertebra.pq"])


def _write(arr, affine, path):
    save_mask(Scan(arr.astype(np.uint16), affine), path)


def test_evaluate_folders_writes_reports_and_pairs_by_name(tmp_path, sample_mri):
    inst = load_scan(sample_mri["instance"], kind="mask")
    sem = load_scan(sample_mri["semantic"], kind="mask")
    gt_dir, pred_dir, pred_b = tmp_path / "gt", tmp_path / "pred", tmp_path / "predB"
    for s in ("01", "02", "03"):
        _write(inst.array, inst.affine, gt_dir / f"sub-{s}" / f"sub-{s}_seg-vert_msk.nii.gz")
        _write(sem.array, sem.affine, gt_dir / f"sub-{s}" / f"sub-{s}_seg-subreg_msk.nii.gz")
    removed = np.where(inst.array == 6, 0, inst.array)
    for s, arr in (("01", inst.array), ("02", removed)):  # sub-03 has no prediction
        _write(arr, inst.affine, pred_dir / f"sub-{s}_mod-T2w_seg-vert_msk.nii.gz")
        _write(sem.array, sem.affine, pred_dir / f"sub-{s}_mod-T2w_seg-spine_msk.nii.gz")
        _write(removed, inst.affine, pred_b / f"sub-{s}_mod-T2w_seg-vert_msk.nii.gz")
    _write(inst.array, inst.affine, pred_dir / "sub-99_mod-T2w_seg-vert_msk.nii.gz")  # no reference

    out = tmp_path / "out"
    summary = evaluate_folders(pred_dir, gt_dir, out, "spineps")
    with open(out / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["sub-01", "sub-02", "sub-03"]
    assert [r["status"] for r in rows] == ["ok", "ok", "missing_prediction"]
    assert [float(r["vertebra.rq"]) for r in rows] == pytest.approx([1.0, 0.8, 0.0])
    assert float(rows[0]["global_dice.canal"]) == 1.0
    js = json.loads((out / "summary.json").read_text())
    assert js["n_cases"] == 3 and js["unmatched_predictions"] == ["sub-99"]
    assert js["metrics"]["vertebra.rq"]["mean"] == pytest.approx(0.6)
    assert js["metrics"]["vertebra.assd"]["n_inf"] == 1  # the missing prediction
    assert "| rq |" in (out / "summary.md").read_text()
    assert summary["files"]["csv"] == out / "cases.csv"

    lines: list[str] = []
    assert run_evaluate_cli(pred_dir, gt_dir, "spineps", out / "cli", paired=pred_b, print_fn=lines.append) == 0
    paired = json.loads((out / "cli" / "paired.json").read_text())["comparison"]
    rq = next(c for c in paired if c["metric"] == "vertebra.rq")
    assert rq["n"] == 3 and rq["mean_diff"] == pytest.approx((0.8 - 1.0) / 3)
    assert (out / "cli" / "paired.md").exists() and any("Wilcoxon" in x for x in lines)


def test_single_files_cli_and_grid_mismatch(tmp_path, sample_ct):
    ct = load_scan(sample_ct["instance"], kind="mask")
    lines: list[str] = []
    assert run_evaluate_cli(sample_ct["instance"], sample_ct["instance"], "spider", tmp_path / "o",
                            print_fn=lines.append) == 0
    assert any(x.startswith("vertebrae.dice") and x.endswith("1.0000") for x in lines)
    assert (tmp_path / "o" / "cases.csv").exists()
    moved = ct.affine.copy()
    moved[:3, 3] += 3.0
    bad = tmp_path / "sub-ct_seg-vert_msk.nii.gz"
    save_mask(Scan(ct.array, moved), bad)
    with pytest.raises(ScanError, match=r"sub-ct_seg-vert_msk.nii.gz and .*sub-ct_seg-vert_label-22_msk"):
        run_evaluate_cli(bad, sample_ct["instance"], "spineps")
    with pytest.raises(ValueError, match="all files or all folders"):
        run_evaluate_cli(tmp_path, sample_ct["instance"], "spineps")


def test_case_keys():
    assert case_key("sub-01_ses-2_mod-T2w_seg-vert_msk.nii.gz") == ("sub-01_ses-2", "main")
    assert case_key("sub-01_ses-2_seg-subreg_msk.nii.gz") == ("sub-01_ses-2", "semantic")
    assert case_key("sub-mri_seg-vert_label-6_msk.nii.gz") == ("sub-mri_label-6", "main")
    assert case_key("case7.mha") == ("case7", "main") == case_key("case7_seg-vert_msk.nii.gz")


def test_spider_style_folder_pairs_with_pipeline_names(tmp_path):
    gt = to_spider(box_spine())
    aff = np.diag([3.3, 0.6, 0.6, 1.0])
    (tmp_path / "gt").mkdir()
    nib.save(nib.Nifti1Image(gt.astype(np.uint16), aff), str(tmp_path / "gt" / "1_t2.nii.gz"))
    from spineps_like.io import derivative_name

    name = derivative_name("1_t2.mha", "vert", "msk", ".nii.gz")  # what the pipeline writes for that image
    _write(box_spine(), aff, tmp_path / "pred" / name)
    s = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", "spider", gt_scheme="spider")
    assert s["rows"][0]["status"] == "ok" and s["rows"][0]["vertebrae.dice"] == 1.0
