"""Synthetic spine phantoms (sagittal MRI/CT look-alikes) with exact ground truth in the SPINEPS label scheme.

A phantom is built in three steps, each deterministic by seed (independent random streams for anatomy, field of view,
body habitus, intensities, noise and orientation, so that changing e.g. the orientation leaves the anatomy untouched):

1. **Layout** (:func:`_layout`): a chain of vertebrae C2..L5 (+ T13/L6 variants) and a five-segment sacrum along a
   curved line (cervical lordosis, thoracic kyphosis, lumbar lordosis, sacral kyphosis, optional mild scoliosis).
   Each vertebra is a rigid local frame (x posterior, y inferior/along the spine, z right) with adult dimensions
   that grow from C to L; discs take the curvature as wedges between the corpora.
2. **Rasterisation** on a fine grid (each output voxel is split into sub-voxels of at most 1.4 mm):
   every part is evaluated only inside its own bounding box (analytic implicit shapes: corpus with concave endplate
   surfaces, arcus ring around the canal, capsules for processes) and painted into three uint8 volumes: semantic
   label, instance id and an internal appearance class (marrow, cortex, endplate, nucleus, annulus, CSF, cord,
   ligament, ribs, ilium, ...).
3. **Rendering** on the output grid: the appearance classes are mapped to intensities and area-averaged over the
   sub-voxels (real partial volume); the body around the spine (fat, muscle, viscera with bowel gas, vessels, lungs,
   airway, bladder) is composited analytically with soft edges; then texture, bias field (MRI), blur and noise
   (Rician for MRI, Gaussian for CT). Masks take the label of the sub-voxel at each output voxel's centre, so a
   1-2 mm endplate survives a 3-4 mm left-right spacing.

Intensity means of ``mode='t2w'`` and ``mode='ct'`` are calibrated against the two real TPTBox sample crops
(see :func:`calibration_table` and docs/phantom_calibration.md); ``mode='random'`` draws every class intensity,
bias, noise, blur and gamma at random (domain randomisation), so that models learn shape.

Example
-------
>>> ph = make_phantom(3, fov="lumbar", mode="t2w", spacing=(1.0, 1.0, 3.3), orientation="PIR")
>>> ph.semantic.array.shape == ph.image.array.shape
True
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from spineps_like.geometry import reorient
from spineps_like.io import Scan, atomic_write_json, json_safe, save_mask, save_scan
from spineps_like.labels import SACRUM_ID, VERTEBRA_NAME_TO_ID, instance_name, ivd_id

FOVS = ("cervical", "thoracic", "lumbar", "whole")
MODES = ("t2w", "ct", "random")
VARIANTS = (None, "block", "collapsed", "l6", "t13", "sacralised_l5", "narrow_discs")
GENERATOR_VERSION = "1.0"
#: Largest sub-voxel edge (mm) of the fine grid the anatomy is rasterised on.
FINE_MAX_MM = 1.4
_MAX_FINE_VOXELS = 150_000_000


@dataclass
class Phantom:
    """A synthetic scan with exact ground truth, all on one grid.

    Attributes
    ----------
    image : Scan
        float32 image (T2w-like arbitrary units, CT in HU, or domain-randomised).
    semantic : Scan
        int16 SPINEPS semantic labels (41-49, 52, 53, 60, 61, 100, 26).
    instance : Scan
        int16 TPTBox ids: vertebra bone -> v, endplate -> 200+v, IVD -> 100+v (v above), sacrum -> 26, canal/cord -> 0.
    meta : dict
        JSON-serialisable description (seed, fov, mode, variant, spacing, orientation, vertebrae top->bottom with
        flags and corpus centroids in voxel coordinates, discs, timings).
    """

    image: Scan
    semantic: Scan
    instance: Scan
    meta: dict = field(default_factory=dict)
    #: uint8 tissue label map (:data:`TISSUES`, ids from 1): the generation labels an appearance model paints from
    #: (:mod:`spineps_like.phantom.appearance`). Finer than the semantic mask: marrow, cortex, nucleus, annulus,
    #: CSF, ... of the spine, and the body around it (fat, muscle, bowel, vessels, lung, air).
    tissue: Scan | None = None


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
_BG = ["air", "fat", "muscle", "viscera", "fluid", "blood", "lung", "heart"]
#: Tissue (generation) labels of :attr:`Phantom.tissue`, id = position + 1: the spine's appearance classes, then the
#: body's. Id 0 is never used, so every voxel of a tissue map is non-zero.
TISSUES: tuple[str, ...] = tuple(_APP[1:] + _BG)
TISSUE_ID: dict[str, int] = {n: i + 1 for i, n in enumerate(TISSUES)}

# (mean, high-frequency texture amplitude, low-frequency texture amplitude) per class.
# t2w: arbitrary units relative to corpus marrow = 1 (scaled afterwards); ct: Hounsfield units.
_T2W = {
    "marrow": (1.0, 0.16, 0.12), "cortex": (0.18, 0.04, 0.0), "endplate": (0.15, 0.04, 0.0),
    "post_marrow": (0.64, 0.16, 0.08), "post_cortex": (0.15, 0.04, 0.0), "sacrum_marrow": (1.05, 0.16, 0.12),
    "sacrum_cortex": (0.18, 0.04, 0.0), "nucleus": (1.0, 0.15, 0.10), "annulus": (0.24, 0.05, 0.03),
    "nucleus_deg": (0.3, 0.06, 0.04), "csf": (2.5, 0.35, 0.35), "cord": (0.72, 0.12, 0.08), "roots": (0.5, 0.05, 0.0),
    "ligament": (0.12, 0.03, 0.02), "epidural_fat": (1.6, 0.15, 0.1), "other_marrow": (0.9, 0.12, 0.08),
    "other_cortex": (0.15, 0.03, 0.0), "remnant": (0.35, 0.05, 0.02),
    "air": (0.0, 0.0, 0.0), "fat": (1.9, 0.12, 0.2), "muscle": (0.22, 0.06, 0.05), "viscera": (0.75, 0.12, 0.3),
    "fluid": (3.6, 0.1, 0.1), "blood": (0.12, 0.05, 0.25), "lung": (0.04, 0.02, 0.02), "heart": (0.35, 0.06, 0.15),
}
_CT = {
    "marrow": (90.0, 70.0, 30.0), "cortex": (650.0, 90.0, 0.0), "endplate": (520.0, 80.0, 0.0),
    "post_marrow": (260.0, 80.0, 30.0), "post_cortex": (900.0, 120.0, 0.0), "sacrum_marrow": (90.0, 70.0, 30.0),
    "sacrum_cortex": (650.0, 90.0, 0.0), "nucleus": (64.0, 12.0, 5.0), "annulus": (80.0, 12.0, 5.0),
    "nucleus_deg": (95.0, 12.0, 5.0), "csf": (2.0, 5.0, 3.0), "cord": (35.0, 5.0, 3.0), "roots": (30.0, 5.0, 0.0),
    "ligament": (75.0, 10.0, 5.0), "epidural_fat": (-85.0, 10.0, 10.0), "other_marrow": (160.0, 60.0, 20.0),
    "other_cortex": (800.0, 100.0, 0.0), "remnant": (250.0, 40.0, 0.0),
    "air": (-1000.0, 0.0, 0.0), "fat": (-100.0, 10.0, 10.0), "muscle": (48.0, 10.0, 6.0),
    "viscera": (38.0, 12.0, 12.0), "fluid": (8.0, 5.0, 3.0), "blood": (42.0, 5.0, 3.0), "lung": (-840.0, 40.0, 40.0),
    "heart": (42.0, 8.0, 5.0),
}


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
    verts: list[_Vert] = []
    for n in names:
        p = _std_params(n)
        jit = rng.uniform(0.96, 1.04, size=4)
        v = _Vert(vid=VERTEBRA_NAME_TO_ID[n], name=n, region=n[0],
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
        verts.append(v)
    c2 = verts[0]
    c2.ep_top = 0.0  # no disc above C2 (the dens articulates with C1)
    verts[-1].disc = verts[-1].disc * 0.95  # lumbosacral disc
    # ------------------------------------------------------------------ variants
    info: dict = {}
    in_fov = _names_fully_in_fov(names, fov_names)
    cand = [v for v in verts if v.name in in_fov and v.name != "C2"]
    if variant == "block":
        pairs = [(u, w) for u, w in zip(verts[:-1], verts[1:]) if u in cand and w in cand]
        if not pairs:
            raise ValueError(f"variant 'block' needs two vertebrae inside the {fov} field of view")
        u, w = pairs[rng.integers(len(pairs))]
        u.fused_below, w.fused_above = True, True
        u.disc *= rng.uniform(0.4, 0.7)
        u.ext_bot = w.ext_top = u.disc / 2
        u.conc_bot = w.conc_top = 0.0
        u.ep_bot = w.ep_top = 0.0
        info["block"] = [u.vid, w.vid]
    if variant == "collapsed":
        pref = [v for v in cand if v.name in ("T11", "T12", "L1", "L2", "L3", "T8", "T9", "T10", "C5", "C6", "C7")]
        pool = pref or cand
        v = pool[rng.integers(len(pool))]
        f = rng.uniform(0.4, 0.6)
        v.H *= 1 - f
        v.k_wedge = rng.uniform(0.15, 0.35) * v.H / v.D  # anterior wedge: posterior higher than anterior
        v.collapsed = True
        v.conc_top *= 0.5
        v.conc_bot *= 0.5
        info["collapsed"] = {"id": v.vid, "height_loss": round(float(f), 3)}
    if variant == "narrow_discs":
        pool = [v for v in cand if not v.fused_below]
        k = int(min(len(pool), rng.integers(2, 5)))
        chosen = rng.choice(len(pool), size=k, replace=False) if k else []
        info["narrow_discs"] = []
        for j in sorted(int(c) for c in chosen):
            v = pool[j]
            f = rng.uniform(0.3, 0.5)
            v.disc *= f
            v.narrow_disc_below = v.degenerated_disc_below = True
            info["narrow_discs"].append(ivd_id(v.vid))
    if variant == "sacralised_l5":
        l5 = verts[-1]
        l5.sacralised = True
        l5.disc *= rng.uniform(0.3, 0.5)
        l5.narrow_disc_below = l5.degenerated_disc_below = True
        info["sacralised"] = l5.vid
    # random degenerated (dark) discs in the lumbar / cervical spine, common in adults
    for v in verts:
        if v.region in "CL" and not v.fused_below and rng.random() < 0.2:
            v.degenerated_disc_below = True
    # ------------------------------------------------------------------ sacrum segments
    l_last = verts[-1]
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
    chain = verts + sacrum
    # ------------------------------------------------------------------ curvature profile
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
    l4 = [v for v in verts if v.region == "L"][-2]
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
    c7, s1 = chain[idx["C7"]], chain[idx["S1"]]

    def build(tk: float, cl: float) -> tuple[float, float]:
        th_ct = th_tl + deg(tk)
        th_l4 = th_s1 - ll_low * (th_s1 - th_tl)
        prof_theta = np.interp(s_mid, anchors_s, [th_ct - deg(cl), th_ct, th_tl, th_l4, th_s1])
        _chain(chain, prof_theta, prof_phi, prof_psi)
        sva = float(s1.world((s1.a, -s1.H / 2, 0.0))[0] - c7.O[0])  # > 0: C7 anterior of the S1 corner
        return sva, float(c7.O[0] - chain[0].O[0])  # > 0: C2 anterior of C7

    def solve(fun, lo: float, hi: float, target: float) -> float:
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

    cl0 = rng.uniform(12, 30)
    tk = solve(lambda t: build(t, cl0)[0], 20.0, 60.0, sva_target)
    cl = solve(lambda c: build(tk, c)[1], -10.0, 40.0, csva_target)
    sva, csva = build(tk, cl)
    info["lordosis_cervical_deg"] = round(cl, 1)
    info["kyphosis_thoracic_deg"] = round(tk, 1)
    info["lordosis_lumbar_deg"] = round(math.degrees(th_s1 - th_tl), 1)
    info["sacral_slope_deg"] = round(math.degrees(th_s1), 1)
    info["sva_mm"] = round(sva, 1)
    info["cervical_sva_mm"] = round(csva, 1)
    info["scoliosis_deg"] = round(math.degrees(2 * amp), 1) if scol else 0.0
    # conus medullaris tip: between the T12/L1 disc and the L2 top (lower end of normal)
    l1 = next(v for v in verts if v.name == "L1")
    conus_i = float(l1.O[1] + rng.uniform(-0.9, 0.9) * (l1.H / 2 + l1.disc))
    info["conus_level_mm_from_L1_centre"] = round(conus_i - float(l1.O[1]), 1)
    return _Layout(verts=verts, sacrum=sacrum, conus_i=conus_i, info=info)


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


# ============================================================================================ body around the spine
def _spine_profiles(lay: _Layout, i_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Cranio-caudal profiles (per output row) of the spine's landmarks, used to place the body around it."""
    pts = []
    for v in lay.verts + lay.sacrum:
        pts.append((v.O[1], v.world((-v.a, 0, 0))[0], v.O[0], v.world((v.xc, 0, 0))[0],
                    v.world((v.xc + v.cap + v.t, 0.2 * v.H, 0))[0], v.O[2], v.b))
    arr = np.array(sorted(pts), dtype=float)
    keys = ["p_front", "p_mid", "p_canal", "p_lam", "r_mid", "b"]
    return {k: np.interp(i_rows, arr[:, 0], arr[:, j + 1]) for j, k in enumerate(keys)}


def _level_i(lay: _Layout, name: str, default: float) -> float:
    for v in lay.verts + lay.sacrum:
        if v.name == name:
            return float(v.O[1])
    return default


def _body_params(rng: np.random.Generator) -> dict[str, float]:
    """Body habitus (mm): subcutaneous fat, muscle thickness, body depth, organ sizes."""
    return {
        "fat": rng.uniform(4.0, 35.0), "musc_neck": rng.uniform(45, 65), "musc_thorax": rng.uniform(14, 26),
        "musc_lumbar": rng.uniform(28, 48), "musc_pelvis": rng.uniform(10, 25), "ant_neck": rng.uniform(42, 60),
        "ant_thorax": rng.uniform(100, 140), "ant_abdomen": rng.uniform(80, 170), "ant_pelvis": rng.uniform(90, 130),
        "neck_half": rng.uniform(50, 64), "aw": rng.uniform(12, 20), "aorta": rng.uniform(9, 13),
        "psoas": rng.uniform(16, 26), "diaph": rng.uniform(-0.6, 0.6), "mw": rng.uniform(40, 60),
        "bladder": rng.uniform(15, 38) if rng.random() < 0.7 else 0.0, "heart": rng.uniform(42, 55),
    }


def _region_weights(lay: _Layout, i_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Soft neck / thorax / abdomen / pelvis weights per row (sum 1), from the vertebral levels."""
    inlet = _level_i(lay, "T1", -1e9) - 10.0
    diaph = _level_i(lay, "T12", 1e9)
    pelvis = _level_i(lay, lay.verts[-1].name, 1e9)

    def step(c, width):
        return np.clip(0.5 + (i_rows - c) / width, 0.0, 1.0)

    s_in, s_di, s_pe = step(inlet, 50.0), step(diaph, 30.0), step(pelvis, 40.0)
    return {"neck": 1 - s_in, "thorax": s_in * (1 - s_di), "abdomen": s_di * (1 - s_pe), "pelvis": s_pe}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float):
    """Zero-mean, unit-variance Gaussian random field with correlation length ~sigma_mm.

    Fine fields are filtered directly; coarse ones are filtered on a grid ~sigma/2 mm and brought up by separable
    linear interpolation (three small matrix products, much faster than ``ndimage.zoom``).
    """
    step = np.maximum(1, np.floor(max(1.0, sigma_mm / 2.0) / np.asarray(spacing))).astype(int)
    if np.all(step == 1):
        out = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), tuple(sigma_mm / spacing), truncate=3.0)
    else:
        cshape = tuple(int(math.ceil(n / f)) + 2 for n, f in zip(shape, step))
        noise = rng.standard_normal(cshape, dtype=np.float32)
        noise = ndi.gaussian_filter(noise, tuple(float(sigma_mm / (s * f)) for s, f in zip(spacing, step)),
                                    mode="wrap", truncate=3.0)
        out = noise
        for ax, (n, f) in enumerate(zip(shape, step)):
            if f == 1:
                out = out[(slice(None),) * ax + (slice(1, n + 1),)]
                continue
            pos = (np.arange(n) + 0.5) / f + 0.5  # output voxel centres in coarse-grid index units
            j0 = np.clip(np.floor(pos).astype(np.intp), 0, cshape[ax] - 2)
            sh = [1, 1, 1]
            sh[ax] = n
            t = (pos - j0).astype(np.float32).reshape(sh)
            lo_ = out.take(j0, axis=ax)
            out = lo_ + t * (out.take(j0 + 1, axis=ax) - lo_)
        out = np.ascontiguousarray(out)
    sample = out.reshape(-1)[::7]
    out -= float(sample.mean(dtype=np.float64))
    out *= 1.0 / (float(sample.std(dtype=np.float64)) + 1e-6)
    return out.astype(np.float32, copy=False)


def _body(lay: _Layout, P, I, R, spacing: np.ndarray, hab: dict, table: dict, rng: np.random.Generator,
          tissue: np.ndarray | None = None):
    """Analytic body around the spine on the output grid: returns (mean, hf amplitude, lf amplitude) arrays.

    ``tissue`` (uint8, output grid, optional) receives the body's tissue labels (:data:`TISSUE_ID`): each class
    where its soft weight passes one half, in the same painting order as the intensities.

    Classes are composited with soft (about one voxel) edges, each inside its own bounding box: subcutaneous fat,
    paraspinal and neck muscles, airway and trachea, lungs, heart, oesophagus, aorta, vena cava, psoas, bowel with gas
    and fluid pockets, bladder; everything outside the body is air.
    """
    shape = (P.shape[0], I.shape[1], R.shape[2])
    p1, i1, r1 = P[:, 0, 0].astype(float), I[0, :, 0].astype(float), R[0, 0, :].astype(float)
    prof = _spine_profiles(lay, i1)
    prof["p_lam"] = ndi.gaussian_filter1d(prof["p_lam"], 25.0 / spacing[1], mode="nearest")
    prof.update(_region_weights(lay, i1))
    ramp = float(max(spacing.min(), 0.7)) * 1.2
    mu = np.full(shape, table["air"][0], np.float32)
    ahf = np.full(shape, table["air"][1], np.float32)
    alf = np.full(shape, table["air"][2], np.float32)
    reg = {k: prof[k] for k in ("neck", "thorax", "abdomen", "pelvis")}
    fat_t = hab["fat"] * (0.6 * reg["neck"] + 0.8 * reg["thorax"] + reg["abdomen"] + 1.3 * reg["pelvis"])
    musc_t = (hab["musc_neck"] * reg["neck"] + hab["musc_thorax"] * reg["thorax"]
              + hab["musc_lumbar"] * reg["abdomen"] + hab["musc_pelvis"] * reg["pelvis"])
    prof["p_skin"] = prof["p_lam"] + musc_t + fat_t
    prof["fat_t"] = fat_t
    ant = (hab["ant_neck"] * reg["neck"] + hab["ant_thorax"] * reg["thorax"] + hab["ant_abdomen"] * reg["abdomen"]
           + hab["ant_pelvis"] * reg["pelvis"])
    prof["p_ant"] = prof["p_front"] - ant
    prof["half"] = hab["neck_half"] * reg["neck"] + 170.0 * (1 - reg["neck"])

    def soft(d):
        return np.clip(0.5 + d * (1.0 / ramp), 0.0, 1.0)

    def box(p_lo, p_hi, i_lo, i_hi, r_lo=-1e9, r_hi=1e9):
        """Slices of the output grid inside the mm box, and the coordinates/profiles there (or None)."""
        sl = []
        for v, lo, hi in ((p1, p_lo, p_hi), (i1, i_lo, i_hi), (r1, r_lo, r_hi)):
            a, b = np.searchsorted(v, lo - ramp), np.searchsorted(v, hi + ramp, side="right")
            if b <= a:
                return None
            sl.append(slice(int(a), int(b)))
        sl = tuple(sl)
        pr = {k: v[sl[1]].astype(np.float32)[None, :, None] for k, v in prof.items()}
        return sl, P[sl[0]], I[:, sl[1]], R[..., sl[2]], pr

    def rows(i_lo, i_hi, key, lo_off, hi_off):
        """p range of a profile (+ offsets) over the rows in [i_lo, i_hi]."""
        m = (i1 >= i_lo - 5) & (i1 <= i_hi + 5)
        if not m.any():
            return None
        v = prof[key][m]
        return float(v.min() + lo_off), float(v.max() + hi_off)

    def blend(sl, w, cls):
        m, h, l_ = table[cls]
        sub = mu[sl]
        w = np.broadcast_to(w, sub.shape)
        sub += w * (m - sub)
        sub = ahf[sl]
        sub += w * (h - sub)
        sub = alf[sl]
        sub += w * (l_ - alf[sl])
        if tissue is not None:
            tissue[sl][w > 0.5] = TISSUE_ID[cls]

    full = box(-1e9, 1e9, -1e9, 1e9)
    sl, Pb, Ib, Rb, pr = full
    dr = np.abs(Rb - pr["r_mid"])
    # body (fat); the neck is round-ish: its lateral border recedes towards the front and back
    half_p = 0.5 * (pr["p_skin"] - pr["p_ant"])
    ell = 1.0 - ((Pb - 0.5 * (pr["p_ant"] + pr["p_skin"])) / half_p) ** 2
    half_eff = np.where(pr["neck"] > 0.5, pr["half"] * np.sqrt(np.clip(ell, 0.05, 1.0)) + 10.0, pr["half"])
    body = soft(np.minimum(np.minimum(Pb - pr["p_ant"], pr["p_skin"] - Pb), half_eff - dr))
    blend(sl, body, "fat")
    # posterior paraspinal / neck muscles under the subcutaneous fat
    mw = hab["mw"] * (1 - pr["neck"]) + (pr["half"] - 8.0) * pr["neck"]
    post = soft(np.minimum(np.minimum(Pb - (pr["p_canal"] - 4.0), (pr["p_skin"] - pr["fat_t"]) - Pb), mw - dr))
    blend(sl, post * body, "muscle")
    i_c4, i_t1 = _level_i(lay, "C4", -1e9), _level_i(lay, "T1", 1e9)
    i_t4, i_t5 = _level_i(lay, "T4", -1e9), _level_i(lay, "T5", 1e9)
    i_t10, i_t12 = _level_i(lay, "T10", 1e9), _level_i(lay, "T12", 1e9)
    i_l4, i_l5 = _level_i(lay, "L4", 1e9), _level_i(lay, lay.verts[-1].name, 1e9)
    # prevertebral strip (longus colli in the neck, thin in the upper thorax) and lateral neck muscles
    pr_rng = rows(-1e9, i_t4, "p_front", -20.0, 0.0)
    if pr_rng:
        bx = box(pr_rng[0], pr_rng[1] + 40.0, -1e9, i_t4 + 20.0)
        if bx:
            s, Pb, Ib, Rb, pr = bx
            prev = 4.0 + 10.0 * np.clip((Ib - i_c4) / 40.0, 0, 1)
            w = soft(np.minimum(np.minimum(Pb - (pr["p_front"] - prev), pr["p_canal"] + 4.0 - Pb),
                                pr["b"] + 14.0 - np.abs(Rb - pr["r_mid"])))
            blend(s, w * np.maximum(pr["neck"], 0.25 * pr["thorax"]), "muscle")
    # neck: airway and anterior neck (thyroid, strap muscles)
    if prof["neck"].max() > 0:
        i_hi = float(i1[prof["neck"] > 0].max())
        rg = rows(-1e9, i_hi, "p_ant", 0.0, 0.0)
        bx = box(rg[0], float(prof["p_front"][i1 <= i_hi + 5].max()), -1e9, i_hi)
        if bx:
            s, Pb, Ib, Rb, pr = bx
            prev = 4.0 + 10.0 * np.clip((Ib - i_c4) / 40.0, 0, 1)
            p_aw = pr["p_front"] - prev - 0.5 * hab["aw"]
            dr = np.abs(Rb - pr["r_mid"])
            # lateral and anterior neck muscles (scalenes, sternocleidomastoid, strap muscles), then the airway,
            # carotid arteries / jugular veins as flow voids, and the thyroid / larynx in front of the airway
            neck_m = soft(np.minimum(np.minimum(Pb - (pr["p_ant"] + pr["fat_t"]), pr["p_canal"] + 4.0 - Pb),
                                     pr["half"] - pr["fat_t"] - 6.0 - dr))
            blend(s, neck_m * pr["neck"], "muscle")
            blend(s, soft(np.minimum(0.5 * hab["aw"] - np.abs(Pb - p_aw), 9.0 - dr)) * pr["neck"], "air")
            for side in (-1.0, 1.0):
                d = 5.0 - np.sqrt((Pb - (p_aw + 2.0)) ** 2 + (Rb - pr["r_mid"] - side * 24.0) ** 2)
                blend(s, soft(d) * pr["neck"], "blood")
            front = soft(np.minimum(np.minimum(p_aw - 0.5 * hab["aw"] - 2.0 - Pb, Pb - (pr["p_ant"] + pr["fat_t"])),
                                    22.0 - dr))
            blend(s, front * pr["neck"], "viscera")
    # thorax: trachea (to the carina), lungs, heart, oesophagus, under a dome-shaped diaphragm
    if prof["thorax"].max() > 0:
        rg = rows(i_t1 - 30.0, i_t5, "p_front", -36.0, -16.0)
        bx = box(rg[0], rg[1], i_t1 - 30.0, i_t5) if rg else None
        if bx:
            s, Pb, Ib, Rb, pr = bx
            tr = soft(np.minimum(8.0 - np.sqrt((Pb - (pr["p_front"] - 26.0)) ** 2 + (Rb - pr["r_mid"] - 2.0) ** 2),
                                 i_t5 - Ib))
            blend(s, tr * pr["thorax"], "air")
        i_th = float(i1[prof["thorax"] > 0].max()) + 10.0
        rg = rows(-1e9, i_th, "p_canal", 0.0, 12.0)
        bx = box(float(prof["p_ant"].min()), rg[1], -1e9, i_th)
        if bx:
            s, Pb, Ib, Rb, pr = bx
            dr = np.abs(Rb - pr["r_mid"])
            pf_d = float(np.interp(i_t12, i1, prof["p_front"]))
            i_d = i_t12 + hab["diaph"] * 20.0 - 0.35 * np.clip(pf_d - Pb, 0, 150)
            th = pr["thorax"] * soft(i_d - Ib) * soft(np.minimum(Pb - pr["p_ant"], pr["half"] - dr))
            lung = soft(np.minimum(np.minimum(dr - (pr["b"] + 5.0), pr["p_canal"] + 10.0 - Pb),
                                   Pb - (pr["p_ant"] + 25.0)))
            blend(s, lung * th, "lung")
            i_t7 = _level_i(lay, "T7", 0.5 * (i_t4 + i_t10))
            pf7 = float(np.interp(i_t7, i1, prof["p_front"]))
            hr = hab["heart"]
            heart = hr * (1.0 - np.sqrt(((Pb - (pf7 - 28.0 - hr)) / hr) ** 2 + ((Ib - i_t7 - 10.0) / (1.2 * hr)) ** 2
                                        + ((Rb - pr["r_mid"] + 15.0) / (1.2 * hr)) ** 2))
            blend(s, soft(heart) * th, "heart")
            eso = soft(7.0 - np.sqrt((Pb - (pr["p_front"] - 9.0)) ** 2 + (Rb - pr["r_mid"] - 4.0) ** 2))
            blend(s, eso * pr["thorax"], "muscle")
    # abdomen and pelvis: bowel (soft tissue with gas and fluid pockets), psoas, vena cava, bladder
    abd = prof["abdomen"] + prof["pelvis"]
    if abd.max() > 0:
        i_lo = float(i1[abd > 0].min())
        bx = box(-1e9, 1e9, i_lo, 1e9)
        s, Pb, Ib, Rb, pr = bx
        sh = tuple(x.stop - x.start for x in s)
        v1 = _smooth_field(rng, sh, spacing, 7.0)
        v2 = _smooth_field(rng, sh, spacing, 12.0)
        gut = soft(pr["p_front"] - 22.0 - Pb) * soft(pr["p_skin"] - 20.0 - Pb) * (pr["abdomen"] + pr["pelvis"])
        gut = gut * soft(np.minimum(Pb - pr["p_ant"], pr["half"] - np.abs(Rb - pr["r_mid"])))
        blend(s, gut * soft((v2 + 0.3) * 6.0), "viscera")
        blend(s, gut * soft((v1 - 1.3) * 8.0), "air")
        blend(s, gut * soft((-v1 - 1.6) * 8.0), "fluid")
        rg = rows(i_t12, 1e9, "p_mid", -35.0, 35.0)
        bx = box(rg[0], rg[1], i_t12, 1e9) if rg else None
        if bx:
            s, Pb, Ib, Rb, pr = bx
            psoas_r = hab["psoas"] * np.clip((Ib - i_t12) / 120.0, 0, 1) ** 0.7
            for side in (-1.0, 1.0):
                rc = pr["r_mid"] + side * (pr["b"] + 0.75 * psoas_r)
                d = psoas_r - np.sqrt((Pb - (pr["p_mid"] - 0.15 * (pr["p_mid"] - pr["p_front"]))) ** 2
                                      + (Rb - rc) ** 2)
                blend(s, soft(d) * (pr["abdomen"] + pr["pelvis"]) * (psoas_r > 1.0), "muscle")
        rg = rows(i_t10, i_l5, "p_front", -30.0, 0.0)
        bx = box(rg[0], rg[1], i_t10, i_l5) if rg else None
        if bx:
            s, Pb, Ib, Rb, pr = bx
            ivc = soft(np.minimum(10.0 - np.sqrt(((Pb - (pr["p_front"] - 13.0)) * 1.4) ** 2
                                                 + (Rb - pr["r_mid"] - pr["b"] * 0.45 - 8.0) ** 2), i_l5 - Ib))
            blend(s, ivc * pr["abdomen"], "blood")
        if hab["bladder"] > 0 and "S3" in {v.name for v in lay.sacrum}:
            i_s3 = _level_i(lay, "S3", 1e9)
            pf_s1 = float(np.interp(_level_i(lay, "S1", 0.0), i1, prof["p_front"]))
            rb = hab["bladder"]
            bx = box(pf_s1 - 60.0 - rb, pf_s1 - 60.0 + rb, i_s3 + 25.0 - rb, i_s3 + 25.0 + rb)
            if bx:
                s, Pb, Ib, Rb, pr = bx
                d = rb * (1.0 - np.sqrt(((Pb - (pf_s1 - 60.0)) / rb) ** 2 + ((Ib - (i_s3 + 25.0)) / rb) ** 2
                                        + ((Rb - pr["r_mid"]) / (1.2 * rb)) ** 2))
                blend(s, soft(d) * pr["pelvis"], "fluid")
    # descending aorta (left-anterior of the spine), T4 to L4
    ra = hab["aorta"]
    rg = rows(i_t4, i_l4, "p_front", -2.0 - 2 * ra, -2.0)
    bx = box(rg[0], rg[1], i_t4, i_l4) if rg else None
    if bx:
        s, Pb, Ib, Rb, pr = bx
        d = ra - np.sqrt((Pb - (pr["p_front"] - 2.0 - ra)) ** 2 + (Rb - (pr["r_mid"] - 0.4 * pr["b"] - 6.0)) ** 2)
        blend(s, soft(np.minimum(d, np.minimum(Ib - i_t4, i_l4 - Ib))) * (1 - pr["neck"]), "blood")
    return mu, ahf, alf


# ============================================================================================ rendering
def _intensity_table(mode: str, rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    if mode == "t2w":
        t = {k: (m * float(rng.uniform(0.9, 1.1)), h, l_) for k, (m, h, l_) in _T2W.items()}  # scanner/subject
        hyd = rng.uniform(0.7, 1.3)  # disc hydration of this subject
        t["nucleus"] = (t["nucleus"][0] * hyd, t["nucleus"][1], t["nucleus"][2])
        t["fat"] = (t["fat"][0] * rng.uniform(0.85, 1.15), *t["fat"][1:])
        t["marrow"] = (t["marrow"][0] * rng.uniform(0.9, 1.1), *t["marrow"][1:])
        return t
    if mode == "ct":
        t = {k: (m + (float(rng.normal(0.0, 6.0)) if -200 < m < 200 else 0.0), h, l_) for k, (m, h, l_) in _CT.items()}
        bmd = rng.uniform(-40.0, 80.0)  # bone density of this subject
        for k in ("marrow", "sacrum_marrow", "post_marrow", "other_marrow"):
            t[k] = (t[k][0] + bmd, *t[k][1:])
        return t
    names = set(_T2W)
    return {k: (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.0, 0.12)))
            for k in sorted(names)}


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over f0 x f1 x f2 blocks (area averaging), as sums of strided views."""
    if f == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    out = None
    for o0 in range(f[0]):
        for o1 in range(f[1]):
            for o2 in range(f[2]):
                part = a[o0::f[0], o1::f[1], o2::f[2]]
                out = part.astype(np.float32) if out is None else out + part
    out *= 1.0 / (f[0] * f[1] * f[2])
    return out


def _render(app: np.ndarray, f: tuple[int, int, int], lay: _Layout, spacing: np.ndarray, out_lo: np.ndarray,
            mode: str, rngs: dict[str, np.random.Generator], hab: dict,
            tissue: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Image on the output grid: area-averaged spine classes over the analytic body, texture, bias, blur, noise.
    ``tissue`` (output grid, filled with the spine's tissue labels) receives the body's labels where it is 0."""
    table = _intensity_table(mode, rngs["intensity"])
    lut = np.array([table[n] if n != "none" else (0.0, 0.0, 0.0) for n in _APP], dtype=np.float32)
    frac = _block_mean((app > 0).view(np.uint8), f)
    s_mu = _block_mean(lut[:, 0][app], f)
    s_hf = _block_mean(lut[:, 1][app], f)
    s_lf = _block_mean(lut[:, 2][app], f)
    shape = frac.shape
    P = (out_lo[0] + np.arange(shape[0]) * spacing[0]).astype(np.float32)[:, None, None]
    I = (out_lo[1] + np.arange(shape[1]) * spacing[1]).astype(np.float32)[None, :, None]
    R = (out_lo[2] + np.arange(shape[2]) * spacing[2]).astype(np.float32)[None, None, :]
    body_tissue = None if tissue is None else np.full(shape, TISSUE_ID["air"], np.uint8)
    b_mu, b_hf, b_lf = _body(lay, P, I, R, spacing, hab, table, rngs["body"], body_tissue)
    if tissue is not None:
        np.copyto(tissue, body_tissue, where=tissue == 0)
    keep = 1.0 - frac
    img = b_mu * keep + s_mu
    amp_hf = b_hf * keep + s_hf
    amp_lf = b_lf * keep + s_lf
    rn = rngs["noise"]
    t_hf = _smooth_field(rn, shape, spacing, 0.45)
    t_lf = _smooth_field(rn, shape, spacing, 4.0)
    img += amp_hf * t_hf + amp_lf * t_lf
    info: dict = {}
    if mode == "t2w":
        gain = float(rn.uniform(55.0, 140.0))
        img = np.maximum(img, 0.0) * gain
        img *= _bias_field(rn, shape, P, strength=rn.uniform(0.2, 0.6), coil=True)
        img = _blur(img, rn.uniform(0.25, 0.55))
        sigma = float(rn.uniform(0.05, 0.10)) * gain
        img = _rician(rn, img, sigma)
        info.update(gain=round(gain, 2), noise_sigma=round(sigma, 2))
    elif mode == "ct":
        img = _blur(img, rn.uniform(0.35, 0.7))
        sigma = float(rn.uniform(25.0, 85.0))
        noise = ndi.gaussian_filter(rn.standard_normal(shape, dtype=np.float32), (0.6, 0.6, 0.0))  # kernel texture
        img = img + noise * (sigma / (float(noise.reshape(-1)[::7].std()) + 1e-6))
        img = np.clip(img, -1024.0, 3071.0)
        info.update(noise_sigma_hu=round(sigma, 1))
    else:
        gamma = float(np.exp(rn.uniform(-0.6, 0.6)))
        img = np.clip(img, 0.0, None)
        img = (img / (img.max() + 1e-6)) ** gamma
        img *= _bias_field(rn, shape, P, strength=rn.uniform(0.0, 0.8), coil=rn.random() < 0.5)
        img = _blur(img, rn.uniform(0.0, 1.2))
        sigma = float(rn.uniform(0.0, 0.08))
        img = _rician(rn, img, sigma) if rn.random() < 0.5 else img + sigma * rn.standard_normal(shape).astype(
            np.float32)
        img = img * float(rn.uniform(200.0, 2000.0)) + float(rn.uniform(-100.0, 100.0))
        info.update(gamma=round(gamma, 3), noise_sigma=round(sigma, 4))
    info["intensity_means"] = {k: round(float(v[0]), 4) for k, v in sorted(table.items())}
    return img.astype(np.float32), info


def _bias_field(rn: np.random.Generator, shape, P, strength: float, coil: bool) -> np.ndarray:
    """Smooth multiplicative field: separable low-frequency cosines (+ a posterior surface coil fall-off)."""
    out = np.ones((1, 1, 1), np.float32)
    for ax in range(3):
        n = shape[ax]
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        f = np.zeros(n, np.float32)
        for k in (1, 2):
            f += float(rn.normal(0.0, strength / (2 * k))) * np.cos(k * math.pi * (x + float(rn.uniform(-1, 1))) / 2)
        sh = [1, 1, 1]
        sh[ax] = n
        out = out * np.exp(f).reshape(sh)
    if coil:
        depth = (P.max() - P) / max(float(P.max() - P.min()), 1.0)
        out = out * np.exp(-float(strength) * 1.2 * depth).astype(np.float32)
    return out


def _blur(img: np.ndarray, sigma_vox_inplane: float) -> np.ndarray:
    """In-plane (P, I) Gaussian point-spread; the slice profile along R comes from the sub-voxel averaging."""
    if sigma_vox_inplane <= 0.05:
        return img
    return ndi.gaussian_filter(img, (sigma_vox_inplane, sigma_vox_inplane, 0.0))


def _rician(rn: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (Rician statistics, a noise floor in the air)."""
    if sigma <= 0:
        return img
    n1 = rn.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rn.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


# ============================================================================================ public API
_AXES = (("P", "A"), ("I", "S"), ("R", "L"))


def _parse_orientation(orientation: str | None, rng: np.random.Generator) -> str:
    if orientation is None:
        return "PIR"
    if str(orientation).lower() == "random":
        perm, flips = rng.permutation(3), rng.integers(0, 2, size=3)
        return "".join(_AXES[int(p)][int(f)] for p, f in zip(perm, flips))
    codes = str(orientation).upper()
    pairs = sorted(next((k for k, ax in enumerate(_AXES) if c in ax), -1) for c in codes)
    if len(codes) != 3 or pairs != [0, 1, 2]:
        raise ValueError(f"orientation {orientation!r} is not three axis codes with one of L/R, A/P, S/I each "
                         f"(e.g. 'PIR', 'RAS', 'LPS') or 'random'")
    return codes


def _parse_spacing(spacing, rng: np.random.Generator) -> np.ndarray:
    inplane, lr = rng.uniform(0.6, 1.0), rng.uniform(3.0, 4.0)
    if spacing is None:
        return np.array([inplane, inplane, lr], dtype=float)
    try:
        sp = np.asarray([float(s) for s in spacing], dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three voxel sizes in mm (P, I, R), got {spacing!r}") from None
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp < 0.2) or np.any(sp > 10.0):
        raise ValueError(f"spacing must be three voxel sizes between 0.2 and 10 mm (P, I, R), got {spacing!r}")
    return sp


def visible_variants(fov: str) -> tuple[str, ...]:
    """The variants a field of view ``fov`` can show (e.g. no L6 in a cervical phantom)."""
    out = []
    for v in VARIANTS:
        if not v:
            continue
        try:
            _check_args(fov, "t2w", v)
        except ValueError:
            continue
        out.append(v)
    return tuple(out)


def _check_args(fov: str, mode: str, variant: str | None) -> None:
    if fov not in FOVS:
        raise ValueError(f"fov {fov!r} is unknown; use one of {', '.join(FOVS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; use None or one of {', '.join(v for v in VARIANTS if v)}")
    if variant in ("l6", "sacralised_l5") and fov not in ("lumbar", "whole"):
        raise ValueError(f"variant {variant!r} is not visible in a {fov} field of view; use fov 'lumbar' or 'whole'")
    if variant == "t13" and fov == "cervical":
        raise ValueError("variant 't13' is not visible in a cervical field of view")


def _fov_box(lay: _Layout, fov_names: tuple[str, str], hab: dict, rng: np.random.Generator):
    """Field of view in canonical mm (lo, hi) from the vertebrae its top and bottom borders cut through."""
    elems = {v.name: v for v in lay.verts + lay.sacrum}
    top, bot = fov_names
    if top == "dens":
        c2 = elems["C2"]
        i_top = float(c2.world((1.2, -1.45 * c2.H, 0.0))[1]) - 4.0 - rng.uniform(3.0, 15.0)
    else:
        v = elems[top]
        i_top = float(v.O[1] + rng.uniform(-0.3, 0.3) * v.H)
    if bot == "sacrum":
        s5 = lay.sacrum[-1]
        i_bot = float(s5.world((0.0, 0.5 * s5.H, 0.0))[1]) + rng.uniform(3.0, 25.0)
    else:
        v = elems[bot]
        i_bot = float(v.O[1] + rng.uniform(-0.3, 0.3) * v.H)
    i_s = np.linspace(i_top, i_bot, 64)
    pr = _spine_profiles(lay, i_s)
    rw = _region_weights(lay, i_s)
    fat = hab["fat"] * (0.6 * rw["neck"] + 0.8 * rw["thorax"] + rw["abdomen"] + 1.3 * rw["pelvis"])
    musc = (hab["musc_neck"] * rw["neck"] + hab["musc_thorax"] * rw["thorax"] + hab["musc_lumbar"] * rw["abdomen"]
            + hab["musc_pelvis"] * rw["pelvis"])
    p_lo = float((pr["p_front"]).min() - rng.uniform(35.0, 90.0))
    p_hi = float((pr["p_lam"] + musc + fat).max() + rng.uniform(4.0, 15.0))
    rm = float(np.median(pr["r_mid"])) + rng.uniform(-4.0, 4.0)
    half = rng.uniform(36.0, 55.0)
    return np.array([p_lo, i_top, rm - half]), np.array([p_hi, i_bot, rm + half])


def make_phantom(seed: int, *, fov: str = "lumbar", mode: str = "t2w", variant: str | None = None,
                 spacing: Sequence[float] | None = None, orientation: str | None = "random") -> Phantom:
    """Generate one synthetic spine scan with exact semantic and instance ground truth.

    Parameters
    ----------
    seed : int
        Everything is a deterministic function of the seed (bit-identical output).
    fov : {'cervical', 'thoracic', 'lumbar', 'whole'}
        Field of view: ~C2-T2, ~T1-L1, ~T11/T12-sacrum, C2-sacrum; vertebrae cut by its borders are flagged.
    mode : {'t2w', 'ct', 'random'}
        Calibrated T2w-like or CT (HU) intensities, or domain randomisation.
    variant : {None, 'block', 'collapsed', 'l6', 't13', 'sacralised_l5', 'narrow_discs'}
        Anatomical variant or pathology.
    spacing : (float, float, float), optional
        Output voxel size in mm along P, I, R (before reorientation). Default: sagittal, in-plane 0.6-1.0 mm,
        left-right 3.0-4.0 mm (random by seed).
    orientation : str or None
        Axis codes of the output array ('PIR', 'RAS', 'LPS', ...), 'random' (by seed) or None (= 'PIR').

    Returns
    -------
    Phantom
    """
    t0 = time.perf_counter()
    _check_args(fov, mode, variant)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence(int(seed))
    keys = ["anatomy", "fov", "body", "intensity", "noise", "orientation", "spacing"]
    rngs = {k: np.random.default_rng(c) for k, c in zip(keys, ss.spawn(len(keys)))}
    sp = _parse_spacing(spacing, rngs["spacing"])
    codes = _parse_orientation(orientation, rngs["orientation"])
    fov_names = _fov_names(rngs["fov"], fov)
    lay = _layout(rngs["anatomy"], variant, fov_names, fov)
    hab = _body_params(rngs["body"])
    lo, hi = _fov_box(lay, fov_names, hab, rngs["fov"])
    n = np.maximum(np.ceil((hi - lo) / sp).astype(int), 8)
    hi = lo + n * sp  # the grid's true extent
    f = tuple(int(max(1, math.ceil(s / FINE_MAX_MM - 1e-9))) for s in sp)
    # the fine canvas has a margin of rows above and below the FOV: parts painted there are cut by the FOV
    nm = int(math.ceil(12.0 / sp[1]))
    fine_shape = (int(n[0] * f[0]), int((n[1] + 2 * nm) * f[1]), int(n[2] * f[2]))
    if int(np.prod(fine_shape, dtype=np.int64)) > _MAX_FINE_VOXELS:
        raise ValueError(f"spacing {tuple(float(x) for x in sp)} mm over a {fov} field of view needs "
                         f"{np.prod(fine_shape, dtype=np.int64):.3g} sub-voxels (limit {_MAX_FINE_VOXELS:.3g}); "
                         f"use a coarser spacing")
    fstep = sp / np.asarray(f)
    cv = _Canvas(lo - np.array([0.0, nm * sp[1], 0.0]) + fstep / 2, fstep, fine_shape)
    t1 = time.perf_counter()
    _paint_ribs_and_ilium(cv, lay.verts, lay.sacrum)
    _paint_canal(cv, lay, rngs["anatomy"])
    chain = lay.verts + lay.sacrum[:1]
    for u, w in zip(chain[:-1], chain[1:]):
        _paint_disc(cv, u, w, 100, ivd_id(u.vid), A["nucleus_deg"] if u.degenerated_disc_below else A["nucleus"],
                    A["annulus"], u.cleft and not u.degenerated_disc_below)
    for k, v in enumerate(lay.verts):
        above = lay.verts[k - 1] if k > 0 else None
        below = lay.verts[k + 1] if k + 1 < len(lay.verts) else lay.sacrum[0]
        _paint_vertebra(cv, v, above, below, lay.sacrum)
    _paint_sacrum(cv, lay.sacrum, lay.verts[-1])
    t2 = time.perf_counter()
    mf = nm * f[1]
    cut = _cut_ids(cv, mf)
    inner = (slice(None), slice(mf, fine_shape[1] - mf), slice(None))
    c = tuple(m // 2 for m in f)
    sem = np.ascontiguousarray(cv.sem[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]]).astype(np.int16)
    inst = np.ascontiguousarray(cv.inst[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]]).astype(np.int16)
    # tissue labels: the spine's appearance class of the same centre sub-voxel (its id is the class index), the
    # body's classes elsewhere (filled in by the renderer)
    tissue = np.ascontiguousarray(cv.app[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]])
    out_lo = lo + sp / 2
    img, render_info = _render(cv.app[inner], f, lay, sp, out_lo, mode, rngs, hab, tissue)
    t3 = time.perf_counter()
    # canonical PIR affine (RAS+ world: x = r, y = -p, z = -i), world origin at the FOV centre
    centre = 0.5 * (lo + hi)
    o = out_lo - centre
    aff = np.array([[0.0, 0.0, sp[2], o[2]], [-sp[0], 0.0, 0.0, -o[0]], [0.0, -sp[1], 0.0, -o[1]],
                    [0.0, 0.0, 0.0, 1.0]])
    image = reorient(Scan(img, aff.copy()), codes)
    semantic = reorient(Scan(sem, aff.copy()), codes)
    instance = reorient(Scan(inst, aff.copy()), codes)
    tissue_scan = reorient(Scan(tissue, aff.copy()), codes)
    meta = _meta(seed, fov, mode, variant, sp, codes, f, fov_names, lay, cv, lo, hi, cut, semantic, instance,
                 render_info)
    meta["timing_s"] = {"layout": round(t1 - t0, 3), "rasterise": round(t2 - t1, 3), "render": round(t3 - t2, 3),
                        "total": round(time.perf_counter() - t0, 3)}
    return Phantom(image=image, semantic=semantic, instance=instance, meta=meta, tissue=tissue_scan)


def _cut_ids(cv: _Canvas, rows: int) -> dict[str, set[int]]:
    """Vertebra ids with voxels in the margin rows above/below the FOV: any part ('cut') or the corpus/endplates
    ('corpus_cut')."""
    any_ids: set[int] = set()
    corpus_ids: set[int] = set()
    for sl in (slice(0, rows), slice(cv.shape[1] - rows, cv.shape[1])):
        inst, sem = cv.inst[:, sl, :], cv.sem[:, sl, :]
        ids = set(np.flatnonzero(np.bincount(inst.reshape(-1), minlength=256)).tolist()) - {0}
        any_ids |= {i for i in ids if i <= 28} | {i - 200 for i in ids if i > 200}
        cor = inst[(sem == 49) | (sem == 52) | (sem == 53) | (sem == 26)]
        cids = set(np.flatnonzero(np.bincount(cor.reshape(-1), minlength=256)).tolist()) - {0}
        corpus_ids |= {i for i in cids if i <= 28} | {i - 200 for i in cids if i > 200}
    return {"cut": any_ids, "corpus_cut": corpus_ids}


def _meta(seed, fov, mode, variant, sp, codes, f, fov_names, lay: _Layout, cv: _Canvas, lo, hi, cut: dict,
          semantic: Scan, instance: Scan, render_info: dict) -> dict:
    sem, inst = semantic.array, instance.array
    counts = np.bincount(inst.reshape(-1).astype(np.intp), minlength=256)
    present = {int(k): int(counts[k]) for k in np.flatnonzero(counts)}
    order = [v.vid for v in lay.verts] + [SACRUM_ID]
    vids = [v for v in order if present.get(v, 0) > 0]
    coords = np.nonzero((sem == 49) | (sem == 26))
    lab = inst[coords].astype(np.intp)
    n_c = np.bincount(lab, minlength=256)
    sums = [np.bincount(lab, weights=c, minlength=256) for c in coords]
    cents = [tuple(s_[v] / n_c[v] for s_ in sums) if n_c[v] > 0 else None for v in vids]
    by_id = {v.vid: v for v in lay.verts}
    verts = []
    for vid, cm in zip(vids, cents):
        ext = cv.extent.get(vid)
        cut_lr = bool(ext is not None and (ext[0][2] < lo[2] or ext[1][2] > hi[2]))
        v = by_id.get(vid)
        has_corpus = cm is not None
        entry = {"id": int(vid), "name": instance_name(vid), "cut": vid in cut["cut"],
                 "cut_lateral": cut_lr, "corpus_cut": vid in cut["corpus_cut"], "voxels": int(present[vid]),
                 "centroid_vox": [round(float(x), 2) for x in cm] if has_corpus else None}
        if v is not None:
            for flag in ("collapsed", "sacralised", "fused_below", "fused_above"):
                if getattr(v, flag):
                    entry[flag] = True
        verts.append(entry)
    ivds = []
    for u, w in zip(lay.verts, lay.verts[1:] + [lay.sacrum[0]]):
        iid = ivd_id(u.vid)
        if present.get(iid, 0) > 0:
            ivds.append({"id": iid, "upper": int(u.vid), "lower": int(w.vid), "height_mm": round(float(u.disc), 2),
                         "narrow": bool(u.narrow_disc_below), "degenerated": bool(u.degenerated_disc_below)})
    meta = {
        "generator": "spineps_like.phantom", "version": GENERATOR_VERSION, "seed": int(seed), "fov": fov,
        "mode": mode, "variant": variant, "image_suffix": "ct" if mode == "ct" else "T2w",
        "spacing": [round(float(s), 6) for s in semantic.spacing], "spacing_pir": [round(float(s), 6) for s in sp],
        "orientation": codes, "shape": list(semantic.shape), "fine_factor_pir": list(f),
        "fov_cut_through": list(fov_names), "vertebra_ids": [int(v) for v in vids], "vertebrae": verts,
        "ivd_ids": [d["id"] for d in ivds], "ivds": ivds, "anatomy": json_safe(lay.info), "render": render_info,
    }
    if mode == "random":
        meta["note"] = "domain-randomised intensities; written with the _T2w suffix"
    return meta


def write_phantoms(out: Path, n: int = 1, seed: int = 0, fov: str = "lumbar", mode: str = "t2w",
                   variant: str | None = None, spacing: Sequence[float] | None = None,
                   orientation: str | None = "random", snapshot: bool = True) -> list[Path]:
    """Write ``n`` phantoms (seeds ``seed .. seed+n-1``) as a BIDS-like dataset; returns the image paths.

    Layout: ``out/rawdata/sub-phantomSSSS/anat/sub-phantomSSSS_acq-sag_T2w.nii.gz`` (``_ct`` for CT) and
    ``out/derivatives_gt/sub-phantomSSSS/sub-phantomSSSS_acq-sag_mod-T2w_seg-{spine,vert}_msk.nii.gz``,
    ``..._phantom.json`` (meta) and, with ``snapshot``, ``..._snp.png``. All writes are atomic.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_args(fov, mode, variant)
    out = Path(out)
    paths = []
    snap = None
    if snapshot:
        try:
            from spineps_like.snapshot import save_snapshot as snap
        except ImportError:
            warnings.warn("spineps_like.snapshot is not available; writing no snapshots", stacklevel=2)
    for s in range(int(seed), int(seed) + int(n)):
        ph = make_phantom(s, fov=fov, mode=mode, variant=variant, spacing=spacing, orientation=orientation)
        sub = f"sub-phantom{s:04d}"
        suffix = ph.meta["image_suffix"]
        img_path = out / "rawdata" / sub / "anat" / f"{sub}_acq-sag_{suffix}.nii.gz"
        gt = out / "derivatives_gt" / sub
        stem = f"{sub}_acq-sag_mod-{suffix}"
        save_scan(ph.image, img_path, dtype=np.float32)
        save_mask(ph.semantic, gt / f"{stem}_seg-spine_msk.nii.gz")
        save_mask(ph.instance, gt / f"{stem}_seg-vert_msk.nii.gz")
        atomic_write_json(gt / f"{stem}_phantom.json", ph.meta)
        if snap is not None:
            snap(gt / f"{stem}_snp.png", ph.image, semantic=ph.semantic, instance=ph.instance)
        paths.append(img_path)
    for sub_ds, name in (("rawdata", "spineps-like phantoms"), ("derivatives_gt", "spineps-like phantom ground truth")):
        atomic_write_json(out / sub_ds / "dataset_description.json",
                          {"Name": name, "BIDSVersion": "1.8.0", "DatasetType": "raw" if sub_ds == "rawdata"
                           else "derivative", "GeneratedBy": [{"Name": "spineps_like.phantom",
                                                               "Version": GENERATOR_VERSION}]})
    return paths


# ============================================================================================ calibration
#: Label groups compared between phantoms and the real TPTBox crops.
STAT_GROUPS: dict[str, tuple[int, ...]] = {
    "corpus": (49, 50), "posterior": (41, 42, 43, 44, 45, 46, 47, 48), "endplate": (52, 53, 62), "ivd": (100,),
    "canal": (61,), "cord": (60,), "background": (0,),
}


def label_intensity_stats(image: np.ndarray, semantic: np.ndarray,
                          groups: dict[str, Sequence[int]] | None = None, min_voxels: int = 20) -> dict[str, dict]:
    """Per-label-group intensity statistics of an image.

    Parameters
    ----------
    image, semantic : ndarray
        Image and semantic mask on the same grid (canal is label 61 alone, i.e. canal minus cord).
    groups : dict, optional
        Group name -> labels (default :data:`STAT_GROUPS`).
    min_voxels : int
        Groups with fewer voxels are left out.

    Returns
    -------
    dict
        name -> {'n', 'median', 'q25', 'q75', 'iqr', 'noise'}; 'noise' is a robust (MAD) standard deviation of the
        image minus its 3x3x3 mean inside the group (texture + noise). The background (label 0) is taken inside the
        bounding box of the bone labels (41-50, 26) grown by 5 voxels, as in a crop around the spine.
    """
    from spineps_like.geometry import bbox

    image = np.asarray(image, dtype=np.float32)
    semantic = np.asarray(semantic)
    if image.shape != semantic.shape:
        raise ValueError(f"image shape {image.shape} differs from the semantic mask shape {semantic.shape}")
    hp = image - ndi.uniform_filter(image, 3, mode="nearest")
    out = {}
    box = bbox(np.isin(semantic, (41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 26)), margin=5)
    near = np.zeros(semantic.shape, bool)
    if box is not None:
        near[box] = True
    for name, labels in (groups or STAT_GROUPS).items():
        m = np.isin(semantic, list(labels))
        if tuple(labels) == (0,):
            m &= near
        if m.sum() < min_voxels:
            continue
        vals = image[m]
        q25, med, q75 = (float(x) for x in np.percentile(vals, [25, 50, 75]))
        h = hp[m]
        out[name] = {"n": int(m.sum()), "median": med, "q25": q25, "q75": q75, "iqr": q75 - q25,
                     "noise": float(1.4826 * np.median(np.abs(h - np.median(h))))}
    return out


def tptbox_sample(kind: str) -> dict[str, Path]:
    """Paths of the TPTBox wheel's real sample crop ``kind`` ('mri' or 'ct'), found through the installed package:
    ``image``, ``semantic`` (seg-subreg) and ``instance`` (seg-vert)."""
    import TPTBox

    folder = Path(TPTBox.__file__).parent / "tests" / f"sample_{kind}"
    files = sorted(folder.glob("*.nii.gz"))
    if not files:
        raise FileNotFoundError(f"{folder}: TPTBox sample crop not found")
    return {"image": next(f for f in files if "_seg-" not in f.name),
            "semantic": next(f for f in files if "_seg-subreg" in f.name),
            "instance": next(f for f in files if "_seg-vert" in f.name)}


def _ct_derived_regions(semantic: np.ndarray, instance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IVD and canal regions of a CT crop whose ground truth has neither (PIR arrays).

    IVD: unlabelled voxels in each (P, R) column between the lowest corpus voxel of one vertebra and the highest of
    the next (gap < 20 voxels). Canal: unlabelled voxels in each (I, R) column between the most posterior corpus voxel
    and the most anterior arcus voxel. Both eroded by one voxel against partial volume.
    """
    corp = np.isin(semantic, (49, 50))
    ids = [int(v) for v in np.unique(instance[corp]) if v > 0]
    I_ = np.arange(semantic.shape[1])[None, :, None]
    gap = np.zeros(semantic.shape, bool)
    for a, b in zip(ids[:-1], ids[1:]):
        low_a = np.where(corp & (instance == a), I_, -1).max(1)
        top_b = np.where(corp & (instance == b), I_, 10 ** 6).min(1)
        ok = (low_a >= 0) & (top_b < 10 ** 6) & (top_b - low_a < 20)
        gap |= (I_ > low_a[:, None, :]) & (I_ < top_b[:, None, :]) & ok[:, None, :]
    P_ = np.arange(semantic.shape[0])[:, None, None]
    cb = np.where(corp, P_, -1).max(0)
    ab = np.where(semantic == 41, P_, 10 ** 6).min(0)
    canal = (P_ > cb[None]) & (P_ < ab[None]) & ((cb >= 0) & (ab < 10 ** 6))[None]
    free = semantic == 0
    return ndi.binary_erosion(gap & free), ndi.binary_erosion(canal & free)


def tptbox_reference_stats() -> dict[str, dict]:
    """Intensity statistics of the real TPTBox sample crops (MRI T2w C5-C7, CT L2-L4), label 50 mapped to 49.

    The CT ground truth has no IVD or canal; they are derived geometrically (:func:`_ct_derived_regions`).
    """
    import nibabel as nib

    out = {}
    for kind in ("mri", "ct"):
        f = tptbox_sample(kind)
        img = np.asarray(nib.load(str(f["image"])).dataobj, dtype=np.float32)
        sem = np.asarray(nib.load(str(f["semantic"])).dataobj).astype(np.int16)
        sem[sem == 50] = 49
        if kind == "ct":
            inst = np.asarray(nib.load(str(f["instance"])).dataobj).astype(np.int16)
            ivd, canal = _ct_derived_regions(sem, inst)
            sem = sem.copy()
            sem[ivd] = 100
            sem[canal] = 61
        out[kind] = label_intensity_stats(img, sem)
    return out


CALIBRATION_LEVELS = (21, 22, 23)  # L2-L4: the real crops show three lumbar-sized vertebrae


def _phantom_crop(ph: Phantom, levels: Sequence[int] = CALIBRATION_LEVELS, margin: int = 4):
    """Image and semantic arrays of a PIR phantom cropped around ``levels`` (+ their IVDs), like the real crops."""
    from spineps_like.geometry import bbox

    ins = ph.instance.array
    box = bbox(np.isin(ins, list(levels)) | np.isin(ins, [100 + v for v in levels[:-1]]), margin=margin)
    return ph.image.array[box], ph.semantic.array[box]


def calibration_table(seeds: Iterable[int] = range(4)) -> dict[str, dict]:
    """Real vs phantom statistics on like-for-like crops: lumbar t2w / ct phantoms on the crops' 1.5 mm isotropic
    PIR grid, cropped around L2-L4 (the real MRI crop is labelled C5-C7, but its corpora are lumbar-sized: 40 mm
    deep, 52 mm wide, 34 mm high). Returns {modality: {group: {'real': stats, 'phantom': [stats per seed]}}}; for
    MRI each entry also has 'ratio' = median / corpus median."""
    ref = tptbox_reference_stats()
    res: dict[str, dict] = {}
    for kind, mode in (("mri", "t2w"), ("ct", "ct")):
        rows: dict[str, dict] = {g: {"real": ref[kind].get(g), "phantom": []} for g in STAT_GROUPS}
        for s in seeds:
            ph = make_phantom(s, fov="lumbar", mode=mode, spacing=(1.5, 1.5, 1.5), orientation="PIR")
            st = label_intensity_stats(*_phantom_crop(ph))
            for g in STAT_GROUPS:
                if g in st:
                    rows[g]["phantom"].append(st[g])
        if kind == "mri":
            rc = ref[kind]["corpus"]["median"]
            for g, r in rows.items():
                if r["real"]:
                    r["real"]["ratio"] = r["real"]["median"] / rc
                for st, ph_c in zip(r["phantom"], rows["corpus"]["phantom"]):
                    st["ratio"] = st["median"] / ph_c["median"]
        res[kind] = rows
    return res


def calibration_markdown(table: dict[str, dict]) -> str:
    """Markdown tables from :func:`calibration_table`: real value, phantom mean +- sd over the seeds.

    MRI medians are ratios to the corpus median (IQR and noise too); CT values are HU.
    """
    lines = []
    for kind in ("mri", "ct"):
        rows = table[kind]
        if kind == "mri":
            lines += ["**T2w MRI** (all values / corpus median)", ""]
            norm_r = rows["corpus"]["real"]["median"]
            norm_p = [c["median"] for c in rows["corpus"]["phantom"]]
            fmt = "{:.2f}".format
        else:
            lines += ["**CT** (HU)", ""]
            norm_r, norm_p, fmt = 1.0, None, "{:.0f}".format
        lines += ["| group | real median | phantom median | real IQR | phantom IQR | real noise | phantom noise |",
                  "|---|---|---|---|---|---|---|"]
        for g, r in rows.items():
            cells = [g]
            for key in ("median", "iqr", "noise"):
                real = fmt(r["real"][key] / norm_r) if r["real"] else "–"
                vals = np.array([p[key] for p in r["phantom"]], dtype=float)
                if norm_p is not None and len(vals):
                    vals = vals / np.array(norm_p[:len(vals)])
                cells += [real, f"{fmt(vals.mean())} ± {fmt(vals.std())} (n={len(vals)})" if len(vals) else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def calibration_figure(path: str | Path, seed: int = 0) -> Path:
    """PNG: mid-sagittal slices of the real TPTBox crops beside t2w / ct phantoms (crop at the same levels and
    1.5 mm grid, and the whole phantom at its default sagittal spacing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from spineps_like.io import atomic_path

    fig, axes = plt.subplots(2, 3, figsize=(13, 9.5), gridspec_kw={"width_ratios": [1, 1, 1.25]})
    for row, (kind, fov, mode) in enumerate((("mri", "lumbar", "t2w"), ("ct", "lumbar", "ct"))):
        f = tptbox_sample(kind)
        real = np.asarray(nib.load(str(f["image"])).dataobj, dtype=np.float32)
        rsem = np.asarray(nib.load(str(f["semantic"])).dataobj)
        ph = make_phantom(seed, fov=fov, mode=mode, spacing=(1.5, 1.5, 1.5), orientation="PIR")
        crop, csem = _phantom_crop(ph)
        full = make_phantom(seed, fov=fov, mode=mode, orientation="PIR")
        panels = [(real, rsem, f"real TPTBox crop ({'T2w' if kind == 'mri' else 'CT'}, 1.5 mm)"),
                  (crop, csem, f"phantom {mode}, L2-L4 crop, 1.5 mm"),
                  (full.image.array, full.semantic.array,
                   f"phantom {mode} {fov}, {'x'.join(f'{s:.2f}' for s in full.image.spacing)} mm")]
        for ax, (img, sem, title) in zip(axes[row], panels):
            k = int(np.argmax((sem > 0).sum(axis=(0, 1))))
            sl = img[:, :, k].T
            if kind == "ct":
                lo, hi = -250.0, 1000.0
            else:
                lo, hi = np.percentile(img, [0.5, 99.5])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.suptitle("Mid-sagittal slices (anterior left, head up): real crops vs phantoms", fontsize=12)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
