"""What issue 7's <= 20% non-network share would cost: the pipeline's tail on a 1 mm grid instead of the input grid.

    .venv/bin/python benchmarks/coarse_tail.py      # writes benchmarks/results/coarse_tail.{json,md}

An experiment, not a pipeline option. After the instance network, assignment, post-processing and labelling run on
the input grid (``pipeline.instance_phase``), which costs most on fine inputs (0.6 mm in-plane). Here the same
semantic mask (the bundled model's, on the input grid) also goes through ``instance_phase`` after being moved by
nearest neighbour to a grid where every axis finer than 0.95 mm is 1 mm (SPINEPS works at its models' resolution
and moves its masks back by nearest neighbour); the result comes back to the input grid by nearest neighbour.
Both are scored against the phantoms' ground truth (``spineps_like.evaluation.evaluate``, as the side-by-side run)
and timed: the tail (assignment, post-processing, labelling, the restores) plus, for the coarse way, the moves
there and back; the median of ``--repeats`` runs after a warm-up, models loaded, 2 torch threads.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "spineps_side_by_side"))

#: the pipeline phases after the instance network (what the coarse grid would make cheaper)
TAIL = ("instance_restore", "assign", "postprocess", "labeling", "restore")
METRICS = ("vertebra.pq", "vertebra.sq", "vertebra.global_dice", "ivd.pq", "ivd.sq")
FINE_MM = 0.95  # axes finer than this go to COARSE_MM
COARSE_MM = 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    from spineps_like.runtime import tune_allocator

    tune_allocator()
    import torch

    torch.set_num_threads(2)
    from run import CASES  # the side-by-side benchmark's held-out phantoms

    from spineps_like.evaluation import evaluate
    from spineps_like.geometry import rescale, resample_to
    from spineps_like.instance.network import load_instance_model
    from spineps_like.io import atomic_write_json, atomic_write_text
    from spineps_like.models import find_model, load_semantic_model
    from spineps_like.phantom import make_phantom
    from spineps_like.pipeline import Timings, instance_phase
    from spineps_like.semantic import predict_semantic

    sem_model = load_semantic_model("semantic-phantom")
    ins_model = load_instance_model(find_model("instance-phantom").path)

    def fine(semantic):
        t = Timings()
        s, i, _ = instance_phase(semantic, model=ins_model, timings=t)
        return s.array, i.array, sum(t.get(k, 0.0) for k in TAIL)

    def coarse(semantic):
        t = Timings()
        t0 = time.perf_counter()
        target = np.where(np.asarray(semantic.spacing) < FINE_MM, COARSE_MM, semantic.spacing)
        small = rescale(semantic, target, order=0)
        moved = time.perf_counter() - t0
        s, i, _ = instance_phase(small, model=ins_model, timings=t)
        t0 = time.perf_counter()
        s = resample_to(s, semantic.shape, semantic.affine, order=0).array
        i = resample_to(i, semantic.shape, semantic.affine, order=0).array
        moved += time.perf_counter() - t0
        return s, i, sum(t.get(k, 0.0) for k in TAIL) + moved

    rows = []
    for seed, fov, variant in CASES:
        ph = make_phantom(seed, fov=fov, mode="t2w", variant=variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            semantic = predict_semantic(ph.image, sem_model)
        row = {"case": f"{seed}_{fov}" + (f"_{variant}" if variant else ""), "spacing": list(semantic.spacing)}
        for way, fn in (("input grid", fine), ("1 mm grid", coarse)):
            fn(semantic)  # warm-up
            runs = [fn(semantic) for _ in range(args.repeats)]
            s, i, _ = runs[0]
            m = evaluate(i, ph.instance.array, ph.instance.spacing, semantic_pred=np.where(s == 50, 49, s),
                         semantic_gt=ph.semantic.array)
            row[way] = {"tail_s": float(np.median([r[2] for r in runs])), **{k: float(m[k]) for k in METRICS}}
        rows.append(row)
        print(row["case"], {w: round(row[w]["tail_s"], 3) for w in ("input grid", "1 mm grid")}, flush=True)

    ways = ("input grid", "1 mm grid")
    mean = {w: {k: float(np.mean([r[w][k] for r in rows])) for k in METRICS} for w in ways}
    total = {w: float(sum(r[w]["tail_s"] for r in rows)) for w in ways}
    lines = [f"# The tail on the input grid vs on a 1 mm grid ({time.strftime('%Y-%m-%d %H:%M')}, 2 torch threads, "
             f"median of {args.repeats})", "",
             "Tail = instance restore, assignment, post-processing, labelling and the final restore (plus, on the 1 mm "
             "grid, the moves there and back). Accuracy against the phantoms' ground truth.", "",
             "| case | spacing mm | tail s, input grid | tail s, 1 mm grid | vertebra PQ | IVD PQ | vertebra global Dice |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["input grid"], r["1 mm grid"]
        lines.append(f"| {r['case']} | {' x '.join(f'{x:.2f}' for x in r['spacing'])} | {a['tail_s']:.3f} | "
                     f"{b['tail_s']:.3f} | {a['vertebra.pq']:.3f} -> {b['vertebra.pq']:.3f} | "
                     f"{a['ivd.pq']:.3f} -> {b['ivd.pq']:.3f} | {a['vertebra.global_dice']:.3f} -> "
                     f"{b['vertebra.global_dice']:.3f} |")
    a, b = mean["input grid"], mean["1 mm grid"]
    lines.append(f"| all (seconds summed, metrics averaged) | | {total['input grid']:.3f} | {total['1 mm grid']:.3f} | "
                 f"{a['vertebra.pq']:.3f} -> {b['vertebra.pq']:.3f} | {a['ivd.pq']:.3f} -> {b['ivd.pq']:.3f} | "
                 f"{a['vertebra.global_dice']:.3f} -> {b['vertebra.global_dice']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "coarse_tail.json", {"rows": rows, "mean": mean, "tail_s": total})
    atomic_write_text(args.out / "coarse_tail.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
