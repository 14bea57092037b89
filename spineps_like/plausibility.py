"""Checks after the work: is what was found anatomy? Flags, never silent corrections.

A semantic model can paint a spine where there is none (noise, another body part) or paint a broken one. These
checks look at the result the way a reader would and return one plain-language flag per problem; the pipeline puts
them in the summary (``"plausibility"``) and the command line prints them and exits with code 3
(``--allow-implausible`` keeps 0). Thresholds are wide on purpose: a real adult spine, cut by any field of view, passes.

- :data:`CORPUS_CM3`: the vertebral body (corpus + endplates) of a vertebra the field of view did not cut lies between
  0.8 cm3 (a small C3 of a small adult: ~3 cm3) and 150 cm3 (a large L5: ~60 cm3), per region;
- :data:`NEIGHBOUR_MM`: neighbouring vertebra centroids are 8-70 mm apart (cervical ~15 mm, lumbar ~40 mm);
- :data:`MIN_BODY_FRACTION`: at least a third of the vertebrae must hold a body (corpus).

:func:`advisories` adds what deserves a look without making the result implausible: vertebrae without any spinal
canal or cord (every vertebra rings the canal, but many CT label sets, and models trained on them, leave it out).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from spineps_like.labels import ANATOMICAL_ORDER, IVD_OFFSET, SACRUM_ID, instance_name, label_counts, present_ids

#: Body volume range (cm3) of a complete vertebra, by region letter of its name.
CORPUS_CM3: dict[str, tuple[float, float]] = {"C": (0.8, 40.0), "T": (2.0, 100.0), "L": (5.0, 150.0)}
#: Distance range (mm) between the centroids of neighbouring vertebrae.
NEIGHBOUR_MM: tuple[float, float] = (8.0, 70.0)
MIN_BODY_FRACTION = 1.0 / 3.0
_BODY_LABELS = (49, 50, 52, 53, 62)
_CANAL_LABELS = (60, 61)


def _vertebra_ids(instance: np.ndarray) -> list[int]:
    """Vertebra ids present (sacrum included), from one counting pass over the mask."""
    return [int(i) for i in present_ids(instance) if 0 < i < IVD_OFFSET]


def result_flags(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float],
                 complete: dict[int, bool] | None = None) -> list[str]:
    """Plain-language flags for an implausible result (empty: nothing implausible found).

    ``semantic`` and ``instance`` are the final masks on one grid with voxel size ``spacing`` (mm); ``complete``
    maps vertebra id -> False where the field of view cut it (those skip the volume check).
    """
    sem = np.asarray(semantic)
    ins = np.asarray(instance)
    if sem.shape != ins.shape:
        raise ValueError(f"semantic {sem.shape} and instance {ins.shape} masks differ in shape")
    sp = np.asarray(spacing, dtype=float)
    vox_cm3 = float(np.prod(sp)) / 1000.0
    ids = _vertebra_ids(ins)
    vertebrae = [i for i in ids if i != SACRUM_ID]
    flags: list[str] = []
    if not vertebrae:
        return flags
    body = np.isin(sem, _BODY_LABELS)
    body_counts = label_counts(np.where(body & (ins < 100), ins, 0), minlength=max(ids) + 1)
    with_body = [v for v in vertebrae if body_counts[v] > 0]
    if len(with_body) < MIN_BODY_FRACTION * len(vertebrae):
        flags.append(f"only {len(with_body)} of {len(vertebrae)} vertebrae hold a vertebral body")
    for v in with_body:
        if complete is not None and not complete.get(v, True):
            continue
        name = instance_name(v)
        lo, hi = CORPUS_CM3.get(name[0], (0.8, 150.0))
        cm3 = float(body_counts[v]) * vox_cm3
        if not lo <= cm3 <= hi:
            flags.append(f"{name}: vertebral body of {cm3:.1f} cm3, outside {lo:g}-{hi:g} cm3 for the region")
    if len(vertebrae) > 1:
        from spineps_like.labeling import centroids

        cen = {v: c * sp for v, c in centroids(ins, vertebrae).items()}
        order = sorted(vertebrae, key=ANATOMICAL_ORDER.index)  # T13 (28) between T12 and L1
        for u, w in zip(order[:-1], order[1:]):
            d = float(np.linalg.norm(cen[u] - cen[w]))
            if not NEIGHBOUR_MM[0] <= d <= NEIGHBOUR_MM[1]:
                flags.append(f"{instance_name(u)} and {instance_name(w)}: centroids {d:.0f} mm apart, outside "
                             f"{NEIGHBOUR_MM[0]:g}-{NEIGHBOUR_MM[1]:g} mm")
    return flags


def advisories(semantic: np.ndarray, instance: np.ndarray) -> list[str]:
    """What deserves a look but does not make a result implausible (see the module docstring)."""
    n = len([i for i in _vertebra_ids(instance) if i != SACRUM_ID])
    if n and not np.isin(np.asarray(semantic), _CANAL_LABELS).any():
        return [f"{n} vertebrae but no spinal canal or cord anywhere (a label set without the canal, or no spine)"]
    return []


def summary_entry(flags: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """The summary's ``"plausibility"`` entry: implausible ``flags`` and advisory ``notes``."""
    return {"plausible": not flags, "flags": list(flags), "advisories": list(notes or [])}
