"""Anatomical variants and pathologies of a phantom's column: what each one changes in the laid-out vertebrae.

A change draws from the layout's random stream, picks among the vertebrae fully inside the field of view (never C2),
changes them in place and returns what it did, for the phantom's anatomy record. The vertebrae (C2..last lumbar, top
to bottom) are the layout's records, :class:`.anatomy._Vert`, read and changed by attribute: this module does not
import the layout. The count variants ('l6', 't13') change no vertebra: they are in the vertebra names.
"""

from __future__ import annotations

import numpy as np

from spineps_like.labels import ivd_id


def apply_variant(rng: np.random.Generator, variant: str | None, verts: list, in_fov: list[str], fov: str) -> dict:
    """Change ``verts`` (in place) for ``variant``; ``in_fov``: the names of the vertebrae fully inside the field of
    view ``fov``. Returns the record of the change (empty for none)."""
    cand = [v for v in verts if v.name in in_fov and v.name != "C2"]
    if variant == "block":
        return _block(rng, verts, cand, fov)
    if variant == "collapsed":
        return _collapsed(rng, cand)
    if variant == "narrow_discs":
        return _narrow_discs(rng, cand)
    if variant == "listhesis":
        return _listhesis(rng, verts, cand, fov)
    if variant == "sacralised_l5":
        return _sacralised_l5(rng, verts)
    return {}


def _block(rng: np.random.Generator, verts: list, cand: list, fov: str) -> dict:
    """Two neighbours in view fused: a thin disc remnant between flat, endplate-less faces."""
    pairs = [(u, w) for u, w in zip(verts[:-1], verts[1:]) if u in cand and w in cand]
    if not pairs:
        raise ValueError(f"variant 'block' needs two vertebrae inside the {fov} field of view")
    u, w = pairs[rng.integers(len(pairs))]
    u.fused_below, w.fused_above = True, True
    u.disc *= rng.uniform(0.4, 0.7)
    u.ext_bot = w.ext_top = u.disc / 2
    u.conc_bot = w.conc_top = 0.0
    u.ep_bot = w.ep_top = 0.0
    return {"block": [u.vid, w.vid]}


def _collapsed(rng: np.random.Generator, cand: list) -> dict:
    """One body in view (thoracolumbar or lower cervical first) loses 40-60 % of its height, wedged anteriorly."""
    pref = [v for v in cand if v.name in ("T11", "T12", "L1", "L2", "L3", "T8", "T9", "T10", "C5", "C6", "C7")]
    pool = pref or cand
    v = pool[rng.integers(len(pool))]
    f = rng.uniform(0.4, 0.6)
    v.H *= 1 - f
    v.k_wedge = rng.uniform(0.15, 0.35) * v.H / v.D  # anterior wedge: posterior higher than anterior
    v.collapsed = True
    v.conc_top *= 0.5
    v.conc_bot *= 0.5
    return {"collapsed": {"id": v.vid, "height_loss": round(float(f), 3)}}


def _narrow_discs(rng: np.random.Generator, cand: list) -> dict:
    """Two to four discs below vertebrae in view narrowed to 30-50 % and degenerated."""
    pool = [v for v in cand if not v.fused_below]
    k = int(min(len(pool), rng.integers(2, 5)))
    chosen = rng.choice(len(pool), size=k, replace=False) if k else []
    narrowed = []
    for j in sorted(int(c) for c in chosen):
        v = pool[j]
        f = rng.uniform(0.3, 0.5)
        v.disc *= f
        v.narrow_disc_below = v.degenerated_disc_below = True
        narrowed.append(ivd_id(v.vid))
    return {"narrow_discs": narrowed}


def _listhesis(rng: np.random.Generator, verts: list, cand: list, fov: str) -> dict:
    """Degenerative (L4/L5, C4/C5) or isthmic (L5/S1) anterolisthesis, Meyerding grade 1-2 (slip / depth below)."""
    pool = [v for v in cand if v.name in ("C3", "C4", "C5", "L3", "L4", "L5", "L6") and not v.fused_below]
    if not pool:
        raise ValueError(f"variant 'listhesis' needs a mid-cervical or lower lumbar vertebra inside the {fov} "
                         "field of view")
    v = pool[rng.integers(len(pool))]
    f = rng.uniform(0.08, 0.45)
    depth_below = verts[verts.index(v) + 1].D if v is not verts[-1] else v.D
    v.slip_below = f * depth_below
    v.disc *= rng.uniform(0.6, 0.9)
    return {"listhesis": {"id": v.vid, "slip_mm": round(float(v.slip_below), 1), "slip_fraction": round(float(f), 3),
                          "meyerding_grade": 1 if f < 0.25 else 2}}


def _sacralised_l5(rng: np.random.Generator, verts: list) -> dict:
    """The last lumbar vertebra sacralised, over a narrow degenerated disc."""
    l5 = verts[-1]
    l5.sacralised = True
    l5.disc *= rng.uniform(0.3, 0.5)
    l5.narrow_disc_below = l5.degenerated_disc_below = True
    return {"sacralised": l5.vid}

