"""Snapshot pictures: sagittal slices of a scan with semantic and instance overlays, as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spineps_like.geometry import reorient
from spineps_like.io import Scan, atomic_path
from spineps_like.labels import SEMANTIC_COLOURS, instance_colour


def _lut(ids: np.ndarray, colour) -> np.ndarray:
    """RGBA lookup (max_id+1, 4) for the ids present."""
    n = int(ids.max(initial=0)) + 1
    lut = np.zeros((n, 4), dtype=np.float32)
    for i in ids:
        if i > 0:
            lut[i, :3] = np.asarray(colour(int(i)), dtype=np.float32) / 255.0
            lut[i, 3] = 0.55
    return lut


def _sagittal_index(semantic: np.ndarray | None, n: int) -> int:
    """The sagittal slice (axis 2 in PIR) through the spine's middle, or the array's middle without a mask."""
    if semantic is not None and semantic.any():
        counts = (semantic > 0).sum(axis=(0, 1))
        return int(np.argmax(counts)) if counts.max() > 0 else n // 2
    return n // 2


def save_snapshot(path: str | Path, image: Scan, semantic: Scan | None = None, instance: Scan | None = None,
                  *, title: str | None = None) -> Path:
    """Write a PNG: the mid-sagittal slice of ``image`` alone, with the semantic overlay and with the instance overlay.

    All scans must share a grid; they are shown in PIR (anterior to the left, head at the top).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = reorient(image, "PIR")
    sem = reorient(semantic, "PIR").array if semantic is not None else None
    ins = reorient(instance, "PIR").array if instance is not None else None
    k = _sagittal_index(sem if sem is not None else ins, img.shape[2])
    sp = img.spacing
    aspect = sp[1] / sp[0]  # pixel height (I) over width (P)

    def sl(a: np.ndarray) -> np.ndarray:
        return a[:, :, k].T  # rows: superior -> inferior (head at top), columns: anterior -> posterior

    panels = [("image", None)]
    if sem is not None:
        panels.append(("semantic", _lut(np.unique(sem), lambda i: SEMANTIC_COLOURS.get(i, (255, 255, 255)))[sl(sem)]))
    if ins is not None:
        panels.append(("instance", _lut(np.unique(ins), instance_colour)[sl(ins)]))
    base = sl(img.array.astype(np.float32))
    lo, hi = np.percentile(base, [0.5, 99.5]) if base.size else (0, 1)
    height = float(np.clip(3.2 * base.shape[0] * aspect / max(base.shape[1], 1), 2.0, 9.0)) + 0.4
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), height), dpi=110, squeeze=False)
    for ax, (name, overlay) in zip(axes[0], panels):
        ax.imshow(base, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                  interpolation="nearest")
        if overlay is not None:
            ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
