"""Render time of the cohort report (issue 30: a 1,000-scan manifest renders in <= 5 s).

Builds a cohort output folder of synthetic rows: a real ``cohort.sqlite`` (via :class:`Manifest`) with N scans,
~90% done (each with a summary JSON: T10-S1, random volumes, some cut, low-confidence, unanchored or implausible,
a few volume outliers), ~7% failed with one-line errors, the rest pending; then times
:func:`spineps_like.cohort.report.write_report` (reading the manifest and every summary, plots, HTML) and prints
the size of the file. Thumbnails link to one small PNG shared by every done scan (the report only links them).

    .venv/bin/python benchmarks/cohort_report.py            # 1,000 scans, 3 repeats
    .venv/bin/python benchmarks/cohort_report.py --n 5000 --keep /tmp/big-cohort
    .venv/bin/python benchmarks/cohort_report.py --browser     # + load/sort/filter times in headless chromium
    .venv/bin/python benchmarks/cohort_report.py --screenshot /tmp/report.png   # needs chromium
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spineps_like.cohort.discover import ScanEntry
from spineps_like.cohort.manifest import Manifest
from spineps_like.cohort.report import write_report
from spineps_like.labels import VERTEBRA_NAME_TO_ID

LEVELS = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
MEAN_CM3 = {"T10": 28, "T11": 31, "T12": 34, "L1": 38, "L2": 41, "L3": 44, "L4": 46, "L5": 47, "S1": 160}


def synthetic_cohort(out: Path, n: int, seed: int = 0) -> Path:
    """A cohort output folder of ``n`` synthetic scans (see the module docstring); returns ``out``."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "thumb_snp.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(3.6, 1.7), dpi=50)
    fig.text(0.5, 0.5, "QC picture", ha="center")
    fig.savefig(png)
    plt.close(fig)
    entries = [ScanEntry(Path(f"/data/sub-{i:05d}/anat/sub-{i:05d}_T2w.nii.gz"), out / "derivatives_seg" / f"sub-{i:05d}",
                         f"sub-{i:05d}/sub-{i:05d}_T2w") for i in range(n)]
    states = rng.choice(["done", "failed", "pending"], size=n, p=[0.9, 0.07, 0.03])
    with Manifest(out / "cohort.sqlite") as m:
        m.add(entries)
        for e, state in zip(entries, states):
            if state == "pending":
                continue
            m.mark_running(e.key, "w0", None)
            secs = float(rng.gamma(4.0, 2.0))
            if state == "failed":
                m.mark_failed(e.key, f"ScanError: {e.path}: not a readable image (no NIfTI header)", seconds=secs)
                continue
            e.out_dir.mkdir(parents=True, exist_ok=True)
            top = int(rng.integers(0, 3))
            rows = []
            for k, name in enumerate(LEVELS[top:] + ["S1"]):
                vol = MEAN_CM3[name] * float(rng.normal(1.0, 0.08)) * (0.4 if rng.random() < 0.01 else 1.0)
                rows.append({"id": VERTEBRA_NAME_TO_ID[name], "name": name, "volume_mm3": round(vol * 1000, 2),
                             "complete": None if name == "S1" else k > 0,
                             "truncated_by": [] if k > 0 else ["top"],
                             "confidence": {"level": "low" if rng.random() < 0.03 else "high",
                                            "id": {"level": "high", "why": "counted from the sacrum"},
                                            "body": {"level": "high", "why": "one body"}}})
            ivds = [{"id": 100 + VERTEBRA_NAME_TO_ID[nm], "name": f"IVD {nm}",
                     "volume_mm3": round(MEAN_CM3[nm] * 250 * float(rng.normal(1, 0.1)), 2)} for nm in LEVELS[top:]]
            anchor = "none" if rng.random() < 0.02 else "sacrum"
            flags = ["L3: vertebral body of 190.0 cm3, outside 5-150 cm3 for the region"] if rng.random() < 0.01 else []
            summary = {"vertebrae": rows, "ivds": ivds, "labeling": {"anchor": anchor, "ambiguous": anchor == "none",
                                                                    "notes": []},
                       "plausibility": {"plausible": not flags, "flags": flags, "advisories": []}}
            sp = e.out_dir / "summary.json"
            sp.write_text(json.dumps(summary))
            timings = {"load": 0.4, "semantic": secs * 0.7, "instance": secs * 0.2, "write": secs * 0.1}
            m.mark_done(e.key, outputs={"summary": {"path": str(sp), "sha256": "", "bytes": 0},
                                        "snapshot": {"path": str(png), "sha256": "", "bytes": 0}},
                        seconds=secs, timings=timings)
    return out


def browser_times(path: Path) -> None:
    """Print the page's load time and the time of a sort and a filter in headless chromium (the DevTools client of
    tests/test_cohort_report.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_cohort_report import Chromium

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("no chromium: no browser timings", file=sys.stderr)
        return
    b = Chromium(exe)
    try:
        t0 = time.perf_counter()
        b.call("Page.navigate", session=True, url=path.resolve().as_uri())
        b.wait_event("Page.loadEventFired")
        load = time.perf_counter() - t0
        n = b.js("document.querySelectorAll('#scans tbody tr').length")
        sort = [b.js("(function(){var t=performance.now();document.querySelectorAll('#scans thead th')[%d].click();"
                     "return performance.now()-t})()" % col) for col in (6, 6, 3, 1)]
        filt = b.js("(function(){var t=performance.now();var q=document.getElementById('q');q.value='low conf';"
                    "q.dispatchEvent(new Event('input'));return performance.now()-t})()")
        print(f"chromium: {n} rows, load event after {load:.2f} s; sort {max(sort):.0f} ms at most "
              f"({', '.join(f'{s:.0f}' for s in sort)} ms), text filter {filt:.0f} ms")
    finally:
        b.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="scans in the synthetic manifest (default 1000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=Path, default=None, help="build the cohort here and keep it (default: a temp dir)")
    p.add_argument("--browser", action="store_true",
                   help="also time loading, sorting and filtering the page in headless chromium (DevTools on a pipe)")
    p.add_argument("--screenshot", type=Path, default=None, help="also a PNG of the page in headless chromium")
    args = p.parse_args(argv)
    tmp = None
    if args.keep is None:
        tmp = tempfile.mkdtemp(prefix="cohort-report-bench-")
        out = Path(tmp)
    else:
        out = args.keep
    try:
        t0 = time.perf_counter()
        synthetic_cohort(out, args.n)
        print(f"synthetic cohort of {args.n} scans built in {time.perf_counter() - t0:.1f} s ({out})")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            path = write_report(out)
            times.append(time.perf_counter() - t0)
        print(f"write_report, {args.n} scans: best {min(times):.2f} s, median {np.median(times):.2f} s over "
              f"{args.repeats} ({path.stat().st_size / 1e6:.2f} MB); target <= 5 s: "
              f"{'met' if min(times) <= 5.0 else 'MISSED'}")
        if args.browser:
            browser_times(path)
        if args.screenshot is not None:
            exe = shutil.which("chromium") or shutil.which("chromium-browser")
            if exe is None:
                print("no chromium: no screenshot", file=sys.stderr)
                return 1
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1400,1100", "--virtual-time-budget=10000",
                            f"--screenshot={args.screenshot.resolve()}", path.resolve().as_uri()],
                           check=True, capture_output=True, timeout=120)
            print(f"screenshot: {args.screenshot}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
