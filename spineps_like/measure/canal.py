"""Spinal canal at each body and disc level: antero-posterior diameter."""

from __future__ import annotations

from typing import Any

import numpy as np

from spineps_like.labels import IVD_OFFSET, instance_name
from spineps_like.measure.geometry import Frame, cast, median, rnd
from spineps_like.measure.structures import Spine


def canal_levels(sp: Spine) -> list[tuple[str, int, Frame]]:
    """(kind, id, frame) of every body and disc level, top to bottom."""
    levels = []
    for v in sp.verts:
        levels.append(("body", v, sp.frames[v]))
        if v in sp.disc_frames:
            levels.append(("disc", IVD_OFFSET + v, sp.disc_frames[v]))
    return levels


def canal_records(sp: Spine) -> list[dict[str, Any]]:
    """One record per level: the canal (+ cord) extent along the level's antero-posterior axis through the canal's
    centre there (canal voxels within +-2.5 mm of the level's plane)."""
    out = []
    for kind, sid, f in canal_levels(sp):
        diam = float("nan")
        if sp.canal_pts.shape[0]:
            d = sp.canal_pts - f.origin
            du, dap, dlr = d @ f.u, d @ f.ap, d @ f.lr
            near = (np.abs(du) <= 2.5) & (dap < 0) & (dap > -50.0) & (np.abs(dlr) < 20.0)
            if near.sum() >= 5:
                cc = sp.canal_pts[near].mean(0)
                orig = (cc + np.array([-1.0, 0.0, 1.0])[:, None, None] * f.u
                        + np.array([-1.0, 0.0, 1.0])[None, :, None] * f.lr).reshape(-1, 3)
                diam = median(cast(sp.canal_lookup, orig, f.ap, -25.0, 25.0, sp.step).length)
        out.append({"level": instance_name(sid), "id": int(sid), "kind": kind, "ap_diameter_mm": rnd(diam)})
    return out
