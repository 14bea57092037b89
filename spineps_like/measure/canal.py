"""Spinal canal and cord at each body and disc level: antero-posterior diameter, cross-sectional areas and a
stenosis flag.

The canal is the semantic canal (61) together with the cord (60), i.e. the dural sac as SPINEPS labels it, not the
bony canal. At each level (a body's centre, a disc's centre) the canal's centre is the mean of the canal voxels
within +-2.5 mm of the level's plane (posterior of the level's centre, within 50 mm). There:

- ``ap_diameter_mm``: the canal's extent along the level's antero-posterior axis (median of a 3 x 3 bundle of rays,
  +-1 mm along the cranio-caudal and left-right axes);
- ``area_mm2`` / ``cord_area_mm2``: the cross-sectional area of canal + cord / of the cord alone in the plane
  orthogonal to the level's cranio-caudal axis (the local spine axis), sampled on a 0.5 mm grid (+-15 mm along the
  antero-posterior, +-20 mm along the left-right axis) in three planes 1 mm apart and averaged; the cord's area is
  None where no cord is labelled at the level (below the conus);
- ``stenosis``: 'none', 'relative' or 'absolute' by :func:`stenosis_grade` (None when not measured).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spineps_like.labels import IVD_OFFSET, instance_name
from spineps_like.measure.geometry import Frame, Lookup, cast, median, rnd
from spineps_like.measure.structures import Spine

#: Midsagittal (antero-posterior) canal diameter thresholds (mm): (absolute, relative) stenosis below them.
#: Lumbar: absolute < 10 mm, relative 10-12 mm (Verbiest H., "Results of surgical treatment of idiopathic
#: developmental stenosis of the lumbar vertebral canal", J Bone Joint Surg Br 1977;59:181-188).
#: Cervical: absolute < 10 mm (high risk of myelopathy), relative 10-13 mm (Edwards WC, LaRocca H., "The
#: developmental segmental sagittal diameter of the cervical spinal canal in patients with cervical spondylosis",
#: Spine 1983;8:20-27). Thoracic: no accepted relative threshold; absolute < 10 mm as in the other regions.
#: These are the bony canal's diameters; the dural sac measured here is smaller by the epidural fat and ligaments,
#: so the flag errs towards stenosis.
STENOSIS_AP_MM: dict[str, tuple[float, float]] = {"C": (10.0, 13.0), "T": (10.0, 10.0), "L": (10.0, 12.0)}
#: Lumbar dural sac cross-sectional area below which central stenosis is flagged (at least 'relative'): 100 mm^2
#: (Bolender NF, Schönström NS, Spengler DM., "Role of computed tomography and myelography in the diagnosis of
#: central spinal stenosis", J Bone Joint Surg Am 1985;67:240-246).
STENOSIS_AREA_MM2_LUMBAR = 100.0
_GRID = 0.5  # mm, in-plane sampling of the cross-sections
_PLANES = np.array([-1.0, 0.0, 1.0])  # mm along the axis


def stenosis_grade(region: str, ap_mm: float | None, area_mm2: float | None = None) -> str | None:
    """'absolute', 'relative' or 'none' for a canal level of ``region`` ('C', 'T', 'L'; the sacrum counts as 'L')
    from its antero-posterior diameter (:data:`STENOSIS_AP_MM`) and, in the lumbar spine, its area
    (:data:`STENOSIS_AREA_MM2_LUMBAR`: below it at least 'relative'); None without a diameter or region."""
    r = "L" if region == "S" else region
    if r not in STENOSIS_AP_MM or ap_mm is None or not np.isfinite(ap_mm):
        return None
    absolute, relative = STENOSIS_AP_MM[r]
    if ap_mm < absolute:
        return "absolute"
    if ap_mm < relative:
        return "relative"
    if r == "L" and area_mm2 is not None and np.isfinite(area_mm2) and area_mm2 < STENOSIS_AREA_MM2_LUMBAR:
        return "relative"
    return "none"


def canal_levels(sp: Spine) -> list[tuple[str, int, Frame]]:
    """(kind, id, frame) of every body and disc level, top to bottom."""
    levels = []
    for v in sp.verts:
        levels.append(("body", v, sp.frames[v]))
        if v in sp.disc_frames:
            levels.append(("disc", IVD_OFFSET + v, sp.disc_frames[v]))
    return levels


def cross_section_area(lookup: Lookup, centre: np.ndarray, f: Frame) -> float:
    """Area (mm^2) of ``lookup`` in the planes orthogonal to ``f.u`` through ``centre`` (mean of three, 1 mm apart)."""
    a = np.arange(-15.0, 15.0 + _GRID / 2, _GRID)
    b = np.arange(-20.0, 20.0 + _GRID / 2, _GRID)
    grid = a[:, None, None] * f.ap + b[None, :, None] * f.lr  # (A, B, 3)
    pts = centre + _PLANES[:, None, None, None] * f.u + grid[None]
    return float(lookup(pts).sum()) * _GRID * _GRID / len(_PLANES)


def canal_records(sp: Spine) -> list[dict[str, Any]]:
    """One record per level, top to bottom (see the module docstring)."""
    out = []
    for kind, sid, f in canal_levels(sp):
        diam = area = cord = float("nan")
        if sp.canal_pts.shape[0]:
            d = sp.canal_pts - f.origin
            du, dap, dlr = d @ f.u, d @ f.ap, d @ f.lr
            near = (np.abs(du) <= 2.5) & (dap < 0) & (dap > -50.0) & (np.abs(dlr) < 20.0)
            if near.sum() >= 5:
                cc = sp.canal_pts[near].mean(0)
                orig = (cc + np.array([-1.0, 0.0, 1.0])[:, None, None] * f.u
                        + np.array([-1.0, 0.0, 1.0])[None, :, None] * f.lr).reshape(-1, 3)
                diam = median(cast(sp.canal_lookup, orig, f.ap, -25.0, 25.0, sp.step).length)
                area = cross_section_area(sp.canal_lookup, cc, f)
                cord = cross_section_area(sp.cord_lookup, cc, f)
        name = instance_name(sid)
        region = instance_name(sid - IVD_OFFSET if kind == "disc" else sid)[0]
        out.append({"level": name, "id": int(sid), "kind": kind, "ap_diameter_mm": rnd(diam),
                    "area_mm2": rnd(area, 1), "cord_area_mm2": rnd(cord, 1) if cord > 0 else None,
                    "stenosis": stenosis_grade(region, diam, area)})
    return out
