"""Time the semantic phase and its peak memory on a 512 x 512 x 20 sagittal scan, with and without mirroring.

Configurations: plain (defaults: no mirroring, probabilities interpolated back to the input grid), nearest (labels
moved back by nearest neighbour, as SPINEPS does), mirroring, n4.

Each configuration runs in its own process (peak RSS is per process), after one warm-up prediction on the same scan.
The scan is a lumbar T2w phantom at 0.5 x 0.5 x 4 mm (P, I, R), cropped/padded to 512 x 512 x 20 and stored RAS-like
(R, A, S) as a scanner would write a sagittal series. Results go to ``--out`` as JSON and are printed as a table.

    python benchmarks/semantic_speed.py --model spineps_like_semantic [--threads 2] [--out benchmarks/results/semantic_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "plain": {"mirroring": False},
    "nearest": {"mirroring": False, "restore": "nearest"},  # SPINEPS' label resampling back to the input grid
    "mirroring": {"mirroring": True},
    "n4": {"mirroring": False, "n4": True},
}


def make_scan(seed: int = 0):
    """A 512 x 512 x 20 sagittal T2w-like scan (phantom when available, else smooth noise), stored R, A, S."""
    import numpy as np

    from spineps_like.geometry import reorient
    from spineps_like.io import Scan

    shape = (512, 512, 20)  # P, I, R
    try:
        from spineps_like.phantom import make_phantom

        ph = make_phantom(seed, fov="lumbar", mode="t2w", spacing=(0.5, 0.5, 4.0), orientation="PIR")
        src = ph.image
    except ImportError:
        rng = np.random.default_rng(seed)
        aff = np.array([[0, 0, 4.0, 0], [-0.5, 0, 0, 0], [0, -0.5, 0, 0], [0, 0, 0, 1.0]])  # P, I, R axes
        src = Scan(rng.gamma(2.0, 100.0, shape).astype(np.float32), aff)
    arr = np.zeros(shape, np.float32)
    sl_src, sl_dst = [], []
    for n_src, n_dst in zip(src.shape, shape):
        c = min(n_src, n_dst)
        a, b = (n_src - c) // 2, (n_dst - c) // 2
        sl_src.append(slice(a, a + c))
        sl_dst.append(slice(b, b + c))
    arr[tuple(sl_dst)] = src.array[tuple(sl_src)]
    aff = src.affine.copy()
    aff[:3, 3] = src.affine[:3, :3] @ np.array([s.start - d.start for s, d in zip(sl_src, sl_dst)]) + src.affine[:3, 3]
    return reorient(Scan(arr, aff), "RAS")


def run_one(model: str, config: str, threads: int, scan_path: str) -> dict:
    """Load the model and the scan, warm up, time one prediction; report seconds per step and peak RSS (MB)."""
    import resource
    import warnings

    import torch

    torch.set_num_threads(threads)
    from spineps_like.io import load_scan
    from spineps_like.models import load_semantic_model
    from spineps_like.semantic import predict_semantic

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load_semantic_model(model)
    load_s = time.perf_counter() - t0
    scan = load_scan(scan_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    predict_semantic(scan, m, **CONFIGS[config])  # warm-up
    timings: dict = {}
    out = predict_semantic(scan, m, timings=timings, **CONFIGS[config])
    return {
        "config": config,
        "shape": list(scan.shape),
        "spacing": [round(s, 3) for s in scan.spacing],
        "load_s": round(load_s, 2),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_predict_mb": round(rss_before, 1),
        "labels_found": sorted(int(v) for v in set(out.array.ravel().tolist())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model name or folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "semantic_speed.json")
    p.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.model, a.one[0], a.threads, a.one[1])))
        return 0
    import tempfile

    from spineps_like.io import save_scan

    tmp = tempfile.TemporaryDirectory()
    scan_path = save_scan(make_scan(), Path(tmp.name) / "sag_T2w.nii.gz")  # generated once, outside the timed runs
    results = []
    for c in a.configs:
        r = subprocess.run([sys.executable, __file__, "--model", a.model, "--threads", str(a.threads),
                            "--one", c, str(scan_path)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "semantic phase, 512x512x20 sagittal scan",
        "model": a.model,
        "threads": a.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    from spineps_like.io import atomic_write_json

    atomic_write_json(a.out, report)
    print(f"{'config':10s} {'total s':>8s} {'predict s':>9s} {'restore s':>9s} {'n4 s':>6s} {'peak RSS MB':>11s}")
    for r in results:
        t = r["timings_s"]
        print(f"{r['config']:10s} {t['total']:8.2f} {t['predict']:9.2f} {t['restore']:9.2f} {t.get('n4', 0):6.2f} "
              f"{r['peak_rss_mb']:11.0f}")
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
