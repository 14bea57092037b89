"""Per-phase seconds and peak memory of the whole pipeline on CPU: a lumbar and a whole-spine phantom, and a
512 x 512 x 20 sagittal scan (the lumbar phantom at 0.5 x 0.5 x 4 mm stored R, A, S, as in semantic_speed.py).

    .venv/bin/python benchmarks/pipeline_speed.py      # writes benchmarks/results/pipeline_speed.{json,md}

Each case runs in a fresh subprocess so that its peak RSS (VmHWM) is its own; the bundled models are used.
``network s`` is the time spent inside torch module forward calls (semantic nnU-Net tiles and instance cutouts, timed
by global forward hooks around the outermost module call); ``overhead`` is everything else as a share of the total,
and ``overhead, models loaded`` the same without the two model loads (what a cohort worker pays per scan).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("lumbar", 900100), ("whole", 900101), ("sagittal512", 0)]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from spineps_like.phantom import make_phantom
from spineps_like.pipeline import segment
fov, seed, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
net = {"depth": 0, "t": 0.0, "s": 0.0}
def _pre(m, a):
    if net["depth"] == 0:
        net["t"] = time.perf_counter()
    net["depth"] += 1
def _post(m, a, o):
    net["depth"] -= 1
    if net["depth"] == 0:
        net["s"] += time.perf_counter() - net["t"]
torch.nn.modules.module.register_module_forward_pre_hook(_pre)
torch.nn.modules.module.register_module_forward_hook(_post)
if fov == "sagittal512":
    sys.path.insert(0, "benchmarks")
    from semantic_speed import make_scan
    image = make_scan(seed)
else:
    image = make_phantom(seed, fov=fov, mode="t2w", orientation="PIR").image
t0 = time.perf_counter()
r = segment(image, instance_method=method)
total = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"fov": fov, "seed": seed, "method": method, "shape": list(image.shape),
                  "spacing": [round(s, 3) for s in image.spacing], "total_s": total, "network_s": net["s"],
                  "phases_s": dict(r.timings), "semantic_steps_s": r.settings.get("semantic_timings_s", {}),
                  "peak_rss_mb": hwm / 1024}))
"""


def _loaded_total(row: dict) -> float:
    """Seconds without loading the two models (a cohort run loads them once per worker)."""
    return row["total_s"] - row["semantic_steps_s"].get("load", 0.0) - row["phases_s"].get("load_instance_model", 0.0)


def main() -> int:
    rows = []
    for fov, seed in CASES:
        for method in (("network",) if fov == "sagittal512" else ("network", "geometric")):
            out = subprocess.run([sys.executable, "-c", CHILD, fov, str(seed), method], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "pipeline_speed.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": load,
                                                         "rows": rows}, indent=2) + "\n")
    phases = sorted({k for r in rows for k in r["phases_s"]}, key=lambda k: list(rows[0]["phases_s"]).index(k)
                    if k in rows[0]["phases_s"] else 99)
    lines = [f"# Pipeline speed per phase (CPU, 2 threads; {time.strftime('%Y-%m-%d')}, load average after: "
             f"{' '.join(load)})", "", "| case | shape | method | " + " | ".join(phases) + " | total s | network s | overhead | overhead, models loaded | peak RSS MB |",
             "|---|---|---|" + "---|" * (len(phases) + 5)]
    for r in rows:
        lines.append(f"| {r['fov']} {r['seed']} | {r['shape']} | {r['method']} | "
                     + " | ".join(f"{r['phases_s'].get(p, 0):.2f}" for p in phases)
                     + f" | {r['total_s']:.1f} | {r['network_s']:.1f} | {1 - r['network_s'] / r['total_s']:.0%} "
                     f"| {1 - r['network_s'] / _loaded_total(r):.0%} | {r['peak_rss_mb']:.0f} |")
    (res / "pipeline_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
