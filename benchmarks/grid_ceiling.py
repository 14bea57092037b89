"""What the semantic model's grid alone costs: the ceiling of the full pipeline's accuracy at a given model resolution.

The ground-truth semantic mask of each development phantom is taken to the model grid (reoriented to PIR, resampled
into the resolution range) and back to the phantom's grid the two ways the pipeline can restore a prediction:

- ``soft``: each label's one-hot map resampled linearly onto the model grid (a perfect, calibrated soft prediction
  seen through the grid), then :func:`spineps_like.semantic.labels_from_probabilities` back (the default restore);
- ``nearest``: the label map resampled by nearest neighbour both ways (``--restore nearest``, SPINEPS' way).

The instance phase (bundled network) then runs on the result; vertebra / IVD PQ against the exact instance mask is the
ceiling a perfect network at that grid could reach. A model that scores far below it is limited by the network, not
the grid.

    python benchmarks/grid_ceiling.py [--resolution 1.2 1.2] [--n 13] [--out benchmarks/results/grid_ceiling]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import CASES, label_dice, panoptic  # noqa: E402

from spineps_like.geometry import to_input_grid, to_model_grid  # noqa: E402
from spineps_like.io import Scan  # noqa: E402


def round_trip(semantic: Scan, in_plane_mm: tuple[float, float], how: str) -> Scan:
    """``semantic`` taken to a PIR model grid of ``in_plane_mm`` (P, I; R kept within 2-4 mm) and back."""
    from spineps_like.semantic import labels_from_probabilities

    rr = [[in_plane_mm[0], in_plane_mm[1], 2.0], [in_plane_mm[0], in_plane_mm[1], 4.0]]
    if how == "nearest":
        grid = to_model_grid(semantic, "PIR", rr, order=0)
        return to_input_grid(Scan(grid.array.astype(np.int32), grid.affine), semantic)
    labels = [0] + [int(v) for v in np.unique(semantic.array) if v]
    channels = [to_model_grid(Scan((semantic.array == v).astype(np.float32), semantic.affine), "PIR", rr, order=1)
                for v in labels]
    probs = np.stack([c.array for c in channels])
    return Scan(labels_from_probabilities(probs, labels, channels[0].affine, semantic), semantic.affine)


def main(argv: list[str] | None = None) -> int:
    from spineps_like.instance.network import load_instance_model
    from spineps_like.models import find_model
    from spineps_like.phantom import make_phantom
    from spineps_like.phantom_sets import phantom_set
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, instance_phase

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=float, nargs=2, default=(1.2, 1.2), metavar=("P", "I"),
                    help="model grid in-plane spacing in mm (the bundled semantic models: 1.2 1.2)")
    ap.add_argument("--n", type=int, default=len(CASES), help="the first N development phantoms")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grid_ceiling")
    args = ap.parse_args(argv)
    pset = phantom_set("development")
    model = load_instance_model(find_model(DEFAULT_INSTANCE_MODEL).path)
    rows = []
    for i, (fov, variant, mode) in enumerate(CASES[: args.n]):
        ph = make_phantom(pset.seed(i), fov=fov, variant=variant, mode=mode)
        row = {"case": f"phantom {pset.seed(i)} {fov} {mode}" + (f" {variant}" if variant else ""),
               "spacing": [round(s, 3) for s in ph.semantic.spacing]}
        for how in ("soft", "nearest"):
            back = round_trip(ph.semantic, tuple(args.resolution), how)
            _, ins, _ = instance_phase(back, method="network", model=model)
            d, pq = label_dice(back.array, ph.semantic.array), panoptic(ins, ph.instance)
            row[how] = {"posterior_dice": d["posterior"], "endplate_dice": d["endplate"], "corpus_dice": d["49"],
                        "vertebra_pq": pq["vertebra.pq"], "vertebra_rq": pq["vertebra.rq"], "ivd_pq": pq["ivd.pq"]}
        rows.append(row)
        print(row["case"], {h: round(row[h]["vertebra_pq"], 3) for h in ("soft", "nearest")}, flush=True)
    mean = {h: {k: float(np.nanmean([r[h][k] for r in rows])) for k in rows[0][h]} for h in ("soft", "nearest")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {"command": "python benchmarks/grid_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit.strip(),
            "resolution_mm": list(args.resolution), "instance_model": DEFAULT_INSTANCE_MODEL,
            "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "mean": mean}, indent=1) + "\n")
    keys = ("vertebra_pq", "vertebra_rq", "ivd_pq", "posterior_dice", "endplate_dice", "corpus_dice")
    lines = [f"# Grid ceiling of the semantic phase ({meta['date']})", "",
             f"Command: `{meta['command']}`; commit {meta['commit']}; model grid {args.resolution[0]} x "
             f"{args.resolution[1]} mm (P, I), R within 2-4 mm; instance model `{DEFAULT_INSTANCE_MODEL}`.", "",
             "The exact semantic mask of each development phantom through the model grid and back (see the script's "
             "docstring): the accuracy a perfect network at this grid could reach.", "",
             "| case | spacing (mm) | " + " | ".join(f"{h} {k}" for h in ("soft", "nearest") for k in keys[:3]) + " |",
             "|---|---|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['case']} | {r['spacing']} | "
                     + " | ".join(f"{r[h][k]:.3f}" for h in ("soft", "nearest") for k in keys[:3]) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{mean[h][k]:.3f}**" for h in ("soft", "nearest")
                                                 for k in keys[:3]) + " |")
    lines += ["", "Semantic Dice of the round trip, mean: " + "; ".join(
        f"{h}: posterior {mean[h]['posterior_dice']:.3f}, endplate {mean[h]['endplate_dice']:.3f}, corpus "
        f"{mean[h]['corpus_dice']:.3f}" for h in ("soft", "nearest")) + "."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
