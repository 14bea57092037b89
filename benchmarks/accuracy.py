"""Accuracy report of the bundled models: evaluation phantoms (per FOV and variant) and the two real TPTBox crops.

    .venv/bin/python benchmarks/accuracy.py              # development set: benchmarks/results/accuracy.{json,md}
    .venv/bin/python benchmarks/accuracy.py --set test   # test set: benchmarks/results/accuracy_test.{json,md}

Three measurements per case, all against exact ground truth:
  semantic   the bundled semantic model's Dice per label (issue 3);
  instance   the instance phase fed the ground-truth semantic mask: learned network vs weights-free geometric method;
  pipeline   the whole pipeline (bundled semantic model -> network instance phase) scored with the spineps protocol.
And negatives, images without a spine (a phantom's body with its spine replaced by body tissue, or filled with one
tissue, painted as T2w / T1w / STIR / CT by spineps_like.phantom.appearance; and Gaussian noise): the spine voxels the
semantic model paints and the vertebrae the instance phase then reports, both 0 when right.
Phantom seeds come from a named set of :mod:`spineps_like.phantom_sets` (seed = first seed of the set + case index):
``development`` (900000+, the phantoms clean-up and post-processing rules were tuned on) or ``test`` (2000000+, never
used for any decision). Training refuses the seeds of both sets. The report names the set it used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spineps_like.evaluation import evaluate  # noqa: E402
from spineps_like.io import Scan, atomic_write_json, atomic_write_text, load_scan  # noqa: E402
from spineps_like.labels import SEMANTIC_NAMES  # noqa: E402
from spineps_like.phantom import make_phantom  # noqa: E402
from spineps_like.phantom_sets import SETS, phantom_set  # noqa: E402
from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL, instance_phase  # noqa: E402

#: (fov, variant, mode) of the evaluation phantoms; seed = the set's first seed + index.
CASES = [
    ("lumbar", None, "t2w"), ("lumbar", None, "t2w"), ("thoracic", None, "t2w"), ("cervical", None, "t2w"),
    ("whole", None, "t2w"), ("lumbar", "block", "t2w"), ("lumbar", "collapsed", "t2w"), ("lumbar", "l6", "t2w"),
    ("whole", "t13", "t2w"), ("lumbar", "sacralised_l5", "t2w"), ("lumbar", "narrow_discs", "t2w"),
    ("lumbar", None, "random"), ("lumbar", None, "ct"),
]
#: Contrast families of the negatives (seed = the set's first seed + NEGATIVE_OFFSET + index).
NEGATIVE_FAMILIES = ("t2w", "t1w", "stir", "ct")
NEGATIVE_OFFSET = 50
SEMANTIC_LABELS = [41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 60, 61, 100, 26]
GROUP_METRICS = ["pq", "rq", "sq", "dice", "assd"]


def label_dice(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice per semantic label (50/51 counted as 49, 62 as both endplates' union is not split here); NaN if absent."""
    gt = np.where(np.isin(gt, [50, 51]), 49, gt)
    out = {}
    for lab in SEMANTIC_LABELS:
        p, g = pred == lab, gt == lab
        s = int(p.sum()) + int(g.sum())
        out[str(lab)] = float(2 * np.count_nonzero(p & g) / s) if s else float("nan")
    # structures: endplate (52/53/62 merged), posterior elements
    for name, labs in {"endplate": [52, 53, 62], "posterior": [41, 42, 43, 44, 45, 46, 47, 48]}.items():
        p, g = np.isin(pred, labs), np.isin(gt, labs)
        s = int(p.sum()) + int(g.sum())
        out[name] = float(2 * np.count_nonzero(p & g) / s) if s else float("nan")
    return out


def panoptic(pred: Scan, gt_ins: Scan, sem_pred=None, sem_gt=None) -> dict[str, float]:
    m = evaluate(pred.array, gt_ins.array, gt_ins.spacing, semantic_pred=sem_pred, semantic_gt=sem_gt)
    return {k: float(v) for k, v in m.items()}


def run_case(name: str, image: Scan, sem_gt: Scan, ins_gt: Scan, semantic_model, instance_model,
             do_semantic: bool = True) -> dict:
    from spineps_like.semantic import predict_semantic

    row: dict = {"case": name, "shape": list(image.shape), "spacing": [round(s, 3) for s in image.spacing]}
    t = time.perf_counter()
    for method in ("network", "geometric"):
        t0 = time.perf_counter()
        _, ins, _ = instance_phase(sem_gt, method=method, model=instance_model if method == "network" else None)
        row[f"instance_{method}"] = panoptic(ins, ins_gt)
        row[f"instance_{method}"]["seconds"] = time.perf_counter() - t0
    if do_semantic:
        t0 = time.perf_counter()
        sem = predict_semantic(image, semantic_model)
        row["semantic_seconds"] = time.perf_counter() - t0
        row["semantic_dice"] = label_dice(sem.array, sem_gt.array)
        sem_out, ins, _ = instance_phase(sem, method="network", model=instance_model)
        row["pipeline"] = panoptic(ins, ins_gt, sem_out.array, sem_gt.array)
    row["seconds"] = time.perf_counter() - t
    return row


def negative_cases(pset) -> list[tuple[str, Scan]]:
    """Images without a spine, drawn from the phantom set ``pset`` (deterministic): see the module docstring."""
    from spineps_like.phantom.appearance import synthesize, without_spine

    cases = []
    for k, family in enumerate(NEGATIVE_FAMILIES):
        seed = pset.seed(NEGATIVE_OFFSET + k)
        ph = make_phantom(seed, fov="lumbar", mode="t2w")
        rng = np.random.default_rng(seed)
        tissue = without_spine(ph.tissue.array, rng)
        img, _ = synthesize(tissue, rng, family=family, spacing=ph.image.spacing, normalize=False)
        cases.append((f"negative {seed} {family}", Scan(img.astype(np.float32), ph.image.affine)))
    seed = pset.seed(NEGATIVE_OFFSET + len(NEGATIVE_FAMILIES))
    ph = make_phantom(seed, fov="lumbar", mode="t2w")
    noise = np.random.default_rng(seed).normal(100.0, 20.0, ph.image.shape).astype(np.float32)
    cases.append((f"negative {seed} gaussian noise", Scan(noise, ph.image.affine)))
    return cases


def run_negative(name: str, image: Scan, semantic_model, instance_model) -> dict:
    """Spine voxels painted, vertebrae (sacrum included) reported and plausibility flags raised on an image without a
    spine (the command line exits 3 on a flagged result)."""
    from spineps_like.plausibility import result_flags
    from spineps_like.semantic import predict_semantic

    t0 = time.perf_counter()
    sem = predict_semantic(image, semantic_model)
    sem_out, ins, _ = instance_phase(sem, method="network", model=instance_model)
    ids = np.unique(ins.array)
    return {"case": name, "shape": list(image.shape), "spine_voxels": int(np.count_nonzero(sem.array)),
            "corpus_voxels": int(np.count_nonzero(sem.array == 49)),
            "vertebrae": int(np.count_nonzero((ids > 0) & (ids < 100))),
            "flags": result_flags(sem_out.array, ins.array, ins.spacing, affine=ins.affine),  # as segment does
            "seconds": time.perf_counter() - t0}


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _mean(rows: list[dict], key: str, metric: str) -> float:
    vals = [r[key][metric] for r in rows if key in r and metric in r[key] and np.isfinite(r[key][metric])]
    return float(np.mean(vals)) if vals else float("nan")


def markdown(rows: list[dict], meta: dict, negatives: list[dict] | None = None) -> str:
    ph = [r for r in rows if r["case"].startswith("phantom")]
    real = [r for r in rows if not r["case"].startswith("phantom")]
    L = [f"# Accuracy of the bundled models ({meta['date']})", "",
         f"Semantic model `{meta['semantic_model']}`, instance model `{meta['instance_model']}`; "
         f"{len(ph)} phantoms of the {meta.get('phantom_set_description', 'development set (seeds 900000+)')}, "
         "and the real TPTBox crops. "
         f"Regenerate: `{meta.get('command', '.venv/bin/python benchmarks/accuracy.py')}`.", "",
         f"## Table 2 layout (SPINEPS paper): mean over the {meta.get('phantom_set', 'development')} phantoms", "",
         "| input to the instance phase | method | vert. Dice | vert. RQ | vert. SQ | vert. PQ | vert. ASSD (mm) "
         "| IVD Dice | IVD RQ | IVD SQ | IVD PQ | endplate PQ |", "|---|---|" + "---|" * 10]
    for key, src, method in [("instance_geometric", "ground-truth semantic", "geometric (no weights)"),
                             ("instance_network", "ground-truth semantic", "network + fusion"),
                             ("pipeline", "bundled semantic model", "network + fusion")]:
        L.append(f"| {src} | {method} | " + " | ".join(
            _fmt(_mean(ph, key, f"{g}.{m}")) for g, m in [("vertebra", "dice"), ("vertebra", "rq"),
                                                           ("vertebra", "sq"), ("vertebra", "pq"),
                                                           ("vertebra", "assd"), ("ivd", "dice"), ("ivd", "rq"),
                                                           ("ivd", "sq"), ("ivd", "pq"), ("endplate", "pq")]) + " |")
    L += ["", "## Per case: vertebra PQ / RQ", "",
          "| case | shape | geometric (GT sem.) | network (GT sem.) | full pipeline | semantic s | total s |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key in ("instance_geometric", "instance_network", "pipeline"):
            cells.append(f"{_fmt(r[key]['vertebra.pq'])} / {_fmt(r[key]['vertebra.rq'])}" if key in r else "-")
        L.append(f"| {r['case']} | {r['shape']} | " + " | ".join(cells)
                 + f" | {_fmt(r.get('semantic_seconds', float('nan')))} | {r['seconds']:.1f} |")
    L += ["", "## Semantic model: Dice per label", "",
          "| label | phantoms (mean) | " + " | ".join(r["case"] for r in real) + " |",
          "|---|---|" + "---|" * len(real)]
    for lab in [str(x) for x in SEMANTIC_LABELS] + ["endplate", "posterior"]:
        name = SEMANTIC_NAMES.get(int(lab), lab) if lab.isdigit() else "(merged)"
        vals = [r["semantic_dice"][lab] for r in ph if "semantic_dice" in r and np.isfinite(r["semantic_dice"][lab])]
        L.append(f"| {lab} {name} | {_fmt(float(np.mean(vals)) if vals else float('nan'))} | "
                 + " | ".join(_fmt(r.get("semantic_dice", {}).get(lab, float("nan"))) for r in real) + " |")
    if negatives:
        L += ["", "## Negatives: images without a spine (0 is right)", "",
              "| case | shape | spine voxels painted | corpus voxels | vertebrae reported | flagged implausible |",
              "|---|---|---|---|---|---|"]
        L += [f"| {r['case']} | {r['shape']} | {r['spine_voxels']} | {r['corpus_voxels']} | {r['vertebrae']} | "
              f"{'; '.join(r['flags']) or 'no'} |" for r in negatives]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--semantic-model", default=DEFAULT_SEMANTIC_MODEL)
    ap.add_argument("--instance-model", default=DEFAULT_INSTANCE_MODEL)
    ap.add_argument("--n", type=int, default=len(CASES), help="use only the first N phantom cases")
    ap.add_argument("--set", dest="phantom_set", choices=tuple(SETS), default="development",
                    help="phantom set (spineps_like.phantom_sets): development (rules were tuned on it) or test "
                    "(never used for any decision); default development")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from spineps_like.instance.network import load_instance_model
    from spineps_like.models import find_model, load_semantic_model

    sem_model = load_semantic_model(args.semantic_model)
    ins_model = load_instance_model(find_model(args.instance_model).path)
    pset = phantom_set(args.phantom_set)
    print(f"phantoms: {pset.describe()}", flush=True)
    rows = []
    for i, (fov, variant, mode) in enumerate(CASES[: args.n]):
        seed = pset.seed(i)
        ph = make_phantom(seed, fov=fov, mode=mode, variant=variant)
        name = f"phantom {seed} {fov} {mode}" + (f" {variant}" if variant else "")
        rows.append(run_case(name, ph.image, ph.semantic, ph.instance, sem_model, ins_model))
        print(name, {k: round(rows[-1][k]["vertebra.pq"], 3) for k in ("instance_geometric", "instance_network",
                                                                        "pipeline")}, flush=True)
    from spineps_like.phantom import tptbox_sample

    for kind in ("mri", "ct"):
        paths = tptbox_sample(kind)
        image = load_scan(paths["image"])
        sem = load_scan(paths["semantic"], kind="mask")
        ins = load_scan(paths["instance"], kind="mask")
        rows.append(run_case(f"TPTBox sample_{kind} (real)", image, sem, ins, sem_model, ins_model))
        print(rows[-1]["case"], rows[-1]["semantic_dice"], flush=True)
    negatives = [run_negative(name, image, sem_model, ins_model) for name, image in negative_cases(pset)]
    for r in negatives:
        print(r, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "semantic_model": args.semantic_model,
            "instance_model": args.instance_model, "torch_threads": torch.get_num_threads(),
            "phantom_set": pset.name, "phantom_set_description": pset.describe(),
            "command": ".venv/bin/python benchmarks/accuracy.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))}
    stem = "accuracy" if pset.name == "development" else f"accuracy_{pset.name}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{stem}.json", {"meta": meta, "rows": rows, "negatives": negatives})
    atomic_write_text(args.out / f"{stem}.md", markdown(rows, meta, negatives))
    print((args.out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
