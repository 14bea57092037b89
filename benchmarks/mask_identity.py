"""Semantic and instance masks of 23 fixed cases, saved and compared: the check behind "masks identical" for speed-ups.

    .venv/bin/python benchmarks/mask_identity.py save DIR             # before the change (e.g. from a git worktree)
    .venv/bin/python benchmarks/mask_identity.py save DIR2 --compare DIR   # after it: non-zero exit on any difference

To save the masks of another commit: ``git worktree add /tmp/base <commit>`` and run this script with
``PYTHONPATH=/tmp/base`` (the script prints which package it imported).

The cases: the 13 held-out phantoms of ``accuracy.py`` (each also through the instance phase on its reference
semantic mask, so assignment and post-processing see ground-truth input), the 5 of the SPINEPS side-by-side run, the
2 of ``pipeline_speed.py`` (stored PIR), the two real TPTBox crops (their reference masks through the instance phase
too) and ``semantic_speed.py``'s 512 x 512 x 20 scan; the bundled models, 2 torch threads, default settings. About
3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "spineps_side_by_side"))


def cases():
    """(name, image Scan, reference semantic Scan or None) of the 23 cases."""
    from accuracy import CASES as ACCURACY_CASES
    from pipeline_speed import CASES as PIPELINE_SPEED_CASES
    from run import CASES as SIDE_BY_SIDE_CASES
    from semantic_speed import make_scan

    from spineps_like.io import load_scan
    from spineps_like.phantom import make_phantom, tptbox_sample
    from spineps_like.phantom_sets import DEVELOPMENT

    for i, (fov, variant, mode) in enumerate(ACCURACY_CASES):  # as accuracy.py builds the development set
        ph = make_phantom(DEVELOPMENT.seed(i), fov=fov, mode=mode, variant=variant)
        yield f"accuracy_{DEVELOPMENT.seed(i)}", ph.image, ph.semantic
    for seed, fov, variant in SIDE_BY_SIDE_CASES:
        yield f"side_by_side_{seed}", make_phantom(seed, fov=fov, mode="t2w", variant=variant).image, None
    for fov, seed in PIPELINE_SPEED_CASES:  # as pipeline_speed.py builds them
        if fov == "sagittal512":
            yield "sagittal512", make_scan(seed), None
        else:
            yield f"pipeline_speed_{seed}", make_phantom(seed, fov=fov, mode="t2w", orientation="PIR").image, None
    for kind in ("mri", "ct"):
        paths = tptbox_sample(kind)
        yield f"tptbox_{kind}", load_scan(paths["image"]), load_scan(paths["semantic"], kind="mask")


def compare(new: Path, base: Path) -> int:
    """Print every mask that differs; return the number of differing masks (missing files count)."""
    import numpy as np

    bad = 0
    files = sorted(new.glob("*.npz"))
    for f in files:
        if not (base / f.name).is_file():
            print(f"MISSING in {base}: {f.name}")
            bad += 1
            continue
        a, b = np.load(f), np.load(base / f.name)
        for key in a.files:
            if key not in b.files or a[key].shape != b[key].shape or not np.array_equal(a[key], b[key]):
                n = int((a[key] != b[key]).sum()) if key in b.files and a[key].shape == b[key].shape else -1
                print(f"DIFF {f.name} {key}: {n} voxels" if n >= 0 else f"DIFF {f.name} {key}: shape or key")
                bad += 1
    print(f"compared {len(files)} cases with {base}: {bad} masks differ")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save",))
    ap.add_argument("out", type=Path, help="folder for the masks (one .npz per case)")
    ap.add_argument("--compare", type=Path, default=None, help="a folder saved before: report every difference")
    args = ap.parse_args(argv)
    from spineps_like.runtime import tune_allocator

    tune_allocator()
    import numpy as np
    import torch

    torch.set_num_threads(2)
    import spineps_like
    from spineps_like.instance.network import load_instance_model
    from spineps_like.models import find_model, load_semantic_model
    from spineps_like.pipeline import instance_phase, segment

    print("spineps_like from", Path(spineps_like.__file__).parent, flush=True)
    semantic_model = load_semantic_model("semantic-phantom")
    instance_model = load_instance_model(find_model("instance-phantom").path)
    args.out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, image, reference in cases():
            r = segment(image, semantic_model=semantic_model, instance_model=instance_model)
            masks = {"semantic": r.semantic.array, "instance": r.instance.array}
            if reference is not None:
                sem, ins, _ = instance_phase(reference, model=instance_model)
                masks.update(semantic_from_reference=sem.array, instance_from_reference=ins.array)
            tmp = args.out / f"{name}.tmp.npz"
            np.savez_compressed(tmp, **masks)
            tmp.replace(args.out / f"{name}.npz")
            print(name, flush=True)
    return 1 if args.compare is not None and compare(args.out, args.compare) else 0


if __name__ == "__main__":
    sys.exit(main())
