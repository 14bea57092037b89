"""The SPIDER challenge protocol (lumbar spine MRI; DIAGNijmegen/SPIDER-Evaluation) and a converter between
SPIDER labels and ours.

SPIDER label scheme (one mask):

- 1-25: vertebrae numbered from the bottom, 1 = the lowest lumbar vertebra (L5; L6 when a sixth lumbar exists);
- 100: spinal canal (the whole dural sac: our canal 61 and cord 60);
- 101-125: partially visible vertebrae (100 + the vertebra's number);
- 201-225: intervertebral discs, 200 + the number of the vertebra *above* the disc (L5/S1 = 201).

SPIDER has no sacrum, coccyx, endplate or subregion labels.

Scoring rules, per reference label g (as the challenge code does them):

- matching: the predicted label with the largest overlap with g (``bincount(pred[gt == g]).argmax()`` over
  non-zero labels); several references may map to one prediction; no overlap -> unmatched;
- ``Dice(g) = 2 |G & P| / (|G| + |P|)`` with P the *whole* matched predicted label, 0 when unmatched;
- a vertebra / disc is detected when ``Dice >= 0.1``; ``detection_rate = detected / total``;
- ``<class>.dice`` = mean Dice over the *detected* structures of the class;
- ``ASD(g)`` = mean of the pooled border distances in both directions (border with full connectivity,
  see :func:`~spineps_like.evaluation.surface.assd_pooled`), NaN when unmatched; ``<class>.asd`` = mean over all
  structures of the class, so **one unmatched structure makes the class ASD NaN** (the challenge's np.mean);
- partially visible vertebrae (101-125) count only in ``overall.dice`` / ``overall.asd`` (mean over every label).

Deviations, all documented: spacing is applied in array-axis order (the challenge applies SimpleITK's (x, y, z)
spacing to the (z, y, x) array; ``challenge_spacing=True`` reproduces that); a reference without canal gives NaN
canal metrics (the challenge writes 999); a class absent from the reference gives NaN (the challenge divides by
zero).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from spineps_like.evaluation.surface import as_label_array, assd_pooled, check_pair, check_spacing
from spineps_like.geometry import bbox
from spineps_like.labels import (
    ENDPLATE_OFFSET,
    IVD_OFFSET,
    VERTEBRA_NAME_TO_ID,
    Semantic,
    present_ids,
)

SPIDER_CANAL = 100
SPIDER_PARTIAL_OFFSET = 100
SPIDER_IVD_OFFSET = 200
SPIDER_MAX_VERTEBRAE = 25
_L6 = VERTEBRA_NAME_TO_ID["L6"]
_T13 = VERTEBRA_NAME_TO_ID["T13"]


def spider_column(lumbar6: bool = False, thoracic13: bool = False) -> list[int]:
    """Our vertebra ids in SPIDER order, bottom first: entry n-1 is the vertebra SPIDER numbers n."""
    names = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
    names += ["T13"] if thoracic13 else []
    names += [f"L{i}" for i in range(1, 6)] + (["L6"] if lumbar6 else [])
    return [VERTEBRA_NAME_TO_ID[n] for n in reversed(names)]


def to_spider(
    instance: np.ndarray, semantic: np.ndarray | None = None, *, partial: Iterable[int] = ()
) -> np.ndarray:
    """Convert our instance mask (+ semantic mask for the canal) into one SPIDER-label mask.

    Vertebra v -> its number from the bottom (L5 = 1, or L6 = 1 when id 25 is present; T13 counted when id 28 is
    present); its endplates (200 + v) join the vertebra; the IVD below v (100 + v) -> 200 + number(v);
    semantic canal 61 and cord 60 -> 100 (where no vertebra/IVD lies); sacrum, coccyx and their IVDs/endplates
    are dropped (SPIDER has no label for them). Vertebra ids in ``partial`` get 100 + number.

    Returns a uint16 array; ValueError for labels outside the instance scheme or a vertebra numbered above 25.
    """
    inst = as_label_array(instance, "instance mask")
    present = present_ids(inst)
    present = present[present > 0]
    bad = [int(v) for v in present if v >= 300 or (v % 100) == 0 or (v % 100) > 28]
    if bad:
        raise ValueError(f"instance mask holds labels outside the instance scheme: {bad[:10]}")
    verts = {int(v) % 100 for v in present}
    column = spider_column(lumbar6=_L6 in verts, thoracic13=_T13 in verts)
    number = {v: n + 1 for n, v in enumerate(column)}
    too_high = sorted(v for v in verts if number.get(v, 0) > SPIDER_MAX_VERTEBRAE)
    if too_high:
        raise ValueError(f"vertebrae {too_high} would be numbered above {SPIDER_MAX_VERTEBRAE} in SPIDER")
    partial = {int(p) for p in partial}
    lut = np.zeros(300, np.uint16)
    for v, n in number.items():
        vert_label = SPIDER_PARTIAL_OFFSET + n if v in partial else n
        lut[v] = vert_label
        lut[ENDPLATE_OFFSET + v] = vert_label
        lut[IVD_OFFSET + v] = SPIDER_IVD_OFFSET + n
    out = lut[inst]
    if semantic is not None:
        sem = as_label_array(semantic, "semantic mask")
        if sem.shape != inst.shape:
            raise ValueError(f"semantic mask shape {sem.shape} differs from instance mask shape {inst.shape}")
        canal = np.isin(sem, (int(Semantic.CANAL), int(Semantic.CORD))) & (out == 0)
        out[canal] = SPIDER_CANAL
    return out


def from_spider(
    spider: np.ndarray, *, lumbar6: bool = False, thoracic13: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Convert a SPIDER-label mask into our (instance, semantic) masks.

    Vertebra number n (and partial 100 + n) -> vertebra id ``spider_column(lumbar6, thoracic13)[n - 1]``; disc
    200 + n -> IVD id 100 + that vertebra; canal 100 -> semantic 61. SPIDER carries no subregions: vertebra voxels get
    semantic 49 (corpus) and only whole-vertebra, IVD and canal Dice are meaningful against it
    (:data:`~spineps_like.evaluation.spineps_protocol.SPIDER_STRUCTURES`). Pass ``lumbar6=True`` when label 1 is
    L6. Returns (instance uint16, semantic uint8).
    """
    sp = as_label_array(spider, "SPIDER mask")
    column = spider_column(lumbar6=lumbar6, thoracic13=thoracic13)
    inst_lut = np.zeros(SPIDER_IVD_OFFSET + SPIDER_MAX_VERTEBRAE + 1, np.uint16)
    sem_lut = np.zeros_like(inst_lut, dtype=np.uint8)
    for n in range(1, min(len(column), SPIDER_MAX_VERTEBRAE) + 1):
        v = column[n - 1]
        for lab in (n, SPIDER_PARTIAL_OFFSET + n):
            inst_lut[lab], sem_lut[lab] = v, int(Semantic.CORPUS)
        inst_lut[SPIDER_IVD_OFFSET + n], sem_lut[SPIDER_IVD_OFFSET + n] = IVD_OFFSET + v, int(Semantic.IVD)
    sem_lut[SPIDER_CANAL] = int(Semantic.CANAL)
    valid = (inst_lut > 0) | (sem_lut > 0)
    present = present_ids(sp)
    bad = [int(v) for v in present if v > 0 and (v >= valid.size or not valid[v])]
    if bad:
        raise ValueError(f"SPIDER mask holds labels outside the SPIDER scheme (or beyond the column): {bad[:10]}")
    return inst_lut[sp], sem_lut[sp]


def evaluate_spider(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    detection_threshold: float = 0.1,
    connectivity: int = 3,
    challenge_spacing: bool = False,
) -> dict[str, float]:
    """Score one case by the SPIDER challenge rules (see the module docstring) on SPIDER-label masks.

    Returns ``{"vertebrae.dice", "vertebrae.detection_rate", "vertebrae.asd", "vertebrae.n_ref", "ivd.dice",
    "ivd.detection_rate", "ivd.asd", "ivd.n_ref", "canal.dice", "canal.asd", "overall.dice", "overall.asd"}``
    (distances in mm).
    """
    pred, gt = check_pair(pred, gt, "SPIDER mask")
    sp = check_spacing(spacing)
    if challenge_spacing:
        sp = sp[::-1]
    nan = float("nan")
    per_label: dict[int, tuple[float, float]] = {}  # reference label -> (dice, asd)
    n = int(max(pred.max(initial=0), gt.max(initial=0))) + 1
    box = bbox((pred > 0) | (gt > 0))
    if box is not None:
        p, g = pred[box], gt[box]
        counts = np.bincount(g.astype(np.int64).ravel() * n + p.astype(np.int64).ravel(),
                             minlength=n * n).reshape(n, n)  # counts[g, p]
        pred_size = counts.sum(axis=0)
        obj_g, obj_p = ndimage.find_objects(g), ndimage.find_objects(p)
        for lab in np.flatnonzero(counts[1:].sum(axis=1)) + 1:
            row = counts[lab, 1:]
            size = counts[lab].sum()
            if row.sum() == 0:
                per_label[int(lab)] = (0.0, nan)
                continue
            match = int(row.argmax()) + 1
            dice = float(2 * counts[lab, match] / (size + pred_size[match]))
            sl = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                       for a, b in zip(obj_g[lab - 1], obj_p[match - 1]))
            dist = assd_pooled(g[sl] == lab, p[sl] == match, sp, connectivity)
            per_label[int(lab)] = (dice, dist)

    out: dict[str, float] = {}
    classes = {
        "vertebrae": [lab for lab in per_label if 0 < lab < SPIDER_CANAL],
        "ivd": [lab for lab in per_label if lab > SPIDER_IVD_OFFSET],
    }
    for name, labels in classes.items():
        dices = np.array([per_label[lab][0] for lab in labels])
        detected = dices >= detection_threshold
        out[f"{name}.dice"] = float(dices[detected].mean()) if detected.any() else nan
        out[f"{name}.detection_rate"] = float(detected.mean()) if labels else nan
        out[f"{name}.asd"] = float(np.mean([per_label[lab][1] for lab in labels])) if labels else nan
        out[f"{name}.n_ref"] = float(len(labels))
    out["canal.dice"], out["canal.asd"] = per_label.get(SPIDER_CANAL, (nan, nan))
    out["overall.dice"] = float(np.mean([d for d, _ in per_label.values()])) if per_label else nan
    out["overall.asd"] = float(np.mean([a for _, a in per_label.values()])) if per_label else nan
    return out
