"""Discs: anterior / middle / posterior heights, depth, volume and the disc height index."""

from __future__ import annotations

from typing import Any

import numpy as np

from spineps_like.labels import IVD_OFFSET, instance_name
from spineps_like.measure.bodies import HEIGHT_FRACTIONS
from spineps_like.measure.geometry import LR_OFFSETS, cast, mean, median, rnd, rvec
from spineps_like.measure.structures import Spine


def disc_records(sp: Spine, geo: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One record per disc, top to bottom; heights at 15/50/85% of the disc's depth along its frame's axis."""
    out = []
    for v, f in sp.disc_frames.items():
        d = sp.discs[v]
        below = sp.neighbours(v)[1] if v in sp.order else None
        lr_o = LR_OFFSETS[:, None] * f.lr
        orig = (f.origin + np.array([-0.5, 0.0, 0.5])[:, None, None] * f.u + lr_o[None]).reshape(-1, 3)
        apr = cast(d.lookup, orig, f.ap, -d.reach, d.reach, sp.step, run="last")
        depth, post_end = median(apr.length), median(apr.first)
        h: dict[str, float] = {}
        for name, frac in HEIGHT_FRACTIONS.items():
            if not np.isfinite(depth):
                h[name] = float("nan")
                continue
            pos = post_end + frac * depth + np.array([-0.02, 0.0, 0.02]) * depth
            orig = (f.origin + pos[:, None, None] * f.ap + lr_o[None]).reshape(-1, 3)
            h[name] = median(cast(d.lookup, orig, f.u, -d.reach, d.reach, sp.step).length)
        mean_h = mean([h["anterior"], h["middle"], h["posterior"]])
        ref = mean([mean([geo[x][n] for n in HEIGHT_FRACTIONS]) for x in (v, below) if x is not None and x in geo])
        out.append({
            "id": int(IVD_OFFSET + v), "name": instance_name(IVD_OFFSET + v), "upper": instance_name(v),
            "lower": instance_name(below) if below is not None else None,
            "volume_mm3": rnd(d.n * sp.vox_mm3), "height_anterior_mm": rnd(h["anterior"]),
            "height_middle_mm": rnd(h["middle"]), "height_posterior_mm": rnd(h["posterior"]),
            "height_mean_mm": rnd(mean_h), "depth_mm": rnd(depth),
            "disc_height_index": rnd(mean_h / ref, 3) if np.isfinite(ref) and ref > 0 else None,
            "centre_mm": rvec(f.origin, 2),
        })
    return out
