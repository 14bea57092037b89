"""Realistic errors of a semantic model, painted into a ground-truth semantic mask (issue 27's degraded-mask suite).

Each degradation takes the exact semantic mask and the exact instance mask of a phantom and returns a *degraded
semantic mask*, which is what the instance phase gets; the ground truth is never changed, so the instance phase's
output can be scored against it. Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right, as
:mod:`spineps_like.instance` uses), ``spacing`` is mm per array axis, every random choice comes from the
``numpy.random.Generator`` passed in (same seed, same mask). Labels are SPINEPS' (41-48 posterior parts, 49 corpus,
52/53 endplates, 60 cord, 61 canal, 100 IVD, 26 sacrum); instance ids are TPTBox's (vertebra 1-25/28, IVD 100+v,
endplate 200+v, sacrum 26).

=============================  ==========================  =========================================================
name                           severity                    what changes
=============================  ==========================  =========================================================
``merge_bodies``               discs (1-3)                 consecutive discs between bodies, and the endplates
                                                           beside them, become corpus: the bodies run together
``bleed_into_disc``            mm                          disc voxels within ``severity`` mm of a body -> corpus
``missing_corpus``             corpora                     corpus + endplates of that many vertebrae -> background
``erode_corpus``               mm                          the body (49/52/53) loses every voxel within ``severity``
                                                           mm of its surface; each takes its nearest outside label
``dilate_corpus``              mm                          background and disc voxels within ``severity`` mm of a
                                                           body -> corpus
``false_blobs``                blobs                       ellipsoids the size of a small body in front of the spine,
                                                           alternately corpus and disc
``sacrum_as_corpus``           segments (1-2)              the top of the sacrum, one lumbar body height per
                                                           segment, -> corpus; at 2 a thin disc between S1 and S2
``posterior_missing_one_side`` vertebrae (>= count: all)   left (43/45/47) or right (44/46/48) processes removed
``label_noise``                % of spine voxels           salt and pepper: voxels flipped to a label that touches
                                                           their own
``combined``                   1-3                         erode 1 mm, bleed 1 + s mm, one false blob, s % noise
=============================  ==========================  =========================================================

Severity 0 is the identity (a copy) for every degradation. Where the mask lacks what a degradation needs (no sacrum,
fewer discs than asked) it does what it can (the most consecutive discs, no change) and says nothing: the caller
compares with the ground truth.
"""

from __future__ import annotations

from typing import Callable, Sequence

import edt
import numpy as np
from scipy import ndimage as ndi

from spineps_like.geometry import bbox
from spineps_like.labels import ANATOMICAL_ORDER, SACRUM_ID

Degradation = Callable[[np.ndarray, np.ndarray, Sequence[float], float, np.random.Generator], np.ndarray]

CORPUS = 49
IVD = 100
BODY_LABELS: tuple[int, ...] = (49, 52, 53)
LEFT_PROCESSES: tuple[int, ...] = (43, 45, 47)
RIGHT_PROCESSES: tuple[int, ...] = (44, 46, 48)
#: vertebra ids with a body (sacrum and coccyx excluded), top to bottom
_BODY_ORDER: tuple[int, ...] = tuple(v for v in ANATOMICAL_ORDER if v not in (SACRUM_ID, 27))
#: thickness of the disc painted between S1 and S2 by ``sacrum_as_corpus`` at severity 2 (mm)
SACRAL_DISC_MM = 2.0


# ---------------------------------------------------------------- helpers
def _check(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float) -> tuple:
    semantic, instance = np.asarray(semantic), np.asarray(instance)
    if semantic.ndim != 3 or semantic.shape != instance.shape:
        raise ValueError(f"semantic {semantic.shape} and instance {instance.shape} must be 3D arrays of one shape")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    if not np.isfinite(severity) or severity < 0:
        raise ValueError(f"severity must be a finite number >= 0, got {severity!r}")
    return semantic, instance, sp


def _count(severity: float) -> int:
    """A count-valued severity (discs, corpora, blobs, ...) as an int."""
    return int(round(float(severity)))


def body_ids(semantic: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """The vertebra id of every body voxel of a ground-truth pair (corpus: instance v; endplates: instance 200+v),
    0 elsewhere (int32)."""
    inst = instance.astype(np.int32)
    out = np.where(semantic == CORPUS, inst, 0)
    ep = np.isin(semantic, (52, 53))
    out[ep] = inst[ep] - 200
    out[(out < 1) | (out > 28) | (out == SACRUM_ID)] = 0
    return out


def _bodies(semantic: np.ndarray, instance: np.ndarray) -> tuple[list[int], list[bool], np.ndarray]:
    """(vertebra ids with a body, top to bottom; whether each body is complete, i.e. touches no array face;
    the per-voxel body ids)."""
    ids = body_ids(semantic, instance)
    present = set(np.unique(ids).tolist()) - {0}
    order = [v for v in _BODY_ORDER if v in present]
    objs = ndi.find_objects(ids, max_label=max(order, default=0))
    complete = []
    for v in order:
        sl = objs[v - 1]
        complete.append(all(s.start > 0 and s.stop < n for s, n in zip(sl, ids.shape)))
    return order, complete, ids


def _edt_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from every True voxel to the nearest False voxel (0 on False voxels); the array border does not
    count as False (the field of view is no surface)."""
    return edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=tuple(spacing), black_border=False)


def _crop(mask: np.ndarray, spacing: Sequence[float], mm: float) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``mm`` (+1 voxel) on each side, or None when the mask is empty."""
    box = bbox(mask)
    if box is None:
        return None
    return tuple(slice(max(0, b.start - int(np.ceil(mm / s)) - 1), min(n, b.stop + int(np.ceil(mm / s)) + 1))
                 for b, s, n in zip(box, spacing, mask.shape))


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """(start, length) of every run of True in ``flags``."""
    out, start = [], None
    for k, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            out.append((start, k - start))
            start = None
    return out


# ---------------------------------------------------------------- degradations
def merge_bodies(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Bodies run together across ``severity`` consecutive discs: each disc (IVD 100+v between two bodies) and the
    endplates beside it (inferior of the upper body, superior of the lower) become corpus.

    The discs are chosen at random among runs between complete bodies (a body cut by the array's faces only when no
    such run is long enough); with fewer mergeable discs than asked, the longest run is merged."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    k = _count(severity)
    if k == 0:
        return out
    order, complete, _ = _bodies(semantic, instance)
    discs = set(np.unique(instance[semantic == IVD]).tolist())
    # gap j lies between order[j] and order[j + 1]; mergeable when that disc is in the mask
    gaps = [100 + order[j] in discs for j in range(len(order) - 1)]
    gaps_complete = [g and complete[j] and complete[j + 1] for j, g in enumerate(gaps)]
    starts = []
    for flags in (gaps_complete, gaps):
        starts = [s + o for s, n in _runs(flags) for o in range(n - k + 1)]
        if starts:
            break
    if starts:
        start, n = int(rng.choice(starts)), k
    else:
        runs = _runs(gaps)
        if not runs:
            return out
        longest = max(n for _, n in runs)
        start, n = runs[int(rng.choice([j for j, (_, m) in enumerate(runs) if m == longest]))]
    for j in range(start, start + n):
        upper, lower = order[j], order[j + 1]
        change = ((semantic == IVD) & (instance == 100 + upper)) \
            | ((semantic == 53) & (instance == 200 + upper)) | ((semantic == 52) & (instance == 200 + lower))
        out[change] = CORPUS
    return out


def _grow_bodies(semantic: np.ndarray, spacing: Sequence[float], severity: float, into: tuple[int, ...]) -> np.ndarray:
    """A copy of ``semantic`` where voxels labelled one of ``into`` within ``severity`` mm of a vertebral body voxel
    (49/52/53) become corpus."""
    out = semantic.copy()
    body = np.isin(semantic, BODY_LABELS)
    box = _crop(body, spacing, severity)
    if severity == 0 or box is None:
        return out
    dist = _edt_mm(~body[box], spacing)
    sub = out[box]
    sub[np.isin(sub, into) & (dist <= severity)] = CORPUS
    return out


def bleed_into_disc(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                    rng: np.random.Generator) -> np.ndarray:
    """The corpus grows ``severity`` mm into the discs: every disc voxel within that distance of a body voxel
    (49/52/53) becomes corpus."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    return _grow_bodies(semantic, spacing, severity, into=(IVD,))


def missing_corpus(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``severity`` vertebrae, chosen at random (complete bodies first), lose their corpus and endplates to the
    background; their posterior elements stay."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    k = _count(severity)
    order, complete, ids = _bodies(semantic, instance)
    if k == 0 or not order:
        return out
    full = [v for v, c in zip(order, complete) if c]
    cut = [v for v, c in zip(order, complete) if not c]
    chosen = list(rng.permutation(full))[:k]
    if len(chosen) < k:
        chosen += list(rng.permutation(cut))[: k - len(chosen)]
    out[np.isin(ids, chosen)] = 0
    return out


def erode_corpus(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Every vertebral body (49/52/53) shrinks by ``severity`` mm: a body voxel whose centre lies within that distance
    of a non-body voxel's centre (exact Euclidean distance in mm) takes the label of the nearest non-body voxel (disc
    at an endplate, background in front, canal behind, arch at a pedicle). The array's faces do not erode; along an
    axis whose voxels are larger than ``severity`` mm nothing erodes (distances are between voxel centres)."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    body = np.isin(semantic, BODY_LABELS)
    box = _crop(body, spacing, severity)
    if severity == 0 or box is None:
        return out
    sub_body = body[box]
    # exact Euclidean distance (mm) to the nearest non-body voxel, and that voxel's index (ties do not matter)
    dist, idx = ndi.distance_transform_edt(sub_body, sampling=spacing, return_indices=True)
    removed = sub_body & (dist <= severity)
    if not removed.any():
        return out
    sub = out[box]
    src = semantic[box]
    r = np.nonzero(removed)
    sub[r] = src[tuple(ix[r] for ix in idx)]
    return out


def dilate_corpus(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Every vertebral body grows by ``severity`` mm: background and disc voxels within that distance of a body voxel
    (49/52/53) become corpus (canal, cord, posterior elements and sacrum keep their labels)."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    return _grow_bodies(semantic, spacing, severity, into=(0, IVD))


def false_blobs(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                rng: np.random.Generator) -> np.ndarray:
    """``severity`` false blobs in front of the spine: ellipsoids with semi-axes 7-10 mm (antero-posterior), 6-9 mm
    (cranio-caudal) and 8-11 mm (left-right), 2-4 cm3 like a small body, 8-25 mm in front of a random body, at
    its level +- one body height, painted on background only. Blobs alternate corpus (first) and disc."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    k = _count(severity)
    order, complete, ids = _bodies(semantic, instance)
    if k == 0 or not order:
        return out
    objs = ndi.find_objects(ids, max_label=max(order))
    pool = [v for v, c in zip(order, complete) if c] or order
    sp = np.asarray(spacing)
    shape = np.asarray(semantic.shape)
    for b in range(k):
        v = int(rng.choice(pool))
        sl = objs[v - 1]
        coords = np.argwhere(ids[sl] == v) + np.array([s.start for s in sl])
        mm = coords * sp
        front = mm[:, 0].min()
        height = np.ptp(mm[:, 1]) + sp[1]
        centre_mm = mm.mean(axis=0)
        radii = np.array([rng.uniform(7.0, 10.0), rng.uniform(6.0, 9.0), rng.uniform(8.0, 11.0)])
        c = np.array([front - rng.uniform(8.0, 25.0) - radii[0],
                      centre_mm[1] + rng.uniform(-1.0, 1.0) * height,
                      centre_mm[2] + rng.uniform(-8.0, 8.0)])
        c = np.clip(c / sp, 0, shape - 1)  # voxel coordinates, inside the array
        lo = np.maximum(np.floor(c - radii / sp).astype(int), 0)
        hi = np.minimum(np.ceil(c + radii / sp).astype(int) + 1, shape)
        grid = np.ogrid[tuple(slice(a, z) for a, z in zip(lo, hi))]
        inside = sum(((g - ci) * s / r) ** 2 for g, ci, s, r in zip(grid, c, sp, radii)) <= 1.0
        sub = out[tuple(slice(a, z) for a, z in zip(lo, hi))]
        sub[inside & (sub == 0)] = CORPUS if b % 2 == 0 else IVD
    return out


def sacrum_as_corpus(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                     rng: np.random.Generator) -> np.ndarray:
    """The upper sacrum painted as vertebral bodies, as semantic models do with S1 (and S2): sacrum voxels below the
    last disc above the sacrum, inside that disc's footprint and within ``severity`` lumbar body heights of its lower
    surface (measured along the disc's normal), become corpus. At severity 2 a disc of :data:`SACRAL_DISC_MM`
    separates the S1 from the S2 part (models paint the rudimentary S1/S2 disc). The body height is that of the last
    vertebra above the sacrum (its extent along the normal). No sacrum or no disc above it: no change."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    k = _count(severity)
    order, _, ids = _bodies(semantic, instance)
    if k == 0 or not order or not (semantic == SACRUM_ID).any():
        return out
    last = order[-1]
    sp = np.asarray(spacing)
    disc = np.argwhere((semantic == IVD) & (instance == 100 + last)) * sp
    if len(disc) < 10:
        return out
    centre = disc.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((disc - centre).T))
    normal, e1, e2 = vecs[:, 0], vecs[:, 1], vecs[:, 2]  # smallest variance: across the disc
    sac = np.argwhere(semantic == SACRUM_ID)
    if (sac * sp - centre).mean(axis=0) @ normal < 0:
        normal = -normal  # towards the sacrum
    d = disc - centre
    lower = float(np.percentile(d @ normal, 95))
    a1, a2 = np.abs(d @ e1).max(), np.abs(d @ e2).max()
    body = np.argwhere(ids == last) * sp
    height = float(np.ptp(body @ normal)) if len(body) else 25.0
    s = sac * sp - centre
    t = s @ normal - lower
    inside = ((s @ e1) / a1) ** 2 + ((s @ e2) / a2) ** 2 <= 1.0
    pick = inside & (t > -0.5 * sp.min()) & (t <= k * height)
    out[tuple(sac[pick].T)] = CORPUS
    if k >= 2:
        slab = inside & (np.abs(t - height) <= SACRAL_DISC_MM / 2)
        out[tuple(sac[slab].T)] = IVD
    return out


def posterior_missing_one_side(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float],
                               severity: float, rng: np.random.Generator) -> np.ndarray:
    """The left (43/45/47) or right (44/46/48) costal and articular processes, side chosen at random, vanish
    (background) on ``severity`` consecutive vertebrae (a random run; all vertebrae when severity >= their count)."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    k = _count(severity)
    if k == 0:
        return out
    labels = LEFT_PROCESSES if rng.integers(2) == 0 else RIGHT_PROCESSES
    side = np.isin(semantic, labels)
    present = set(np.unique(instance[side]).tolist())
    verts = [v for v in ANATOMICAL_ORDER if v in present]
    if not verts:
        return out
    start = int(rng.integers(0, max(1, len(verts) - k + 1)))
    out[side & np.isin(instance, verts[start:start + k])] = 0
    return out


def label_noise(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
                rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: ``severity`` % of the spine's voxels (label > 0), drawn at random, flip to a label that
    touches their own somewhere in the mask (face neighbours, background included; e.g. corpus -> disc, endplate,
    canal, arch or 0)."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    out = semantic.copy()
    spine = np.flatnonzero(semantic > 0)
    n = int(round(len(spine) * min(severity, 100.0) / 100.0))
    if n == 0:
        return out
    neighbours: dict[int, set[int]] = {}
    box = _crop(semantic > 0, spacing, 0.0)
    for ax in range(3):
        a = np.moveaxis(semantic[box], ax, 0).astype(np.int64)
        diff = a[1:] != a[:-1]
        for code in np.unique(a[1:][diff] * 65536 + a[:-1][diff]).tolist():
            x, y = divmod(code, 65536)
            neighbours.setdefault(x, set()).add(y)
            neighbours.setdefault(y, set()).add(x)
    flip = rng.choice(spine, size=n, replace=False)
    flat = out.reshape(-1)
    old = semantic.reshape(-1)[flip]
    for lab in np.unique(old).tolist():
        cand = np.array(sorted(neighbours.get(lab, ())), dtype=semantic.dtype)
        if cand.size == 0:
            continue
        where = flip[old == lab]
        flat[where] = cand[rng.integers(0, cand.size, size=where.size)]
    return out


def combined(semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
             rng: np.random.Generator) -> np.ndarray:
    """Several errors at once, as a mediocre model makes them: :func:`erode_corpus` by 1 mm, then
    :func:`bleed_into_disc` by 1 + ``severity`` mm from the eroded bodies (``severity`` mm past the true endplate),
    one :func:`false_blobs` blob (corpus), then :func:`label_noise` of ``severity`` %."""
    semantic, instance, spacing = _check(semantic, instance, spacing, severity)
    if severity == 0:
        return semantic.copy()
    out = erode_corpus(semantic, instance, spacing, 1.0, rng)
    out = bleed_into_disc(out, instance, spacing, 1.0 + severity, rng)
    out = false_blobs(out, instance, spacing, 1, rng)
    return label_noise(out, instance, spacing, severity, rng)


#: Every degradation by name: ``f(semantic, instance, spacing, severity, rng) -> degraded semantic``.
DEGRADATIONS: dict[str, Degradation] = {
    "merge_bodies": merge_bodies,
    "bleed_into_disc": bleed_into_disc,
    "missing_corpus": missing_corpus,
    "erode_corpus": erode_corpus,
    "dilate_corpus": dilate_corpus,
    "false_blobs": false_blobs,
    "sacrum_as_corpus": sacrum_as_corpus,
    "posterior_missing_one_side": posterior_missing_one_side,
    "label_noise": label_noise,
    "combined": combined,
}

#: Unit of each degradation's severity (for reports).
UNITS: dict[str, str] = {
    "merge_bodies": "discs", "bleed_into_disc": "mm", "missing_corpus": "corpora", "erode_corpus": "mm",
    "dilate_corpus": "mm", "false_blobs": "blobs", "sacrum_as_corpus": "segments",
    "posterior_missing_one_side": "vertebrae", "label_noise": "%", "combined": "level",
}

#: Named severity levels; ``moderate`` is the level issue 27's targets are stated for.
LEVELS: dict[str, dict[str, float]] = {
    "mild": {"merge_bodies": 1, "bleed_into_disc": 1, "missing_corpus": 1, "erode_corpus": 1, "dilate_corpus": 1,
             "false_blobs": 1, "sacrum_as_corpus": 1, "posterior_missing_one_side": 1, "label_noise": 1,
             "combined": 1},
    "moderate": {"merge_bodies": 2, "bleed_into_disc": 2, "missing_corpus": 1, "erode_corpus": 2,
                 "dilate_corpus": 2, "false_blobs": 2, "sacrum_as_corpus": 2, "posterior_missing_one_side": 3,
                 "label_noise": 2, "combined": 2},
    "severe": {"merge_bodies": 3, "bleed_into_disc": 3, "missing_corpus": 2, "erode_corpus": 3, "dilate_corpus": 3,
               "false_blobs": 4, "sacrum_as_corpus": 2, "posterior_missing_one_side": 99, "label_noise": 5,
               "combined": 3},
}


def degrade(name: str, semantic: np.ndarray, instance: np.ndarray, spacing: Sequence[float], severity: float,
            rng: np.random.Generator) -> np.ndarray:
    """The degradation ``name`` of :data:`DEGRADATIONS` applied to ``semantic`` (a new array)."""
    try:
        fn = DEGRADATIONS[name]
    except KeyError:
        raise ValueError(f"unknown degradation {name!r}; known: {', '.join(DEGRADATIONS)}") from None
    return fn(semantic, instance, spacing, severity, rng)
