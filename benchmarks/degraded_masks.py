"""Degraded-mask suite (issue 27): how the instance phase holds up when the semantic mask is wrong.

    .venv/bin/python benchmarks/degraded_masks.py            # defaults: benchmarks/results/degraded_masks.{md,json}
    .venv/bin/python benchmarks/degraded_masks.py --n 2 --severity mild moderate severe --methods geometric
    .venv/bin/python benchmarks/degraded_masks.py --severity moderate merge_bodies=1,2,3 sacrum_as_corpus=1

Development-set phantoms (:mod:`spineps_like.phantom_sets`, seed = 900000 + the case's index in
``benchmarks/accuracy.py``'s CASES, so case k is the same anatomy there and here; lumbar and whole-spine first) are
generated in PIR. Each degradation of :mod:`spineps_like.evaluation.degrade` at each severity paints its errors into
the exact semantic mask; :func:`spineps_like.pipeline.instance_phase` turns the degraded mask into instances
(``network``: the bundled instance model; ``geometric``: no weights), which are scored against the exact instance mask:

- vertebra PQ / RQ: the SPINEPS protocol (:func:`spineps_like.evaluation.evaluate`, panoptica; IoU >= 0.5);
- id accuracy: the fraction of ground-truth vertebrae whose matched prediction (IoU >= 0.5) carries the same
  anatomical id (the protocol's ``vertebra.id_rate``);
- false L6 / T13: predicted ids 25 / 28 the ground truth does not hold;
- instances spanning more than two bodies: predicted vertebra (or sacrum) instances holding at least half of the
  body voxels (corpus + endplates) of more than two ground-truth vertebrae.

``--severity`` takes level names (``mild``, ``moderate``, ``severe``: :data:`~spineps_like.evaluation.degrade.LEVELS`,
``all`` for the three) and ``NAME=V[,V...]`` for extra severities of one degradation. Severity 0 (no degradation)
runs once per phantom as the baseline. Issue 27's targets are checked in the report: at moderate severity, vertebra
RQ >= 0.95 and id accuracy >= 0.95 per degradation; merged across up to 3 discs, RQ 1.0 on every lumbar phantom; no
instance spanning more than two bodies; no false L6/T13.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spineps_like.evaluation import evaluate  # noqa: E402
from spineps_like.evaluation.degrade import DEGRADATIONS, LEVELS, UNITS, body_ids, degrade  # noqa: E402
from spineps_like.geometry import bbox  # noqa: E402
from spineps_like.io import Scan, atomic_write_json, atomic_write_text  # noqa: E402
from spineps_like.phantom import make_phantom  # noqa: E402
from spineps_like.phantom_sets import DEVELOPMENT  # noqa: E402
from spineps_like.pipeline import INSTANCE_METHODS, instance_phase  # noqa: E402

#: (index into accuracy.py's CASES = seed offset, fov, variant, mode): lumbar and whole spine first, plain anatomy
#: before the variants; ``--n N`` takes the first N.
PHANTOMS = [
    (0, "lumbar", None, "t2w"), (1, "lumbar", None, "t2w"), (4, "whole", None, "t2w"), (11, "lumbar", None, "random"),
    (12, "lumbar", None, "ct"), (7, "lumbar", "l6", "t2w"), (8, "whole", "t13", "t2w"),
    (9, "lumbar", "sacralised_l5", "t2w"), (10, "lumbar", "narrow_discs", "t2w"), (5, "lumbar", "block", "t2w"),
    (6, "lumbar", "collapsed", "t2w"), (2, "thoracic", None, "t2w"), (3, "cervical", None, "t2w"),
]
DEFAULT_SEVERITY = ["moderate", "merge_bodies=1,2,3", "sacrum_as_corpus=1"]
TRANSITIONAL = {25: "L6", 28: "T13"}
RQ_TARGET, ID_TARGET = 0.95, 0.95
MERGE_TARGET_DISCS = 3


def parse_severities(tokens: list[str], names: list[str]) -> dict[str, list[float]]:
    """{degradation: sorted severities} from level names and ``NAME=V,...`` tokens."""
    out: dict[str, set[float]] = {n: set() for n in names}
    for tok in tokens:
        if "=" in tok:
            name, vals = tok.split("=", 1)
            if name not in DEGRADATIONS:
                raise SystemExit(f"--severity {tok}: unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)}")
            if name in out:
                out[name] |= {float(v) for v in vals.split(",") if v}
            continue
        for level in (list(LEVELS) if tok == "all" else [tok]):
            if level not in LEVELS:
                raise SystemExit(f"--severity {tok}: not a level ({', '.join(LEVELS)}, all) nor NAME=V[,V...]")
            for n in names:
                out[n].add(float(LEVELS[level][n]))
    return {n: sorted(v) for n, v in out.items() if v}


def level_of(name: str, severity: float) -> str:
    """The level names whose severity for ``name`` is ``severity`` ('mild/moderate'), or ''."""
    return "/".join(lv for lv, table in LEVELS.items() if float(table[name]) == severity)


def case_rng(base: int, phantom_seed: int, name: str, severity: float) -> np.random.Generator:
    """The degradation's generator: a function of the run's seed, the phantom, the degradation and the severity."""
    return np.random.default_rng([base, phantom_seed, zlib.crc32(name.encode()), int(round(severity * 1000))])


def body_spans(pred: np.ndarray, gt_body: np.ndarray) -> dict[int, list[int]]:
    """{predicted vertebra/sacrum id: ground-truth vertebrae at least half of whose body voxels it holds}."""
    n_gt = np.bincount(gt_body.ravel(), minlength=29)
    sel = gt_body > 0
    p, g = pred[sel].astype(np.int64), gt_body[sel].astype(np.int64)
    p = np.where(p > 200, p - 200, p)  # a predicted endplate 200+v belongs to vertebra v
    p[p > 28] = 0  # discs
    joint = np.bincount(p * 29 + g, minlength=29 * 29).reshape(29, 29)
    out: dict[int, list[int]] = {}
    for pid in range(1, 29):
        held = [int(v) for v in np.flatnonzero(joint[pid] * 2 >= n_gt) if v > 0 and n_gt[v] > 0]
        if held:
            out[pid] = held
    return out


def id_accuracy(pred: np.ndarray, gt: np.ndarray, ids: list[int]) -> float:
    """Fraction of the vertebrae ``ids`` whose same-id prediction overlaps the ground truth with IoU >= 0.5."""
    if not ids:
        return float("nan")
    n = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    joint = np.bincount(pred.astype(np.int64).ravel() * n + gt.astype(np.int64).ravel(), minlength=n * n)
    joint = joint.reshape(n, n)
    hits = 0
    for v in ids:
        inter = joint[v, v]
        union = joint[v, :].sum() + joint[:, v].sum() - inter
        hits += bool(union and inter / union >= 0.5)
    return hits / len(ids)


def score(pred: np.ndarray, gt: np.ndarray, gt_body: np.ndarray, spacing, complete: list[int]) -> dict:
    """Vertebra PQ/RQ/SQ, TP/FP/FN, id accuracy (all ground-truth vertebrae; those the field of view does not cut),
    false L6/T13 and instances spanning > 2 bodies."""
    box = bbox((pred > 0) | (gt > 0), margin=2) or tuple(slice(0, n) for n in gt.shape)
    m = evaluate(pred[box], gt[box], spacing)
    pred_ids = sorted(int(v) for v in np.unique(pred) if 0 < v <= 28)
    gt_ids = sorted(int(v) for v in np.unique(gt) if 0 < v <= 28)
    spans = body_spans(pred, gt_body)
    return {
        "pq": m["vertebra.pq"], "rq": m["vertebra.rq"], "sq": m["vertebra.sq"], "tp": int(m["vertebra.tp"]),
        "fp": int(m["vertebra.fp"]), "fn": int(m["vertebra.fn"]), "id_acc": m["vertebra.id_rate"],
        "id_acc_complete": id_accuracy(pred[box], gt[box], complete),
        "ivd_pq": m["ivd.pq"],
        "false_transitional": [TRANSITIONAL[v] for v in TRANSITIONAL if v in pred_ids and v not in gt_ids],
        "spanning": {str(k): v for k, v in spans.items() if len(v) > 2},
        "pred_ids": pred_ids, "gt_ids": gt_ids,
    }


def run(args) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = None
    if "network" in args.methods:
        from spineps_like.instance.network import load_instance_model
        from spineps_like.models import find_model

        model = load_instance_model(find_model(args.instance_model).path)
    severities = parse_severities(args.severity, args.degradations)
    rows: list[dict] = []
    for index, fov, variant, mode in PHANTOMS[: args.n]:
        seed = DEVELOPMENT.seed(index)
        ph = make_phantom(seed, fov=fov, mode=mode, variant=variant, orientation="PIR")
        sem, gt = ph.semantic.array, ph.instance.array
        spacing = ph.semantic.spacing
        gt_body = body_ids(sem, gt).astype(np.int64)
        complete = [v["id"] for v in ph.meta["vertebrae"] if not v["cut"] and v["id"] != 26]
        pname = f"{seed} {fov}" + (f" {variant}" if variant else "")
        jobs = [("none", 0.0)] + [(n, s) for n, sevs in severities.items() for s in sevs]
        for name, sev in jobs:
            t0 = time.perf_counter()
            deg = sem if name == "none" else degrade(name, sem, gt, spacing, sev, case_rng(args.seed, seed, name, sev))
            row = {"phantom": pname, "seed": seed, "fov": fov, "variant": variant, "degradation": name,
                   "severity": sev, "level": level_of(name, sev) if name != "none" else "",
                   "changed_voxels": int(np.count_nonzero(deg != sem)), "degrade_s": time.perf_counter() - t0}
            for method in args.methods:
                t1 = time.perf_counter()
                _, ins, _ = instance_phase(Scan(deg, ph.semantic.affine), method=method,
                                           model=model if method == "network" else None)
                t2 = time.perf_counter()
                row[method] = score(ins.array, gt, gt_body, spacing, complete)
                row[method].update(instance_s=round(t2 - t1, 2), score_s=round(time.perf_counter() - t2, 2))
            rows.append(row)
            print(f"{pname:28s} {name:27s} {sev:5g} " + "  ".join(
                f"{m}: PQ {row[m]['pq']:.3f} RQ {row[m]['rq']:.3f} id {row[m]['id_acc']:.3f}"
                + (f" false {row[m]['false_transitional']}" if row[m]["false_transitional"] else "")
                + (f" spans {row[m]['spanning']}" if row[m]["spanning"] else "") for m in args.methods), flush=True)
    return rows, severities


# ---------------------------------------------------------------- report
def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def _mean(vals) -> float:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def aggregate(rows: list[dict], methods: list[str]) -> list[dict]:
    """One entry per (degradation, severity, method): means over phantoms, counts summed, issue-27 target check."""
    out = []
    keys = list(dict.fromkeys((r["degradation"], r["severity"]) for r in rows))
    for name, sev in keys:
        group = [r for r in rows if (r["degradation"], r["severity"]) == (name, sev)]
        for m in methods:
            s = [r[m] for r in group]
            lumbar = [r[m]["rq"] for r in group if r["fov"] == "lumbar"]
            entry = {"degradation": name, "severity": sev, "level": group[0]["level"], "method": m,
                     "phantoms": len(group), "pq": _mean([x["pq"] for x in s]), "rq": _mean([x["rq"] for x in s]),
                     "id_acc": _mean([x["id_acc"] for x in s]),
                     "id_acc_complete": _mean([x["id_acc_complete"] for x in s]),
                     "min_rq_lumbar": min(lumbar) if lumbar else float("nan"),
                     "false_transitional": sum(len(x["false_transitional"]) for x in s),
                     "spanning": sum(len(x["spanning"]) for x in s)}
            misses = []
            if entry["false_transitional"]:
                misses.append("false L6/T13")
            if entry["spanning"]:
                misses.append("> 2 bodies")
            if "moderate" in entry["level"].split("/") and name != "combined":
                if not entry["rq"] >= RQ_TARGET:
                    misses.append(f"RQ < {RQ_TARGET}")
                if not entry["id_acc"] >= ID_TARGET:
                    misses.append(f"id < {ID_TARGET}")
            if name == "merge_bodies" and 0 < sev <= MERGE_TARGET_DISCS and lumbar and min(lumbar) < 1.0:
                misses.append("lumbar RQ < 1")
            entry["misses"] = misses
            out.append(entry)
    return out


def markdown(rows: list[dict], agg: list[dict], meta: dict) -> str:
    methods = meta["methods"]
    phantoms = list(dict.fromkeys(r["phantom"] for r in rows))
    L = [f"# Degraded-mask suite (issue 27), {meta['date']}", "",
         f"Command: `{meta['command']}`", "",
         f"Code: commit {meta['commit']}{' + uncommitted changes' if meta['dirty'] else ''}; instance model "
         f"`{meta['instance_model']}`; {meta['torch_threads']} torch threads; {meta['seconds']:.0f} s in all.", "",
         f"Phantoms ({len(phantoms)}, {DEVELOPMENT.describe()}, generated in PIR): " + ", ".join(phantoms) + ".", "",
         "Each degradation (`spineps_like/evaluation/degrade.py`) changes only the semantic mask fed to "
         "`instance_phase`; scores are against the exact instance mask. PQ/RQ: vertebrae, SPINEPS protocol "
         "(panoptica, IoU >= 0.5), mean over phantoms; *min RQ lumbar*: the lowest RQ of a lumbar phantom; "
         "id acc.: fraction of ground-truth vertebrae whose matched prediction has the right anatomical id, mean over "
         "phantoms; *id acc. complete*: the same over the vertebrae the field of view does not cut; *false L6/T13*: predicted ids 25/28 absent from the ground truth (summed); *> 2 bodies*: "
         "predicted instances holding half or more of the body of more than two ground-truth vertebrae (summed). "
         f"*Missed*: issue 27's targets (moderate severity: RQ >= {RQ_TARGET} and id acc. >= {ID_TARGET}; "
         f"merge across 1-{MERGE_TARGET_DISCS} discs: RQ 1.0 on every lumbar phantom; everywhere: no false L6/T13, "
         "no instance over two bodies).", "",
         "| degradation | severity | level | method | vert. PQ | vert. RQ | min RQ lumbar | id acc. | id acc. complete "
         "| false L6/T13 | > 2 bodies | missed |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in agg:
        unit = UNITS.get(e["degradation"], "")
        sev = "0" if e["degradation"] == "none" else f"{e['severity']:g} ({unit})"
        L.append(f"| {e['degradation']} | {sev} | {e['level']} | {e['method']} | {_fmt(e['pq'])} | {_fmt(e['rq'])} | "
                 f"{_fmt(e['min_rq_lumbar'])} | {_fmt(e['id_acc'])} | {_fmt(e['id_acc_complete'])} | "
                 f"{e['false_transitional']} | {e['spanning']} | {', '.join(e['misses']) or '-'} |")
    missed = [e for e in agg if e["misses"]]
    L += ["", "## Targets missed", ""]
    if not missed:
        L.append("None.")
    for e in missed:
        L.append(f"- {e['method']}, {e['degradation']} {e['severity']:g}: {', '.join(e['misses'])} "
                 f"(RQ {_fmt(e['rq'])}, id acc. {_fmt(e['id_acc'])}, complete {_fmt(e['id_acc_complete'])}, "
                 f"min lumbar RQ {_fmt(e['min_rq_lumbar'])})")
    L += ["", "## Per phantom: vertebra PQ / RQ / id acc. (TP, FP, FN; predicted and true ids are in the JSON)", "",
          "| degradation | severity | phantom | changed voxels | " + " | ".join(methods) + " |",
          "|---|---|---|---|" + "---|" * len(methods)]
    for r in rows:
        cells = []
        for m in methods:
            s = r[m]
            extra = (f" false {'/'.join(s['false_transitional'])}" if s["false_transitional"] else "") + \
                (f" spans {s['spanning']}" if s["spanning"] else "")
            cells.append(f"{_fmt(s['pq'])} / {_fmt(s['rq'])} / {_fmt(s['id_acc'])} (TP {s['tp']} FP {s['fp']} "
                         f"FN {s['fn']}){extra}")
        L.append(f"| {r['degradation']} | {r['severity']:g} | {r['phantom']} | {r['changed_voxels']} | "
                 + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="phantoms: the first N of PHANTOMS (default 4: three lumbar, "
                    "one whole spine)")
    ap.add_argument("--severity", nargs="+", default=DEFAULT_SEVERITY,
                    help="level names (mild, moderate, severe, all) and NAME=V[,V...] (default: "
                    + " ".join(DEFAULT_SEVERITY) + ")")
    ap.add_argument("--degradations", nargs="+", default=list(DEGRADATIONS), choices=list(DEGRADATIONS),
                    metavar="NAME", help="which degradations (default all)")
    ap.add_argument("--methods", nargs="+", default=list(INSTANCE_METHODS), choices=list(INSTANCE_METHODS))
    ap.add_argument("--instance-model", default="instance-phantom")
    ap.add_argument("--seed", type=int, default=0, help="seed of the degradations' random choices (default 0)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "degraded_masks.md",
                    help="markdown report; the JSON goes beside it (default benchmarks/results/degraded_masks.md)")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= len(PHANTOMS):
        ap.error(f"--n must be 1-{len(PHANTOMS)}")
    t0 = time.perf_counter()
    # the code measured is the code imported now: its commit is read before the run, not after
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "spineps_like", "models"))
    rows, severities = run(args)
    import torch

    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([".venv/bin/python benchmarks/degraded_masks.py",
                                                                    *argv_used]),
            "commit": commit, "dirty": dirty,
            "instance_model": args.instance_model, "methods": args.methods, "severities": severities,
            "levels": LEVELS, "seed": args.seed, "torch_threads": torch.get_num_threads(),
            "phantom_set": DEVELOPMENT.describe(), "seconds": time.perf_counter() - t0}
    agg = aggregate(rows, args.methods)
    out = args.out if args.out.suffix == ".md" else args.out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "summary": agg, "rows": rows})
    atomic_write_text(out, markdown(rows, agg, meta))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
