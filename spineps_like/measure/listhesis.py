"""Listhesis: the sagittal offset of a body's posterior wall over the body below, and its Meyerding grade."""

from __future__ import annotations

from typing import Any

import numpy as np

from spineps_like.labels import SACRUM_ID, instance_name
from spineps_like.measure.geometry import LR_OFFSETS, Frame, Struct, cast, median, rnd, unit
from spineps_like.measure.grades import meyerding_grade
from spineps_like.measure.structures import Spine


def add_listhesis(sp: Spine, vrec: dict[int, dict[str, Any]]) -> None:
    """Add the listhesis of each body over the one below to ``vrec`` (not over the sacrum, nor for cut bodies)."""
    for v in sp.verts:
        below = sp.neighbours(v)[1]
        rec = vrec[v]
        rec.update({"listhesis_over": None, "listhesis_mm": None, "listhesis_fraction": None, "meyerding_grade": None,
                    "listhesis_direction": None})
        if below is None or below == SACRUM_ID or rec["complete"] is False or vrec[below]["complete"] is False:
            # not over the sacrum: S1's posterior wall is not yet found reliably (2-6 mm off on normal phantoms)
            continue
        slip, frac = listhesis(v, below, sp.bodies, sp.frames, sp.discs.get(v), sp.step)
        rec["listhesis_over"] = instance_name(below)
        rec["listhesis_mm"], rec["listhesis_fraction"] = rnd(slip), rnd(frac, 3)
        grade = meyerding_grade(frac)
        rec["meyerding_grade"] = grade
        rec["listhesis_direction"] = None if grade is None else "none" if grade == 0 else \
            "anterolisthesis" if slip > 0 else "retrolisthesis"


def listhesis(v: int, w: int, bodies: dict[int, Struct], frames: dict[int, Frame], disc: Struct | None,
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
    u = unit(fv.u + fw.u) if fw is not None else fv.u
    ap = fv.ap + (fw.ap if fw is not None else 0.0)
    ap = unit(ap - (ap @ u) * u)
    if ap is None:
        return float("nan"), float("nan")
    lr = np.cross(u, ap)
    bv, bw = bodies[v], bodies[w]
    lr_o = LR_OFFSETS[:, None] * lr
    cv = cast(bv.lookup, bv.centre + lr_o, u, -bv.reach, bv.reach, step)
    hv = median(cv.length)
    if not np.isfinite(hv):
        return float("nan"), float("nan")
    bottom = median(cv.last)
    if fw is not None:
        p_w = bw.centre
        cw = cast(bw.lookup, p_w + lr_o, u, -bw.reach, bw.reach, step)
        hw, top = median(cw.length), median(cw.first)
    else:  # the sacrum: S1's top below its voxel nearest to the disc (else to v's bottom); S1's height as v's
        near_to = disc.centre if disc is not None else bv.centre + bottom * u
        pts = bw.lookup.points()
        p_w = pts[np.argmin(np.einsum("ij,ij->i", pts - near_to, pts - near_to))]
        p_w = p_w + lr * ((bv.centre - p_w) @ lr)  # back into v's mid-sagittal plane
        cw = cast(bw.lookup, p_w + lr_o, u, -10.0, bw.reach, step)
        hw, top = hv, median(cw.first)
    if not np.isfinite(top) or not np.isfinite(hw):
        return float("nan"), float("nan")
    h = min(hv, hw)  # at least 2 mm from the endplates (their rounded rims), at most 45% of the height in
    s = np.clip(np.array([0.1, 0.2, 0.3]) * h, min(2.0, 0.45 * h), 0.45 * h)

    def wall(b: Struct, p: np.ndarray, at: np.ndarray) -> tuple[float, float]:
        orig = (p + at[:, None, None] * u + lr_o[None]).reshape(-1, 3)
        r = cast(b.lookup, orig, ap, -b.reach - 20.0, b.reach + 20.0, step, run="last")
        return median((orig - bv.centre) @ ap + r.first), median(r.length)

    wall_v, _ = wall(bv, bv.centre, bottom - s)
    wall_w, depth_w = wall(bw, p_w, top + s)
    slip = wall_v - wall_w
    return slip, slip / depth_w if np.isfinite(depth_w) and depth_w > 0 else float("nan")
