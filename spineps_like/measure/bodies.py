"""Vertebral bodies: heights at 15/50/85% of the depth, depth and width, ratios, Genant grade and shape."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from spineps_like.labels import instance_name
from spineps_like.measure.geometry import LR_OFFSETS, cast, mean, median, rnd, rvec
from spineps_like.measure.grades import genant_grade
from spineps_like.measure.structures import Spine

#: C1 (no body) and C2 (its body carries the dens): measured, but neither graded nor a neighbour's reference
UNGRADED = (1, 2)
HEIGHT_FRACTIONS = {"posterior": 0.15, "middle": 0.50, "anterior": 0.85}


def body_geometry(sp: Spine, v: int) -> dict[str, float]:
    """Depth, posterior end (t along ``ap`` from the centre), width, top/bottom (t along ``u``) and the three
    heights of v's body, in mm (NaN where not measurable)."""
    f, b, step = sp.frames[v], sp.bodies[v], sp.step
    lr_o = LR_OFFSETS[:, None] * f.lr
    cc = cast(b.lookup, f.origin + lr_o, f.u, -b.reach, b.reach, step)
    h0 = median(cc.length)
    du = np.array([-0.25, -0.125, 0.0, 0.125, 0.25]) * (h0 if np.isfinite(h0) else 10.0)
    orig = (f.origin + du[:, None, None] * f.u + lr_o[None]).reshape(-1, 3)
    apr = cast(b.lookup, orig, f.ap, -b.reach, b.reach, step, run="last")
    depth, post_end = median(apr.length), median(apr.first)
    heights: dict[str, float] = {k: float("nan") for k in HEIGHT_FRACTIONS}
    width = float("nan")
    if np.isfinite(depth):
        for name, frac in HEIGHT_FRACTIONS.items():
            pos = post_end + frac * depth + np.array([-0.02, 0.0, 0.02]) * depth
            orig = (f.origin + pos[:, None, None] * f.ap + lr_o[None]).reshape(-1, 3)
            heights[name] = median(cast(b.lookup, orig, f.u, -b.reach, b.reach, step).length)
        pos = post_end + 0.5 * depth + np.array([-0.1, 0.0, 0.1]) * depth
        orig = (f.origin + pos[:, None, None] * f.ap + du[None, ::2, None] * f.u).reshape(-1, 3)
        width = median(cast(b.lookup, orig, f.lr, -b.reach, b.reach, step).length)
    return {"depth": depth, "post_end": post_end, "width": width, "top": median(cc.first),
            "bottom": median(cc.last), **heights}


def body_records(sp: Spine, complete: Mapping[int, bool] | None) -> tuple[dict[int, dict[str, Any]],
                                                                         dict[int, dict[str, float]]]:
    """Per-vertebra records (volumes, heights, depth, width, axes) and their raw geometry, by vertebra id."""
    vrec: dict[int, dict[str, Any]] = {}
    geo: dict[int, dict[str, float]] = {}
    for v in sp.verts:
        f, b = sp.frames[v], sp.bodies[v]
        g = geo[v] = body_geometry(sp, v)
        comp = complete.get(v) if complete is not None else (not sp.border.get(v, False))
        vrec[v] = {
            "id": int(v), "name": instance_name(v), "complete": None if comp is None else bool(comp),
            "volume_mm3": rnd(sp.volume.get(v)), "body_volume_mm3": rnd(b.n * sp.vox_mm3),
            "body_height_anterior_mm": rnd(g["anterior"]), "body_height_middle_mm": rnd(g["middle"]),
            "body_height_posterior_mm": rnd(g["posterior"]), "body_depth_mm": rnd(g["depth"]),
            "body_width_mm": rnd(g["width"]),
            "centre_mm": rvec(f.origin, 2),
            "axis_cranio_caudal": rvec(f.u), "axis_from": f.u_from,
            "axis_antero_posterior": rvec(f.ap), "anterior_from": f.ap_from,
        }
    return vrec, geo


def grade_bodies(sp: Spine, vrec: dict[int, dict[str, Any]], geo: dict[int, dict[str, float]]) -> None:
    """Add height ratios (own and neighbours'), the Genant height loss, grade and shape to ``vrec``."""
    for v in sp.verts:
        g, rec = geo[v], vrec[v]
        nbs = [n for n in sp.neighbours(v) if n is not None and n in geo and vrec[n]["complete"] is not False
               and n not in UNGRADED]
        ref_post = mean([geo[n]["posterior"] for n in nbs])
        ref_mid = mean([geo[n]["middle"] for n in nbs])
        ant, mid, post = g["anterior"], g["middle"], g["posterior"]
        ref = np.nanmax([post, ref_post]) if np.isfinite(post) or np.isfinite(ref_post) else float("nan")
        loss = 1.0 - min(ant, mid) / ref if np.isfinite(ref) and ref > 0 else float("nan")
        grade = genant_grade(loss) if rec["complete"] is not False and v not in UNGRADED else None
        rec.update({
            "ratio_anterior_posterior": rnd(ant / post, 3), "ratio_middle_posterior": rnd(mid / post, 3),
            "neighbours": [instance_name(n) for n in nbs], "neighbours_posterior_height_mm": rnd(ref_post),
            "ratio_anterior_neighbours": rnd(ant / ref_post, 3), "ratio_middle_neighbours": rnd(mid / ref_post, 3),
            "ratio_posterior_neighbours": rnd(post / ref_post, 3),
            "middle_height_loss_vs_neighbours": rnd(1.0 - mid / ref_mid, 3),
            "height_loss": rnd(loss, 3), "genant_grade": grade, "shape": _shape(grade, ant, mid, post, ref_post),
        })


def _shape(grade: int | None, ant: float, mid: float, post: float, ref_post: float) -> str | None:
    if grade is None:
        return None
    if grade == 0:
        return "normal"
    if np.isfinite(ref_post) and max(ant, mid, post) <= 0.8 * ref_post:
        return "crush"
    return "wedge" if ant <= mid else "biconcave"
