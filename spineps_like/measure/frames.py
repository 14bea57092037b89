"""Local frames of vertebrae and discs (see the module docstring of :mod:`spineps_like.measure.spine`)."""

from __future__ import annotations

import numpy as np

from spineps_like.measure.geometry import WORLD_ANTERIOR, WORLD_INFERIOR, Frame, unit
from spineps_like.measure.structures import Spine


def _caudal_axis(sp: Spine, v: int) -> tuple[np.ndarray, str]:
    """Caudal axis of vertebra v: endplates, else the discs, else the neighbours, else the scan."""
    c = sp.bodies[v].centre
    above, below = sp.neighbours(v)
    sup, inf = sp.ep_centres.get(v, (None, None))
    if sup is not None and inf is not None and np.linalg.norm(inf - sup) > 3.0:
        u = unit(inf - sup)
        if u is not None:
            return u, "endplates"
    d_up = sp.discs[above].centre if above is not None and above in sp.discs else None
    d_dn = sp.discs[v].centre if v in sp.discs else None
    if d_up is not None and d_dn is not None:
        u = unit(d_dn - d_up)
        if u is not None:
            return u, "discs"
    elif d_up is not None or d_dn is not None:
        u = unit((c - d_up) if d_up is not None else (d_dn - c))
        if u is not None:
            return u, "disc"
    if above is not None or below is not None:
        a = sp.bodies[above].centre if above is not None else c
        b = sp.bodies[below].centre if below is not None else c
        u = unit(b - a)
        if u is not None:
            return u, "neighbours"
    return WORLD_INFERIOR, "scan"


def _anterior_axis(sp: Spine, v: int, u: np.ndarray) -> tuple[np.ndarray, str]:
    """Anterior axis of vertebra v, orthogonal to u: from the canal, else the posterior elements, else the scan."""
    c = sp.bodies[v].centre
    ap, ap_from = None, ""
    if sp.canal_pts.shape[0]:
        d = sp.canal_pts - c
        near = (np.abs(d @ u) < 6.0) & (np.einsum("ij,ij->i", d, d) < 60.0 ** 2)
        if near.sum() >= 5:
            ap, ap_from = c - sp.canal_pts[near].mean(0), "canal"
    if ap is None and sp.post_centres.get(v) is not None:
        ap, ap_from = c - sp.post_centres[v], "posterior elements"
    if ap is None:
        ap, ap_from = WORLD_ANTERIOR.copy(), "scan"
    ap = unit(ap - (ap @ u) * u)
    if ap is None:  # the canal straight above/below: fall back to the scan's anterior
        ap, ap_from = unit(WORLD_ANTERIOR - (WORLD_ANTERIOR @ u) * u), "scan"
    return ap, ap_from


def vertebra_frames(sp: Spine) -> dict[int, Frame]:
    """Frame of every vertebra with a body (origin: the body's centre)."""
    frames = {}
    for v in sp.verts:
        u, u_from = _caudal_axis(sp, v)
        ap, ap_from = _anterior_axis(sp, v, u)
        frames[v] = Frame(sp.bodies[v].centre, u, ap, np.cross(u, ap), u_from, ap_from)
    return frames


def disc_frames(sp: Spine) -> dict[int, Frame]:
    """Frame of every disc (by the vertebra above): the mean axes of its two vertebrae, origin at its centre."""
    out = {}
    for v in sp.present:
        if v not in sp.discs:
            continue
        below = sp.neighbours(v)[1] if v in sp.order else None
        fr = [sp.frames[x] for x in (v, below) if x is not None and x in sp.frames]
        if fr:
            u = unit(sum(x.u for x in fr))
            ap = sum(x.ap for x in fr)
            ap = unit(ap - (ap @ u) * u)
            u_from = "vertebrae"
        else:
            u, ap, u_from = WORLD_INFERIOR, unit(WORLD_ANTERIOR - (WORLD_ANTERIOR @ WORLD_INFERIOR) * WORLD_INFERIOR), \
                "scan"
        out[v] = Frame(sp.discs[v].centre, u, ap, np.cross(u, ap), u_from, u_from)
    return out
