"""Evaluation of spine segmentations against a reference, by three protocols:

- ``spineps`` (default): panoptic quality per group (vertebra, IVD, endplate, sacrum) with panoptica, plus
  global Dice per semantic structure -- :mod:`.spineps_protocol`;
- ``spider``: the SPIDER lumbar MRI challenge rules -- :mod:`.spider`;
- ``endplate3d``: the Endplate3D-QCT endplate benchmark rules -- :mod:`.endplate3d`.

:func:`evaluate` scores one case (arrays + spacing); :func:`evaluate_folders` pairs a prediction folder with a
reference folder and writes ``cases.csv``, ``summary.json`` and ``summary.md`` (:mod:`.report`);
:func:`~.report.paired_comparison` compares two prediction sets (Wilcoxon signed-rank test).

Examples
--------
>>> from spineps_like.evaluation import evaluate
>>> m = evaluate(pred_instance, gt_instance, spacing=(1.5, 1.5, 1.5))           # doctest: +SKIP
>>> m["vertebra.pq"], m["ivd.rq"]                                                # doctest: +SKIP
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from spineps_like.evaluation import endplate3d as _endplate3d
from spineps_like.evaluation.endplate3d import evaluate_endplate3d
from spineps_like.evaluation.report import (
    paired_comparison,
    paired_markdown,
    read_cases_csv,
    summarize,
    summary_markdown,
    write_json,
    write_report,
)
from spineps_like.evaluation.spider import evaluate_spider, from_spider, to_spider
from spineps_like.evaluation.spineps_protocol import (
    GLOBAL_STRUCTURES,
    SPIDER_STRUCTURES,
    evaluate_spineps,
    global_dice,
    panoptic_metrics,
)
from spineps_like.io import (
    MHA_SUFFIXES,
    NIFTI_SUFFIXES,
    ScanError,
    atomic_write_text,
    derivative_name,
    load_scan,
    split_bids_name,
)
from spineps_like.geometry import same_grid

PROTOCOLS = ("spineps", "spider", "endplate3d")
SCHEMES = ("spineps", "spider")
#: ``seg-`` entity values that mark a semantic mask; any other (or none) marks the protocol's main mask.
SEMANTIC_SEG = frozenset({"spine", "subreg", "sem", "semantic"})
_DERIVATIVE_SUFFIXES = frozenset({"msk", "mask", "seg", "dseg", "label", "labels"})

__all__ = [
    "PROTOCOLS", "evaluate", "evaluate_folders", "run_evaluate_cli", "pair_folders", "case_key",
    "evaluate_spineps", "panoptic_metrics", "global_dice", "evaluate_spider", "to_spider", "from_spider",
    "evaluate_endplate3d", "paired_comparison", "summarize", "read_cases_csv",
]


def _check_protocol(protocol: str, pred_scheme: str, gt_scheme: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    for name, s in (("pred_scheme", pred_scheme), ("gt_scheme", gt_scheme)):
        if s not in SCHEMES:
            raise ValueError(f"unknown {name} {s!r}; choose 'spineps' or 'spider'")
    if protocol == "endplate3d" and "spider" in (pred_scheme, gt_scheme):
        raise ValueError("the endplate3d protocol needs endplate masks; SPIDER masks carry no endplates")


def evaluate(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    protocol: str = "spineps",
    *,
    semantic_pred: np.ndarray | None = None,
    semantic_gt: np.ndarray | None = None,
    pred_scheme: str = "spineps",
    gt_scheme: str = "spineps",
    **options,
) -> dict[str, float]:
    """Score one prediction against its reference.

    Parameters
    ----------
    pred, gt : label arrays on the same grid: our instance masks (``seg-vert``) for ``spineps`` and ``spider``, or
        SPIDER masks when the scheme says ``"spider"``; for ``endplate3d`` any mask holding our endplate labels
        (semantic 52/53/62 or instance 201-228; ``foreground="any"`` for binary endplate masks).
    spacing : voxel size in mm per *array axis* (``Scan.spacing``).
    protocol : ``"spineps"``, ``"spider"`` or ``"endplate3d"``.
    semantic_pred, semantic_gt : our semantic masks (``seg-spine``); ``spineps`` adds global Dice per structure
        from them, ``spider`` takes the canal from them.
    pred_scheme, gt_scheme : ``"spineps"`` (ours) or ``"spider"``; masks are converted with
        :func:`~.spider.to_spider` / :func:`~.spider.from_spider` as the protocol needs. Against a SPIDER reference
        the ``spineps`` protocol's global Dice covers only vertebra, IVD and canal (+ cord).
    **options : passed to the protocol function (e.g. ``iou_threshold``, ``challenge_spacing``, ``min_size``,
        ``foreground``); ``pred_lumbar6``/``gt_lumbar6``/``*_thoracic13`` are :func:`from_spider` hints.

    Returns
    -------
    dict ``"<group>.<metric>" -> float``; NaN/inf conventions in each protocol module's docstring.
    """
    _check_protocol(protocol, pred_scheme, gt_scheme)
    hints = {side: _spider_kwargs(options, side) for side in ("pred", "gt")}
    if protocol == "spineps":
        structures = options.pop("structures", None)
        if pred_scheme == "spider":
            pred, sem = from_spider(pred, **hints["pred"])
            semantic_pred = sem if semantic_pred is None else semantic_pred
        if gt_scheme == "spider":
            gt, sem = from_spider(gt, **hints["gt"])
            semantic_gt = sem if semantic_gt is None else semantic_gt
            structures = SPIDER_STRUCTURES if structures is None else structures
        return evaluate_spineps(pred, gt, spacing, semantic_pred=semantic_pred, semantic_gt=semantic_gt,
                                structures=structures, **options)
    if protocol == "spider":
        if pred_scheme == "spineps":
            pred = to_spider(pred, semantic_pred)
        if gt_scheme == "spineps":
            gt = to_spider(gt, semantic_gt)
        return evaluate_spider(pred, gt, spacing, **options)
    return evaluate_endplate3d(pred, gt, spacing, **options)


def _spider_kwargs(options: dict, side: str) -> dict:
    """Pop ``<side>_lumbar6`` / ``<side>_thoracic13`` (:func:`from_spider` hints: SPIDER label 1 is L6 / the
    column holds T13) out of ``options``."""
    return {k: bool(options.pop(f"{side}_{k}")) for k in ("lumbar6", "thoracic13") if f"{side}_{k}" in options}


# ---------------------------------------------------------------- folders
def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not name.startswith(".") and name.endswith(NIFTI_SUFFIXES + MHA_SUFFIXES)


def case_key(path: str | os.PathLike) -> tuple[str, str]:
    """(case, kind) of a mask file.

    With a BIDS subject entity the case is the entities without ``seg-``/``mod-`` and without the suffix
    (``sub-01_ses-1_mod-T2w_seg-vert_msk.nii.gz`` and ``sub-01_ses-1_seg-vert_msk.nii.gz`` -> ``sub-01_ses-1``);
    otherwise the stem without ``seg-``/``mod-`` parts and a trailing msk/mask/seg/dseg/label suffix
    (``case7_seg-vert_msk.nii.gz`` and ``case7.mha`` -> ``case7``). ``kind`` is ``"semantic"`` for
    ``seg-spine``/``seg-subreg``/``seg-sem`` masks, else ``"main"``.
    """
    entities, suffix = split_bids_name(path)
    seg = next((v for k, v in entities if k == "seg"), None)
    kind = "semantic" if seg in SEMANTIC_SEG else "main"
    keep = [(k, v) for k, v in entities if k not in ("seg", "mod")]
    if any(k == "sub" for k, _ in keep):
        return "_".join(f"{k}-{v}" for k, v in keep), kind
    parts = [v if k == "desc" else f"{k}-{v}" for k, v in keep]
    if suffix and suffix.lower() not in _DERIVATIVE_SUFFIXES:
        parts.append(suffix)
    return "_".join(parts) or Path(path).name, kind


def _pipeline_alias(path: Path) -> str:
    """The case our pipeline's output for an image named like ``path`` gets (``derivative_name``): lets a
    non-BIDS reference folder (e.g. SPIDER's ``1_t2.mha``) pair with a folder of spineps-like outputs."""
    return case_key(derivative_name(path, "vert", "msk", ".nii.gz"))[0]


def _index(folder: Path) -> dict[str, dict[str, Path]]:
    out: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.rglob("*")):
        if not _is_image(p):
            continue
        case, kind = case_key(p)
        slot = out.setdefault(case, {})
        if kind in slot:
            raise ValueError(f"two {kind} masks for case {case!r}: {slot[kind]} and {p}")
        slot[kind] = p
    return out


def pair_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Pair the mask files of two folders (searched recursively) by :func:`case_key`.

    Returns (pairs, unmatched_predictions): one dict per reference case with keys ``case``, ``gt``,
    ``gt_semantic``, ``pred``, ``pred_semantic`` (None where missing), sorted by case; and the prediction cases
    without a reference. ValueError when a folder is missing or holds no mask, or nothing pairs.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for name, d in (("prediction", pred_dir), ("reference", gt_dir)):
        if not d.is_dir():
            raise ValueError(f"{d}: {name} folder does not exist")
    preds, gts = _index(pred_dir), _index(gt_dir)
    gts = {c: s for c, s in gts.items() if "main" in s}
    if not gts:
        raise ValueError(f"{gt_dir}: no reference mask (.nii.gz, .nii, .mha, .mhd) found")
    used: set[str] = set()
    pairs = []
    for c, s in sorted(gts.items()):
        pc = c if c in preds else _pipeline_alias(s["main"])
        found = preds.get(pc, {})
        if "main" in found:
            used.add(pc)
        pairs.append({"case": c, "gt": s["main"], "gt_semantic": s.get("semantic"),
                      "pred": found.get("main"), "pred_semantic": found.get("semantic")})
    if not used:
        raise ValueError(f"no prediction in {pred_dir} matches a reference in {gt_dir} "
                         f"({len(preds)} prediction cases, {len(gts)} reference cases)")
    unmatched = sorted(c for c, s in preds.items() if c not in used and "main" in s)
    return pairs, unmatched


def _load_on_grid(path: Path | None, ref, what: str):
    if path is None:
        return None
    scan = load_scan(path, kind="mask")
    if not same_grid(scan.shape, scan.affine, ref.shape, ref.affine):
        raise ScanError(f"{path} and {ref.path}: {what} grid {scan.shape} {scan.orientation} "
                        f"{tuple(round(s, 3) for s in scan.spacing)} differs from the reference grid {ref.shape} "
                        f"{ref.orientation} {tuple(round(s, 3) for s in ref.spacing)}")
    return scan.array


def evaluate_case_files(
    pred: str | os.PathLike | None,
    gt: str | os.PathLike,
    protocol: str = "spineps",
    *,
    semantic_pred: str | os.PathLike | None = None,
    semantic_gt: str | os.PathLike | None = None,
    case: str | None = None,
    **options,
) -> dict[str, object]:
    """Load one case's mask files (``load_scan(kind='mask')``) and :func:`evaluate` it; returns a report row.

    ``pred=None`` (no prediction for this reference) scores an empty prediction, status ``missing_prediction``.
    Every mask must lie on the reference grid (ScanError naming both files otherwise).
    """
    ref = load_scan(gt, kind="mask")
    sem_gt = _load_on_grid(Path(semantic_gt) if semantic_gt else None, ref, "reference semantic")
    if pred is None:
        p_arr = np.zeros(ref.shape, np.uint8)
        sem_pred = np.zeros(ref.shape, np.uint8) if sem_gt is not None else None
        status = "missing_prediction"
    else:
        p_arr = _load_on_grid(Path(pred), ref, "prediction")
        sem_pred = _load_on_grid(Path(semantic_pred) if semantic_pred else None, ref, "prediction semantic")
        status = "ok"
    try:
        metrics = evaluate(p_arr, ref.array, ref.spacing, protocol, semantic_pred=sem_pred, semantic_gt=sem_gt,
                           **options)
    except ValueError as e:
        raise ValueError(f"{pred} vs {gt}: {e}") from None
    return {"case": case or case_key(gt)[0], "status": status, "pred_file": str(pred or ""), "gt_file": str(gt),
            **metrics}


def _evaluate_pair(args: tuple[dict, str, dict]) -> dict[str, object]:
    pair, protocol, options = args
    return evaluate_case_files(pair["pred"], pair["gt"], protocol, semantic_pred=pair["pred_semantic"],
                               semantic_gt=pair["gt_semantic"], case=pair["case"], **options)


def _cohort(protocol: str):
    return _endplate3d.cohort_metrics if protocol == "endplate3d" else None


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    protocol: str = "spineps",
    *,
    workers: int = 1,
    **options,
) -> dict:
    """Evaluate every reference case in ``gt_dir`` against its prediction in ``pred_dir``; write reports.

    Files pair by :func:`case_key` (BIDS subject/session/... entities, ignoring ``seg-``/``mod-`` and the suffix;
    identical stems otherwise); ``seg-spine``/``seg-subreg`` files are the cases' semantic masks. A reference
    without prediction is scored against an empty prediction (status ``missing_prediction``); predictions without
    reference are listed in the summary (``unmatched_predictions``). Writes ``cases.csv``, ``summary.json``,
    ``summary.md`` into ``out_dir`` atomically and returns the summary dict (plus ``"rows"`` and ``"files"``).
    ``workers`` > 1 evaluates cases in a process pool. ``options`` go to :func:`evaluate`.
    """
    _check_protocol(protocol, options.get("pred_scheme", "spineps"), options.get("gt_scheme", "spineps"))
    pairs, unmatched = pair_folders(pred_dir, gt_dir)
    jobs = [(p, protocol, options) for p in pairs]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as ex:
            rows = list(ex.map(_evaluate_pair, jobs))
    else:
        rows = [_evaluate_pair(j) for j in jobs]
    extra = {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "unmatched_predictions": unmatched,
             "options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))}}
    files = write_report(rows, out_dir, protocol, cohort=_cohort(protocol), extra=extra)
    summary = summarize(rows, protocol, _cohort(protocol))
    summary.update(extra)
    summary["rows"] = rows
    summary["files"] = files
    return summary


# ---------------------------------------------------------------- CLI entry
def run_evaluate_cli(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    protocol: str = "spineps",
    out: str | os.PathLike | None = None,
    *,
    semantic_pred: str | os.PathLike | None = None,
    semantic_gt: str | os.PathLike | None = None,
    paired: str | os.PathLike | None = None,
    workers: int = 1,
    pred_scheme: str = "spineps",
    gt_scheme: str = "spineps",
    print_fn=print,
) -> int:
    """``spineps-like evaluate PRED GT``: PRED and GT are both mask files (one case) or both folders (a cohort).

    Files: prints the metrics, and writes the reports into ``out`` when given. Folders: writes the reports into
    ``out`` (default ``<PRED>/evaluation-<protocol>``) and prints the Markdown summary. ``paired`` is a second
    prediction (file or folder, same kind as PRED) scored against the same GT: its reports go to
    ``out/paired-B`` and the comparison to ``out/paired.json`` / ``out/paired.md`` (B - A, Wilcoxon p).
    Returns the exit code 0; bad input raises ValueError/ScanError with a one-line message.
    """
    pred, gt = Path(pred), Path(gt)
    options = {"pred_scheme": pred_scheme, "gt_scheme": gt_scheme}
    _check_protocol(protocol, pred_scheme, gt_scheme)
    inputs = [("prediction", pred), ("reference", gt)] + ([("paired prediction", Path(paired))] if paired else [])
    for name, p in inputs:
        if not p.exists():
            raise ValueError(f"{p}: {name} does not exist")
    if pred.is_dir() != gt.is_dir() or (paired is not None and Path(paired).is_dir() != pred.is_dir()):
        raise ValueError(f"{pred} and {gt}{' and ' + str(paired) if paired else ''}: give all files or all folders")
    if pred.is_dir():
        if semantic_pred or semantic_gt:
            raise ValueError("--semantic-pred/--semantic-gt are for single files; in folders semantic masks are "
                             "found by their seg-spine / seg-subreg names")
        out_dir = Path(out) if out else pred / f"evaluation-{protocol}"
        summary = evaluate_folders(pred, gt, out_dir, protocol, workers=workers, **options)
        rows_a = summary["rows"]
        print_fn(summary_markdown(summary, f"Evaluation ({protocol}): {pred}"))
        print_fn(f"reports: {out_dir}")
        if paired is not None:
            rows_b = evaluate_folders(paired, gt, out_dir / "paired-B", protocol, workers=workers, **options)["rows"]
    else:
        row = evaluate_case_files(pred, gt, protocol, semantic_pred=semantic_pred, semantic_gt=semantic_gt,
                                  **options)
        rows_a = [row]
        out_dir = Path(out) if out else None
        if out_dir is not None:
            write_report(rows_a, out_dir, protocol, cohort=_cohort(protocol))
        width = max(len(k) for k in row)
        for k, v in row.items():
            if k not in ("pred_file", "gt_file"):
                print_fn(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if paired is not None:
            rows_b = [evaluate_case_files(paired, gt, protocol, semantic_pred=None, semantic_gt=semantic_gt,
                                          case=row["case"], **options)]
    if paired is not None:
        comparison = paired_comparison(rows_a, rows_b)
        md = paired_markdown(comparison, str(pred), str(paired))
        print_fn(md)
        if out_dir is not None:
            write_json({"a": str(pred), "b": str(paired), "comparison": comparison}, out_dir / "paired.json")
            atomic_write_text(out_dir / "paired.md", md)
    return 0
