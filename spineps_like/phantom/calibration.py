"""Calibration against the real TPTBox crops: per-label intensity statistics of phantoms and real scans."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from spineps_like.phantom.generate import Phantom, make_phantom

# ============================================================================================ calibration
#: Label groups compared between phantoms and the real TPTBox crops.
STAT_GROUPS: dict[str, tuple[int, ...]] = {
    "corpus": (49, 50), "posterior": (41, 42, 43, 44, 45, 46, 47, 48), "endplate": (52, 53, 62), "ivd": (100,),
    "canal": (61,), "cord": (60,), "background": (0,),
}


def label_intensity_stats(image: np.ndarray, semantic: np.ndarray,
                          groups: dict[str, Sequence[int]] | None = None, min_voxels: int = 20) -> dict[str, dict]:
    """Per-label-group intensity statistics of an image.

    Parameters
    ----------
    image, semantic : ndarray
        Image and semantic mask on the same grid (canal is label 61 alone, i.e. canal minus cord).
    groups : dict, optional
        Group name -> labels (default :data:`STAT_GROUPS`).
    min_voxels : int
        Groups with fewer voxels are left out.

    Returns
    -------
    dict
        name -> {'n', 'median', 'q25', 'q75', 'iqr', 'noise'}; 'noise' is a robust (MAD) standard deviation of the
        image minus its 3x3x3 mean inside the group (texture + noise). The background (label 0) is taken inside the
        bounding box of the bone labels (41-50, 26) grown by 5 voxels, as in a crop around the spine.
    """
    from spineps_like.geometry import bbox

    image = np.asarray(image, dtype=np.float32)
    semantic = np.asarray(semantic)
    if image.shape != semantic.shape:
        raise ValueError(f"image shape {image.shape} differs from the semantic mask shape {semantic.shape}")
    hp = image - ndi.uniform_filter(image, 3, mode="nearest")
    out = {}
    box = bbox(np.isin(semantic, (41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 26)), margin=5)
    near = np.zeros(semantic.shape, bool)
    if box is not None:
        near[box] = True
    for name, labels in (groups or STAT_GROUPS).items():
        m = np.isin(semantic, list(labels))
        if tuple(labels) == (0,):
            m &= near
        if m.sum() < min_voxels:
            continue
        vals = image[m]
        q25, med, q75 = (float(x) for x in np.percentile(vals, [25, 50, 75]))
        h = hp[m]
        out[name] = {"n": int(m.sum()), "median": med, "q25": q25, "q75": q75, "iqr": q75 - q25,
                     "noise": float(1.4826 * np.median(np.abs(h - np.median(h))))}
    return out


def tptbox_sample(kind: str) -> dict[str, Path]:
    """Paths of the TPTBox wheel's real sample crop ``kind`` ('mri' or 'ct'), found through the installed package:
    ``image``, ``semantic`` (seg-subreg) and ``instance`` (seg-vert)."""
    import TPTBox

    folder = Path(TPTBox.__file__).parent / "tests" / f"sample_{kind}"
    files = sorted(folder.glob("*.nii.gz"))
    if not files:
        raise FileNotFoundError(f"{folder}: TPTBox sample crop not found")
    return {"image": next(f for f in files if "_seg-" not in f.name),
            "semantic": next(f for f in files if "_seg-subreg" in f.name),
            "instance": next(f for f in files if "_seg-vert" in f.name)}


def _ct_derived_regions(semantic: np.ndarray, instance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IVD and canal regions of a CT crop whose ground truth has neither (PIR arrays).

    IVD: unlabelled voxels in each (P, R) column between the lowest corpus voxel of one vertebra and the highest of
    the next (gap < 20 voxels). Canal: unlabelled voxels in each (I, R) column between the most posterior corpus voxel
    and the most anterior arcus voxel. Both eroded by one voxel against partial volume.
    """
    corp = np.isin(semantic, (49, 50))
    ids = [int(v) for v in np.unique(instance[corp]) if v > 0]
    I_ = np.arange(semantic.shape[1])[None, :, None]
    gap = np.zeros(semantic.shape, bool)
    for a, b in zip(ids[:-1], ids[1:]):
        low_a = np.where(corp & (instance == a), I_, -1).max(1)
        top_b = np.where(corp & (instance == b), I_, 10 ** 6).min(1)
        ok = (low_a >= 0) & (top_b < 10 ** 6) & (top_b - low_a < 20)
        gap |= (I_ > low_a[:, None, :]) & (I_ < top_b[:, None, :]) & ok[:, None, :]
    P_ = np.arange(semantic.shape[0])[:, None, None]
    cb = np.where(corp, P_, -1).max(0)
    ab = np.where(semantic == 41, P_, 10 ** 6).min(0)
    canal = (P_ > cb[None]) & (P_ < ab[None]) & ((cb >= 0) & (ab < 10 ** 6))[None]
    free = semantic == 0
    return ndi.binary_erosion(gap & free), ndi.binary_erosion(canal & free)


def tptbox_reference_stats() -> dict[str, dict]:
    """Intensity statistics of the real TPTBox sample crops (MRI T2w C5-C7, CT L2-L4), label 50 mapped to 49.

    The CT ground truth has no IVD or canal; they are derived geometrically (:func:`_ct_derived_regions`).
    """
    import nibabel as nib

    out = {}
    for kind in ("mri", "ct"):
        f = tptbox_sample(kind)
        img = np.asarray(nib.load(str(f["image"])).dataobj, dtype=np.float32)
        sem = np.asarray(nib.load(str(f["semantic"])).dataobj).astype(np.int16)
        sem[sem == 50] = 49
        if kind == "ct":
            inst = np.asarray(nib.load(str(f["instance"])).dataobj).astype(np.int16)
            ivd, canal = _ct_derived_regions(sem, inst)
            sem = sem.copy()
            sem[ivd] = 100
            sem[canal] = 61
        out[kind] = label_intensity_stats(img, sem)
    return out


CALIBRATION_LEVELS = (21, 22, 23)  # L2-L4: the real crops show three lumbar-sized vertebrae


def _phantom_crop(ph: Phantom, levels: Sequence[int] = CALIBRATION_LEVELS, margin: int = 4):
    """Image and semantic arrays of a PIR phantom cropped around ``levels`` (+ their IVDs), like the real crops."""
    from spineps_like.geometry import bbox

    ins = ph.instance.array
    box = bbox(np.isin(ins, list(levels)) | np.isin(ins, [100 + v for v in levels[:-1]]), margin=margin)
    return ph.image.array[box], ph.semantic.array[box]


def calibration_table(seeds: Iterable[int] = range(4)) -> dict[str, dict]:
    """Real vs phantom statistics on like-for-like crops: lumbar t2w / ct phantoms on the crops' 1.5 mm isotropic
    PIR grid, cropped around L2-L4 (the real MRI crop is labelled C5-C7, but its corpora are lumbar-sized: 40 mm
    deep, 52 mm wide, 34 mm high). Returns {modality: {group: {'real': stats, 'phantom': [stats per seed]}}}; for
    MRI each entry also has 'ratio' = median / corpus median."""
    ref = tptbox_reference_stats()
    res: dict[str, dict] = {}
    for kind, mode in (("mri", "t2w"), ("ct", "ct")):
        rows: dict[str, dict] = {g: {"real": ref[kind].get(g), "phantom": []} for g in STAT_GROUPS}
        for s in seeds:
            ph = make_phantom(s, fov="lumbar", mode=mode, spacing=(1.5, 1.5, 1.5), orientation="PIR")
            st = label_intensity_stats(*_phantom_crop(ph))
            for g in STAT_GROUPS:
                if g in st:
                    rows[g]["phantom"].append(st[g])
        if kind == "mri":
            rc = ref[kind]["corpus"]["median"]
            for g, r in rows.items():
                if r["real"]:
                    r["real"]["ratio"] = r["real"]["median"] / rc
                for st, ph_c in zip(r["phantom"], rows["corpus"]["phantom"]):
                    st["ratio"] = st["median"] / ph_c["median"]
        res[kind] = rows
    return res


def calibration_markdown(table: dict[str, dict]) -> str:
    """Markdown tables from :func:`calibration_table`: real value, phantom mean +- sd over the seeds.

    MRI medians are ratios to the corpus median (IQR and noise too); CT values are HU.
    """
    lines = []
    for kind in ("mri", "ct"):
        rows = table[kind]
        if kind == "mri":
            lines += ["**T2w MRI** (all values / corpus median)", ""]
            norm_r = rows["corpus"]["real"]["median"]
            norm_p = [c["median"] for c in rows["corpus"]["phantom"]]
            fmt = "{:.2f}".format
        else:
            lines += ["**CT** (HU)", ""]
            norm_r, norm_p, fmt = 1.0, None, "{:.0f}".format
        lines += ["| group | real median | phantom median | real IQR | phantom IQR | real noise | phantom noise |",
                  "|---|---|---|---|---|---|---|"]
        for g, r in rows.items():
            cells = [g]
            for key in ("median", "iqr", "noise"):
                real = fmt(r["real"][key] / norm_r) if r["real"] else "–"
                vals = np.array([p[key] for p in r["phantom"]], dtype=float)
                if norm_p is not None and len(vals):
                    vals = vals / np.array(norm_p[:len(vals)])
                cells += [real, f"{fmt(vals.mean())} ± {fmt(vals.std())} (n={len(vals)})" if len(vals) else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def calibration_figure(path: str | Path, seed: int = 0) -> Path:
    """PNG: mid-sagittal slices of the real TPTBox crops beside t2w / ct phantoms (crop at the same levels and
    1.5 mm grid, and the whole phantom at its default sagittal spacing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from spineps_like.io import atomic_path

    fig, axes = plt.subplots(2, 3, figsize=(13, 9.5), gridspec_kw={"width_ratios": [1, 1, 1.25]})
    for row, (kind, fov, mode) in enumerate((("mri", "lumbar", "t2w"), ("ct", "lumbar", "ct"))):
        f = tptbox_sample(kind)
        real = np.asarray(nib.load(str(f["image"])).dataobj, dtype=np.float32)
        rsem = np.asarray(nib.load(str(f["semantic"])).dataobj)
        ph = make_phantom(seed, fov=fov, mode=mode, spacing=(1.5, 1.5, 1.5), orientation="PIR")
        crop, csem = _phantom_crop(ph)
        full = make_phantom(seed, fov=fov, mode=mode, orientation="PIR")
        panels = [(real, rsem, f"real TPTBox crop ({'T2w' if kind == 'mri' else 'CT'}, 1.5 mm)"),
                  (crop, csem, f"phantom {mode}, L2-L4 crop, 1.5 mm"),
                  (full.image.array, full.semantic.array,
                   f"phantom {mode} {fov}, {'x'.join(f'{s:.2f}' for s in full.image.spacing)} mm")]
        for ax, (img, sem, title) in zip(axes[row], panels):
            k = int(np.argmax((sem > 0).sum(axis=(0, 1))))
            sl = img[:, :, k].T
            if kind == "ct":
                lo, hi = -250.0, 1000.0
            else:
                lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.suptitle("Mid-sagittal slices (anterior left, head up): real crops vs phantoms", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
