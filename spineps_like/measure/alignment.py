"""Alignment: endplate planes, their sagittal and coronal tilts, disc and segment angles, lumbar lordosis, thoracic
kyphosis and the coronal Cobb angle.

- **Endplate plane** of a body: a plane fitted (least squares, one pass rejecting rays over 1.5 mm off) to the
  body's superior (first) or inferior (last) surface along 7 x 5 rays parallel to the vertebra's cranio-caudal axis,
  at 20-80% of the body's depth and +-30% of its width. S1's superior plane: the sacrum's first surface below the
  disc above it, on rays through that disc's centre (+-30% of the lowest lumbar body's depth and width). A
  vertebra the field of view cut has no planes.
- **Patient frame**: left-right ``L`` = the mean of the vertebrae's left-right axes; superior ``S`` = minus their mean
  cranio-caudal axis, made orthogonal to ``L``; anterior ``A = S x L``. The sagittal tilt of a plane is the angle of
  its cranial normal from ``S`` towards ``A`` (in the plane spanned by them), its coronal tilt the angle from ``S``
  towards ``L`` (the subject's right in a RAS world).
- **Sagittal angles are positive when lordotic** (opening anteriorly): the angle from an upper plane to a lower one
  is ``tilt(lower) - tilt(upper)``. Disc angle: between the upper body's inferior and the lower body's superior
  plane; segment angle: between the upper body's superior and the lower body's inferior plane; body wedge angle:
  between its own superior and inferior plane (an anterior wedge is negative). Coronal angles likewise, positive
  when opening to the right.
- **Lumbar lordosis**: from L1's superior plane to S1's (``tilt(S1) - tilt(L1)``, positive = lordosis);
  **thoracic kyphosis**: from T4's superior plane to T12's inferior plane (``tilt(T4) - tilt(T12)``, positive =
  kyphosis); each only where both ends are measured and not cut by the field of view.
- **Coronal Cobb angle**: the largest difference of coronal tilts between the planes of any two complete
  vertebrae (S1 included), with the two planes named; only with at least :data:`COBB_MIN_VERTEBRAE` of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from spineps_like.labels import SACRUM_ID, VERTEBRA_NAME_TO_ID, instance_name
from spineps_like.measure.bodies import UNGRADED
from spineps_like.measure.geometry import LR_OFFSETS, Frame, Struct, cast, median, rnd, unit
from spineps_like.measure.structures import Spine

#: Complete vertebrae the coronal Cobb angle needs (fewer: None).
COBB_MIN_VERTEBRAE = 5
#: Gaussian smoothing (voxels) of a body's mask before its surfaces are located.
SMOOTH_VOXELS = 1.0
#: Part of S1's depth (from its posterior wall) its superior plane is fitted on: the sacrum's mask (26) holds the
#: pedicle bases and the rim of the canal at S1's posterior corner, which rise above the endplate.
S1_AP_RANGE = (0.3, 0.85)


def _surfaces(body: Struct, origins: np.ndarray, u: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """t of the first (superior) and last (inferior) crossings of the 0.5 level of the body's mask smoothed by a
    Gaussian of :data:`SMOOTH_VOXELS` voxels, on rays ``origin + t u`` for t in [t0, t1] (trilinear samples every
    0.5 mm, linear between them; NaN: no crossing). The smoothing turns the mask's voxel steps into ramps, so a
    plane is found to a fraction of a voxel."""
    lk = body.lookup
    if lk.smooth is None:
        lk.smooth = ndimage.gaussian_filter(lk.mask.astype(np.float32), SMOOTH_VOXELS, mode="constant")
    t = np.arange(t0, t1 + 0.25, 0.5)
    pts = origins[:, None, :] + t[None, :, None] * u[None, None, :]
    idx = pts @ lk.inv[:3, :3].T + lk.inv[:3, 3] - lk.lo
    val = ndimage.map_coordinates(lk.smooth, idx.reshape(-1, 3).T, order=1, cval=0.0).reshape(len(origins), -1)
    inside = val >= 0.5
    r = np.arange(len(origins))
    out = []
    for side in ("superior", "inferior"):
        if side == "superior":
            i = np.argmax(inside, 1)
            j = i - 1
            hit = inside.any(1) & ~inside[:, 0]
        else:
            j = t.size - 1 - np.argmax(inside[:, ::-1], 1)
            i = j + 1
            hit = inside.any(1) & ~inside[:, -1]
        i, j = np.clip(i, 0, t.size - 1), np.clip(j, 0, t.size - 1)
        vi, vj = val[r, i], val[r, j]
        frac = np.where(np.abs(vi - vj) > 1e-6, (0.5 - vj) / (vi - vj + 1e-12), 0.5)
        out.append(np.where(hit, t[j] + frac * (t[i] - t[j]), np.nan))
    return out[0], out[1]


def fit_plane(f: Frame, a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """Cranial unit normal of the surface ``t(a, b)`` found on rays along ``f.u`` from ``f.origin + a * f.ap +
    b * f.lr`` (``a``, ``b``: offsets in mm on the centre lines of the surface): least squares
    ``t = c0 + c1 a + c2 b + c3 a^2 + c4 b^2`` (the quadratic terms take up the concavity), one pass rejecting rays
    over 1.5 mm off; the plane's slopes are c1 and c2. None with fewer than 12 rays."""
    ok = np.isfinite(t)
    x, y = a - 0.5 * (a.max() + a.min()), b - 0.5 * (b.max() + b.min())
    design = np.stack([np.ones_like(x), x, y, x * x, y * y], 1)
    for _ in range(2):
        if ok.sum() < 12:
            return None
        coef = np.linalg.lstsq(design[ok], t[ok], rcond=None)[0]
        ok = np.isfinite(t) & (np.abs(design @ coef - t) <= 1.5)
    return unit(-f.u + coef[1] * f.ap + coef[2] * f.lr)


def _cross(post_end: float, depth: float, width: float, ap_range: tuple[float, float] = (0.15, 0.85)
           ) -> tuple[np.ndarray, np.ndarray]:
    """Ray offsets (ap, lr) of a cross: the mid-sagittal arm over ``ap_range`` of the depth from the posterior end
    (5 lateral offsets of +-3 mm), the mid-coronal arm over +-35% of the width (at 45-55% of the depth). Each arm
    lies on a centre line of the body, where the corpus's cross-section is symmetric (its anterior ellipse and
    posterior superellipse differ off the arms)."""
    a1, b1 = np.meshgrid(post_end + np.linspace(*ap_range, 9) * depth, LR_OFFSETS, indexing="ij")
    a2, b2 = np.meshgrid(post_end + np.array([0.45, 0.5, 0.55]) * depth, np.linspace(-0.35, 0.35, 9) * width,
                         indexing="ij")
    return np.concatenate([a1.ravel(), a2.ravel()]), np.concatenate([b1.ravel(), b2.ravel()])


def endplate_planes(sp: Spine, geo: dict[int, dict[str, float]], complete: dict[int, bool | None]
                    ) -> dict[int, dict[str, np.ndarray | None]]:
    """{vertebra id: {'superior': normal, 'inferior': normal}} for complete vertebrae; the sacrum (26): its
    superior plane (S1) only."""
    out: dict[int, dict[str, np.ndarray | None]] = {}
    for v in sp.verts:
        g = geo[v]
        if complete.get(v) is False or not np.isfinite(g["depth"]) or not np.isfinite(g["width"]):
            continue
        f, b = sp.frames[v], sp.bodies[v]
        a, lr = _cross(g["post_end"], g["depth"], g["width"])
        t0 = g["top"] - 8.0 if np.isfinite(g["top"]) else -b.reach
        t1 = g["bottom"] + 8.0 if np.isfinite(g["bottom"]) else b.reach
        sup, inf = _surfaces(b, f.origin + a[:, None] * f.ap + lr[:, None] * f.lr, f.u, t0, t1)
        # C1 has no body, C2's top is the dens: no superior plane
        out[v] = {"superior": None if v in UNGRADED else fit_plane(f, a, lr, sup), "inferior": fit_plane(f, a, lr, inf)}
    last = sp.verts[-1] if sp.verts else None
    if SACRUM_ID in sp.bodies and last is not None and last in sp.discs and last in sp.disc_frames \
            and sp.neighbours(last)[1] == SACRUM_ID and np.isfinite(geo[last]["depth"]):
        out[SACRUM_ID] = {"superior": _s1_plane(sp, last, geo[last]), "inferior": None}
    return out


def _run_through(body: Struct, origins: np.ndarray, direction: np.ndarray, reach: float, step: float
                 ) -> tuple[float, float]:
    """Median (first, last) t of the run of ``body``'s samples that holds each ray's origin (NaN if none does)."""
    t = np.arange(-reach, reach + step / 2, step)
    inside = body.lookup(origins[:, None, :] + t[None, :, None] * direction[None, None, :])
    k0 = int(np.argmin(np.abs(t)))
    first, last = [], []
    for row in inside:
        if not row[k0]:
            continue
        out_before = np.nonzero(~row[:k0])[0]
        out_after = np.nonzero(~row[k0:])[0]
        first.append(t[out_before[-1] + 1] if out_before.size else t[0])
        last.append(t[k0 + out_after[0] - 1] if out_after.size else t[-1])
    return median(first), median(last)


def s1_frame(sp: Spine, last: int, g: dict[str, float]) -> tuple[Frame, float] | None:
    """S1's frame and depth (mm): found from the lumbosacral disc's centre and refitted twice in S1's own frame (rays
    orthogonal to the last plane, centred on S1's body 4 mm below its top: the sacrum's most anterior run along the
    antero-posterior axis, not its dorsal wall). The frame's origin is the centre of S1's superior surface, ``u``
    (caudal) minus the plane's cranial normal, ``ap`` the disc's anterior axis made orthogonal to it; the depth is
    the length of that run. None without a plane; cached on ``sp``."""
    if sp.s1 is not None and sp.s1[0] == last:
        return sp.s1[1]
    f, d, sacrum = sp.disc_frames[last], sp.discs[last], sp.bodies[SACRUM_ID]
    width = g["width"] if np.isfinite(g["width"]) else g["depth"]
    out = None
    for _ in range(3):
        lr_o = LR_OFFSETS[:, None] * f.lr
        top = median(_surfaces(sacrum, f.origin + lr_o, f.u, -6.0, d.reach + 15.0)[0])
        if not np.isfinite(top):
            break
        post, ant = _run_through(sacrum, f.origin + (top + 4.0) * f.u + lr_o, f.ap, 60.0, sp.step)
        depth = ant - post
        if not np.isfinite(depth) or depth < 5.0:
            break
        a, lr = _cross(post, depth, width, S1_AP_RANGE)
        n = fit_plane(f, a, lr, _surfaces(sacrum, f.origin + a[:, None] * f.ap + lr[:, None] * f.lr, f.u, top - 8.0,
                                          top + 12.0)[0])
        if n is None:
            out = None
            break
        ap = unit(f.ap - (f.ap @ n) * n)
        origin = f.origin + (post + 0.5 * depth) * f.ap + top * f.u
        f = Frame(origin, -n, ap, np.cross(-n, ap), "S1", "S1")
        out = (f, depth)
    sp.s1 = (last, out)
    return out


def _s1_plane(sp: Spine, last: int, g: dict[str, float]) -> np.ndarray | None:
    """S1's superior plane's cranial normal (:func:`s1_frame`)."""
    s1 = s1_frame(sp, last, g)
    return None if s1 is None else -s1[0].u


def patient_axes(sp: Spine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, A, L): superior, anterior and left-right (right in RAS) unit axes of the patient from the frames."""
    frames = list(sp.frames.values())
    lr = unit(sum(f.lr for f in frames)) if frames else None
    lr = np.array([1.0, 0.0, 0.0]) if lr is None else lr
    up = -sum(f.u for f in frames) if frames else np.array([0.0, 0.0, 1.0])
    s = unit(up - (up @ lr) * lr)
    s = np.array([0.0, 0.0, 1.0]) if s is None else s
    return s, np.cross(s, lr), lr


def tilts(n: np.ndarray | None, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, float]:
    """(sagittal, coronal) tilt in degrees of a cranial plane normal (NaN for None)."""
    if n is None:
        return float("nan"), float("nan")
    s, a, lr = axes
    return float(np.degrees(np.arctan2(n @ a, n @ s))), float(np.degrees(np.arctan2(n @ lr, n @ s)))


def alignment_records(sp: Spine, geo: dict[int, dict[str, float]], vrec: dict[int, dict[str, Any]],
                      drec: list[dict[str, Any]]) -> dict[str, Any]:
    """Add endplate tilts and wedge angles to ``vrec``, disc and segment angles to ``drec``; return the spine's
    record (lordosis, kyphosis, Cobb angle)."""
    complete = {v: r["complete"] for v, r in vrec.items()}
    planes = endplate_planes(sp, geo, complete)
    axes = patient_axes(sp)
    tilt = {(v, side): tilts(n, axes) for v, p in planes.items() for side, n in p.items()}
    nan2 = (float("nan"), float("nan"))
    for v, rec in vrec.items():
        (ss, sc), (is_, ic) = tilt.get((v, "superior"), nan2), tilt.get((v, "inferior"), nan2)
        rec.update({"endplate_superior_tilt_sagittal_deg": rnd(ss), "endplate_inferior_tilt_sagittal_deg": rnd(is_),
                    "endplate_superior_tilt_coronal_deg": rnd(sc), "endplate_inferior_tilt_coronal_deg": rnd(ic),
                    "body_wedge_angle_sagittal_deg": rnd(is_ - ss), "body_wedge_angle_coronal_deg": rnd(ic - sc)})
    for d in drec:
        up = d["id"] - 100
        lo = sp.neighbours(up)[1] if up in sp.order else None
        (us, uc), (ls, lc) = tilt.get((up, "inferior"), nan2), tilt.get((lo, "superior"), nan2)
        (ts, _), (bs, _) = tilt.get((up, "superior"), nan2), tilt.get((lo, "inferior"), nan2)
        d.update({"endplate_angle_sagittal_deg": rnd(ls - us), "endplate_angle_coronal_deg": rnd(lc - uc),
                  "segment_angle_sagittal_deg": rnd(bs - ts)})
    l1, t4, t12 = (VERTEBRA_NAME_TO_ID[n] for n in ("L1", "T4", "T12"))
    lordosis = tilt.get((SACRUM_ID, "superior"), nan2)[0] - tilt.get((l1, "superior"), nan2)[0]
    kyphosis = tilt.get((t4, "superior"), nan2)[0] - tilt.get((t12, "inferior"), nan2)[0]
    cor = [(tilt[k][1], k) for k in tilt if np.isfinite(tilt[k][1])]
    cobb, ends = float("nan"), (None, None)
    if len({k[0] for _, k in cor}) >= COBB_MIN_VERTEBRAE:
        hi, lo = max(cor), min(cor)
        cobb = hi[0] - lo[0]
        ends = tuple(sorted((hi[1], lo[1]), key=lambda k: (sp.order.index(k[0]), k[1] == "inferior")))
    return {"name": "spine", "lumbar_lordosis_deg": rnd(lordosis), "thoracic_kyphosis_deg": rnd(kyphosis),
            "coronal_cobb_deg": rnd(cobb),
            "cobb_upper_endplate": None if ends[0] is None else f"{instance_name(ends[0][0])} {ends[0][1]}",
            "cobb_lower_endplate": None if ends[1] is None else f"{instance_name(ends[1][0])} {ends[1][1]}",
            "patient_axis_superior": [round(float(x), 5) for x in axes[0]],
            "patient_axis_right": [round(float(x), 5) for x in axes[2]]}
