"""Real-image validation of the models: every real scan the project can reach, scored against what reference it has.

    .venv/bin/python benchmarks/real_scans.py              # writes benchmarks/results/real_scans.{json,md}
    .venv/bin/python benchmarks/real_scans.py --cases tptbox --semantic-model models/my-model

Real images are for validation only: no training code reads them. Cases (data and licences in
``benchmarks/real_data/<source>/README.md``; the TPTBox crops come from the installed TPTBox wheel):

  tptbox_mri / tptbox_ct     TPTBox's sample crops, manual subregion + vertebra instance masks (as accuracy.py)
  totalseg_mr / totalseg_ct  TotalSegmentator's test images; labels made by the TotalSegmentator model, NOT manual
  sct_t2                     spinalcordtoolbox's cervical T2, manual spinal cord mask (+ automatic vertebral levels on it)

Per case: the semantic phase (``predict_semantic`` with ``--semantic-model``), then the full pipeline's instance
phase (``instance_phase`` with ``--instance-model``, as ``segment`` chains them). Scored: Dice per structure of the
semantic phase's mask wherever the reference annotates that structure ("n/a" where it does not), vertebra PQ with
the spineps protocol where the reference has vertebra instances, and the number of vertebrae found against the
reference's count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "real_data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import label_dice, panoptic  # noqa: E402  (benchmarks/accuracy.py)
from spineps_like.io import Scan, atomic_write_json, atomic_write_text, load_scan  # noqa: E402

# ---------------------------------------------------------------- structures
#: Structure -> semantic labels of *our* prediction (spineps_like.labels) that make it up.
PRED_STRUCTURES: dict[str, tuple[int, ...]] = {
    "vertebra": (41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 62, 26),  # all bone, sacrum included
    "corpus": (49,),
    "posterior": (41, 42, 43, 44, 45, 46, 47, 48),
    "endplate": (52, 53, 62),
    "ivd": (100,),
    "canal": (61,),
    "cord": (60,),
    "sacrum": (26,),
}
STRUCTURE_ORDER = tuple(PRED_STRUCTURES)

#: TPTBox subregion labels (the same scheme as ours; 50 dense corpus and 51 dens count as corpus, as in accuracy.py).
TPTBOX_STRUCTURES: dict[str, tuple[int, ...]] = {
    "vertebra": (41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 62, 26),
    "corpus": (49, 50, 51),
    "posterior": (41, 42, 43, 44, 45, 46, 47, 48),
    "endplate": (52, 53, 62),
    "ivd": (100,),
    "canal": (61,),
    "cord": (60,),
    "sacrum": (26,),
}

#: TotalSegmentator class ids (totalsegmentator/map_to_binary.py, class_map["total_mr"]) in example_seg_mr.
TOTALSEG_MR_CLASSES: dict[int, str] = {18: "sacrum", 19: "vertebrae", 20: "intervertebral_discs", 21: "spinal_cord"}
TOTALSEG_MR_STRUCTURES: dict[str, tuple[int, ...]] = {"vertebra": (18, 19), "ivd": (20,), "cord": (21,)}

#: TotalSegmentator class ids (class_map["total"], v2) in example_seg: 25 sacrum, 26 vertebrae_S1, 27 L5 ... 50 C1,
#: 79 spinal_cord. The CT "total" task has no intervertebral disc class.
TOTALSEG_CT_VERTEBRAE: dict[int, str] = {
    25: "sacrum", 26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1",
    **{32 + i: f"T{12 - i}" for i in range(12)},  # 32 T12 ... 43 T1
    **{44 + i: f"C{7 - i}" for i in range(7)},  # 44 C7 ... 50 C1
}
TOTALSEG_CT_CORD = 79
TOTALSEG_CT_STRUCTURES: dict[str, tuple[int, ...]] = {"vertebra": tuple(TOTALSEG_CT_VERTEBRAE),
                                                      "cord": (TOTALSEG_CT_CORD,)}

#: sct_testing_data t2: t2_seg-manual.nii.gz is 0/1 (1 = spinal cord); t2_seg-manual_labeled.nii.gz holds the cord
#: labelled by vertebral level (2 = C2 ... 5 = C5 in this file; SCT's convention 1 = C1, 8 = T1, ...).
SCT_STRUCTURES: dict[str, tuple[int, ...]] = {"cord": (1,)}


def structure_masks(mask: np.ndarray, structures: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Boolean mask per structure name: where ``mask`` holds one of the structure's labels."""
    mask = np.asarray(mask)
    return {name: np.isin(mask, labs) for name, labs in structures.items()}


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    s = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return float(2 * np.count_nonzero(pred & gt) / s) if s else float("nan")


def score_structures(pred_semantic: np.ndarray, gt: dict[str, np.ndarray]) -> dict[str, float]:
    """Dice per structure the reference annotates (keys of ``gt``), our prediction's labels per PRED_STRUCTURES."""
    return {name: dice(np.isin(pred_semantic, PRED_STRUCTURES[name]), g) for name, g in gt.items()}


def vertebra_ids(instance: np.ndarray) -> list[int]:
    """Vertebra ids (1-28 without sacrum 26 and coccyx 27) present in one of our instance masks."""
    ids = np.unique(np.asarray(instance))
    return [int(i) for i in ids if 1 <= i <= 28 and i not in (26, 27)]


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    """One real scan and its reference, mapped to our structure names."""

    name: str
    source: str
    reference: str  # who made the labels
    image: Scan
    gt: dict[str, np.ndarray]  # structure -> boolean mask (only the structures the reference annotates)
    gt_instance: Scan | None = None  # reference instance mask in our ids (vertebra PQ), if any
    gt_semantic: Scan | None = None  # reference semantic mask in our scheme (label_dice), if any
    gt_count: int | None = None  # vertebrae in the reference
    gt_count_note: str = ""
    gt_names: list[str] = field(default_factory=list)


def _tptbox(kind: str) -> Case:
    from spineps_like.labels import VERTEBRA_ID_TO_NAME
    from spineps_like.phantom import tptbox_sample

    p = tptbox_sample(kind)
    image = load_scan(p["image"])
    sem = load_scan(p["semantic"], kind="mask")
    ins = load_scan(p["instance"], kind="mask")
    gt = structure_masks(sem.array, TPTBOX_STRUCTURES)
    if kind == "ct":  # the CT crop's reference labels bone only (subregions + dense corpus): nothing else annotated
        gt = {k: v for k, v in gt.items() if k in ("vertebra", "corpus", "posterior", "sacrum")}
    ids = vertebra_ids(ins.array)
    return Case(f"tptbox_{kind}", "TPTBox wheel sample crop", "manual (TPTBox)", image, gt, gt_instance=ins,
                gt_semantic=sem, gt_count=len(ids), gt_count_note="instance mask",
                gt_names=[VERTEBRA_ID_TO_NAME[i] for i in ids])


def _totalseg_mr() -> Case:
    d = DATA / "totalsegmentator"
    image = load_scan(d / "example_mr_sm.nii.gz")
    seg = load_scan(d / "example_seg_mr.nii.gz", kind="mask")
    return Case("totalseg_mr", "TotalSegmentator tests/reference_files", "TotalSegmentator model (total_mr)", image,
                structure_masks(seg.array, TOTALSEG_MR_STRUCTURES))


def totalseg_ct_instances(seg: np.ndarray) -> np.ndarray:
    """TotalSegmentator's per-vertebra CT labels -> our instance ids (T11 -> 18, L1 -> 20, ...; sacrum/S1 -> 26)."""
    from spineps_like.labels import VERTEBRA_NAME_TO_ID

    lut = np.zeros(256, np.uint16)
    for ts_id, name in TOTALSEG_CT_VERTEBRAE.items():
        lut[ts_id] = 26 if name in ("sacrum", "S1") else VERTEBRA_NAME_TO_ID[name]
    return lut[np.asarray(seg).astype(np.uint8)]


def _totalseg_ct() -> Case:
    d = DATA / "totalsegmentator"
    image = load_scan(d / "example_ct_sm.nii.gz")
    seg = load_scan(d / "example_seg.nii.gz", kind="mask")
    present = [int(i) for i in np.unique(seg.array) if int(i) in TOTALSEG_CT_VERTEBRAE and int(i) not in (25, 26)]
    ins = Scan(totalseg_ct_instances(seg.array), seg.affine, seg.path)
    return Case("totalseg_ct", "TotalSegmentator tests/reference_files", "TotalSegmentator model (total)", image,
                structure_masks(seg.array, TOTALSEG_CT_STRUCTURES), gt_instance=ins, gt_count=len(present),
                gt_count_note="per-vertebra labels",
                gt_names=[TOTALSEG_CT_VERTEBRAE[i] for i in sorted(present, reverse=True)])  # top to bottom


def _sct_t2() -> Case:
    d = DATA / "sct_testing_data"
    image = load_scan(d / "t2.nii.gz")
    seg = load_scan(d / "t2_seg-manual.nii.gz", kind="mask")
    levels = load_scan(d / "t2_seg-manual_labeled.nii.gz", kind="mask")
    lv = [int(i) for i in np.unique(levels.array) if i > 0]
    names = [f"C{i}" if i <= 7 else f"T{i - 7}" for i in lv]
    return Case("sct_t2", "spinalcordtoolbox sct_testing_data", "manual (SCT)", image,
                structure_masks(seg.array, SCT_STRUCTURES), gt_count=len(lv),
                gt_count_note="vertebral levels (sct_label_vertebrae) on the manual cord, approximate", gt_names=names)


LOADERS: dict[str, Callable[[], Case]] = {
    "tptbox_mri": lambda: _tptbox("mri"),
    "tptbox_ct": lambda: _tptbox("ct"),
    "totalseg_mr": _totalseg_mr,
    "totalseg_ct": _totalseg_ct,
    "sct_t2": _sct_t2,
}


def merge_endplates(instance: np.ndarray) -> np.ndarray:
    """Our instance mask with each endplate (200+v) given to its vertebra v, for references whose vertebra covers
    the endplates (TotalSegmentator)."""
    out = np.array(instance, copy=True)
    ep = (out > 200) & (out < 300)
    out[ep] -= 200
    return out


# ---------------------------------------------------------------- run
def run_case(case: Case, semantic_model, instance_model) -> dict:
    from spineps_like.labels import VERTEBRA_ID_TO_NAME
    from spineps_like.pipeline import instance_phase
    from spineps_like.semantic import predict_semantic

    row: dict = {"case": case.name, "source": case.source, "reference": case.reference,
                 "shape": list(case.image.shape), "spacing": [round(float(s), 3) for s in case.image.spacing],
                 "orientation": case.image.orientation, "annotated": sorted(case.gt)}
    t0 = time.perf_counter()
    sem = predict_semantic(case.image, semantic_model)
    row["semantic_seconds"] = time.perf_counter() - t0
    row["dice"] = score_structures(sem.array, case.gt)
    row["voxels_pred_ref"] = {k: [int(np.count_nonzero(np.isin(sem.array, PRED_STRUCTURES[k]))),
                                  int(np.count_nonzero(g))] for k, g in case.gt.items()}
    if case.gt_semantic is not None:
        row["label_dice"] = label_dice(sem.array, case.gt_semantic.array)  # accuracy.py's per-label Dice
    t1 = time.perf_counter()
    sem_out, ins, _ = instance_phase(sem, method="network", model=instance_model)
    row["instance_seconds"] = time.perf_counter() - t1
    row["pipeline_dice"] = score_structures(sem_out.array, case.gt)
    found = vertebra_ids(ins.array)
    row["vertebrae_found"] = len(found)
    row["vertebrae_found_names"] = [VERTEBRA_ID_TO_NAME[i] for i in found]
    row["vertebrae_reference"] = case.gt_count
    row["vertebrae_reference_names"] = case.gt_names
    row["vertebrae_reference_note"] = case.gt_count_note
    if case.gt_instance is not None:
        pred_ins = ins.array if case.name.startswith("tptbox") else merge_endplates(ins.array)
        sem_pred = sem_out.array if case.gt_semantic is not None else None
        sem_gt = case.gt_semantic.array if case.gt_semantic is not None else None
        row["pipeline"] = panoptic(Scan(pred_ins, ins.affine), case.gt_instance, sem_pred, sem_gt)
    row["seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------- report
def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def table(rows: list[dict]) -> str:
    head = ["case", "reference"] + [f"{s} Dice" for s in STRUCTURE_ORDER] + ["vert. PQ (RQ)", "vertebrae found / ref.",
                                                                             "s"]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = r["reference"]
        if ref.startswith("TotalSegmentator"):
            ref = "reference = TotalSegmentator model"
        cells = [r["case"], ref]
        cells += [_fmt(r["dice"][s]) if s in r["dice"] else "n/a" for s in STRUCTURE_ORDER]
        p = r.get("pipeline")
        cells.append(f"{_fmt(p['vertebra.pq'])} ({_fmt(p['vertebra.rq'])})" if p else "n/a")
        if r["vertebrae_reference"] is None:
            cells.append(f"{r['vertebrae_found']} / n/a")
        else:
            approx = "~" if "approximate" in r["vertebrae_reference_note"] else ""
            cells.append(f"{r['vertebrae_found']} / {approx}{r['vertebrae_reference']}")
        cells.append(f"{r['seconds']:.1f}")
        L.append("| " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def markdown(rows: list[dict], meta: dict) -> str:
    L = [f"# Real-scan validation ({meta['date']})", "",
         f"- command: `{meta['command']}`",
         f"- git commit: `{meta['git_commit']}`{' (working tree had changes)' if meta['git_dirty'] else ''}",
         f"- semantic model: `{meta['semantic_model']}` (folder `{meta['semantic_model_folder']}`)",
         f"- instance model: `{meta['instance_model']}` (folder `{meta['instance_model_folder']}`)",
         f"- machine: {meta['machine']}, torch threads {meta['torch_threads']}", "",
         "Dice of the semantic phase's mask per structure (`n/a`: the reference does not annotate it; `-`: absent "
         "from both). `vertebra` = all our bone labels (41-49, 52, 53, 62, 26) against the reference's whole "
         "vertebrae (+ sacrum). Vertebra PQ (spineps protocol, IoU >= 0.5) of the full pipeline where the reference "
         "has vertebra instances (TotalSegmentator CT: our endplates merged into their vertebra). Vertebrae found = "
         "our instance mask's vertebra ids (sacrum and coccyx not counted); reference count from the instance mask "
         "(TPTBox), the per-vertebra labels (TotalSegmentator CT) or the vertebral levels on the manual cord "
         "(SCT, `~`: approximate). Rows marked `reference = TotalSegmentator model` are scored against another "
         "model's output, not manual labels. Real images are validation only.", "",
         table(rows), "## Per case", ""]
    for r in rows:
        note = r["vertebrae_reference_note"] or "no instance labels"
        L.append(f"- **{r['case']}** ({r['source']}; {r['shape']} at {r['spacing']} mm, {r['orientation']}): "
                 f"found {r['vertebrae_found_names'] or 'none'}; reference {r['vertebrae_reference_names'] or 'n/a'} "
                 f"({note}); voxels predicted / reference "
                 + ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["voxels_pred_ref"].items()) + "; "
                 "full-pipeline Dice " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["pipeline_dice"].items())
                 + f"; semantic {r['semantic_seconds']:.1f} s, instance phase {r['instance_seconds']:.1f} s.")
    return "\n".join(L) + "\n"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # pragma: no cover
        return ""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--semantic-model", default=DEFAULT_SEMANTIC_MODEL, help="name or folder (default: bundled)")
    ap.add_argument("--instance-model", default=DEFAULT_INSTANCE_MODEL, help="name or folder (default: bundled)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_scans",
                    help="results path prefix: writes PREFIX.md and PREFIX.json")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to run "
                    f"(cases: {', '.join(LOADERS)}); default all")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from spineps_like.instance.network import load_instance_model
    from spineps_like.models import find_model, load_semantic_model

    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    names = [n for n in LOADERS if not wanted or any(w in n for w in wanted)]
    if not names:
        ap.error(f"--cases {args.cases!r} matches none of {', '.join(LOADERS)}")
    sem_folder = find_model(args.semantic_model).path
    ins_folder = find_model(args.instance_model).path
    sem_model = load_semantic_model(args.semantic_model)
    ins_model = load_instance_model(ins_folder)
    rows = []
    for n in names:
        case = LOADERS[n]()
        rows.append(run_case(case, sem_model, ins_model))
        print(n, {k: round(v, 3) for k, v in rows[-1]["dice"].items()}, "vertebrae",
              rows[-1]["vertebrae_found"], "/", rows[-1]["vertebrae_reference"], flush=True)

    def rel(p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(ROOT))
        except ValueError:
            return str(p)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(
                [".venv/bin/python", "benchmarks/real_scans.py", *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
            "semantic_model": str(args.semantic_model), "semantic_model_folder": rel(sem_folder),
            "instance_model": str(args.instance_model), "instance_model_folder": rel(ins_folder),
            "machine": _machine(), "torch_threads": torch.get_num_threads(), "cases": names}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    atomic_write_json(out.with_name(out.name + ".json"), {"meta": meta, "rows": rows})
    atomic_write_text(out.with_name(out.name + ".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
