"""How the semantic models hold up when a real scan's look changes: the TPTBox crops under the changes that broke
the phantom-trained model on real scans (a darker, noisier look; another intensity curve; smoothing), side by side.

    .venv/bin/python benchmarks/contrast_robustness.py --models semantic-phantom semantic-synth
    # writes benchmarks/results/contrast_robustness.{json,md}

Each change is a fixed function of the real crop (seeded noise), applied before segmentation; the reference is the
crop's manual mask. Scored: Dice of corpus (+ endplates), IVD, canal (+ cord) and posterior elements (MRI), and of
corpus and posterior elements (CT), with :func:`real_scans.dice`. The changes:

  original       the crop as it is
  gamma 0.6/1.6  intensities scaled to [0, 1], raised to the power, scaled back
  noise 5%/10%   Rician noise of that share of the 99th intensity percentile (MRI); Gaussian 40 / 80 HU (CT)
  dark + noisy   gamma 1.6, then 10% noise, then intensities halved (the fat-suppressed cohort's look)
  smoothed       Gaussian, 1 voxel
  bias           a smooth multiplicative field, x0.5 .. x1.5 across the field of view
  inverted       max - intensity (a T1-like ordering of fluid and fat against the T2w original; MRI only)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_scans import PRED_STRUCTURES, TPTBOX_STRUCTURES, dice, structure_masks  # noqa: E402
from spineps_like.io import Scan, atomic_write_json, atomic_write_text, load_scan  # noqa: E402

#: Structures scored per modality (our structure names; corpus includes the endplates, canal the cord).
SCORED = {"mri": ("body", "ivd", "canal", "posterior"), "ct": ("body", "posterior")}
_GROUPS = {"body": ("corpus", "endplate"), "ivd": ("ivd",), "canal": ("canal", "cord"), "posterior": ("posterior",)}


def _rescale(img: np.ndarray, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lo, hi = float(img.min()), float(img.max())
    u = (img - lo) / max(hi - lo, 1e-6)
    return (f(np.clip(u, 0, 1)) * (hi - lo) + lo).astype(np.float32)


def _noise(img: np.ndarray, share: float, seed: int, ct: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ct:
        return (img + share * rng.standard_normal(img.shape)).astype(np.float32)
    sigma = share * float(np.percentile(img, 99))
    re = img + sigma * rng.standard_normal(img.shape)
    im = sigma * rng.standard_normal(img.shape)
    return np.sqrt(re * re + im * im).astype(np.float32)


def _bias(img: np.ndarray, ct: bool) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in img.shape], indexing="ij")
    field = 1.0 + 0.5 * np.sin(1.3 * grids[0] + 0.7) * np.cos(0.9 * grids[1] - 0.4)
    if ct:  # a CT has no bias field; the same change on the HU above air
        return ((img + 1024.0) * field - 1024.0).astype(np.float32)
    return (img * field).astype(np.float32)


def changes(kind: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Name -> change of the image, for 'mri' or 'ct'."""
    ct = kind == "ct"
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "original": lambda a: a,
        "gamma 0.6": lambda a: _rescale(a, lambda u: u ** 0.6),
        "gamma 1.6": lambda a: _rescale(a, lambda u: u ** 1.6),
        "noise 5%" if not ct else "noise 40 HU": lambda a: _noise(a, 40.0 if ct else 0.05, 1, ct),
        "noise 10%" if not ct else "noise 80 HU": lambda a: _noise(a, 80.0 if ct else 0.10, 2, ct),
        "smoothed": lambda a: ndi.gaussian_filter(a, 1.0).astype(np.float32),
        "bias": lambda a: _bias(a, ct),
    }
    if not ct:
        out["dark + noisy"] = lambda a: 0.5 * _noise(_rescale(a, lambda u: u ** 1.6), 0.10, 3, False)
        out["inverted"] = lambda a: (float(a.max()) - a).astype(np.float32)
    return out


def score(pred: np.ndarray, gt_masks: dict[str, np.ndarray], kind: str) -> dict[str, float]:
    pm = structure_masks(pred, PRED_STRUCTURES)
    out = {}
    for name in SCORED[kind]:
        p = np.logical_or.reduce([pm[s] for s in _GROUPS[name]])
        g = np.logical_or.reduce([gt_masks[s] for s in _GROUPS[name] if s in gt_masks])
        out[name] = dice(p, g)
    return out


def run(models: list[str]) -> dict:
    from spineps_like.models import load_semantic_model
    from spineps_like.phantom import tptbox_sample
    from spineps_like.semantic import predict_semantic

    loaded = {m: load_semantic_model(m) for m in models}
    rows = []
    for kind in ("mri", "ct"):
        paths = tptbox_sample(kind)
        image = load_scan(paths["image"])
        gt = structure_masks(np.asarray(load_scan(paths["semantic"], kind="mask").array), TPTBOX_STRUCTURES)
        for name, change in changes(kind).items():
            changed = Scan(change(np.asarray(image.array, dtype=np.float32)), image.affine)
            for m, model in loaded.items():
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pred = predict_semantic(changed, model).array
                rows.append({"crop": kind, "change": name, "model": m, **score(pred, gt, kind),
                             "seconds": round(time.perf_counter() - t0, 2)})
                print(rows[-1], flush=True)
    return {"rows": rows, "models": models}


def markdown(res: dict, meta: dict) -> str:
    lines = [f"# Contrast robustness of the semantic models ({meta['date']})", "",
             f"Command: `{meta['command']}`; commit {meta['commit']}; {meta['machine']}.", "",
             "Dice against the TPTBox crops' manual masks after each change of the image (see the script's docstring). "
             "body = corpus + endplates, canal = canal + cord.", ""]
    for kind in ("mri", "ct"):
        cols = SCORED[kind]
        lines += [f"## TPTBox {kind.upper()} crop", "",
                  "| change | " + " | ".join(f"{m}: {c}" for m in res["models"] for c in cols) + " |",
                  "|---|" + "---|" * (len(cols) * len(res["models"]))]
        by = {(r["change"], r["model"]): r for r in res["rows"] if r["crop"] == kind}
        for change in dict.fromkeys(r["change"] for r in res["rows"] if r["crop"] == kind):
            cells = [f"{by[(change, m)][c]:.3f}" for m in res["models"] for c in cols]
            lines.append(f"| {change} | " + " | ".join(cells) + " |")
        means = [np.mean([by[(ch, m)][c] for ch in dict.fromkeys(r["change"] for r in res["rows"] if r["crop"] == kind)])
                 for m in res["models"] for c in cols]
        lines += ["| **mean** | " + " | ".join(f"**{x:.3f}**" for x in means) + " |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["semantic-phantom"], help="semantic model names or folders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "contrast_robustness",
                    help="results path prefix (.json and .md are written)")
    a = ap.parse_args(argv)
    res = run(a.models)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": f"{platform.processor() or 'cpu'}, "
            f"{platform.system()}", "command": "python benchmarks/contrast_robustness.py " + " ".join(argv or sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out.with_suffix(".json"), {**res, **meta})
    atomic_write_text(a.out.with_suffix(".md"), markdown(res, meta) + "\n")
    print(markdown(res, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
