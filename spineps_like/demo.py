"""`spineps-like demo`: make a held-out phantom, segment it with the bundled models, score it against its truth."""

from __future__ import annotations

from pathlib import Path


def run_demo(out: str | Path, *, seed: int = 900001, instance_method: str = "network") -> int:
    """Write a lumbar T2w-like phantom (seed never used in training), segment it, print PQ/Dice, return 0."""
    from spineps_like.evaluation import evaluate
    from spineps_like.io import load_scan
    from spineps_like.phantom import write_phantoms
    from spineps_like.pipeline import segment

    out = Path(out)
    image_path = write_phantoms(out / "phantom", n=1, seed=seed, fov="lumbar", mode="t2w", snapshot=False)[0]
    print(f"phantom: {image_path}")
    result = segment(image_path, instance_method=instance_method)
    paths = result.save(out / "derivatives_seg")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    gt_dir = out / "phantom" / "derivatives_gt" / image_path.parent.parent.name
    gt_sem = load_scan(next(gt_dir.glob("*_seg-spine_msk.nii.gz")), kind="mask")
    gt_ins = load_scan(next(gt_dir.glob("*_seg-vert_msk.nii.gz")), kind="mask")
    m = evaluate(result.instance.array, gt_ins.array, gt_ins.spacing, semantic_pred=result.semantic.array,
                 semantic_gt=gt_sem.array)
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    print(f"full pipeline: vertebra PQ {m['vertebra.pq']:.3f} RQ {m['vertebra.rq']:.3f} SQ {m['vertebra.sq']:.3f} | "
          f"IVD PQ {m['ivd.pq']:.3f} | global Dice corpus {m.get('global_dice.corpus', float('nan')):.3f} "
          f"IVD {m.get('global_dice.ivd', float('nan')):.3f} canal {m.get('global_dice.canal', float('nan')):.3f}")
    # the instance phase alone, fed the phantom's exact semantic mask (shows it apart from the semantic model)
    from spineps_like.pipeline import instance_phase

    _, ins, _ = instance_phase(gt_sem, method=instance_method)
    m = evaluate(ins.array, gt_ins.array, gt_ins.spacing)
    print(f"instance phase on the ground-truth semantic mask: vertebra PQ {m['vertebra.pq']:.3f} "
          f"RQ {m['vertebra.rq']:.3f} SQ {m['vertebra.sq']:.3f} | IVD PQ {m['ivd.pq']:.3f}")
    return 0
