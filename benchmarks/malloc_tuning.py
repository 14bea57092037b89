"""glibc malloc tuning (``spineps_like.runtime.tune_allocator``) against glibc's defaults, as a cohort worker sees it:
one process, models loaded once, a lumbar phantom, a whole-spine phantom and the 512 x 512 x 20 sagittal scan in turn,
three rounds; seconds per scan, resident and peak memory after each.

    .venv/bin/python benchmarks/malloc_tuning.py     # writes benchmarks/results/malloc_tuning.{json,md}

Each setting runs in its own fresh process (malloc settings are process-wide), defaults first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from spineps_like.runtime import tune_allocator
applied = tune_allocator()
sys.path.insert(0, "benchmarks")
from semantic_speed import make_scan
from spineps_like.instance.network import load_instance_model
from spineps_like.models import find_model, load_semantic_model
from spineps_like.phantom import make_phantom
from spineps_like.pipeline import segment
sem, ins = load_semantic_model("semantic-phantom"), load_instance_model(find_model("instance-phantom").path)
scans = {"lumbar": make_phantom(900100, fov="lumbar", mode="t2w", orientation="PIR").image,
         "whole": make_phantom(900101, fov="whole", mode="t2w", orientation="PIR").image, "sagittal512": make_scan(0)}
def mem():
    return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))}
rows = []
for name in ["lumbar", "whole", "sagittal512"] * 3:
    t = time.perf_counter()
    segment(scans[name], semantic_model=sem, instance_model=ins)
    rows.append({"scan": name, "seconds": time.perf_counter() - t, **mem()})
print(json.dumps({"malloc_tuning": applied, "rows": rows}))
"""


def main() -> int:
    runs = {}
    for setting, flag in (("glibc defaults", "0"), ("tuned", "1")):
        env = dict(os.environ, SPINEPS_LIKE_MALLOC_TUNING=flag)
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env,
                             check=True)
        runs[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        print(setting, runs[setting], flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "malloc_tuning.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": load, "runs": runs}, indent=2) + "\n")
    d, t = runs["glibc defaults"]["rows"], runs["tuned"]["rows"]
    lines = [f"# glibc malloc tuning vs defaults, one process, models loaded ({time.strftime('%Y-%m-%d')}, "
             f"load average after: {' '.join(load)}; tuned = {runs['tuned']['malloc_tuning']})", "",
             "| # | scan | defaults s | tuned s | tuned / defaults | defaults RSS / peak MB | tuned RSS / peak MB |",
             "|---|---|---|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(d, t)):
        lines.append(f"| {i + 1} | {a['scan']} | {a['seconds']:.2f} | {b['seconds']:.2f} | "
                     f"{b['seconds'] / a['seconds']:.2f} | {a['VmRSS']:.0f} / {a['VmHWM']:.0f} | "
                     f"{b['VmRSS']:.0f} / {b['VmHWM']:.0f} |")
    sd, st = sum(r["seconds"] for r in d), sum(r["seconds"] for r in t)
    lines.append(f"| all | | {sd:.1f} | {st:.1f} | {st / sd:.2f} | | |")
    (res / "malloc_tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
