"""Cohort throughput (scans/min): 1 vs 2 local workers and Ray, on small lumbar phantoms.

Per scan: load the image, run a tiny random-weight nnU-Net semantic model through the real sliding-window
machinery (``--work semantic``), or the weights-free instance phase on the ground-truth semantic mask
(``--work geometric``), write the outputs atomically, checksum them, record the manifest. Each configuration runs
on a fresh output folder. Two rates are reported: ``wall`` (whole run, worker start-up included) and ``steady``
(after each worker's first scan, from the manifest's finish times). The machine's load average is recorded,
because other jobs share the cores.

    python benchmarks/cohort_throughput.py [--n 12] [--work semantic] [--configs local1 local2 ray2]
        [--out benchmarks/results/cohort_throughput.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "local1": {"executor": "local", "workers": 1},
    "local2": {"executor": "local", "workers": 2},
    "ray1": {"executor": "ray", "workers": 1},
    "ray2": {"executor": "ray", "workers": 2},
}


def prepare(work: Path, n: int) -> tuple[Path, Path]:
    """n phantoms + a CSV listing them with their semantic masks; a tiny random semantic model."""
    from spineps_like.phantom import write_phantoms
    from spineps_like.training.semantic import write_random_model

    images = write_phantoms(work / "ds", n, seed=0, fov="lumbar", spacing=(2.0, 2.0, 4.0), orientation="random",
                            snapshot=False)
    lst = work / "list.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "semantic_mask"])
        for img in images:
            mask = next((work / "ds" / "derivatives_gt" / img.parent.parent.name).glob("*_seg-spine_msk.nii.gz"))
            w.writerow([img, mask])
    model = write_random_model(work / "model", labels=(41, 49, 60, 61, 100), spacing_pir=(2.0, 2.0, 4.0),
                               patch_pir=(64, 96, 32), resolution_range=((2.0, 2.0, 4.0), (2.0, 2.0, 4.0)))
    return lst, model


def steady_rate(db: Path, workers: int) -> float | None:
    """Scans/min after every worker has finished its first scan (from the manifest)."""
    with sqlite3.connect(db) as c:
        t = sorted(r[0] for r in c.execute("SELECT finished_at FROM scans WHERE state = 'done'"))
    if len(t) <= workers:
        return None
    return 60.0 * (len(t) - workers) / max(t[-1] - t[workers - 1], 1e-9)


def run_config(name: str, lst: Path, model: Path, work: Path, mode: str, threads: int) -> dict:
    from spineps_like.cohort import Cohort

    cfg = CONFIGS[name]
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    if mode == "semantic":
        inputs, settings = str(lst.parent / "ds"), {"semantic_model": str(model), "semantic_only": True,
                                                    "step_size": 1.0}
    else:
        inputs, settings = str(lst), {"instance_method": "geometric"}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if cfg["executor"] == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        summary = Cohort(inputs, out, workers=cfg["workers"], executor=cfg["executor"], threads=threads,
                         snapshot=False, **settings).run(progress=False)
    finally:
        if cfg["executor"] == "ray":
            ray.shutdown()
    wall = time.perf_counter() - t0
    run = summary["run"]
    return {"config": name, **cfg, "threads_per_worker": threads, "scans": run["done"], "failed": run["failed"],
            "wall_seconds": round(wall, 2), "scans_per_min_wall": round(60.0 * run["done"] / wall, 2),
            "scans_per_min_steady": round(steady_rate(out / "cohort.sqlite", cfg["workers"]) or 0.0, 2),
            "mean_worker_seconds_per_scan": summary["mean_seconds_per_scan"],
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="scans per configuration")
    ap.add_argument("--work", dest="mode", default="semantic", choices=["semantic", "geometric"])
    ap.add_argument("--configs", nargs="+", default=["local1", "local2", "ray2"], choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cohort_throughput.json")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    lst, model = prepare(work, args.n)
    results = []
    for name in args.configs:
        r = run_config(name, lst, model, work, args.mode, args.threads)
        results.append(r)
        print(f"{name:7s} {r['scans']} scans  wall {r['wall_seconds']:6.1f} s  {r['scans_per_min_wall']:6.1f} "
              f"scans/min (steady {r['scans_per_min_steady']:6.1f})  load {r['loadavg_before'][0]:.1f}",
              flush=True)
    base = next((r for r in results if r["config"] == "local1"), None)
    scaling = {}
    if base:
        for r in results:
            if r is not base:
                scaling[f"{r['config']}/local1"] = {
                    "wall": round(r["scans_per_min_wall"] / max(base["scans_per_min_wall"], 1e-9), 2),
                    "steady": round(r["scans_per_min_steady"] / max(base["scans_per_min_steady"], 1e-9), 2)}
    import torch

    doc = {"benchmark": "cohort_throughput", "work": args.mode, "n_scans": args.n,
           "scan": "lumbar T2w phantom, 2 x 2 x 4 mm, ~110 x 170 x 26 voxels",
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                       "torch": torch.__version__},
           "ray": _version("ray"), "results": results, "scaling": scaling,
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from spineps_like.io import atomic_write_json

    atomic_write_json(args.out, doc)
    print(json.dumps(scaling))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True) if args.workdir is None else None
    return 0


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
