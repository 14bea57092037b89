"""Listhesis: the sagittal offset of a body's posterior wall over the body below (L5 over S1 included), and its
Meyerding grade."""

from __future__ import annotations

from typing import Any

import numpy as np

from spineps_like.labels import SACRUM_ID, instance_name
from spineps_like.measure.alignment import s1_frame
from spineps_like.measure.geometry import LR_OFFSETS, Frame, Struct, cast, median, rnd, unit
from spineps_like.measure.grades import meyerding_grade
from spineps_like.measure.structures import Spine


def add_listhesis(sp: Spine, vrec: dict[int, dict[str, Any]], geo: dict[int, dict[str, float]]) -> None:
    """Add the listhesis of each body over the one below to ``vrec`` (the last lumbar over S1 too: S1's frame from
    :func:`~spineps_like.measure.alignment.s1_frame`; needs ``sp.disc_frames``); None for cut bodies."""
    for v in sp.verts:
        below = sp.neighbours(v)[1]
        rec = vrec[v]
        rec.update({"listhesis_over": None, "listhesis_mm": None, "listhesis_fraction": None, "meyerding_grade": None,
                    "listhesis_direction": None})
        if below is None or rec["complete"] is False or (below != SACRUM_ID and vrec[below]["complete"] is False):
            continue
        frames = sp.frames
        if below == SACRUM_ID:
            s1 = s1_frame(sp, v, geo[v]) if v in sp.disc_frames and np.isfinite(geo[v]["depth"]) else None
            if s1 is None:
                continue
            frames = {**sp.frames, SACRUM_ID: s1[0]}
        slip, frac = listhesis(v, below, sp.bodies, frames, sp.step)
        if not np.isfinite(slip):
            continue
        rec["listhesis_over"] = "S1" if below == SACRUM_ID else instance_name(below)
        rec["listhesis_mm"], rec["listhesis_fraction"] = rnd(slip), rnd(frac, 3)
        grade = meyerding_grade(frac)
        rec["meyerding_grade"] = grade
        rec["listhesis_direction"] = None if grade is None else "none" if grade == 0 else \
            "anterolisthesis" if slip > 0 else "retrolisthesis"


def listhesis(v: int, w: int, bodies: dict[int, Struct], frames: dict[int, Frame], step: float
              ) -> tuple[float, float]:
    """Offset (mm, + = anterior) of v's posterior wall over w's near the disc between them, and that offset over
    w's depth there.

    Both walls are sampled at the same distances (10-30% of the smaller body height, at least 2 mm) from the disc,
    along the bisecting axis of the two bodies (the mean of their cranio-caudal axes), and compared along the
    antero-posterior axis perpendicular to it: the lordotic angle between the bodies then tilts both walls equally
    and cancels. (The disc's own least-spread axis is no substitute: a slip shears the disc and tilts it towards the
    lower body.) Each wall is the posterior end of the body's most anterior run on a ray along that axis (the
    sacrum's body, not its dorsal wall). For the sacrum (``w`` = 26) ``frames[w]`` is S1's frame, its origin the
    centre of S1's superior surface, and v's height stands for S1's."""
    fv, fw = frames[v], frames[w]
    u = unit(fv.u + fw.u)
    ap = fv.ap + fw.ap
    ap = unit(ap - (ap @ u) * u) if u is not None else None
    if ap is None:
        return float("nan"), float("nan")
    lr = np.cross(u, ap)
    bv, bw = bodies[v], bodies[w]
    lr_o = LR_OFFSETS[:, None] * lr
    cv = cast(bv.lookup, bv.centre + lr_o, u, -bv.reach, bv.reach, step)
    hv, bottom = median(cv.length), median(cv.last)
    if w == SACRUM_ID:  # S1's top below its superior surface's centre
        p_w = fw.origin
        cw = cast(bw.lookup, p_w + lr_o, u, -10.0, bw.reach, step)
        hw, top = hv, median(cw.first)
    else:
        p_w = bw.centre
        cw = cast(bw.lookup, p_w + lr_o, u, -bw.reach, bw.reach, step)
        hw, top = median(cw.length), median(cw.first)
    if not all(np.isfinite(x) for x in (hv, bottom, hw, top)):
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
