"""Per-phase seconds and peak memory of the whole pipeline on CPU: a lumbar and a whole-spine phantom, and a
512 x 512 x 20 sagittal scan (the lumbar phantom at 0.5 x 0.5 x 4 mm stored R, A, S, as in semantic_speed.py).

    .venv/bin/python benchmarks/pipeline_speed.py      # writes benchmarks/results/pipeline_speed.{json,md}

Each case runs in a fresh subprocess so that its peak RSS (VmHWM) is its own; the bundled models are used.
``network s`` is the time spent inside torch module forward calls (semantic nnU-Net tiles and instance cutouts, timed
by global forward hooks around the outermost module call); ``overhead`` is everything else as a share of the total,
and ``overhead, models loaded`` the same without the two model loads. The first scan of a fresh process also pays
first-call costs (oneDNN primitives per tile shape, MKL's first FFT, cached resampling operators), so each child then
segments the same scan again, ``--repeats`` times (default 5): ``second scan`` is what every later scan of a cohort
worker costs, the repeat with the median overhead share (all shares are in the JSON).

Each child tunes glibc's allocator as the command line and cohort workers do (``spineps_like.runtime``); to measure
with glibc's defaults instead::

    SPINEPS_LIKE_MALLOC_TUNING=0 .venv/bin/python benchmarks/pipeline_speed.py --out-suffix _glibc_defaults

The overhead's seconds do not depend on the networks' widths, its share does: the bundled networks are small (semantic
features 8..64, instance ``dim=8``). ``overhead at SPINEPS widths`` puts the same overhead seconds against the forward
time of networks as wide as the published SPINEPS ones (nnU-Net's default PlainConvUNet widths 32..320 with two
decoder convolutions per stage, on the same tiles in the same batches; the instance ``Unet3D(dim=16)`` on the same
cutouts), random weights, timed after the run in the same process.

    .venv/bin/python benchmarks/pipeline_speed.py --no-spineps-widths   # skip that part (about 3 min)
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
import json, sys, time
from spineps_like.runtime import tune_allocator
malloc = tune_allocator()  # as the command line and cohort workers do (SPINEPS_LIKE_MALLOC_TUNING=0: glibc defaults)
import torch
torch.set_num_threads(2)
from spineps_like.phantom import make_phantom
from spineps_like.pipeline import segment
fov, seed, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, "benchmarks")
from forward_timer import ForwardTimer
net = ForwardTimer()  # time in the outermost forward calls; calls: (network class, input shape) of each
if fov == "sagittal512":
    from semantic_speed import make_scan
    image = make_scan(seed)
else:
    image = make_phantom(seed, fov=fov, mode="t2w", orientation="PIR").image
t0 = time.perf_counter()
r = segment(image, instance_method=method)
total = time.perf_counter() - t0
first_net, n_calls = net.seconds, len(net.calls)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # the first scan's peak
# the same scan again in the same process: what each later scan of a cohort worker costs (warm caches, primitives);
# REPEATS times, and the run with the median overhead share is reported (a shared machine's noise is +-10%)
later = []
for _ in range(int(sys.argv[5])):
    net.seconds = 0.0
    t0 = time.perf_counter()
    r2 = segment(image, instance_method=method)
    later.append({"total_s": time.perf_counter() - t0, "network_s": net.seconds, "phases_s": dict(r2.timings),
                  "semantic_steps_s": r2.settings.get("semantic_timings_s", {})})
from pipeline_speed import _overhead_share
later.sort(key=_overhead_share)
second = dict(later[len(later) // 2], repeats=len(later), shares=[round(_overhead_share(w), 4) for w in later])
net.seconds = first_net
del net.calls[n_calls:]
wide_s = None
if sys.argv[4] == "wide":
    # the same forward calls through networks as wide as SPINEPS' (random weights)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from spineps_like.instance.network import Unet3D
    from spineps_like.models import load_semantic_model
    from spineps_like.models.nnunet import build_network
    from spineps_like.training.semantic import small_plans
    sm = load_semantic_model("semantic-phantom").nnunet
    cm = sm.configuration_manager
    plans = small_plans("wide", cm.spacing, cm.patch_size, base_features=32, max_features=320, n_conv_decoder=2)
    pm = PlansManager(plans)
    wide = {"PlainConvUNet": build_network(pm, pm.get_configuration("3d_fullres"), sm.dataset_json).eval(),
            "Unet3D": Unet3D(dim=16).eval()}
    net.remove()
    wide_s = 0.0
    with torch.inference_mode():
        for name, shape in net.calls:
            x = torch.randn(shape) if name == "PlainConvUNet" else torch.nn.functional.one_hot(
                torch.randint(0, 10, (shape[0], *shape[2:])), 10).permute(0, 4, 1, 2, 3).float()
            tic = time.perf_counter()
            wide[name](x)
            wide_s += time.perf_counter() - tic
print(json.dumps({"fov": fov, "seed": seed, "method": method, "shape": list(image.shape),
                  "spacing": [round(s, 3) for s in image.spacing], "total_s": total, "network_s": net.seconds,
                  "phases_s": dict(r.timings), "semantic_steps_s": r.settings.get("semantic_timings_s", {}),
                  "peak_rss_mb": hwm / 1024, "malloc_tuning": malloc, "network_calls": len(net.calls),
                  "wide_network_s": wide_s, "second_scan": second}))
"""


def _loaded_total(row: dict) -> float:
    """Seconds without loading the two models (a cohort run loads them once per worker)."""
    return row["total_s"] - row["semantic_steps_s"].get("load", 0.0) - row["phases_s"].get("load_instance_model", 0.0)


def _overhead_share(row: dict) -> float:
    """Non-network share of the time with the models loaded."""
    return (_loaded_total(row) - row["network_s"]) / _loaded_total(row)


def _second(row: dict) -> str:
    """The same scan run again in the same process (a cohort worker's later scans)."""
    w = row.get("second_scan")
    if not w:
        return "-"
    return f"{w['total_s']:.1f}, {w['network_s']:.1f}, {_overhead_share(w):.0%}"


def main() -> int:
    wide = "--no-spineps-widths" not in sys.argv
    suffix = sys.argv[sys.argv.index("--out-suffix") + 1] if "--out-suffix" in sys.argv else ""
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    rows = []
    for fov, seed in CASES:
        for method in (("network",) if fov == "sagittal512" else ("network", "geometric")):
            args = [fov, str(seed), method, "wide" if wide and method == "network" else "-", str(repeats)]
            out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                                 cwd=ROOT, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / f"pipeline_speed{suffix}.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": load, "rows": rows}, indent=2) + "\n")
    phases = sorted({k for r in rows for k in r["phases_s"]}, key=lambda k: list(rows[0]["phases_s"]).index(k)
                    if k in rows[0]["phases_s"] else 99)
    lines = [f"# Pipeline speed per phase (CPU, 2 threads; {time.strftime('%Y-%m-%d')}, load average after: "
             f"{' '.join(load)}; malloc tuning: {rows[0].get('malloc_tuning') or 'off, glibc defaults'})", "", "| case | shape | method | " + " | ".join(phases) + " | total s | network s | overhead | overhead, models loaded | later scan (median share of the repeats): total s, network s, overhead (models loaded) | network s at SPINEPS widths | overhead at SPINEPS widths, models loaded | peak RSS MB |",
             "|---|---|---|" + "---|" * (len(phases) + 8)]
    for r in rows:
        over = _loaded_total(r) - r["network_s"]
        w = r.get("wide_network_s")
        lines.append(f"| {r['fov']} {r['seed']} | {r['shape']} | {r['method']} | "
                     + " | ".join(f"{r['phases_s'].get(p, 0):.2f}" for p in phases)
                     + f" | {r['total_s']:.1f} | {r['network_s']:.1f} | {1 - r['network_s'] / r['total_s']:.0%} "
                     f"| {_overhead_share(r):.0%} | {_second(r)} | {f'{w:.1f}' if w is not None else '-'} "
                     f"| {f'{over / (over + w):.0%}' if w is not None else '-'} | {r['peak_rss_mb']:.0f} |")
    (res / f"pipeline_speed{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
