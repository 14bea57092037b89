"""Per-vertebra, per-disc and per-level measurements from a semantic and an instance mask.

All measurements are taken in world millimetres (voxel index -> affine -> mm), along each structure's own anatomical
axes, by casting rays through the masks and counting the samples that fall inside (nearest-voxel look-up, 0.25 mm
steps or finer). Nothing depends on the array's axis order or direction, and anisotropic voxels only cost resolution.

The frame of a vertebra:

- **cranio-caudal axis** ``u`` (pointing caudally): the line from the centre of its superior endplate (semantic 52,
  instance 200+v) to the centre of its inferior endplate (53); without both endplates, the line from the disc above to
  the disc below (or from one disc through the body's centre), then from the vertebra above to the one below, else
  the scan's inferior direction;
- **antero-posterior axis** ``ap`` (pointing anteriorly): from the centre of the spinal canal (61, with the cord 60)
  at the body's level to the body's centre, made orthogonal to ``u``; without a canal, from the vertebra's own
  posterior elements; else the scan's anterior direction;
- **left-right axis**: ``u x ap``.

The body is the corpus (49, with the CT aliases 50/51) of instance v plus its endplates (instance 200+v). Rays are
cast in a small bundle (five lateral offsets, +-3 mm around the mid-sagittal plane, times three to five offsets
along the other axis) and the bundle's median is reported.

Definitions (TotalSegmentator's spine report and Genant's semi-quantitative method):

- depth: the body's antero-posterior extent through its centre (median over rays within +-25% of its height);
  width: its left-right extent through the centre of the depth;
- heights ``posterior`` / ``middle`` / ``anterior``: cranio-caudal extents at 15 / 50 / 85% of the depth, counted
  from the posterior wall (the canal side) towards the front;
- neighbours' reference height: the mean posterior height of the vertebrae directly above and below that have a
  measured body and are not cut by the field of view;
- Genant height loss: ``1 - min(anterior, middle) / max(posterior, neighbours' reference)``; grade 0 below 20%,
  1 for 20-25%, 2 for 25-40%, 3 above 40% (:data:`GENANT_THRESHOLDS`); shape (grade >= 1 only): ``crush`` when all
  three heights are at most 80% of the neighbours' reference, else ``wedge`` when the anterior height is the lowest,
  else ``biconcave``; no grade and no shape for a vertebra the field of view cut, nor for C1/C2 (C2's body carries
  the dens), which are no neighbours' reference either;
- middle-height loss against the neighbours: ``1 - middle / mean(neighbours' middle heights)``: the loss of the
  body's centre height, what a phantom's ``height_loss`` records;
- disc heights at 15 / 50 / 85% of the disc's own depth, along the mean axis of its two vertebrae; disc height index:
  the disc's mean height (of the three) over the mean of its vertebrae's mean body heights;
- listhesis: the offset of the upper body's posterior wall over the lower body's, both sampled at the same
  distances from the disc (10-30% of the smaller body height, at least 2 mm), along the antero-posterior axis of the two bodies'
  bisecting frame (the mean of their axes); positive = anterolisthesis. The fraction is that offset over the lower
  body's depth at the same heights; Meyerding grade 1 below 25%, 2 for 25-50%, 3 for 50-75%, 4 for 75-100%, 5
  beyond, and 0 (none) below :data:`LISTHESIS_MIN_FRACTION`. Not measured over the sacrum yet (S1's posterior wall
  is not found reliably in the sacrum's mask: 2-6 mm off on normal phantoms), nor where either body is cut by the
  field of view;
- canal antero-posterior diameter: at each body's and disc's centre, the extent of canal + cord along the level's
  antero-posterior axis through the canal's centre at that level (canal voxels within +-2.5 mm of the level's plane).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from spineps_like.labels import ANATOMICAL_ORDER, ENDPLATE_OFFSET, IVD_OFFSET, POSTERIOR_LABELS, SACRUM_ID, \
    instance_name, label_mask

#: Genant's semi-quantitative grades: height loss below 20% is grade 0, 20-25% grade 1, 25-40% grade 2, above 40%
#: grade 3.
GENANT_THRESHOLDS: tuple[float, float, float] = (0.20, 0.25, 0.40)
#: Below this slip fraction (of the lower body's depth) no listhesis is reported (Meyerding grade 0): the offsets of
#: a normal spine's posterior walls (different depths, lordosis) reach ~1 mm, 3-6% of a body's depth.
LISTHESIS_MIN_FRACTION = 0.08
#: Units of the record fields, by suffix.
UNITS: dict[str, str] = {"_mm": "mm", "_mm3": "mm^3", "ratio": "1 (dimensionless)", "loss": "1 (fraction)",
                         "fraction": "1 (fraction)", "index": "1 (dimensionless)", "grade": "ordinal"}

_CORPUS = (49, 50, 51)
_ENDPLATES = (52, 53, 62)
_CANAL = (60, 61)
_LR_OFFSETS = np.array([-3.0, -1.5, 0.0, 1.5, 3.0])
#: C1 (no body) and C2 (its body carries the dens): measured, but neither graded nor a neighbour's reference
_UNGRADED = (1, 2)
_HEIGHT_FRACTIONS = {"posterior": 0.15, "middle": 0.50, "anterior": 0.85}


def genant_grade(loss: float | None) -> int | None:
    """Genant grade of a height loss (fraction): 0 (< 20%), 1 (20-25%), 2 (25-40%), 3 (> 40%); None for None/NaN."""
    if loss is None or not np.isfinite(loss):
        return None
    t1, t2, t3 = GENANT_THRESHOLDS
    return 0 if loss < t1 else 1 if loss < t2 else 2 if loss <= t3 else 3


def meyerding_grade(fraction: float | None) -> int | None:
    """Meyerding grade of a slip fraction: 0 (none, below :data:`LISTHESIS_MIN_FRACTION`), 1 (< 25%), 2 (25-50%),
    3 (50-75%), 4 (75-100%), 5 (> 100%, spondyloptosis); by the absolute value (retrolisthesis too)."""
    if fraction is None or not np.isfinite(fraction):
        return None
    f = abs(fraction)
    if f < LISTHESIS_MIN_FRACTION:
        return 0
    return 1 if f < 0.25 else 2 if f < 0.5 else 3 if f < 0.75 else 4 if f <= 1.0 else 5


# ---------------------------------------------------------------- geometry helpers
def _as_affine(spacing_or_affine) -> np.ndarray:
    a = np.asarray(spacing_or_affine, dtype=float)
    if a.shape == (4, 4):
        aff = a
    elif a.shape == (3,):
        aff = np.diag([*a, 1.0])
    else:
        raise ValueError(f"expected three voxel sizes or a 4 x 4 affine, got shape {a.shape}")
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError("the affine is singular or holds NaN/inf")
    return aff


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else None


class _Lookup:
    """A boolean mask on a box of the grid, sampled at world points by nearest voxel (outside the box: False)."""

    def __init__(self, mask: np.ndarray, lo: np.ndarray, inv_affine: np.ndarray):
        self.mask, self.lo, self.inv = mask, np.asarray(lo, int), inv_affine

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        idx = np.rint(pts @ self.inv[:3, :3].T + self.inv[:3, 3]).astype(np.int64) - self.lo
        shape = np.asarray(self.mask.shape)
        ok = np.all((idx >= 0) & (idx < shape), axis=-1)
        out = np.zeros(pts.shape[:-1], bool)
        sel = idx[ok]
        out[ok] = self.mask[sel[:, 0], sel[:, 1], sel[:, 2]]
        return out


@dataclass
class _Rays:
    length: np.ndarray  # (R,) mm inside the chosen run (NaN: no hit)
    first: np.ndarray  # (R,) t of its first sample
    last: np.ndarray  # (R,) t of its last sample


def _cast(lookup: _Lookup, origins: np.ndarray, direction: np.ndarray, t0: float, t1: float, step: float,
          run: str = "all") -> _Rays:
    """Rays ``origin + t * direction`` for t in [t0, t1]: length inside ``lookup`` and first/last inside sample.

    ``run``: 'all' counts every inside sample (first/last: the outermost); 'last' takes only the last contiguous
    run (the most anterior one on a posterior-to-anterior ray, e.g. the sacral body and not its dorsal wall)."""
    t = np.arange(t0, t1 + step / 2, step)
    pts = origins[:, None, :] + t[None, :, None] * direction[None, None, :]
    inside = lookup(pts)
    s = t.size
    hit = inside.any(1)
    last_i = s - 1 - np.argmax(inside[:, ::-1], 1)
    if run == "last":
        starts = inside & ~np.pad(inside, ((0, 0), (1, 0)))[:, :-1]
        idx = np.where(starts & (np.arange(s)[None, :] <= last_i[:, None]), np.arange(s)[None, :], -1)
        first_i = idx.max(1)
        n = last_i - first_i + 1
    else:
        first_i = np.argmax(inside, 1)
        n = inside.sum(1)
    nan = np.full(len(origins), np.nan)
    return _Rays(np.where(hit, n * step, nan), np.where(hit, t[first_i], nan), np.where(hit, t[last_i], nan))


def _median(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


@dataclass
class _Frame:
    origin: np.ndarray
    u: np.ndarray  # caudal
    ap: np.ndarray  # anterior
    lr: np.ndarray
    u_from: str
    ap_from: str


@dataclass
class _Struct:
    """One structure's voxels: world coordinates, its look-up and its bounding box."""

    sid: int
    n: int
    centre: np.ndarray
    lookup: _Lookup
    reach: float  # half the box's world diagonal + margin: rays of +-reach cross the whole structure


def _box_union(slices: Sequence[tuple[slice, ...] | None], shape: Sequence[int], pad: int = 2):
    s = [x for x in slices if x is not None]
    if not s:
        return None
    lo = np.maximum(np.min([[a.start for a in x] for x in s], 0) - pad, 0)
    hi = np.minimum(np.max([[a.stop for a in x] for x in s], 0) + pad, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), lo


def _struct(sid: int, mask: np.ndarray, lo: np.ndarray, aff: np.ndarray, inv: np.ndarray) -> _Struct | None:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    vox = np.stack(idx, 1).astype(float) + lo
    centre = aff[:3, :3] @ vox.mean(0) + aff[:3, 3]
    diag = aff[:3, :3] @ np.asarray(mask.shape, float)
    return _Struct(sid, int(idx[0].size), centre, _Lookup(mask, lo, inv), 0.5 * float(np.linalg.norm(diag)) + 3.0)


def _centroid(mask: np.ndarray, lo: np.ndarray, aff: np.ndarray, min_voxels: int = 5) -> np.ndarray | None:
    idx = np.nonzero(mask)
    if idx[0].size < min_voxels:
        return None
    c = np.array([i.mean() for i in idx]) + lo
    return aff[:3, :3] @ c + aff[:3, 3]


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


# ---------------------------------------------------------------- measurement
def measure(semantic: np.ndarray, instance: np.ndarray, spacing_or_affine, complete: Mapping[int, bool] | None = None,
            ) -> dict[str, Any]:
    """Measure every vertebra, disc and canal level in a pair of masks.

    Parameters
    ----------
    semantic : the ``seg-spine`` mask (labels 41-49, 52/53, 60, 61, 100, 26).
    instance : the ``seg-vert`` mask on the same grid (vertebra v, IVD 100+v, endplate 200+v).
    spacing_or_affine : three voxel sizes (mm, along the array's axes) or the 4 x 4 voxel-to-world affine.
    complete : {vertebra id: False if the field of view cut it} (the labelling's ``complete``); None: a vertebra
        whose body touches the array's border counts as cut.

    Returns
    -------
    {"vertebrae": [...], "discs": [...], "canal": [...], "units": {...}}: one dict per structure, top to bottom;
    lengths in mm, volumes in mm^3, ratios and losses as fractions, None where a value could not be measured.
    """
    sem = np.asarray(semantic)
    inst = np.asarray(instance)
    if sem.shape != inst.shape or sem.ndim != 3:
        raise ValueError(f"semantic and instance masks must be 3D arrays of one shape, got {sem.shape} and "
                         f"{inst.shape}")
    aff = _as_affine(spacing_or_affine)
    inv = np.linalg.inv(aff)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    step = float(min(0.25, spacing.min() / 4))
    vox_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    inst_i = inst.astype(np.int32, copy=False) if inst.dtype.kind not in "iu" or inst.dtype.itemsize > 4 else inst
    boxes = ndimage.find_objects(inst_i)

    def box(i: int):
        return boxes[i - 1] if 0 < i <= len(boxes) else None

    present = [v for v in ANATOMICAL_ORDER if v != 27 and box(v) is not None]
    world_inf = np.array([0.0, 0.0, -1.0])  # RAS world: inferior is -z, anterior +y
    world_ant = np.array([0.0, 1.0, 0.0])

    # bodies (corpus + endplates) and endplate centres, per vertebra, on their own bounding boxes
    bodies: dict[int, _Struct] = {}
    ep_centres: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
    post_centres: dict[int, np.ndarray | None] = {}
    border: dict[int, bool] = {}
    volume: dict[int, float] = {}
    for v in present:
        bu = _box_union([box(v), box(ENDPLATE_OFFSET + v)] if v != SACRUM_ID else [box(v)], inst.shape)
        if bu is None:
            continue
        sl, lo = bu
        s_loc, i_loc = sem[sl], inst[sl]
        if v == SACRUM_ID:
            body = (i_loc == v) & ((s_loc == SACRUM_ID) | label_mask(s_loc, _CORPUS))
        else:
            body = ((i_loc == v) & label_mask(s_loc, _CORPUS)) | ((i_loc == ENDPLATE_OFFSET + v)
                                                                 & label_mask(s_loc, _ENDPLATES))
            ep = i_loc == ENDPLATE_OFFSET + v
            ep_centres[v] = (_centroid(ep & (s_loc == 52), lo, aff), _centroid(ep & (s_loc == 53), lo, aff))
            post_centres[v] = _centroid((i_loc == v) & label_mask(s_loc, POSTERIOR_LABELS), lo, aff)
        volume[v] = float(((i_loc == v) | (i_loc == ENDPLATE_OFFSET + v)).sum()) * vox_mm3
        st = _struct(v, body, lo, aff, inv)
        if st is not None:
            bodies[v] = st
            nz = np.nonzero(body.any((1, 2)))[0], np.nonzero(body.any((0, 2)))[0], np.nonzero(body.any((0, 1)))[0]
            border[v] = any(int(n[0]) + lo[k] == 0 or int(n[-1]) + lo[k] == inst.shape[k] - 1
                            for k, n in enumerate(nz))
    discs: dict[int, _Struct] = {}
    for v in present:
        d = box(IVD_OFFSET + v)
        if d is None:
            continue
        lo = np.array([a.start for a in d])
        m = (inst[d] == IVD_OFFSET + v) & (sem[d] == 100)
        st = _struct(IVD_OFFSET + v, m, lo, aff, inv)
        if st is not None:
            discs[v] = st

    canal_idx = np.nonzero(label_mask(sem, _CANAL))
    canal_pts = (np.stack(canal_idx, 1).astype(float) @ aff[:3, :3].T + aff[:3, 3]) if canal_idx[0].size else \
        np.zeros((0, 3))
    canal_lookup = _Lookup(label_mask(sem, _CANAL), np.zeros(3, int), inv)

    verts = [v for v in present if v != SACRUM_ID and v in bodies]
    order = verts + ([SACRUM_ID] if SACRUM_ID in bodies else [])

    def neighbours(v: int) -> tuple[int | None, int | None]:
        k = order.index(v)
        return (order[k - 1] if k > 0 else None), (order[k + 1] if k + 1 < len(order) else None)

    # ---- frames
    frames: dict[int, _Frame] = {}
    for v in verts:
        c = bodies[v].centre
        above, below = neighbours(v)
        u, u_from = None, ""
        sup, inf = ep_centres.get(v, (None, None))
        if sup is not None and inf is not None and np.linalg.norm(inf - sup) > 3.0:
            u, u_from = _unit(inf - sup), "endplates"
        if u is None:
            d_up = discs[above].centre if above is not None and above in discs else None
            d_dn = discs[v].centre if v in discs else None
            if d_up is not None and d_dn is not None:
                u, u_from = _unit(d_dn - d_up), "discs"
            elif d_up is not None or d_dn is not None:
                u, u_from = _unit((c - d_up) if d_up is not None else (d_dn - c)), "disc"
        if u is None and (above is not None or below is not None):
            a = bodies[above].centre if above is not None else c
            b = bodies[below].centre if below is not None else c
            u, u_from = _unit(b - a), "neighbours"
        if u is None:
            u, u_from = world_inf, "scan"
        ap, ap_from = None, ""
        if canal_pts.shape[0]:
            d = canal_pts - c
            near = (np.abs(d @ u) < 6.0) & (np.einsum("ij,ij->i", d, d) < 60.0 ** 2)
            if near.sum() >= 5:
                ap, ap_from = c - canal_pts[near].mean(0), "canal"
        if ap is None and post_centres.get(v) is not None:
            ap, ap_from = c - post_centres[v], "posterior elements"
        if ap is None:
            ap, ap_from = world_ant.copy(), "scan"
        ap = _unit(ap - (ap @ u) * u)
        if ap is None:  # the canal straight above/below: fall back to the scan's anterior
            ap, ap_from = _unit(world_ant - (world_ant @ u) * u), "scan"
        frames[v] = _Frame(c, u, ap, np.cross(u, ap), u_from, ap_from)

    # ---- bodies
    vrec: dict[int, dict[str, Any]] = {}
    geo: dict[int, dict[str, float]] = {}
    for v in verts:
        f, b = frames[v], bodies[v]
        lr_o = _LR_OFFSETS[:, None] * f.lr
        cc = _cast(b.lookup, f.origin + lr_o, f.u, -b.reach, b.reach, step)
        h0 = _median(cc.length)
        du = np.array([-0.25, -0.125, 0.0, 0.125, 0.25]) * (h0 if np.isfinite(h0) else 10.0)
        orig = (f.origin + du[:, None, None] * f.u + lr_o[None]).reshape(-1, 3)
        apr = _cast(b.lookup, orig, f.ap, -b.reach, b.reach, step, run="last")
        depth, post_end = _median(apr.length), _median(apr.first)
        heights: dict[str, float] = {}
        width = float("nan")
        if np.isfinite(depth):
            for name, frac in _HEIGHT_FRACTIONS.items():
                pos = post_end + frac * depth + np.array([-0.02, 0.0, 0.02]) * depth
                orig = (f.origin + pos[:, None, None] * f.ap + lr_o[None]).reshape(-1, 3)
                heights[name] = _median(_cast(b.lookup, orig, f.u, -b.reach, b.reach, step).length)
            pos = post_end + 0.5 * depth + np.array([-0.1, 0.0, 0.1]) * depth
            orig = (f.origin + pos[:, None, None] * f.ap + du[None, ::2, None] * f.u).reshape(-1, 3)
            width = _median(_cast(b.lookup, orig, f.lr, -b.reach, b.reach, step).length)
        else:
            heights = {k: float("nan") for k in _HEIGHT_FRACTIONS}
        geo[v] = {"depth": depth, "top": _median(cc.first), "bottom": _median(cc.last), **heights}
        comp = complete.get(v) if complete is not None else (not border.get(v, False))
        vrec[v] = {
            "id": int(v), "name": instance_name(v), "complete": None if comp is None else bool(comp),
            "volume_mm3": _r(volume.get(v)), "body_volume_mm3": _r(b.n * vox_mm3),
            "body_height_anterior_mm": _r(heights["anterior"]), "body_height_middle_mm": _r(heights["middle"]),
            "body_height_posterior_mm": _r(heights["posterior"]), "body_depth_mm": _r(depth),
            "body_width_mm": _r(width),
            "centre_mm": [round(float(x), 2) for x in f.origin],
            "axis_cranio_caudal": [round(float(x), 4) for x in f.u], "axis_from": f.u_from,
            "axis_antero_posterior": [round(float(x), 4) for x in f.ap], "anterior_from": f.ap_from,
        }
    for v in verts:
        g, rec = geo[v], vrec[v]
        nbs = [n for n in neighbours(v) if n is not None and n in geo and vrec[n]["complete"] is not False
               and n not in _UNGRADED]
        ref_post = _mean([geo[n]["posterior"] for n in nbs])
        ref_mid = _mean([geo[n]["middle"] for n in nbs])
        ant, mid, post = g["anterior"], g["middle"], g["posterior"]
        ref = np.nanmax([post, ref_post]) if np.isfinite(post) or np.isfinite(ref_post) else float("nan")
        loss = 1.0 - min(ant, mid) / ref if np.isfinite(ref) and ref > 0 else float("nan")
        grade = genant_grade(loss) if rec["complete"] is not False and v not in _UNGRADED else None
        shape = None
        if grade is not None:
            if grade == 0:
                shape = "normal"
            elif np.isfinite(ref_post) and max(ant, mid, post) <= 0.8 * ref_post:
                shape = "crush"
            else:
                shape = "wedge" if ant <= mid else "biconcave"
        rec.update({
            "ratio_anterior_posterior": _r(ant / post, 3), "ratio_middle_posterior": _r(mid / post, 3),
            "neighbours": [instance_name(n) for n in nbs], "neighbours_posterior_height_mm": _r(ref_post),
            "ratio_anterior_neighbours": _r(ant / ref_post, 3), "ratio_middle_neighbours": _r(mid / ref_post, 3),
            "ratio_posterior_neighbours": _r(post / ref_post, 3),
            "middle_height_loss_vs_neighbours": _r(1.0 - mid / ref_mid, 3),
            "height_loss": _r(loss, 3), "genant_grade": grade, "shape": shape,
        })

    # ---- listhesis of each body over the one below (the sacrum included)
    for k, v in enumerate(verts):
        below = neighbours(v)[1]
        rec = vrec[v]
        rec.update({"listhesis_over": None, "listhesis_mm": None, "listhesis_fraction": None, "meyerding_grade": None,
                    "listhesis_direction": None})
        if below is None or below == SACRUM_ID or rec["complete"] is False or vrec[below]["complete"] is False:
            # not over the sacrum: S1's posterior wall is not yet found reliably (2-6 mm off on normal phantoms)
            continue
        slip, frac = _listhesis(v, below, bodies, frames, discs.get(v), step)
        rec["listhesis_over"] = instance_name(below)
        rec["listhesis_mm"], rec["listhesis_fraction"] = _r(slip), _r(frac, 3)
        grade = meyerding_grade(frac)
        rec["meyerding_grade"] = grade
        rec["listhesis_direction"] = None if grade is None else "none" if grade == 0 else \
            "anterolisthesis" if slip > 0 else "retrolisthesis"

    # ---- discs
    drec: list[dict[str, Any]] = []
    dframes: dict[int, _Frame] = {}
    for v in present:
        if v not in discs:
            continue
        d = discs[v]
        below = neighbours(v)[1] if v in order else None
        fr = [frames[x] for x in (v, below) if x is not None and x in frames]
        if fr:
            u = _unit(sum(x.u for x in fr))
            ap = sum(x.ap for x in fr)
            ap = _unit(ap - (ap @ u) * u)
            u_from = "vertebrae"
        else:
            u, ap, u_from = world_inf, _unit(world_ant - (world_ant @ world_inf) * world_inf), "scan"
        f = _Frame(d.centre, u, ap, np.cross(u, ap), u_from, u_from)
        dframes[v] = f
        lr_o = _LR_OFFSETS[:, None] * f.lr
        orig = (f.origin + np.array([-0.5, 0.0, 0.5])[:, None, None] * f.u + lr_o[None]).reshape(-1, 3)
        apr = _cast(d.lookup, orig, f.ap, -d.reach, d.reach, step, run="last")
        depth, post_end = _median(apr.length), _median(apr.first)
        h: dict[str, float] = {}
        for name, frac in _HEIGHT_FRACTIONS.items():
            if not np.isfinite(depth):
                h[name] = float("nan")
                continue
            pos = post_end + frac * depth + np.array([-0.02, 0.0, 0.02]) * depth
            orig = (f.origin + pos[:, None, None] * f.ap + lr_o[None]).reshape(-1, 3)
            h[name] = _median(_cast(d.lookup, orig, f.u, -d.reach, d.reach, step).length)
        mean_h = _mean([h["anterior"], h["middle"], h["posterior"]])
        adj = [_mean([geo[x][n] for n in _HEIGHT_FRACTIONS]) for x in (v, below) if x is not None and x in geo]
        ref = _mean(adj)
        drec.append({
            "id": int(IVD_OFFSET + v), "name": instance_name(IVD_OFFSET + v), "upper": instance_name(v),
            "lower": instance_name(below) if below is not None else None,
            "volume_mm3": _r(d.n * vox_mm3), "height_anterior_mm": _r(h["anterior"]),
            "height_middle_mm": _r(h["middle"]), "height_posterior_mm": _r(h["posterior"]),
            "height_mean_mm": _r(mean_h), "depth_mm": _r(depth),
            "disc_height_index": _r(mean_h / ref, 3) if np.isfinite(ref) and ref > 0 else None,
            "centre_mm": [round(float(x), 2) for x in f.origin],
        })

    # ---- canal at each body and disc level, top to bottom
    levels = []
    for v in verts:
        levels.append(("body", v, frames[v]))
        if v in dframes:
            levels.append(("disc", IVD_OFFSET + v, dframes[v]))
    crec = []
    for kind, sid, f in levels:
        diam = float("nan")
        if canal_pts.shape[0]:
            d = canal_pts - f.origin
            du, dap, dlr = d @ f.u, d @ f.ap, d @ f.lr
            near = (np.abs(du) <= 2.5) & (dap < 0) & (dap > -50.0) & (np.abs(dlr) < 20.0)
            if near.sum() >= 5:
                cc = canal_pts[near].mean(0)
                orig = (cc + np.array([-1.0, 0.0, 1.0])[:, None, None] * f.u
                        + np.array([-1.0, 0.0, 1.0])[None, :, None] * f.lr).reshape(-1, 3)
                diam = _median(_cast(canal_lookup, orig, f.ap, -25.0, 25.0, step).length)
        crec.append({"level": instance_name(sid), "id": int(sid), "kind": kind, "ap_diameter_mm": _r(diam)})
    return {"vertebrae": [vrec[v] for v in verts], "discs": drec, "canal": crec, "units": dict(UNITS)}


def _mean(xs) -> float:
    a = np.asarray([x for x in xs if x is not None], float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _listhesis(v: int, w: int, bodies: dict[int, _Struct], frames: dict[int, _Frame], disc: _Struct | None,
               step: float) -> tuple[float, float]:
    """Offset (mm, + = anterior) of v's posterior wall over w's near the disc between them, and that offset over
    w's depth there.

    Both walls are sampled at the same distances (10-30% of the smaller body height) from the disc, along the
    bisecting axis of the two bodies (the mean of the two vertebrae's cranio-caudal axes; v's axis over the sacrum),
    and compared along the antero-posterior axis perpendicular to it: the lordotic angle between the bodies then
    tilts both walls equally and cancels. (The disc's own least-spread axis is no substitute: a slip shears the disc
    and tilts it towards the lower body.)"""
    fv = frames[v]
    fw = frames.get(w)
    u = _unit(fv.u + fw.u) if fw is not None else fv.u
    ap = fv.ap + (fw.ap if fw is not None else 0.0)
    ap = _unit(ap - (ap @ u) * u)
    if ap is None:
        return float("nan"), float("nan")
    lr = np.cross(u, ap)
    bv, bw = bodies[v], bodies[w]
    lr_o = _LR_OFFSETS[:, None] * lr
    cv = _cast(bv.lookup, bv.centre + lr_o, u, -bv.reach, bv.reach, step)
    hv = _median(cv.length)
    if not np.isfinite(hv):
        return float("nan"), float("nan")
    bottom = _median(cv.last)
    if fw is not None:
        p_w = bw.centre
        cw = _cast(bw.lookup, p_w + lr_o, u, -bw.reach, bw.reach, step)
        hw, top = _median(cw.length), _median(cw.first)
    else:  # the sacrum: S1's top below its voxel nearest to the disc (else to v's bottom); S1's height as v's
        near_to = disc.centre if disc is not None else bv.centre + bottom * u
        idx = np.nonzero(bw.lookup.mask)
        inv = bw.lookup.inv
        pts = (np.stack(idx, 1) + bw.lookup.lo) @ np.linalg.inv(inv[:3, :3]).T + np.linalg.inv(inv)[:3, 3]
        p_w = pts[np.argmin(np.einsum("ij,ij->i", pts - near_to, pts - near_to))]
        p_w = p_w + lr * ((bv.centre - p_w) @ lr)  # back into v's mid-sagittal plane
        cw = _cast(bw.lookup, p_w + lr_o, u, -10.0, bw.reach, step)
        hw, top = hv, _median(cw.first)
    if not np.isfinite(top) or not np.isfinite(hw):
        return float("nan"), float("nan")
    h = min(hv, hw)  # at least 2 mm from the endplates (their rounded rims), at most 45% of the height in
    s = np.clip(np.array([0.1, 0.2, 0.3]) * h, min(2.0, 0.45 * h), 0.45 * h)

    def wall(b: _Struct, p: np.ndarray, at: np.ndarray) -> tuple[float, float]:
        orig = (p + at[:, None, None] * u + lr_o[None]).reshape(-1, 3)
        r = _cast(b.lookup, orig, ap, -b.reach - 20.0, b.reach + 20.0, step, run="last")
        return _median((orig - bv.centre) @ ap + r.first), _median(r.length)

    wall_v, _ = wall(bv, bv.centre, bottom - s)
    wall_w, depth_w = wall(bw, p_w, top + s)
    slip = wall_v - wall_w
    return slip, slip / depth_w if np.isfinite(depth_w) and depth_w > 0 else float("nan")


# ---------------------------------------------------------------- tables
def measurements_table(measurements: Mapping[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """One flat row per structure (vertebra, disc, canal level) with a ``structure`` column, for a CSV or a cohort
    table; ``extra`` columns (e.g. ``scan='sub-01'``) come first. Lists become ';'-joined strings."""
    rows = []
    for kind, key in (("vertebra", "vertebrae"), ("disc", "discs"), ("canal", "canal")):
        for rec in measurements.get(key, []):
            row = {**extra, "structure": kind}
            for k, val in rec.items():
                row[k] = ";".join(str(x) for x in val) if isinstance(val, (list, tuple)) else val
            rows.append(row)
    return rows


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` (from :func:`measurements_table`) as CSV text, columns in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()

