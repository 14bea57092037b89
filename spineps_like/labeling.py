"""Anatomical vertebra ids, completeness flags, centroid (POI) json and per-vertebra summary.

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis.

Numbering (:func:`label_vertebrae`), by the anchors in view:

- **sacrum (26) in view**: anchored from below: the vertebra above the sacrum is the last lumbar (L5, or L6 with six
  lumbar vertebrae), then upwards L4 ... L1, T12 ... (T13 when the count between C2 and the sacrum asks for it).
  ``lumbar_count`` fixes the number of lumbar vertebrae; ``None`` (default) decides between 5 and 6: a sixth vertebra
  above the sacrum counts as lumbar (L6) when it is fully in view and its costal processes are of lumbar size (a
  left-right span, relative to its corpus width, of at least 0.85 x the median of the five below; T12 has only
  rudimentary transverse processes). An L6 decision is reported as ambiguous: ribs are not in the mask.
- **C2 in view** (the topmost vertebra holds the dens label 51, or its corpus has a narrow part reaching far above its
  body), anchored from above: C2, C3, ...; a vertebra above C2 is C1.
- **both**: anchored from below; the count from C2 down to the sacrum checks it (24 instead of 23 -> T13 or L6,
  22 -> 11 thoracic or 4 lumbar) and disagreements are reported.
- **none**: a top-to-bottom count starting at ``first_id`` (default 2, "C2", as SPINEPS does without its labelling
  model): these ids are a count, not anatomy, and the result says so (``anchor == "none"``).

A body the semantic mask lost (neighbouring corpus centres far further apart than the others,
:func:`missing_levels`) keeps its place in every count: its id is skipped, the ids beyond it are not shifted, and the
notes say so. The sacrum passed in is trusted: :func:`spineps_like.sacrum.confirm_sacrum` decides before.

IVD ids (100 + v) and endplate ids (200 + v) follow their vertebra; the disc above the topmost vertebra (100 + an
id not in view) becomes the IVD of the vertebra before the top one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import cc3d
import nibabel as nib
import numpy as np

from spineps_like.assign import map_aliases, vertebra_ids, vertebra_order
from spineps_like.io import atomic_write_json
from spineps_like.labels import (
    ANATOMICAL_ORDER,
    ENDPLATE_OFFSET,
    IVD_OFFSET,
    SACRUM_ID,
    VERTEBRA_ID_TO_NAME,
    VERTEBRA_NAME_TO_ID,
    instance_name,
    label_mask,
)
from spineps_like.masks import check_mask, check_spacing, nonzero_coords, present_ids

_C = [VERTEBRA_NAME_TO_ID[f"C{i}"] for i in range(1, 8)]
_T = [VERTEBRA_NAME_TO_ID[f"T{i}"] for i in range(1, 13)]
_L = [VERTEBRA_NAME_TO_ID[f"L{i}"] for i in range(1, 7)]
T13 = VERTEBRA_NAME_TO_ID["T13"]


@dataclass
class LabelingResult:
    """How :func:`label_vertebrae` numbered the vertebrae.

    Attributes
    ----------
    mapping : {old id: new id} for every vertebra (IVD and endplate ids follow).
    anchor : "sacrum", "C2", "sacrum+C2" or "none" (a count from ``first_id``, not anatomy).
    order : new ids top to bottom (sacrum excluded).
    names : {new id: name}.
    complete : {new id: bool}: False when the vertebra is cut by the field of view.
    truncated_by : {new id: reasons}: "top" / "bottom" (touches the array's first / last row along axis 1),
        "corpus at border" (its corpus touches any array border), "no corpus".
    ambiguous : True when the numbering rests on a guess (T13/L6, counts that disagree, an unjudgeable candidate).
    notes : human-readable lines on every decision.
    """

    mapping: dict[int, int] = field(default_factory=dict)
    anchor: str = "none"
    order: list[int] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    complete: dict[int, bool] = field(default_factory=dict)
    truncated_by: dict[int, list[str]] = field(default_factory=dict)
    ambiguous: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("mapping", "names", "complete", "truncated_by"):
            d[k] = {str(a): b for a, b in d[k].items()}
        return d


@dataclass
class _Features:
    ids: np.ndarray  # vertebra ids in spine order (sacrum excluded)
    corpus: np.ndarray  # corpus voxels
    bone: np.ndarray  # all voxels of the vertebra
    costal: np.ndarray  # costal-process voxels (43/44)
    costal_span: np.ndarray  # left-right extent of the costal processes / that of the corpus (0 without costal)
    dens: np.ndarray  # voxels of label 51
    protrusion_mm: np.ndarray  # corpus extent above its body (rows narrower than half the widest), mm
    body_mm: np.ndarray  # body height along axis 1, mm
    top: np.ndarray  # touches axis-1 first row
    bottom: np.ndarray  # touches axis-1 last row
    corpus_border: np.ndarray  # corpus touches any array border


def _features(vmask: np.ndarray, sem_raw: np.ndarray, sem: np.ndarray, ids: np.ndarray, sp: np.ndarray) -> _Features:
    """Per-vertebra features from ``vmask``, the instance mask's vertebra ids (0 elsewhere, sacrum excluded)."""
    n = int(ids.max(initial=0)) + 1
    nz = nonzero_coords(vmask)
    lab = vmask[nz].astype(np.int64)
    s = sem[nz]
    bone = np.bincount(lab, minlength=n)
    corpus_sel = s == 49
    corpus = np.bincount(lab[corpus_sel], minlength=n)
    costal_sel = label_mask(s, (43, 44))
    costal = np.bincount(lab[costal_sel], minlength=n)
    dens = np.bincount(lab[sem_raw[nz] == 51], minlength=n)
    # left-right extents (axis 2) of the costal processes and of the corpus
    def lr_extent(sel: np.ndarray) -> np.ndarray:
        lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(n, -1, dtype=np.int64)
        np.minimum.at(lo, lab[sel], nz[2][sel])
        np.maximum.at(hi, lab[sel], nz[2][sel])
        return np.where(hi >= 0, (hi - lo + 1) * sp[2], 0.0)

    costal_span = lr_extent(costal_sel) / np.maximum(lr_extent(corpus_sel), 1e-6)
    # axis-1 row profile of each corpus: protrusion above the body (dens) and body height
    rows = nz[1][corpus_sel]
    clab = lab[corpus_sel]
    ny = vmask.shape[1]
    prof = np.bincount(clab * ny + rows, minlength=n * ny).reshape(n, ny)
    has = prof.max(axis=1) > 0
    strong = prof >= 0.5 * prof.max(axis=1, keepdims=True)
    first_any = np.argmax(prof > 0, axis=1)
    first_body = np.argmax(strong & has[:, None], axis=1)
    last_body = ny - 1 - np.argmax(strong[:, ::-1], axis=1)
    protrusion = np.where(has, (first_body - first_any) * sp[1], 0.0)
    body = np.where(has, (last_body - first_body + 1) * sp[1], 0.0)
    # borders
    ymin = np.full(n, ny, dtype=np.int64)
    ymax = np.full(n, -1, dtype=np.int64)
    np.minimum.at(ymin, lab, nz[1])
    np.maximum.at(ymax, lab, nz[1])
    top = ymin == 0
    bottom = ymax == ny - 1
    on_border = np.zeros(len(lab), bool)
    for a in range(3):
        on_border |= (nz[a] == 0) | (nz[a] == vmask.shape[a] - 1)
    corpus_border = np.bincount(lab[corpus_sel & on_border], minlength=n) > 0
    take = ids
    return _Features(ids, corpus[take], bone[take], costal[take], costal_span[take], dens[take], protrusion[take],
                     body[take], top[take], bottom[take], corpus_border[take])


def missing_levels(centres_mm: np.ndarray, has_corpus: np.ndarray, *, ratio: float = 1.75, window: int = 3
                   ) -> np.ndarray:
    """How many vertebrae seem missing between each vertebra and the next (spine order): the distance between their
    corpus centres (mm) over ``ratio`` x the median distance of the neighbouring pairs (``window`` on each side)
    means ``round(distance / median) - 1`` bodies the masks lost. Pairs with a vertebra without corpus are not
    judged (its centre is not a body's). Returns an int array of length ``len(centres_mm) - 1``."""
    c = np.asarray(centres_mm, dtype=float)
    n = len(c)
    gaps = np.zeros(max(n - 1, 0), dtype=np.int64)
    if n < 3:
        return gaps
    d = np.linalg.norm(np.diff(c, axis=0), axis=1)
    judged = has_corpus[:-1] & has_corpus[1:]
    for k in np.flatnonzero(judged):
        lo, hi = max(0, k - window), min(n - 1, k + window + 1)
        others = [j for j in range(lo, hi) if j != k and judged[j]]
        if len(others) < 2:
            continue
        ref = float(np.median(d[others]))
        if ref > 0 and d[k] > ratio * ref:
            gaps[k] = max(1, int(round(d[k] / ref)) - 1)
    return gaps


def _with_gaps(f: _Features, gaps: np.ndarray) -> _Features:
    """``f`` with an empty placeholder (id -1, no corpus, not cut) after each vertebra for each level missing there."""
    reps = np.ones(len(f.ids), dtype=np.int64)
    at = np.concatenate([[0], np.cumsum(reps + np.concatenate([gaps, [0]]))])[:-1]  # slot of each real vertebra
    n_slots = int(len(f.ids) + gaps.sum())

    def spread(a: np.ndarray, fill) -> np.ndarray:
        out = np.full(n_slots, fill, dtype=a.dtype)
        out[at] = a
        return out

    return _Features(spread(f.ids, -1), spread(f.corpus, 0), spread(f.bone, 0), spread(f.costal, 0),
                     spread(f.costal_span, 0.0), spread(f.dens, 0), spread(f.protrusion_mm, 0.0),
                     spread(f.body_mm, 0.0), spread(f.top, False), spread(f.bottom, False),
                     spread(f.corpus_border, False))


def _looks_lumbar(f: _Features, k: int, below: np.ndarray, ratio: float = 0.85) -> bool | None:
    """Whether the vertebra at order index ``k`` has lumbar-size costal processes: their left-right span (relative
    to its corpus width) reaches ``ratio`` x the median of the vertebrae at order indices ``below`` (lumbar
    candidates). T12 has only rudimentary transverse processes, a sixth lumbar vertebra full ones. None when it
    cannot be judged (cut by the field of view, or no untruncated reference)."""
    if f.top[k] or f.bottom[k] or f.corpus_border[k] or f.corpus[k] == 0:
        return None
    ref = below[~(f.top[below] | f.bottom[below] | f.corpus_border[below]) & (f.costal_span[below] > 0)]
    if len(ref) == 0:
        return None
    return bool(f.costal_span[k] >= ratio * np.median(f.costal_span[ref]))


def _find_c2(f: _Features, dens_ratio: float) -> tuple[int | None, str]:
    """Order index of C2 (0 or 1) and why, or (None, reason)."""
    n = len(f.ids)
    if n == 0:
        return None, "no vertebra"
    for k in range(min(2, n)):
        if f.dens[k] > 0:
            return k, f"dens label (51) in the vertebra at position {k + 1}"
    ok = ~(f.top | f.bottom) & (f.corpus > 0)
    for k in range(min(2, n)):
        if f.top[k] or f.corpus[k] == 0:
            continue
        others = np.flatnonzero(ok)
        others = others[others != k]
        if len(others) == 0:
            continue
        ref = float(np.median(f.body_mm[others]))
        if f.protrusion_mm[k] >= dens_ratio * ref:
            if k == 1 and f.corpus[0] > 0.3 * f.corpus[1]:
                continue  # a real corpus above: not C1/C2
            return k, (f"corpus of the vertebra at position {k + 1} reaches {f.protrusion_mm[k]:.0f} mm above its "
                       f"body (dens; >= {dens_ratio:g} x the median body height {ref:.0f} mm)")
    return None, "no dens found"


def _anatomical_sequence(n_cervical_from: int, thoracic: int, lumbar: int) -> list[int]:
    """Ids from C<n_cervical_from> down to the last lumbar, with ``thoracic`` (11-13) and ``lumbar`` (4-6)."""
    th = _T[:min(thoracic, 12)] + ([T13] if thoracic == 13 else [])
    return _C[n_cervical_from - 1:] + th + _L[:lumbar]


def label_vertebrae(
    instance: np.ndarray,
    semantic: np.ndarray,
    spacing: Sequence[float],
    *,
    lumbar_count: int | None = None,
    first_id: int = 2,
    use_sacrum: bool = True,
    use_dens: bool = True,
    dens_ratio: float = 0.6,
    use_gaps: bool = True,
) -> tuple[np.ndarray, LabelingResult]:
    """Give the vertebrae anatomical ids (where an anchor is in view) and flag the incomplete ones.

    Parameters
    ----------
    instance : (X, Y, Z) int array, PIR
        Full instance mask (vertebra ids in any numbering, IVD 100 + v, endplate 200 + v, sacrum 26).
    semantic : (X, Y, Z) int array
        Semantic mask (for corpus, costal processes, dens and sacrum).
    spacing : 3 floats
        Voxel size in mm.
    lumbar_count : int, optional
        Number of lumbar vertebrae (4, 5 or 6) when the sacrum anchors the numbering; None decides 5 or 6.
    first_id : int
        Id of the topmost vertebra when no anchor is in view (2 = C2, SPINEPS' convention).
    use_sacrum, use_dens : bool
        Allow the sacrum / C2 anchors.
    dens_ratio : float
        The top vertebra is C2 when its corpus reaches at least this x the median body height above its body.
    use_gaps : bool
        Skip the ids of vertebrae that seem missing (:func:`missing_levels`: a body the semantic mask lost), so that
        the ids beyond the gap stay right.

    Returns
    -------
    instance : int32 array
        Relabelled instance mask.
    result : LabelingResult
    """
    inst, sem_raw, sp = _checked_inputs(instance, semantic, spacing, lumbar_count, first_id)
    sem = map_aliases(sem_raw)
    res = LabelingResult()
    vert = vertebra_ids(inst)
    ids, centres, _ = vertebra_order(vert, sem, sp)
    if len(ids) == 0:
        res.notes.append("no vertebra in the instance mask")
        return inst.astype(np.int32, copy=True), res
    f = _features(vert, sem_raw, sem, ids, sp)
    if use_gaps:
        f = _skip_missing_levels(f, missing_levels(centres * sp, f.corpus > 0), res)
    ids = f.ids
    n = len(ids)
    sacrum = use_sacrum and bool((sem == SACRUM_ID).any() or (inst == SACRUM_ID).any())
    c2_k, c2_why = _find_c2(f, dens_ratio) if use_dens else (None, "dens anchor disabled")
    if sacrum:
        new = _number_from_sacrum(f, c2_k, lumbar_count, res)
    elif c2_k is not None:
        new = _number_from_c2(n, c2_k, c2_why, lumbar_count, res)
    else:
        new = _count_from(first_id, n, res)
    res.mapping = {int(o): int(v) for o, v in zip(ids, new) if o >= 0}
    res.order = [v for o, v in zip(ids, new) if v > 0 and o >= 0]
    res.names = {v: VERTEBRA_ID_TO_NAME[v] for v in res.order}
    res.truncated_by = _truncation(f, new)
    res.complete = {v: not why for v, why in res.truncated_by.items()}
    out = remap_instance(inst, res.mapping, ids[ids >= 0])
    return out, res


def _checked_inputs(instance: np.ndarray, semantic: np.ndarray, spacing: Sequence[float], lumbar_count: int | None,
                    first_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`label_vertebrae`'s arguments checked: the instance and semantic masks and the spacing array."""
    inst = check_mask(instance, "instance mask")
    sem_raw = check_mask(semantic)
    if inst.shape != sem_raw.shape:
        raise ValueError(f"instance mask shape {inst.shape} differs from the semantic mask {sem_raw.shape}")
    sp = check_spacing(spacing)
    if lumbar_count is not None and lumbar_count not in (4, 5, 6):
        raise ValueError(f"lumbar_count must be 4, 5, 6 or None, got {lumbar_count}")
    if first_id not in ANATOMICAL_ORDER or first_id in (SACRUM_ID, 27):
        raise ValueError(f"first_id must be a vertebra id (1-25, 28), got {first_id}")
    return inst, sem_raw, sp


def _skip_missing_levels(f: _Features, gaps: np.ndarray, res: LabelingResult) -> _Features:
    """``f`` with a placeholder for every level that seems missing (``gaps``, see :func:`missing_levels`), so that the
    ids beyond a lost body are not shifted; unchanged, with a plain count noted, when the bodies are too irregularly
    spaced to be a column with a lost body or two. Any skipped level makes the labelling ambiguous."""
    if np.count_nonzero(gaps) > 2 or gaps.sum() > 3:
        res.ambiguous = True
        res.notes.append(f"the bodies are irregularly spaced ({np.count_nonzero(gaps)} gaps of up to "
                         f"{int(gaps.max())} missing levels): no level skipped, the ids are a plain count")
        return f
    if not gaps.any():
        return f
    res.ambiguous = True
    for k in np.flatnonzero(gaps):
        res.notes.append(f"{int(gaps[k])} vertebra(e) seem missing below the {k + 1}. vertebra from the top "
                         "(corpus centres far further apart than their neighbours'): their ids are skipped")
    return _with_gaps(f, gaps)


def _number_from_sacrum(f: _Features, c2_k: int | None, lumbar_count: int | None, res: LabelingResult
                        ) -> list[int]:
    """New ids (top to bottom) of the ``len(f.ids)`` vertebrae above the sacrum: the last lumbar vertebra right
    above it, with the lumbar and thoracic counts of :func:`_sacrum_counts`; those beyond C1 are 0."""
    n = len(f.ids)
    m = n - c2_k if c2_k is not None else None  # vertebrae from C2 down to the one above the sacrum
    res.anchor = "sacrum+C2" if m is not None else "sacrum"
    lc, thoracic = _sacrum_counts(f, m, lumbar_count, res)
    seq = [_C[0]] + _anatomical_sequence(2, thoracic, lc)  # C1 .. last lumbar
    if n > len(seq):
        res.ambiguous = True
        res.notes.append(f"{n} vertebrae above the sacrum exceed the anatomical sequence; the topmost "
                         f"{n - len(seq)} are left unnumbered (0)")
        new = [0] * (n - len(seq)) + seq
    else:
        new = seq[len(seq) - n:]
    res.notes.append(f"anchored by the sacrum: the vertebra above it is {VERTEBRA_ID_TO_NAME[new[-1]]}")
    return new


def _sacrum_counts(f: _Features, m: int | None, lumbar_count: int | None, res: LabelingResult) -> tuple[int, int]:
    """(lumbar, thoracic) vertebrae above the sacrum: ``lumbar_count`` when given (the thoracic from the ``m``
    vertebrae from C2 to the sacrum, when C2 is in view); else from ``m`` when it is 23, 22 or 24; else 5 and 12 or
    L6, as the costal processes of the 6th vertebra above the sacrum say."""
    if lumbar_count is not None:
        return lumbar_count, _thoracic_count(m, lumbar_count, res)
    if m == 23:
        res.notes.append("23 vertebrae from C2 to the sacrum: C2-C7, 12 thoracic, 5 lumbar")
        return 5, 12
    if m in (22, 24):
        return _one_off_counts(f, m, res)
    return _counts_from_costal(f, m, res)


def _thoracic_count(m: int | None, lc: int, res: LabelingResult) -> int:
    """Thoracic vertebrae between C7 and ``lc`` lumbar ones when ``m`` vertebrae lie from C2 to the sacrum: 11-13,
    else (or without C2 in view) 12."""
    if m is None:
        return 12
    th = m - 6 - lc
    if 11 <= th <= 13:
        if th != 12:
            res.ambiguous = True
            res.notes.append(f"{m} vertebrae from C2 to the sacrum with {lc} lumbar: {th} thoracic")
        return th
    res.ambiguous = True
    res.notes.append(f"{m} vertebrae from C2 to the sacrum do not fit {lc} lumbar vertebrae: numbered from the sacrum")
    return 12


def _one_off_counts(f: _Features, m: int, res: LabelingResult) -> tuple[int, int]:
    """(lumbar, thoracic) for 24 or 22 vertebrae from C2 to the sacrum, one too many or too few: lumbar or thoracic?
    The costal processes decide."""
    n = len(f.ids)
    k = n - 6 if m == 24 else n - 5
    verdict = _looks_lumbar(f, k, np.arange(k + 1, n))
    res.ambiguous = True
    if m == 24:
        if verdict:
            res.notes.append("24 vertebrae from C2 to the sacrum and the 6th above the sacrum has lumbar-size costal "
                             "processes: L6")
            return 6, 12
        res.notes.append("24 vertebrae from C2 to the sacrum and the 6th above the sacrum has small costal processes "
                         "(or cannot be judged): T13")
        return 5, 13
    if verdict is False:
        res.notes.append("22 vertebrae from C2 to the sacrum and the 5th above the sacrum has small costal processes: "
                         "4 lumbar vertebrae")
        return 4, 12
    res.notes.append("22 vertebrae from C2 to the sacrum: 11 thoracic vertebrae assumed")
    return 5, 11


def _counts_from_costal(f: _Features, m: int | None, res: LabelingResult) -> tuple[int, int]:
    """(lumbar, thoracic) from the costal processes of the 6th vertebra above the sacrum: L6 when lumbar-size, else
    5 lumbar; ``m`` (vertebrae from C2 to the sacrum, when C2 is in view) other than 22-24 is noted as ambiguous."""
    n = len(f.ids)
    if m is not None:
        res.ambiguous = True
        res.notes.append(f"{m} vertebrae from C2 to the sacrum, expected 23: numbered from the sacrum "
                         "(a vertebra may be missing, merged or out of view)")
    if n < 6:
        return 5, 12
    verdict = _looks_lumbar(f, n - 6, np.arange(n - 5, n))
    if verdict is None:
        res.ambiguous = True
        res.notes.append("the 6th vertebra above the sacrum cannot be judged (cut by the field of view): T12 assumed "
                         "(5 lumbar); pass lumbar_count=6 for L6")
        return 5, 12
    if verdict:
        res.ambiguous = True
        res.notes.append("the 6th vertebra above the sacrum has lumbar-size costal processes: L6 (6 lumbar "
                         "vertebrae; ribs are not in the mask, so T13 cannot be excluded)")
        return 6, 12
    res.notes.append("the 6th vertebra above the sacrum has small costal processes: T12 (5 lumbar vertebrae)")
    return 5, 12


def _number_from_c2(n: int, c2_k: int, c2_why: str, lumbar_count: int | None, res: LabelingResult) -> list[int]:
    """New ids of ``n`` vertebrae counted down from C2 at order index ``c2_k`` (C1 above it when that is 1); those
    beyond the anatomical sequence are 0."""
    res.anchor = "C2"
    res.notes.append(f"anchored by C2: {c2_why}")
    seq = _anatomical_sequence(2, 12, lumbar_count or 5)
    if c2_k == 1:
        seq = [_C[0]] + seq
    if n > len(seq):
        res.ambiguous = True
        res.notes.append("more vertebrae below C2 than the anatomical sequence holds: the lowest left 0")
        seq = seq + [0] * (n - len(seq))
    return seq[:n]


def _count_from(first_id: int, n: int, res: LabelingResult) -> list[int]:
    """New ids of ``n`` vertebrae without an anchor: a count from ``first_id`` down (not anatomy); ValueError when
    they do not fit."""
    res.anchor = "none"
    seq = [i for i in ANATOMICAL_ORDER if i not in (T13, SACRUM_ID, 27)]
    seq = seq[seq.index(first_id):]
    if n > len(seq):
        raise ValueError(f"{n} vertebrae do not fit a count starting at "
                         f"{VERTEBRA_ID_TO_NAME[first_id]} (at most {len(seq)})")
    res.notes.append(f"no anchor in view (no sacrum, no dens): ids count top to bottom from "
                     f"{VERTEBRA_ID_TO_NAME[first_id]}; they are not anatomical")
    return seq[:n]


def _truncation(f: _Features, new: list[int]) -> dict[int, list[str]]:
    """Why each newly numbered vertebra is cut by the field of view ("top", "bottom", "no corpus" or "corpus at
    border"; an empty list when it is complete), placeholders and unnumbered ones left out."""
    out: dict[int, list[str]] = {}
    for k, v in enumerate(new):
        if v == 0 or f.ids[k] < 0:
            continue
        why = []
        if f.top[k]:
            why.append("top")
        if f.bottom[k]:
            why.append("bottom")
        if f.corpus[k] == 0:
            why.append("no corpus")
        elif f.corpus_border[k]:
            why.append("corpus at border")
        out[v] = why
    return out


def _anatomical_previous(v: int, present: set[int]) -> int:
    """The vertebra id above ``v`` anatomically (T13 above L1 only when present; 0 above C1)."""
    order = [i for i in ANATOMICAL_ORDER if i not in (SACRUM_ID, 27)]
    if v == SACRUM_ID:
        lumbar = [i for i in _L if i in present]
        return max(lumbar) if lumbar else _L[4]
    k = order.index(v)
    for j in range(k - 1, -1, -1):
        if order[j] == T13 and T13 not in present:
            continue
        if order[j] == _L[5]:
            continue
        return order[j]
    return 0


def remap_instance(instance: np.ndarray, mapping: dict[int, int], order: Sequence[int] | None = None) -> np.ndarray:
    """Apply a vertebra id ``mapping`` to a full instance mask: vertebrae, IVDs (100 + v) and endplates (200 + v).

    An IVD whose vertebra is not in ``mapping`` (the disc above the topmost vertebra, see
    :func:`spineps_like.assign.assign_ivds_endplates`) becomes the IVD of the anatomical predecessor of the topmost
    vertebra (``order``: old ids, top to bottom); above C1, or above an unnumbered topmost vertebra, it becomes 0
    (the caller clears those voxels from the semantic mask too).
    """
    inst = np.asarray(instance)
    top = int(inst.max(initial=0))
    lut = np.arange(max(top + 1, 300), dtype=np.int32)
    present_new = set(mapping.values())
    order = list(order) if order is not None else sorted(mapping)
    for o, v in mapping.items():
        lut[o] = v
        lut[IVD_OFFSET + o] = IVD_OFFSET + v if v else 0
        lut[ENDPLATE_OFFSET + o] = ENDPLATE_OFFSET + v if v else 0
    ivds = present_ids(inst[(inst >= IVD_OFFSET) & (inst < ENDPLATE_OFFSET)]) - IVD_OFFSET
    top_new = mapping.get(order[0], 0) if order else 0
    for o in ivds:
        if int(o) in mapping or int(o) == SACRUM_ID:
            continue
        if not top_new:  # the topmost vertebra is unnumbered: so is the disc above it
            lut[IVD_OFFSET + o] = 0
            continue
        # assign_ivds_endplates gives the disc above the topmost vertebra the id of a vertebra out of view;
        # above C1 there is no disc, so such voxels lose their id (0)
        prev = _anatomical_previous(top_new, present_new)
        lut[IVD_OFFSET + o] = IVD_OFFSET + prev if prev else 0
    return lut[inst]


# ---------------------------------------------------------------- outputs
def centroids(instance: np.ndarray, ids: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Centre of mass (voxel coords) of each instance id (all ids > 0, or ``ids``)."""
    inst = np.asarray(instance)
    if inst.max(initial=0) <= 0:
        return {}
    st = cc3d.statistics(inst.astype(np.uint32, copy=False))
    cnt = st["voxel_counts"]
    want = np.flatnonzero(cnt) if ids is None else np.asarray([i for i in ids if i < len(cnt)], dtype=np.int64)
    return {int(i): np.asarray(st["centroids"][i], dtype=float) for i in want if i > 0 and cnt[i] > 0}


def poi_header(affine: np.ndarray, shape: Sequence[int]) -> dict:
    """The TPTBox POI header (format 'POI', local voxel coordinates) of a grid."""
    aff = np.asarray(affine, dtype=float)
    zoom = nib.affines.voxel_sizes(aff)
    rot = aff[:3, :3] / zoom[None, :]
    return {
        "direction": list(nib.aff2axcodes(aff)),
        "zoom": [float(z) for z in zoom],
        "origin": [float(o) for o in aff[:3, 3]],
        "rotation": [[float(x) for x in row] for row in rot],
        "shape": [int(s) for s in shape],
        "format": "POI",
        "level_one_info": "Vertebra_Instance",
        "level_two_info": "Location",
    }


def write_centroids_json(
    path: str | os.PathLike,
    instance: np.ndarray,
    affine: np.ndarray,
    *,
    which: str = "vertebrae",
    subregion: int = 50,
    decimals: int = 3,
) -> dict:
    """Write the instance centroids as a TPTBox POI json (what SPINEPS writes as ``*_ctd.json``).

    The file is a list: a header (``direction``, ``zoom``, ``origin``, ``rotation``, ``shape``, ``format`` 'POI')
    and ``{instance id: {subregion: [x, y, z]}}`` in voxel coordinates of ``instance``'s grid; TPTBox's
    ``POI.load`` reads it. ``which``: 'vertebrae' (ids < 100, sacrum included) or 'all' (IVDs and endplates too).
    Written atomically; returns the json object.
    """
    if which not in ("vertebrae", "all"):
        raise ValueError(f"which must be 'vertebrae' or 'all', got {which!r}")
    inst = check_mask(instance, "instance mask")
    aff = np.asarray(affine, dtype=float)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    cents = centroids(inst)
    body = {
        str(i): {str(subregion): [round(float(x), decimals) for x in c]}
        for i, c in sorted(cents.items())
        if which == "all" or i < IVD_OFFSET
    }
    obj = [poi_header(aff, inst.shape), body]
    atomic_write_json(path, obj)
    return {"header": obj[0], "centroids": body}


def summary_json(
    instance: np.ndarray,
    affine: np.ndarray,
    result: LabelingResult | None = None,
    path: str | os.PathLike | None = None,
) -> dict:
    """Per-structure summary: id, name, completeness, voxels, volume (mm^3), centroid (voxel and world mm).

    Vertebrae (sacrum included) come under ``"vertebrae"``, discs under ``"ivds"``, endplates under
    ``"endplates"``; the labelling (anchor, ambiguity, notes) under ``"labeling"`` when ``result`` is given.
    Written atomically when ``path`` is given.
    """
    inst = check_mask(instance, "instance mask")
    aff = np.asarray(affine, dtype=float)
    vox_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    cnt = np.bincount(inst.ravel().astype(np.int64))
    cents = centroids(inst)
    out: dict = {"vertebrae": [], "ivds": [], "endplates": []}
    for i, c in sorted(cents.items()):
        try:
            name = instance_name(i)
        except ValueError:
            name = str(i)
        world = aff[:3, :3] @ c + aff[:3, 3]
        row = {
            "id": int(i),
            "name": name,
            "voxels": int(cnt[i]),
            "volume_mm3": round(float(cnt[i]) * vox_mm3, 2),
            "centroid_voxel": [round(float(x), 3) for x in c],
            "centroid_mm": [round(float(x), 3) for x in world],
        }
        if i < IVD_OFFSET:
            if result is not None and i in result.complete:
                row["complete"] = bool(result.complete[i])
                row["truncated_by"] = list(result.truncated_by.get(i, []))
            else:
                row["complete"] = None
            out["vertebrae"].append(row)
        elif i < ENDPLATE_OFFSET:
            out["ivds"].append(row)
        else:
            out["endplates"].append(row)
    if result is not None:
        out["labeling"] = {"anchor": result.anchor, "ambiguous": result.ambiguous, "notes": list(result.notes)}
    if path is not None:
        atomic_write_json(path, out)
    return out
