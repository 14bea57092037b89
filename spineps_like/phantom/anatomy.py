"""Anatomy: the vertebral column laid out and rasterised into label volumes (the first stage of a phantom).

A chain of vertebrae C2..L5 (+ T13/L6 variants) and a five-segment sacrum along a curved line (:func:`_layout`; the
other variants' changes in :mod:`.variants`); each part painted on a fine grid (:class:`_Canvas`) as a semantic label,
an instance id and a tissue class (:data:`TISSUES`), evaluated only inside its own bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

from spineps_like.labels import SACRUM_ID, VERTEBRA_NAME_TO_ID
from spineps_like.phantom.variants import apply_variant

# ============================================================================================ anatomy tables
# Adult dimensions in mm, C2..L5 (23 levels). H corpus height, D AP depth, W LR width, disc = height of the disc below
# (centre), cap/clr canal AP/LR radius, t arch (pedicle/lamina) thickness, spinous length/angle below horizontal/
# half height/half width, costal (transverse) process length/radius, facet length/radius.
_STD_NAMES = [f"C{i}" for i in range(2, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
_TABLE = {
    "H": [15, 13.5, 13.5, 13.5, 13.5, 14.5, 16, 17, 17.5, 18, 18.5, 19, 19.5, 20, 20.5, 21.5, 22.5, 24,
          25, 26, 26.5, 26.5, 26],
    "D": [15, 15.5, 16, 16, 16.5, 17, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 29, 30, 31, 32, 33, 33],
    "W": [17, 19, 20, 21, 22, 24, 27, 28, 28, 28, 29, 30, 31, 32, 34, 36, 38, 41, 43, 45, 47, 49, 50],
    "disc": [4.5, 5, 5.5, 5.5, 5.5, 5, 4, 4, 4, 4.2, 4.4, 4.6, 4.8, 5, 5.2, 5.5, 6, 7, 8.5, 9.5, 10.5, 11, 10.5],
    "cap": [8, 7.5, 7, 7, 7, 7, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5, 7.2, 7, 7, 7.2],
    "clr": [12, 12, 12.5, 12.5, 12.5, 12, 10, 9, 8.5, 8.5, 8.5, 8.5, 8.5, 8.5, 8.5, 9, 9.5, 10, 10.5, 11, 11.5, 12,
            13],
    "t": [6, 4.5, 4.5, 4.5, 4.5, 5, 5, 5, 5, 5, 5, 5, 5.5, 5.5, 5.5, 6, 6, 6.5, 7, 7, 7.5, 7.5, 8],
    "sp_len": [24, 16, 16, 17, 20, 32, 35, 36, 38, 38, 38, 38, 38, 37, 36, 34, 32, 30, 30, 31, 31, 28, 22],
    "sp_ang": [20, 18, 18, 18, 20, 25, 30, 40, 50, 55, 60, 60, 60, 55, 50, 40, 30, 20, 12, 10, 8, 10, 15],
    "sp_h": [6, 3.5, 3.5, 3.5, 4, 5, 5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 5, 5, 5.5, 6.5, 7.5, 9, 10, 10, 9, 7],
    "sp_w": [4.5, 2.5, 2.5, 2.5, 3, 3.5, 3.5, 3, 3, 3, 3, 3, 3, 3, 3, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5],
    "co_len": [8, 10, 10, 11, 11, 14, 22, 21, 20, 19, 18, 17, 16, 15, 13, 11, 8, 6, 16, 21, 25, 22, 18],
    "co_r": [3.5, 3.5, 3.5, 3.5, 3.5, 4, 5, 5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 4, 4, 4.5, 5, 5, 5, 6],
    "fa_len": [10, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 12, 13, 14, 14, 14, 14],
    "fa_r": [5, 4.5, 4.5, 4.5, 4.5, 4.5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4.5, 4.5, 5, 5, 5.5, 5.5, 5.5, 6],
}

# Internal appearance classes (fine grid). 0 = nothing of the spine here (the analytic body background shows).
_APP = ["none", "marrow", "cortex", "endplate", "post_marrow", "post_cortex", "nucleus", "annulus", "csf", "cord",
        "ligament", "epidural_fat", "other_marrow", "other_cortex", "remnant", "roots", "nucleus_deg",
        "sacrum_marrow", "sacrum_cortex"]
A = {n: i for i, n in enumerate(_APP)}
_BG = ["air", "fat", "muscle", "viscera", "fluid", "blood", "lung", "heart", "kidney"]
#: Tissue (generation) labels of :attr:`Phantom.tissue`, id = position + 1: the spine's appearance classes, then the
#: body's. Id 0 is never used, so every voxel of a tissue map is non-zero.
TISSUES: tuple[str, ...] = tuple(_APP[1:] + _BG)
TISSUE_ID: dict[str, int] = {n: i + 1 for i, n in enumerate(TISSUES)}



@dataclass
class _Vert:
    """One vertebra (or sacral segment) of the layout, in a local frame (x posterior, y inferior, z right)."""

    vid: int
    name: str
    region: str  # 'C', 'T', 'L' or 'S'
    H: float
    D: float
    W: float
    disc: float  # centre height of the disc below; 0 = none
    cap: float
    clr: float
    t: float
    sp_len: float
    sp_ang: float
    sp_h: float
    sp_w: float
    co_len: float
    co_r: float
    fa_len: float
    fa_r: float
    k_wedge: float = 0.0  # (posterior - anterior height) / D
    conc_top: float = 1.0
    conc_bot: float = 1.0
    rim: float = 0.8
    ep_top: float = 1.5
    ep_bot: float = 1.5
    ext_top: float = 0.0
    ext_bot: float = 0.0
    waist: float = 0.05
    post_conc: float = 0.0
    lamina_drop: float = 4.0
    fused_below: bool = False
    fused_above: bool = False
    collapsed: bool = False
    narrow_disc_below: bool = False
    degenerated_disc_below: bool = False
    sacralised: bool = False
    cleft: bool = False  # intranuclear cleft (dark line in the disc below)
    slip_below: float = 0.0  # listhesis (mm): this vertebra (and all above) sits anterior of the one below by this
    O: np.ndarray = field(default_factory=lambda: np.zeros(3))
    Rm: np.ndarray = field(default_factory=lambda: np.eye(3))

    @property
    def a(self) -> float:
        return self.D / 2

    @property
    def b(self) -> float:
        return self.W / 2

    @property
    def xc(self) -> float:
        """Canal centre along local x (posterior of the corpus)."""
        return self.a + 0.8 + self.cap

    def world(self, pt: Sequence[float]) -> np.ndarray:
        return self.O + self.Rm @ np.asarray(pt, dtype=float)

    def wdir(self, d: Sequence[float]) -> np.ndarray:
        v = self.Rm @ np.asarray(d, dtype=float)
        return v / np.linalg.norm(v)


def _std_params(name: str) -> dict[str, float]:
    """Table row for a vertebra name; T13 and L6 are interpolated/copied from their neighbours."""
    if name == "T13":
        i, j = _STD_NAMES.index("T12"), _STD_NAMES.index("L1")
        return {k: 0.5 * (v[i] + v[j]) for k, v in _TABLE.items()}
    if name == "L6":
        i = _STD_NAMES.index("L5")
        return {k: v[i] for k, v in _TABLE.items()}
    i = _STD_NAMES.index(name)
    return {k: v[i] for k, v in _TABLE.items()}


def _rot(theta: float, phi: float, psi: float) -> np.ndarray:
    """Frame (columns = local x, y, z in canonical p, i, r coordinates): sagittal tilt theta (down-axis towards
    posterior), coronal tilt phi (down-axis towards right), axial rotation psi about the local long axis."""
    ct, st = math.cos(theta), math.sin(theta)
    cp, sp = math.cos(phi), math.sin(phi)
    cs, ss = math.cos(psi), math.sin(psi)
    r_sag = np.array([[ct, st, 0.0], [-st, ct, 0.0], [0.0, 0.0, 1.0]])
    r_cor = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    r_ax = np.array([[cs, 0.0, ss], [0.0, 1.0, 0.0], [-ss, 0.0, cs]])
    return r_sag @ r_cor @ r_ax


def _down(theta: float, phi: float) -> np.ndarray:
    return np.array([math.sin(theta) * math.cos(phi), math.cos(theta) * math.cos(phi), math.sin(phi)])


@dataclass
class _Layout:
    verts: list[_Vert]  # C2..last lumbar, top -> bottom
    sacrum: list[_Vert]  # S1..S5
    conus_i: float  # canonical i (mm) of the conus medullaris tip
    info: dict


def _vertebra_names(variant: str | None) -> list[str]:
    names = [f"C{i}" for i in range(2, 8)] + [f"T{i}" for i in range(1, 13)]
    if variant == "t13":
        names.append("T13")
    names += [f"L{i}" for i in range(1, 7 if variant == "l6" else 6)]
    return names


def _layout(rng: np.random.Generator, variant: str | None, fov_names: tuple[str, str], fov: str) -> _Layout:
    """Vertebra chain with dimensions, curvature and variant changes (all in canonical mm: p, i, r)."""
    names = _vertebra_names(variant)
    scale = rng.uniform(0.9, 1.1)
    verts = [_vertebra(rng, n, scale) for n in names]
    verts[0].ep_top = 0.0  # no disc above C2 (the dens articulates with C1)
    verts[-1].disc = verts[-1].disc * 0.95  # lumbosacral disc
    info = apply_variant(rng, variant, verts, _names_fully_in_fov(names, fov_names), fov)
    _degenerate_discs(rng, verts)
    sacrum = _sacrum_segments(rng, verts[-1], scale)
    info.update(_curvature(rng, verts + sacrum))
    conus_i, conus_info = _conus(rng, verts)
    info.update(conus_info)
    return _Layout(verts=verts, sacrum=sacrum, conus_i=conus_i, info=info)


def _vertebra(rng: np.random.Generator, name: str, scale: float) -> _Vert:
    """One vertebra: its table row x ``scale``, jittered, with its region's endplate, waist and lamina shape."""
    p = _std_params(name)
    jit = rng.uniform(0.96, 1.04, size=4)
    v = _Vert(vid=VERTEBRA_NAME_TO_ID[name], name=name, region=name[0],
              H=p["H"] * scale * jit[0], D=p["D"] * scale * jit[1], W=p["W"] * scale * jit[2],
              disc=p["disc"] * scale * jit[3], cap=p["cap"] * scale, clr=p["clr"] * scale, t=p["t"] * scale,
              sp_len=p["sp_len"] * scale * rng.uniform(0.9, 1.1), sp_ang=p["sp_ang"] + rng.uniform(-5, 5),
              sp_h=p["sp_h"] * scale, sp_w=p["sp_w"] * scale, co_len=p["co_len"] * scale * rng.uniform(0.9, 1.1),
              co_r=p["co_r"] * scale, fa_len=p["fa_len"] * scale, fa_r=p["fa_r"] * scale)
    v.conc_top = v.conc_bot = {"C": 0.5, "T": 0.8, "L": 1.3}[v.region] * rng.uniform(0.7, 1.3)
    v.rim = {"C": 0.5, "T": 0.7, "L": 1.0}[v.region]
    v.ep_top = v.ep_bot = rng.uniform(1.2, 2.0)
    v.waist = rng.uniform(0.03, 0.07)
    v.post_conc = 0.08 if v.region == "L" else 0.0
    v.lamina_drop = {"C": 2.0, "T": 5.0, "L": 5.0}[v.region] * scale
    v.cleft = v.region in "TL" and rng.random() < 0.6
    return v


def _degenerate_discs(rng: np.random.Generator, verts: list[_Vert]) -> None:
    """In place: random degenerated (dark) discs in the lumbar / cervical spine, common in adults."""
    for v in verts:
        if v.region in "CL" and not v.fused_below and rng.random() < 0.2:
            v.degenerated_disc_below = True


def _sacrum_segments(rng: np.random.Generator, l_last: _Vert, scale: float) -> list[_Vert]:
    """S1..S5, sized after the last lumbar vertebra ``l_last``: shrinking, S2-S5 wedged (sacral kyphosis)."""
    sacrum = []
    s_h = np.array([28, 24, 20, 16, 12]) * scale
    s_d = np.array([1.0, 0.85, 0.7, 0.55, 0.45]) * l_last.D * 1.02
    s_w = np.array([1.05, 0.8, 0.6, 0.45, 0.35]) * l_last.W
    for k in range(5):
        s = _Vert(vid=SACRUM_ID, name=f"S{k + 1}", region="S", H=float(s_h[k]), D=float(s_d[k]), W=float(s_w[k]),
                  disc=rng.uniform(0.8, 1.6) * scale if k < 4 else 0.0, cap=[7, 6, 5, 4, 3][k] * scale,
                  clr=[13, 11, 9, 7, 5][k] * scale, t=[7, 6, 5, 4, 3][k] * scale,
                  sp_len=[12, 10, 8, 0, 0][k] * scale, sp_ang=30.0, sp_h=4.0 * scale, sp_w=3.0 * scale, co_len=0.0,
                  co_r=0.0, fa_len=l_last.fa_len, fa_r=l_last.fa_r)
        # sacral kyphosis: S2/S3 slightly, S4/S5 more wedge-shaped (tan of half the wedge angle, times 2)
        s.k_wedge = 2 * math.tan(math.radians(rng.uniform(*((1.5, 3.5) if k < 3 else (3.5, 6.0))))) if k else 0.0
        s.conc_top = 1.0 if k == 0 else 0.0
        s.conc_bot = 0.0
        s.rim = 0.8 if k == 0 else 0.0
        s.ep_top, s.ep_bot = (1.5 if k == 0 else 0.0), 0.0  # S1 top: endplate look, still label 26
        sacrum.append(s)
    return sacrum


class _Curvature(NamedTuple):
    """The drawn shape of the column: sagittal angles (rad) at anchors along the arc length, coronal and axial angles
    per element, and the balance to solve the thoracic kyphosis and cervical lordosis for."""

    s_mid: np.ndarray  # arc length (mm) of each element's centre
    anchors_s: list  # arc lengths of C2, C7, the thoracolumbar junction, L4 and the S1 top
    th_s1: float  # sacral slope
    th_tl: float  # thoracolumbar junction
    ll_low: float  # share of the lordosis between L4 and S1
    sva_target: float  # C7 anterior of the S1 corner (mm)
    csva_target: float  # C2 anterior of C7 (mm)
    prof_phi: np.ndarray  # coronal angle per element (scoliosis)
    prof_psi: np.ndarray  # axial rotation per element


def _curvature(rng: np.random.Generator, chain: list[_Vert]) -> dict:
    """Place ``chain`` (the vertebrae, then the sacrum) along a drawn curvature (sets O and Rm); returns the angles
    and balances for the anatomy record."""
    curv, amp, scol = _draw_curvature(rng, chain)
    # sagittal balance: the thoracic kyphosis puts C7 above the sacrum, then the cervical lordosis C2 above C7
    cl0 = rng.uniform(12, 30)
    tk = _bisect(lambda t: _place(chain, curv, t, cl0)[0], 20.0, 60.0, curv.sva_target)
    cl = _bisect(lambda c: _place(chain, curv, tk, c)[1], -10.0, 40.0, curv.csva_target)
    sva, csva = _place(chain, curv, tk, cl)
    return {"lordosis_cervical_deg": round(cl, 1), "kyphosis_thoracic_deg": round(tk, 1),
            "lordosis_lumbar_deg": round(math.degrees(curv.th_s1 - curv.th_tl), 1),
            "sacral_slope_deg": round(math.degrees(curv.th_s1), 1), "sva_mm": round(sva, 1),
            "cervical_sva_mm": round(csva, 1), "scoliosis_deg": round(math.degrees(2 * amp), 1) if scol else 0.0}


def _draw_curvature(rng: np.random.Generator, chain: list[_Vert]) -> tuple[_Curvature, float, bool]:
    """The curvature drawn for ``chain``, with the scoliosis amplitude (rad) and whether it is a scoliosis."""
    lengths = np.array([v.H + v.disc for v in chain])
    s_top = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    s_mid = s_top + np.array([v.H for v in chain]) / 2
    idx = {v.name: k for k, v in enumerate(chain)}
    deg = math.radians
    # sagittal balance from the pelvis up: sacral slope and lumbar lordosis are drawn; thoracic kyphosis and cervical
    # lordosis are solved so that C7 stands above the sacrum (sagittal vertical axis) and C2 above C7
    th_s1 = deg(float(np.clip(rng.normal(40, 7), 25, 55)))
    th_tl = -deg(rng.uniform(8, 25))  # lumbar lordosis ~ sacral slope + 8..25 degrees
    sva_target, csva_target = rng.uniform(-10.0, 50.0), rng.uniform(0.0, 25.0)
    ll_low = rng.uniform(0.55, 0.75)  # share of the lordosis between L4 and S1
    l4 = [v for v in chain if v.region == "L"][-2]
    anchors_s = [s_mid[idx["C2"]], s_mid[idx["C7"]], s_mid[idx["T12" if "T13" not in idx else "T13"]] + 8,
                 s_mid[idx[l4.name]], s_top[idx["S1"]]]
    # coronal: mild scoliosis on some seeds
    scol = rng.random() < 0.35
    amp = deg(rng.uniform(2.0, 6.0)) if scol else deg(rng.uniform(0.0, 0.8))
    lam = rng.uniform(250, 450)
    ph0 = rng.uniform(0, 2 * math.pi)
    s_t1 = s_mid[idx["T1"]]
    win = np.clip((s_mid - s_t1 + 60) / 120, 0, 1) * np.clip((s_top[idx["S1"]] - s_mid) / 80, 0, 1)
    prof_phi = amp * np.sin(2 * math.pi * (s_mid - s_t1) / lam + ph0) * win
    prof_psi = np.deg2rad(rng.normal(0, 1.5, size=len(chain))) + 0.6 * prof_phi
    curv = _Curvature(s_mid, anchors_s, th_s1, th_tl, ll_low, sva_target, csva_target, prof_phi, prof_psi)
    return curv, amp, scol


def _place(chain: list[_Vert], curv: _Curvature, tk: float, cl: float) -> tuple[float, float]:
    """Place ``chain`` (:func:`_chain`) with thoracic kyphosis ``tk`` and cervical lordosis ``cl`` (degrees); returns
    how far C7 lies anterior of the S1 corner and C2 anterior of C7 (mm)."""
    deg = math.radians
    th_ct = curv.th_tl + deg(tk)
    th_l4 = curv.th_s1 - curv.ll_low * (curv.th_s1 - curv.th_tl)
    prof_theta = np.interp(curv.s_mid, curv.anchors_s, [th_ct - deg(cl), th_ct, curv.th_tl, th_l4, curv.th_s1])
    _chain(chain, prof_theta, curv.prof_phi, curv.prof_psi)
    c7, s1 = next(v for v in chain if v.name == "C7"), next(v for v in chain if v.name == "S1")
    sva = float(s1.world((s1.a, -s1.H / 2, 0.0))[0] - c7.O[0])  # > 0: C7 anterior of the S1 corner
    return sva, float(c7.O[0] - chain[0].O[0])  # > 0: C2 anterior of C7


def _bisect(fun: Callable[[float], float], lo: float, hi: float, target: float) -> float:
    """Where ``fun`` meets ``target`` in [lo, hi] (14 bisections); the nearer end when it does not cross it there."""
    f_lo, f_hi = fun(lo) - target, fun(hi) - target
    if f_lo * f_hi > 0:
        return lo if abs(f_lo) < abs(f_hi) else hi
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        f_mid = fun(mid) - target
        if f_mid * f_lo > 0:
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _conus(rng: np.random.Generator, verts: list[_Vert]) -> tuple[float, dict]:
    """Canonical i (mm) of the conus medullaris tip, between the T12/L1 disc and the L2 top (lower end of normal),
    and its record."""
    l1 = next(v for v in verts if v.name == "L1")
    conus_i = float(l1.O[1] + rng.uniform(-0.9, 0.9) * (l1.H / 2 + l1.disc))
    return conus_i, {"conus_level_mm_from_L1_centre": round(conus_i - float(l1.O[1]), 1)}


def _chain(chain: list[_Vert], prof_theta: np.ndarray, prof_phi: np.ndarray, prof_psi: np.ndarray) -> None:
    """Place the elements top to bottom (sets O and Rm): each disc takes the change of the sagittal/coronal angle
    between its neighbours as a wedge, limited so that its rim stays >= ~35 % of its centre height; wedge-shaped
    corpora (collapsed vertebra, sacral segments) add kyphosis, which the next discs partly compensate."""
    pos = np.array([0.0, 0.0, 0.0])  # top centre of the current element
    comp, comp_left = 0.0, 0
    prev: _Vert | None = None
    theta = phi = psi_prev = alpha_bot = 0.0
    for k, v in enumerate(chain):
        beta = math.atan(v.k_wedge / 2)
        if prev is None:
            theta, phi = float(prof_theta[k]), float(prof_phi[k])
        else:
            d_th = 0.0 if (v.region == "S" and v.name != "S1") else float(prof_theta[k] - prof_theta[k - 1])
            d_ph = float(prof_phi[k] - prof_phi[k - 1])
            if comp_left > 0:
                d_th += comp / 3
                comp_left -= 1
            if prev.fused_below:
                d_th = d_ph = 0.0
            elif prev.disc > 0:
                hmin = max(0.8, 0.35 * prev.disc)
                lim_th = math.atan(max(prev.disc - hmin, 0.0) / (0.5 * max(prev.D, v.D) + 1.5))
                lim_ph = math.atan(max(prev.disc - hmin, 0.0) / (0.5 * max(prev.W, v.W) + 1.5))
                d_th = float(np.clip(d_th, -lim_th, lim_th))
                d_ph = float(np.clip(d_ph, -lim_ph, lim_ph))
            alpha_top = alpha_bot + d_th
            theta = alpha_top - beta
            phi = phi + d_ph
            direction = _down(alpha_bot, phi - d_ph) + _down(alpha_top, phi)
            pos = pos + prev.disc * direction / np.linalg.norm(direction)
            if prev.slip_below:  # listhesis: everything below lies posterior of the slipped vertebra
                pos = pos + prev.Rm @ np.array([prev.slip_below, 0.0, 0.0])
        psi = psi_prev if (prev is not None and prev.fused_below) else float(prof_psi[k])
        v.Rm = _rot(theta, phi, psi)
        v.O = pos + v.Rm @ np.array([0.0, v.H / 2, 0.0])
        pos = v.O + v.Rm @ np.array([0.0, v.H / 2, 0.0])
        alpha_bot = theta - beta
        if v.collapsed:
            comp, comp_left = 2 * beta, 3
        prev, psi_prev = v, psi


def _names_fully_in_fov(names: list[str], fov_names: tuple[str, str]) -> list[str]:
    """Names strictly between the two vertebrae the FOV borders cut through (top cut, bottom cut)."""
    top, bot = fov_names
    i0 = names.index(top) + 1 if top in names else 0
    i1 = names.index(bot) if bot in names else len(names)
    return names[i0:i1]


def _fov_names(rng: np.random.Generator, fov: str) -> tuple[str, str]:
    """Vertebrae the top and bottom FOV borders cut through ('dens' = above C2, 'sacrum' = below the sacrum)."""
    if fov == "cervical":
        return "dens", str(rng.choice(["T1", "T2", "T2", "T3"]))
    if fov == "thoracic":
        return str(rng.choice(["C6", "C7"])), str(rng.choice(["L1", "L2"]))
    if fov == "lumbar":
        return str(rng.choice(["T10", "T11"])), "sacrum"
    return "dens", "sacrum"


# ============================================================================================ fine-grid rasterisation
class _Canvas:
    """The fine grid (canonical mm: p posterior, i inferior, r right) with semantic, instance and appearance volumes.

    Every part is evaluated only inside its own world bounding box (:meth:`window`); :meth:`paint` writes a part's
    mask with one semantic label and instance id, later parts overriding earlier ones.
    """

    def __init__(self, lo: np.ndarray, step: np.ndarray, shape: tuple[int, int, int]):
        self.lo = np.asarray(lo, dtype=float)  # centre of voxel (0, 0, 0)
        self.step = np.asarray(step, dtype=float)
        self.shape = tuple(int(s) for s in shape)
        self.sem = np.zeros(self.shape, np.uint8)
        self.inst = np.zeros(self.shape, np.uint8)
        self.app = np.zeros(self.shape, np.uint8)
        self.extent: dict[int, list[np.ndarray]] = {}

    def window(self, lo: np.ndarray, hi: np.ndarray, owner: int | None = None):
        """Slices and coordinate vectors (float32, broadcastable) of the voxels inside the box [lo, hi] (mm)."""
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        if owner is not None:
            ext = self.extent.setdefault(owner, [lo.copy(), hi.copy()])
            ext[0], ext[1] = np.minimum(ext[0], lo), np.maximum(ext[1], hi)
        a = np.maximum(np.ceil((lo - self.lo) / self.step - 1e-6), 0).astype(int)
        b = np.minimum(np.floor((hi - self.lo) / self.step + 1e-6) + 1, self.shape).astype(int)
        if np.any(b <= a):
            return None
        sl = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
        vec = [(self.lo[k] + np.arange(a[k], b[k]) * self.step[k]).astype(np.float32) for k in range(3)]
        return sl, vec[0][:, None, None], vec[1][None, :, None], vec[2][None, None, :]

    def paint(self, sl, mask: np.ndarray, sem: int, inst: int, app, empty_only: bool = False) -> None:
        target = self.sem[sl]
        mask = np.broadcast_to(mask, target.shape)
        if empty_only:
            mask = mask & (target == 0) & (self.app[sl] == 0)
        target[mask] = sem
        self.inst[sl][mask] = inst
        if np.isscalar(app):
            self.app[sl][mask] = app
        else:
            self.app[sl][mask] = np.broadcast_to(app, target.shape)[mask]


def _local(P, I, R, O: np.ndarray, Rm: np.ndarray):
    """Local (x, y, z) coordinates of broadcast world coordinates in the frame (O, Rm)."""
    o, m = O.tolist(), Rm.tolist()
    dp, di, dr = P - o[0], I - o[1], R - o[2]
    x = dp * m[0][0] + di * m[1][0] + dr * m[2][0]
    y = dp * m[0][1] + di * m[1][1] + dr * m[2][1]
    z = dp * m[0][2] + di * m[1][2] + dr * m[2][2]
    return x, y, z


def _box(O: np.ndarray, Rm: np.ndarray, lo: Sequence[float], hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of the local box [lo, hi] of the frame (O, Rm)."""
    c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], dtype=float)
    w = O[None, :] + c @ Rm.T
    return w.min(0), w.max(0)


def _capsule(cv: _Canvas, A: np.ndarray, B: np.ndarray, r0: tuple[float, float], r1: tuple[float, float],
             u_hint: np.ndarray, owner: int | None = None, planes: Sequence[tuple[np.ndarray, np.ndarray]] = (),
             outside: _Vert | None = None):
    """Segment A->B with an elliptical cross-section (radii (ru, rw) tapering from r0 to r1, rounded ends).

    ``u_hint`` orients the first cross-section axis. ``planes`` are (point, normal) half-spaces the shape is clipped
    to (kept where (X - point) . normal <= 0); with ``outside`` the shape is kept out of that vertebra's canal.
    Returns (slices, inside mask, cortex mask) or None.
    """
    A, B = np.asarray(A, float), np.asarray(B, float)
    rmax = max(r0 + r1)
    win = cv.window(np.minimum(A, B) - rmax, np.maximum(A, B) + rmax, owner)
    if win is None:
        return None
    sl, P, I, R = win
    d = B - A
    L = float(np.linalg.norm(d))
    dn = d / L
    u = np.asarray(u_hint, float) - float(np.dot(u_hint, dn)) * dn
    u /= np.linalg.norm(u)
    w = np.cross(dn, u)
    a0, dl, ul, wl = A.tolist(), dn.tolist(), u.tolist(), w.tolist()
    dp, di, dr = P - a0[0], I - a0[1], R - a0[2]
    s = dp * dl[0] + di * dl[1] + dr * dl[2]
    t = np.clip(s / L, 0.0, 1.0)
    over = s - t * L
    cu = dp * ul[0] + di * ul[1] + dr * ul[2]
    cw = dp * wl[0] + di * wl[1] + dr * wl[2]
    ru = r0[0] + (r1[0] - r0[0]) * t
    rw = r0[1] + (r1[1] - r0[1]) * t
    rho = np.sqrt((cu / ru) ** 2 + (cw / rw) ** 2 + (over / np.minimum(ru, rw)) ** 2)
    inside = rho <= 1.0
    for pt, nrm in planes:
        q, n = np.asarray(pt, float).tolist(), np.asarray(nrm, float).tolist()
        inside &= (P - q[0]) * n[0] + (I - q[1]) * n[1] + (R - q[2]) * n[2] <= 0
    if outside is not None:
        inside &= _outside_canal(outside, P, I, R)
    if not inside.any():
        return None
    cortex = rho > 1.0 - 1.0 / np.minimum(ru, rw)
    return sl, inside, cortex


def _outside_canal(v: _Vert, P, I, R, margin: float = 0.8):
    """True outside the canal of ``v`` (its elliptical cross-section grown by ``margin`` mm)."""
    x, _, z = _local(P, I, R, v.O, v.Rm)
    return ((x - v.xc) * (1 / (v.cap + margin))) ** 2 + (z * (1 / (v.clr + margin))) ** 2 > 1.0


def _corpus_rho(v: _Vert, x, z):
    """Normalised cross-section radius of a corpus: ellipse anteriorly, flatter (superellipse) posteriorly with an
    optional midline concavity (lumbar kidney shape)."""
    zn = z * (1.0 / v.b)
    if v.post_conc:
        x = np.where(x > 0, x + (v.post_conc * v.a) * np.clip(1 - zn * zn, 0, 1), x)
    xn = x * (1.0 / v.a)
    x2, z2 = xn * xn, zn * zn
    return np.where(x > 0, np.sqrt(np.sqrt(x2 * x2 + z2 * z2)), np.sqrt(x2 + z2))


def _corpus_surfaces(v: _Vert, x, rho):
    """Local y of the superior and inferior corpus surfaces (concave endplates, rounded rim, wedge, fusion)."""
    h = v.H + v.k_wedge * x
    bowl = np.clip(1 - rho * rho, 0, None)
    rim = v.rim * np.clip((rho - 0.82) * (1 / 0.18), 0, None) ** 2
    y_top = -0.5 * h - v.ext_top + v.conc_top * bowl + (0.0 if v.ext_top else rim)
    y_bot = 0.5 * h + v.ext_bot - v.conc_bot * bowl - (0.0 if v.ext_bot else rim)
    return y_top, y_bot


def _y_extent(v: _Vert) -> tuple[float, float]:
    return -(0.5 * v.H + 0.5 * abs(v.k_wedge) * v.a + v.ext_top + 0.5), 0.5 * v.H + 0.5 * abs(v.k_wedge) * v.a + \
        v.ext_bot + 0.5


def _paint_corpus(cv: _Canvas, v: _Vert, sem: int, inst: int, ep_inst: int, marrow: int, cortex: int,
                  ep_labels: tuple[int, int] = (52, 53)) -> None:
    """Corpus (with endplate layers and an anterior/posterior longitudinal ligament shell)."""
    y0, y1 = _y_extent(v)
    m = 2.2
    lo, hi = _box(v.O, v.Rm, (-v.a - m, y0, -v.b - m), (v.a + m, y1, v.b + m))
    win = cv.window(lo, hi, owner=v.vid)
    if win is None:
        return
    sl, P, I, R = win
    x, y, z = _local(P, I, R, v.O, v.Rm)
    rho = _corpus_rho(v, x, z)
    yt, yb = _corpus_surfaces(v, x, rho)
    yn = y * (2.0 / v.H)
    waist = 1.0 - v.waist * np.clip(1 - yn * yn, 0, 1)
    rw = rho / waist
    inside = (rw <= 1.0) & (y >= yt) & (y <= yb)
    # ligament shell (ALL in front, PLL behind) only where nothing else is
    lig = (rw > 1.0) & (rw <= 1.0 + 1.8 / v.a) & (y >= yt - 0.5) & (y <= yb + 0.5) & ((x < 0) | (x > 0.5 * v.a))
    cv.paint(sl, lig, 0, 0, A["ligament"], empty_only=True)
    app = np.where(rw > 1.0 - 1.0 / min(v.a, v.b), np.uint8(cortex), np.uint8(marrow))
    cv.paint(sl, inside, sem, inst, app)
    if v.ep_top > 0:
        cv.paint(sl, inside & (y < yt + v.ep_top), ep_labels[0], ep_inst, A["endplate"])
    if v.ep_bot > 0:
        cv.paint(sl, inside & (y > yb - v.ep_bot), ep_labels[1], ep_inst, A["endplate"])


def _mid_frame(u: _Vert, w: _Vert) -> tuple[np.ndarray, np.ndarray]:
    """Frame halfway between two vertebrae (origin between the upper's bottom and the lower's top centre)."""
    O = 0.5 * (u.O + u.Rm @ np.array([0.0, u.H / 2, 0.0]) + w.O - w.Rm @ np.array([0.0, w.H / 2, 0.0]))
    U, _, Vt = np.linalg.svd(u.Rm + w.Rm)
    return O, U @ Vt


def _paint_disc(cv: _Canvas, u: _Vert, w: _Vert, sem: int, inst: int, app_nucleus: int, app_annulus: int,
                cleft: bool) -> None:
    """Disc between the inferior surface of ``u`` and the superior surface of ``w`` (a wedge with the curvature)."""
    if u.disc <= 0 or u.fused_below:
        return
    O, Rm = _mid_frame(u, w)
    ad, bd = 0.5 * (u.a + w.a) * 1.03 + 0.4, 0.5 * (u.b + w.b) * 1.03 + 0.4
    hy = u.disc / 2 + 0.5 * max(u.D, w.D) * 0.35 + max(u.conc_bot, w.conc_top) + 2.0
    lo, hi = _box(O, Rm, (-ad - 0.5, -hy, -bd - 0.5), (ad + 0.5, hy, bd + 0.5))
    win = cv.window(lo, hi)
    if win is None:
        return
    sl, P, I, R = win
    xm, ym, zm = _local(P, I, R, O, Rm)
    xn, zn = xm * (1.0 / ad), zm * (1.0 / bd)
    x2, z2 = xn * xn, zn * zn
    rho_m = np.where(xm > 0, np.sqrt(np.sqrt(x2 * x2 + z2 * z2)), np.sqrt(x2 + z2))
    inside = rho_m <= 1.0
    if not inside.any():
        return
    xu, _yu, zu = _local(P, I, R, u.O, u.Rm)
    inside &= _yu > _corpus_surfaces(u, xu, _corpus_rho(u, xu, zu))[1]
    xl, yl, zl = _local(P, I, R, w.O, w.Rm)
    inside &= yl < _corpus_surfaces(w, xl, _corpus_rho(w, xl, zl))[0]
    nuc = ((xm - 0.1 * ad) * (1 / (0.58 * ad))) ** 2 + (zm * (1 / (0.62 * bd))) ** 2 <= 1.0
    if cleft:
        nuc &= np.abs(ym) > 0.4
    app = np.where(nuc, np.uint8(app_nucleus), np.uint8(app_annulus))
    cv.paint(sl, inside, sem, inst, app)


def _arch_y(v: _Vert, u):
    """Cranio-caudal extent of the arch: pedicles in the upper half of the corpus, laminae lower and taller."""
    return -0.42 * v.H + v.lamina_drop * u, 0.10 * v.H + (v.lamina_drop + 0.3 * v.H) * u


def _paint_arcus(cv: _Canvas, v: _Vert, sem: int, inst: int, marrow: int, cortex: int, full_height: bool = False,
                 fill_app: int | None = None) -> None:
    """Arcus (pedicles + laminae) as a thick elliptical ring around the canal."""
    xb = v.xc + v.cap + v.t
    gap = xb * 2.5 * abs(v.k_wedge) / 2 + 1.0  # the kyphotic sacrum opens wedge gaps posteriorly
    ylo = -0.5 * v.H - v.disc / 2 - gap if full_height else -0.45 * v.H
    yhi = 0.5 * v.H + v.disc / 2 + gap if full_height else 0.45 * v.H + v.lamina_drop + 0.5
    lo, hi = _box(v.O, v.Rm, (0.55 * v.a, ylo, -(v.clr + v.t)), (xb, yhi, v.clr + v.t))
    win = cv.window(lo, hi, owner=v.vid)
    if win is None:
        return
    sl, P, I, R = win
    x, y, z = _local(P, I, R, v.O, v.Rm)
    qi = ((x - v.xc) * (1 / v.cap)) ** 2 + (z * (1 / v.clr)) ** 2
    qo = ((x - v.xc) * (1 / (v.cap + v.t))) ** 2 + (z * (1 / (v.clr + v.t))) ** 2
    if full_height:
        yl, yh = ylo, yhi
    else:
        uu = np.clip((x - v.a) * (1 / (xb - v.a)), 0, 1)
        yl, yh = _arch_y(v, uu)
    band = (y >= yl) & (y <= yh) & (x >= 0.55 * v.a)
    inside = (qi > 1.0) & (qo <= 1.0) & band
    if fill_app is not None:  # sacral canal below the dural sac: epidural fat
        cv.paint(sl, (qi <= 1.0) & band, 0, 0, fill_app, empty_only=True)
    shell = (qi < (1 + 1.0 / v.cap) ** 2) | (qo > (1 - 1.0 / (v.cap + v.t)) ** 2)
    cv.paint(sl, inside, sem, inst, np.where(shell, np.uint8(cortex), np.uint8(marrow)))


def _facet_geometry(v: _Vert, side: int) -> tuple[float, float]:
    """(x, z) of the articular pillar of ``v`` on ``side`` (-1 left, +1 right)."""
    if v.region == "C":
        return v.xc - 0.1 * v.cap, side * (v.clr + 0.3 * v.t + 1.5)
    if v.region == "T":
        return v.xc + 0.3 * v.cap, side * (v.clr + 0.55 * v.t)
    return v.xc + 0.45 * v.cap, side * (v.clr + 0.55 * v.t)


def _facet_joint(u: _Vert, w: _Vert, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and normal (pointing to the inferior articular process of ``u``) of the facet joint u/w."""
    xu, zu = _facet_geometry(u, side)
    xw, zw = _facet_geometry(w, side)
    J = 0.5 * (u.world((xu, u.H / 2 + 0.3 * u.disc, zu)) + w.world((xw, -w.H / 2, zw)))
    reg = u.region if u.region != "S" else "L"
    if reg == "C":
        n = (0.6, -0.8, 0.0)
    elif reg == "T":
        n = (0.93, -0.35, 0.0)
    else:
        n = (0.55, 0.0, -side * 0.83)
    return J, u.wdir(n)


def _paint_articular(cv: _Canvas, v: _Vert, above: _Vert | None, below: _Vert | None, sem_inst: tuple[int, int],
                     marrow: int, cortex: int, superior_only: bool = False) -> None:
    """Superior (45/46) and inferior (47/48) articular processes; each pair meets its neighbour's at the joint."""
    sem_override, inst = sem_inst
    for side, (sap, iap) in ((-1, (45, 47)), (1, (46, 48))):
        xf, zf = _facet_geometry(v, side)
        r = v.fa_r
        up, down = -v.wdir((0, 1, 0)), v.wdir((0, 1, 0))
        # superior articular process: meets the inferior one of the vertebra above (the joint normal n points from
        # above to below, so the superior process sits on its -n side); the inferior one meets the vertebra below
        processes = [(v.world((xf, -0.1 * v.H, zf)), up, _facet_joint(above, v, side) if above is not None else None,
                      -1.0, sap)]
        if not superior_only:
            processes.append((v.world((xf + 1.0, 0.3 * v.H, zf)), down,
                              _facet_joint(v, below, side) if below is not None else None, 1.0, iap))
        for root, direction, joint, sign, label in processes:
            if joint is not None:
                J, n = joint
                res = _capsule(cv, root + sign * 0.5 * r * n, J + sign * 0.5 * r * n + 0.45 * v.fa_len * direction,
                               (r, r), (0.9 * r, 0.9 * r), v.wdir((0, 0, 1)), owner=v.vid, planes=[(J, -sign * n)],
                               outside=v)
            else:
                tip = root + (0.5 * v.H + 0.5 * v.fa_len) * direction
                res = _capsule(cv, root, tip, (r, r), (0.85 * r, 0.85 * r), v.wdir((0, 0, 1)), owner=v.vid,
                               outside=v)
            if res is not None:
                sl, inside, cx = res
                cv.paint(sl, inside, sem_override or label, inst, np.where(cx, np.uint8(cortex), np.uint8(marrow)))


def _spinous_segment(v: _Vert) -> tuple[np.ndarray, np.ndarray]:
    yl, yh = _arch_y(v, 1.0)
    A0 = v.world((v.xc + v.cap + 0.5 * v.t, 0.5 * (yl + yh), 0.0))
    ang = math.radians(v.sp_ang)
    B0 = A0 + v.sp_len * v.wdir((math.cos(ang), math.sin(ang), 0.0))
    return A0, B0


def _paint_spinous(cv: _Canvas, v: _Vert, sem: int, inst: int, marrow: int, cortex: int) -> None:
    if v.sp_len <= 0:
        return
    A0, B0 = _spinous_segment(v)
    zdir = v.wdir((0, 0, 1))
    segs = [(A0, B0, (v.sp_w, v.sp_h), (0.85 * v.sp_w, 0.8 * v.sp_h))]
    if v.name in ("C2", "C3", "C4", "C5", "C6"):  # bifid tips
        mid = A0 + 0.7 * (B0 - A0)
        for s in (-1, 1):
            segs.append((mid, B0 + s * (2.5 + 0.1 * v.sp_len) * zdir, (0.8 * v.sp_w, 0.8 * v.sp_h),
                         (0.8 * v.sp_w, 0.7 * v.sp_h)))
    for a, b, r0, r1 in segs:
        res = _capsule(cv, a, b, r0, r1, zdir, owner=v.vid, outside=v)
        if res is not None:
            sl, inside, cx = res
            cv.paint(sl, inside, sem, inst, np.where(cx, np.uint8(cortex), np.uint8(marrow)))


def _costal_segment(v: _Vert, side: int, sacrum: list[_Vert] | None = None):
    """Root, tip and radii of the costal (transverse) process of ``v`` on ``side``."""
    if v.region == "C":
        root = (0.55 * v.a, -0.05 * v.H, side * 0.9 * v.b)
        d = (-0.35, 0.1, side * 0.93)
        r0, r1 = (v.co_r, 0.9 * v.co_r), (0.8 * v.co_r, 0.7 * v.co_r)
    elif v.region == "T":
        root = (v.xc + 0.2 * v.cap, -0.15 * v.H, side * (v.clr + 0.6 * v.t))
        d = (0.55, -0.2, side * 0.8)
        r0, r1 = (v.co_r, 0.9 * v.co_r), (1.1 * v.co_r, 1.0 * v.co_r)
    else:
        root = (v.xc - 0.4 * v.cap, -0.05 * v.H, side * (v.clr + 0.5 * v.t))
        d = (0.12, 0.05, side * 1.0)
        r0, r1 = (0.6 * v.co_r, v.co_r), (0.5 * v.co_r, 0.8 * v.co_r)
    A0 = v.world(root)
    if v.sacralised and sacrum:
        s1 = sacrum[0]
        B0 = s1.world((0.1 * s1.D, -0.5 * s1.H + 3.0, side * (0.5 * v.W + 14)))
        return A0, B0, (0.8 * v.co_r * 1.4, 1.3 * v.co_r * 1.4), (1.4 * v.co_r, 1.8 * v.co_r), v.wdir((1, 0, 0))
    B0 = A0 + v.co_len * v.wdir(d)
    return A0, B0, r0, r1, v.wdir((1, 0, 0))


def _paint_costal(cv: _Canvas, v: _Vert, inst: int, marrow: int, cortex: int, sacrum: list[_Vert]) -> None:
    for side, sem in ((-1, 43), (1, 44)):  # 43 = left = towards -r (patient's left)
        if v.co_len <= 0:
            continue
        A0, B0, r0, r1, uh = _costal_segment(v, side, sacrum)
        res = _capsule(cv, A0, B0, r0, r1, uh, owner=v.vid, outside=v)
        if res is None:
            continue
        sl, inside, cx = res
        if v.region == "C" and v.name != "C7":  # foramen transversarium (vertebral artery)
            P, I, R = _grid_vectors(cv, sl)
            x, _, z = _local(P, I, R, v.O, v.Rm)
            xh, zh = 0.55 * v.a - 1.0, side * (0.9 * v.b + 0.45 * v.co_len)
            inside &= (x - xh) ** 2 + (z - zh) ** 2 > 2.4 ** 2
        cv.paint(sl, inside, sem, inst, np.where(cx, np.uint8(cortex), np.uint8(marrow)))


def _grid_vectors(cv: _Canvas, sl):
    vec = [(cv.lo[k] + np.arange(sl[k].start, sl[k].stop) * cv.step[k]).astype(np.float32) for k in range(3)]
    return vec[0][:, None, None], vec[1][None, :, None], vec[2][None, None, :]


def _paint_vertebra(cv: _Canvas, v: _Vert, above: _Vert | None, below: _Vert | None, sacrum: list[_Vert]) -> None:
    """All parts of one vertebra: arcus, spinous, costal, articular processes, then corpus with endplates."""
    m, c = A["post_marrow"], A["post_cortex"]
    _paint_spinous(cv, v, 42, v.vid, m, c)
    _paint_costal(cv, v, v.vid, m, c, sacrum)
    _paint_arcus(cv, v, 41, v.vid, m, c)
    _paint_articular(cv, v, above, below, (0, v.vid), m, c)
    _paint_corpus(cv, v, 49, v.vid, 200 + v.vid, A["marrow"], A["cortex"])
    if v.name == "C2":  # dens
        base = v.world((0.3, -0.5 * v.H + 2.0, 0.0))
        tip = v.world((1.2, -0.5 * v.H - 0.95 * v.H, 0.0))
        res = _capsule(cv, base, tip, (5.0, 5.0), (4.0, 4.0), v.wdir((0, 0, 1)), owner=v.vid)
        if res is not None:
            sl, inside, cx = res
            cv.paint(sl, inside, 49, v.vid, np.where(cx, np.uint8(A["cortex"]), np.uint8(A["marrow"])))


def _paint_sacrum(cv: _Canvas, sac: list[_Vert], l_last: _Vert, dural_end_segment: int = 1) -> None:
    """Sacrum S1-S5 (label 26): bodies with rudimentary discs, alae, fused laminae, median crest, S1 facets."""
    sm, sc = A["sacrum_marrow"], A["sacrum_cortex"]
    s1 = sac[0]
    # alae
    for side in (-1, 1):
        A0 = s1.world((0.0, 0.05 * s1.H, 0.0))
        B0 = s1.world((0.2 * s1.D, 0.45 * s1.H, side * (0.5 * s1.W + 24)))
        res = _capsule(cv, A0, B0, (0.42 * s1.D, 0.55 * s1.H), (0.3 * s1.D, 0.5 * s1.H), s1.wdir((1, 0, 0)),
                       owner=SACRUM_ID)
        if res is not None:
            sl, inside, cx = res
            cv.paint(sl, inside, 26, 26, np.where(cx, np.uint8(sc), np.uint8(sm)))
    for k, s in enumerate(sac):
        nxt = sac[k + 1] if k + 1 < len(sac) else None
        _paint_arcus(cv, s, 26, 26, sm, sc, full_height=True,
                     fill_app=A["epidural_fat"] if k > dural_end_segment else None)
        if s.sp_len > 0:
            _paint_spinous(cv, s, 26, 26, sm, sc)
        if nxt is not None:
            _paint_disc(cv, s, nxt, 26, 26, A["remnant"], A["remnant"], cleft=False)
        _paint_corpus(cv, s, 26, 26, 26, sm, sc, ep_labels=(26, 26))
    _paint_articular(cv, s1, l_last, None, (26, 26), sm, sc, superior_only=True)


def _paint_ribs_and_ilium(cv: _Canvas, verts: list[_Vert], sac: list[_Vert]) -> None:
    """Bone that is not spine (label 0): rib heads/necks of the thoracic vertebrae and the iliac bones."""
    om, oc = A["other_marrow"], A["other_cortex"]
    prev = None
    for v in verts:
        if v.region == "T":
            for side in (-1, 1):
                disc_above = prev.disc if prev is not None else 4.0
                head = v.world((0.15 * v.a, -0.5 * v.H - 0.3 * disc_above, side * (v.b + 2.5)))
                _, tp_tip, *_ = _costal_segment(v, side)
                tub = tp_tip + v.wdir((-0.2, 0.15, 0)) * 4.0
                angle = v.world((v.xc + 6.0, 0.4 * v.H, side * (v.clr + v.t + v.co_len + 30.0)))
                far = v.world((v.xc - 25.0, 1.0 * v.H, side * 95.0))
                for a, b, r0, r1 in ((head, tub, (4.0, 5.0), (4.0, 5.0)), (tub, angle, (4.0, 5.5), (3.5, 6.0)),
                                     (angle, far, (3.5, 6.0), (3.5, 6.0))):
                    res = _capsule(cv, a, b, r0, r1, v.wdir((1, 0, 0)))
                    if res is not None:
                        sl, inside, cx = res
                        cv.paint(sl, inside, 0, 0, np.where(cx, np.uint8(oc), np.uint8(om)))
        prev = v
    s1 = sac[0]
    for side in (-1, 1):
        A0 = s1.world((0.1 * s1.D, -1.2 * s1.H, side * (0.5 * s1.W + 44)))
        B0 = s1.world((0.45 * s1.D, 2.2 * s1.H, side * (0.5 * s1.W + 52)))
        res = _capsule(cv, A0, B0, (9.0, 8.0), (12.0, 9.0), s1.wdir((1, 0, 0)))
        if res is not None:
            sl, inside, cx = res
            cv.paint(sl, inside, 0, 0, np.where(cx, np.uint8(oc), np.uint8(om)))


def _canal_controls(lay: _Layout) -> dict[str, np.ndarray]:
    """Control points along the canal (3 per element): centre (p, r), radii, sagittal angle, cord radii."""
    rows = []
    elems = lay.verts + lay.sacrum[:2]
    for k, v in enumerate(elems):
        th = math.atan2(v.Rm[0, 1], v.Rm[1, 1])
        if v.region == "C":
            cord = (3.8, 6.3 if v.name in ("C4", "C5", "C6") else 5.6)
        elif v.name in ("T10", "T11", "T12", "T13"):
            cord = (4.2, 4.8)
        else:
            cord = (3.8, 4.3)
        for y in (-0.5 * v.H, 0.0, 0.5 * v.H):
            c = v.world((v.xc, y, 0.0))
            cap, clr = v.cap, v.clr
            if v.region == "S":  # dural sac ends within S2
                frac = np.clip(1.0 - (k - len(lay.verts) + (y / v.H + 0.5)) / 2.0, 0.0, 1.0)
                cap, clr = cap * frac, clr * frac
            rows.append((c[1], c[0], c[2], cap, clr, th, min(cord[0], cap - 2.2), min(cord[1], clr - 2.5)))
    top = lay.verts[0]
    c = top.world((top.xc, -0.5 * top.H - 60.0, 0.0))
    rows.insert(0, (c[1], c[0], c[2], top.cap * 1.1, top.clr, rows[0][5], 4.5, 6.5))
    arr = np.array(sorted(rows), dtype=float)
    keys = ["i", "p", "r", "cap", "clr", "th", "cord_ap", "cord_lr"]
    return {k: arr[:, j] for j, k in enumerate(keys)}


def _paint_canal(cv: _Canvas, lay: _Layout, rng: np.random.Generator) -> None:
    """Spinal canal (61) as a tube through the arches, spinal cord (60) inside it ending in the conus, roots of the
    cauda equina below (label 61, darker in the image), epidural and foraminal fat around it (label 0)."""
    ctl = _canal_controls(lay)
    i_rows = cv.lo[1] + np.arange(cv.shape[1]) * cv.step[1]
    prof = {k: np.interp(i_rows, ctl["i"], ctl[k]) for k in ctl if k != "i"}
    conus = np.clip((lay.conus_i - i_rows) / 30.0, 0.0, 1.0) ** 0.5
    prof["cord_ap"] *= conus
    prof["cord_lr"] *= conus
    roots = [(rng.uniform(-0.45, 0.45), rng.uniform(0.0, 0.6)) for _ in range(6)]
    block = 16
    for j0 in range(0, cv.shape[1], block):
        j1 = min(j0 + block, cv.shape[1])
        sel = slice(j0, j1)
        cosv = np.cos(prof["th"][sel])
        if prof["cap"][sel].max() <= 0.2:
            continue
        ext_p = prof["cap"][sel] / np.maximum(cosv, 0.3) + 3.5
        ext_r = prof["clr"][sel] + 11.0
        lo = np.array([(prof["p"][sel] - ext_p).min(), i_rows[j0] - 1e-3, (prof["r"][sel] - ext_r).min()])
        hi = np.array([(prof["p"][sel] + ext_p).max(), i_rows[j1 - 1] + 1e-3, (prof["r"][sel] + ext_r).max()])
        win = cv.window(lo, hi)
        if win is None:
            continue
        sl, P, I, R = win
        js = slice(sl[1].start, sl[1].stop)
        f = lambda a: a[js].astype(np.float32)[None, :, None]  # noqa: E731
        pc, rc, cap, clr, c = f(prof["p"]), f(prof["r"]), f(prof["cap"]), f(prof["clr"]), f(np.cos(prof["th"]))
        dp = (P - pc) * c
        dr = R - rc
        cap_s, clr_s = np.maximum(cap, 1e-3), np.maximum(clr, 1e-3)
        q = (dp / cap_s) ** 2 + (dr / clr_s) ** 2
        valid = cap > 0.3
        # epidural and foraminal fat around the sac (bones painted later take their share), PLL in front
        shell = valid & (q > 1.0) & ((dp / (cap_s + 2.5)) ** 2 + (dr / (clr_s + 6.0)) ** 2 <= 1.0) & (dp > 1.0 - cap)
        pll = (dp < -0.5 * cap) & (np.abs(dr) < clr)
        cv.paint(sl, shell, 0, 0, np.where(pll, np.uint8(A["ligament"]), np.uint8(A["epidural_fat"])),
                 empty_only=True)
        canal = valid & (q <= 1.0)
        cv.paint(sl, canal, 61, 0, A["csf"])
        ca, cl = f(prof["cord_ap"]), f(prof["cord_lr"])
        cord = canal & (ca > 0.3) & ((dp / np.maximum(ca, 1e-3)) ** 2 + (dr / np.maximum(cl, 1e-3)) ** 2 <= 1.0)
        cv.paint(sl, cord, 60, 0, A["cord"])
        below = (I > lay.conus_i) & canal
        if below.any():
            rootmask = np.zeros_like(canal)
            for zr, xr in roots:
                rootmask |= ((dr - zr * clr) ** 2 + (dp - xr * cap) ** 2) <= 0.8 ** 2
            cv.paint(sl, below & rootmask & ~cord, 61, 0, A["roots"])
