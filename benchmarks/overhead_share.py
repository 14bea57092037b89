"""Non-network share of spineps-like's time on the side-by-side phantom set (issue 7's <= 20% target).

    .venv/bin/python benchmarks/overhead_share.py      # writes benchmarks/results/overhead_share.{json,md}

One process, as a cohort worker runs: the bundled models loaded once, glibc's allocator tuned as the command line does,
2 torch threads. Each of the 5 held-out phantoms of ``spineps_side_by_side/run.py`` (lumbar; block, collapsed and
sacralised-L5 variants; whole spine) is segmented once to warm up and then ``--repeats`` times (default 5); the repeat
with the median share is reported. ``network s`` is the time inside torch module forward calls (semantic sliding-window
tiles and instance cutouts, ``forward_timer.py``); the overhead is everything else: resampling, the sliding window's
bookkeeping, clean-up, the restore to the input grid, centres, cutouts, fusion, assignment, post-processing and
labelling. The masks are those of the side-by-side run (same phantoms, same models, same settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "spineps_side_by_side"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    from spineps_like.runtime import tune_allocator

    malloc = tune_allocator()  # before torch loads, as in the command line (torch's huge pages, see runtime)
    import torch

    torch.set_num_threads(2)
    from forward_timer import ForwardTimer
    from run import CASES  # the side-by-side benchmark's held-out phantoms

    from spineps_like.instance.network import load_instance_model
    from spineps_like.io import atomic_write_json, atomic_write_text
    from spineps_like.models import find_model, load_semantic_model
    from spineps_like.phantom import make_phantom
    from spineps_like.pipeline import segment

    sem_model = load_semantic_model("semantic-phantom")
    ins_model = load_instance_model(find_model("instance-phantom").path)
    net = ForwardTimer()
    rows = []
    for seed, fov, variant in CASES:
        image = make_phantom(seed, fov=fov, mode="t2w", variant=variant).image
        segment(image, semantic_model=sem_model, instance_model=ins_model)  # warm-up: first-call costs
        runs = []
        for _ in range(args.repeats):
            net.seconds = 0.0
            t0 = time.perf_counter()
            r = segment(image, semantic_model=sem_model, instance_model=ins_model)
            total = time.perf_counter() - t0
            runs.append({"total_s": total, "network_s": net.seconds, "share": 1 - net.seconds / total,
                         "phases_s": dict(r.timings)})
        runs.sort(key=lambda x: x["share"])
        mid = runs[len(runs) // 2]
        rows.append({"case": f"{seed}_{fov}" + (f"_{variant}" if variant else ""), "shape": list(image.shape),
                     **mid, "shares": [round(x["share"], 4) for x in runs]})
        print(rows[-1]["case"], f"{mid['total_s']:.2f} s, network {mid['network_s']:.2f} s, overhead "
              f"{mid['share']:.1%}", flush=True)
    total = sum(r["total_s"] for r in rows)
    network = sum(r["network_s"] for r in rows)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": args.repeats, "torch_threads": 2, "malloc": malloc,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3], "cpu": _cpu_model(), "torch": torch.__version__}
    lines = [f"# Non-network share on the side-by-side phantoms ({meta['date']}, {meta['cpu']}, torch {meta['torch']}, "
             f"2 threads, models loaded once, median of {args.repeats} repeats after a warm-up; load average after: "
             f"{' '.join(meta['loadavg'])})", "",
             "The share depends on the machine: a CPU with faster convolutions shortens the network time and raises it.",
             "",
             "| case | shape | total s | network s | overhead s | overhead share | shares of the repeats |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['shape']} | {r['total_s']:.2f} | {r['network_s']:.2f} | "
                     f"{r['total_s'] - r['network_s']:.2f} | {r['share']:.1%} | "
                     f"{', '.join(f'{s:.1%}' for s in r['shares'])} |")
    lines.append(f"| all | | {total:.2f} | {network:.2f} | {total - network:.2f} | {1 - network / total:.1%} | |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "overhead_share.json", {"meta": meta, "rows": rows})
    atomic_write_text(args.out / "overhead_share.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu_model() -> str:
    """The CPU's model name (Linux), for telling runs on different machines apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
