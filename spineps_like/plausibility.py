"""Checks after the work: is what was found anatomy? Flags, never silent corrections.

A semantic model can paint a spine where there is none (noise, another body part) or paint a broken one. These
checks look at the result the way a reader would and return one plain-language flag per problem; the pipeline puts
them in the summary (``"plausibility"``) and the command line prints them and exits with code 3
(``--allow-implausible`` keeps 0). Thresholds are wide on purpose: a real adult spine, cut by any field of view, passes.

- :data:`CORPUS_CM3`: the vertebral body (corpus + endplates) of a vertebra the field of view did not cut lies between
  0.8 cm3 (a small C3 of a small adult: ~3 cm3) and 150 cm3 (a large L5: ~60 cm3), per region;
- :data:`NEIGHBOUR_MM`: neighbouring vertebra centroids are 8-70 mm apart (cervical ~15 mm, lumbar ~40 mm);
- :data:`MIN_BODY_FRACTION`: at least a third of the vertebrae must hold a body (corpus);
- :data:`MAX_VERTEBRAE`: at most 26 vertebrae; :data:`MERGED_BODY_RATIO`: no body taller than 1.9 x its neighbours;
- a single vertebra with neither posterior elements nor a spinal canal in the image is a blob, not a spine (what a
  model paints, if anything, into an image without a spine);
- :data:`COLUMN_END_PITCHES`: the column ends only at the sacrum: without one, the lowest structure found must reach
  to within 2 vertebral pitches (at least 40 mm) of the bottom of the field of view, else vertebrae below were missed
  or what was found is no spine (smooth random blobs gave four 'cervical vertebrae' in the top third of an image);
  likewise a sacrum without any vertebra must reach to within 40 mm of the top of the field of view (pelvic bone of a
  CT without a spine was painted as an 11 cm3 'sacrum' 234 mm below the top).

:func:`vertebra_confidence` grades each vertebra's id (its anchor) and body (its height against its neighbours) for
the summary, so that a cohort's weak results can be found.

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
#: Vertebrae of a whole spine (C1-C7, T1-T12, L1-L5) with both transitional extras (T13, L6).
MAX_VERTEBRAE = 26
#: A body taller than this x its neighbours' is two or more bodies in one instance (two bodies and a disc ~ 2.3 x).
MERGED_BODY_RATIO = 1.9
_BODY_LABELS = (49, 50, 52, 53, 62)
_CANAL_LABELS = (60, 61)
#: Without a sacrum, the lowest structure must reach within this many vertebral pitches (and at least
#: :data:`COLUMN_END_MIN_MM`) of the bottom of the field of view.
COLUMN_END_PITCHES = 2.0
COLUMN_END_MIN_MM = 40.0
_POSTERIOR_LABELS = (41, 42, 43, 44, 45, 46, 47, 48)


def _vertebra_ids(instance: np.ndarray) -> list[int]:
    """Vertebra ids present (sacrum included), from one counting pass over the mask."""
    return [int(i) for i in present_ids(instance) if 0 < i < IVD_OFFSET]


def result_flags(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float],
                 complete: dict[int, bool] | None = None, measurements: dict[str, Any] | None = None,
                 affine: np.ndarray | None = None) -> list[str]:
    """Plain-language flags for an implausible result (empty: nothing implausible found).

    ``semantic`` and ``instance`` are the final masks on one grid with voxel size ``spacing`` (mm); ``complete``
    maps vertebra id -> False where the field of view cut it (those skip the volume check); ``measurements``
    (:func:`spineps_like.measure.measure`) adds the body-height check (:data:`MERGED_BODY_RATIO`); ``affine`` (the
    masks' voxel-to-world matrix) adds the column-end check (:data:`COLUMN_END_PITCHES`).
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
        return _sacrum_alone(ins, affine) if affine is not None and SACRUM_ID in ids else flags
    body = np.isin(sem, _BODY_LABELS)
    body_counts = label_counts(np.where(body & (ins < 100), ins, 0), minlength=max(ids) + 1)
    with_body = [v for v in vertebrae if body_counts[v] > 0]
    if len(vertebrae) == 1 and not np.isin(sem, _CANAL_LABELS).any() \
            and not np.isin(sem[ins == vertebrae[0]], _POSTERIOR_LABELS).any():
        flags.append("a single vertebral body alone, without posterior elements or a spinal canal: not a spine")
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
    if len(vertebrae) > MAX_VERTEBRAE:
        flags.append(f"{len(vertebrae)} vertebrae: more than the {MAX_VERTEBRAE} of a spine with T13 and L6")
    for rec in (measurements or {}).get("vertebrae", []):
        ratio = rec.get("ratio_posterior_neighbours")
        if rec["id"] not in (1, 2) and ratio is not None and ratio > MERGED_BODY_RATIO:  # C1 has no body, C2 a dens
            flags.append(f"{rec['name']}: body {ratio:.1f} x as tall as its neighbours: several vertebral bodies in "
                         "one instance")
    if affine is not None and SACRUM_ID not in ids:
        flags += _column_end(ins, affine, vertebrae)
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


def _inferior_view(instance: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """The mask viewed in PIR (axis 1 runs inferior) and the voxel size (mm) along that axis."""
    from spineps_like.geometry import oriented_view, reoriented_grid

    _, aff = reoriented_grid(instance.shape, affine, "PIR")
    return oriented_view(instance, affine, "PIR"), float(np.linalg.norm(aff[:3, 1]))


def _sacrum_alone(instance: np.ndarray, affine: np.ndarray) -> list[str]:
    """A sacrum with no vertebra above it, although the field of view reaches more than :data:`COLUMN_END_MIN_MM`
    above its top, where L5 (or L6) would be seen: pelvic bone painted as sacrum in an image without a spine."""
    ins, sp_i = _inferior_view(instance, affine)
    rows = np.flatnonzero((ins == SACRUM_ID).any(axis=(0, 2)))
    gap_mm = int(rows[0]) * sp_i
    if gap_mm <= COLUMN_END_MIN_MM:
        return []
    return [f"a sacrum without any vertebra above it, although the field of view reaches {gap_mm:.0f} mm above it "
            f"(more than {COLUMN_END_MIN_MM:.0f} mm): the lumbar spine would be seen there, so this is no sacrum"]


def _column_end(instance: np.ndarray, affine: np.ndarray, vertebrae: list[int]) -> list[str]:
    """The column-end flag (see :data:`COLUMN_END_PITCHES`); empty when the lowest structure is near the bottom."""
    from spineps_like.masks import nonzero_coords, unique_ints

    ins, sp_i = _inferior_view(instance, affine)
    rows = np.flatnonzero(ins.any(axis=(0, 2)))
    if not len(rows):
        return []
    gap_mm = (ins.shape[1] - 1 - int(rows[-1])) * sp_i
    # each vertebra's centre row (the mean of the rows it occupies), for the pitch: one pass over its voxels
    _, row, _ = coords = nonzero_coords(np.isin(ins, vertebrae))
    keys = unique_ints(ins[coords].astype(np.int64) * ins.shape[1] + row)
    labels, occupied = np.divmod(keys, ins.shape[1])
    n_rows = np.bincount(labels)
    tops = np.bincount(labels, weights=occupied)[n_rows > 0] / n_rows[n_rows > 0]
    pitch_mm = float(np.median(np.diff(np.sort(tops)))) * sp_i if len(tops) > 1 else 0.0
    limit = max(COLUMN_END_PITCHES * pitch_mm, COLUMN_END_MIN_MM)
    if gap_mm <= limit:
        return []
    return [f"the column ends {gap_mm:.0f} mm above the bottom of the field of view without a sacrum (more than "
            f"{limit:.0f} mm): vertebrae below were missed, or what was found is no spine"]


def advisories(semantic: np.ndarray, instance: np.ndarray) -> list[str]:
    """What deserves a look but does not make a result implausible (see the module docstring)."""
    n = len([i for i in _vertebra_ids(instance) if i != SACRUM_ID])
    if n and not np.isin(np.asarray(semantic), _CANAL_LABELS).any():
        return [f"{n} vertebrae but no spinal canal or cord anywhere (a label set without the canal, or no spine)"]
    return []


#: A body taller than this x its neighbours' (posterior height) is likely two bodies in one instance; lower than
#: :data:`LOW_BODY_RATIO` x, a body split in two or a severe fracture.
TALL_BODY_RATIO = 1.6
LOW_BODY_RATIO = 0.5
#: Ids more than this many levels from their anchor rest on a long count: one missed or doubled body shifts them.
FAR_FROM_ANCHOR = 10


def vertebra_confidence(labeling: Any, measurements: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Per-vertebra confidence for the summary: how its id was found and whether its body looks like one body.

    ``labeling`` is the :class:`spineps_like.labeling.LabelingResult`, ``measurements`` the output of
    :func:`spineps_like.measure.measure` (None: body checks skipped). For each vertebra id::

        {"level": "high" | "medium" | "low",        # the lower of the two below
         "id": {"level", "anchor", "levels_from_anchor", "why"},
         "body": {"level", "height_vs_neighbours", "why"}}

    Id: ``low`` without an anchor (the ids are a count), ``medium`` when the labelling was ambiguous (T13/L6, counts
    that disagree), for a transitional id, or more than :data:`FAR_FROM_ANCHOR` levels from the anchor; else
    ``high``. Body: ``low`` when its posterior body height is over :data:`TALL_BODY_RATIO` x (two bodies in one
    instance?) or under :data:`LOW_BODY_RATIO` x (a split body, or a severe fracture) that of its neighbours,
    ``medium`` when the field of view cuts it or it could not be measured; else ``high``.
    """
    order = [int(v) for v in getattr(labeling, "order", []) or []]
    anchor = getattr(labeling, "anchor", "none")
    ambiguous = bool(getattr(labeling, "ambiguous", False))
    records = {int(r["id"]): r for r in (measurements or {}).get("vertebrae", [])}
    rank = {"low": 0, "medium": 1, "high": 2}
    out: dict[int, dict[str, Any]] = {}
    n = len(order)
    for k, v in enumerate(order):
        dist = {"sacrum": n - k, "C2": k - order.index(2) if 2 in order else None}
        if anchor == "sacrum+C2":
            steps = min(d for d in dist.values() if d is not None)
        else:
            steps = dist.get(anchor)
        if anchor == "none":
            idc = {"level": "low", "why": "no anchor in view: the id is a count from the top, not anatomy"}
        elif ambiguous or v in (25, 28):
            idc = {"level": "medium", "why": "the labelling was ambiguous (see labeling.notes)" if ambiguous
                   else "a transitional vertebra"}
        elif steps is not None and abs(steps) > FAR_FROM_ANCHOR:
            idc = {"level": "medium", "why": f"{abs(steps)} levels from the anchor: one missed or doubled body "
                   "shifts the id"}
        else:
            idc = {"level": "high", "why": f"counted from the {anchor.split('+')[0]}"}
        idc.update({"anchor": anchor, "levels_from_anchor": None if steps is None else abs(int(steps))})
        rec = records.get(v)
        ratio = rec.get("ratio_posterior_neighbours") if rec and v not in (1, 2) else None  # C1: no body; C2: dens
        if rec is None:
            body = {"level": "medium", "why": "not measured"}
        elif ratio is not None and ratio > TALL_BODY_RATIO:
            body = {"level": "low", "why": f"body {ratio:.1f} x as tall as its neighbours: two bodies in one "
                    "instance?"}
        elif ratio is not None and ratio < LOW_BODY_RATIO:
            body = {"level": "low", "why": f"body {ratio:.1f} x as tall as its neighbours: a split body or a "
                    "severe fracture"}
        elif rec.get("complete") is False:
            body = {"level": "medium", "why": "cut by the field of view"}
        elif ratio is None:
            body = {"level": "medium", "why": "no neighbour to compare its height with"}
        else:
            body = {"level": "high", "why": "one body of its neighbours' height"}
        body["height_vs_neighbours"] = ratio
        out[v] = {"level": min((idc["level"], body["level"]), key=rank.__getitem__), "id": idc, "body": body}
    return out


def summary_entry(flags: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """The summary's ``"plausibility"`` entry: implausible ``flags`` and advisory ``notes``."""
    return {"plausible": not flags, "flags": list(flags), "advisories": list(notes or [])}
